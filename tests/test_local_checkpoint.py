"""The device's WAL after a large write: copied back off the sync, never left behind."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from syncunit.client import store as store_module
from syncunit.client.store import LocalStore

#: A process that writes 3 MB into a WAL-mode file and ends without closing it, as
#: one killed during its checkpoint does: its WAL stays behind.
_LEAVE_A_WAL = """
import os, sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("PRAGMA journal_mode=WAL")
c.execute("PRAGMA wal_autocheckpoint=0")
c.execute("CREATE TABLE kept (x BLOB)")
c.execute("BEGIN")
c.executemany("INSERT INTO kept VALUES (?)", [(b"x" * 1000,)] * 3000)
c.execute("COMMIT")
os._exit(0)
"""


@pytest.fixture
def checkpoints(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Start times of the background checkpoints; each waits 1 s before copying."""
    started: list[float] = []
    inner = LocalStore._checkpoint

    def slow(self: LocalStore) -> None:
        started.append(time.monotonic())
        time.sleep(1.0)
        inner(self)

    monkeypatch.setattr(LocalStore, "_checkpoint", slow)
    return started


def _wal(path: Path) -> Path:
    return Path(f"{path}-wal")


def _started(checkpoints: list[float], n: int = 1) -> bool:
    """Whether ``n`` background checkpoints have started (their thread runs freely)."""
    deadline = time.monotonic() + 10
    while len(checkpoints) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(checkpoints) == n


def test_close_waits_for_the_background_checkpoint_and_leaves_no_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checkpoints: list[float]
) -> None:
    monkeypatch.setattr(store_module, "BIG_WAL", 0)
    path = tmp_path / "device.sqlite"
    store = LocalStore(path)
    with store.bulk(), store.atomic() as conn:  # a sync's large write
        conn.execute("CREATE TABLE t (x BLOB)")
        conn.executemany("INSERT INTO t VALUES (?)", [(b"y" * 500,)] * 200)
    assert _started(checkpoints)
    thread = store._checkpointer
    assert thread is not None
    assert thread.is_alive()  # sync() would have returned here

    store.close()

    assert not thread.is_alive()
    assert not _wal(path).exists()  # the close, the last connection, removed it
    reopened = LocalStore(path)
    assert reopened.query("SELECT count(*) FROM t") == [(200,)]
    reopened.close()


def test_a_large_wal_left_by_an_ended_process_is_checkpointed_when_the_store_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checkpoints: list[float]
) -> None:
    monkeypatch.setattr(store_module, "BIG_WAL", 1 << 20)
    path = tmp_path / "device.sqlite"
    subprocess.run([sys.executable, "-c", _LEAVE_A_WAL, str(path)], check=True, timeout=60)
    assert _wal(path).stat().st_size > 1 << 20

    store = LocalStore(path)

    assert _started(checkpoints)  # at the open, not at the app's next commit
    assert store.query("PRAGMA wal_autocheckpoint") == [(0,)]  # no commit copies it too
    thread = store._checkpointer
    assert thread is not None
    thread.join(30)
    assert store.query("PRAGMA wal_autocheckpoint") == [(store_module.AUTO_CHECKPOINT,)]
    assert store.query("SELECT count(*) FROM kept") == [(3000,)]
    store.close()
    assert not _wal(path).exists()


def test_a_small_wal_starts_no_checkpoint_at_open(tmp_path: Path, checkpoints: list[float]) -> None:
    path = tmp_path / "device.sqlite"
    keep = LocalStore(path)
    with keep.atomic() as conn:
        conn.execute("CREATE TABLE t (x)")
    other = LocalStore(path)  # the first is still open: its small WAL is there

    assert checkpoints == []
    assert other.query("PRAGMA wal_autocheckpoint") == [(store_module.AUTO_CHECKPOINT,)]
    other.close()
    keep.close()
