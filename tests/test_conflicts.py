"""Conflict policies: what a pushed change does to a row that changed on the server.

DESIGN section 4 (push, conflict policies) and invariants 2 (no lost write: a
change is applied or surfaced) and 4 (no resurrection). Each test: a device
syncs a row, the server changes it with plain SQL (as a backoffice would), the
device changes it too and syncs.
"""

from __future__ import annotations

import enum
from typing import Any

import pytest

from syncunit.policies import Conflict, Detect, LastWriteWins, Reject, Resolve
from tests.support import appointments_of, doctors_of
from tests.test_push_support import local_note, local_notes


def _synced(notes_app: Any, policy: Any, **row: Any) -> tuple[Any, Any]:
    """A live notes server with row ``a`` (title t0, body b0), and a device that has it."""
    app = notes_app(policy=policy)
    app.add("a", title="t0", body="b0", **row)
    device = app.client()
    device.sync("Sync")
    assert local_note(device, "a") == app.row("a")
    return app, device


def _assert_settled(app: Any, device: Any) -> None:
    """The outbox is empty and the device holds exactly what the server holds."""
    assert device.outbox.pending() == []
    assert local_notes(device) == app.rows("u1")


# -- last write wins -------------------------------------------------------------------------------


def test_last_write_wins_overwrites_a_server_change(notes_app):
    app, device = _synced(notes_app, LastWriteWins())
    app.backoffice("UPDATE note SET title = 'server' WHERE id = 'a'")
    device.update("LocalNote", "a", {"title": "device"})

    result = device.sync("Sync")

    assert (result.applied, result.conflicts, result.rejected) == (1, [], [])
    assert app.row("a")["title"] == "device"
    assert device.outbox.rejected() == []
    _assert_settled(app, device)


def test_last_write_wins_delete_removes_a_row_changed_on_the_server(notes_app):
    app, device = _synced(notes_app, LastWriteWins())
    app.backoffice("UPDATE note SET title = 'server' WHERE id = 'a'")
    device.delete("LocalNote", "a")

    result = device.sync("Sync")

    assert result.applied == 1
    assert app.row("a") is None
    _assert_settled(app, device)


# -- detect ----------------------------------------------------------------------------------------


def test_detect_reports_a_conflict_with_the_server_row_when_the_same_column_changed(notes_app):
    app, device = _synced(notes_app, Detect())
    app.backoffice("UPDATE note SET title = 'server' WHERE id = 'a'")
    device.update("LocalNote", "a", {"title": "device"})

    result = device.sync("Sync")

    assert result.applied == 0
    assert [c["status"] for c in result.conflicts] == ["conflict"]
    [kept] = device.outbox.rejected()
    assert (kept.table, kept.key, kept.op, kept.status) == ("LocalNote", "a", "update", "conflict")
    assert "title" in kept.reason
    assert kept.attempted == {"title": "device"}
    assert kept.server_row == app.row("a")
    assert kept.server_row["title"] == "server"
    # The server's row stands; the device shows it, and the change waits for a decision.
    assert app.row("a")["title"] == "server"
    assert local_note(device, "a")["title"] == "server"
    _assert_settled(app, device)


def test_detect_merges_column_by_column_when_the_changes_do_not_overlap(notes_app):
    app, device = _synced(notes_app, Detect(merge=True))
    app.backoffice("UPDATE note SET title = 'server' WHERE id = 'a'")
    device.update("LocalNote", "a", {"body": "device"})

    result = device.sync("Sync")

    assert (result.applied, result.conflicts, result.rejected) == (1, [], [])
    row = app.row("a")
    assert (row["title"], row["body"]) == ("server", "device")
    _assert_settled(app, device)


