"""The device never loses data: schema changes, resets, durability, upgrades, lifecycle.

* a catalog change rebuilds a local table in place (create, copy, swap): the
  unpushed rows and their outbox entries survive, and are pushed;
* a reset downloads beside the old copy and swaps when complete: a cut leaves
  the previous complete rows, and the next run resumes the download;
* app writes commit with the durability they asked for while the engine runs;
* a device file made by 0.1.0 is upgraded in place by numbered migrations;
* only syncunit's own exceptions escape; a callback cannot deadlock the
  client; ``close()`` never closes the database under a running sync.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest
import sqlalchemy as sa

from syncunit import SyncClient
from syncunit.client.migrations import STORE_VERSION
from syncunit.errors import LocalStoreError, NetworkError, SyncError, SyncUnitError
from syncunit.protocol import Catalog, Chunk
from syncunit.server import SyncServer, TokenAuth
from syncunit.server.store import ServerStore
from syncunit.units import Stream, SyncSchema, SyncUnit
from tests.support import local_keys
from tests.test_push_support import NOTE_COLUMNS, TOKENS, FaultTransport, local_note, local_notes

DUMP = Path(__file__).parent / "data" / "device-0.1.0.sql"


def _with_column_type(catalog: Catalog, table: str, column: str, logical: str) -> Catalog:
    """The catalog as an older server described it: one column had another type."""
    streams = []
    for s in catalog.streams:
        if s.local_table == table:
            cols = [
                msgspec.structs.replace(c, type=logical) if c.name == column else c
                for c in s.columns
            ]
            s = msgspec.structs.replace(s, columns=cols, definition=s.definition + "-old")
        streams.append(s)
    return msgspec.structs.replace(catalog, streams=streams, schema_hash="older")


def _column_type(client: SyncClient, table: str, column: str) -> str:
    rows = client.store.query(f'PRAGMA table_info("{table}")')
    return next(r[2] for r in rows if r[1] == column)


# -- schema changes ------------------------------------------------------------------------


def test_a_column_type_change_keeps_unpushed_rows_and_pushes_them(notes_app):
    app = notes_app()
    app.add("s1", title="from the server", n=5)
    device = app.client()
    device.sync("Sync")
    current = device.store.catalog()
    assert current is not None
    device.store.apply_catalog(_with_column_type(current, "LocalNote", "n", "text"))
    for i in range(3):
        device.insert("LocalNote", {"id": f"k{i}", "owner": "u1", "title": f"t{i}", "n": i})
    assert _column_type(device, "LocalNote", "n") == "TEXT"

    # The server answers schema-changed; the catalog is fetched again and the table
    # rebuilt with n INTEGER (a type change), then the push goes out.
    result = device.sync("Sync")

    assert _column_type(device, "LocalNote", "n") == "INTEGER"
    assert result.applied == 3
    assert result.rejected == []
    assert device.outbox.pending() == []
    assert [(r[0], r[5]) for r in app.rows("u1")] == [("k0", 0), ("k1", 1), ("k2", 2), ("s1", 5)]
    assert local_notes(device) == app.rows("u1")


def test_a_schema_change_keeps_rows_and_outbox_even_before_the_push(notes_app):
    app = notes_app()
    device = app.client()
    device.sync("Sync")
    device.insert("LocalNote", {"id": "k", "owner": "u1", "title": "mine", "n": 7})
    before = device.outbox.pending()
    current = device.store.catalog()
    assert current is not None

    changes = device.store.apply_catalog(_with_column_type(current, "LocalNote", "n", "real"))

    assert "rebuilt LocalNote (rows kept)" in changes
    assert device.store.query("SELECT id, title, n FROM LocalNote") == [("k", "mine", 7.0)]
    assert device.outbox.pending() == before
    # The triggers are back: a later change is recorded.
    device.update("LocalNote", "k", {"title": "changed"})
    assert device.outbox.pending()[0].changed == ["title"]


def test_changes_to_a_table_no_longer_synced_are_surfaced_not_dropped(notes_app):
    app = notes_app()
    device = app.client()
    device.sync("Sync")
    device.insert("LocalNote", {"id": "k", "owner": "u1", "title": "mine"})
    current = device.store.catalog()
    assert current is not None
    units = [msgspec.structs.replace(u, push=[]) for u in current.units]

    device.store.apply_catalog(msgspec.structs.replace(current, units=units))

    assert device.outbox.pending() == []
    [kept] = device.outbox.rejected()
    assert (kept.key, kept.code) == ("k", "schema-changed")
    assert "no longer synced" in kept.reason


# -- catalog changes with unpushed changes: what the user wrote survives ------------------------


def _serve(app: Any, stream: Stream, *, pushes: bool = True) -> SyncServer:
    """Serve ``app``'s database with another schema: its catalog changes for the devices."""
    units = [SyncUnit("Sync", [stream], direction="both" if pushes else "pull")]
    units.append(SyncUnit("Pull", [stream]))
    if pushes:
        units.append(SyncUnit("Push", [stream], direction="push"))
    schema = SyncSchema(units)
    server = SyncServer(schema, app.database, authenticate=TokenAuth(TOKENS), install=False)
    server.store.install(schema)
    app.live.app = server.app
    return server


