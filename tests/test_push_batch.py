"""Pushed inserts written as a batch give the results of the one-by-one path.

A run of inserts of new rows is written with one statement and checked set by
set (scope, the rules' set-based forms); any failure sends the whole run down
the one-by-one path. These tests push the same mutations through both paths
and compare every result and the server's rows, and check that the batch was
really taken.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

import syncunit.server.push as push_module
from syncunit.policies import BatchContext, MutationContext, set_check
from syncunit.protocol import Mutation, MutationResult, SyncRequest
from syncunit.server import Principal, SyncServer, TokenAuth
from tests.support import owner_push_server

U1 = Principal("user-1", {"owner": "u1"})
meta = sa.MetaData()
note = sa.Table(
    "note",
    meta,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("owner", sa.String(20), nullable=False),
    sa.Column("title", sa.String(80), nullable=False),
    sa.Column("n", sa.Integer, nullable=False, default=0),
)
_other = note.alias("other")
_taken = (
    sa.select(sa.literal(1))
    .select_from(
        note.join(_other, sa.and_(_other.c.title == note.c.title, _other.c.id != note.c.id))
    )
    .where(note.c.id.in_(sa.bindparam("keys", expanding=True)))
    .limit(1)
)
set_checks: list[int] = []  # how often the set-based form ran


def _titles_free(batch: BatchContext) -> bool:
    set_checks.append(len(batch.keys))
    if any(r["title"] == "explode" for r in batch.rows):
        raise RuntimeError("a bug in the set-based form")
    return batch.conn.execute(_taken, {"keys": list(batch.keys)}).first() is None


@set_check(_titles_free)
def unique_title(ctx: MutationContext) -> str | None:
    """No two notes share a title."""
    clash = ctx.conn.execute(
        sa.select(note.c.id).where(note.c.title == ctx.row["title"], note.c.id != ctx.key)
    ).first()
    return None if clash is None else f"title {ctx.row['title']!r} is taken"


def _server(database: str, rules: list[Any]) -> SyncServer:
    return owner_push_server(database, note, "LocalNote", U1, rules)


@pytest.fixture
def servers(new_database: Callable[[str], str]) -> Iterator[tuple[SyncServer, SyncServer]]:
    """The same schema twice: ``batched`` and ``single`` (batches switched off)."""
    batched = _server(new_database("batched"), [unique_title])
    single = _server(new_database("single"), [unique_title])
    yield batched, single
    batched.store.engine.dispose()
    single.store.engine.dispose()


def _ins(seq: int, key: str, title: str | None = None, **values: Any) -> Mutation:
    row = {"id": key, "owner": "u1", "title": title or f"t-{key}", "n": seq, **values}
    return Mutation(seq=seq, id=f"m{seq}", table="LocalNote", key=key, op="insert", values=row)


def _push(
    server: SyncServer, mutations: list[Mutation], monkeypatch: pytest.MonkeyPatch, batch: bool
) -> list[MutationResult]:
    with monkeypatch.context() as m:
        if not batch:
            m.setattr(push_module, "BATCH_MIN", 10**9)
        req = SyncRequest(protocol=1, client_id="device", mutations=mutations)
        return server.pusher.apply(U1, req, server.schema.units["Push"]).results


def _rows(server: SyncServer) -> list[tuple[Any, ...]]:
    with server.store.engine.connect() as conn:
        cols = [note.c.id, note.c.owner, note.c.title, note.c.n]
        return [tuple(r) for r in conn.execute(sa.select(*cols).order_by(note.c.id))]


def _versions(server: SyncServer) -> int:
    with server.store.engine.connect() as conn:
        q = sa.select(sa.func.count(sa.distinct(note.c.syncunit_version)))
        return int(conn.execute(q).scalar_one())


def _cut_off(
    server: SyncServer, mutations: list[Mutation], monkeypatch: pytest.MonkeyPatch, at: int
) -> None:
    """Push ``mutations`` (batches on) as a server process that ends at the ``at``-th
    mutation applied one by one."""
    real = server.pusher._apply_one
    calls: list[int] = []

    def cut_off(*args: Any, **kwargs: Any) -> MutationResult:
        calls.append(1)
        if len(calls) == at:
            raise RuntimeError("the server process ends here")
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(server.pusher, "_apply_one", cut_off)
        with pytest.raises(RuntimeError):
            _push(server, mutations, monkeypatch, batch=True)


def _log_of(server: SyncServer) -> tuple[int, list[int]]:
    """The device's last applied seq (0: none yet), and the seqs its log holds."""
    with server.store.engine.connect() as conn:
        last = conn.execute(sa.text("SELECT last_seq FROM syncunit_clients")).scalar()
        logged = conn.execute(sa.text("SELECT seq FROM syncunit_mutations ORDER BY seq")).all()
    return int(last or 0), [r.seq for r in logged]