def test_a_merge_in_a_later_batch_of_the_run_comes_back_in_that_run(notes_app):
    """One change a request: the first response brings the stream to its end, and the
    next request pushes a change the server merges with its own; the pull after that
    push reads the stream again (not skipped as already brought up to date in the run)."""
    app = notes_app(policy=Detect(merge=True))
    app.add("a", title="t0", body="b0")
    app.add("b", title="t0", body="b0")
    device = app.client(push_batch=1)
    device.sync("Sync")
    app.backoffice("UPDATE note SET title = 'server' WHERE id = 'b'")
    device.update("LocalNote", "a", {"body": "device"})
    device.update("LocalNote", "b", {"body": "device"})

    result = device.sync("Sync")

    assert (result.applied, result.requests) == (2, 2)
    assert (local_note(device, "b")["title"], local_note(device, "b")["body"]) == (
        "server",
        "device",
    )
    _assert_settled(app, device)


def test_detect_merge_still_conflicts_on_the_overlapping_column_only(notes_app):
    app, device = _synced(notes_app, Detect(merge=True))
    app.backoffice("UPDATE note SET title = 'server' WHERE id = 'a'")
    device.update("LocalNote", "a", {"title": "device", "body": "device"})

    result = device.sync("Sync")

    assert len(result.conflicts) == 1
    [kept] = device.outbox.rejected()
    assert "title" in kept.reason
    assert "body" not in kept.reason
    # A conflicting mutation is not half-applied.
    assert (app.row("a")["title"], app.row("a")["body"]) == ("server", "b0")
    _assert_settled(app, device)


def test_detect_without_merge_conflicts_on_any_server_change(notes_app):
    app, device = _synced(notes_app, Detect(merge=False))
    app.backoffice("UPDATE note SET title = 'server' WHERE id = 'a'")
    device.update("LocalNote", "a", {"body": "device"})

    result = device.sync("Sync")

    assert result.applied == 0
    assert len(result.conflicts) == 1
    assert app.row("a")["body"] == "b0"
    assert device.outbox.rejected()[0].server_row["title"] == "server"
    _assert_settled(app, device)


def test_detect_applies_when_the_server_did_not_change_the_row(notes_app):
    app, device = _synced(notes_app, Detect(merge=False))
    device.update("LocalNote", "a", {"body": "device"})

    result = device.sync("Sync")

    assert (result.applied, result.conflicts) == (1, [])
    assert app.row("a")["body"] == "device"


def test_detect_delete_of_a_row_changed_on_the_server_is_a_conflict(notes_app):
    app, device = _synced(notes_app, Detect())
    app.backoffice("UPDATE note SET title = 'server' WHERE id = 'a'")
    device.delete("LocalNote", "a")

    result = device.sync("Sync")

    assert result.applied == 0
    [kept] = device.outbox.rejected()
    assert (kept.op, kept.status) == ("delete", "conflict")
    assert kept.server_row["title"] == "server"
    assert app.row("a")["title"] == "server"  # not deleted
    assert local_note(device, "a")["title"] == "server"  # back on the device, as the server has it
    _assert_settled(app, device)


@pytest.mark.parametrize("policy", [LastWriteWins(), Detect()], ids=["lww", "detect"])
def test_update_of_a_row_deleted_on_the_server_conflicts_and_does_not_resurrect(notes_app, policy):
    app, device = _synced(notes_app, policy)
    app.backoffice("DELETE FROM note WHERE id = 'a'")
    device.update("LocalNote", "a", {"title": "device"})

    result = device.sync("Sync")

    assert result.applied == 0
    [kept] = device.outbox.rejected()
    assert (kept.key, kept.status, kept.server_row) == ("a", "conflict", None)
    assert "deleted" in kept.reason
    assert app.row("a") is None
    assert local_note(device, "a") is None
    device.sync("Sync")
    assert app.row("a") is None
    assert local_note(device, "a") is None
    _assert_settled(app, device)


# -- custom resolvers ------------------------------------------------------------------------------


