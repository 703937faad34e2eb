"""Installing syncunit in a server database: numbered migrations, then tracking, by version.

Backend-neutral; each ``ServerStore`` supplies only its dialect's statements
(``migration_ddl``, ``table_tracking_ddl``, ``tracking_intact``, ``clock_sql``).

**Migrations.** syncunit's own tables (``syncunit_meta``, tombstones, clients,
mutations) change through the numbered steps of ``MIGRATIONS``; the number
reached is the fact ``schema-version``. A database made before numbering (0.1)
has ``syncunit_meta`` but no such fact: it is at version 1.

**Tracking definition.** Per tracked table, what the triggers do: the key
columns, the columns a tombstone keeps (key and scope columns, the *image*),
and the unique column sets an ``INSERT OR REPLACE`` can conflict on. It is
stored as the fact ``tracking:<table>``: its hash, for each image column
the version since which tombstones keep it, and (``created``) the version since
which the triggers stamp each new row's creation. A stream's cursor is valid
only if everything it needs has been kept since the cursor's version (see
``tracking_horizon``): a definition that changed resets exactly the streams
whose removals the old tombstones cannot prove. Only streams whose filter reads
a joined table need creation stamps, and a cursor from before they were kept
resets only if its window holds tombstones of the stream's tables.

**Install.** A start with the same definition reads and changes nothing. Any
other start takes the store's write lock, re-reads, migrates and re-installs
the tables whose definition changed, all in one transaction: several servers
starting together serialize there, and all but the first find nothing to do.

**A newer database.** A database a newer syncunit migrated (``schema-version``
above ``LATEST``) is refused with ``DatabaseTooNew`` before anything is read
or written: this version cannot judge that version's tracking (it would take
it for tampered, re-install its own and reset every stream, and the newer one
would do the same back at its next start).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.schema import CreateIndex, CreateTable

from syncunit.errors import DatabaseTooNew
from syncunit.server.shape import tables_read
from syncunit.units import Stream, SyncSchema

if TYPE_CHECKING:
    from syncunit.server.store import ServerStore

SCHEMA_VERSION_FACT = "schema-version"
TRACKING_PREFIX = "tracking:"
#: Per table, the version of its last TRUNCATE (PostgreSQL): the streams reading it
#: re-download from below it. Inside the tracking facts' key range, so a change of it
#: is seen where they are read.
TRUNCATED_PREFIX = TRACKING_PREFIX + "truncated:"

# -- numbered migrations of syncunit's own tables -------------------------------------------

#: The layout of 0.1 (migration 1), frozen here: later migrations change it step by step.
_v1 = sa.MetaData()
sa.Table(
    "syncunit_meta",
    _v1,
    sa.Column("key", sa.String, primary_key=True),
    sa.Column("value", sa.String, nullable=False),
)
sa.Table(
    "syncunit_tombstones",
    _v1,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("table_name", sa.String, nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("kind", sa.String, nullable=False),
    sa.Column("old", sa.Text, nullable=False),
    sa.Column("at", sa.String, nullable=False),
    sa.Index("ix_syncunit_tombstones_table_version", "table_name", "version"),
)
sa.Table(
    "syncunit_clients",
    _v1,
    sa.Column("client_id", sa.String, primary_key=True),
    sa.Column("principal", sa.String, nullable=False),
    sa.Column("last_seq", sa.BigInteger, nullable=False, default=0),
    sa.Column("last_seen", sa.String, nullable=True),
)
sa.Table(
    "syncunit_mutations",
    _v1,
    sa.Column("client_id", sa.String, primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("mutation_id", sa.String, nullable=False),
    sa.Column("result", sa.LargeBinary, nullable=False),
)


def _create(metadata: sa.MetaData, dialect: sa.Dialect) -> list[str]:
    out: list[str] = []
    for table in metadata.sorted_tables:
        out.append(str(CreateTable(table, if_not_exists=True).compile(dialect=dialect)).strip())
        for index in sorted(table.indexes, key=lambda ix: str(ix.name)):
            out.append(str(CreateIndex(index, if_not_exists=True).compile(dialect=dialect)).strip())
    return out


def _v2_tombstone_age_index(dialect: sa.Dialect) -> list[str]:
    # Pruning by age (``prune_tombstones_before``) reads tombstones by ``at``.
    from syncunit.server.store import tombstones

    index = next(ix for ix in tombstones.indexes if ix.name == "ix_syncunit_tombstones_at")
    return [str(CreateIndex(index, if_not_exists=True).compile(dialect=dialect)).strip()]


@dataclass(frozen=True)
class Migration:
    """One numbered step: backend-neutral statements, then the store's ``migration_ddl``."""

    number: int
    title: str
    statements: Callable[[sa.Dialect], list[str]]