def _notes(app: Any, columns: dict[str, str]) -> Stream:
    """The notes stream with its local columns named ``columns`` (local name -> column)."""
    note = app.note
    return Stream(
        "notes",
        note,
        {local: note.c[name] for local, name in columns.items()},
        where=note.c.owner == sa.bindparam("owner"),
        local_table="LocalNote",
    )


def _keyed_by_code(app: Any) -> Stream:
    """The notes of a new server table keyed by ``code`` (the same rows, a new key)."""
    meta = sa.MetaData()
    note2 = sa.Table(
        "note2",
        meta,
        sa.Column("code", sa.String(36), primary_key=True),
        sa.Column("id", sa.String(36), unique=True),
        sa.Column("owner", sa.String(20)),
        sa.Column("title", sa.String(80)),
    )
    meta.create_all(app.server.store.engine)
    with app.server.store.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO note2 (code, id, owner, title)"
                " SELECT 'c-' || id, id, owner, title FROM note"
            )
        )
    return Stream(
        "notes",
        note2,
        {c: note2.c[c] for c in ("code", "id", "owner", "title")},
        where=note2.c.owner == sa.bindparam("owner"),
        local_table="LocalNote",
    )


RENAMED = {"id": "id", "owner": "owner", "headline": "title", "body": "body", "n": "n"}


def test_a_renamed_column_pulled_first_keeps_the_unpushed_values(notes_app):
    app = notes_app()
    app.add("s1", title="server title", n=1)
    device = app.client()
    device.sync("Sync")
    device.insert("LocalNote", {"id": "k1", "owner": "u1", "title": "my new note", "n": 42})
    device.update("LocalNote", "s1", {"title": "my edit", "n": 2})
    server = _serve(app, _notes(app, RENAMED))
    try:
        device.sync("Pull")  # the new catalog comes with a pull: the column goes first
        result = device.sync("Sync")

        assert result.applied == 0  # the insert is not reported applied without its title
        got = {(r.key, r.op): r for r in device.outbox.rejected()}
        assert got[("k1", "insert")].attempted["title"] == "my new note"
        assert got[("k1", "insert")].attempted["n"] == 42
        assert got[("s1", "update")].attempted == {"title": "my edit", "n": 2}
        assert {r.code for r in got.values()} == {"unknown-column"}
        assert app.row("k1") is None

        # Retried, the value goes under the column's new name; the old one is left out.
        edit = got[("s1", "update")]
        with pytest.raises(LocalStoreError, match=r"no column 'title'.*without=\['title'\]"):
            device.outbox.retry(edit.id)
        device.outbox.retry(edit.id, {"headline": "my edit"}, without=["title"])
        device.sync("Sync")
        assert (app.row("s1") or {})["title"] == "my edit"
        assert (app.row("s1") or {})["n"] == 2
    finally:
        server.store.engine.dispose()


