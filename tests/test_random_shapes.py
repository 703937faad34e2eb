"""A state machine over random stream shapes, writers and devices.

Each example draws a stream shape over a chain of many-to-one tables
``t0 -> t1 -> t2 -> t3`` (0 to 3 joins; a filter on base and joined columns
with the principal's parameter and literals; a column list; sometimes a full
stream beside it), starts a real server for it, and gives two or three devices
different principals. Then server writes (inserts, updates of scope, join and
payload columns, deletes, renames, INSERT OR REPLACE, a deleted key created
again) interleave with syncs cut after any frame, some with a write made while
the response is being read. Each example reads its deltas one way: changed
rows and tombstones by version where few (the default threshold), or always
through the pinned scope (``FEW_CHANGES`` 0).

Oracle, after every sync that ends cleanly: each device's local tables equal
the streams' queries on the server for its principal (so no row outside its
scope and no deleted row). On every response: a removal names only keys that
were in that principal's scope at some moment.

On both server databases: on PostgreSQL one database serves the whole test and
each example starts from an empty schema (dropped and made again), and the
replacing write is a delete and an insert of the same key in one transaction.

Bounded for CI; ``SYNCUNIT_LONG_PROPERTIES=1`` runs hundreds of examples of
fifty steps (thousands of steps); ``SYNCUNIT_SHAPES_EXAMPLES`` and
``SYNCUNIT_SHAPES_STEPS`` set other bounds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import psycopg
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from syncunit import Join, Stream, SyncSchema, SyncUnit
from syncunit.client import SyncClient
from syncunit.errors import NetworkError
from syncunit.server import Principal, SyncServer, TokenAuth, changes, open_store
from tests.conftest import pg_dsn
from tests.support import LiveServer, TapTransport, expected_rows, local_rows, removed_keys

LONG = os.environ.get("SYNCUNIT_LONG_PROPERTIES") == "1"
LEVELS = 4  # t0 (the base) .. t3
GROUPS = st.integers(0, 2)
SLOT = st.integers(0, 10**6)  # an existing row by index, modulo the count


def _tables() -> list[sa.Table]:
    """A fresh chain t0 -> t1 -> t2 -> t3 (tracking adds columns to the table objects)."""
    meta = sa.MetaData()
    out: list[sa.Table] = []
    for level in range(LEVELS):
        cols = [
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("g", sa.Integer, nullable=False),
            sa.Column("v", sa.String, nullable=False),
        ]
        if level < LEVELS - 1:
            cols.append(sa.Column("fk", sa.Integer, nullable=True))
        if level == 0:
            cols.append(sa.Column("s", sa.String, nullable=False))
        out.append(sa.Table(f"t{level}", meta, *cols))
    return out


@st.composite
def shapes(draw: st.DrawFn) -> dict[str, Any]:
    depth = draw(st.integers(0, 3))
    level = st.integers(0, depth)
    term = st.one_of(
        st.tuples(st.just("param"), level),
        st.tuples(st.just("param"), st.just(depth)),  # the farthest table, most often
        st.tuples(st.just("ne"), level, GROUPS),
        st.tuples(st.just("in"), level, st.lists(GROUPS, min_size=1, max_size=2)),
        st.tuples(st.just("status"), st.sampled_from(["a", "b"])),
        st.tuples(st.just("or"), level, level),
    )
    return {
        "depth": depth,
        "terms": draw(st.lists(term, max_size=3)),  # none: every row, removed only by deletes
        "columns": draw(
            st.lists(st.tuples(st.integers(0, depth), st.sampled_from(["g", "v"])), max_size=4)
        ),
        "full": draw(st.booleans()),
    }


def build_streams(shape: dict[str, Any], t: list[sa.Table]) -> list[Stream]:
    p = sa.bindparam("p", type_=sa.Integer)
    depth = shape["depth"]
    joins = [Join(t[i], t[i - 1].c.fk == t[i].c.id) for i in range(1, depth + 1)]
    terms: list[Any] = []
    for term in shape["terms"]:
        kind = term[0]
        if kind == "param":
            terms.append(t[term[1]].c.g == p)
        elif kind == "ne":
            terms.append(t[term[1]].c.g != term[2])
        elif kind == "in":
            terms.append(t[term[1]].c.g.in_(term[2]))
        elif kind == "status":
            terms.append(t[0].c.s != term[1])
        else:
            terms.append(sa.or_(t[term[1]].c.g == p, t[term[2]].c.v == "x"))
    columns: dict[str, Any] = {"id": t[0].c.id, "s": t[0].c.s}
    for level, name in shape["columns"]:
        columns[f"c{level}_{name}"] = t[level].c[name]
    streams = [
        Stream(
            "rows",
            t[0],
            columns,
            joins=joins,
            where=sa.and_(*terms) if terms else None,
            local_table="LocalRows",
        )
    ]
    if shape["full"]:
        agg = (
            sa.select(t[0].c.fk.label("k"), sa.func.count().label("n"))
            .where(t[0].c.g == p, t[0].c.fk.is_not(None))  # a key is never NULL
            .group_by(t[0].c.fk)
        )
        streams.append(Stream.full("totals", agg, key="k", local_table="LocalTotals"))
    return streams


class RandomShapes(RuleBasedStateMachine):
    """One stream shape, one server, a few devices; writes and syncs in any order."""

    #: The server database of a PostgreSQL run (set on a subclass); None: a SQLite file.
    pg_url: str | None = None

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="syncunit-shapes-"))
        self.live: LiveServer | None = None
        self.pg: psycopg.Connection[Any] | None = None
        self.paths = contextlib.ExitStack()
        self.devices: list[dict[str, Any]] = []
        self.writes = 0
        self.created: dict[int, int] = {}  # base key -> the write that created it
        self.deleted: set[int] = set()  # base keys deleted and not created again
        self.touched = 1  # the t1 row a write changed last (a booking links to it)

    # -- setup ------------------------------------------------------------------------

    @initialize(
        shape=shapes(),
        groups=st.lists(GROUPS, min_size=2, max_size=3),
        seed_rows=st.lists(st.tuples(GROUPS, SLOT, SLOT), min_size=4, max_size=14),
        chunk=st.integers(2, 5),
        few=st.sampled_from([changes.FEW_CHANGES, 0]),
    )
    def start(
        self, shape: dict[str, Any], groups: list[int], seed_rows: list[Any], chunk: int, few: int
    ):
        # 0: every delta reads through the pinned scope, as after a burst of writes.
        self.paths.enter_context(mock.patch.object(changes, "FEW_CHANGES", few))
        self.t = _tables()
        self.db = self.dir / "server.sqlite"
        if self.pg_url is not None:
            self.pg = _empty_schema(self.pg_url)
        store = self.store = open_store(self.pg_url or f"sqlite:///{self.db}")
        self.t[0].metadata.create_all(store.engine)
        self.streams = build_streams(shape, self.t)
        self.depth = shape["depth"]
        principals = {f"tok{i}": Principal(f"p{i}", {"p": g}) for i, g in enumerate(groups)}
        self.server = SyncServer(
            SyncSchema([SyncUnit("Pull", self.streams)]), store, authenticate=TokenAuth(principals)
        )
        rows = {level: 2 + level for level in range(1, LEVELS)}
        for level in range(LEVELS - 1, 0, -1):
            for i in range(rows[level]):
                self._sql(
                    f"INSERT INTO t{level} (id, g, v{', fk' if level < LEVELS - 1 else ''})"
                    f" VALUES (?, ?, 'v'{', ?' if level < LEVELS - 1 else ''})",
                    (i + 1, i % 3, *([i % rows[level + 1] + 1] if level < LEVELS - 1 else [])),
                )
        self.next_id = 1
        for g, fk, s in seed_rows:
            self._insert_base(g, fk, s)
        self.live = LiveServer(self.server.app)
        for i, g in enumerate(groups):
            tap = TapTransport()
            client = SyncClient(
                self.live.url, self.dir / f"d{i}.sqlite", token=f"tok{i}", transport=tap,
                chunk_size=chunk,
            )  # fmt: skip
            self.devices.append(
                {"client": client, "tap": tap, "params": {"p": g}, "ever": set(), "since": 0}
            )
        self._observe()

    def teardown(self) -> None:
        try:
            if self.devices:
                for i in range(len(self.devices)):
                    self._sync(i, cut=0, during=None)
                    self._check(i)
        finally:
            for d in self.devices:
                d["client"].close()
            if self.live is not None:
                self.live.stop()
            if self.live is not None or self.pg is not None:
                self.store.engine.dispose()
            if self.pg is not None:
                self.pg.close()
            self.paths.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- the server's writers ---------------------------------------------------------

    def _sql(self, sql: str, params: Any = (), *more: tuple[str, Any]) -> None:
        """One write: a statement (or several, in one transaction), as any writer would."""
        if self.pg is not None:
            with self.pg.transaction():
                for stmt, args in ((sql, params), *more):
                    self.pg.execute(stmt.replace("?", "%s"), args)
        else:
            conn = sqlite3.connect(self.db, isolation_level=None, timeout=30)
            try:
                conn.execute("BEGIN IMMEDIATE")
                for stmt, args in ((sql, params), *more):
                    conn.execute(stmt, args)
                conn.execute("COMMIT")
            finally:
                conn.close()
        self.writes += 1

    def _ids(self, level: int) -> list[int]:
        if self.pg is not None:
            rows = self.pg.execute(f"SELECT id FROM t{level} ORDER BY id").fetchall()
            return [r[0] for r in rows]
        conn = sqlite3.connect(self.db, timeout=30)
        try:
            return [r[0] for r in conn.execute(f"SELECT id FROM t{level} ORDER BY id")]
        finally:
            conn.close()

    def _ids_linked(self, level: int, top: int, key: int) -> list[int]:
        """The ids of ``t{level}`` whose chain of links reaches ``t{top}``'s row ``key``."""
        ids = [key]
        for lv in range(top - 1, level - 1, -1):
            marks = ", ".join("?" * len(ids)) or "NULL"
            sql = f"SELECT id FROM t{lv} WHERE fk IN ({marks}) ORDER BY id"
            if self.pg is not None:
                ids = [r[0] for r in self.pg.execute(sql.replace("?", "%s"), ids).fetchall()]
            else:
                conn = sqlite3.connect(self.db, timeout=30)
                try:
                    ids = [r[0] for r in conn.execute(sql, ids)]
                finally:
                    conn.close()
        return ids

    def _pick(self, level: int, slot: int) -> int | None:
        ids = self._ids(level)
        return ids[slot % len(ids)] if ids else None

    def _insert_base(self, g: int, fk: int, s: int) -> None:
        key, self.next_id = self.next_id, self.next_id + 1
        self._sql(
            "INSERT INTO t0 (id, g, v, fk, s) VALUES (?, ?, 'v', ?, ?)",
            (key, g, fk % 6 + 1, "ab"[s % 2]),  # fk 6 dangles: t1 has 3 rows
        )
        self.created[key] = self.writes

    def _observe(self) -> None:
        """Record, for each device, the base keys in its principal's scope now."""
        for d in self.devices:
            rows = expected_rows(self.server, self.streams[0], d["params"])
            d["ever"].update(r[0] for r in rows)

    def _write(self, op: tuple[Any, ...]) -> None:
        kind, level, a, b = op
        level %= self.depth + 1  # a table the stream reads
        key = self._pick(level, a)
        if kind == "insert":
            self._insert_base(level % 3, a, b)
        elif kind == "book":  # a base row made for the joined row that just changed
            self._insert_base(b % 3, self.touched - 1, a)
        elif (
            kind == "move-book" and level > 0 and key is not None
        ):  # a joined row's scope changes, then a
            # base row is made for it (or for the row under it): never in the old scope
            self._sql(f"UPDATE t{level} SET g = ? WHERE id = ?", (b % 3, key))
            self._observe()
            if level > 1:
                under = self._ids_linked(1, level, key) or [self.touched]
                self.touched = under[a % len(under)]
            else:
                self.touched = key
            self._insert_base(a % 3, self.touched - 1, b)
        elif key is None:
            return
        elif kind == "scope":
            self._sql(f"UPDATE t{level} SET g = ? WHERE id = ?", (b % 3, key))
        elif kind == "link" and level < LEVELS - 1:
            target = self._pick(level + 1, b)
            self._sql(f"UPDATE t{level} SET fk = ? WHERE id = ?", (target, key))
        elif kind == "rename":
            self._sql(f"UPDATE t{level} SET v = ? WHERE id = ?", ("x" if b % 2 else f"v{b}", key))
        elif kind == "status":
            self._sql("UPDATE t0 SET s = ? WHERE id = ?", ("ab"[b % 2], self._pick(0, a)))
        elif kind == "delete":
            self._sql(f"DELETE FROM t{level} WHERE id = ?", (key,))
        elif kind == "replace":
            extra = ", fk" if level < LEVELS - 1 else ""
            values = ", ?" if level < LEVELS - 1 else ""
            insert = (
                f" INTO t{level} (id, g, v{extra}{', s' if level == 0 else ''})"
                f" VALUES (?, ?, 'r'{values}{', ?' if level == 0 else ''})"
            )
            args = (key, b % 3, *([b % 4 + 1] if level < LEVELS - 1 else []),
                    *(["a"] if level == 0 else []))  # fmt: skip
            if self.pg is None:
                self._sql("INSERT OR REPLACE" + insert, args)
            else:  # what REPLACE does, written out
                self._sql(f"DELETE FROM t{level} WHERE id = ?", (key,), ("INSERT" + insert, args))
        elif kind == "recreate" and self.deleted:
            gone = sorted(self.deleted)[b % len(self.deleted)]
            self._sql(
                "INSERT INTO t0 (id, g, v, fk, s) VALUES (?, ?, 'again', ?, 'a')",
                (gone, b % 3, a % 3 + 1),
            )
            self.created[gone] = self.writes
        if kind == "delete" and level == 0:
            self.deleted.add(key)
        if level == 1 and key is not None and kind in ("scope", "link", "replace", "rename"):
            self.touched = key
        if kind in ("recreate", "insert", "book", "move-book", "replace"):
            self.deleted -= set(self._ids(0))
        self._observe()

    OPS = st.tuples(
        # Changes of scope and links come most often: they move rows in and out.
        st.sampled_from(
            [
                *("scope", "link") * 2,
                *("insert", "book", "move-book", "rename", "status", "delete"),
                *("replace", "recreate"),
            ]
        ),
        st.integers(0, LEVELS - 1),
        SLOT,
        SLOT,
    )

    @precondition(lambda self: self.live is not None)
    @rule(ops=st.lists(OPS, min_size=1, max_size=4))
    def write(self, ops: list[tuple[Any, ...]]) -> None:
        for op in ops:
            self._write(op)

    # -- devices ---------------------------------------------------------------------

    def _sync(self, i: int, *, cut: int, during: tuple[Any, ...] | None) -> bool:
        d = self.devices[i]
        tap: TapTransport = d["tap"]
        if cut:
            tap.arm(frames=cut)
        seen = [0]

        def write_while_reading(frame: Any) -> None:
            seen[0] += 1
            if during is not None and seen[0] == 2:
                self._write(during)

        tap.on_frame = write_while_reading
        started = self.writes
        ok = False
        try:
            with contextlib.suppress(NetworkError, httpx.HTTPError):
                d["client"].sync("Pull")
                ok = True
        finally:
            tap.on_frame = None
            tap._armed = None
        if tap.responses:
            self._check_removals(d, removed_keys(tap.last, "rows"))
            tap.responses.clear()
        if ok:
            d["since"] = started
            d["clean"] = seen[0] < 2 or during is None
        return ok

    def _check_removals(self, d: dict[str, Any], removed: list[Any]) -> None:
        foreign = [k for k in removed if k not in d["ever"]]
        assert not foreign, f"removals name keys never in this principal's scope: {foreign}"

    def _check(self, i: int) -> None:
        d = self.devices[i]
        for s in self.streams:
            want = expected_rows(self.server, s, d["params"])
            got = local_rows(d["client"], self.server, s)
            assert got == want, f"device {i}, {s.local_table}: {got} != {want}"

    @precondition(lambda self: self.live is not None)
    @rule(
        i=st.integers(0, 2),
        cut=st.integers(0, 7),
        during=st.one_of(st.none(), OPS),
    )
    def sync(self, i: int, cut: int, during: tuple[Any, ...] | None) -> None:
        i %= len(self.devices)
        if self._sync(i, cut=cut, during=during) and self.devices[i]["clean"]:
            self._check(i)