MIGRATIONS = [
    Migration(1, "syncunit's tables as of 0.1", lambda d: _create(_v1, d)),
    Migration(2, "index tombstones by age", _v2_tombstone_age_index),
    # The store's part only: PostgreSQL's TRUNCATE trigger writes its table's horizon.
    Migration(3, "a TRUNCATE resets the streams of its table only", lambda d: []),
    # The store's part only: PostgreSQL's triggers fire also for writers in replica mode.
    Migration(4, "tracking triggers fire for every writer", lambda d: []),
    # The store's part only: PostgreSQL's tombstones keep the snapshot of their write.
    Migration(5, "tombstones keep what had committed when they were written", lambda d: []),
]
LATEST = MIGRATIONS[-1].number


def schema_version(conn: Connection) -> int:
    """The migration a database has reached (0: syncunit was never installed)."""
    if not sa.inspect(conn).has_table("syncunit_meta"):
        return 0
    from syncunit.server.store import meta_table

    value = conn.execute(
        sa.select(meta_table.c.value).where(meta_table.c.key == SCHEMA_VERSION_FACT)
    ).scalar()
    return 1 if value is None else int(value)


def check_not_newer(current: int) -> None:
    """Raise ``DatabaseTooNew`` if migration ``current`` is one this version does not know."""
    if current > LATEST:
        raise DatabaseTooNew(
            f"the database is at syncunit migration {current}, made by a newer syncunit than"
            f" this one (which knows migrations up to {LATEST}); nothing was changed."
            " Serve it with the newer version: stop servers of older versions before"
            " upgrading across a migration (see docs/deploy.md, upgrades)"
        )


def migration_ddl(store: ServerStore, current: int) -> list[str]:
    """The statements that bring a database from migration ``current`` to ``LATEST``."""
    out: list[str] = []
    for m in MIGRATIONS:
        if m.number > current:
            out += m.statements(store.engine.dialect)
            out += store.migration_ddl(m.number)
    if current < LATEST:
        out += _fact_sql(SCHEMA_VERSION_FACT, str(LATEST))
    return out


# -- the tracking definition ----------------------------------------------------------------


@dataclass(frozen=True)
class TableTracking:
    """What the triggers of one table do: the backend-neutral half of their definition."""

    table: str
    key: tuple[str, ...]
    image: tuple[str, ...]  # key columns first, then the scope columns, sorted
    uniques: tuple[tuple[str, ...], ...]  # column sets besides the key an upsert can hit
    format: str  # the store's trigger format (``dialect/version``)

    @property
    def hash(self) -> str:
        raw = json.dumps([self.format, self.key, self.image, self.uniques])
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def record(self, since: Mapping[str, int | str], created: int | str) -> dict[str, Any]:
        return {
            "hash": self.hash,
            "key": list(self.key),
            "uniques": [list(u) for u in self.uniques],
            "format": self.format,
            "columns": {c: since[c] for c in self.image},
            "created": created,
        }

    @classmethod
    def from_record(cls, table: str, rec: Mapping[str, Any]) -> TableTracking:
        key = tuple(rec["key"])
        return cls(
            table,
            key,
            tuple(rec["columns"]),
            tuple(tuple(u) for u in rec["uniques"]),
            str(rec["format"]),
        )


def _key_of(table: sa.Table) -> tuple[str, ...]:
    return tuple(c.name for c in table.primary_key.columns)


