"""The outbox: local changes recorded by triggers, coalesced, numbered, and decided.

DESIGN section 4 (push steps 1, 2 and 4) and invariant 2 (no lost write):
triggers record every local change in the same transaction and stay quiet while
the engine applies server changes; sequence numbers are never handed out twice;
rejections and conflicts stay listed until the app retries or discards them.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import pytest

from syncunit.errors import LocalStoreError, NetworkError
from syncunit.policies import Detect, LastWriteWins, MutationContext
from tests.support import appointments_of
from tests.test_push_support import (
    FaultTransport,
    iter_keys,
    local_note,
    local_notes,
    outbox_rows,
)


def no_bad_titles(ctx: MutationContext) -> str | None:
    return "a title may not say 'bad'" if "bad" in ctx.row["title"] else None


def _device(notes_app: Any, policy: Any = None, **options: Any) -> tuple[Any, Any, FaultTransport]:
    """A notes server with rows a and b, and a device that has synced them."""
    app = notes_app(policy=policy or LastWriteWins(), rules=[no_bad_titles])
    app.add("a", title="ta", body="ba")
    app.add("b", title="tb", body="bb")
    fault = FaultTransport()
    device = app.client(transport=fault, **options)
    device.sync("Sync")
    return app, device, fault


def _base(device: Any, key: str) -> dict[str, Any]:
    row = device.store.query("SELECT base FROM syncunit_outbox WHERE row_key = ?", (key,))
    return json.loads(row[0][0])


# -- coalescing ------------------------------------------------------------------------------------


def test_insert_then_updates_is_one_insert(notes_app):
    app, device, fault = _device(notes_app)
    device.insert("LocalNote", {"id": "n", "owner": "u1", "title": "t1"})
    device.update("LocalNote", "n", {"title": "t2"})
    device.update("LocalNote", "n", {"body": "b2"})

    assert [(t, k, op) for t, k, op, _, _ in outbox_rows(device)] == [("LocalNote", "n", "insert")]
    device.sync("Sync")

    [m] = fault.sent[-1].mutations
    assert (m.op, m.values["title"], m.values["body"]) == ("insert", "t2", "b2")
    assert app.row("n")["title"] == "t2"
    assert app.applications("n") == 1


def test_update_then_update_is_one_update_with_the_union_of_columns(notes_app):
    app, device, fault = _device(notes_app, Detect())
    device.update("LocalNote", "a", {"title": "t2"})
    device.update("LocalNote", "a", {"body": "b2"})
    device.update("LocalNote", "a", {"title": "t3"})

    assert outbox_rows(device) == [("LocalNote", "a", "update", ["body", "title"], None)]
    # The base is what the device saw before its first change: what detection compares with.
    assert (_base(device, "a")["title"], _base(device, "a")["body"]) == ("ta", "ba")
    device.sync("Sync")

    [m] = fault.sent[-1].mutations
    assert (sorted(m.changed), m.values) == (["body", "title"], {"title": "t3", "body": "b2"})
    assert (app.row("a")["title"], app.row("a")["body"]) == ("t3", "b2")
    assert app.applications("a") == 1


def test_insert_then_delete_leaves_nothing(notes_app):
    app, device, fault = _device(notes_app)
    device.insert("LocalNote", {"id": "n", "owner": "u1", "title": "t1"})
    device.update("LocalNote", "n", {"title": "t2"})
    device.delete("LocalNote", "n")

    assert outbox_rows(device) == []
    device.sync("Sync")
    assert fault.sent[-1].mutations == []
    assert app.row("n") is None


def test_update_then_delete_is_one_delete(notes_app):
    app, device, fault = _device(notes_app)
    device.update("LocalNote", "a", {"title": "t2"})
    device.delete("LocalNote", "a")

    assert [op for _, _, op, _, _ in outbox_rows(device)] == ["delete"]
    device.sync("Sync")

    [m] = fault.sent[-1].mutations
    assert (m.op, m.key) == ("delete", "a")
    assert app.row("a") is None
    assert local_notes(device) == app.rows("u1")


@pytest.mark.parametrize("policy", [LastWriteWins(), Detect()], ids=["lww", "detect"])
def test_delete_then_insert_again_is_one_insert_against_the_old_base(notes_app, policy):
    app, device, fault = _device(notes_app, policy)
    device.delete("LocalNote", "a")
    device.insert("LocalNote", {"id": "a", "owner": "u1", "title": "again"})

    assert [op for _, _, op, _, _ in outbox_rows(device)] == ["insert"]
    result = device.sync("Sync")

    [m] = fault.sent[-1].mutations
    assert (m.op, m.base["title"], m.base["body"]) == ("insert", "ta", "ba")
    # The server did not change the row since the device saw it: no conflict.
    assert (result.applied, result.conflicts) == (1, [])
    assert (app.row("a")["title"], app.row("a")["body"]) == ("again", "")
    assert local_notes(device) == app.rows("u1")


def test_delete_then_insert_again_conflicts_if_the_server_changed_the_row(notes_app):
    app, device, _ = _device(notes_app, Detect())
    app.backoffice("UPDATE note SET title = 'server' WHERE id = 'a'")
    device.delete("LocalNote", "a")
    device.insert("LocalNote", {"id": "a", "owner": "u1", "title": "again"})

    result = device.sync("Sync")

    assert [c["key"] for c in result.conflicts] == ["a"]
    assert app.row("a")["title"] == "server"
    assert local_notes(device) == app.rows("u1")


def test_delete_insert_delete_of_a_synced_row_is_one_delete(notes_app):
    app, device, _ = _device(notes_app)
    device.delete("LocalNote", "a")
    device.insert("LocalNote", {"id": "a", "owner": "u1", "title": "again"})
    device.delete("LocalNote", "a")

    assert [(k, op) for _, k, op, _, _ in outbox_rows(device)] == [("a", "delete")]
    assert device.sync("Sync").applied == 1
    assert app.row("a") is None
    assert local_notes(device) == app.rows("u1")


def test_a_row_deleted_on_the_server_and_created_again_on_the_device_comes_back(notes_app):
    app, device, _ = _device(notes_app)
    app.backoffice("DELETE FROM note WHERE id = 'a'")
    device.delete("LocalNote", "a")
    device.insert("LocalNote", {"id": "a", "owner": "u1", "title": "created again"})

    assert device.sync("Sync").applied == 1
    assert app.row("a")["title"] == "created again"
    assert local_notes(device) == app.rows("u1")


def test_insert_or_replace_of_an_unchanged_row_is_not_a_conflict(notes_app):
    app, device, _ = _device(notes_app, Detect())
    device.store.conn.execute(
        'INSERT OR REPLACE INTO "LocalNote" (id, owner, title, body, n)'
        " VALUES ('a', 'u1', 'replaced', 'ba', 0)"
    )

    result = device.sync("Sync")

    assert (result.applied, result.conflicts) == (1, [])
    assert app.row("a")["title"] == "replaced"


def _own_connection(device: Any) -> sqlite3.Connection:
    """A plain sqlite3 connection of the app's own to the device's database (SQLite's
    defaults: recursive triggers off)."""
    conn = sqlite3.connect(device.store.path, isolation_level=None)
    assert conn.execute("PRAGMA recursive_triggers").fetchone()[0] == 0
    return conn


def test_insert_or_replace_of_an_unchanged_row_on_an_apps_own_connection_is_not_a_conflict(
    notes_app,
):
    app, device, fault = _device(notes_app, Detect())
    conn = _own_connection(device)
    conn.execute(
        'INSERT OR REPLACE INTO "LocalNote" (id, owner, title, body, n)'
        " VALUES ('a', 'u1', 'replaced', 'ba', 0)"
    )
    conn.close()

    result = device.sync("Sync")

    [m] = fault.sent[-1].mutations
    assert (m.op, m.base["title"], m.base["body"]) == ("insert", "ta", "ba")
    assert (result.applied, result.conflicts) == (1, [])
    assert app.row("a")["title"] == "replaced"
    assert local_notes(device) == app.rows("u1")


@pytest.mark.parametrize("recursive", [True, False], ids=["recursive", "default"])
def test_insert_or_replace_of_an_unpushed_insert_stays_one_insert_without_base(
    notes_app, recursive
):
    """The replaced row's delete is recorded once, whoever records it (the delete
    trigger with recursive triggers on, else the insert's): it cancels the insert."""
    app, device, _ = _device(notes_app, Detect())
    conn = _own_connection(device)
    conn.execute(f"PRAGMA recursive_triggers = {int(recursive)}")
    conn.execute("INSERT INTO \"LocalNote\" (id, owner, title) VALUES ('n', 'u1', 'one')")
    conn.execute(
        "INSERT OR REPLACE INTO \"LocalNote\" (id, owner, title) VALUES ('n', 'u1', 'two')"
    )
    conn.close()

    assert [(k, op) for _, k, op, _, _ in outbox_rows(device)] == [("n", "insert")]
    assert _base(device, "n") == {}
    assert device.sync("Sync").applied == 1
    assert app.row("n")["title"] == "two"


