"""The client's local SQLite database: local tables, SyncProperties, cursors.

One ``sqlite3`` connection, one transaction primitive (``atomic()``, with
savepoints for nesting). The engine's own tables are prefixed ``syncunit_``:

* ``syncunit_local``: key/value facts (client id, the cached catalog);
* ``syncunit_sync_properties``: per unit, ``last_sync_on`` (for people) and the last result;
* ``syncunit_cursors``: per stream, the server's cursor (for the engine);

Local tables are created, and migrated when the catalog changes, from the
catalog's stream descriptions. Every chunk is applied in one transaction
together with its cursor, so an interrupted sync resumes where it stopped.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import sys
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from syncunit.client.outbox import DDL as OUTBOX_DDL
from syncunit.client.outbox import trigger_ddl
from syncunit.errors import LocalStoreError
from syncunit.protocol import Catalog, Chunk, StreamInfo, decode_catalog, encode_catalog

__all__ = ["LocalStore"]

SQL_TYPES = {
    "integer": "INTEGER",
    "boolean": "INTEGER",
    "real": "REAL",
    "blob": "BLOB",
}

_META_DDL = [
    "CREATE TABLE IF NOT EXISTS syncunit_local (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS syncunit_sync_properties ("
    " unit TEXT PRIMARY KEY, last_sync_on TEXT, last_result TEXT)",
    "CREATE TABLE IF NOT EXISTS syncunit_cursors ("
    " stream TEXT PRIMARY KEY, local_table TEXT NOT NULL, definition TEXT NOT NULL,"
    " cursor TEXT NOT NULL)",
]


#: Fact key prefix marking a stream whose local indexes a first copy dropped.
_SUSPENDED = "indexes-suspended:"

#: Chunks of at least this many rows are applied with the outbox triggers dropped.
BULK_ROWS = 256


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def sql_type(logical: str) -> str:
    return SQL_TYPES.get(logical, "TEXT")


def _index_name(s: StreamInfo, columns: Sequence[str]) -> str:
    return quote(f"ix_{s.local_table}_{'_'.join(columns)}")


def utcnow() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def driver_errors(conn: Any) -> tuple[type[Exception], ...]:
    """The exception classes a sqlite3-compatible connection raises.

    A connection from a fork of the standard module (``sqlcipher3``, ``pysqlite3``)
    raises its own module's ``Error``, not ``sqlite3.Error``.
    """
    module = sys.modules.get(type(conn).__module__)
    error = getattr(module, "Error", None)
    if isinstance(error, type) and issubclass(error, Exception) and error is not sqlite3.Error:
        return (sqlite3.Error, error)
    return (sqlite3.Error,)


class LocalStore:
    """A local SQLite database managed by syncunit; the app may read and write it too.

    ``path`` is a file path, ``":memory:"``, or an open sqlite3-compatible
    connection: the standard module's, or one from ``sqlcipher3`` for an
    encrypted file (open it and set its key before handing it over). A passed
    connection keeps its journal mode, is switched to autocommit (the store runs
    its own transactions), must allow use from the sync worker thread
    (``check_same_thread=False``), and is closed by ``close()``.
    """

    def __init__(self, path: str | Path | sqlite3.Connection | Any) -> None:
        given = not isinstance(path, str | Path)
        if given and not callable(getattr(path, "execute", None)):
            raise TypeError(
                f"local_db must be a path, ':memory:' or a sqlite3-compatible connection,"
                f" not {type(path).__name__}"
            )
        #: What the connection raises: ``sqlite3.Error`` and, for a fork, its own ``Error``.
        self.errors = driver_errors(path) if given else (sqlite3.Error,)
        try:
            if given:
                self.conn = cast(sqlite3.Connection, path)
            else:
                self.conn = sqlite3.connect(
                    str(path), isolation_level=None, check_same_thread=False
                )
            self.conn.isolation_level = None
            if not given and str(path) != ":memory:":
                self.conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed local change (and its outbox entry) survives power loss.
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA busy_timeout=30000")
            # INSERT OR REPLACE fires the delete trigger for the row it replaces.
            self.conn.execute("PRAGMA recursive_triggers=ON")
            self.conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except self.errors as exc:
            hint = ""
            if "not a database" in str(exc):
                hint = " (an encrypted file needs its key: open it with sqlcipher3 and PRAGMA key)"
            raise LocalStoreError(f"cannot open local database {path!r}: {exc}{hint}") from exc
        self.lock = threading.RLock()
        self._depth = 0
        with self.atomic():
            for stmt in _META_DDL + OUTBOX_DDL:
                self.conn.execute(stmt)
        self._upserts: dict[tuple[str, tuple[str, ...]], str] = {}
        cached = self.catalog()
        #: Local tables whose changes are pushed (they carry outbox triggers).
        self.pushed: set[str] = set()
        if cached is not None:
            self.pushed = {t for u in cached.units for t in u.push}
            self._restore_suspended(cached)

    # -- transactions ------------------------------------------------------------------

    @contextmanager
    def atomic(self) -> Iterator[sqlite3.Connection]:
        """One transaction (``BEGIN IMMEDIATE``); nested calls become savepoints."""
        with self.lock:
            depth = self._depth
            name = f"syncunit_sp{depth}"
            try:
                self.conn.execute("BEGIN IMMEDIATE" if depth == 0 else f"SAVEPOINT {name}")
            except self.errors as exc:
                raise LocalStoreError(f"cannot begin a local transaction: {exc}") from exc
            self._depth += 1
            try:
                yield self.conn
            except BaseException:
                self._depth -= 1
                if depth == 0:
                    self.conn.execute("ROLLBACK")
                else:
                    self.conn.execute(f"ROLLBACK TO {name}")
                    self.conn.execute(f"RELEASE {name}")
                raise
            else:
                self._depth -= 1
                try:
                    self.conn.execute("COMMIT" if depth == 0 else f"RELEASE {name}")
                except self.errors as exc:
                    if depth == 0:
                        self.conn.execute("ROLLBACK")
                    raise LocalStoreError(f"cannot commit a local transaction: {exc}") from exc

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read query under the store's lock (safe while a sync runs on another thread)."""
        with self.lock:
            try:
                return list(self.conn.execute(sql, params))
            except self.errors as exc:
                raise LocalStoreError(f"local query failed: {exc}") from exc

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    # -- facts ---------------------------------------------------------------------------

    def get_fact(self, key: str) -> str | None:
        with self.lock:
            row = self.conn.execute(
                "SELECT value FROM syncunit_local WHERE key = ?", (key,)
            ).fetchone()
        return None if row is None else str(row[0])

    def set_fact(self, key: str, value: str) -> None:
        self.conn.execute(
            "INSERT INTO syncunit_local (key, value) VALUES (?, ?)"
            " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def client_id(self) -> str:
        """This database's client id, made once and kept."""
        with self.atomic():
            value = self.get_fact("client_id")
            if value is None:
                value = str(uuid.uuid4())
                self.set_fact("client_id", value)
        return value

    # -- catalog and local tables ----------------------------------------------------------

    def catalog(self) -> Catalog | None:
        raw = self.get_fact("catalog")
        return None if raw is None else decode_catalog(raw.encode())

    def apply_catalog(self, catalog: Catalog) -> list[str]:
        """Create or migrate every local table the catalog describes; return what changed."""
        changes: list[str] = []
        with self.atomic():
            pushed = self.pushed = {t for u in catalog.units for t in u.push}
            for stream in catalog.streams:
                changes += self._migrate(stream)
                if stream.local_table in pushed:
                    for stmt in trigger_ddl(stream):
                        self.conn.execute(stmt)
            self.set_fact("catalog", encode_catalog(catalog).decode())
        self._upserts.clear()
        return changes

    def _migrate(self, s: StreamInfo) -> list[str]:
        c = self.conn
        t = quote(s.local_table)
        have = {r[1]: (r[2], r[5]) for r in c.execute(f"PRAGMA table_info({t})")}
        want = {col.name: sql_type(col.type) for col in s.columns}
        changes: list[str] = []
        if have:
            # The engine's triggers (the outbox's) name the old columns: a DROP COLUMN
            # would fail on them. apply_catalog() recreates them for pushed tables.
            for (trigger,) in c.execute(
                "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?"
                " AND name LIKE 'syncunit\\_%' ESCAPE '\\'",
                (s.local_table,),
            ).fetchall():
                c.execute(f"DROP TRIGGER {quote(trigger)}")
            rebuild = have.get(s.key, ("", 0))[1] != 1 or any(
                name in have and have[name][0] != typ for name, typ in want.items()
            )
            if rebuild:
                c.execute(f"DROP TABLE {t}")
                changes.append(f"rebuilt {s.local_table}")
                have = {}
            else:
                for name, typ in want.items():
                    if name not in have:
                        c.execute(f"ALTER TABLE {t} ADD COLUMN {quote(name)} {typ}")
                        changes.append(f"added {s.local_table}.{name}")
                for name in have:
                    if name not in want and not name.startswith("syncunit_"):
                        c.execute(f"ALTER TABLE {t} DROP COLUMN {quote(name)}")
                        changes.append(f"dropped {s.local_table}.{name}")
        created = not have
        if created:
            cols = ", ".join(
                f"{quote(n)} {typ}{' PRIMARY KEY' if n == s.key else ''}" for n, typ in want.items()
            )
            c.execute(f"CREATE TABLE {t} ({cols})")
            changes.append(f"created {s.local_table}")
        self._create_indexes(s)
        row = c.execute(
            "SELECT definition FROM syncunit_cursors WHERE stream = ?", (s.name,)
        ).fetchone()
        # A changed definition keeps the cursor, unless the table is new (rebuilt) and
        # empty: the cursor names the old definition, so the server answers with a
        # reset, which clears the old rows in the same transaction as the first chunk.
        # Without a cursor the server would send a plain first copy, and rows deleted
        # on the server meanwhile would stay here forever.
        if row is not None and row[0] != s.definition and created:
            c.execute("DELETE FROM syncunit_cursors WHERE stream = ?", (s.name,))
            changes.append(f"reset cursor of {s.name}")
        return changes

    def _create_indexes(self, s: StreamInfo) -> None:
        t = quote(s.local_table)
        for ix in s.indexes:
            self.conn.execute(
                f"CREATE INDEX IF NOT EXISTS {_index_name(s, ix)}"
                f" ON {t} ({', '.join(map(quote, ix))})"
            )

    def suspend_indexes(self, s: StreamInfo) -> bool:
        """Drop a local table's secondary indexes for a large first copy.

        Building an index once over all rows costs far less than keeping it up to
        date row by row; ``restore_indexes`` builds them again. The suspension is
        recorded in the same transaction, so whatever ends the copy (its last
        chunk, an error, or a killed process and a reopened store) restores them.
        Returns whether there was anything to drop.
        """
        if not s.indexes:
            return False
        with self.atomic() as c:
            for ix in s.indexes:
                c.execute(f"DROP INDEX IF EXISTS {_index_name(s, ix)}")
            self.set_fact(_SUSPENDED + s.name, s.local_table)
        return True

    def restore_indexes(self, s: StreamInfo) -> None:
        """Build the secondary indexes ``suspend_indexes`` dropped (idempotent)."""
        with self.atomic():
            self._create_indexes(s)
            self.conn.execute("DELETE FROM syncunit_local WHERE key = ?", (_SUSPENDED + s.name,))

    def _restore_suspended(self, catalog: Catalog) -> None:
        """Restore indexes a copy left suspended (the process ended before it did)."""
        with self.lock:
            rows = self.conn.execute(
                "SELECT key FROM syncunit_local WHERE key LIKE ?", (_SUSPENDED + "%",)
            ).fetchall()
        for (key,) in rows:
            info = catalog.stream(key.removeprefix(_SUSPENDED))
            if info is not None:
                self.restore_indexes(info)

    @contextmanager
    def bulk(self) -> Iterator[None]:
        """During a sync: no automatic WAL checkpoints until it ends.

        Each checkpoint copies pages back into the database file; during a large
        download the same pages change again and again, so the first commit after
        the sync (a checkpoint is due when the WAL passes 1000 pages) writes each
        of them once. A small delta leaves the WAL small and costs no checkpoint.
        """
        with self.lock:
            self.conn.execute("PRAGMA wal_autocheckpoint=0")
        try:
            yield
        finally:
            with self.lock:
                self.conn.execute("PRAGMA wal_autocheckpoint=1000")

    # -- cursors and sync properties ---------------------------------------------------------

    def cursors(self, streams: Sequence[str]) -> dict[str, str]:
        marks = ",".join("?" * len(streams))
        with self.lock:
            rows = self.conn.execute(
                f"SELECT stream, cursor FROM syncunit_cursors WHERE stream IN ({marks})",
                list(streams),
            ).fetchall()
        return {r[0]: r[1] for r in rows}

    def last_sync_on(self, unit: str) -> str | None:
        """When ``unit`` last completed (ISO 8601, UTC), or None."""
        sql = "SELECT last_sync_on FROM syncunit_sync_properties WHERE unit = ?"
        rows = self.query(sql, (unit,))
        return rows[0][0] if rows else None

    def complete_unit(self, unit: str, result_json: str) -> None:
        """Record LastSyncOn and the run's result (not worth an fsync: a lost one
        only shows an older time)."""
        with self.lock:
            self.conn.execute("PRAGMA synchronous=NORMAL")
        try:
            self._complete_unit(unit, result_json)
        finally:
            with self.lock:
                self.conn.execute("PRAGMA synchronous=FULL")

    def _complete_unit(self, unit: str, result_json: str) -> None:
        with self.atomic():
            self.conn.execute(
                "INSERT INTO syncunit_sync_properties (unit, last_sync_on, last_result)"
                " VALUES (?, ?, ?) ON CONFLICT(unit) DO UPDATE SET"
                " last_sync_on = excluded.last_sync_on, last_result = excluded.last_result",
                (unit, utcnow(), result_json),
            )

    # -- applying chunks -----------------------------------------------------------------------

    def apply_chunk(self, stream: StreamInfo, chunk: Chunk) -> tuple[int, int]:
        """Apply one chunk and store its cursor in one transaction; return (upserted, removed).

        Pulls don't clobber: rows with a local change the server has not accepted
        yet are left as they are; the push resolves them.
        """
        t = quote(stream.local_table)
        key = quote(stream.key)
        upserted = removed = 0
        # The outbox triggers must not record server changes. For a large chunk they
        # are dropped and created again inside the transaction (other connections
        # never see them missing); for a small one a flag in syncunit_state keeps
        # them quiet, at the cost of a check per row.
        rows_in = len(chunk.data[0]) if chunk.data else 0
        bulk = rows_in >= BULK_ROWS and stream.local_table in self.pushed
        # A lost chunk is fetched again: no fsync for it (not settable inside the one
        # transaction of a full stream's chunks, which commits with the default).
        relaxed = self._depth == 0
        try:
            if relaxed:
                self.conn.execute("PRAGMA synchronous=NORMAL")
            with self.atomic() as c:
                if bulk:
                    for stmt in trigger_ddl(stream)[:3]:
                        c.execute(stmt)
                else:
                    c.execute("UPDATE syncunit_state SET applying = 1 WHERE id = 1")
                pending = {
                    r[0]
                    for r in c.execute(
                        "SELECT row_key FROM syncunit_outbox WHERE table_name = ?",
                        (stream.local_table,),
                    )
                }
                if chunk.reset:
                    if pending:
                        marks = ",".join("?" * len(pending))
                        cur = c.execute(f"DELETE FROM {t} WHERE {key} NOT IN ({marks})", [*pending])
                    else:
                        cur = c.execute(f"DELETE FROM {t}")
                    removed += cur.rowcount
                gone = [(k,) for k in chunk.removed if k not in pending]
                if gone:
                    cur = c.executemany(f"DELETE FROM {t} WHERE {key} = ?", gone)
                    removed += max(cur.rowcount, 0)
                if chunk.data:
                    sql = self._upsert_sql(stream, tuple(chunk.columns))
                    rows: Any = zip(*chunk.data, strict=True)
                    if pending:
                        k = chunk.columns.index(stream.key)
                        rows = [r for r in rows if r[k] not in pending]
                    c.executemany(sql, rows)
                    upserted = rows_in  # received; rows with pending changes kept theirs
                if chunk.complete and self.get_fact(_SUSPENDED + stream.name) is not None:
                    self._create_indexes(stream)  # the copy is whole: so is the table
                    c.execute(
                        "DELETE FROM syncunit_local WHERE key = ?", (_SUSPENDED + stream.name,)
                    )
                if bulk:
                    for stmt in trigger_ddl(stream)[3:]:
                        c.execute(stmt)
                else:
                    c.execute("UPDATE syncunit_state SET applying = 0 WHERE id = 1")
                c.execute(
                    "INSERT INTO syncunit_cursors (stream, local_table, definition, cursor)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT(stream) DO UPDATE SET"
                    " cursor = excluded.cursor, definition = excluded.definition",
                    (stream.name, stream.local_table, stream.definition, chunk.cursor),
                )
        except self.errors as exc:
            raise LocalStoreError(f"cannot apply a chunk to {stream.local_table}: {exc}") from exc
        finally:
            if relaxed:
                self.conn.execute("PRAGMA synchronous=FULL")
        return upserted, removed

    def _upsert_sql(self, stream: StreamInfo, columns: tuple[str, ...]) -> str:
        cache_key = (stream.local_table, columns)
        sql = self._upserts.get(cache_key)
        if sql is None:
            known = {c.name for c in stream.columns}
            unknown = [c for c in columns if c not in known]
            if unknown or stream.key not in columns:
                raise LocalStoreError(
                    f"chunk for {stream.local_table} has columns {list(columns)},"
                    " which do not match the catalog; refresh the catalog"
                )
            names = ", ".join(map(quote, columns))
            marks = ", ".join("?" * len(columns))
            sets = ", ".join(
                f"{quote(c)} = excluded.{quote(c)}" for c in columns if c != stream.key
            )
            sql = f"INSERT INTO {quote(stream.local_table)} ({names}) VALUES ({marks})"
            sql += (
                f" ON CONFLICT({quote(stream.key)}) DO UPDATE SET {sets}"
                if sets
                else " ON CONFLICT DO NOTHING"
            )
            self._upserts[cache_key] = sql
        return sql

    def rows(self, table: str, columns: Sequence[str] | None = None) -> list[tuple[Any, ...]]:
        """Every row of a local table (for checks and small tables)."""
        cols = "*" if columns is None else ", ".join(map(quote, columns))
        with self.lock:
            return list(self.conn.execute(f"SELECT {cols} FROM {quote(table)}"))
