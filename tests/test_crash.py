"""Crashes and kills around a push: nothing lost, nothing doubled.

DESIGN invariants 2 (no lost write: a crash or kill at any point loses none)
and 3 (exactly once). A crash is simulated by abandoning a ``SyncClient`` and
opening a new one on the same file, by cutting or losing the response, and for
real by SIGKILLing a client process: itself right after a write, or from the
outside while the server is still working on its push.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Any

import pytest
import sqlalchemy as sa
from hospital.models import appointment

from syncunit.errors import NetworkError
from syncunit.policies import MutationContext
from syncunit.protocol import PushResults
from tests.support import TapTransport, local_keys
from tests.test_push_support import FaultTransport, local_notes

BOOKINGS = [
    {"doctor_id": d, "patient_id": 7, "starts_at": f"2031-05-0{i}T09:00:00",
     "ends_at": f"2031-05-0{i}T09:30:00", "status": "booked", "room": "R2", "notes": f"b{i}"}
    for i, d in enumerate([1, 3, 5], start=1)
]  # fmt: skip


def _copies(store: Any, keys: list[str]) -> dict[str, int]:
    """How many server rows each key has (the key is the primary key: 0 or 1)."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(appointment.c.id, sa.func.count())
            .where(appointment.c.id.in_(keys))
            .group_by(appointment.c.id)
        ).all()
    return {k: dict(rows).get(k, 0) for k in keys}


def _notes_booked(store: Any, keys: list[str]) -> dict[str, str]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(appointment.c.id, appointment.c.notes).where(appointment.c.id.in_(keys))
        )
        return dict(rows.all())


def _book(client: Any) -> list[str]:
    return [client.insert("LocalAppointment", b) for b in BOOKINGS]


def _assert_settled(client: Any, store: Any, keys: list[str], in_sync: Any) -> None:
    assert _copies(store, keys) == dict.fromkeys(keys, 1)
    assert _notes_booked(store, keys) == {
        k: b["notes"] for k, b in zip(keys, BOOKINGS, strict=True)
    }
    assert client.outbox.pending() == []
    assert client.outbox.rejected() == []
    assert set(keys) <= local_keys(client, "LocalAppointment")
    in_sync(client, "Online")


# -- between the local write and the push ----------------------------------------------------------


@pytest.mark.parametrize("how", ["closed", "abandoned"])
def test_writes_made_before_a_crash_are_pushed_by_the_next_client(make_client, store, in_sync, how):
    first = make_client()
    first.sync("Online")
    keys = _book(first)
    if how == "closed":
        first.close()
    # "abandoned": the object is dropped as a killed process would leave it.

    second = make_client()  # the same file
    result = second.sync("Online")

    assert result.applied == 3
    _assert_settled(second, store, keys, in_sync)


# -- between the push and the pull -----------------------------------------------------------------


def test_cut_after_the_push_results_loses_nothing_and_doubles_nothing(make_client, store, in_sync):
    tap = TapTransport()
    first = make_client(transport=tap)
    first.sync("Online")
    keys = _book(first)

    tap.arm(frames=1)  # the push results arrive, then the connection breaks
    with pytest.raises(NetworkError):
        first.sync("Online")
    assert [type(f) for f in tap.last] == [PushResults]
    assert [r.status for r in tap.last[0].results] == ["applied"] * 3
    assert first.outbox.pending() == []  # the results were recorded before the cut

    fault = FaultTransport()
    second = make_client(transport=fault)  # a restart on the same file
    second.sync("Online")

    assert fault.sent[-1].mutations == []  # nothing is pushed twice
    _assert_settled(second, store, keys, in_sync)


def test_response_lost_after_the_server_applied_is_answered_from_the_log(
    make_client, store, in_sync
):
    fault = FaultTransport()
    first = make_client(transport=fault)
    first.sync("Online")
    keys = _book(first)

    fault.lose_next()
    with pytest.raises(NetworkError):
        first.sync("Online")
    assert _copies(store, keys) == dict.fromkeys(keys, 1)  # applied on the server ...
    assert [p.seq for p in first.outbox.pending()] == [1, 2, 3]  # ... unknown to the device
    with store.engine.connect() as conn:
        versions = conn.execute(
            sa.select(appointment.c.id, appointment.c.syncunit_version).where(
                appointment.c.id.in_(keys)
            )
        ).all()

    again = FaultTransport()
    second = make_client(transport=again)
    result = second.sync("Online")

    assert [(m.seq, m.key) for m in again.sent[-1].mutations] == [
        (1, keys[0]),
        (2, keys[1]),
        (3, keys[2]),
    ]
    assert result.applied == 3
    with store.engine.connect() as conn:
        assert (
            conn.execute(
                sa.select(appointment.c.id, appointment.c.syncunit_version).where(
                    appointment.c.id.in_(keys)
                )
            ).all()
            == versions
        )  # not written a second time
    _assert_settled(second, store, keys, in_sync)


def test_cut_in_the_middle_of_the_pull_that_follows_a_push(make_client, store, in_sync):
    tap = TapTransport()
    first = make_client(transport=tap)
    keys = _book_offline_first(first)

    tap.arm(chunks=("appointments", 2))  # the first download is cut after two chunks
    with pytest.raises(NetworkError):
        first.sync("Online")
    assert isinstance(tap.last[0], PushResults)

    second = make_client()
    second.sync("Online")

    _assert_settled(second, store, keys, in_sync)