def test_a_key_change_pulled_first_surfaces_every_unpushed_change_with_its_values(notes_app):
    app = notes_app()
    for key in ("s1", "s2"):
        app.add(key, title=f"server {key}")
    device = app.client()
    device.sync("Sync")
    device.insert("LocalNote", {"id": "k-new", "owner": "u1", "title": "only on the device"})
    device.update("LocalNote", "s2", {"title": "my edit of s2"})
    device.delete("LocalNote", "s1")
    server = _serve(app, _keyed_by_code(app))
    try:
        device.sync("Pull")
        result = device.sync("Sync")

        assert result.applied == 0
        got = {(r.key, r.op): r for r in device.outbox.rejected()}
        assert set(got) == {("k-new", "insert"), ("s2", "update"), ("s1", "delete")}
        assert got[("k-new", "insert")].attempted["title"] == "only on the device"
        assert got[("s2", "update")].attempted == {"title": "my edit of s2"}
        assert {r.code for r in got.values()} == {"schema-changed"}
        assert "from 'id' to 'code'" in got[("s1", "delete")].reason
        assert device.outbox.pending() == []
        # The delete names the row by its old key: retried as it is, it would delete nothing.
        with pytest.raises(LocalStoreError, match="no row has that key"):
            device.outbox.retry(got[("s1", "delete")].id)
    finally:
        server.store.engine.dispose()


def test_a_delete_sent_just_before_a_key_change_is_not_reported_applied(notes_app):
    app = notes_app()
    for key in ("s1", "s2"):
        app.add(key, title=f"server {key}")
    device = app.client()
    device.sync("Sync")
    device.delete("LocalNote", "s1")
    device.update("LocalNote", "s2", {"title": "my edit of s2"})
    server = _serve(app, _keyed_by_code(app))
    try:
        # Numbered and sent under the old catalog: refused (schema-changed), the
        # catalog comes, and they go again, in flight, named by the old key.
        result = device.sync("Sync")

        assert result.applied == 0
        got = {(r.key, r.op): r for r in device.outbox.rejected()}
        assert set(got) == {("s1", "delete"), ("s2", "update")}
        assert {r.code for r in got.values()} == {"schema-changed"}
        assert got[("s2", "update")].attempted == {"title": "my edit of s2"}
        assert device.outbox.pending() == []
    finally:
        server.store.engine.dispose()


def test_an_edit_of_a_table_no_longer_pushed_is_surfaced_with_its_values(notes_app):
    app = notes_app()
    app.add("s1", title="server title", body="b0")
    device = app.client()
    device.sync("Sync")
    device.update("LocalNote", "s1", {"title": "my local edit"})
    server = _serve(app, _notes(app, {c: c for c in NOTE_COLUMNS}), pushes=False)
    try:
        device.sync("Pull")

        [kept] = device.outbox.rejected()
        assert (kept.key, kept.op, kept.code) == ("s1", "update", "schema-changed")
        assert kept.attempted == {"title": "my local edit"}
        with pytest.raises(LocalStoreError, match="no longer synced"):
            device.outbox.retry(kept.id)
        app.backoffice("UPDATE note SET body = 'b1' WHERE id = 's1'")
        device.sync("Pull")
        assert [r.attempted for r in device.outbox.rejected()] == [{"title": "my local edit"}]
    finally:
        server.store.engine.dispose()


def test_a_change_in_flight_when_no_unit_takes_changes_any_more_is_surfaced(notes_app):
    app = notes_app()
    app.add("s1", title="server title")
    device = app.client()
    device.sync("Sync")
    device.update("LocalNote", "s1", {"title": "sent, answer lost"})
    catalog = device.store.catalog()
    assert catalog is not None
    device.outbox.prepare(catalog.streams, 10)  # numbered: in flight, its answer unknown
    device.insert("LocalNote", {"id": "k", "owner": "u1", "title": "not sent"})
    old_id = device.client_id
    server = _serve(app, _notes(app, {c: c for c in NOTE_COLUMNS}), pushes=False)
    try:
        device.sync("Pull")

        assert device.outbox.pending() == []
        got = {r.key: r for r in device.outbox.rejected()}
        assert set(got) == {"s1", "k"}
        assert (got["s1"].code, got["s1"].op) == ("schema-changed", "update")
        assert got["s1"].attempted == {"title": "sent, answer lost"}
        assert "may have applied it" in got["s1"].reason
        assert got["k"].code == "schema-changed"
        # Its number is answered by nobody: the device numbers afresh, under a new id.
        assert device.client_id != old_id
    finally:
        server.store.engine.dispose()
    # The table is pushed again: a new change is not held behind the surfaced one.
    app.live.app = app.server.app
    device.sync("Pull")  # the catalog: the table is pushed again
    device.update("LocalNote", "s1", {"title": "after"})
    assert device.sync("Sync").applied == 1
    assert (app.row("s1") or {})["title"] == "after"