def test_a_row_a_replace_removes_on_the_helpers_connection_is_deleted_on_the_server(notes_app):
    app, device, _ = _device(notes_app)
    conn = device.connect(isolation_level=None)
    # An index of the app's own: a REPLACE that conflicts on it deletes the other row.
    conn.execute('CREATE UNIQUE INDEX app_title ON "LocalNote" (title)')
    conn.execute("INSERT OR REPLACE INTO \"LocalNote\" (id, owner, title) VALUES ('c', 'u1', 'ta')")
    conn.execute("UPDATE OR REPLACE \"LocalNote\" SET title = 'tb' WHERE id = 'c'")
    conn.close()

    assert [(k, op) for _, k, op, _, _ in outbox_rows(device)] == [
        ("a", "delete"),
        ("c", "insert"),
        ("b", "delete"),
    ]
    assert device.sync("Sync").applied == 3
    assert (app.row("a"), app.row("b"), app.row("c")["title"]) == (None, None, "tb")
    assert local_notes(device) == app.rows("u1")


def test_an_unpushed_insert_a_replace_removed_is_not_sent_and_blocks_nothing(notes_app):
    app, device, fault = _device(notes_app)
    conn = _own_connection(device)
    conn.execute('CREATE UNIQUE INDEX app_title ON "LocalNote" (title)')
    conn.execute("INSERT INTO \"LocalNote\" (id, owner, title) VALUES ('n1', 'u1', 'new')")
    # Deletes n1 unseen by the triggers (recursive triggers are off on this connection).
    conn.execute(
        "INSERT OR REPLACE INTO \"LocalNote\" (id, owner, title) VALUES ('n2', 'u1', 'new')"
    )
    conn.execute("UPDATE \"LocalNote\" SET body = 'later' WHERE id = 'b'")
    conn.close()

    result = device.sync("Sync")

    assert sorted(m.key for m in fault.sent[-1].mutations) == ["b", "n2"]
    assert (result.applied, result.rejected) == (2, [])
    assert (app.row("n1"), app.row("n2")["title"], app.row("b")["body"]) == (None, "new", "later")
    assert outbox_rows(device) == []
    assert local_notes(device) == app.rows("u1")


