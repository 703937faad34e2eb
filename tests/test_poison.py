"""A mutation that fails on the server never blocks the ones behind it.

DESIGN invariant 2 (no lost write) and the push's promise: a mutation that
fails for a non-transient reason (a business rule whose query hits a database
error) is rejected with its reason, and the rest of the push is applied; a
transient failure (a lock, a timeout, a full disk) is tried again a bounded
number of times, then fails the whole request with a 503 the device retries:
it never rejects the change.
"""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from syncunit.errors import NetworkError, ProblemError
from syncunit.policies import MutationContext
from syncunit.server import mutation
from tests.test_push_support import FaultTransport, local_notes


def _poison(ctx: MutationContext) -> str | None:
    if ctx.row.get("title") == "poison":
        ctx.conn.execute(sa.text("SELECT * FROM no_such_table"))
    return None


def test_a_poison_mutation_is_rejected_and_the_rest_of_the_push_applies(notes_app):
    app = notes_app(rules=[_poison])
    device = app.client()
    for key, title in [("a", "fine"), ("b", "poison"), ("c", "fine too")]:
        device.insert("LocalNote", {"id": key, "owner": "u1", "title": title})

    result = device.sync("Sync")

    assert result.applied == 2
    assert [(r["key"], r["code"]) for r in result.rejected] == [("b", "server-error")]
    assert "no_such_table" in result.rejected[0]["reason"]
    assert [r[0] for r in app.rows("u1")] == ["a", "c"]
    assert device.outbox.pending() == []
    [kept] = device.outbox.rejected()
    assert kept.attempted["title"] == "poison"  # kept for the app, not dropped
    # The device is not stuck: later changes go through.
    device.insert("LocalNote", {"id": "d", "owner": "u1", "title": "later"})
    assert device.sync("Sync").applied == 1
    assert local_notes(device) == app.rows("u1")


def _locked(times: list[int], fail_first: int):
    def rule(ctx: MutationContext) -> str | None:
        times.append(1)
        if ctx.row.get("title") == "busy" and len(times) <= fail_first:
            raise sa.exc.OperationalError(
                "UPDATE note", {}, sqlite3.OperationalError("database is locked")
            )
        return None

    return rule


def test_a_transient_failure_is_tried_again_and_applies(notes_app, monkeypatch):
    monkeypatch.setattr(mutation, "TRANSIENT_PAUSE", 0.0)
    calls: list[int] = []
    app = notes_app(rules=[_locked(calls, fail_first=2)])
    device = app.client()
    device.insert("LocalNote", {"id": "a", "owner": "u1", "title": "busy"})

    result = device.sync("Sync")

    assert result.applied == 1
    assert result.rejected == []
    assert len(calls) == 3  # two failures, then the write went through
    assert app.applications("a") == 1


def _unavailable(device: Any, unit: str = "Sync") -> None:
    """The next sync is answered 503 ``database-unavailable``: nothing of a push applied."""
    with pytest.raises(ProblemError) as failed:
        device.sync(unit)
    assert (failed.value.status, failed.value.code) == (503, "database-unavailable")


def test_a_transient_failure_past_its_retries_fails_the_request_and_loses_nothing(
    notes_app, monkeypatch
):
    """Not the change's fault: never a rejection (which would drop the user's write),
    but a 503 the device retries, the whole push kept; applied once when it passes."""
    monkeypatch.setattr(mutation, "TRANSIENT_PAUSE", 0.0)
    calls: list[int] = []
    app = notes_app(rules=[_locked(calls, fail_first=10**6)])
    device = app.client()
    device.insert("LocalNote", {"id": "b", "owner": "u1", "title": "free"})
    device.insert("LocalNote", {"id": "a", "owner": "u1", "title": "busy"})

    _unavailable(device)

    assert len(calls) == 1 + mutation.TRANSIENT_ATTEMPTS
    assert device.outbox.rejected() == []
    assert device.outbox.count() == 2
    assert app.rows("u1") == []  # b's write went with the request's transaction
    calls.clear()  # the lock clears
    calls.extend([0] * 10**6)
    assert device.sync("Sync").applied == 2
    assert (app.applications("a"), app.applications("b")) == (1, 1)
    assert local_notes(device) == app.rows("u1")