def _same_both_ways(servers, monkeypatch, mutations) -> list[MutationResult]:
    batched, single = servers
    got = _push(batched, mutations, monkeypatch, batch=True)
    want = _push(single, mutations, monkeypatch, batch=False)
    assert got == want
    assert _rows(batched) == _rows(single)
    return got


def test_new_rows_are_written_as_one_batch_with_per_mutation_results(
    servers, backend, monkeypatch, batches
):
    mutations = [_ins(i, f"k{i:03}") for i in range(1, 51)]

    results = _same_both_ways(servers, monkeypatch, mutations)

    assert [r.status for r in results] == ["applied"] * 50
    assert [(r.seq, r.id) for r in results] == [(m.seq, m.id) for m in mutations]
    assert batches == [True]  # the batched server took the batch (the other never tried)
    assert set_checks[-1] == 50
    # Each row tracked with its own version, as one by one (PostgreSQL: the transaction's).
    assert _versions(servers[0]) == _versions(servers[1]) == (50 if backend == "sqlite" else 1)


def test_a_rule_failing_inside_the_batch_rejects_only_the_later_row(servers, monkeypatch, batches):
    mutations = [_ins(i, f"k{i:03}") for i in range(1, 11)]
    mutations[6] = _ins(7, "k007", title="t-k003")  # clashes with an earlier row of the batch

    results = _same_both_ways(servers, monkeypatch, mutations)

    assert [r.status for r in results].count("rejected") == 1
    assert results[6].status == "rejected"
    assert results[6].code == "rule"
    assert "taken" in results[6].reason
    assert batches == [False]


def test_a_refused_batch_goes_on_one_by_one_after_what_came_before_is_committed(
    servers, monkeypatch, batches
):
    """On SQLite a batch sets the insert triggers aside (a schema change), and after one
    in a transaction every savepoint rollback makes SQLite read the whole schema again:
    a refused batch's mutations go one by one in a transaction of their own, after
    what the request applied before them is committed with its log. A request cut
    off there is answered from that log when it is sent again, and goes on. (On
    PostgreSQL the request is one transaction: the cut leaves nothing.)"""
    batched, single = servers
    first = [_ins(i, f"a{i:03}") for i in range(1, 6)]  # a batch that passes
    gone = Mutation(seq=6, id="m6", table="LocalNote", key="a001", op="delete")
    clashing = [_ins(i, f"b{i:03}", title="t-a002" if i == 9 else None) for i in range(7, 13)]
    mutations = [*first, gone, *clashing]
    _cut_off(batched, mutations, monkeypatch, 3)  # the delete, then the run's first
    assert batches == [True, False]
    split = batched.store.batch_changes_schema
    last, logged = _log_of(batched)
    assert last == (6 if split else 0)  # the batch and the delete, committed before
    assert logged == ([1, 2, 3, 4, 5, 6] if split else [])
    assert [r[0] for r in _rows(batched)] == (["a002", "a003", "a004", "a005"] if split else [])

    again = _push(batched, mutations, monkeypatch, batch=True)
    want = _push(single, mutations, monkeypatch, batch=False)

    assert again == want
    assert [r.status for r in again].count("applied") == 11
    assert again[8].code == "rule"
    assert _rows(batched) == _rows(single)