def test_rows_of_changes_a_catalog_change_made_unsendable_come_back_as_the_server_has_them(
    notes_app,
):
    """The table stops being pushed but is still pulled: the unsent edits, insert and
    delete become rejections, and their rows go back to the server's, including a
    version the server wrote meanwhile that the pulls skipped (the row had a change)."""
    app = notes_app()
    for key in ("s1", "s2", "s3"):
        app.add(key, title=f"server {key}")
    device = app.client()
    device.sync("Sync")
    device.update("LocalNote", "s1", {"title": "my edit of s1"})
    device.update("LocalNote", "s2", {"title": "my edit of s2"})
    device.insert("LocalNote", {"id": "k", "owner": "u1", "title": "only on the device"})
    device.delete("LocalNote", "s3")
    app.backoffice("UPDATE note SET title = 'server s2, later' WHERE id = 's2'")
    device.sync("Pull")  # skips s2: it has a local change
    assert (local_note(device, "s2") or {})["title"] == "my edit of s2"
    server = _serve(app, _notes(app, {c: c for c in NOTE_COLUMNS}), pushes=False)
    try:
        device.sync("Pull")

        got = {(r.key, r.op): r for r in device.outbox.rejected()}
        assert set(got) == {("s1", "update"), ("s2", "update"), ("k", "insert"), ("s3", "delete")}
        assert {r.code for r in got.values()} == {"schema-changed"}
        assert got[("s2", "update")].attempted == {"title": "my edit of s2"}
        assert device.outbox.pending() == []
        assert local_notes(device) == app.rows("u1")  # while the rejections are listed
        assert (local_note(device, "s2") or {})["title"] == "server s2, later"
        for r in got.values():
            device.outbox.discard(r.id)
        device.sync("Pull")
        assert local_notes(device) == app.rows("u1")
    finally:
        server.store.engine.dispose()


def _two_changes_in_flight(app: Any) -> Any:
    """A device with two changes in flight: to s1, applied by the server but its answer
    lost; to s2, numbered and never sent."""
    for key in ("s1", "s2"):
        app.add(key, title=f"server {key}")
    lossy = FaultTransport()
    device = app.client(transport=lossy)
    device.sync("Sync")
    device.update("LocalNote", "s1", {"title": "applied, answer lost"})
    lossy.lose_next()
    with pytest.raises(NetworkError):
        device.sync("Push")
    device.update("LocalNote", "s2", {"title": "numbered, never sent"})
    catalog = device.store.catalog()
    assert catalog is not None
    device.outbox.prepare(catalog.streams, 10)
    return device


def test_a_row_of_a_change_in_flight_surfaced_by_a_catalog_change_ends_as_the_server_has_it(
    notes_app,
):
    """Numbered, unanswered, and then no unit takes changes: the server may or may not
    have applied it; the table copies afresh and the row is the server's."""
    app = notes_app()
    device = _two_changes_in_flight(app)
    app.backoffice("UPDATE note SET n = 7 WHERE id = 's1'")
    server = _serve(app, _notes(app, {c: c for c in NOTE_COLUMNS}), pushes=False)
    try:
        device.sync("Pull")

        assert {r.key for r in device.outbox.rejected()} == {"s1", "s2"}
        assert local_notes(device) == app.rows("u1")
        assert (local_note(device, "s1") or {})["title"] == "applied, answer lost"
        assert (local_note(device, "s2") or {})["title"] == "server s2"
    finally:
        server.store.engine.dispose()


def _other_table_pushed(app: Any) -> SyncServer:
    """Serve notes pull-only, and a unit ``Other`` that pushes another table."""
    meta = sa.MetaData()
    other = sa.Table(
        "other",
        meta,
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("owner", sa.String(20)),
    )
    meta.create_all(app.server.store.engine)
    notes = _notes(app, {c: c for c in NOTE_COLUMNS})
    others = Stream(
        "others",
        other,
        {c: other.c[c] for c in ("id", "owner")},
        where=other.c.owner == sa.bindparam("owner"),
        local_table="LocalOther",
    )
    schema = SyncSchema([SyncUnit("Pull", [notes]), SyncUnit("Other", [others], direction="both")])
    server = SyncServer(schema, app.database, authenticate=TokenAuth(TOKENS), install=False)
    server.store.install(schema)
    app.live.app = server.app
    return server