def _empty_schema(url: str) -> psycopg.Connection[Any]:
    """Drop everything an earlier example made in ``url``'s database; a connection to it.

    Connections an earlier example's server left (a reader cut mid-response) are
    ended first, so the drop never waits for their locks.
    """
    conn = psycopg.connect(pg_dsn(url), autocommit=True)
    conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    conn.execute("DROP SCHEMA public CASCADE")
    conn.execute("CREATE SCHEMA public")
    return conn


#: Examples and steps per backend in CI (the whole file stays near a minute and a half).
BOUNDS = {"sqlite": (15, 15), "postgres": (15, 15)}


@pytest.mark.timeout(3 * 3600 if LONG or "SYNCUNIT_SHAPES_EXAMPLES" in os.environ else 120)
def test_random_shapes_writers_and_cut_syncs(
    backend: str, new_database: Callable[[str], str]
) -> None:
    from hypothesis.stateful import run_state_machine_as_test

    machine: type[RandomShapes] = RandomShapes
    if backend != "sqlite":
        url = new_database("shapes")
        machine = type("RandomShapesOnPostgres", (RandomShapes,), {"pg_url": url})
    examples, steps = (300, 50) if LONG else BOUNDS[backend]
    examples = int(os.environ.get("SYNCUNIT_SHAPES_EXAMPLES", examples))
    steps = int(os.environ.get("SYNCUNIT_SHAPES_STEPS", steps))
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