def test_a_refused_mutation_after_a_batch_commits_what_came_before(servers, monkeypatch, batches):
    """The same after a batch that passed: the first refused mutation behind it rolls
    back a savepoint of a transaction that changed its schema; the request so far
    (that mutation's verdict included) is committed, and the rest goes on in a
    transaction of its own."""
    batched, single = servers
    first = [_ins(i, f"a{i:03}") for i in range(1, 6)]
    taken = [  # each renames a row to the title of the next one: refused by the rule
        Mutation(
            seq=5 + j,
            id=f"m{5 + j}",
            table="LocalNote",
            key=f"a{j:03}",
            op="update",
            values={"title": f"t-a{j + 1:03}"},
            changed=["title"],
            base={"title": f"t-a{j:03}"},
        )
        for j in range(1, 4)
    ]
    mutations = [*first, *taken]
    _cut_off(batched, mutations, monkeypatch, 3)
    assert batches == [True]
    last, _ = _log_of(batched)
    # The batch and the first refusal; the second was rolled back with the cut.
    assert last == (6 if batched.store.batch_changes_schema else 0)

    again = _push(batched, mutations, monkeypatch, batch=True)
    want = _push(single, mutations, monkeypatch, batch=False)

    assert again == want
    assert [r.code for r in again[5:]] == ["rule"] * 3
    assert _rows(batched) == _rows(single)


@pytest.mark.backends("sqlite")
def test_a_request_applied_by_another_process_between_the_two_is_answered_from_the_log(
    servers, tmp_path, monkeypatch, batches
):
    """Between the commit and the next transaction, another server process on the same
    database may take the write lock: with this very request, sent again after a lost
    answer. It applies the rest; this one then answers those from the log, not twice.
    (Only SQLite's push is split in two transactions.)"""
    batched, single = servers
    mutations = [
        *(_ins(i, f"a{i:03}") for i in range(1, 6)),  # a batch that passes
        Mutation(seq=6, id="m6", table="LocalNote", key="a001", op="delete"),
        *(_ins(i, f"b{i:03}", title="t-a002" if i == 9 else None) for i in range(7, 13)),
    ]
    req = SyncRequest(protocol=1, client_id="device", mutations=mutations)
    url = batched.store.engine.url.render_as_string()
    # A second process: its own engine and writer lock.
    other = SyncServer(batched.schema, url, authenticate=TokenAuth({"t1": U1}), install=False)
    theirs: list[MutationResult] = []

    def raced(conn: Any) -> None:  # SQLiteStore.continue_anew, the other one in between
        conn.commit()
        theirs.extend(other.pusher.apply(U1, req, other.schema.units["Push"]).results)
        conn.begin()

    monkeypatch.setattr(batched.store, "continue_anew", raced)
    ours = _push(batched, mutations, monkeypatch, batch=True)
    other.store.engine.dispose()
    want = _push(single, mutations, monkeypatch, batch=False)

    assert theirs == want
    assert ours == want  # the rest answered from the log: the same verdicts, nothing twice
    assert _rows(batched) == _rows(single)
    assert _log_of(batched)[1] == list(range(1, 13))
    assert batches == [True, False, False]  # ours, ours refused, theirs refused


def test_out_of_scope_invalid_and_existing_rows_fall_back_and_match(servers, monkeypatch, batches):
    for server in servers:
        with server.store.engine.begin() as conn:
            conn.execute(note.insert().values(id="k005", owner="u1", title="old", n=0))
    cases = {
        "out of scope": [_ins(i, f"s{i:03}", owner="u2" if i == 3 else "u1") for i in range(1, 9)],
        "invalid value": [_ins(i, f"j{i:03}", n="x" if i == 12 else i) for i in range(9, 17)],
        "existing key": [
            _ins(i, f"k{i - 17 + 1:03}x" if i != 20 else "k005") for i in range(17, 25)
        ],
        "key twice": [_ins(i, "dup" if i in (26, 28) else f"d{i}") for i in range(25, 33)],
    }
    statuses = {}
    for name, mutations in cases.items():
        results = _same_both_ways(servers, monkeypatch, mutations)
        statuses[name] = [r.code for r in results if r.status != "applied"]

    assert statuses == {
        "out of scope": ["out-of-scope"],
        "invalid value": ["invalid-value"],
        "existing key": [],  # the existing row is updated, as one by one
        "key twice": [],
    }
    assert batches == [False, False, False, False]