def test_a_changed_synced_row_a_replace_removed_is_pushed_as_its_delete(notes_app):
    app, device, fault = _device(notes_app, Detect())
    conn = _own_connection(device)
    conn.execute('CREATE UNIQUE INDEX app_title ON "LocalNote" (title)')
    conn.execute("UPDATE \"LocalNote\" SET body = 'edited' WHERE id = 'a'")
    conn.execute("UPDATE OR REPLACE \"LocalNote\" SET title = 'ta' WHERE id = 'b'")  # a goes
    conn.close()

    result = device.sync("Sync")

    sent = {m.key: m for m in fault.sent[-1].mutations}
    assert (sent["a"].op, sent["a"].base["body"]) == ("delete", "ba")
    assert (result.applied, result.conflicts) == (2, [])
    assert (app.row("a"), app.row("b")["title"]) == (None, "ta")
    assert local_notes(device) == app.rows("u1")


def test_a_synced_column_the_app_renamed_stops_the_push_with_nothing_sent(notes_app):
    app, device, fault = _device(notes_app)
    conn = _own_connection(device)
    conn.execute("UPDATE \"LocalNote\" SET title = 'edited' WHERE id = 'a'")
    conn.execute('ALTER TABLE "LocalNote" RENAME COLUMN title TO heading')
    requests = len(fault.sent)

    with pytest.raises(LocalStoreError, match="LocalNote has no column 'title'"):
        device.sync("Sync")

    assert len(fault.sent) == requests
    assert [(k, op, ch) for _, k, op, ch, _ in outbox_rows(device)] == [("a", "update", ["title"])]
    assert app.row("a")["title"] == "ta"
    conn.execute('ALTER TABLE "LocalNote" RENAME COLUMN heading TO title')
    conn.close()
    assert device.sync("Sync").applied == 1
    assert app.row("a")["title"] == "edited"


