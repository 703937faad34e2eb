"""``ServerStore`` for PostgreSQL (psycopg 3), the production server.

PostgreSQL runs writers concurrently: a transaction that took a number first
may commit last, so a sequence or a timestamp handed out as a cursor skips
rows for ever. Instead a trigger stamps every written row with its
transaction's id (``pg_current_xact_id()``), and the cursor handed out is the
*watermark* ``pg_snapshot_xmin(pg_current_snapshot()) - 1``, read as the first
statement of the pull's REPEATABLE READ READ ONLY transaction: every
transaction at or below it has ended, so each of its rows is visible in that
snapshot or never will be. Rows above it that are already visible are sent
too, and again next time: duplicates, never gaps. It works unchanged on a hot
standby.

The one cost: a transaction that stays open anywhere in the cluster (or a
forgotten prepared transaction) holds the watermark back, so deltas wait for
it. ``watermark_lag()`` measures it.

Pushes run SERIALIZABLE, so business rules that read before they write (no
double booking) hold across server processes as they do on SQLite, where
writers are serialized; a push that loses a serialization race is retried.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import itertools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg.abc import AdaptContext, Buffer
from psycopg.adapt import Loader
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.elements import ColumnElement

from syncunit.errors import DatabaseRestored
from syncunit.server.migrations import TRUNCATED_PREFIX, TableTracking, schema_version
from syncunit.server.store import ServerStore, WatermarkLag, check_keep_versions, tombstones
from syncunit.units import (
    CREATED_AT,
    CREATED_STAMP,
    TRACKING_COLUMNS,
    UPDATED_AT,
    VERSION,
    SyncSchema,
)

__all__ = ["PostgresStore", "configure_engine", "postgres_engine"]

_XID = "pg_current_xact_id()::text::bigint"
_NOW = """to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"""
_WATERMARK = "pg_snapshot_xmin(pg_current_snapshot())::text::bigint - 1"
WATERMARK_SQL = f"SELECT {_WATERMARK}"
#: Said first in a read transaction (a ``SET`` takes no snapshot: the watermark's
#: statement still does): no parallel plans in it. A delta's candidate keys are read
#: whole, a few index entries per part; starting parallel workers alone costs
#: milliseconds (a hash join of 300,000 doctors against a handful of tombstones took
#: 7.5 ms in a Gather that found nothing), and a server answering many devices has no
#: idle cores to give them. Rows themselves (first copies, a delta's rows, removals)
#: come through a server-side cursor, which PostgreSQL never runs in parallel.
NO_PARALLEL_SQL = "SET LOCAL max_parallel_workers_per_gather = 0"
#: A row's creation stamp: the snapshot it was written in. A transaction visible in it
#: had committed before the row existed (``created_before``); a single number (the
#: watermark) would hold back behind any transaction open anywhere at the time.
_SNAPSHOT = "pg_current_snapshot()::text"


#: Who this database is: the cluster's system identifier and the database's oid.
#: A restore with pg_restore (a new database) or into another cluster changes it.
_IDENTITY_SQL = (
    "SELECT (SELECT system_identifier FROM pg_control_system())::text"
    " || ':' || (SELECT oid FROM pg_database WHERE datname = current_database())::text"
)


def _restored(why: str) -> str:
    return (
        f"this database looks restored from a backup or copied: {why}. Serving it"
        " would let clients skip or resurrect rows. Run 'syncunit renew-epoch"
        " TARGET --database URL' (ServerStore.renew_epoch()) once: every client"
        " then re-downloads on its next sync."
    )


#: The advisory lock that serializes installs (any constant; "sync" in ASCII).
INSTALL_LOCK = 0x73796E63
#: The advisory lock a push retried several times takes: such pushes run one at a time.
PUSH_LOCK = 0x73796E64
#: Tombstones deleted per transaction when pruning (short transactions, small locks).
PRUNE_BATCH = 5000

#: TRUNCATE removes rows without row triggers: every cursor older than this transaction
#: of a stream that reads the table must re-download. The version goes into the fact
#: ``TRUNCATED_PREFIX + table`` (``ServerStore.stream_horizon`` reads it); before
#: migration 3 it went into the global horizon, which reset every stream. The argument,
#: if any, names the tracked table (a partition's trigger names its partitioned table).
_TRUNCATED = f"""CREATE OR REPLACE FUNCTION syncunit_truncated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO syncunit_meta (key, value)
  VALUES ('{TRUNCATED_PREFIX}' || COALESCE(TG_ARGV[0], TG_TABLE_NAME), {_XID}::text)
  ON CONFLICT (key) DO UPDATE SET value = GREATEST(syncunit_meta.value::bigint,
                                                  EXCLUDED.value::bigint)::text;
  RETURN NULL;