def test_resolver_result_is_applied_and_sees_the_conflict(notes_app):
    seen: list[Conflict] = []

    def concat_bodies(c: Conflict) -> dict[str, Any]:
        seen.append(c)
        return {"body": f"{c.server['body']} + {c.client['body']}"}

    app, device = _synced(notes_app, Resolve(concat_bodies))
    app.backoffice("UPDATE note SET body = 'server' WHERE id = 'a'")
    device.update("LocalNote", "a", {"body": "device"})

    result = device.sync("Sync")

    assert (result.applied, result.conflicts, result.rejected) == (1, [], [])
    assert app.row("a")["body"] == "server + device"
    [c] = seen
    assert (c.table, c.key, c.op, c.columns) == ("LocalNote", "a", "update", ("body",))
    assert (c.base["body"], c.server["body"], c.client) == ("b0", "server", {"body": "device"})
    _assert_settled(app, device)
    assert local_note(device, "a")["body"] == "server + device"


def test_resolver_keeps_the_clients_other_changes(notes_app):
    """A resolver answers for the conflicting columns; the mutation's other columns still land."""
    app, device = _synced(
        notes_app, Resolve(lambda c: {"body": f"{c.server['body']} + {c.client['body']}"})
    )
    app.backoffice("UPDATE note SET body = 'server' WHERE id = 'a'")
    device.update("LocalNote", "a", {"body": "device", "tag": "urgent"})

    result = device.sync("Sync")

    assert result.applied == 1
    row = app.row("a")
    assert (row["body"], row["tag"]) == ("server + device", "urgent")
    _assert_settled(app, device)


def test_resolver_returning_reject_rejects_with_its_reason(notes_app):
    app, device = _synced(notes_app, Resolve(lambda c: Reject("this note is frozen")))
    app.backoffice("UPDATE note SET body = 'server' WHERE id = 'a'")
    device.update("LocalNote", "a", {"body": "device"})

    result = device.sync("Sync")

    assert result.applied == 0
    assert [r["reason"] for r in result.rejected] == ["this note is frozen"]
    [kept] = device.outbox.rejected()
    assert (kept.status, kept.code, kept.reason) == ("rejected", "resolver", "this note is frozen")
    assert app.row("a")["body"] == "server"
    _assert_settled(app, device)


def test_resolver_returning_none_reports_a_conflict(notes_app):
    app, device = _synced(notes_app, Resolve(lambda c: None))
    app.backoffice("UPDATE note SET body = 'server' WHERE id = 'a'")
    device.update("LocalNote", "a", {"body": "device"})

    result = device.sync("Sync")

    assert result.applied == 0
    [kept] = device.outbox.rejected()
    assert (kept.status, kept.server_row["body"]) == ("conflict", "server")
    assert app.row("a")["body"] == "server"
    _assert_settled(app, device)


def test_resolver_is_not_called_without_a_conflict(notes_app):
    calls: list[Conflict] = []
    app, device = _synced(notes_app, Resolve(lambda c: calls.append(c)))
    app.backoffice("UPDATE note SET title = 'server' WHERE id = 'a'")  # another column
    device.update("LocalNote", "a", {"body": "device"})

    result = device.sync("Sync")

    assert (result.applied, calls) == (1, [])
    assert (app.row("a")["title"], app.row("a")["body"]) == ("server", "device")


def test_a_resolver_that_fails_rejects_the_mutation_and_blocks_nothing(notes_app):
    def broken(c: Conflict) -> dict[str, Any]:
        raise ValueError("a bug in the app's resolver")

    app, device = _synced(notes_app, Resolve(broken))
    app.add("b", title="tb")
    app.backoffice("UPDATE note SET body = 'server' WHERE id = 'a'")
    device.update("LocalNote", "a", {"body": "device"})
    device.insert("LocalNote", {"id": "c", "owner": "u1", "title": "new"})

    result = device.sync("Sync")

    assert result.applied == 1
    [kept] = device.outbox.rejected()
    assert (kept.key, kept.status, kept.code) == ("a", "rejected", "resolver")
    assert app.row("a")["body"] == "server"
    assert app.row("c") is not None
    _assert_settled(app, device)


# -- the example: appointments use Detect(merge=True) ------------------------------------------


