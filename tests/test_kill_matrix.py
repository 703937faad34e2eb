"""The crash matrix: a real device process killed with SIGKILL at named points, and
a real server process killed mid-push and mid-pull.

After each kill the device file is opened again and synced to the end; then
DESIGN invariants 2 and 3 hold (every write that committed locally is on the
server exactly once, nothing is pending or rejected), the device equals the
server (1), and a re-download killed midway left the complete previous copy.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from syncunit.client import SyncClient
from syncunit.errors import NetworkError
from tests.conftest import PlainSQL
from tests.pgserver import free_port
from tests.procs import POINTS, WRITES
from tests.test_push_support import local_notes

ROOT = Path(__file__).parent.parent


def _spawn(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "examples")])}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.procs", *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _settle(device: SyncClient) -> None:
    for _ in range(3):
        device.sync("Sync")
        if not device.outbox.pending():
            return


@pytest.mark.parametrize("point", POINTS)
def test_a_device_killed_at_a_named_point_loses_nothing_and_doubles_nothing(
    notes_app, tmp_path, point
):
    app = notes_app()
    for i in range(20):
        app.add(f"s{i:02d}", title=f"server {i}", n=i)
    path = tmp_path / "device.sqlite"
    proc = _spawn("device", app.url, str(path), point)
    previous: list[Any] = []
    if point.startswith("mid-reset"):
        assert proc.stdout is not None
        assert proc.stdin is not None
        assert proc.stdout.readline().strip() == "pulled", proc.stderr.read() if proc.stderr else ""
        with app.server.store.write() as conn:  # a restored server: every stream resets
            app.server.store._set_fact(conn, "epoch", "restored")
        app.add("s-new", title="after the restore")
        proc.stdin.write("go\n")
        proc.stdin.flush()
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == -signal.SIGKILL, f"{point}: {out}\n{err}"
    wrote = [line.split()[1] for line in out.splitlines() if line.startswith("wrote ")]
    expected = {"before-local-write": 3, "after-local-write": 4}.get(point, WRITES)
    if point in ("after-server-commit", "after-push-results", "mid-chunk-before-cursor"):
        expected = -1  # known below: the server may hold them already
    if point.startswith("mid-reset"):
        expected = 0

    device = SyncClient(app.url, path, token="t1", chunk_size=4)
    try:
        if point.startswith("mid-reset"):
            previous = [r for r in app.rows("u1") if r[0] != "s-new"]
            assert local_notes(device) == previous  # the complete old copy, not a part
        # What committed locally: every reported write, and the one the kill followed.
        committed = sorted(p.key for p in device.outbox.pending())
        if expected == -1:  # pushed before the kill: every write, pending or not
            committed = [f"w{i}" for i in range(WRITES)]
        assert set(wrote) <= set(committed)
        assert len(committed) == expected or expected == -1
        _settle(device)

        for key in committed:
            assert app.applications(key) == 1, f"{point}: {key} applied {app.applications(key)}"
        assert device.outbox.pending() == []
        assert device.outbox.rejected() == []
        assert local_notes(device) == app.rows("u1")
        assert device.store.resets_in_progress() == {}
    finally:
        device.close()


# -- the server killed ------------------------------------------------------------------------


class ServerProcess:
    def __init__(self, directory: Path, database: str) -> None:
        self.directory = directory
        self.database = database
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = _spawn("server", str(self.directory), str(self.port), self.database)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "serving", self.proc.stderr.read() if self.proc.stderr else ""

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.proc.communicate()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


@pytest.fixture
def server_proc(tmp_path: Path, new_database: Callable[[str], str]) -> Iterator[ServerProcess]:
    """The notes server in a process of its own, on a new database of the backend."""
    s = ServerProcess(tmp_path, new_database("killable"))
    s.start()
    yield s
    s.stop()


def _server_rows(server: ServerProcess) -> list[tuple[Any, ...]]:
    return PlainSQL(server.database)(
        "SELECT id, owner, title, body, tag, n, data FROM note WHERE owner = 'u1' ORDER BY id"
    )


def _applications(server: ServerProcess) -> dict[str, int]:
    rows = PlainSQL(server.database)("SELECT note_id, count(*) FROM audit GROUP BY note_id")
    return {key: int(n) for key, n in rows}


def test_the_server_killed_mid_push_loses_nothing(server_proc, tmp_path):
    device = SyncClient(server_proc.url, tmp_path / "device.sqlite", token="t1", timeout=20)
    try:
        device.catalog()
        keys = [
            device.insert("LocalNote", {"id": f"p{i}", "owner": "u1", "title": t})
            for i, t in enumerate(["first", "slow", "third"])
        ]
        import threading

        failed: list[BaseException] = []

        def run() -> None:
            try:
                device.sync("Sync")
            except NetworkError as exc:
                failed.append(exc)

        runner = threading.Thread(target=run)
        runner.start()
        arrived = tmp_path / "push-arrived"
        deadline = time.monotonic() + 30
        while not arrived.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert arrived.exists()
        server_proc.kill()  # mid-push: the transaction never commits
        runner.join(30)
        assert failed, "the sync should have failed with the server gone"
        assert len(device.outbox.pending()) == 3

        device.update("LocalNote", "p1", {"title": "not slow any more"})
        server_proc.start()
        _settle(device)

        assert [r[2] for r in _server_rows(server_proc)] == [
            "first",
            "not slow any more",
            "third",
        ]
        assert _applications(server_proc) == dict.fromkeys(keys, 1) | {"p1": 2}  # insert, update
        assert device.outbox.pending() == []
        assert device.outbox.rejected() == []
        assert local_notes(device) == _server_rows(server_proc)
    finally:
        device.close()


def test_the_server_killed_mid_pull_resumes_from_the_last_chunk(server_proc, tmp_path):
    PlainSQL(server_proc.database).many(
        "INSERT INTO note (id, owner, title, body, n) VALUES (?, 'u1', ?, '', ?)",
        [(f"r{i:03d}", f"row {i}", i) for i in range(300)],
    )
    seen: list[int] = []
    device = SyncClient(
        server_proc.url,
        tmp_path / "device.sqlite",
        token="t1",
        chunk_size=5,
        on_progress=lambda unit, done, total: seen.append(done),
    )
    try:
        import threading

        failed: list[BaseException] = []

        def run() -> None:
            try:
                device.sync("Pull")
            except NetworkError as exc:
                failed.append(exc)

        runner = threading.Thread(target=run)
        runner.start()
        deadline = time.monotonic() + 30
        while (not seen or seen[-1] < 50) and time.monotonic() < deadline:
            time.sleep(0.01)
        server_proc.kill()
        runner.join(30)
        assert failed
        have = len(local_notes(device))
        assert 50 <= have < 300

        server_proc.start()
        result = device.sync("Pull")

        assert result.total_in <= 300 - have + 5  # resumed: the applied chunks were kept
        assert local_notes(device) == _server_rows(server_proc)
    finally:
        device.close()
