"""The server's database access: one interface, one implementation per database.

``ServerStore`` owns everything that differs between databases: how changes are
tracked (columns, triggers, tombstones), which version is safe to hand out as a
cursor, and how transactions begin. Queries that are the same everywhere live in
``changes`` (delta reads) and ``push`` (mutations), written in SQLAlchemy Core.

Tracking adds to each tracked table:

* ``syncunit_version``: a server-assigned, ever-growing number, stamped by a
  trigger on every insert and update, whoever writes (the sync server, a
  backoffice app, plain SQL);
* ``syncunit_created_at`` / ``syncunit_updated_at``: timestamps for people;

and records deletes, and updates that change a column some stream filters or
joins on (a row may have left a scope), in ``syncunit_tombstones`` with the old
values of those columns.
"""

from __future__ import annotations

import abc
import dataclasses
import datetime as dt
import logging
import secrets
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.elements import ColumnElement

from syncunit.server.problems import TrackingMissing
from syncunit.server.shape import scope_indexes, tombstone_scope_columns
from syncunit.units import Stream, SyncSchema

log = logging.getLogger("syncunit.server")

if TYPE_CHECKING:
    from syncunit.server.migrations import TableTracking

meta = sa.MetaData()

#: Key/value facts about this database: its epoch (a random id made at install)
#: and the tombstone horizon (the highest version whose tombstones were pruned).
meta_table = sa.Table(
    "syncunit_meta",
    meta,
    sa.Column("key", sa.String, primary_key=True),
    sa.Column("value", sa.String, nullable=False),
)