def _local_appointment(client: Any, key: str) -> dict[str, Any]:
    cur = client.store.conn.execute('SELECT * FROM "LocalAppointment" WHERE id = ?', (key,))
    names = [d[0] for d in cur.description]
    return dict(zip(names, cur.fetchone(), strict=True))


def test_rescheduling_an_untouched_appointment_is_not_a_conflict(client, store, in_sync):
    """Date-time base values (text on the device) compare equal to the server's values."""
    client.sync("Online")
    key = appointments_of(store, 1)[0]
    client.update(
        "LocalAppointment",
        key,
        {"starts_at": "2031-07-01T08:00:00", "ends_at": "2031-07-01T08:30:00", "room": "R7"},
    )

    result = client.sync("Online")

    assert (result.applied, result.conflicts, result.rejected) == (1, [], [])
    assert _local_appointment(client, key)["starts_at"] == "2031-07-01T08:00:00"
    in_sync(client, "Online")


def test_backoffice_reschedule_and_device_note_merge(client, store, plain_sql, in_sync):
    client.sync("Online")
    key = appointments_of(store, 1)[0]
    plain_sql(
        "UPDATE appointment SET starts_at = '2031-07-01 08:00:00.000000',"
        " ends_at = '2031-07-01 08:15:00.000000' WHERE id = ?",
        (key,),
    )
    client.update("LocalAppointment", key, {"notes": "patient called"})

    assert client.sync("Online").applied == 1

    row = _local_appointment(client, key)
    assert (row["starts_at"], row["notes"]) == ("2031-07-01T08:00:00", "patient called")
    in_sync(client, "Online")


def test_backoffice_and_device_reschedule_the_same_appointment_conflict(
    client, store, plain_sql, in_sync
):
    client.sync("Online")
    key = appointments_of(store, 1)[0]
    plain_sql(
        "UPDATE appointment SET starts_at = '2031-07-01 08:00:00.000000',"
        " ends_at = '2031-07-01 08:15:00.000000' WHERE id = ?",
        (key,),
    )
    client.update(
        "LocalAppointment",
        key,
        {"starts_at": "2031-08-01T08:00:00", "ends_at": "2031-08-01T08:15:00"},
    )

    result = client.sync("Online")

    assert [c["key"] for c in result.conflicts] == [key]
    [kept] = client.outbox.rejected()
    assert "starts_at" in kept.reason
    assert kept.server_row["starts_at"] == "2031-07-01T08:00:00"
    assert kept.server_row["doctor_name"]  # the row as the device shows it, joined columns too
    in_sync(client, "Online")


def test_a_renamed_doctor_is_not_a_conflict_for_an_edited_appointment(
    client, store, plain_sql, in_sync
):
    client.sync("Online")
    key = appointments_of(store, 1)[0]
    doctor_id = _local_appointment(client, key)["doctor_id"]
    assert doctor_id in doctors_of(store, 1)
    plain_sql("UPDATE doctor SET name = 'Dr. Renamed' WHERE id = ?", (doctor_id,))
    client.update("LocalAppointment", key, {"notes": "edited"})

    assert client.sync("Online").applied == 1

    row = _local_appointment(client, key)
    assert (row["doctor_name"], row["notes"]) == ("Dr. Renamed", "edited")
    in_sync(client, "Online")


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_a_conflict_on_a_row_with_json_values_is_surfaced_with_the_row_as_pulled(
    serve: Any, new_database: Any, tmp_path: Any, encoding: str
) -> None:
    """The server's row sent back with a conflict carries JSON columns as text, as
    pulls do: the device stores it, surfaces the conflict and syncs on."""
    import json

    import sqlalchemy as sa

    from syncunit import SyncClient
    from tests.test_hostile import _documents_server

    server, doc = _documents_server(new_database("docs"), policy=Detect())
    live = serve(server.app)
    device = SyncClient(live.url, tmp_path / "doc.sqlite", token="t-ana", encoding=encoding)
    try:
        device.insert("LocalDoc", {"id": "r1", "owner": "ana", "j": '{"k": 1}', "jb": "[1, 2]"})
        assert device.sync("Docs").applied == 1
        with server.store.engine.begin() as conn:
            conn.execute(doc.update().where(doc.c.id == "r1").values(j={"k": 2, "by": "server"}))
        device.update("LocalDoc", "r1", {"j": '{"k": 3}'})
        device.insert("LocalDoc", {"id": "r2", "owner": "ana"})

        result = device.sync("Docs")

        assert [(c["key"], c["status"]) for c in result.conflicts] == [("r1", "conflict")]
        assert result.applied == 1
        [kept] = device.outbox.rejected()
        assert json.loads(kept.server_row["j"]) == {"k": 2, "by": "server"}
        [(j, jb)] = device.store.query("SELECT j, jb FROM LocalDoc WHERE id = 'r1'")
        assert (json.loads(j), json.loads(jb)) == ({"k": 2, "by": "server"}, [1, 2])
        assert device.outbox.count() == 0
        with server.store.engine.connect() as conn:
            assert conn.execute(sa.select(doc.c.id).where(doc.c.id == "r2")).first() is not None
    finally:
        device.close()
        server.store.engine.dispose()