def test_changes_in_flight_to_a_table_no_longer_pushed_are_answered_by_any_pushing_unit(
    notes_app,
):
    app = notes_app()
    device = _two_changes_in_flight(app)
    assert [p.seq for p in device.outbox.pending()] == [1, 2]
    server = _other_table_pushed(app)
    try:
        device.catalog(refresh=True)
        assert [p.seq for p in device.outbox.pending()] == [1, 2]  # still in flight

        # Sent through the unit that pushes another table: seq 1 is answered from the
        # server's log (applied once), seq 2 refused (read-only now): surfaced.
        result = device.sync("Other")

        assert device.outbox.pending() == []
        assert result.applied == 1
        assert app.applications("s1") == 1
        assert (app.row("s1") or {})["title"] == "applied, answer lost"
        [kept] = device.outbox.rejected()
        assert (kept.key, kept.code) == ("s2", "read-only-table")
        assert kept.attempted == {"title": "numbered, never sent"}
        assert (app.row("s2") or {})["title"] == "server s2"
        # The seqs after them are not blocked.
        device.insert("LocalOther", {"id": "o1", "owner": "u1"})
        assert device.sync("Other").applied == 1
        with server.store.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT id FROM other")).fetchall() == [("o1",)]
    finally:
        server.store.engine.dispose()


def _serve_units(app: Any, units: list[SyncUnit]) -> SyncServer:
    """Serve ``app``'s database with the units ``units``: a redeploy the devices see."""
    schema = SyncSchema(units)
    server = SyncServer(schema, app.database, authenticate=TokenAuth(TOKENS), install=False)
    server.store.install(schema)
    app.live.app = server.app
    return server


def _titles(app: Any) -> Stream:
    """Another stream on ``note``, into a local table of its own."""
    note = app.note
    return Stream(
        "titles",
        note,
        [note.c.id, note.c.owner, note.c.title],
        where=note.c.owner == sa.bindparam("owner"),
        local_table="LocalTitle",
    )


def test_a_stream_a_unit_takes_in_after_a_redeploy_drops_rows_that_left_it(notes_app):
    """Invariants 1, 4, 5: the device holds the notes (and their cursor) from one unit;
    another unit takes the stream in. Its first sync after the deploy asks without the
    notes' cursor (the device's catalog did not list them in it): the copy it gets is
    the whole picture and replaces the rows, keeping the unpushed one."""
    app = notes_app()
    for key in ("s1", "s2", "s3"):
        app.add(key, title=key)
    titles = _titles(app)
    v1 = _serve_units(app, [SyncUnit("Titles", [titles]), SyncUnit("Sync", [app.stream], "both")])
    device = app.client()
    device.sync("Titles")
    device.sync("Sync")
    device.insert("LocalNote", {"id": "k", "owner": "u1", "title": "mine"})
    app.backoffice("DELETE FROM note WHERE id = 's1'")
    app.backoffice("UPDATE note SET owner = 'u2' WHERE id = 's2'")
    v2 = _serve_units(
        app, [SyncUnit("Titles", [titles, app.stream]), SyncUnit("Sync", [app.stream], "both")]
    )
    try:
        device.sync("Titles")
        assert sorted(k for (k,) in device.store.query("SELECT id FROM LocalNote")) == ["k", "s3"]
        assert local_note(device, "k") is not None  # unpushed: kept
        device.sync("Titles")
        device.sync("Sync")
        assert local_notes(device) == app.rows("u1")
        assert [r[0] for r in local_notes(device)] == ["k", "s3"]
    finally:
        v1.store.engine.dispose()
        v2.store.engine.dispose()


def test_a_stream_dropped_from_the_catalog_takes_its_table_along(notes_app):
    """A deploy drops the notes stream, then is rolled back: its table went with it (its
    unpushed insert surfaced with its values), so the stream comes back copied afresh,
    without the note the server deleted meanwhile nor the insert it never got."""
    app = notes_app()
    for key in ("s1", "s2"):
        app.add(key, title=key)
    device = app.client()
    device.sync("Sync")
    device.insert("LocalNote", {"id": "k", "owner": "u1", "title": "mine"})
    app.backoffice("DELETE FROM note WHERE id = 's1'")
    v2 = _serve_units(app, [SyncUnit("Sync", [_titles(app)], "both")])
    try:
        device.sync("Sync")

        tables = {n for (n,) in device.store.query("SELECT name FROM sqlite_master")}
        assert "LocalNote" not in tables
        [kept] = device.outbox.rejected()
        assert (kept.key, kept.op, kept.code) == ("k", "insert", "unknown-table")
        assert kept.attempted["title"] == "mine"
        assert device.store.query(
            "SELECT count(*) FROM syncunit_cursors WHERE local_table = 'LocalNote'"
        ) == [(0,)]

        app.live.app = app.server.app  # rolled back
        device.sync("Sync")
        device.sync("Sync")
        assert local_notes(device) == app.rows("u1")
        assert [r[0] for r in local_notes(device)] == ["s2"]
    finally:
        v2.store.engine.dispose()