def test_an_upsert_of_a_synced_row_is_an_update(notes_app):
    app, device, _ = _device(notes_app, Detect())
    device.store.conn.execute(
        "INSERT INTO \"LocalNote\" (id, owner, title, body, n) VALUES ('a', 'u1', 'upsert', '', 0)"
        " ON CONFLICT (id) DO UPDATE SET title = excluded.title"
    )
    assert [(op, ch) for _, _, op, ch, _ in outbox_rows(device)] == [("update", ["title"])]
    assert device.sync("Sync").applied == 1
    assert app.row("a")["title"] == "upsert"


def test_an_update_that_changes_nothing_is_not_recorded(notes_app):
    _, device, _ = _device(notes_app)
    device.store.conn.execute('UPDATE "LocalNote" SET title = title, body = body')
    assert outbox_rows(device) == []


def test_plain_sql_is_recorded_like_the_helpers(notes_app):
    app, device, _ = _device(notes_app)
    conn = device.store.conn
    conn.execute("INSERT INTO \"LocalNote\" (id, owner, title) VALUES ('p', 'u1', 'plain')")
    conn.execute("UPDATE \"LocalNote\" SET body = 'sql' WHERE id = 'b'")
    conn.execute("DELETE FROM \"LocalNote\" WHERE id = 'a'")

    assert [(k, op) for _, k, op, _, _ in outbox_rows(device)] == [
        ("p", "insert"),
        ("b", "update"),
        ("a", "delete"),
    ]
    assert device.sync("Sync").applied == 3
    assert local_notes(device) == app.rows("u1")


def test_a_change_rolled_back_leaves_no_outbox_entry(notes_app):
    _, device, _ = _device(notes_app)

    def failing_write() -> None:
        with device.store.atomic() as conn:
            conn.execute("UPDATE \"LocalNote\" SET title = 'gone' WHERE id = 'a'")
            raise RuntimeError("the app failed")

    with pytest.raises(RuntimeError):
        failing_write()
    assert outbox_rows(device) == []
    assert local_note(device, "a")["title"] == "ta"


def test_a_change_to_a_row_in_flight_gets_its_own_entry_and_is_sent_after_it(notes_app):
    app, device, fault = _device(notes_app)
    device.update("LocalNote", "a", {"title": "first"})
    fault.lose_next()
    with pytest.raises(NetworkError):
        device.sync("Sync")
    device.update("LocalNote", "a", {"title": "second"})

    assert [(op, seq) for _, _, op, _, seq in outbox_rows(device)] == [
        ("update", 1),
        ("update", None),
    ]
    result = device.sync("Sync")

    assert [(m.seq, m.values) for m in fault.sent[-1].mutations] == [
        (1, {"title": "first"}),  # the frozen payload, unchanged
        (2, {"title": "second"}),
    ]
    assert result.applied == 2
    assert app.row("a")["title"] == "second"
    assert app.applications("a") == 2
    assert local_notes(device) == app.rows("u1")


# -- the engine's own writes -----------------------------------------------------------------------


def test_pulled_rows_are_not_recorded(client, store, plain_sql):
    client.sync("Login")
    assert client.outbox.count() == 0
    a, b = appointments_of(store, 1)[:2]
    plain_sql("UPDATE appointment SET notes = 'backoffice' WHERE id = ?", (a,))
    plain_sql("DELETE FROM appointment WHERE id = ?", (b,))

    result = client.sync("Login")

    assert result.rows_in["LocalAppointment"] == 1
    assert result.rows_removed["LocalAppointment"] == 1
    assert client.outbox.count() == 0
    assert client.outbox.pending() == []