def _measures_server(database: str) -> tuple[Any, Any]:
    """A server of one ``measure`` table with a float column, conflicts detected."""
    import sqlalchemy as sa

    from syncunit.server import Principal
    from tests.support import owned_table_server

    measure = sa.Table(
        "measure", sa.MetaData(),
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("owner", sa.String(20), nullable=False),
        sa.Column("x", sa.Float, nullable=True),
        sa.Column("note", sa.String(50), nullable=True),
    )  # fmt: skip
    tokens = {"t-ana": Principal("ana", {"owner": "ana"})}
    server = owned_table_server(
        database, measure, "LocalMeasure", "Measures", policy=Detect(), tokens=tokens
    )
    return server, measure


def test_a_float_s_base_is_exact_so_an_edit_over_it_never_conflicts(
    serve: Any, new_database: Any, tmp_path: Any
) -> None:
    """Floats a short form would change (0.1 + 0.2, 1e308's neighbours) and infinities
    (which SQLite's JSON writes as ``Inf``, not JSON) in the base of an edit of another
    column: applied, no conflict, nothing stuck; a real concurrent change conflicts."""
    import sqlalchemy as sa

    from syncunit import SyncClient

    server, measure = _measures_server(new_database("measures"))
    values = {"a": 0.1 + 0.2, "b": 1 / 3, "c": float("inf"), "d": float("-inf"), "e": 5e-324}
    with server.store.engine.begin() as conn:
        conn.execute(
            measure.insert(), [{"id": k, "owner": "ana", "x": v} for k, v in values.items()]
        )
    live = serve(server.app)
    device = SyncClient(live.url, tmp_path / "m.sqlite", token="t-ana")
    try:
        device.sync("Measures")
        for key in values:
            device.update("LocalMeasure", key, {"note": "edited"})
        device.update("LocalMeasure", "a", {"x": 2.5})

        result = device.sync("Measures")

        assert (result.applied, result.conflicts, result.rejected) == (5, [], [])
        with server.store.engine.connect() as conn:
            rows = dict(conn.execute(sa.select(measure.c.id, measure.c.x)).all())
        assert rows == {**values, "a": 2.5}
        # A change on the server in between is still a conflict.
        with server.store.engine.begin() as conn:
            conn.execute(measure.update().where(measure.c.id == "b").values(x=1 / 3 + 1e-15))
        device.update("LocalMeasure", "b", {"x": 7.0})
        result = device.sync("Measures")
        assert [c["key"] for c in result.conflicts] == ["b"]
    finally:
        device.close()
        server.store.engine.dispose()


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_an_interval_travels_as_an_iso_duration_so_an_edit_over_it_never_conflicts(
    serve: Any, new_database: Any, tmp_path: Any, backend: str, encoding: str
) -> None:
    """An ``Interval`` is an ISO 8601 duration on the wire, read back as one: an edit of
    another column or a delete over a duration the device pulled is no conflict, a
    pushed one is stored as the duration (in any ISO form) and comes back in the
    server's, one the database cannot hold is rejected naming its column, and a change
    on the server in between still conflicts."""
    import datetime as dt

    import httpx
    import sqlalchemy as sa

    from syncunit import SyncClient
    from syncunit.server.rxdb import CLIENT_HEADER
    from tests.support import owned_table_server

    task = sa.Table(
        "task", sa.MetaData(),
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("owner", sa.String(20), nullable=False),
        sa.Column("dur", sa.Interval(), nullable=True),
        sa.Column("note", sa.String(50), nullable=True),
    )  # fmt: skip
    server = owned_table_server(
        new_database("tasks"), task, "LocalTask", "Tasks", policy=Detect(merge=False)
    )
    two_hours, a_day = dt.timedelta(hours=2), dt.timedelta(days=1, hours=2, microseconds=5)
    with server.store.engine.begin() as conn:
        conn.execute(
            task.insert(),
            [
                {"id": "a", "owner": "ana", "dur": two_hours},
                {"id": "b", "owner": "ana", "dur": a_day},
                {"id": "c", "owner": "ana", "dur": -two_hours},
            ],
        )
    live = serve(server.app)
    device = SyncClient(live.url, tmp_path / "tasks.sqlite", token="t", encoding=encoding)
    try:
        device.sync("Tasks")
        assert device.store.query("SELECT id, dur FROM LocalTask ORDER BY id") == [
            ("a", "PT7200S"), ("b", "P1DT7200.000005S"), ("c", "-PT7200S"),
        ]  # fmt: skip
        device.update("LocalTask", "a", {"note": "edited"})
        device.update("LocalTask", "c", {"dur": "PT2H30M"})
        device.delete("LocalTask", "b")
        device.insert("LocalTask", {"id": "d", "owner": "ana", "dur": "P1DT1.5S"})
        device.insert("LocalTask", {"id": "e", "owner": "ana", "dur": "P1M"})
        device.insert("LocalTask", {"id": "f", "owner": "ana", "dur": "P999999999D"})

        result = device.sync("Tasks")

        assert result.conflicts == []
        rejected = {r["key"]: (r["code"], r["reason"]) for r in result.rejected}
        assert sorted(rejected) == (["e", "f"] if backend == "sqlite" else ["e"])
        assert all(code == "invalid-value" for code, _ in rejected.values())
        assert all("column 'dur'" in reason for _, reason in rejected.values())
        with server.store.engine.connect() as conn:
            stored = dict(conn.execute(sa.select(task.c.id, task.c.dur)).all())
        assert stored == {
            "a": two_hours,
            "c": dt.timedelta(hours=2, minutes=30),
            "d": dt.timedelta(days=1, seconds=1.5),
            **({} if backend == "sqlite" else {"f": dt.timedelta(days=999999999)}),
        }
        device.sync("Tasks")
        assert device.store.query("SELECT id, dur FROM LocalTask ORDER BY id") == [
            ("a", "PT7200S"), ("c", "PT9000S"), ("d", "P1DT1.5S"),
            *([] if backend == "sqlite" else [("f", "P999999999D")]),
        ]  # fmt: skip
        # RxDB documents carry the same text.
        rxdb = httpx.post(
            f"{live.url}/v1/rxdb/Tasks/tasks/push",
            json=[{"newDocumentState": {"id": "g", "owner": "ana", "dur": "PT5S"}}],
            headers={"Authorization": "Bearer t", CLIENT_HEADER: "js-1"},
        )
        assert [r["status"] for r in rxdb.json()["results"]] == ["applied"]
        # A change on the server in between is still a conflict.
        with server.store.engine.begin() as conn:
            conn.execute(task.update().where(task.c.id == "a").values(dur=two_hours * 2))
        device.update("LocalTask", "a", {"note": "again"})
        assert [c["key"] for c in device.sync("Tasks").conflicts] == ["a"]
    finally:
        device.close()
        server.store.engine.dispose()