def test_a_renamed_local_table_leaves_no_stale_copy_behind(notes_app):
    """The stream fills another local table after a deploy: the old one goes, so the
    rows of a rollback are copied afresh, not the ones left from before."""
    app = notes_app()
    for key in ("s1", "s2"):
        app.add(key, title=key)
    device = app.client()
    device.sync("Sync")
    note = app.note
    moved = Stream(
        "notes",
        note,
        {c: note.c[c] for c in NOTE_COLUMNS},
        where=note.c.owner == sa.bindparam("owner"),
        local_table="Note2",
    )
    v2 = _serve_units(app, [SyncUnit("Sync", [moved], "both")])
    try:
        device.sync("Sync")
        assert device.store.query("SELECT id FROM Note2 ORDER BY id") == [("s1",), ("s2",)]
        app.backoffice("DELETE FROM note WHERE id = 's1'")
        app.live.app = app.server.app  # rolled back
        device.sync("Sync")
        assert local_notes(device) == app.rows("u1")
        tables = {n for (n,) in device.store.query("SELECT name FROM sqlite_master")}
        assert "Note2" not in tables
    finally:
        v2.store.engine.dispose()


# -- resets beside the old copy --------------------------------------------------------------


def _new_epoch(store: ServerStore) -> None:
    with store.write() as conn:
        store._set_fact(conn, "epoch", "a-restored-database")


def test_a_reset_cut_midway_leaves_the_complete_previous_copy(tapped, tap, store, in_sync):
    tapped.sync("Login")
    before = local_keys(tapped, "LocalAppointment")
    assert len(before) == 200
    _new_epoch(store)  # every stream resets

    tap.arm(chunks=("appointments", 3))
    with pytest.raises(NetworkError):
        tapped.sync("Login")

    assert local_keys(tapped, "LocalAppointment") == before  # not 48 of 200
    assert tapped.store.resets_in_progress() == {"appointments": "LocalAppointment"}

    result = tapped.sync("Login")

    resumed = [f for f in tap.responses[-1] if isinstance(f, Chunk) and f.stream == "appointments"]
    assert not any(f.reset for f in resumed)  # it resumed the download, not restarted it
    assert sum(f.row_count() for f in resumed) < 200
    assert result.rows_in["LocalAppointment"] < 200
    assert tapped.store.resets_in_progress() == {}
    assert (
        tapped.store.query(
            "SELECT 1 FROM sqlite_master WHERE name = 'syncunit_reset_LocalAppointment'"
        )
        == []
    )
    in_sync(tapped, "Login")


def test_a_reset_keeps_rows_with_unpushed_changes(notes_app):
    app = notes_app()
    for i in range(40):
        app.add(f"s{i:02d}", title="server")
    device = app.client(chunk_size=8)
    device.sync("Pull")
    device.update("LocalNote", "s03", {"title": "mine"})
    with app.server.store.write() as conn:
        app.server.store._set_fact(conn, "epoch", "another")

    device.sync("Pull")

    assert device.store.query("SELECT title FROM LocalNote WHERE id = 's03'") == [("mine",)]
    assert len(local_notes(device)) == 40
    device.sync("Sync")
    assert app.row("s03")["title"] == "mine"
    assert local_notes(device) == app.rows("u1")


# -- durability of the app's writes -------------------------------------------------------------


def test_app_writes_during_a_sync_commit_with_full_durability(make_client, store):
    device = make_client(chunk_size=4)
    device.catalog()
    device.store.conn.execute("CREATE TABLE app_log (n INTEGER)")
    levels: list[int] = []
    done = threading.Event()

    def app_writes() -> None:
        n = 0
        while not done.is_set():
            with device.store.atomic() as c:
                c.execute("INSERT INTO app_log VALUES (?)", (n,))
                levels.append(int(c.execute("PRAGMA synchronous").fetchone()[0]))
            n += 1

    writer = threading.Thread(target=app_writes)
    writer.start()
    try:
        device.sync("Login")
        device.sync("Splash")
    finally:
        done.set()
        writer.join(30)
    assert len(levels) > 20
    assert min(levels) >= 2, f"{levels.count(1)} of {len(levels)} app writes without FULL"


