"""``ServerStore`` for SQLite, the embedded default.

SQLite serializes writers, so a global counter bumped inside each writing
transaction (``syncunit_clock``) is commit-ordered: any version a reader sees
in its snapshot was committed before every version above it. The cursor hands
out the counter's value read in the same snapshot as the rows.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.schema import CreateIndex, CreateTable
from sqlalchemy.sql.elements import ColumnElement

from syncunit.server.store import ServerStore, meta
from syncunit.units import CREATED_AT, TRACKING_COLUMNS, UPDATED_AT, VERSION, SyncSchema

_NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
_CLOCK_DDL = [
    "CREATE TABLE IF NOT EXISTS syncunit_clock"
    " (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO syncunit_clock (id, version) VALUES (1, 0)",
]
_BUMP = "UPDATE syncunit_clock SET version = version + 1 WHERE id = 1"
_CURRENT = "(SELECT version FROM syncunit_clock WHERE id = 1)"


def _bookkeeping_ddl(engine: Engine) -> list[str]:
    """syncunit's own tables (tombstones, facts, ...) and an epoch: the triggers need them."""
    out: list[str] = []
    for table in meta.sorted_tables:
        out.append(str(CreateTable(table, if_not_exists=True).compile(engine)).strip())
        for index in sorted(table.indexes, key=lambda ix: str(ix.name)):
            out.append(str(CreateIndex(index, if_not_exists=True).compile(engine)).strip())
    out.append(
        "INSERT OR IGNORE INTO syncunit_meta (key, value)"
        " VALUES ('epoch', lower(hex(randomblob(8))))"
    )
    return out