def test_the_key_of_a_synced_row_cannot_change(notes_app):
    _, device, _ = _device(notes_app)
    with pytest.raises(sqlite3.IntegrityError, match="key of a synced row cannot change"):
        device.store.conn.execute("UPDATE \"LocalNote\" SET id = 'other' WHERE id = 'a'")
    assert local_note(device, "a") is not None
    assert local_note(device, "other") is None
    assert outbox_rows(device) == []
    with pytest.raises(LocalStoreError, match="key of a synced row cannot change"):
        device.update("LocalNote", "a", {"id": "other"})


# -- sequence numbers ------------------------------------------------------------------------------


def test_sequence_numbers_are_never_reused_across_restarts(notes_app):
    app = notes_app()
    fault = FaultTransport()
    device = app.client(transport=fault)
    device.insert("LocalNote", {"id": "a", "owner": "u1", "title": "1"})
    device.insert("LocalNote", {"id": "b", "owner": "u1", "title": "2"})
    assert device.sync("Sync").applied == 2
    device.close()

    device = app.client(transport=fault)  # the same file: a restart
    device.insert("LocalNote", {"id": "c", "owner": "u1", "title": "3"})
    fault.lose_next()
    with pytest.raises(NetworkError):
        device.sync("Sync")
    device.close()

    device = app.client(transport=fault)
    device.insert("LocalNote", {"id": "d", "owner": "u1", "title": "4"})
    assert device.sync("Sync").applied == 2

    sent = [(m.seq, m.key) for r in fault.sent for m in r.mutations]
    assert sent == [(1, "a"), (2, "b"), (3, "c"), (3, "c"), (4, "d")]
    log = app.logged(device.client_id)
    assert [seq for seq, _ in log] == [1, 2, 3, 4]
    assert len({mid for _, mid in log}) == 4
    assert app.applications() == 4
    assert device.store.query("SELECT next_seq FROM syncunit_state")[0][0] == 5


def test_local_writes_stay_durable_after_a_push(notes_app):
    """DESIGN 4: outbox writes use synchronous=FULL; a push must not leave the connection NORMAL."""
    _, device, _ = _device(notes_app)
    full = device.store.query("PRAGMA synchronous")[0][0]
    assert full == 2
    device.update("LocalNote", "a", {"title": "t2"})
    assert device.sync("Push").applied == 1  # a push-only unit: no chunk follows
    assert device.store.query("PRAGMA synchronous")[0][0] == full


def test_a_large_outbox_goes_in_bounded_batches(notes_app):
    app = notes_app()
    fault = FaultTransport()
    device = app.client(transport=fault, push_batch=50)
    device.sync("Sync")
    with device.store.atomic() as conn:
        conn.executemany(
            "INSERT INTO \"LocalNote\" (id, owner, title, body, n) VALUES (?, 'u1', ?, '', 0)",
            [(k, k) for k in iter_keys("n", 120)],
        )
    assert device.outbox.count() == 120

    result = device.sync("Sync")

    assert fault.mutations_per_request[1:] == [50, 50, 20]
    assert [m.seq for r in fault.sent for m in r.mutations] == list(range(1, 121))
    assert (result.requests, result.applied, result.rows_out) == (3, 120, 120)
    assert app.applications() == 120
    assert device.outbox.count() == 0
    assert local_notes(device) == app.rows("u1")


# -- rejected changes and the app's decisions ------------------------------------------------------


def test_a_rejected_change_stays_listed_and_blocks_nothing(notes_app):
    app, device, _ = _device(notes_app)
    device.insert("LocalNote", {"id": "x", "owner": "u1", "title": "a bad title"})
    device.insert("LocalNote", {"id": "y", "owner": "u1", "title": "fine"})
    device.update("LocalNote", "a", {"title": "also fine"})

    result = device.sync("Sync")

    assert result.applied == 2
    assert [(r["key"], r["code"]) for r in result.rejected] == [("x", "rule")]
    [kept] = device.outbox.rejected()
    assert (kept.key, kept.op, kept.status, kept.code) == ("x", "insert", "rejected", "rule")
    assert kept.reason == "a title may not say 'bad'"
    assert kept.attempted["title"] == "a bad title"
    assert app.row("x") is None
    assert local_note(device, "x") is None
    assert (app.row("y")["title"], app.row("a")["title"]) == ("fine", "also fine")

    device.insert("LocalNote", {"id": "z", "owner": "u1", "title": "later"})
    assert device.sync("Sync").applied == 1  # a later sync is not blocked
    assert app.row("z") is not None
    assert [r.key for r in device.outbox.rejected()] == ["x"]  # still listed
    assert device.outbox.pending() == []
    assert local_notes(device) == app.rows("u1")