def test_a_connection_given_by_the_app_keeps_its_own_stronger_setting(live, tmp_path):
    conn = sqlite3.connect(tmp_path / "app.sqlite", isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA synchronous=EXTRA")
    from syncunit import LocalStore

    device = SyncClient(live.url, LocalStore(conn), token="token-h1", chunk_size=16)
    try:
        device.sync("Login")
        device.sync("Splash")
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 3
    finally:
        device.close()


# -- upgrades of the engine's own tables ----------------------------------------------------------


def test_a_device_file_of_0_1_0_is_upgraded_in_place(live, tmp_path, store, in_sync):
    path = tmp_path / "old-device.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(DUMP.read_text())
    conn.close()

    device = SyncClient(live.url, path, token="token-h1", chunk_size=16)
    try:
        assert device.store.migrated == list(range(2, STORE_VERSION + 1))
        assert device.store.get_fact("store_version") == str(STORE_VERSION)
        assert device.client_id == "fd28021c-c05a-413a-a152-c03ce75e5261"  # kept
        assert device.scheduler.queued() == ["Online"]  # queued work survives
        [pending] = device.outbox.pending()
        assert pending.key == "0190c0de-0000-7000-8000-000000000001"

        result = device.sync("Online")

        assert result.applied == 1
        assert device.outbox.pending() == []
        in_sync(device, "Online")
    finally:
        device.close()
    reopened = SyncClient(live.url, path, token="token-h1")
    try:
        assert reopened.store.migrated == []  # nothing left to run
    finally:
        reopened.close()


def test_a_device_file_of_a_newer_engine_is_refused(tmp_path):
    path = tmp_path / "newer.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE syncunit_local (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute("INSERT INTO syncunit_local VALUES ('store_version', '999')")
    conn.commit()
    conn.close()
    from syncunit import LocalStore

    with pytest.raises(LocalStoreError, match="newer syncunit"):
        LocalStore(path)
    conn = sqlite3.connect(path)  # left as it was: not switched to WAL, no sidecars
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    conn.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["newer.sqlite"]


# -- errors, callbacks, close ------------------------------------------------------------


def test_local_writes_raise_only_syncunit_errors(client):
    client.catalog()
    key = client.insert("LocalAppointment", {"doctor_id": 1, "notes": "x"})
    with pytest.raises(LocalStoreError, match="no column named nope"):
        client.insert("LocalAppointment", {"nope": 1})
    with pytest.raises(LocalStoreError, match="UNIQUE"):
        client.insert("LocalAppointment", {"id": key, "notes": "again"})
    with pytest.raises(LocalStoreError, match="no such column"):
        client.update("LocalAppointment", key, {"nope": 1})
    with pytest.raises(LocalStoreError):
        client.update("LocalAppointment", key, {})
    with pytest.raises(LocalStoreError, match="not a synced local table"):
        client.delete("Nope", key)
    assert client.outbox.count() == 1


def test_sync_from_a_progress_callback_is_refused_not_deadlocked(make_client):
    seen: list[BaseException] = []
    holder: list[SyncClient] = []

    def on_progress(unit: str, done: int, total: int) -> None:
        if not seen:
            try:
                holder[0].sync("Splash")
            except SyncUnitError as exc:
                seen.append(exc)

    device = make_client(on_progress=on_progress)
    holder.append(device)
    runner = threading.Thread(target=device.sync, args=("Login",), daemon=True)
    runner.start()
    runner.join(30)

    assert not runner.is_alive(), "sync() from a callback deadlocked the client"
    assert len(seen) == 1
    assert isinstance(seen[0], SyncError)
    assert "trigger()" in str(seen[0])
    assert device.store.last_sync_on("Login") is not None


@pytest.mark.parametrize("event", ["on_start", "on_complete", "on_error", "on_status"])
def test_sync_from_any_callback_of_the_worker_is_refused(make_client, event):
    """Not only from progress: a sync() in any event the worker runs would run a whole
    unit on the worker, inside another's events."""
    seen: list[BaseException | str] = []
    holder: list[SyncClient] = []
    done = threading.Event()

    def callback(*args: Any) -> None:
        if threading.current_thread().name != "syncunit-worker" or seen:
            return
        try:
            holder[0].sync("Splash")
            seen.append("ran")
        except SyncUnitError as exc:
            seen.append(exc)
        done.set()

    device = make_client(**{event: callback})
    holder.append(device)
    device.trigger("NoSuchUnit" if event == "on_error" else "Login")
    assert done.wait(30)

    [refused] = seen
    assert isinstance(refused, SyncError), refused
    assert "use trigger()" in str(refused)
    assert device.store.last_sync_on("Splash") is None


def test_close_waits_for_the_worker_then_cancels_it_cleanly(make_client, net):
    errors: list[Exception] = []
    device = make_client(transport=net, on_error=lambda unit, exc: errors.append(exc))
    device.catalog()
    net.hold()
    device.trigger("Login")
    assert net.wait_for_requests(1)
    worker = device.scheduler._thread
    assert worker is not None

    closer = threading.Thread(target=device.close, kwargs={"timeout": 0.5})
    closer.start()
    closer.join(30)

    assert not closer.is_alive()
    assert not worker.is_alive()  # the database was closed after the worker ended
    assert all(isinstance(e, SyncUnitError) for e in errors), errors
    with pytest.raises(sqlite3.ProgrammingError):
        device.store.conn.execute("SELECT 1")


def test_a_first_copy_removes_pushed_rows_that_left_the_scope_before_it(notes_app):
    """A device pushes before it ever pulled; the row moves to another owner; the
    first copy is the whole picture, so the row leaves the device."""
    app = notes_app()
    app.add("s0", title="theirs")
    device = app.client()
    device.catalog()
    device.insert("LocalNote", {"id": "mine", "owner": "u1", "title": "mine"})
    device.insert("LocalNote", {"id": "moved", "owner": "u1", "title": "moved"})
    assert device.sync("Push").applied == 2
    app.backoffice("UPDATE note SET owner = 'u2' WHERE id = 'moved'")
    device.insert("LocalNote", {"id": "pending", "owner": "u1", "title": "not pushed yet"})

    device.sync("Pull")

    keys = [r[0] for r in local_notes(device)]
    assert keys == ["mine", "pending", "s0"]  # "moved" is gone; the pending row stays
    device.sync("Sync")
    assert local_notes(device) == app.rows("u1")


def test_a_table_of_the_app_s_own_named_as_a_local_table_is_never_touched(live, tmp_path, store):
    """The guide's promise: the engine never touches a table it did not make. A catalog
    naming one is refused, saying so, and the app's table keeps its rows and columns."""
    path = tmp_path / "app.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE LocalAppointment (appt_no INTEGER PRIMARY KEY, memo TEXT)")
    conn.execute("INSERT INTO LocalAppointment VALUES (7, 'my own note')")
    conn.commit()
    conn.close()
    device = SyncClient(live.url, path, token="token-h1")
    try:
        with pytest.raises(LocalStoreError, match="'LocalAppointment' that syncunit did not"):
            device.sync("Login")
        assert device.store.catalog() is None
    finally:
        device.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT * FROM LocalAppointment").fetchall() == [(7, "my own note")]
    conn.close()


def test_a_stream_the_server_drops_then_brings_back_finds_its_table(
    make_server, serve, store, tmp_path
):
    """A deploy rolled back: the stream's local table was the engine's, though the
    catalog in between named it not (and nothing else names a pull-only table)."""
    from hospital import units as hu
    from hospital.generate import generate

    from syncunit.units import SyncSchema
    from tests.conftest import SIZE

    generate(store.engine, **SIZE)
    live = serve(make_server(hu.schema).app)
    path = tmp_path / "device.sqlite"
    device = SyncClient(live.url, path, token="token-h1")
    try:
        device.sync("Login")
        without_summary = SyncSchema([hu.login, hu.send_appointments, hu.patient_details])
        assert "LocalSummary" not in {s.local_table for s in without_summary.streams.values()}
        live.app = make_server(without_summary).app
        device.sync("Login")
        live.app = make_server(hu.schema).app  # rolled back
        device.sync("Login")
        device.sync("Splash")
        assert device.store.query("SELECT count(*) FROM LocalSummary")[0][0] > 0
    finally:
        device.close()