def test_a_date_time_s_base_is_compared_by_its_instant() -> None:
    """A stored date-time in a zone, in the hour its clocks go back (``fold=1``), is
    the same as the base naming its instant in UTC: ``==`` between zones never holds
    there (PEP 495), which made an edit over it conflict with itself."""
    import datetime as dt
    from zoneinfo import ZoneInfo

    from syncunit.server.mutation import _differs

    instant = dt.datetime(2027, 11, 7, 6, 30, tzinfo=dt.UTC)  # 01:30 in New York, again
    stored = instant.astimezone(ZoneInfo("America/New_York"))
    assert stored.fold == 1
    assert not _differs(stored, instant)
    assert not _differs(stored, instant.replace(tzinfo=None))  # SQLite's, without its zone
    assert _differs(stored, instant - dt.timedelta(hours=1))  # the first 01:30


def _as_an_earlier_engine(device: Any) -> str:
    """Make the update trigger of ``LocalMeasure`` as an earlier engine made it (the
    REAL in its row image as ``json_object()`` writes it); return this engine's."""
    [(now,)] = device.store.query(
        "SELECT sql FROM sqlite_master WHERE name = 'syncunit_LocalMeasure_au'"
    )
    before = now.replace("json_object('$real', printf('%!.17g', OLD.\"x\"))", 'OLD."x"')
    assert before != now
    with device.store.atomic() as conn:
        conn.execute("DROP TRIGGER syncunit_LocalMeasure_au")
        conn.execute(before)
    return str(now)