def _uniques(conn: Connection | None, table: sa.Table) -> tuple[tuple[str, ...], ...]:
    """Unique column sets other than the key: from the database, else from ``table``."""
    key = set(_key_of(table))
    sets: set[tuple[str, ...]] = set()
    if conn is not None:
        insp = sa.inspect(conn)
        for uc in insp.get_unique_constraints(table.name):
            sets.add(tuple(str(c) for c in uc["column_names"]))
        for ix in insp.get_indexes(table.name):
            if ix.get("unique") and all(c is not None for c in ix["column_names"]):
                sets.add(tuple(str(c) for c in ix["column_names"]))
    else:
        for cons in table.constraints:
            if isinstance(cons, sa.UniqueConstraint):
                sets.add(tuple(c.name for c in cons.columns))
        for index in table.indexes:
            if index.unique:
                sets.add(tuple(c.name for c in index.columns))
        for col in table.columns:
            if col.unique:
                sets.add((col.name,))
    return tuple(sorted(s for s in sets if s and set(s) != key))


def table_tracking(
    store: ServerStore, schema: SyncSchema, table: sa.Table, conn: Connection | None
) -> TableTracking:
    key = _key_of(table)
    scope = sorted(schema.scope_columns().get(table.name, set()) - set(key))
    return TableTracking(
        table.name, key, (*key, *scope), _uniques(conn, table), store.tracking_format
    )


def stream_needs(stream: Stream) -> dict[str, set[str]]:
    """Per table of a delta stream, the tombstone columns its removals read."""
    scope = stream.scope_columns()
    return {t.name: set(_key_of(t)) | scope.get(t.name, set()) for t in stream.tables}


def needs_creation(stream: Stream) -> bool:
    """Whether ``stream``'s removals read creation stamps: when its filter reads a joined
    table, a current row is paired with old states only if it existed then."""
    return any(t is not stream.base for t in tables_read(stream.where))


def tracking_horizon(facts: Mapping[str, str], stream: Stream) -> int | None:
    """The lowest cursor version whose removals tombstones can prove for ``stream``.

    None when a column the stream needs is not kept at all (the tracking
    installed was made for another definition of the streams). A TRUNCATE of
    one of its tables (no tombstones) raises it to that TRUNCATE's version.
    """
    horizon = max((int(facts.get(TRUNCATED_PREFIX + t.name, 0)) for t in stream.tables), default=0)
    for table, cols in stream_needs(stream).items():
        raw = facts.get(TRACKING_PREFIX + table)
        if raw is None:
            return None
        kept = json.loads(raw)["columns"]
        for c in cols:
            if c not in kept:
                return None
            horizon = max(horizon, int(kept[c]))
    return horizon


#: A version above any: creation stamps that were never made.
NEVER = 2**62


def creation_horizon(facts: Mapping[str, str], stream: Stream) -> int | None:
    """The version since which every table of ``stream`` stamps creations (``NEVER``
    if one does not); None when the stream's removals read no stamps.

    Rows created before it have none and count as older than any tombstone: a
    cursor below it stays valid unless tombstones of its tables lie in between
    (``ServerStore.creation_proven``), where that could name a row created later.
    """
    if not needs_creation(stream):
        return None
    horizon = 0
    for table in stream.tables:
        raw = facts.get(TRACKING_PREFIX + table.name)
        created = None if raw is None else json.loads(raw).get("created")
        horizon = max(horizon, NEVER if created is None else int(created))
    return horizon


def _fact_sql(key: str, value_sql: str, *, literal: bool = True) -> list[str]:
    value = "'" + value_sql.replace("'", "''") + "'" if literal else value_sql
    k = key.replace("'", "''")
    return [
        f"DELETE FROM syncunit_meta WHERE key = '{k}'",
        f"INSERT INTO syncunit_meta (key, value) VALUES ('{k}', {value})",
    ]