def configure_engine(engine: Engine) -> Engine:
    """Make pysqlite transactions real: BEGIN on begin (IMMEDIATE for writes), WAL, timeouts."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("syncunit_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


#: Column types whose stored SQLite values travel as they are.
_RAW_TYPES = (sa.Integer, sa.Float, sa.String, sa.Date, sa.Boolean)


class SQLiteStore(ServerStore):
    """Change tracking with triggers and a global clock table."""

    dialect = "sqlite"

    @classmethod
    def from_url(cls, url: str) -> SQLiteStore:
        engine = sa.create_engine(url, connect_args={"check_same_thread": False})
        return cls(engine)

    def __init__(self, engine: Engine) -> None:
        super().__init__(configure_engine(engine))

    def write(self) -> Any:
        return _WriteTxn(self.engine)

    def watermark(self, conn: Connection) -> int:
        return int(conn.exec_driver_sql(_CURRENT[1:-1]).scalar_one())

    def old_value(self, old: ColumnElement[Any], column: sa.Column[Any]) -> ColumnElement[Any]:
        return sa.type_coerce(sa.func.json_extract(old, f"$.{column.name}"), column.type)

    def raw_column(self, expr: ColumnElement[Any]) -> ColumnElement[Any] | None:
        kind = expr.type
        if isinstance(kind, sa.types.TypeDecorator | sa.Uuid | sa.JSON | sa.Enum):
            return None  # custom processing
        if isinstance(kind, sa.DateTime):
            # SQLAlchemy stores '2027-03-01 09:00:00.000000'; isoformat() writes
            # '2027-03-01T09:00:00': the same text, made by SQLite in C.
            text = sa.type_coerce(expr, sa.String)
            return sa.func.replace(sa.func.replace(text, " ", "T"), ".000000", "")
        if isinstance(kind, _RAW_TYPES) and (
            not isinstance(kind, sa.Numeric) or isinstance(kind, sa.Integer | sa.Float)
        ):
            return expr
        return None

    def insert_new(self, table: sa.Table) -> sa.Insert:
        pk = list(table.primary_key.columns)
        return sqlite_insert(table).on_conflict_do_nothing(index_elements=pk)

    def greatest(self, *values: ColumnElement[Any]) -> ColumnElement[Any]:
        parts = [sa.func.coalesce(v, 0) for v in values]
        return parts[0] if len(parts) == 1 else sa.func.max(*parts)

    def tracking_ddl(self, schema: SyncSchema, *, existing: bool = True) -> list[str]:
        q = self.engine.dialect.identifier_preparer.quote
        inspector = sa.inspect(self.engine) if existing else None
        scope = schema.scope_columns()
        out = [*_bookkeeping_ddl(self.engine), *_CLOCK_DDL]
        for table in schema.tracked_tables():
            t = q(table.name)
            have: set[str] = set()
            if inspector is not None:
                if not inspector.has_table(table.name):
                    raise ValueError(
                        f"table {table.name!r} does not exist: create it before installing tracking"
                    )
                have = {c["name"] for c in inspector.get_columns(table.name)}
            for col, typ in zip(TRACKING_COLUMNS, ("INTEGER", "TEXT", "TEXT"), strict=True):
                if col not in have:
                    out.append(f"ALTER TABLE {t} ADD COLUMN {col} {typ}")
            out.append(
                f"CREATE INDEX IF NOT EXISTS {q('ix_' + table.name + '_' + VERSION)}"
                f" ON {t} ({VERSION})"
            )
            for suffix in ("bi", "ai", "au", "ad"):
                out.append(f"DROP TRIGGER IF EXISTS {q('syncunit_' + table.name + '_' + suffix)}")
            # Rows written before tracking existed get one version, so a first sync sees them.
            out.append(f"{_BUMP} AND EXISTS (SELECT 1 FROM {t} WHERE {VERSION} IS NULL)")
            out.append(
                f"UPDATE {t} SET {VERSION} = {_CURRENT}, {CREATED_AT} = {_NOW},"
                f" {UPDATED_AT} = {_NOW} WHERE {VERSION} IS NULL"
            )
            out.extend(self._triggers(table, sorted(scope.get(table.name, set()))))
        return out

    def _triggers(self, table: sa.Table, scope_cols: list[str]) -> list[str]:
        q = self.engine.dialect.identifier_preparer.quote
        t = q(table.name)
        pk = q(next(iter(table.primary_key.columns)).name)
        image_cols = [next(iter(table.primary_key.columns)).name, *scope_cols]
        image = ", ".join(f"'{c}', OLD.{q(c)}" for c in dict.fromkeys(image_cols))
        moved = " OR ".join(f"OLD.{q(c)} IS NOT NEW.{q(c)}" for c in dict.fromkeys(image_cols))
        name = table.name
        stamp = f"UPDATE {t} SET {VERSION} = {_CURRENT}, {UPDATED_AT} = {_NOW}"
        current = ", ".join(f"'{c}', {t}.{q(c)}" for c in dict.fromkeys(image_cols))
        return [
            # INSERT OR REPLACE deletes the row it replaces without firing delete
            # triggers (unless recursive_triggers is on): record its old scope first.
            f"CREATE TRIGGER {q('syncunit_' + name + '_bi')} BEFORE INSERT ON {t}"
            f" WHEN EXISTS (SELECT 1 FROM {t} WHERE {pk} = NEW.{pk}) BEGIN {_BUMP};"
            f" INSERT INTO syncunit_tombstones (table_name, version, kind, old, at)"
            f" SELECT '{name}', {_CURRENT}, 'move', json_object({current}), {_NOW}"
            f" FROM {t} WHERE {pk} = NEW.{pk}; END",
            f"CREATE TRIGGER {q('syncunit_' + name + '_ai')} AFTER INSERT ON {t} BEGIN {_BUMP};"
            f" {stamp}, {CREATED_AT} = COALESCE(NEW.{CREATED_AT}, {_NOW})"
            f" WHERE {pk} = NEW.{pk}; END",
            f"CREATE TRIGGER {q('syncunit_' + name + '_au')} AFTER UPDATE ON {t}"
            f" WHEN NEW.{VERSION} IS OLD.{VERSION} BEGIN {_BUMP};"
            f" INSERT INTO syncunit_tombstones (table_name, version, kind, old, at)"
            f" SELECT '{name}', {_CURRENT}, 'move', json_object({image}), {_NOW}"
            f" WHERE {moved};"
            f" {stamp} WHERE {pk} = NEW.{pk}; END",
            f"CREATE TRIGGER {q('syncunit_' + name + '_ad')} AFTER DELETE ON {t} BEGIN {_BUMP};"
            f" INSERT INTO syncunit_tombstones (table_name, version, kind, old, at)"
            f" VALUES ('{name}', {_CURRENT}, 'delete', json_object({image}), {_NOW}); END",
        ]


class _WriteTxn:
    """Context manager: a connection in a ``BEGIN IMMEDIATE`` transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def __enter__(self) -> Connection:
        self._conn = self.engine.connect().execution_options(syncunit_write=True)
        self._txn = self._conn.begin()
        return self._conn

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self._txn.commit()
            else:
                self._txn.rollback()
        finally:
            self._conn.close()