END $$"""

#: A partitioned table's row triggers are cloned onto its partitions, but its TRUNCATE
#: trigger is not, and a TRUNCATE of one partition fires only that partition's: each
#: partition that exists when tracking is installed gets one naming the tracked table.
_TRUNCATE_PARTITIONS = """CREATE OR REPLACE FUNCTION
  syncunit_truncate_partitions(parent regclass, trig name, logical text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  p regclass;
BEGIN
  FOR p IN SELECT relid FROM pg_partition_tree(parent) WHERE relid <> parent LOOP
    -- (no format(): its placeholders would be taken for the driver's)
    EXECUTE 'DROP TRIGGER IF EXISTS ' || quote_ident(trig) || ' ON ' || p::text;
    EXECUTE 'CREATE TRIGGER ' || quote_ident(trig) || ' AFTER TRUNCATE ON ' || p::text
      || ' FOR EACH STATEMENT EXECUTE FUNCTION syncunit_truncated('
      || quote_literal(logical) || ')';
    EXECUTE 'ALTER TABLE ' || p::text || ' ENABLE ALWAYS TRIGGER ' || quote_ident(trig);
  END LOOP;
END $$"""

#: Migration 4: the triggers of existing installs fire ALWAYS, also under
#: ``session_replication_role = replica`` (logical replication's apply workers, restores
#: that turn triggers off that way), which skips triggers enabled the ordinary way; and
#: the partitions of a tracked partitioned table get their TRUNCATE trigger.
_ENABLE_ALWAYS = """DO $$
DECLARE
  r record;
BEGIN
  FOR r IN
    SELECT t.tgrelid::regclass AS rel, t.tgname
    FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
    WHERE NOT t.tgisinternal AND t.tgenabled = 'O'
      AND p.proname IN ('syncunit_stamp', 'syncunit_tombstone', 'syncunit_created',
                        'syncunit_truncated')
  LOOP
    EXECUTE 'ALTER TABLE ' || r.rel::text || ' ENABLE ALWAYS TRIGGER ' || quote_ident(r.tgname);
  END LOOP;
  FOR r IN
    SELECT t.tgrelid::regclass AS rel, t.tgname, c.relname
    FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
    WHERE NOT t.tgisinternal AND c.relkind = 'p' AND t.tgnargs = 0
      AND t.tgfoid = 'syncunit_truncated'::regproc
  LOOP
    PERFORM syncunit_truncate_partitions(r.rel, r.tgname, r.relname::text);
  END LOOP;
END $$"""

#: The key of a tombstone's image under which it keeps the snapshot its write was made in
#: (since migration 5): what had committed by then (``PostgresStore.changed_after``).
WRITTEN_IN = "syncunit_written_in"
#: How removals read it: as a kept column of the image (``old_value``).
_WRITTEN_IN_COLUMN: sa.Column[Any] = sa.Column(WRITTEN_IN, sa.Text)

#: Deletes, and updates of a key or scope column: the old values of those columns, and
#: the snapshot of the write. TG_ARGV: the logical table name, then the columns to keep.
#: (In a function that writes, each statement under READ COMMITTED takes a new snapshot:
#: the one kept is taken after the row was written, so it shows the row's previous
#: writer as committed, since a writer of a row waits for the one before it. Under
#: REPEATABLE READ a writer that cannot see the row's previous writer fails instead.)
_TOMBSTONE = f"""CREATE OR REPLACE FUNCTION syncunit_tombstone() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  old_row jsonb := to_jsonb(OLD);
  image jsonb := '{{}}'::jsonb;
BEGIN
  FOR i IN 1 .. TG_NARGS - 1 LOOP
    image := image || jsonb_build_object(TG_ARGV[i], old_row -> TG_ARGV[i]);
  END LOOP;
  image := image || jsonb_build_object('{WRITTEN_IN}', {_SNAPSHOT});
  INSERT INTO syncunit_tombstones (table_name, version, kind, old, at)
  VALUES (TG_ARGV[0], {_XID}, CASE TG_OP WHEN 'DELETE' THEN 'delete' ELSE 'move' END,
          image::text, {_NOW});
  RETURN NULL;
END $$"""

_FUNCTIONS = [
    # Every insert and update, whoever writes: the writing transaction's id.
    f"""CREATE OR REPLACE FUNCTION syncunit_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.{VERSION} := {_XID};
  NEW.{UPDATED_AT} := {_NOW};
  IF TG_OP = 'INSERT' THEN
    NEW.{CREATED_AT} := COALESCE(NEW.{CREATED_AT}, NEW.{UPDATED_AT});
    IF TG_NARGS > 0 THEN  -- 'created': the table has creation stamps (see syncunit_created)
      NEW.{CREATED_STAMP} := {_SNAPSHOT};
    END IF;
  END IF;
  RETURN NEW;
END $$""",
    _TOMBSTONE,
    # A row's creation stamp on an update (the insert's is the stamp's): the snapshot
    # when the key changed (TG_ARGV: the key columns), else the value it had.
    f"""CREATE OR REPLACE FUNCTION syncunit_created() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  created boolean := false;
BEGIN
  FOR i IN 0 .. TG_NARGS - 1 LOOP
    created := created
      OR (to_jsonb(OLD) -> TG_ARGV[i]) IS DISTINCT FROM (to_jsonb(NEW) -> TG_ARGV[i]);
  END LOOP;
  IF created THEN
    NEW.{CREATED_STAMP} := {_SNAPSHOT};
  ELSE
    NEW.{CREATED_STAMP} := OLD.{CREATED_STAMP};
  END IF;
  RETURN NEW;
END $$""",
    _TRUNCATED,
    _TRUNCATE_PARTITIONS,
]


def postgres_engine(url: str | sa.URL, **kw: Any) -> Engine:
    """An engine on psycopg 3 for ``url`` (``postgresql://`` or ``postgres://`` accepted).

    ``?prepare_threshold=none`` in the URL turns off server-side prepared
    statements (for PgBouncer in transaction pooling before version 1.21).
    """
    u = sa.make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    connect_args: dict[str, Any] = dict(kw.pop("connect_args", {}))
    if "prepare_threshold" in u.query:
        raw = str(u.query["prepare_threshold"]).lower()
        connect_args["prepare_threshold"] = None if raw in ("none", "off", "") else int(raw)
        u = u.difference_update_query(["prepare_threshold"])
    kw.setdefault("pool_pre_ping", True)
    engine = sa.create_engine(u, connect_args=connect_args, **kw)
    sa.event.listen(engine, "handle_error", _close_cursor_of_dead_connection)
    return engine


#: Said once on each connection syncunit uses, whatever the database's (or the server
#: environment's ``PGTZ``) settings: date-times with time zone come in UTC, so a key
#: comes back in the form a device wrote it (``+00:00``) and a value without an offset
#: means UTC, as on SQLite; dates in ISO, the text ``_BeyondPython`` hands on.
_SESSION = ("SET TimeZone TO 'UTC'", "SET DateStyle TO 'ISO'")
#: Marks a pooled connection (``ConnectionRecord.info``, one DBAPI connection's) done.
_CONFIGURED = "syncunit_session"
#: The types whose values psycopg's loaders refuse when Python cannot hold them.
_TIME_TYPES = ("date", "timestamp", "timestamptz", "time", "timetz")


def configure_engine(engine: Engine) -> Engine:
    """Set up every connection ``engine`` hands out for syncunit (see ``_SESSION``, and
    ``_BeyondPython``): new ones and those pooled already, at their next checkout.

    ``PostgresStore`` calls it on its engines, an application's own included; that
    engine's other users get the same settings. Idempotent.
    """
    if not sa.event.contains(engine, "checkout", _on_checkout):
        sa.event.listen(engine, "checkout", _on_checkout)
    return engine


def _on_checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
    if record.info.get(_CONFIGURED):
        return
    with dbapi_conn.cursor() as cur:
        for sql in _SESSION:
            cur.execute(sql)
    dbapi_conn.commit()  # a SET rolled back would be undone
    adapters = dbapi_conn.adapters
    for name in _TIME_TYPES:
        oid = adapters.types[name].oid
        own = adapters.get_loader(oid, psycopg.pq.Format.TEXT)
        if own is not None and not issubclass(own, _BeyondPython):
            adapters.register_loader(oid, _beyond_python(own))
    record.info[_CONFIGURED] = True


class _BeyondPython(Loader):
    """A date or time value that Python cannot hold (``infinity``, ``-infinity``, a
    year BC or past 9999, ``24:00:00``) as PostgreSQL's text: psycopg's own loader
    (``own``) raises for it, which would fail every pull of a row holding one. The
    text travels to devices, and a push may write it back (``coerce``'s
    ``beyond_python``)."""

    own: type[Loader]

    def __init__(self, oid: int, context: AdaptContext | None = None) -> None:
        super().__init__(oid, context)
        self._own = self.own(oid, context)

    def load(self, data: Buffer) -> Any:
        try:
            return self._own.load(data)
        except psycopg.DataError:
            return bytes(data).decode()


@functools.cache
def _beyond_python(own: type[Loader]) -> type[Loader]:
    """``_BeyondPython`` around ``own`` (one class per loader, for every connection)."""
    return type(f"BeyondPython{own.__name__}", (_BeyondPython,), {"own": own})


def _close_cursor_of_dead_connection(ctx: sa.engine.ExceptionContext) -> None:
    """Close the cursor of a statement whose connection died (a failover, a server
    restart): SQLAlchemy only invalidates the connection then, and psycopg would
    warn about the cursor when it is collected. The statement's error goes on."""
    # (ExceptionContext.cursor is documented but not set: the execution context has it.)
    cursor = getattr(ctx.execution_context, "cursor", None)
    if ctx.is_disconnect and cursor is not None:
        with suppress(Exception):  # the connection is gone either way
            cursor.close()


class PostgresStore(ServerStore):
    """Change tracking with transaction-id stamps and a snapshot watermark."""

    dialect = "postgresql"

    def __init__(self, engine: Engine, *, replicas: Sequence[Engine] = ()) -> None:
        super().__init__(configure_engine(engine))
        #: Streaming standbys that may serve pulls (the watermark works there unchanged).
        self.replicas = [configure_engine(r) for r in replicas]
        self._next_replica = itertools.count()

    @classmethod
    def from_url(cls, url: str, *, replicas: Sequence[str] = ()) -> PostgresStore:
        """``?replica=host:port`` in the URL (repeatable) adds read replicas of the same
        database, user and password."""
        u = sa.make_url(url)
        raw = u.query.get("replica")
        hosts = [] if raw is None else [raw] if isinstance(raw, str) else list(raw)
        u = u.difference_update_query(["replica"])
        urls: list[str | sa.URL] = list(replicas)
        for h in hosts:
            host, _, port = h.partition(":")
            urls.append(u.set(host=host, port=int(port) if port else u.port))
        return cls(postgres_engine(u), replicas=[postgres_engine(r) for r in urls])

    # -- transactions ----------------------------------------------------------------

    @contextmanager
    def snapshot(
        self,
        *,
        replica: bool = False,
        at_least: int = 0,
        scope: Mapping[str, Any] | None = None,
    ) -> Iterator[tuple[Connection, int]]:
        engines = [self.engine]
        if replica and self.replicas:
            n = next(self._next_replica)
            k = len(self.replicas)
            engines = [self.replicas[(n + i) % k] for i in range(k)] + engines
        for engine in engines:
            with engine.connect() as conn:
                conn = conn.execution_options(
                    isolation_level="REPEATABLE READ", postgresql_readonly=True
                )
                with conn.begin():
                    conn.exec_driver_sql(NO_PARALLEL_SQL)
                    # The first query: it takes the snapshot the watermark belongs to.
                    watermark = self.watermark(conn)
                    if watermark >= at_least or engine is self.engine:
                        yield conn, watermark
                        return
            # This replica has not replayed the client's newest cursor yet: the next one.
        raise AssertionError("unreachable")  # pragma: no cover

    def current_version(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.exec_driver_sql(WATERMARK_SQL).scalar_one())

    @contextmanager
    def write(self, *, serializable: bool = False) -> Iterator[Connection]:
        # READ COMMITTED otherwise: an install waits for a lock, then must see what the
        # process before it installed (a serializable snapshot would predate the lock).
        level = "SERIALIZABLE" if serializable else "READ COMMITTED"
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level=level)
            with conn.begin():
                yield conn

    def take_turns(self, conn: Connection) -> None:
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PUSH_LOCK})")

    text_holds_nul = False
    native_decimals_and_zones = True
    times_beyond_python = True

    def retryable(self, exc: BaseException) -> bool:
        orig = getattr(exc, "orig", None)
        return getattr(orig, "sqlstate", None) in ("40001", "40P01")

    def watermark(self, conn: Connection) -> int:
        return int(conn.exec_driver_sql(WATERMARK_SQL).scalar_one())

    # -- queries ---------------------------------------------------------------------

    pins_each_key = True

    def old_value(self, old: ColumnElement[Any], column: sa.Column[Any]) -> ColumnElement[Any]:
        # The key is written into the SQL (not bound), so that the expression is the one
        # of the index ``tombstone_index_ddl`` makes, in a generic plan as in a custom one.
        key = sa.literal_column(_literal(column.name), sa.Text)
        return sa.cast(sa.cast(old, JSONB).op("->>", return_type=sa.Text)(key), column.type)

    def old_value_lookup(
        self, ts: Any, column: sa.Column[Any]
    ) -> tuple[ColumnElement[Any], list[ColumnElement[bool]]]:
        # A primary key is looked up after a row's own tombstones (a few, each in turn):
        # the index on (table name, version) serves it. Another column (the scope's
        # pinned columns) is looked up by value among every tombstone since the
        # cursor: through ``_old_in_table``, that only its index serves.
        if column.primary_key:
            table = column.table
            assert isinstance(table, sa.Table)
            return self.old_value(ts.c.old, column), [ts.c.table_name == table.name]
        return _old_in_table(self, ts.c.table_name, ts.c.old, column), []

    def tombstone_index_ddl(self, column: sa.Column[Any]) -> list[str]:
        if column.primary_key:
            return []
        table = column.table
        assert isinstance(table, sa.Table)
        name = f"ix_syncunit_tombstones_{table.name}_{column.name}"
        if len(name) > 63:
            name = name[:54] + "_" + hashlib.sha1(name.encode()).hexdigest()[:8]
        expr = _old_in_table(self, sa.column("table_name", sa.String), sa.column("old"), column)
        sql = expr.compile(dialect=self.engine.dialect)
        q = self.engine.dialect.identifier_preparer.quote
        return [f"CREATE INDEX IF NOT EXISTS {q(name)} ON syncunit_tombstones (({sql}), version)"]

    def insert_new(self, table: sa.Table) -> sa.Insert:
        pk = list(table.primary_key.columns)
        stmt = pg_insert(table).on_conflict_do_nothing(index_elements=pk)
        return stmt.execution_options(preserve_rowcount=True)  # else an INSERT's rowcount is -1

    def greatest(self, *values: ColumnElement[Any]) -> ColumnElement[Any]:
        parts = [sa.func.coalesce(v, 0) for v in values]
        return parts[0] if len(parts) == 1 else sa.func.greatest(*parts)

    def created_before(self, stamp: ColumnElement[Any], at: ColumnElement[Any]) -> Any:
        # Committed before the row's snapshot: the row came after. Anything else (also
        # a transaction concurrent with the row's) cannot be ordered: the row counts.
        xid = sa.cast(sa.cast(at, sa.Text), _PgType("xid8"))
        visible = sa.func.pg_visible_in_snapshot(xid, sa.cast(stamp, _PgType("pg_snapshot")))
        return sa.or_(stamp.is_(None), ~visible)

    def changed_after(
        self, ts: Any, at: ColumnElement[Any], below: ColumnElement[Any] | None
    ) -> list[ColumnElement[bool]]:
        # Transaction ids are not commit order: a write with a later id may have committed
        # before the one at ``at``, and the row's state just before that one is then the
        # state after it. The snapshot a tombstone keeps orders its write after the one at
        # ``at`` if that one is visible in it (had committed); if not, the two ran
        # concurrently and either may have committed first: the states after it are tried
        # too (at worst that names a key, never misses a removal). Writers of one row wait
        # for each other, so its write came before the state recorded at ``below`` unless
        # that one's write is visible in it. A tombstone from before migration 5 keeps no
        # snapshot: ids order it. Only ids in the range the index reads ([at, below)) are
        # looked at: a tombstone outside it is taken as ruling nothing out, which can only
        # name more.
        written = sa.cast(self.old_value(ts.c.old, _WRITTEN_IN_COLUMN), _PgType("pg_snapshot"))

        def committed(version: ColumnElement[Any]) -> ColumnElement[bool]:
            xid = sa.cast(sa.cast(version, sa.Text), _PgType("xid8"))
            return sa.func.pg_visible_in_snapshot(xid, written)

        ordered = [sa.or_(ts.c.version == at, committed(at))]
        if below is not None:
            ordered.append(~committed(below))
        by_id = super().changed_after(ts, at, below)
        return [*by_id, sa.or_(written.is_(None), sa.and_(*ordered))]

    # -- installing tracking (the neutral part is ``migrations``) ----------------------

    tracking_format = "postgresql/2"

    def migration_ddl(self, number: int) -> list[str]:
        if number == 1:
            return [
                "INSERT INTO syncunit_meta (key, value) VALUES"
                " ('epoch', substr(md5(random()::text || clock_timestamp()::text), 1, 16))"
                " ON CONFLICT (key) DO NOTHING"
            ]
        if number == 3:
            return [_TRUNCATED]
        if number == 4:
            return [_TRUNCATED, _TRUNCATE_PARTITIONS, _ENABLE_ALWAYS]
        if number == 5:
            return [_TOMBSTONE]
        return []

    def lock_for_install(self, conn: Connection) -> None:
        # Several server processes starting at once take their turn here.
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({INSTALL_LOCK})")

    def advance_clock_sql(self) -> list[str]:
        return [f"SELECT {_XID}"]

    def advance_clock(self, conn: Connection) -> int:
        """This transaction's own id: above every watermark handed out before it commits
        (one handed out while it runs is below it, since it is still open)."""
        return int(conn.exec_driver_sql(f"SELECT {_XID}").scalar_one())

    def clock_sql(self) -> str:
        return f"({_XID})"

    def table_tracking_ddl(
        self, table: sa.Table, tracking: TableTracking, have: set[str]
    ) -> list[str]:
        q = self.engine.dialect.identifier_preparer.quote
        t = q(table.name)
        out = list(_FUNCTIONS)
        for col, typ in zip(TRACKING_COLUMNS, ("BIGINT", "TEXT", "TEXT", "TEXT"), strict=True):
            if col not in have:
                out.append(f"ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {col} {typ}")
        out.append(
            f"CREATE INDEX IF NOT EXISTS {q('ix_' + table.name + '_' + VERSION)} ON {t} ({VERSION})"
        )
        out += [f"DROP TRIGGER IF EXISTS {q(n)} ON {t}" for n in _trigger_names(tracking.table)]
        out.append(f"DROP TRIGGER IF EXISTS {q(_created_trigger(tracking.table))} ON {t}")
        out += self._triggers(tracking)
        triggers = [*_trigger_names(tracking.table), _created_trigger(tracking.table)]
        out += [f"ALTER TABLE {t} ENABLE ALWAYS TRIGGER {q(n)}" for n in triggers]
        out.append(
            f"SELECT syncunit_truncate_partitions({_literal(t)}::regclass,"
            f" {_literal(_trigger_names(tracking.table)[3])}, {_literal(tracking.table)})"
        )
        # Rows written before tracking existed get one version, so a first sync sees them.
        out.append(f"UPDATE {t} SET {VERSION} = {_XID} WHERE {VERSION} IS NULL")
        return out

    def _triggers(self, tr: TableTracking) -> list[str]:
        """The five triggers of a tracked table.

        * before each insert and update: stamp the writing transaction's id (also
          over a stale version an ORM writes back) and the timestamps;
        * after each delete, and each update that changes a kept column (key or
          scope): a tombstone with the old values of the kept columns; the
          function takes the logical table name and those columns as arguments;
        * after a TRUNCATE: the table's horizon moves to this transaction, so
          every cursor from before of a stream reading it re-downloads (no row
          triggers fire);
        * creation: the stamp writes the snapshot in ``syncunit_created_stamp``
          on insert (its argument says the table has the column); one more
          trigger, only when an update changes the key or that column, writes
          it again for a new key and otherwise keeps it, whatever the writer
          wrote. Removals use it to tell a row created later.

        ``INSERT ... ON CONFLICT DO UPDATE`` fires the update triggers; ``DO
        NOTHING`` writes nothing, so it leaves nothing.
        """
        q = self.engine.dialect.identifier_preparer.quote
        t = q(tr.table)
        # Tombstones keep the creation stamp too (removals pair only states that coexisted).
        args = ", ".join(_literal(c) for c in (tr.table, *tr.image, CREATED_STAMP))
        moved = " OR ".join(f"OLD.{q(c)} IS DISTINCT FROM NEW.{q(c)}" for c in tr.image)
        stamp, ad, au, tt = (q(n) for n in _trigger_names(tr.table))
        return [
            f"CREATE TRIGGER {stamp} BEFORE INSERT OR UPDATE ON {t}"
            " FOR EACH ROW EXECUTE FUNCTION syncunit_stamp('created')",
            f"CREATE TRIGGER {ad} AFTER DELETE ON {t}"
            f" FOR EACH ROW EXECUTE FUNCTION syncunit_tombstone({args})",
            f"CREATE TRIGGER {au} AFTER UPDATE ON {t} FOR EACH ROW"
            f" WHEN ({moved}) EXECUTE FUNCTION syncunit_tombstone({args})",
            f"CREATE TRIGGER {tt} AFTER TRUNCATE ON {t}"
            " FOR EACH STATEMENT EXECUTE FUNCTION syncunit_truncated()",
            *self._created_triggers(tr),
        ]

    def _created_triggers(self, tr: TableTracking) -> list[str]:
        q = self.engine.dialect.identifier_preparer.quote
        t = q(tr.table)
        keys = ", ".join(_literal(c) for c in tr.key)
        c = CREATED_STAMP
        changed = " OR ".join(
            f"OLD.{x} IS DISTINCT FROM NEW.{x}" for x in (*(q(k) for k in tr.key), c)
        )
        on_update = q(_created_trigger(tr.table))
        return [
            f"CREATE TRIGGER {on_update} BEFORE UPDATE ON {t} FOR EACH ROW"
            f" WHEN ({changed}) EXECUTE FUNCTION syncunit_created({keys})",
        ]

    def tracking_intact(self, conn: Connection, tracking: TableTracking) -> bool:
        """Every trigger present and enabled ALWAYS (since migration 4; before it, enabled
        the ordinary way, which migration 4 changes), the tombstone ones keeping the same
        columns. A trigger disabled, or disabled and enabled again the ordinary way
        (``DISABLE TRIGGER ALL`` ... ``ENABLE TRIGGER ALL``), is not intact."""
        rows = conn.exec_driver_sql(
            "SELECT tgname, tgenabled, encode(tgargs, 'escape'), tgfoid::regproc::text"
            " FROM pg_trigger WHERE NOT tgisinternal AND tgrelid = to_regclass(%(t)s)",
            {"t": self.engine.dialect.identifier_preparer.quote(tracking.table)},
        ).all()
        found = {str(r[0]): r for r in rows}
        stamp, ad, au, tt = _trigger_names(tracking.table)
        kept = (*tracking.image, CREATED_STAMP)
        if tracking.format in _UNSTAMPED_FORMATS:
            kept = tracking.image
        args = "\\000".join((tracking.table, *kept)) + "\\000"
        want = {
            stamp: ("syncunit_stamp", ""),
            ad: ("syncunit_tombstone", args),
            au: ("syncunit_tombstone", args),
            tt: ("syncunit_truncated", ""),
        }
        if tracking.format not in _UNSTAMPED_FORMATS:
            want[stamp] = ("syncunit_stamp", "created\\000")
            keys = "\\000".join(tracking.key) + "\\000"
            want[_created_trigger(tracking.table)] = ("syncunit_created", keys)
        enabled = "A" if schema_version(conn) >= 4 else "AO"
        return all(
            name in found
            and found[name][1] in enabled  # not 'D', nor 'R' (only on replicas)
            and (str(found[name][3]), str(found[name][2])) == expected
            for name, expected in want.items()
        )

    def install(self, schema: SyncSchema) -> bool:
        """Install (or update) tracking, then refuse to serve a restored or copied database."""
        changed = super().install(schema)
        self.check_not_restored(record=changed)
        return changed

    # -- a restored database -----------------------------------------------------------

    def check_same_database(self, conn: Connection, facts: dict[str, str] | None = None) -> None:
        """Raise ``DatabaseRestored`` if ``conn``'s database is not the one tracking
        recorded: a database dropped and restored from a dump, or moved to another
        cluster, under a server that keeps running (or starts with ``install=False``).

        Asked in every pull and push (one small query): a connection kept open across
        the restore (PgBouncer's, to the pooler) may reach the restored database.
        ``facts``: the ones ``conn`` already read, if any.
        """
        identity = str(conn.exec_driver_sql(_IDENTITY_SQL).scalar_one())
        known = (self.facts(conn) if facts is None else facts).get("identity")
        if known is not None and known != identity:
            raise DatabaseRestored(_restored("it is another database than clients synced with"))

    def epoch_and_horizon(self, conn: Connection) -> tuple[str, int]:
        facts = self.facts(conn)
        self.check_same_database(conn, facts)
        return self.epoch_and_horizon_of(facts)

    def check_not_restored(self, *, record: bool = False) -> None:
        """Raise ``DatabaseRestored`` if this database is not the one cursors were made on.

        A restore (pg_restore into a new database, another cluster) changes the
        database's identity; one into a new cluster also leaves the watermark
        below the one recorded at the last install. Either way ``renew_epoch()``
        (the ``syncunit renew-epoch`` command) makes every client re-download.
        A start that finds its own database reads and writes nothing; ``record``
        (after an install changed something) notes the identity and watermark.
        """
        with self.engine.connect() as conn:
            facts = self.facts(conn)
            self.check_same_database(conn, facts)
            watermark = self.watermark(conn)
            conn.rollback()
        known, seen = facts.get("identity"), int(facts.get("watermark", "0"))
        if known is not None and watermark < seen:
            why = f"its watermark {watermark} is below the {seen} recorded before"
            raise DatabaseRestored(_restored(why))
        if record or known is None:
            self._record_identity()

    def _record_identity(self) -> None:
        with self.write() as conn:
            # Servers starting together on a fresh database would each find no identity
            # and insert it: one at a time, the later ones update what the first wrote.
            self.lock_for_install(conn)
            self._set_fact(conn, "identity", str(conn.exec_driver_sql(_IDENTITY_SQL).scalar_one()))
            self._set_fact(conn, "watermark", str(self.watermark(conn)))

    def renew_epoch(self) -> str:
        epoch = super().renew_epoch()
        self._record_identity()
        return epoch

    # -- pruning ---------------------------------------------------------------------

    def prune_tombstones(self, keep_versions: int) -> int:
        check_keep_versions(keep_versions)
        return self._prune(max(0, self.current_version() - keep_versions))

    def prune_tombstones_before(self, cutoff: dt.datetime) -> int:
        at = cutoff.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:23] + "Z"
        with self.engine.connect() as conn:
            old = sa.select(sa.func.max(tombstones.c.version)).where(tombstones.c.at < at)
            newest_old = int(conn.execute(old).scalar() or 0)
        # Never past the watermark: a write transaction older than the cutoff holds it
        # below tombstones recorded since, and a horizon above it would reset every
        # cursor handed out meanwhile (each sync a full download) until it ends.
        return self._prune(min(newest_old, self.current_version()))

    def _prune(self, horizon: int) -> int:
        """Raise the horizon first (older cursors reset), then delete in small transactions.

        Small batches keep each deleting transaction short, so pruning never
        holds the watermark (or locks) for long.
        """
        with self.engine.connect() as conn:
            self.check_not_newer(conn)  # before any write
            stored = int(self.facts(conn).get("horizon", "0"))
        if horizon > stored:  # no write (and no transaction id) when nothing moves
            with self.write() as conn:
                horizon = max(horizon, int(self.facts(conn).get("horizon", "0")))
                self._set_fact(conn, "horizon", str(horizon))
        horizon = max(horizon, stored)
        batch = (
            sa.select(tombstones.c.id)
            .where(tombstones.c.version <= horizon)
            .limit(PRUNE_BATCH)
            .scalar_subquery()
        )
        while True:
            with self.engine.begin() as conn:
                deleted = conn.execute(tombstones.delete().where(tombstones.c.id.in_(batch)))
            if deleted.rowcount < PRUNE_BATCH:
                return horizon

    # -- lag -------------------------------------------------------------------------

    def watermark_lag(self) -> WatermarkLag:
        """How far the watermark trails: open writing transactions hold it back."""
        with self.engine.connect() as conn:
            row = conn.exec_driver_sql(
                "SELECT pg_snapshot_xmin(s)::text::bigint - 1,"
                " pg_snapshot_xmax(s)::text::bigint - pg_snapshot_xmin(s)::text::bigint"
                " FROM pg_current_snapshot() AS s"
            ).one()
            holder = conn.exec_driver_sql(
                "SELECT extract(epoch FROM now() - xact_start)::float8,"
                " 'pid ' || pid || ' (' || coalesce(state, '?') || '): ' || left(query, 80)"
                " FROM pg_stat_activity WHERE backend_xid IS NOT NULL"
                " AND pid <> pg_backend_pid()"
                " UNION ALL"
                " SELECT extract(epoch FROM now() - prepared)::float8,"
                " 'prepared transaction ' || quote_literal(gid) FROM pg_prepared_xacts"
                " ORDER BY 1 DESC LIMIT 1"
            ).first()
        seconds, what = (float(holder[0]), str(holder[1])) if holder else (0.0, None)
        return WatermarkLag(int(row[0]), int(row[1]), seconds, what)


