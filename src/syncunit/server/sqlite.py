"""``ServerStore`` for SQLite, the embedded default.

SQLite serializes writers, so a global counter bumped inside each writing
transaction (``syncunit_clock``) is commit-ordered: any version a reader sees
in its snapshot was committed before every version above it. The cursor hands
out the counter's value read in the same snapshot as the rows.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import operator
import os
import re
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects.sqlite import DATETIME as SQLITE_DATETIME
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.elements import ColumnElement

from syncunit.server.migrations import TableTracking
from syncunit.server.store import ServerStore
from syncunit.units import CREATED_AT, CREATED_STAMP, TRACKING_COLUMNS, UPDATED_AT, VERSION

log = logging.getLogger("syncunit.server")

_NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
_BUMP = "UPDATE syncunit_clock SET version = version + 1 WHERE id = 1"
_CURRENT = "(SELECT version FROM syncunit_clock WHERE id = 1)"
#: Rows an INSERT (or UPDATE) OR REPLACE may replace, staged by a BEFORE trigger and
#: turned into tombstones by the AFTER trigger only if the write happened.
_STAGING = "syncunit_replaced"
#: Bytes of the database file a first copy reads through a memory map instead of read()
#: calls into the connection's page cache: 100k rows of the example read in about 8% less
#: time. Only there: a delta's few pages, read cold after each write, were 7% slower so at
#: 1M rows. Address space, not memory: the pages are the OS's file cache.
MMAP_BYTES = 256 << 20
_MAPPED = "syncunit_mapped"  # in a pooled connection's info: it reads through the map

_MIGRATIONS = {
    1: [
        "CREATE TABLE IF NOT EXISTS syncunit_clock"
        " (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)",
        "INSERT OR IGNORE INTO syncunit_clock (id, version) VALUES (1, 0)",
        "INSERT OR IGNORE INTO syncunit_meta (key, value)"
        " VALUES ('epoch', lower(hex(randomblob(8))))",
    ],
    2: [
        f"CREATE TABLE IF NOT EXISTS {_STAGING}"
        " (table_name TEXT NOT NULL, kind TEXT NOT NULL, old TEXT NOT NULL)",
    ],
}


def _on_connect(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    # The timeout first: switching a fresh file to WAL takes a lock other starters may hold.
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA journal_mode=WAL")
    # A commit is on disk before the server answers: a push the devices were told was
    # applied (they drop it from their outbox) survives a power cut of this machine.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")  # pushed rows keep referential integrity
    cur.close()


def _on_checkin(dbapi_conn: Any, record: Any) -> None:
    if dbapi_conn is not None and record.info.pop(_MAPPED, False):
        dbapi_conn.execute("PRAGMA mmap_size = 0")


def _on_begin(conn: Connection) -> None:
    immediate = conn.get_execution_options().get("syncunit_write", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def configure_engine(engine: Engine) -> Engine:
    """Make pysqlite transactions real: BEGIN on begin (IMMEDIATE for writes), WAL, timeouts.

    Idempotent: an engine configured before (by another store) is left as it is.
    """
    if not event.contains(engine, "connect", _on_connect):
        event.listen(engine, "connect", _on_connect)
    if not event.contains(engine, "checkin", _on_checkin):
        event.listen(engine, "checkin", _on_checkin)
    if not event.contains(engine, "begin", _on_begin):
        event.listen(engine, "begin", _on_begin)
    return engine


#: Column types whose stored SQLite values travel as they are.
_RAW_TYPES = (sa.Integer, sa.Float, sa.String, sa.Date, sa.Boolean)
#: SQLite's error when json_array() is given a blob.
_NO_BLOB = "JSON cannot hold BLOB values"


class SQLiteStore(ServerStore):
    """Change tracking with triggers and a global clock table."""

    dialect = "sqlite"

    @classmethod
    def from_url(cls, url: str) -> SQLiteStore:
        engine = sa.create_engine(url, connect_args={"check_same_thread": False})
        return cls(engine)

    def __init__(self, engine: Engine) -> None:
        super().__init__(configure_engine(engine))
        path = engine.url.database
        file = bool(path) and path != ":memory:" and not str(path).startswith("file:")
        self._checkpointer = Checkpointer(str(path)) if file else None
        self._writer = _KeptWriter(self.engine, self._checkpointer, keep=file)

    def write(self, *, serializable: bool = False) -> Any:
        # writers are serialized: every one is serializable
        return _WriteTxn(self._writer)

    def kept_connections(self) -> int:
        return 0 if self._writer.conn is None else 1

    def watermark(self, conn: Connection) -> int:
        return int(conn.exec_driver_sql(_CURRENT[1:-1]).scalar_one())

    def before_long_read(self, conn: Connection) -> None:
        conn.exec_driver_sql(f"PRAGMA mmap_size = {MMAP_BYTES}")  # at once, in the transaction
        conn.info[_MAPPED] = True  # unmapped when the connection goes back to the pool

    def old_value(self, old: ColumnElement[Any], column: sa.Column[Any]) -> ColumnElement[Any]:
        # The path is written into the SQL (not bound), so it matches the expression
        # of the index ``tombstone_index_ddl`` makes.
        return sa.type_coerce(sa.func.json_extract(old, _json_path(column)), column.type)

    def index_names(self, conn: Connection) -> set[str]:
        rows = conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'index'")
        return {str(r[0]) for r in rows}

    def tombstone_index_ddl(self, column: sa.Column[Any]) -> list[str]:
        q = self.engine.dialect.identifier_preparer.quote
        name = q(f"ix_syncunit_tombstones_old_{column.name}"[:63])
        return [
            f"CREATE INDEX IF NOT EXISTS {name} ON syncunit_tombstones"
            f" (json_extract(old, {_json_path(column).text}), version)"
        ]

    def raw_column(self, expr: ColumnElement[Any]) -> ColumnElement[Any] | None:
        kind = expr.type
        if isinstance(kind, sa.types.TypeDecorator | sa.Uuid | sa.JSON | sa.Enum):
            return None  # custom processing
        if isinstance(kind, sa.DateTime):
            # SQLAlchemy stores '2027-03-01 09:00:00.000000'; isoformat() writes
            # '2027-03-01T09:00:00': the same text, made by SQLite in C.
            text = sa.type_coerce(expr, sa.String)
            return sa.func.replace(sa.func.replace(text, " ", "T"), ".000000", "", type_=sa.String)
        if isinstance(kind, _RAW_TYPES) and (
            not isinstance(kind, sa.Numeric) or isinstance(kind, sa.Integer | sa.Float)
        ):
            return expr
        return None

    def json_row(self, columns: Sequence[ColumnElement[Any]]) -> ColumnElement[Any] | None:
        # SQLite writes a real with 15 significant digits, not always the same double:
        # a stream with a floating-point column reads tuples. A column of another type
        # may still hold a real (type affinity keeps 1.5 in an INTEGER column; a TEXT
        # column, which a String maps to, turns it into text) or a blob: such a value
        # becomes a blob, which json_array refuses, and the read goes on as tuples.
        parts: list[ColumnElement[Any]] = []
        for expr in columns:
            kind = expr.type
            if isinstance(kind, sa.Float) or (
                isinstance(kind, sa.Numeric) and not isinstance(kind, sa.Integer)
            ):
                return None
            if isinstance(kind, sa.String):
                parts.append(expr)
            else:
                is_real = sa.func.typeof(expr) == sa.literal_column("'real'")
                parts.append(sa.case((is_real, sa.literal_column("x''")), else_=expr))
        return sa.func.json_array(*parts, type_=sa.String)

    def json_row_refused(self, exc: BaseException) -> bool:
        orig = getattr(exc, "orig", exc)  # SQLAlchemy's wrapper, or the driver's own
        return isinstance(orig, sqlite3.OperationalError) and _NO_BLOB in str(orig)

    def insert_new(self, table: sa.Table) -> sa.Insert:
        pk = list(table.primary_key.columns)
        return sqlite_insert(table).on_conflict_do_nothing(index_elements=pk)

    def greatest(self, *values: ColumnElement[Any]) -> ColumnElement[Any]:
        parts = [sa.func.coalesce(v, 0) for v in values]
        return parts[0] if len(parts) == 1 else sa.func.max(*parts)

    batch_changes_schema = True

    def continue_anew(self, conn: Connection) -> None:
        conn.commit()
        conn.begin()  # BEGIN IMMEDIATE again (``_on_begin``): the lock is this writer's

    def insert_new_rows(
        self, conn: Connection, table: sa.Table, rows: list[dict[str, Any]]
    ) -> None:
        """Stamp the rows as the insert triggers would, and insert them with those set aside.

        The insert triggers bump the clock once per row and stamp the row with it
        (as its version and its creation stamp) and the time (and stage no replaced
        row: the keys are new). Here the clock
        is bumped by ``len(rows)`` in one statement and row ``i`` gets the ``i``-th
        version: the same versions, commit-ordered, since this transaction is the
        only writer. For that one statement the two insert triggers are dropped and
        then created again from their stored text, inside this transaction: no other
        connection can write meanwhile (SQLite has one writer) nor ever sees them
        missing (the DDL commits with the rows, a failure or a crash rolls it back).
        This is cheaper than any guard in the triggers, which every row would run.
        """
        n = len(rows)
        top, now = conn.exec_driver_sql(
            f"UPDATE syncunit_clock SET version = version + {n} WHERE id = 1"
            f" RETURNING version, {_NOW}"
        ).one()
        first = int(top) - n + 1
        insert, params = _stamped_rows(self.engine.dialect, table, rows, first, str(now))
        names = [f"syncunit_{table.name}_{suffix}" for suffix in _INSERT_SUFFIXES]
        triggers = conn.exec_driver_sql(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?"
            f" AND name IN ({', '.join('?' * len(names))}) ORDER BY name",
            (table.name, *names),
        ).all()
        q = self.engine.dialect.identifier_preparer.quote
        for name, _ in triggers:
            conn.exec_driver_sql(f"DROP TRIGGER {q(name)}")
        if params is None:
            conn.execute(insert, _with_stamps(rows, first, str(now)))
        else:
            conn.exec_driver_sql(insert, params)
        for _, sql in triggers:
            conn.exec_driver_sql(sql)

    def least(self, *values: ColumnElement[Any]) -> ColumnElement[Any]:
        return values[0] if len(values) == 1 else sa.func.min(*values)

    # -- tracking ----------------------------------------------------------------------

    tracking_format = "sqlite/3"

    def migration_ddl(self, number: int) -> list[str]:
        return list(_MIGRATIONS.get(number, []))

    def advance_clock_sql(self) -> list[str]:
        return [_BUMP]

    def clock_sql(self) -> str:
        return _CURRENT

    def table_tracking_ddl(
        self, table: sa.Table, tracking: TableTracking, have: set[str]
    ) -> list[str]:
        q = self.engine.dialect.identifier_preparer.quote
        t = q(table.name)
        out: list[str] = []
        for col, typ in zip(TRACKING_COLUMNS, ("INTEGER", "TEXT", "TEXT", "INTEGER"), strict=True):
            if col not in have:
                out.append(f"ALTER TABLE {t} ADD COLUMN {col} {typ}")
        out.append(
            f"CREATE INDEX IF NOT EXISTS {q('ix_' + table.name + '_' + VERSION)} ON {t} ({VERSION})"
        )
        for suffix in _SUFFIXES:
            out.append(f"DROP TRIGGER IF EXISTS {q('syncunit_' + table.name + '_' + suffix)}")
        # Rows written before tracking existed get one version, so a first sync sees them.
        out.append(f"{_BUMP} AND EXISTS (SELECT 1 FROM {t} WHERE {VERSION} IS NULL)")
        out.append(
            f"UPDATE {t} SET {VERSION} = {_CURRENT}, {CREATED_AT} = {_NOW},"
            f" {UPDATED_AT} = {_NOW} WHERE {VERSION} IS NULL"
        )
        out.extend(self._triggers(tracking))
        return out

    def tracking_intact(self, conn: Connection, tracking: TableTracking) -> bool:
        names = {f"syncunit_{tracking.table}_{suffix}" for suffix in _SUFFIXES}
        rows = conn.exec_driver_sql(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?",
            (tracking.table,),
        )
        found = {str(n): str(sql) for n, sql in rows if n in names}
        if tracking.format != self.tracking_format:
            # Triggers of an older format: present is all that can be checked.
            return set(found) == names or set(found) == {n for n in names if n[-2:] != "bu"}
        return sorted(found.values()) == sorted(self._triggers(tracking))

    def legacy_image(self, conn: Connection, table: str) -> set[str] | None:
        row = conn.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = ?",
            (f"syncunit_{table}_ad",),
        ).scalar()
        if row is None:
            return None
        return set(re.findall(r"'([^']+)', OLD\.", str(row)))

    def _triggers(self, tr: TableTracking) -> list[str]:
        """The five triggers of a tracked table.

        * insert: stamp a version; rows an ``INSERT OR REPLACE`` replaced (on the
          key or any unique column set) become tombstones, but only if the row
          was inserted: a no-op ``INSERT OR IGNORE`` or ``DO NOTHING`` leaves no
          tombstone and bumps nothing;
        * update: stamp a version whatever the writer put in ``syncunit_version``
          (an ORM saving a stale object writes an old one); a change of a kept
          column leaves a ``move`` tombstone; rows an ``UPDATE OR REPLACE``
          replaced become tombstones;
        * delete (each row, also of a bulk ``DELETE``): a ``delete`` tombstone;
        * creation: an insert, or an update that changes the key, stamps the
          clock in ``syncunit_created_stamp`` (any other update keeps it, whatever
          the writer wrote), and tombstones keep it, so removals can tell a row
          created later, whether it is still there or not.

        Only the trigger's own stamp is not tracked: it writes the current clock,
        which a writer's stale version never equals (nor does an unchanged one).
        """
        q = self.engine.dialect.identifier_preparer.quote
        name = tr.table
        t = q(name)

        def image(row: str) -> str:  # the kept columns, and when the row was created
            kept = (*tr.image, CREATED_STAMP)
            return "json_object(" + ", ".join(f"'{c}', {row}.{q(c)}" for c in kept) + ")"

        def same(cols: tuple[str, ...], a: str, b: str) -> str:
            return " AND ".join(f"{a}.{q(c)} = {b}.{q(c)}" for c in cols)

        conflict = " OR ".join(f"({same(cols, t, 'NEW')})" for cols in (tr.key, *tr.uniques))
        stage = f"INSERT INTO {_STAGING} (table_name, kind, old)"
        clear = f"DELETE FROM {_STAGING} WHERE table_name = '{name}'"
        promote = (
            f"INSERT INTO syncunit_tombstones (table_name, version, kind, old, at)"
            f" SELECT '{name}', {_CURRENT}, kind, old, {_NOW} FROM {_STAGING}"
            f" WHERE table_name = '{name}'"
        )
        stamp = f"UPDATE {t} SET {VERSION} = {_CURRENT}, {UPDATED_AT} = {_NOW}"
        moved = " OR ".join(f"OLD.{q(c)} IS NOT NEW.{q(c)}" for c in tr.image)
        own_stamp = f"NEW.{VERSION} IS NOT OLD.{VERSION} AND NEW.{VERSION} IS {_CURRENT}"
        same_key = " AND ".join(f"json_extract(old, '$.{c}') IS NEW.{q(c)}" for c in tr.key)
        rekeyed = " OR ".join(f"OLD.{q(c)} IS NOT NEW.{q(c)}" for c in tr.key)
        created = CREATED_STAMP

        def trig(suffix: str) -> str:
            return "CREATE TRIGGER " + q(f"syncunit_{name}_{suffix}")

        return [
            f"{trig('bi')} BEFORE INSERT ON {t} BEGIN {clear};"
            f" {stage} SELECT '{name}', 'delete', {image(t)} FROM {t} WHERE {conflict}; END",
            f"{trig('ai')} AFTER INSERT ON {t} BEGIN {_BUMP};"
            f" UPDATE {_STAGING} SET kind = 'move' WHERE table_name = '{name}' AND {same_key};"
            f" {promote}; {clear};"
            f" {stamp}, {CREATED_AT} = COALESCE(NEW.{CREATED_AT}, {_NOW}),"
            f" {created} = {_CURRENT} WHERE {same(tr.key, t, 'NEW')}; END",
            f"{trig('bu')} BEFORE UPDATE ON {t} WHEN NOT ({own_stamp}) BEGIN {clear};"
            f" {stage} SELECT '{name}', 'delete', {image(t)} FROM {t}"
            f" WHERE ({conflict}) AND NOT ({same(tr.key, t, 'OLD')}); END",
            f"{trig('au')} AFTER UPDATE ON {t} WHEN NOT ({own_stamp}) BEGIN {_BUMP};"
            f" {promote}; {clear};"
            f" INSERT INTO syncunit_tombstones (table_name, version, kind, old, at)"
            f" SELECT '{name}', {_CURRENT}, 'move', {image('OLD')}, {_NOW} WHERE {moved};"
            f" {stamp}, {created} = CASE WHEN {rekeyed} THEN {_CURRENT}"
            f" ELSE OLD.{created} END WHERE {same(tr.key, t, 'NEW')}; END",
            f"{trig('ad')} AFTER DELETE ON {t} BEGIN {_BUMP};"
            f" INSERT INTO syncunit_tombstones (table_name, version, kind, old, at)"
            f" VALUES ('{name}', {_CURRENT}, 'delete', {image('OLD')}, {_NOW}); END",
        ]


_SUFFIXES = ("bi", "ai", "bu", "au", "ad")
_INSERT_SUFFIXES = ("bi", "ai")  # what ``insert_new_rows`` does itself


_inserts: dict[sa.Table, sa.Insert] = {}


def _stamped_insert(table: sa.Table) -> sa.Insert:
    """An INSERT into ``table`` (its column defaults included) that also writes the
    tracking columns, through a private copy of the table."""
    stmt = _inserts.get(table)
    if stmt is None:
        tracked = table.to_metadata(sa.MetaData())
        kinds = (sa.BigInteger, sa.String, sa.String, sa.BigInteger)
        for name, kind in zip(TRACKING_COLUMNS, kinds, strict=True):
            if name not in tracked.c:  # a model may declare them
                tracked.append_column(sa.Column(name, kind))
        stmt = _inserts[table] = tracked.insert()
    return stmt


def _with_stamps(rows: list[dict[str, Any]], first: int, now: str) -> list[dict[str, Any]]:
    return [
        {**r, VERSION: first + i, CREATED_AT: now, UPDATED_AT: now, CREATED_STAMP: first + i}
        for i, r in enumerate(rows)
    ]


def _stamped_rows(
    dialect: sa.Dialect, table: sa.Table, rows: list[dict[str, Any]], first: int, now: str
) -> tuple[Any, list[tuple[Any, ...]] | None]:
    """The stamped insert as driver SQL and parameter tuples, each value processed by
    its column type as SQLAlchemy would; SQLAlchemy's own statement (and None) when a
    column the rows leave out has a default SQLAlchemy fills in, or a column's type
    wraps its values in SQL (``bind_expression``)."""
    names = list(rows[0])
    given = set(names)
    if any(c.default is not None for c in table.columns if c.name not in given) or any(
        table.c[n].type._has_bind_expression for n in names
    ):
        return _stamped_insert(table), None
    q = dialect.identifier_preparer.quote
    columns = [*names, *TRACKING_COLUMNS]
    sql = (
        f"INSERT INTO {q(table.name)} ({', '.join(q(c) for c in columns)})"
        f" VALUES ({', '.join('?' * len(columns))})"
    )
    # Column by column: one pass per column over the batch, no Python loop per value
    # where the column's type has no processing.
    got = list(map(operator.itemgetter(*names), rows))  # one name: its values
    by_column = zip(*got, strict=True) if len(names) > 1 else [got]
    values = [
        _bound(list(column), table.c[n].type, dialect)
        for n, column in zip(names, by_column, strict=True)
    ]
    versions = range(first, first + len(rows))
    stamp = [now] * len(rows)
    return sql, list(zip(*values, versions, stamp, stamp, versions, strict=True))


def _bound(values: list[Any], kind: sa.types.TypeEngine[Any], dialect: sa.Dialect) -> list[Any]:
    """``values`` as the column type's bind processor gives them to the driver."""
    proc = kind._cached_bind_processor(dialect)
    if proc is None:
        return values
    impl = kind.dialect_impl(dialect)
    if (
        isinstance(impl, SQLITE_DATETIME)
        and impl._storage_format == SQLITE_DATETIME._storage_format
    ):
        # SQLAlchemy's format, '2027-03-01 09:00:00.000000', is what isoformat() writes
        # in C for a naive datetime; anything else goes through the processor.
        return [
            v.isoformat(" ", "microseconds")
            if type(v) is dt.datetime and v.tzinfo is None
            else proc(v)
            for v in values
        ]
    return list(map(proc, values))