def _record_sql(
    store: ServerStore, t: TableTracking, since: Mapping[str, int | None], created: int | None
) -> list[str]:
    """Statements writing ``t``'s fact; a None ``since`` becomes the clock when they run."""
    mark = "@@since@@"
    rec = t.record(
        {c: (mark if v is None else v) for c, v in since.items()},
        mark if created is None else created,
    )
    text = json.dumps(rec, sort_keys=True).replace("'", "''")
    value = "'" + text.replace(f'"{mark}"', f"' || {store.clock_sql()} || '") + "'"
    return _fact_sql(TRACKING_PREFIX + t.table, value, literal=False)


def plan(
    store: ServerStore, schema: SyncSchema, conn: Connection | None
) -> tuple[int, list[tuple[TableTracking, str]]]:
    """The migration reached and the tables whose tracking must be (re)installed, with why.

    ``conn`` None plans for a database that has none of syncunit yet.
    """
    current = schema_version(conn) if conn is not None else 0
    check_not_newer(current)
    facts = _facts(conn) if conn is not None and current else {}
    out: list[tuple[TableTracking, str]] = []
    for table in schema.tracked_tables():
        if conn is not None and not sa.inspect(conn).has_table(table.name):
            raise ValueError(
                f"table {table.name!r} does not exist: create it before installing tracking"
            )
        want = table_tracking(store, schema, table, conn)
        raw = facts.get(TRACKING_PREFIX + table.name)
        if raw is None:
            out.append((want, "new"))
        elif json.loads(raw).get("hash") != want.hash:
            out.append((want, "changed"))
        elif conn is not None and not store.tracking_intact(conn, want):
            out.append((want, "tampered"))
    return current, out


def _facts(conn: Connection) -> dict[str, str]:
    from syncunit.server.store import meta_table

    rows = conn.execute(sa.select(meta_table.c.key, meta_table.c.value))
    return {str(k): str(v) for k, v in rows}


def install_ddl(
    store: ServerStore, schema: SyncSchema, conn: Connection | None, *, clock: int | None = None
) -> list[str]:
    """Every statement an install runs: pending migrations, then each table to (re)install.

    Columns a tombstone already kept under an intact previous definition keep
    their version; every other kept column counts from ``clock`` (the clock when
    the statements run, if None).
    """
    current, todo = plan(store, schema, conn)
    out = migration_ddl(store, current)
    facts = _facts(conn) if conn is not None and current else {}
    if todo and current and clock is None:
        out += store.advance_clock_sql()  # see ``install``
    for want, why in todo:
        since: dict[str, int | None] = dict.fromkeys(want.image, clock)
        created = clock  # creation stamps: kept from a previous format that made them
        raw = facts.get(TRACKING_PREFIX + want.table)
        if raw is not None and why == "changed":
            rec = json.loads(raw)
            assert conn is not None
            if store.tracking_intact(conn, TableTracking.from_record(want.table, rec)):
                for c, v in rec["columns"].items():
                    if c in since:
                        since[c] = int(v)
                if rec.get("created") is not None:
                    created = int(rec["created"])
        elif raw is None and conn is not None:
            # Tracked by a version that kept no facts (0.1): its triggers say what they kept.
            for c in store.legacy_image(conn, want.table) or ():
                if c in since:
                    since[c] = 0
        table = _schema_table(schema, want.table)
        have: set[str] = set()
        if conn is not None:
            have = {c["name"] for c in sa.inspect(conn).get_columns(want.table)}
        out += store.table_tracking_ddl(table, want, have)
        out += _record_sql(store, want, since, created)
    return out


def _schema_table(schema: SyncSchema, name: str) -> sa.Table:
    return next(t for t in schema.tracked_tables() if t.name == name)


def install(store: ServerStore, schema: SyncSchema) -> bool:
    """Migrate and install tracking for ``schema``; False when there was nothing to do."""
    with store.engine.connect() as conn, conn.begin():
        current, todo = plan(store, schema, conn)
    if current == LATEST and not todo:
        return False
    with store.write() as conn:
        store.lock_for_install(conn)
        # Above every version handed out: a cursor from before this install never
        # counts as covered by columns kept from now on.
        clock = store.advance_clock(conn) if schema_version(conn) else 0
        for stmt in install_ddl(store, schema, conn, clock=clock):
            conn.exec_driver_sql(stmt)
    return True