def _three_strikes(app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three failed requests, 100 s apart by the server's strike clock, reject a change."""
    monkeypatch.setattr(mutation, "TRANSIENT_PAUSE", 0.0)
    monkeypatch.setattr(mutation, "STRIKES", 3)
    monkeypatch.setattr(mutation, "PATIENCE", 150.0)
    app.server.pusher._strikes = mutation.Strikes(clock=itertools.count(0, 100).__next__)


def test_a_change_that_fails_so_request_after_request_is_surfaced_in_the_end(
    notes_app, monkeypatch
):
    """The failure may be the change's own (its rule's query past a statement timeout):
    after ``STRIKES`` failed requests over ``PATIENCE`` it is rejected ``unavailable``,
    its values kept, and the device's other changes go on."""
    calls: list[int] = []
    app = notes_app(rules=[_locked(calls, fail_first=10**6)])
    _three_strikes(app, monkeypatch)
    device = app.client()
    device.insert("LocalNote", {"id": "a", "owner": "u1", "title": "busy"})
    device.insert("LocalNote", {"id": "b", "owner": "u1", "title": "free"})
    _unavailable(device)
    _unavailable(device)

    result = device.sync("Sync")

    assert [(r["key"], r["code"]) for r in result.rejected] == [("a", "unavailable")]
    assert "in 3 requests" in result.rejected[0]["reason"]
    assert result.applied == 1
    assert app.row("b") is not None
    [kept] = device.outbox.rejected()
    assert kept.attempted["title"] == "busy"
    assert device.outbox.count() == 0


@contextlib.contextmanager
def _full(engine: Any) -> Iterator[None]:
    """SQLite's database full (its page limit a few pages past its size) inside the block."""
    with engine.connect() as conn:
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar_one()

    def cap(dbapi: Any, _: Any) -> None:
        dbapi.execute(f"PRAGMA max_page_count = {pages + 5}")

    sa.event.listen(engine, "connect", cap)
    engine.dispose()
    try:
        yield
    finally:
        sa.event.remove(engine, "connect", cap)
        engine.dispose()


@contextlib.contextmanager
def _held(app: Any, sql: str, params: Any = None) -> Iterator[None]:
    """With the server's lock timeout at 100 ms (PostgreSQL), another transaction that
    ran ``sql`` (taking its locks) holds them inside the block."""
    name = sa.engine.make_url(app.database).database
    app.backoffice(f'ALTER DATABASE "{name}" SET lock_timeout = 100')
    app.server.store.engine.dispose()  # its connections take the setting anew
    holder = sa.create_engine(app.database, poolclass=sa.pool.NullPool)
    try:
        with holder.connect() as held, held.begin():
            held.execute(sa.text(sql), params or {})
            yield
    finally:
        app.backoffice(f'ALTER DATABASE "{name}" RESET lock_timeout')
        app.server.store.engine.dispose()
        holder.dispose()


def test_a_lock_or_a_full_disk_on_the_server_keeps_the_change_for_a_retry(notes_app, backend):
    """Real failures: on PostgreSQL a row another transaction holds past the lock
    timeout, on SQLite a disk full (its page limit). A 503, the changes kept, and
    applied once the database can take them."""
    app = notes_app()
    app.add("s1", title="on the server")
    device = app.client()
    device.sync("Sync")
    device.update("LocalNote", "s1", {"title": "edited"})
    device.insert("LocalNote", {"id": "big", "owner": "u1", "body": "x" * 200_000})
    engine = app.server.store.engine
    if backend == "postgres":
        blocked = _held(app, "SELECT 1 FROM note WHERE id = 's1' FOR UPDATE")
    else:
        blocked = _full(engine)
    with blocked:
        _unavailable(device)
        assert device.outbox.rejected() == []
        assert device.outbox.count() == 2
        assert app.row("s1")["title"] == "on the server"

    assert device.sync("Sync").applied == 2
    assert app.row("s1")["title"] == "edited"
    assert (app.applications("s1"), app.applications("big")) == (1, 1)
    assert [seq for seq, _ in app.logged(device.client_id)] == [1, 2]


def test_an_update_behind_an_unanswered_insert_is_not_refused_for_its_nulls(notes_app):
    """The base of such an update holds NULL where the server filled a default."""
    app = notes_app()
    fault = FaultTransport()
    device = app.client(transport=fault)
    device.insert("LocalNote", {"id": "a", "owner": "u1", "title": "first"})  # body NULL
    fault.lose_next()
    with pytest.raises(NetworkError):
        device.sync("Sync")
    device.update("LocalNote", "a", {"title": "second"})

    result = device.sync("Sync")

    assert result.rejected == []
    assert result.applied == 2
    assert app.row("a")["title"] == "second"
    assert local_notes(device) == app.rows("u1")


def test_a_lock_timeout_outside_any_change_is_a_503_not_a_server_fault(notes_app, backend):
    """The device's own row in the server's client table, locked by another
    transaction past the lock timeout (PostgreSQL): a 503, not a 500."""
    if backend != "postgres":
        pytest.skip("a lock timeout is PostgreSQL's")
    app = notes_app()
    device = app.client()
    device.insert("LocalNote", {"id": "a", "owner": "u1"})
    device.sync("Sync")
    device.insert("LocalNote", {"id": "b", "owner": "u1"})
    with _held(
        app,
        "SELECT 1 FROM syncunit_clients WHERE client_id = :c FOR UPDATE",
        {"c": device.client_id},
    ):
        _unavailable(device)
    assert device.sync("Sync").applied == 1
    assert app.applications("b") == 1


def test_a_pull_that_meets_a_lock_timeout_is_told_to_retry(notes_app, backend):
    """A table locked by a migration past the lock timeout (PostgreSQL): the pull is
    a 503 (a ``Failure`` frame mid-stream), not a server fault; then it goes on."""
    if backend != "postgres":
        pytest.skip("a lock timeout is PostgreSQL's")
    app = notes_app()
    app.add("s1")
    device = app.client()
    with _held(app, "LOCK TABLE note IN ACCESS EXCLUSIVE MODE"):
        _unavailable(device, "Pull")
    device.sync("Pull")
    assert local_notes(device) == app.rows("u1")


def test_syncunit_s_tables_gone_mid_restore_are_a_503_not_a_server_fault(notes_app):
    """A restore under way (pg_restore into a new database, a copied file) leaves the
    database without syncunit's tables for a while: a sync then is told to retry, as
    for a database that cannot take it for now, and goes on once they are back."""
    app = notes_app()
    app.add("s1")
    device = app.client()
    device.insert("LocalNote", {"id": "a", "owner": "u1"})
    app.backoffice("ALTER TABLE syncunit_meta RENAME TO syncunit_meta_restoring")
    try:
        _unavailable(device)
        _unavailable(device, "Pull")
    finally:
        app.backoffice("ALTER TABLE syncunit_meta_restoring RENAME TO syncunit_meta")
    assert device.sync("Sync").applied == 1
    assert local_notes(device) == app.rows("u1")


def test_only_syncunit_s_own_tables_missing_are_taken_for_a_restore() -> None:
    """An app's table missing is a fault of the server's (500, logged), even when the
    failing SQL names a tracking column: only a missing syncunit table is a 503."""
    from syncunit.server.problems import database_busy

    class PgError(Exception):
        sqlstate = "42P01"

    def failed(orig: Exception) -> Exception:
        return sa.exc.ProgrammingError("SELECT ...", {}, orig)

    assert database_busy(failed(sqlite3.OperationalError("no such table: syncunit_meta")))
    assert database_busy(failed(PgError('relation "syncunit_meta" does not exist')))
    assert not database_busy(failed(sqlite3.OperationalError("no such table: note")))
    app_table = 'relation "note" does not exist\nLINE 2: SELECT n.syncunit_version FROM note n'
    assert not database_busy(failed(PgError(app_table)))


def test_a_value_its_column_cannot_hold_is_rejected_as_invalid_naming_the_column(
    notes_app, backend
):
    """An integer past a PostgreSQL ``integer`` column's 32 bits: the change is
    ``invalid-value`` naming the column (the database's message names none), the rest
    of the push applies. SQLite's integers hold 64 bits: it is applied there."""
    app = notes_app()
    device = app.client()
    device.insert("LocalNote", {"id": "big", "owner": "u1", "n": 2**40})
    device.insert("LocalNote", {"id": "fine", "owner": "u1", "n": 1})

    result = device.sync("Sync")

    if backend == "postgres":
        assert [(r["key"], r["code"]) for r in result.rejected] == [("big", "invalid-value")]
        assert result.rejected[0]["reason"].startswith("column 'n': ")
        assert result.applied == 1
    else:
        assert (result.applied, result.rejected) == (2, [])
    assert app.row("fine") is not None


def test_a_new_row_locked_by_another_transaction_is_surfaced_from_a_batch_too(
    notes_app, backend, monkeypatch
):
    """New rows go as a set-based batch; one of them waits on another transaction's
    uncommitted insert of its key past the lock timeout (PostgreSQL): the request is a
    503, then, request after request, that change alone is rejected."""
    if backend != "postgres":
        pytest.skip("a lock timeout is PostgreSQL's")
    app = notes_app(batches=True)
    _three_strikes(app, monkeypatch)
    device = app.client()
    for key in ("k1", "k2", "k3", "k4"):
        device.insert("LocalNote", {"id": key, "owner": "u1"})
    with _held(app, "INSERT INTO note (id, owner, title, body, n) VALUES ('k2', 'u9', '', '', 0)"):
        _unavailable(device)
        _unavailable(device)
        result = device.sync("Sync")
    assert [(r["key"], r["code"]) for r in result.rejected] == [("k2", "unavailable")]
    assert result.applied == 3
    assert device.outbox.count() == 0


def test_strikes_far_apart_start_again() -> None:
    """A change that last failed longer ago than ``PATIENCE`` counts from one again."""
    from syncunit.protocol import Mutation

    times = iter([0.0, 1000.0, 1100.0, 1200.0, 1300.0, 1400.0])
    strikes = mutation.Strikes(clock=lambda: next(times))
    m = Mutation(seq=1, id="m1", table="LocalNote", key="a", op="insert")
    got = [strikes.strike("c", m) for _ in range(6)]
    assert got == [None, None, None, None, None, (5, 400.0)]  # STRIKES 5, PATIENCE 300


def _divides_by_zero(ctx: MutationContext) -> str | None:
    if ctx.row.get("title") == "divide":
        ctx.conn.execute(sa.text("SELECT 100 / (n - n) FROM note WHERE id = :k"), {"k": ctx.key})
    return None


def test_a_rule_s_query_the_database_refuses_is_a_server_error_not_the_change_s_value(
    notes_app, backend, caplog
):
    """A data error (class 22) from a rule's own query (PostgreSQL: division by zero)
    is the rule's failure: ``server-error``, logged for the operator, not the device's
    ``invalid-value``."""
    if backend != "postgres":
        pytest.skip("SQLite divides by zero into NULL")
    app = notes_app(rules=[_divides_by_zero])
    device = app.client()
    device.insert("LocalNote", {"id": "a", "owner": "u1", "title": "divide"})
    result = device.sync("Sync")
    assert [(r["key"], r["code"]) for r in result.rejected] == [("a", "server-error")]
    assert any("division by zero" in r.getMessage() for r in caplog.records)


def test_tracking_never_installed_is_told_as_such_not_only_as_a_restore(
    make_server: Any, serve: Any, store: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A server started with ``install=False`` on a database whose migration was never
    run finds none of syncunit's tables, as during a restore: the device's 503 and the
    log line name both causes, so the operator knows to install."""
    import logging

    import httpx
    from hospital.generate import generate

    generate(store.engine, appointments=10, hospitals=1, doctors=2, patients=5)
    server = make_server(install=False)
    live = serve(server.app)
    caplog.set_level(logging.INFO, logger="syncunit")
    r = httpx.post(
        f"{live.url}/v1/rxdb/Login/doctors/pull",
        json={"checkpoint": None, "batchSize": 10},
        headers={"Authorization": "Bearer token-h1"},
        timeout=30,
    )
    assert r.status_code == 503, r.text
    assert r.json()["code"] == "database-unavailable"
    cause = "tracking is not installed (run the install or its migration)"
    assert cause in r.json()["detail"]
    assert "the database is being restored" in r.json()["detail"]
    logged = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert [line for line in logged if cause in line and "being restored" in line], logged