def _json_path(column: sa.Column[Any]) -> sa.sql.elements.TextClause:
    """``'$.name'`` as literal SQL text (a JSON path to a column's old value)."""
    return sa.text("'$." + column.name.replace("'", "''").replace('"', "") + "'")


#: Page cache of a writing transaction, in KiB (SQLite's default is 2,000). A push of
#: a few thousand rows touches pages all over a table's indexes: in the default cache
#: they are read again and again (an insert into the example's ``appointment`` costs
#: 23 µs a row against 12 µs in this one). The connection the writers take turns on
#: keeps it (``_KeptWriter``); a pooled one that writes gives it back when done.
WRITE_CACHE_KIB = 32_000


#: WAL file size from which checkpoints are due: SQLite's own threshold (1000 pages of 4 KiB).
CHECKPOINT_BYTES = 4_096_000
#: Least time between two checkpoints of the thread.
CHECKPOINT_EVERY_S = 0.25
#: A due checkpoint waits for this long without a commit (a burst of pushes ends)...
CHECKPOINT_QUIET_S = 0.3
#: ...but no longer than this, nor once the WAL is this large (the WAL stays bounded).
CHECKPOINT_WAIT_S = 2.0
CHECKPOINT_HARD_BYTES = 64 << 20


class Checkpointer:
    """Copies the WAL back into the database file in a thread, not in a writer's commit.

    SQLite's automatic checkpoint runs inside the commit that fills the WAL past
    1000 pages: that request waits for the copy and its fsyncs. The store's writers
    turn it off for their transaction and poke this instead; it runs the same
    PASSIVE checkpoint (never blocks readers or writers, syncs the WAL before
    copying: durability is unchanged) on its own connection, at most every
    ``CHECKPOINT_EVERY_S`` while writes come. The thread ends after a second
    without work and starts again when needed.

    A due checkpoint waits for a quiet moment (``CHECKPOINT_QUIET_S`` without a
    commit): during a burst of pushes the copy's reads, writes and fsyncs would
    compete with the burst's own commits for the disk and the cores. It waits at
    most ``CHECKPOINT_WAIT_S``, and not at all once the WAL has reached
    ``CHECKPOINT_HARD_BYTES``, so under steady writes the WAL stays bounded.
    """

    def __init__(self, path: str) -> None:
        self.wal = path + "-wal"
        self.path = path
        self.runs = 0  # checkpoints run by the thread
        self._lock = threading.Lock()
        self._due = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_commit = 0.0  # time.monotonic() of the last poke

    def poke(self) -> None:
        """A writer committed: checkpoint soon if the WAL is large."""
        self._last_commit = time.monotonic()
        try:
            size = os.path.getsize(self.wal)
        except OSError:
            return
        if size < CHECKPOINT_BYTES:
            return
        with self._lock:
            self._due.set()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="syncunit-checkpoint", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            if not self._due.wait(1.0):
                with self._lock:
                    if not self._due.is_set():
                        self._thread = None
                        return
            self._due.clear()
            self._wait_for_quiet()
            try:
                # mode=rw: a database removed meanwhile is not made again, empty
                uri = "file:" + urllib.parse.quote(self.path) + "?mode=rw"
                conn = sqlite3.connect(uri, uri=True, timeout=30)
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                finally:
                    conn.close()
                self.runs += 1
            except Exception as exc:  # the next poke retries
                log.warning("background WAL checkpoint of %s failed: %s", self.path, exc)
            time.sleep(CHECKPOINT_EVERY_S)

    def _wait_for_quiet(self) -> None:
        """Return once no commit came for ``CHECKPOINT_QUIET_S``, after at most
        ``CHECKPOINT_WAIT_S``, or at once when the WAL reached ``CHECKPOINT_HARD_BYTES``."""
        deadline = time.monotonic() + CHECKPOINT_WAIT_S
        while True:
            now = time.monotonic()
            quiet_at = self._last_commit + CHECKPOINT_QUIET_S
            if now >= quiet_at or now >= deadline:
                return
            try:
                if os.path.getsize(self.wal) >= CHECKPOINT_HARD_BYTES:
                    return
            except OSError:
                return
            time.sleep(min(quiet_at, deadline, now + 0.05) - now)  # the WAL grows meanwhile