def test_a_set_check_that_raises_falls_back_and_blocks_nothing(servers, monkeypatch, batches):
    mutations = [_ins(i, f"k{i:03}", title="explode" if i == 4 else None) for i in range(1, 9)]

    results = _same_both_ways(servers, monkeypatch, mutations)

    assert [r.status for r in results] == ["applied"] * 8
    assert batches == [False]


@pytest.mark.parametrize(
    "odd",
    [{"n": 2**40}, {"title": "a\x00b"}],
    ids=["integer beyond 32 bits", "NUL in text"],
)
def test_a_value_the_database_refuses_falls_back_and_rejects_only_its_mutation(
    servers, backend, monkeypatch, batches, odd
):
    """PostgreSQL cannot store these (SQLite stores them): the batch goes one by one,
    where that mutation alone is rejected and the others apply, on every retry; the
    request never fails as a whole. Text holding NUL is known before the database is
    asked; the integer is refused by the database (a DataError): both ``invalid-value``."""
    mutations = [_ins(i, f"k{i:03}", **(odd if i == 3 else {})) for i in range(1, 7)]

    results = _same_both_ways(servers, monkeypatch, mutations)

    if backend == "postgres":
        nul = "title" in odd
        assert [r.code for r in results] == ["", "", "invalid-value", "", "", ""]
        says = "NUL character" if nul else "column 'n': the database refused a value"
        assert says in results[2].reason
        assert batches == [False]
    else:
        assert [r.status for r in results] == ["applied"] * 6
        assert batches == [True]


def _no_broken_title(batch: BatchContext) -> bool:
    if any(r["title"] == "broken" for r in batch.rows):
        batch.conn.execute(sa.text("SELECT 1 FROM no_such_table"))
    return True


@set_check(_no_broken_title)
def no_broken_title(ctx: MutationContext) -> str | None:
    """A rule whose query fails on one row (a bug in the app's rule, say)."""
    if ctx.row["title"] == "broken":
        ctx.conn.execute(sa.text("SELECT 1 FROM no_such_table"))
    return None


def test_a_rule_query_failing_in_the_set_based_form_falls_back_and_matches(
    new_database, monkeypatch, batches
):
    """The set-based form's statement fails (PostgreSQL: a ProgrammingError, SQLite: an
    OperationalError): one by one, only the row it fails on is rejected."""
    rules = [unique_title, no_broken_title]
    servers = (_server(new_database("batched"), rules), _server(new_database("single"), rules))
    mutations = [_ins(i, f"k{i:03}", title="broken" if i == 2 else None) for i in range(1, 7)]
    try:
        results = _same_both_ways(servers, monkeypatch, mutations)
    finally:
        for server in servers:
            server.store.engine.dispose()

    assert [r.code for r in results] == ["", "server-error", "", "", "", ""]
    assert batches == [False]


def test_a_lost_connection_in_the_batch_still_fails_the_request(servers, monkeypatch, batches):
    """Not a refusal of the data: the request fails as a whole (and is retried)."""
    batched, _ = servers

    def invalidated(*args: Any) -> None:
        exc = sa.exc.OperationalError("INSERT", {}, Exception("server closed the connection"))
        exc.connection_invalidated = True
        raise exc

    monkeypatch.setattr(batched.store, "insert_new_rows", invalidated)
    with pytest.raises(sa.exc.OperationalError):
        _push(batched, [_ins(i, f"k{i:03}") for i in range(1, 7)], monkeypatch, batch=True)
    assert _log_of(batched) == (0, [])
    assert _rows(batched) == []