tombstones = sa.Table(
    "syncunit_tombstones",
    meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("table_name", sa.String, nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("kind", sa.String, nullable=False),  # "delete" or "move"
    sa.Column("old", sa.Text, nullable=False),  # JSON: key and scope columns, old values
    sa.Column("at", sa.String, nullable=False),
    sa.Index("ix_syncunit_tombstones_table_version", "table_name", "version"),
    sa.Index("ix_syncunit_tombstones_at", "at"),
)

#: Per client: who it belongs to and the last mutation sequence number applied.
clients = sa.Table(
    "syncunit_clients",
    meta,
    sa.Column("client_id", sa.String, primary_key=True),
    sa.Column("principal", sa.String, nullable=False),
    sa.Column("last_seq", sa.BigInteger, nullable=False, default=0),
    sa.Column("last_seen", sa.String, nullable=True),
)

#: The result of every applied mutation, kept so a retried request gets the same answer.
mutation_log = sa.Table(
    "syncunit_mutations",
    meta,
    sa.Column("client_id", sa.String, primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("mutation_id", sa.String, nullable=False),
    sa.Column("result", sa.LargeBinary, nullable=False),
)


def _index_name(ddl: str) -> str:
    """The unquoted index name of a ``CREATE INDEX IF NOT EXISTS name ON ...`` statement."""
    return ddl.split(" IF NOT EXISTS ", 1)[1].split(" ON ", 1)[0].strip('"`')


_TRACKING_FACTS = (
    "SELECT key, value FROM syncunit_meta WHERE key >= 'tracking:' AND key < 'tracking;'"
    " ORDER BY key"
)


@dataclasses.dataclass(frozen=True)
class WatermarkLag:
    """How far open transactions hold deltas back (databases with concurrent writers).

    ``watermark``: the cursor handed out now; ``transactions``: transaction ids
    between it and the next to be assigned; ``seconds``: the age of the oldest
    open writing (or prepared) transaction, which holds it, 0 when none does;
    ``holder``: what that transaction is.
    """

    watermark: int
    transactions: int
    seconds: float
    holder: str | None


def check_keep_versions(keep_versions: int) -> None:
    """Refuse a negative count of versions to keep: it would move the tombstone horizon
    past the current version, and every client would re-download every delta stream."""
    if keep_versions < 0:
        raise ValueError(
            f"keep_versions must be 0 or more, not {keep_versions}: it counts the newest"
            " versions whose tombstones are kept (0 drops them all)"
        )


class ServerStore(abc.ABC):
    """Database-specific parts of the server. Subclass once per database."""

    dialect: str

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        #: Statements built once per stream (see ``changes``), keyed by their purpose.
        self.query_cache: dict[Any, Any] = {}
        self._horizons: dict[Any, tuple[int, int | None]] = {}

    # -- installing tracking (the neutral part is ``migrations``) ----------------------

    #: Names the trigger code: a new format re-installs every table's triggers.
    tracking_format: str

    def tracking_ddl(self, schema: SyncSchema, *, existing: bool = True) -> list[str]:
        """The statements that install tracking for ``schema``, in one transaction.

        With ``existing`` the database is inspected so only what is missing or
        changed is installed (and syncunit's own tables migrated); without it
        the DDL is for a database that has nothing of syncunit yet (for users
        who migrate with Alembic).
        """
        from syncunit.server.migrations import install_ddl

        if not existing:
            return install_ddl(self, schema, None)
        with self.engine.connect() as conn, conn.begin():
            return install_ddl(self, schema, conn)

    def install(self, schema: SyncSchema) -> bool:
        """Migrate syncunit's tables and install tracking for ``schema``.

        Idempotent: with the same definition it reads and writes nothing
        (returns False); otherwise everything happens in one transaction.
        """
        from syncunit.server.migrations import install

        changed = install(self, schema)
        return self.install_scope_indexes(schema) or changed

    def install_scope_indexes(self, schema: SyncSchema) -> bool:
        """Create the indexes deltas read the scope through, if any is missing (they
        depend on the streams' filters, not on tracking); False when none was."""
        missing = self.missing_scope_indexes(schema)
        if not missing:
            return False
        with self.write() as conn:
            # Servers starting together: PostgreSQL's CREATE INDEX IF NOT EXISTS can
            # still collide with one running elsewhere, so take turns and look again.
            self.lock_for_install(conn)
            have = self.index_names(conn)
            for ddl in missing:
                if _index_name(ddl) not in have:
                    conn.exec_driver_sql(ddl)
                    have.add(_index_name(ddl))
        return True

    def missing_scope_indexes(self, schema: SyncSchema) -> list[str]:
        """The statements of ``scope_index_ddl`` whose index the database lacks."""
        with self.engine.connect() as conn, conn.begin():
            have = self.index_names(conn)
        return [ddl for ddl in self.scope_index_ddl(schema) if _index_name(ddl) not in have]

    def check_not_newer(self, conn: Connection) -> None:
        """Raise ``DatabaseTooNew`` if a newer syncunit migrated this database: the
        maintenance writes (pruning, a new epoch, retracking) call it first."""
        from syncunit.server.migrations import check_not_newer, schema_version

        check_not_newer(schema_version(conn))

    def index_names(self, conn: Connection) -> set[str]:
        """The names of every index in the database."""
        inspector = sa.inspect(conn)
        with warnings.catch_warnings():  # expression indexes are not reflected: names are
            warnings.simplefilter("ignore", sa.exc.SAWarning)
            return {
                str(ix["name"])
                for t in inspector.get_table_names()
                for ix in inspector.get_indexes(t)
            }

    def lock_for_install(self, conn: Connection) -> None:
        """Serialize installs (``write()`` already does on databases with one writer)."""
        return None

    def migration_ddl(self, number: int) -> list[str]:
        """This database's own statements for migration ``number`` (after the neutral ones)."""
        return []

    @abc.abstractmethod
    def advance_clock_sql(self) -> list[str]:
        """Statements that take a version above every one handed out so far."""

    def advance_clock(self, conn: Connection) -> int:
        """Take a version above every one handed out so far (inside an install); return it."""
        for stmt in self.advance_clock_sql():
            conn.exec_driver_sql(stmt)
        return self.watermark(conn)

    @abc.abstractmethod
    def clock_sql(self) -> str:
        """A SQL expression for the current version, usable inside any statement."""

    @abc.abstractmethod
    def table_tracking_ddl(
        self, table: sa.Table, tracking: TableTracking, have: set[str]
    ) -> list[str]:
        """(Re)install ``tracking`` on ``table``, whose database columns are ``have``."""

    @abc.abstractmethod
    def tracking_intact(self, conn: Connection, tracking: TableTracking) -> bool:
        """Whether the triggers of ``tracking`` are installed and unaltered."""

    def legacy_image(self, conn: Connection, table: str) -> set[str] | None:
        """The columns tombstones kept under tracking installed before definitions were recorded."""
        return None

    def scope_index_ddl(self, schema: SyncSchema) -> list[str]:
        """``CREATE INDEX IF NOT EXISTS`` for the (scope column, version) indexes through
        which deltas find the changes in a client's scope (see ``shape.scope_indexes``)."""
        q = self.engine.dialect.identifier_preparer.quote
        streams = list(schema.streams.values())
        out = [
            f"CREATE INDEX IF NOT EXISTS {q(name)} ON {q(table.name)} ({', '.join(map(q, cols))})"
            for name, table, cols in scope_indexes(streams)
        ]
        for column in tombstone_scope_columns(streams):
            out += self.tombstone_index_ddl(column)
        # Columns of the same name in several tables may share one index (SQLite's is
        # on the old value by name): each statement once, in its first place.
        return list(dict.fromkeys(out))

    def old_value_lookup(
        self, ts: Any, column: sa.Column[Any]
    ) -> tuple[ColumnElement[Any], list[ColumnElement[bool]]]:
        """How to find ``ts``'s tombstones of ``column``'s table by an old value of
        ``column``: the expression to compare, and the conditions beside it that keep
        the tombstones of that table, written so that the index ``tombstone_index_ddl``
        makes serves the lookup (here: the table's name inside ``coalesce()``, which
        no index serves, so that the planner takes the one on (old value, version)
        rather than the one on (table name, version))."""
        table = column.table
        assert isinstance(table, sa.Table)
        of_table = sa.func.coalesce(ts.c.table_name, "") == table.name
        return self.old_value(ts.c.old, column), [of_table]

    def tombstone_index_ddl(self, column: sa.Column[Any]) -> list[str]:
        """An index on tombstones by the old value of ``column`` (and version), for the
        removals of streams whose filter pins that column's scope. None by default:
        removals then read every tombstone of the table since the cursor."""
        return []

    # -- reading -----------------------------------------------------------------

    #: Whether a delta reads the pinned scope's changed rows one pinned key at a time
    #: (``StreamShape.candidates``'s ``each_key``): PostgreSQL's planner, its statistics
    #: taken before a burst of writes elsewhere, walks every row changed since the
    #: cursor instead of seeking the scope's (lead, version) index.
    pins_each_key = False

    @contextmanager
    def snapshot(
        self,
        *,
        replica: bool = False,
        at_least: int = 0,
        scope: Mapping[str, Any] | None = None,
    ) -> Iterator[tuple[Connection, int]]:
        """A read transaction and the highest version safe to hand out within it.

        ``replica``: a read replica may serve it (a store with replicas uses one
        whose watermark has reached ``at_least``, the newest cursor of the
        request, and the primary otherwise). ``scope``: the principal's
        parameters (a sharded store reads the watermark of the tenant's node).
        """
        with self.engine.connect() as conn, conn.begin():
            yield conn, self.watermark(conn)

    def before_long_read(self, conn: Connection) -> None:
        """A read of many pages in a row (a first copy) starts in ``conn``'s transaction:
        a store may read them another way (SQLite maps the file until the connection
        goes back to its pool). Nothing by default."""
        return None

    def current_version(self) -> int:
        """The highest version safe to hand out now (one cheap query)."""
        with self.engine.connect() as conn, conn.begin():
            return self.watermark(conn)

    @abc.abstractmethod
    def watermark(self, conn: Connection) -> int:
        """Every change with a version at or below this is visible to ``conn``'s snapshot."""

    @abc.abstractmethod
    def old_value(self, old: ColumnElement[Any], column: sa.Column[Any]) -> ColumnElement[Any]:
        """Read ``column``'s old value out of a tombstone's JSON."""

    def raw_column(self, expr: ColumnElement[Any]) -> ColumnElement[Any] | None:
        """An expression whose raw DBAPI values already are the wire values of ``expr``.

        None (the default) means the column needs SQLAlchemy's type processing;
        when every column of a stream has a raw form, its rows are read straight
        from the DBAPI cursor.
        """
        return None

    def json_row(self, columns: Sequence[ColumnElement[Any]]) -> ColumnElement[Any] | None:
        """One row of raw columns (``raw_column``) as a JSON array the database writes.

        Its values must be exactly those the raw columns read: a value the JSON
        cannot carry exactly makes the query fail with an error ``json_row_refused``
        recognizes (the reader then reads the rest of the copy as tuples). None (the
        default): the store cannot, and rows are read as tuples.
        """
        return None

    def json_row_refused(self, exc: BaseException) -> bool:
        """Whether ``exc`` is ``json_row``'s refusal of a value it cannot carry exactly."""
        return False

    @abc.abstractmethod
    def insert_new(self, table: sa.Table) -> sa.Insert:
        """An INSERT that does nothing (rowcount 0) when the primary key exists."""

    #: Whether ``insert_new_rows`` changes the schema inside the transaction (the SQLite
    #: store sets insert triggers aside). SQLite then reads the whole schema again
    #: after every later savepoint rollback of that transaction, even when the change
    #: itself was rolled back: see ``continue_anew``.
    batch_changes_schema = False

    def continue_anew(self, conn: Connection) -> None:
        """Commit the write transaction of ``conn`` (from ``write``) and begin the next
        one on it, the connection still this process's writer. Only stores whose
        ``batch_changes_schema`` is true need it."""
        raise NotImplementedError(f"{type(self).__name__} writes in one transaction")

    def kept_connections(self) -> int:
        """Connections the store keeps checked out of its engine's pool between uses
        (the SQLite store's writer): 0 by default."""
        return 0

    def insert_new_rows(
        self, conn: Connection, table: sa.Table, rows: list[dict[str, Any]]
    ) -> None:
        """Insert ``rows`` (meant as new keys) as one plain ``INSERT``, tracked as the
        triggers would track them; raises the database's error (IntegrityError) if one
        cannot be inserted, a key that exists already included (never skip or replace
        it), and then leaves nothing of them behind in the caller's savepoint.

        By default the triggers track each row. A store may instead stamp the rows
        itself, set-based, inside the engine's own write transaction (as the SQLite
        store does; PostgreSQL keeps this default): the result must be what the
        triggers would have written.
        """
        conn.execute(table.insert(), rows)

    @abc.abstractmethod
    def greatest(self, *values: ColumnElement[Any]) -> ColumnElement[Any]:
        """The largest of several (nullable) integers."""

    def created_before(self, stamp: ColumnElement[Any], at: ColumnElement[Any]) -> Any:
        """Whether a row whose creation stamp is ``stamp`` existed just before the
        write that made tombstones at version ``at`` (a row without one did)."""
        return sa.or_(stamp.is_(None), stamp < at)

    def changed_after(
        self, ts: Any, at: ColumnElement[Any], below: ColumnElement[Any] | None
    ) -> list[ColumnElement[bool]]:
        """Conditions under which ``ts``, a tombstone of some row, records a change of
        that row made after the moment just before the write at version ``at`` and (when
        ``below`` is given) before the state its tombstone at ``below`` recorded: then
        that state (the current row, when ``below`` is None) was not the row's state at
        that moment. Here versions are the order of commits."""
        if below is None:
            return [ts.c.version >= at]
        return [ts.c.version >= at, ts.c.version < below]

    def least(self, *values: ColumnElement[Any]) -> ColumnElement[Any]:
        """The smallest of several (non-null) integers, as one flat expression."""
        return values[0] if len(values) == 1 else sa.func.least(*values)

    # -- writing -----------------------------------------------------------------

    @contextmanager
    def write(self, *, serializable: bool = False) -> Iterator[Connection]:
        """A write transaction that takes the write lock at once.

        ``serializable``: it reads what it decides on (a push: sequence numbers,
        business rules), so it must behave as if writers ran one at a time. Where
        they do (SQLite) every write transaction is; elsewhere it may fail with
        an error for which ``retryable`` is true, and is then run again.
        """
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def watermark_lag(self) -> WatermarkLag | None:
        """How far open transactions hold the watermark back; None where writers are
        serialized (SQLite), so nothing can."""
        return None

    def take_turns(self, conn: Connection) -> None:
        """Wait until no other transaction that called this is running (a push that
        lost several races runs alone among such pushes); no-op where writers
        already take turns."""
        return None

    #: Whether text columns hold the NUL character (U+0000). PostgreSQL's cannot: a
    #: pushed text value holding one is rejected (``invalid-value``), not written.
    text_holds_nul = True

    #: Whether decimals and zoned date-times come back as stored (``coerce_key``):
    #: SQLite's decimals of no declared scale come back with ten places, and its
    #: date-times without their zone.
    native_decimals_and_zones = False

    #: Whether date and time columns hold values Python's cannot (PostgreSQL's
    #: ``infinity``, years BC or past 9999, ``24:00:00``): they are read as the
    #: database's text, and a pushed value of that text is taken (``coerce``).
    times_beyond_python = False

    def retryable(self, exc: BaseException) -> bool:
        """Whether a write transaction that raised ``exc`` may simply be run again
        (it lost a serialization race or a deadlock; nothing of it was kept)."""
        return False

    # -- facts -------------------------------------------------------------------

    def facts(self, conn: Connection) -> dict[str, str]:
        rows = conn.execute(sa.select(meta_table.c.key, meta_table.c.value))
        return {str(k): str(v) for k, v in rows}

    def check_same_database(self, conn: Connection, facts: dict[str, str] | None = None) -> None:
        """Raise ``DatabaseRestored`` if ``conn`` reaches a database restored or copied
        since tracking recorded its identity (a store that can tell; this one cannot)."""
        return None

    def epoch_and_horizon(self, conn: Connection) -> tuple[str, int]:
        """The database's epoch and its tombstone horizon, as a cursor is checked against."""
        return self.epoch_and_horizon_of(self.facts(conn))

    @staticmethod
    def epoch_and_horizon_of(facts: dict[str, str]) -> tuple[str, int]:
        """``epoch_and_horizon`` from facts already read."""
        if "epoch" not in facts:
            raise TrackingMissing("tracking is not installed: call install() first")
        return facts["epoch"], int(facts.get("horizon", "0"))

    def stream_horizon(self, conn: Connection, stream: Stream) -> tuple[int, int | None]:
        """The oldest cursor version from which tombstones can prove ``stream``'s removals,
        and the version since which its tables stamp creations (None: not needed).

        Tracking's part of cursor validity: every column the stream's removals
        read must have been kept in tombstones since the cursor's version. A
        stream the installed tracking does not serve at all (another server's
        definition is installed) can only be copied whole: a horizon above any
        cursor. A cursor below the second version is checked by ``creation_proven``.
        """
        from syncunit.server.migrations import creation_horizon, tracking_horizon

        # A constant statement (no compiling), and the answer cached per fact values.
        facts = tuple(conn.exec_driver_sql(_TRACKING_FACTS).all())
        key = (stream.name, facts)
        limits = self._horizons.get(key)
        if limits is None:
            named = {str(k): str(v) for k, v in facts}
            found = tracking_horizon(named, stream)
            if found is None:
                log.warning("stream %r: tracking is installed for another definition", stream.name)
            limits = (2**62 if found is None else found, creation_horizon(named, stream))
            if len(self._horizons) > 1000:
                self._horizons.clear()
            self._horizons[key] = limits
        return limits

    def creation_proven(self, conn: Connection, stream: Stream, low: int, since: int) -> bool:
        """Whether a cursor at version ``low``, below ``since`` (when the stream's tables
        began to stamp creations, see ``stream_horizon``), keeps its removals exact.

        Rows created before the stamps were kept (an upgrade) have none: they are
        taken as older than any tombstone, which is exact unless a tombstone of
        the stream's tables lies between ``low`` and ``since``.
        """
        names = [t.name for t in stream.tables]
        between = sa.select(tombstones.c.id).where(
            tombstones.c.table_name.in_(names),
            tombstones.c.version > low,
            tombstones.c.version <= since,
        )
        return conn.execute(between.limit(1)).first() is None

    def prune_tombstones(self, keep_versions: int) -> int:
        """Delete tombstones older than the newest ``keep_versions`` versions.

        Returns the new horizon. Clients whose cursor is older than the horizon
        get a reset (a clean re-download) of the affected streams. A negative
        ``keep_versions`` is a ``ValueError``, and a database a newer syncunit
        migrated a ``DatabaseTooNew``: nothing is pruned.
        """
        check_keep_versions(keep_versions)
        with self.write() as conn:
            self.check_not_newer(conn)
            return self._prune_to(conn, max(0, self.watermark(conn) - keep_versions))

    def prune_tombstones_before(self, cutoff: dt.datetime) -> int:
        """Delete tombstones recorded before ``cutoff`` (a time, UTC); return the horizon."""
        at = cutoff.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:23] + "Z"
        with self.write() as conn:
            self.check_not_newer(conn)
            old = sa.select(sa.func.max(tombstones.c.version)).where(tombstones.c.at < at)
            newest_old = int(conn.execute(old).scalar() or 0)
            return self._prune_to(conn, min(newest_old, self.watermark(conn)))

    def _prune_to(self, conn: Connection, horizon: int) -> int:
        conn.execute(tombstones.delete().where(tombstones.c.version <= horizon))
        horizon = max(horizon, int(self.facts(conn).get("horizon", "0")))
        self._set_fact(conn, "horizon", str(horizon))
        return horizon

    def renew_epoch(self) -> str:
        """Give the database a new epoch, after restoring a backup.

        Every client's cursors reset (a clean re-download), and the push sequence
        of every client starts again from whatever it sends next: the restored
        database has forgotten mutations it had applied, which the clients then
        re-send if they still hold them. A database a newer syncunit migrated is
        refused (``DatabaseTooNew``) unchanged.
        """
        epoch = secrets.token_hex(8)
        with self.write() as conn:
            self.check_not_newer(conn)
            self._set_fact(conn, "epoch", epoch)
            self._set_fact(conn, "sequence-reset", epoch)
            conn.execute(clients.update().values(last_seq=-1))
            conn.execute(mutation_log.delete())
        return epoch

    def retrack(self, table: str) -> int:
        """Declare that ``table`` changed outside tracking; return the version recorded.

        For writes no trigger saw: triggers disabled by hand, a partition attached,
        detached, dropped or truncated on its own, a column rewritten by ``ALTER
        TABLE ... TYPE ... USING``. The table's horizon moves as a TRUNCATE moves
        it: every stream reading ``table`` copies afresh at its next sync, the
        others keep their cursors. Rows without a version (a partition attached
        with rows in it) get one. Run it once the untracked change has committed.
        A table syncunit does not track is a ``ValueError``, a database a newer
        syncunit migrated a ``DatabaseTooNew``: nothing changes.
        """
        from syncunit.server.migrations import TRACKING_PREFIX, TRUNCATED_PREFIX
        from syncunit.units import VERSION

        with self.write() as conn:
            self.check_not_newer(conn)
            facts = self.facts(conn)
            if TRACKING_PREFIX + table not in facts:
                tracked = sorted(
                    k.removeprefix(TRACKING_PREFIX)
                    for k in facts
                    if k.startswith(TRACKING_PREFIX) and not k.startswith(TRUNCATED_PREFIX)
                )
                raise ValueError(
                    f"table {table!r} is not tracked in this database: name one of"
                    f" {', '.join(tracked) or '(none: install tracking first)'}"
                )
            version = self.advance_clock(conn)
            unversioned = sa.table(table, sa.column(VERSION))
            conn.execute(
                unversioned.update()
                .where(unversioned.c[VERSION].is_(None))
                .values({VERSION: version})
            )
            key = TRUNCATED_PREFIX + table
            version = max(version, int(facts.get(key, "0")))
            self._set_fact(conn, key, str(version))
        return version

    def fact_made_once(self, key: str, make: Callable[[], str]) -> str:
        """The fact ``key``, recorded as ``make()`` by the first server that needs it.

        Servers starting together on a fresh database take turns (the install
        lock), so the later ones read what the first wrote instead of inserting it
        too. A server that finds it reads it without writing.
        """
        with self.engine.connect() as conn:
            value = self.facts(conn).get(key)
        if value is None:
            with self.write() as conn:
                self.lock_for_install(conn)
                value = self.facts(conn).get(key)
                if value is None:
                    value = make()
                    conn.execute(meta_table.insert().values(key=key, value=value))
        return value

    def _set_fact(self, conn: Connection, key: str, value: str) -> None:
        updated = conn.execute(
            meta_table.update().where(meta_table.c.key == key).values(value=value)
        )
        if updated.rowcount == 0:
            conn.execute(meta_table.insert().values(key=key, value=value))