def test_retry_with_changes_applies_the_change(notes_app):
    app, device, _ = _device(notes_app)
    device.insert("LocalNote", {"id": "x", "owner": "u1", "title": "a bad title", "body": "kept"})
    device.sync("Sync")
    [kept] = device.outbox.rejected()

    device.outbox.retry(kept.id, {"title": "a good title"})

    assert device.outbox.rejected() == []
    assert [(k, op) for _, k, op, _, _ in outbox_rows(device)] == [("x", "insert")]
    assert device.sync("Sync").applied == 1
    assert (app.row("x")["title"], app.row("x")["body"]) == ("a good title", "kept")
    assert local_notes(device) == app.rows("u1")


def test_retry_of_a_conflict_writes_the_change_over_the_server_row(notes_app):
    app, device, _ = _device(notes_app, Detect())
    app.backoffice("UPDATE note SET title = 'server' WHERE id = 'a'")
    device.update("LocalNote", "a", {"title": "device"})
    device.sync("Sync")
    [kept] = device.outbox.rejected()
    assert kept.status == "conflict"

    device.outbox.retry(kept.id)  # "keep mine": the base is now the server's row

    assert device.sync("Sync").applied == 1
    assert app.row("a")["title"] == "device"
    assert device.outbox.rejected() == []
    assert local_notes(device) == app.rows("u1")


def test_discard_removes_the_change_and_keeps_the_server_row(notes_app):
    app, device, fault = _device(notes_app)
    device.update("LocalNote", "b", {"title": "bad", "body": "local"})
    device.sync("Sync")
    [kept] = device.outbox.rejected()
    assert local_note(device, "b") == app.row("b")  # already the server's row

    device.outbox.discard(kept.id)

    assert device.outbox.rejected() == []
    assert device.outbox.pending() == []
    device.sync("Sync")
    assert fault.sent[-1].mutations == []
    assert app.row("b")["title"] == "tb"
    assert local_notes(device) == app.rows("u1")


def test_retry_of_an_unknown_id_is_an_error(notes_app):
    _, device, _ = _device(notes_app)
    with pytest.raises(LocalStoreError):
        device.outbox.retry(12345)


# -- binary columns -------------------------------------------------------------------------------


def test_rows_with_binary_values_can_be_changed_deleted_and_rejected(notes_app):
    app, device, _ = _device(notes_app)
    app.add("img", title="picture", data=b"\x00\xffserver")
    device.sync("Sync")
    assert local_note(device, "img")["data"] == b"\x00\xffserver"

    device.update("LocalNote", "img", {"data": b"\x01device"})  # the trigger keeps a base
    assert device.sync("Sync").applied == 1
    assert app.row("img")["data"] == b"\x01device"

    device.update("LocalNote", "img", {"title": "bad", "data": b"\x02rejected"})
    result = device.sync("Sync")  # the rejected change (with bytes) is kept for the app
    [kept] = device.outbox.rejected()
    assert [r["key"] for r in result.rejected] == ["img"]
    assert kept.attempted == {"title": "bad", "data": b"\x02rejected"}
    assert kept.server_row["data"] == b"\x01device"
    assert local_note(device, "img")["data"] == b"\x01device"

    device.outbox.retry(kept.id, {"title": "good"})
    assert device.sync("Sync").applied == 1
    assert (app.row("img")["title"], app.row("img")["data"]) == ("good", b"\x02rejected")

    device.delete("LocalNote", "img")
    assert device.sync("Sync").applied == 1
    assert app.row("img") is None
    assert local_notes(device) == app.rows("u1")