def _old_in_table(
    store: PostgresStore, table_name: Any, old: Any, column: sa.Column[Any]
) -> ColumnElement[Any]:
    """The old value of ``column`` in a tombstone of its table, NULL in any other's:
    the expression of that column's index on tombstones (and of its lookups). Cast
    only for the table's own tombstones, so that another table's value of a column
    with the same name (text where this one is a number, say) never fails it."""
    table = column.table
    assert isinstance(table, sa.Table)
    own = table_name == sa.literal_column(_literal(table.name), sa.String)
    return sa.case((own, store.old_value(old, column)))


class _PgType(sa.types.UserDefinedType[Any]):
    """A PostgreSQL type by name, for casts (``xid8``, ``pg_snapshot``)."""

    cache_ok = True

    def __init__(self, name: str) -> None:
        self.name = name

    def get_col_spec(self, **kw: Any) -> str:
        return self.name


def _trigger_names(table: str) -> tuple[str, str, str, str]:
    """Stamp, after-delete, after-update and truncate triggers of ``table``."""
    return tuple(f"syncunit_{table}_{s}" for s in ("stamp", "ad", "au", "tr"))  # type: ignore[return-value]


#: Trigger formats from before creation stamps (PostgreSQL's and Citus's first).
_UNSTAMPED_FORMATS = ("postgresql/1", "citus/1")


def _created_trigger(table: str) -> str:
    """The trigger stamping a row's creation again when an update changes its key."""
    return f"syncunit_{table}_recreated"


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