def _book_offline_first(client: Any) -> list[str]:
    """Bookings made before the device ever pulled (only the catalog is known)."""
    client.catalog()
    return _book(client)


# -- real kills ------------------------------------------------------------------------------------

WRITE_THEN_DIE = """
import os, signal, sys
from syncunit.client import SyncClient
url, path, stage = sys.argv[1:4]
client = SyncClient(url, path, token="t1")
catalog = client.catalog()
with client.store.atomic() as conn:
    for i in range(20):
        conn.execute(
            "INSERT INTO LocalNote (id, owner, title, body, n) VALUES (?, 'u1', ?, '', ?)",
            (f"k{i:02d}", f"title {i}", i),
        )
if stage == "numbered":  # numbered and frozen for a push that never goes out
    client.outbox.prepare([s for s in catalog.streams if s.local_table == "LocalNote"], 1000)
os.kill(os.getpid(), signal.SIGKILL)
"""

SYNC = """
import sys
from syncunit.client import SyncClient
url, path = sys.argv[1:3]
client = SyncClient(url, path, token="t1")
client.catalog()
with client.store.atomic() as conn:
    for i in range(20):
        conn.execute(
            "INSERT INTO LocalNote (id, owner, title, body, n) VALUES (?, 'u1', ?, '', ?)",
            (f"k{i:02d}", f"title {i}", i),
        )
client.sync("Sync")
print("the sync finished: the test meant to kill it first")
"""


def _python(code: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


@pytest.mark.parametrize("stage", ["written", "numbered"])
def test_a_client_killed_after_writing_loses_nothing(notes_app, tmp_path, stage):
    app = notes_app()
    path = tmp_path / "killed.sqlite"
    proc = _python(WRITE_THEN_DIE, app.url, str(path), stage)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()

    fault = FaultTransport()
    device = app.client(transport=fault, name="killed")
    assert device.outbox.count() == 20
    result = device.sync("Sync")

    assert [m.seq for m in fault.sent[-1].mutations] == list(range(1, 21))
    assert result.applied == 20
    assert app.applications() == 20
    assert len(app.rows("u1")) == 20
    assert device.outbox.pending() == []
    assert local_notes(device) == app.rows("u1")


def test_a_client_killed_while_the_server_applies_its_push_loses_nothing(notes_app, tmp_path):
    arrived, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def slow_first_push(ctx: MutationContext) -> str | None:
        calls.append(ctx.key)
        if not arrived.is_set():
            arrived.set()
            release.wait(timeout=60)
        return None

    app = notes_app(rules=[slow_first_push])
    path = tmp_path / "killed.sqlite"
    proc = _python(SYNC, app.url, str(path))
    try:
        assert arrived.wait(timeout=60), proc.stderr.read().decode() if proc.poll() else "no push"
        os.kill(proc.pid, signal.SIGKILL)  # the client dies while the server holds its push
        proc.wait(timeout=60)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    fault = FaultTransport()
    device = app.client(transport=fault, name="killed")
    assert [p.seq for p in device.outbox.pending()] == list(range(1, 21))  # sent, unanswered
    result = device.sync("Sync")

    assert [m.seq for m in fault.sent[-1].mutations] == list(range(1, 21))
    assert result.applied == 20
    assert app.applications() == 20
    # The rule ran 20 times in all: the killed client's request was applied (and committed),
    # the new client's identical request was answered from the log.
    assert len(calls) == 20
    assert [r[0] for r in app.rows("u1")] == [f"k{i:02d}" for i in range(20)]
    assert device.outbox.pending() == []
    assert local_notes(device) == app.rows("u1")


def _copy_db(src: Any, dst: Any) -> None:
    import sqlite3

    a, b = sqlite3.connect(src), sqlite3.connect(dst)
    try:
        a.backup(b)
    finally:
        a.close()
        b.close()


def test_a_device_restored_from_an_old_backup_surfaces_its_reused_numbers(notes_app, tmp_path):
    """The restored outbox hands out numbers the server has seen: refused, kept, retried."""
    app = notes_app()
    path, saved = tmp_path / "device.sqlite", tmp_path / "saved.sqlite"
    device = app.client()
    device.insert("LocalNote", {"id": "a", "owner": "u1", "title": "a"})
    assert device.sync("Sync").applied == 1  # seq 1
    _copy_db(path, saved)
    device.insert("LocalNote", {"id": "b", "owner": "u1", "title": "b"})
    assert device.sync("Sync").applied == 1  # seq 2
    device.close()
    _copy_db(saved, path)  # the device comes back from its backup: next_seq is 2 again

    device = app.client()
    device.insert("LocalNote", {"id": "c", "owner": "u1", "title": "c"})
    result = device.sync("Sync")

    assert [(r["key"], r["code"]) for r in result.rejected] == [("c", "sequence-reused")]
    assert app.row("c") is None
    assert app.row("b")["title"] == "b"  # the other mutation with seq 2 stands
    [kept] = device.outbox.rejected()

    device.outbox.retry(kept.id)
    assert device.sync("Sync").applied == 1  # a fresh number, past the server's
    assert [r[0] for r in app.rows("u1")] == ["a", "b", "c"]
    assert local_notes(device) == app.rows("u1")