#: How long a writer waits for the writers queued before it in this process: SQLite's
#: busy timeout (``configure_engine``), after which SQLite's own wait decides.
WRITER_WAIT_S = 30.0


class _KeptWriter:
    """The connection this process's writers take turns on, kept open between them.

    Its page cache (``WRITE_CACHE_KIB``) stays warm from one write to the next: a
    pooled connection given back shrank its cache to the default, so the next writer
    read every page it touched again (about 14,000 reads of 4 KiB for a push of
    10,000 appointments in six requests). One connection, one cache: a few tens of
    MB held by the process once it has written. SQLite drops the cache itself when
    another connection or process wrote meanwhile.
    """

    def __init__(self, engine: Engine, checkpointer: Checkpointer | None, *, keep: bool) -> None:
        self.engine = engine
        self.checkpointer = checkpointer
        #: A database in memory (one per thread's connection) or named by a URI keeps none.
        self.keeps = keep
        self.lock = threading.Lock()
        self.conn: Connection | None = None
        self.poke = False  # whether commits wake the checkpointer (see ``_WriteTxn``)
        self._stale = False  # the engine was disposed while a writer held the connection
        event.listen(engine, "engine_disposed", self._disposed)

    def take(self) -> Connection:
        """The kept connection (opened on first use; ``give_back`` closed a broken one);
        the caller holds ``lock``."""
        if self.conn is None:
            self.conn, _, auto = _open_writer(self.engine, self.checkpointer)
            self.poke = auto > 0
        return self.conn

    def give_back(self, ended: bool) -> None:
        """A writer is done with the connection; ``ended``: its transaction ended as
        it should. Otherwise (or once invalidated, or the engine disposed meanwhile)
        the connection is closed: the next writer opens another."""
        conn = self.conn
        if not ended or self._stale or conn is None or conn.invalidated or conn.in_transaction():
            self.drop()

    def drop(self) -> None:
        """Close the kept connection for good (the next writer opens another)."""
        conn, self.conn, self._stale = self.conn, None, False
        if conn is not None:
            with contextlib.suppress(Exception):  # a broken one: nothing left to close
                conn.invalidate()  # closes the driver's connection now, not when collected
            conn.close()

    def _disposed(self, _engine: Engine) -> None:
        if self.lock.acquire(blocking=False):
            try:
                self.drop()
            finally:
                self.lock.release()
        else:  # in a writer's hands: it drops it when done
            self._stale = True