def test_outbox_triggers_an_earlier_engine_made_are_made_again_at_open(
    serve: Any, new_database: Any, tmp_path: Any
) -> None:
    from syncunit import SyncClient

    server, _ = _measures_server(new_database("measures"))
    live = serve(server.app)
    device = SyncClient(live.url, tmp_path / "m.sqlite", token="t-ana")
    device.sync("Measures")
    now = _as_an_earlier_engine(device)
    device.close()

    device = SyncClient(live.url, tmp_path / "m.sqlite", token="t-ana")
    try:
        assert device.store.query(
            "SELECT sql FROM sqlite_master WHERE name = 'syncunit_LocalMeasure_au'"
        ) == [(now,)]
    finally:
        device.close()
        server.store.engine.dispose()


def test_an_infinity_an_earlier_engine_wrote_in_the_outbox_is_read(
    serve: Any, new_database: Any, tmp_path: Any
) -> None:
    """Triggers of earlier versions wrote an infinite REAL as ``Inf`` (not JSON): such an
    outbox entry still goes out, and the changes after it too."""
    import sqlalchemy as sa

    from syncunit import SyncClient

    server, measure = _measures_server(new_database("measures"))
    with server.store.engine.begin() as conn:
        conn.execute(measure.insert().values(id="c", owner="ana", x=float("inf")))
    live = serve(server.app)
    device = SyncClient(live.url, tmp_path / "m.sqlite", token="t-ana")
    device.sync("Measures")
    _as_an_earlier_engine(device)
    device.update("LocalMeasure", "c", {"note": "edited"})
    assert ":Inf," in device.store.query("SELECT base FROM syncunit_outbox")[0][0]
    device.close()
    device = SyncClient(live.url, tmp_path / "m.sqlite", token="t-ana")
    try:
        device.insert("LocalMeasure", {"id": "d", "owner": "ana", "x": 1.0})

        result = device.sync("Measures")

        assert (result.applied, result.conflicts, result.rejected) == (2, [], [])
        with server.store.engine.connect() as conn:
            rows = dict(conn.execute(sa.select(measure.c.id, measure.c.note)).all())
        assert rows == {"c": "edited", "d": None}
    finally:
        device.close()
        server.store.engine.dispose()


class _Color(enum.Enum):
    RED = "r"
    GREEN = "g"