def test_a_rule_without_a_set_based_form_keeps_the_one_by_one_path(
    new_database, monkeypatch, batches
):
    def plain(ctx: MutationContext) -> str | None:
        return None

    server = _server(new_database("plain"), [plain])
    results = _push(server, [_ins(i, f"k{i}") for i in range(1, 9)], monkeypatch, batch=True)
    server.store.engine.dispose()

    assert [r.status for r in results] == ["applied"] * 8
    assert batches == []


def test_hospital_bookings_in_one_batch_keep_the_double_booking_rule(server, store):
    staff = Principal("staff:1", {"hospital_id": 1})
    start = dt.datetime(2033, 5, 2, 9, 0)
    with store.engine.connect() as conn:
        doctor = conn.execute(sa.text("SELECT id FROM doctor WHERE hospital_id = 1")).scalar()
    mutations = [_booking("b", i, doctor, start, 30 * i, status="booked") for i in range(1, 9)]
    # overlaps the 4th and the 5th
    mutations.append(_booking("b", 9, doctor, start, 30 * 4 + 15, status="booked"))

    req = SyncRequest(protocol=1, client_id="tablet", mutations=mutations)
    results = server.pusher.apply(staff, req, server.schema.units["SendAppointments"]).results

    assert [r.status for r in results] == ["applied"] * 8 + ["rejected"]
    assert results[8].code == "rule"
    assert "already booked" in results[8].reason


@pytest.mark.parametrize("batch", [True, False], ids=["batched", "one by one"])
def test_a_booking_that_leaves_out_its_defaulted_status_is_checked_as_booked(
    server, store, monkeypatch, batch
):
    """``status`` has a default ('booked'): a device that leaves it out books as surely
    as one that sends it, so the double-booking rule must see it."""
    staff = Principal("staff:1", {"hospital_id": 1})
    start = dt.datetime(2033, 6, 2, 9, 0)
    with store.engine.connect() as conn:
        doctor = conn.execute(sa.text("SELECT id FROM doctor WHERE hospital_id = 1")).scalar()
    mutations = [_booking("d", i, doctor, start, 30 * i) for i in range(1, 6)]
    mutations.append(_booking("d", 6, doctor, start, 30 * 2 + 15))  # overlaps the 2nd and 3rd

    results = _push_as(server, staff, "SendAppointments", mutations, monkeypatch, batch)

    assert [r.status for r in results] == ["applied"] * 5 + ["rejected"]
    assert results[5].code == "rule"
    assert "already booked" in results[5].reason
    with store.engine.connect() as conn:
        statuses = conn.execute(
            sa.text("SELECT status FROM appointment WHERE id LIKE 'd%'")
        ).scalars()
        assert set(statuses) == {"booked"}


def _booking(
    prefix: str, seq: int, doctor: int, start: dt.datetime, minutes: int, **more: Any
) -> Mutation:
    """A new half-hour appointment of ``doctor``, ``minutes`` after ``start``."""
    at = start + dt.timedelta(minutes=minutes)
    row = {
        "id": f"{prefix}{seq:03}",
        "doctor_id": doctor,
        "patient_id": 1,
        "starts_at": at.isoformat(),
        "ends_at": (at + dt.timedelta(minutes=30)).isoformat(),
        "room": "R1",
        "notes": "",
        **more,
    }
    return Mutation(seq, f"m{seq}", "LocalAppointment", row["id"], "insert", row)


def _push_as(
    server: SyncServer,
    principal: Principal,
    unit: str,
    mutations: list[Mutation],
    monkeypatch: pytest.MonkeyPatch,
    batch: bool,
) -> list[MutationResult]:
    with monkeypatch.context() as m:
        if not batch:
            m.setattr(push_module, "BATCH_MIN", 10**9)
        req = SyncRequest(protocol=1, client_id="tablet", mutations=mutations)
        return server.pusher.apply(principal, req, server.schema.units[unit]).results