def _open_writer(engine: Engine, checkpointer: Checkpointer | None) -> tuple[Connection, int, int]:
    """A connection set up for a writer: its page cache grown to ``WRITE_CACHE_KIB`` if
    smaller, automatic checkpoints off when ``checkpointer`` makes them. Returns it with
    the cache size and the automatic checkpoint threshold it had (above 0: commits
    wake the checkpointer instead)."""
    conn = engine.connect().execution_options(syncunit_write=True)
    try:
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        cache = int(dbapi.execute("PRAGMA cache_size").fetchone()[0])
        if -WRITE_CACHE_KIB < cache < 0:  # a size in KiB below ours (not in pages)
            dbapi.execute(f"PRAGMA cache_size = {-WRITE_CACHE_KIB}")
        auto = 0
        if checkpointer is not None:
            auto = int(dbapi.execute("PRAGMA wal_autocheckpoint").fetchone()[0])
            if auto > 0:
                dbapi.execute("PRAGMA wal_autocheckpoint = 0")  # the checkpointer's job
    except BaseException:
        conn.close()
        raise
    return conn, cache, auto


class _WriteTxn:
    """Context manager: a connection in a ``BEGIN IMMEDIATE`` transaction, with a
    larger page cache: the kept writer's (``_KeptWriter``) when this writer's turn
    came, else a pooled connection's for the transaction's length."""

    def __init__(self, kept: _KeptWriter) -> None:
        self.kept = kept
        self._queued = False

    def __enter__(self) -> Connection:
        # Writers of this process queue here and start the moment the one before
        # commits; SQLite's own wait (the busy handler) sleeps in growing steps.
        # After as long as SQLite would wait, go on and let SQLite decide.
        self._queued = self.kept.lock.acquire(timeout=WRITER_WAIT_S)
        try:
            return self._begin()
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self._queued:
            self.kept.lock.release()
            self._queued = False

    def _begin(self) -> Connection:
        if self._queued and self.kept.keeps:
            self._conn = self.kept.take()
            self._poke, self._restore = self.kept.poke, None
        else:
            self._conn, cache, auto = _open_writer(self.kept.engine, self.kept.checkpointer)
            dbapi = self._conn.connection.dbapi_connection
            assert dbapi is not None
            self._poke, self._restore = auto > 0, (dbapi, cache, auto)
        try:
            self._conn.begin()  # BEGIN IMMEDIATE: SQLite's write lock, or its busy timeout
        except BaseException:
            self._let_go(ended=True)
            raise
        return self._conn

    def _let_go(self, ended: bool) -> None:
        """The connection back: the kept one stays (unless broken), a pooled one gets its
        own settings back and goes to the pool."""
        if self._restore is None:
            self.kept.give_back(ended)
            return
        dbapi, cache, auto = self._restore
        # A broken connection is discarded, not pooled: nothing to give back then.
        with contextlib.suppress(self._conn.dialect.loaded_dbapi.Error):
            dbapi.execute(f"PRAGMA cache_size = {cache}")
            if auto > 0:
                dbapi.execute(f"PRAGMA wal_autocheckpoint = {auto}")
        self._conn.close()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        ended = False
        try:
            # The transaction in progress: ``continue_anew`` may have begun another.
            if exc_type is None:
                self._conn.commit()
                if self.kept.checkpointer is not None and self._poke:
                    self.kept.checkpointer.poke()
            else:
                self._conn.rollback()
            ended = True
        finally:
            self._let_go(ended)
            self._release()