def _kinds_server(database: str) -> tuple[Any, Any]:
    """A server of one ``kind`` table whose columns read back in another Python type
    than the one the wire's value is coerced to, conflicts detected on every column."""
    import sqlalchemy as sa

    from syncunit.server import Principal
    from tests.support import owned_table_server

    kind = sa.Table(
        "kind", sa.MetaData(),
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("owner", sa.String(20), nullable=False),
        sa.Column("note", sa.String(50), nullable=True),
        sa.Column("num", sa.Numeric(10, 2, asdecimal=False), nullable=True),
        sa.Column("real", sa.Float(asdecimal=True), nullable=True),
        sa.Column("uid", sa.Uuid(as_uuid=False), nullable=True),
        sa.Column("color", sa.Enum(_Color, name="color"), nullable=True),
        sa.Column("doc", sa.JSON, nullable=True),
    )  # fmt: skip
    tokens = {"t-ana": Principal("ana", {"owner": "ana"})}
    server = owned_table_server(
        database, kind, "LocalKind", "Kinds", policy=Detect(merge=False), tokens=tokens
    )
    return server, kind


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_values_read_back_in_another_python_type_are_the_servers_so_never_conflict(
    serve: Any, new_database: Any, tmp_path: Any, encoding: str
) -> None:
    """A float from a decimal column, a decimal from a float one, a UUID as text, a
    Python enum's member and a NULL JSON value, sent back unchanged as the base of an
    edit of another column or of a delete: applied, no conflict. The enum travels as
    the label the database stores, which a new row may hold; a real change on the
    server still conflicts."""
    import decimal
    import uuid

    import sqlalchemy as sa

    from syncunit import SyncClient

    server, kind = _kinds_server(new_database("kinds"))
    uid = str(uuid.uuid4())
    # doc: None is the JSON value null here (SQLAlchemy's default), which reads as NULL.
    same = {"owner": "ana", "num": 0.1, "real": decimal.Decimal("0.1"), "uid": uid,
            "color": _Color.RED, "doc": None}  # fmt: skip
    with server.store.engine.begin() as conn:
        conn.execute(kind.insert(), [{"id": "e", **same}, {"id": "d", **same}])
    live = serve(server.app)
    device = SyncClient(live.url, tmp_path / "k.sqlite", token="t-ana", encoding=encoding)
    try:
        device.sync("Kinds")
        columns = ["owner", "num", "real", "uid", "color", "doc"]
        [pulled] = device.store.query(f"SELECT {', '.join(columns)} FROM LocalKind WHERE id = 'e'")
        assert pulled == ("ana", "0.1", 0.1, uid, "RED", None)
        device.update("LocalKind", "e", {"note": "edited"})
        device.delete("LocalKind", "d")
        device.insert("LocalKind", {"id": "n", **dict(zip(columns, pulled, strict=True))})

        result = device.sync("Kinds")

        assert (result.applied, result.conflicts, result.rejected) == (3, [], [])
        with server.store.engine.connect() as conn:
            rows = {r.id: r for r in conn.execute(sa.select(kind))}
            sql_null = conn.execute(sa.select(kind.c.id).where(kind.c.doc.is_(sa.null())))
            assert sql_null.scalars().all() == ["n"]  # the device's NULL: SQL NULL
        assert sorted(rows) == ["e", "n"]
        assert rows["e"].note == "edited"
        assert (rows["n"].num, rows["n"].uid, rows["n"].color) == (0.1, uid, _Color.RED)
        # A change on the server in between is still a conflict.
        with server.store.engine.begin() as conn:
            conn.execute(kind.update().where(kind.c.id == "e").values(color=_Color.GREEN))
        device.update("LocalKind", "e", {"note": "again"})
        result = device.sync("Kinds")
        assert [c["key"] for c in result.conflicts] == ["e"]
        assert "color" in result.conflicts[0]["reason"]
        assert device.store.query("SELECT color FROM LocalKind WHERE id = 'e'") == [("GREEN",)]
    finally:
        device.close()
        server.store.engine.dispose()