defaults_meta = sa.MetaData()
defaulted = sa.Table(
    "defaulted",
    defaults_meta,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("owner", sa.String(20), nullable=False),
    sa.Column("kind", sa.String(10), nullable=False, default="plain"),
    sa.Column("label", sa.String(20), nullable=False, server_default="unlabelled"),
    sa.Column("code", sa.String(40), nullable=False, default=lambda: uuid.uuid4().hex),
    sa.Column("note", sa.String(20), nullable=True),
)
seen_rows: dict[str, dict[str, Any]] = {}  # per key: the row the rule (or its set form) saw


def _remember_all(batch: BatchContext) -> bool:
    seen_rows.update((k, dict(r)) for k, r in zip(batch.keys, batch.rows, strict=True))
    return True


@set_check(_remember_all)
def remember(ctx: MutationContext) -> str | None:
    """Accepts every row; remembers what it saw."""
    seen_rows[ctx.key] = dict(ctx.row)
    return None


@pytest.mark.parametrize("batch", [True, False], ids=["batched", "one by one"])
def test_rules_see_the_defaults_of_left_out_columns_as_stored(
    new_database, monkeypatch, batches, batch
):
    """A scalar default, a callable one and a server default: what the rule sees of a
    new row is what the database stores, whichever path wrote it."""
    seen_rows.clear()
    server = owner_push_server(
        new_database("defaults"), defaulted, "LocalDefaulted", U1, [remember]
    )
    mutations = [
        Mutation(i, f"m{i}", "LocalDefaulted", f"k{i}", "insert", {"id": f"k{i}", "owner": "u1"})
        for i in range(1, 7)
    ]
    try:
        results = _push(server, mutations, monkeypatch, batch=batch)
        with server.store.engine.connect() as conn:
            cols = [defaulted.c[n] for n in ("id", "owner", "kind", "label", "code", "note")]
            stored = {r.id: dict(r._mapping) for r in conn.execute(sa.select(*cols))}
    finally:
        server.store.engine.dispose()

    assert [r.status for r in results] == ["applied"] * 6
    assert batches == ([True] if batch else [])
    assert len({row["code"] for row in stored.values()}) == 6
    for key, row in stored.items():
        assert row["kind"] == "plain"
        assert row["label"] == "unlabelled"
        assert {n: seen_rows[key][n] for n in row} == row


visit_meta = sa.MetaData()
visit = sa.Table(
    "visit",
    visit_meta,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("owner", sa.String(20), nullable=False),
    sa.Column("at", sa.DateTime, nullable=False),
)


def test_batched_timestamps_are_stored_as_text_identical_to_one_by_one(
    new_database, backend, monkeypatch, batches
):
    stamps = [
        "2031-01-06T08:00:00",
        "2031-01-06T08:00:00.123456",
        "2031-01-06T08:00:00.5",
        "0999-12-31T23:59:59",
        "2031-01-06T08:00:00+02:00",  # the offset is not kept: as SQLAlchemy stores it
        "2031-01-06 08:15",
        "2031-01-06T08:30:00Z",
        "2031-01-06T08:45:00.000001",
    ]
    mutations = [
        Mutation(
            i, f"m{i}", "LocalVisit", f"v{i}", "insert", {"id": f"v{i}", "owner": "u1", "at": s}
        )
        for i, s in enumerate(stamps, 1)
    ]
    texts = []
    for name, batch in (("batched", True), ("single", False)):
        server = owner_push_server(new_database(name), visit, "LocalVisit", U1)
        results = _push(server, mutations, monkeypatch, batch=batch)
        assert [r.status for r in results] == ["applied"] * len(stamps)
        with server.store.engine.connect() as conn:
            texts.append(conn.exec_driver_sql("SELECT id, at FROM visit ORDER BY id").all())
        server.store.engine.dispose()

    assert batches == [True]
    assert texts[0] == texts[1]
    if backend == "sqlite":  # the text SQLAlchemy writes (PostgreSQL: a timestamp)
        assert texts[0][0] == ("v1", "2031-01-06 08:00:00.000000")
