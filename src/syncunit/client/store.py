"""The client's local SQLite database: local tables, SyncProperties, cursors.

One ``sqlite3`` connection, one transaction primitive (``atomic()``, with
savepoints for nesting). The engine's own tables are prefixed ``syncunit_``:

* ``syncunit_local``: key/value facts (client id, the cached catalog);
* ``syncunit_sync_properties``: per unit, ``last_sync_on`` (for people) and the last result;
* ``syncunit_cursors``: per stream, the server's cursor (for the engine);
* ``syncunit_resets``: streams being downloaded again, into a shadow table beside
  the local one, swapped in one transaction when complete;
* ``syncunit_subscriptions`` and ``syncunit_holds``: units the app opened with
  parameter values, and which of them holds which row (``holds.py``);
* ``syncunit_deferred``: removals put off while the row had an unpushed change;
* ``syncunit_recopy``: streams marked to copy afresh, and the rows that called for it
  (``recopy.py``);

The engine's tables are versioned (``migrations.py``): an older device file is
upgraded in place when it is opened.

Local tables are created, and migrated when the catalog changes, from the
catalog's stream descriptions, in place (create the new table, copy, swap, in one
transaction, as sqlite-utils' ``transform`` does), so unpushed rows survive
every catalog change. Every chunk is applied in one transaction
together with its cursor, so an interrupted sync resumes where it stopped
(``applying.py``, whose methods ``LocalStore`` takes in as a mixin).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import sqlite3
import sys
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, cast

from syncunit.client import holds, recopy
from syncunit.client.applying import ChunkApply
from syncunit.client.devicelock import DeviceLock
from syncunit.client.migrations import migrate, refuse_newer
from syncunit.client.outbox import Outbox
from syncunit.client.schema import (
    INDEXES_SUSPENDED,
    column_defs,
    quote,
    sql_type,
    surface_orphans,
    transform,
)
from syncunit.client.triggers import trigger_ddl, trigger_names
from syncunit.errors import LocalStoreError
from syncunit.protocol import (
    Catalog,
    StreamInfo,
    decode_catalog,
    encode_catalog,
    local_index_name,
    local_table_ddl,
)

__all__ = ["LocalStore", "connect", "quote", "sql_type"]

log = logging.getLogger("syncunit.client")


def connect(path: str | Path, **kwargs: Any) -> sqlite3.Connection:
    """A new sqlite3 connection to the device database at ``path`` for the app's own
    SQL (``kwargs`` go to ``sqlite3.connect``).

    Recursive triggers are on: a row that an ``INSERT OR REPLACE`` or ``UPDATE OR
    REPLACE`` deletes (a conflict on a UNIQUE index) is recorded as deleted and
    pushed; with SQLite's default (off) no trigger sees it. A busy timeout lets its
    writes wait for the engine's.
    """
    conn = cast(sqlite3.Connection, sqlite3.connect(str(path), **kwargs))
    conn.execute("PRAGMA recursive_triggers=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


#: The fact listing every local table a catalog the engine applied named (JSON): the
#: engine's own, whatever catalog comes next (``_refuse_foreign_tables``).
MADE_TABLES = "made_tables"

#: SQLite's automatic checkpoint (WAL pages), and the WAL size (bytes) past which the
#: checkpoint after a sync runs in the background.
AUTO_CHECKPOINT = 1000
BIG_WAL = 16 << 20

#: Page cache (KiB) while a copy's suspended indexes are built: SQLite sorts each
#: index's entries within it, and spills to temporary files past it (the default
#: 2,000 KiB spills at about 100k rows). Given back once they are built. A larger
#: one builds no faster (32,000 KiB: slower at 100k and at 1M rows) and is held
#: whole at the peak of a large copy (the client's peak RSS at 1M rows: 113 MB).
INDEX_BUILD_CACHE_KIB = 8_000


class ClosedByCatalog(NamedTuple):
    """A held subscription closed because the server's catalog no longer pulls its unit."""

    sub_id: str
    unit: str
    params: dict[str, Any]
    removed: int  # local rows only it held, removed with it


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


def _keyed(conn: Any) -> bool:
    """Whether ``conn`` is a SQLCipher connection with a key set (``cipher_status`` 1;
    the standard module, and SQLCipher without a key, answer nothing or 0).

    SQLCipher before 4.12 has no ``cipher_status``: a SQLCipher connection (it
    answers ``cipher_version``) then counts as encrypted unless its file starts
    with SQLite's plain header and it keeps no plain header on purpose
    (``cipher_plaintext_header_size``). A file with nothing written yet counts as
    encrypted: the safe side (no snapshot file beside it), at a first sync's speed.
    """
    row = conn.execute("PRAGMA cipher_status").fetchone()
    if row is not None:
        return str(row[0]) == "1"
    version = conn.execute("PRAGMA cipher_version").fetchone()
    if version is None or not version[0]:
        return False  # not SQLCipher
    kept = conn.execute("PRAGMA cipher_plaintext_header_size").fetchone()
    if kept is not None and str(kept[0]) not in ("", "0"):
        return True  # a plain header on purpose (iOS shared WAL): the header tells nothing
    main = next((r[2] for r in conn.execute("PRAGMA database_list") if r[1] == "main"), "")
    if not main:
        return False  # in memory: nothing at rest
    try:
        with open(main, "rb") as f:
            return f.read(16) != PLAIN_HEADER
    except OSError:
        return True


#: The first bytes of a SQLite file that is not encrypted.
PLAIN_HEADER = b"SQLite format 3\x00"


class LocalStore(ChunkApply):
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
            asked = int(self.conn.execute("PRAGMA synchronous").fetchone()[0])
            if not given and str(path) != ":memory:":
                try:  # before WAL: a newer engine's file is left as it was
                    refuse_newer(self.conn)
                except LocalStoreError:
                    self.conn.close()
                    raise
                self.conn.execute("PRAGMA journal_mode=WAL")
            # At least FULL: a committed local change (and its outbox entry) survives
            # power loss; an app that asked for EXTRA on its connection keeps EXTRA.
            #: The durability the app's transactions get (the engine lowers it only for
            #: its own transactions, under the store's lock: see ``relaxed``).
            self.sync_level = max(asked, 2) if given else 2
            self.conn.execute(f"PRAGMA synchronous={self.sync_level}")
            self.conn.execute("PRAGMA busy_timeout=30000")
            # INSERT OR REPLACE fires the delete trigger for the row it replaces.
            self.conn.execute("PRAGMA recursive_triggers=ON")
            self.conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            #: The file is encrypted (SQLCipher with a key): nothing the engine writes
            #: beside it (a snapshot file) may hold its rows in the clear.
            self.encrypted = _keyed(self.conn)
        except self.errors as exc:
            hint = ""
            if "not a database" in str(exc):
                hint = " (an encrypted file needs its key: open it with sqlcipher3 and PRAGMA key)"
            raise LocalStoreError(f"cannot open local database {path!r}: {exc}{hint}") from exc
        self.lock = threading.RLock()
        self._depth = 0
        #: The database file, when the store opened it (a background checkpoint opens it too).
        self.path = None if given or str(path) == ":memory:" else Path(str(path))
        self._bulk = 0  # syncs under way (``bulk``)
        self._closed = False
        #: Subscriptions a catalog closed (``apply_catalog``), not yet reported: see
        #: ``take_closed_by_catalog``.
        self._closed_by_catalog: list[ClosedByCatalog] = []
        #: The background checkpoint under way, if any (``close`` waits for it).
        self._checkpointer: threading.Thread | None = None
        with self.lock:
            # A WAL left large by a process that ended during its checkpoint: copy it
            # back now, off the app's next commit (which would otherwise do it).
            self._checkpoint_in_background()
        with self.atomic():
            #: The migration steps this open ran (an upgrade of an older device file).
            self.migrated = migrate(self.conn)
        self._upserts: dict[tuple[str, tuple[str, ...], bool], str] = {}  # (table, columns, new)
        #: ``_index_fix`` by (table, columns): None where no index reads a column.
        self._fixes: dict[tuple[str, tuple[str, ...]], tuple[str, str, list[int]] | None] = {}
        #: Streams whose chunks in the sync under way are a first copy (set by the run).
        self.copying: set[str] = set()
        #: Streams whose next chunk opens a copy the request asked for without the
        #: cursor the device holds (``UnitRun``): applied as a reset (``apply_chunk``).
        self.fresh_copies: set[str] = set()
        #: Subscription cursors (``stream@subscription``) dropped in the response under way
        #: so the stream copies afresh: the rest of that response's chunks for them wait.
        self.rereading: set[str] = set()
        #: One sync run at a time on this database, across objects and processes.
        self.sync_lock = DeviceLock(self._main_file())
        #: Local tables whose changes are pushed (they carry outbox triggers).
        self.pushed: set[str] = set()
        #: Local tables a stream with client parameters fills (their rows carry holds),
        #: and those a stream without parameters fills.
        self.held: set[str] = set()
        self.plain: set[str] = set()
        #: The stored catalog the sets above were learnt from (``reload_catalog``).
        self._loaded: str | None = None
        self.reload_catalog()
        cached = self.catalog()
        if cached is not None:
            self._restore_suspended(cached)
            self._renew_triggers(cached)

    def _main_file(self) -> Path | None:
        """The database file (None: in memory), also for a connection it was given."""
        if self.path is not None:
            return self.path.resolve()
        with self.lock:
            try:
                main = self.conn.execute("PRAGMA database_list").fetchone()
            except self.errors as exc:
                raise LocalStoreError(f"cannot read the local database's file: {exc}") from exc
        return Path(main[2]).resolve() if main and main[2] else None

    def reload_catalog(self) -> bool:
        """Learn again what the stored catalog says of the local tables (which are
        pushed, which hold rows for subscriptions) if another client object or process
        applied another one since this object last did; return whether it had."""
        with self.lock:
            raw = self.get_fact("catalog")
            if raw == self._loaded:
                return False
            if raw is not None:
                self._learn(decode_catalog(raw.encode()))
            else:
                self.pushed, self.held, self.plain = set(), set(), set()
            self._upserts.clear()
            self._fixes.clear()
            self._loaded = raw
            return True

    def _learn(self, catalog: Catalog) -> None:
        self.pushed = {t for u in catalog.units for t in u.push}
        self.held = {s.local_table for s in catalog.streams if s.params}
        self.plain = {s.local_table for s in catalog.streams if not s.params}

    # -- transactions ------------------------------------------------------------------

    @contextmanager
    def atomic(self) -> Iterator[sqlite3.Connection]:
        """One transaction (``BEGIN IMMEDIATE``); nested calls become savepoints."""
        with self.lock:
            self._check_open()
            depth = self._depth
            name = f"syncunit_sp{depth}"
            try:
                self.conn.execute("BEGIN IMMEDIATE" if depth == 0 else f"SAVEPOINT {name}")
            except self.errors as exc:
                raise LocalStoreError(f"cannot begin a local transaction: {exc}") from exc
            self._depth += 1
            try:
                yield self.conn
            except BaseException as exc:
                self._depth -= 1
                self._undo(depth, name)
                if depth == 0 and isinstance(exc, self.errors):
                    # A driver error (a read-only file, a full disk): nothing was written.
                    raise LocalStoreError(
                        f"the local database refused the change (nothing was written): {exc}"
                    ) from exc
                raise
            else:
                self._depth -= 1
                try:
                    self.conn.execute("COMMIT" if depth == 0 else f"RELEASE {name}")
                except self.errors as exc:
                    if depth == 0:
                        self._undo(depth, name)
                    raise LocalStoreError(f"cannot commit a local transaction: {exc}") from exc

    def _undo(self, depth: int, name: str) -> None:
        """Roll back the transaction (``depth`` 0) or the savepoint ``name`` that failed.

        SQLite rolls a whole transaction back by itself on some errors (a full disk,
        an I/O error, no memory), a failed COMMIT among them: there is nothing left
        to undo then, and a ROLLBACK would fail in place of the error that matters.
        A ROLLBACK that fails is logged, and the error that caused it raised.
        """
        if not self.conn.in_transaction:
            return
        try:
            if depth == 0:
                self.conn.execute("ROLLBACK")
            else:
                self.conn.execute(f"ROLLBACK TO {name}")
                self.conn.execute(f"RELEASE {name}")
        except self.errors as exc:
            log.warning("cannot roll back a local transaction: %s", exc)

    @contextmanager
    def relaxed(self) -> Iterator[sqlite3.Connection]:
        """An engine transaction committed with ``synchronous=NORMAL`` (no fsync).

        For what the engine can fetch again (a chunk, LastSyncOn) or be answered again
        (a push's verdicts: the server's log repeats them). The lock is held
        from the lowering of the setting to its restoring, so no transaction of the
        app (which goes through the same lock) ever commits with less than it asked.
        """
        with self.lock:
            if self._depth:  # inside a transaction of the engine's: it commits as it began
                with self.atomic() as c:
                    yield c
                return
            self.conn.execute("PRAGMA synchronous=NORMAL")
            try:
                with self.atomic() as c:
                    yield c
            finally:
                self.conn.execute(f"PRAGMA synchronous={self.sync_level}")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read query under the store's lock (safe while a sync runs on another thread)."""
        with self.lock:
            self._check_open()
            try:
                return list(self.conn.execute(sql, params))
            except self.errors as exc:
                raise LocalStoreError(f"local query failed: {exc}") from exc

    def _check_open(self) -> None:
        if self._closed:
            raise LocalStoreError("the local database is closed (its client was closed)")

    def close(self) -> None:
        """Close the connection, after a background checkpoint under way has ended.

        Waiting lets the checkpoint finish the copy and this connection, the last
        one, remove the WAL: a process that exits right after a large sync leaves
        no WAL of hundreds of megabytes for its next start to copy back.
        """
        checkpointer = self._checkpointer
        if checkpointer is not None and checkpointer is not threading.current_thread():
            checkpointer.join()
        with self.lock:
            self._closed = True
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

    def renew_client_id(self, *, same_session: bool = False) -> str:
        """A new client id, whose changes are numbered from 1 (in the caller's transaction).

        The server knows the new id from its first push on, and waits for no number
        the old one handed out. ``same_session``: the principal's session goes on
        under the new id, and what the server said of its principal (the fact
        ``principal``, ``SyncClient._note_principal``) moves to it."""
        new = str(uuid.uuid4())
        if same_session:
            old = self.get_fact("client_id")
            client_id, _, tag = (self.get_fact("principal") or "").partition(" ")
            if tag and client_id == old:
                self.set_fact("principal", f"{new} {tag}")
        self.set_fact("client_id", new)
        self.conn.execute("UPDATE syncunit_state SET next_seq = 1 WHERE id = 1")
        return new

    def end_session(self, *, clear: bool) -> str:
        """A new client id for the next principal (in the caller's transaction).

        The outbox must be empty (``Outbox.park``). ``clear`` also removes every
        synced row, cursor, re-download, LastSyncOn and queued run: the next
        principal starts from nothing and sees nothing of the previous one.
        """
        c = self.conn
        new = self.renew_client_id()
        c.execute("DELETE FROM syncunit_queue")
        if clear:
            catalog = self.catalog()
            for stream in catalog.streams if catalog is not None else []:
                with self._quiet(stream, bulk=False):
                    c.execute(f"DELETE FROM {quote(stream.local_table)}")
            for stream_name, shadow in c.execute(
                "SELECT stream, shadow FROM syncunit_resets"
            ).fetchall():
                self._drop_shadow(stream_name, shadow)
            c.execute("DELETE FROM syncunit_cursors")
            c.execute("DELETE FROM syncunit_sync_properties")
            c.execute("DELETE FROM syncunit_holds")
            c.execute("DELETE FROM syncunit_subscriptions")
            c.execute("DELETE FROM syncunit_deferred")
            # Rows marked to copy afresh are gone with the rest; the marks name them.
            c.execute(
                "DELETE FROM syncunit_recopy WHERE substr(name, 1, ?) = ?",
                (len(recopy.PREFIX), recopy.PREFIX),
            )
        return new

    # -- catalog and local tables ----------------------------------------------------------

    def catalog(self) -> Catalog | None:
        raw = self.get_fact("catalog")
        return None if raw is None else decode_catalog(raw.encode())

    def apply_catalog(self, catalog: Catalog) -> list[str]:
        """Create or migrate every local table the catalog describes; return what changed.

        One transaction: a crash leaves the previous tables, catalog and outbox.
        Unpushed rows and their outbox entries are carried over; a change that can
        no longer be sent (its table is no longer pushed, its row could not be
        carried over) is surfaced as a rejection, never dropped.
        """
        changes: list[str] = []
        closing: list[ClosedByCatalog] = []
        with self.atomic():
            before = self.catalog()
            known = self._known_tables(before)
            made = self._refuse_foreign_tables(catalog, known)
            self._loaded = ""  # learnt again by the next run if this one rolls back
            pushed = self.pushed = {t for u in catalog.units for t in u.push}
            if before is not None:
                # On the tables as the old catalog made them, before they change.
                changes += self._close_orphans(before, catalog, closing)
                changes += self._carry_pending(before, catalog, pushed)
            self._learn(catalog)
            for stream in catalog.streams:
                changes += self._migrate(stream)
                if stream.local_table in pushed:
                    for stmt in trigger_ddl(stream):
                        self.conn.execute(stmt)
            if before is not None:
                changes += self._drop_retired_indexes(before, catalog)
            changes += surface_orphans(self.conn, catalog, self.pushed)
            # Only tables known for the engine's go: an outbox-like trigger alone proves
            # nothing (a server's tracked table in the same file has such triggers).
            gone = self._drop_unfilled(known, catalog)
            changes += [f"dropped {t} (no stream fills it)" for t in gone]
            raw = encode_catalog(catalog).decode()
            self.set_fact("catalog", raw)
            made = {t for t in made if t not in gone} | {s.local_table for s in catalog.streams}
            self.set_fact(MADE_TABLES, json.dumps(sorted(made)))
            self._loaded = raw
        self._closed_by_catalog += closing  # committed: report them
        self._upserts.clear()
        self._fixes.clear()
        return changes

    def take_closed_by_catalog(self) -> list[ClosedByCatalog]:
        """The subscriptions catalogs applied since the last call closed (oldest first)."""
        with self.lock:
            out, self._closed_by_catalog = self._closed_by_catalog, []
        return out

    def _drop_unfilled(self, made: set[str], catalog: Catalog) -> list[str]:
        """Drop the local tables the engine made that no stream of ``catalog`` fills,
        with their cursors, holds, put-off removals, copy marks and re-downloads: their
        rows would stay as they were for good (the server sends nothing more of them),
        and a catalog bringing a stream back copies it afresh. Their unsent changes were
        surfaced before (``_carry_pending``); changes in flight keep their values in the
        outbox until the server answers them. Returns the tables dropped."""
        c = self.conn
        filled = {s.local_table.lower() for s in catalog.streams}
        tables = {
            r[0].lower(): r[0]
            for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        gone = sorted(
            t
            for t in made
            if t.lower() not in filled
            and t.lower() in tables
            and not t.lower().startswith("syncunit_")
        )
        for t in gone:
            for stream_name, shadow in c.execute(
                "SELECT stream, shadow FROM syncunit_resets WHERE local_table = ?", (t,)
            ).fetchall():
                self._drop_shadow(stream_name, shadow)
            c.execute(f"DROP TABLE {quote(tables[t.lower()])}")
            for kept in ("syncunit_cursors", "syncunit_holds", "syncunit_deferred"):
                c.execute(f"DELETE FROM {kept} WHERE local_table = ?", (t,))
            c.execute(
                "DELETE FROM syncunit_local WHERE substr(key, 1, ?) = ? AND value = ?",
                (len(INDEXES_SUSPENDED), INDEXES_SUSPENDED, t),
            )
            c.execute(
                "DELETE FROM syncunit_recopy WHERE local_table = ? AND substr(name, 1, ?) = ?",
                (t, len(recopy.PREFIX), recopy.PREFIX),
            )
        return gone

    def _known_tables(self, before: Catalog | None) -> set[str]:
        """The local tables known for the engine's: those any catalog it applied named
        (``MADE_TABLES``, or the catalog held, ``before``), or that a cursor names."""
        known = set(json.loads(self.get_fact(MADE_TABLES) or "[]"))
        known |= set() if before is None else {s.local_table for s in before.streams}
        known |= {r[0] for r in self.conn.execute("SELECT local_table FROM syncunit_cursors")}
        return known

    def _refuse_foreign_tables(self, catalog: Catalog, known: set[str]) -> set[str]:
        """Refuse a catalog naming a local table the engine did not make: a table of the
        app's own would be migrated, rebuilt or emptied like the engine's. The engine's
        are those ``known`` (``_known_tables``) and those its outbox triggers name (a
        database of an earlier version). Returns them."""
        made = set(known)
        made |= {
            r[0]
            for r in self.conn.execute(
                "SELECT tbl_name FROM sqlite_master WHERE type = 'trigger'"
                " AND name LIKE 'syncunit\\_%' ESCAPE '\\'"
            )
        }
        tables = {
            r[0].lower()
            for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        for stream in catalog.streams:
            name = stream.local_table
            if name not in made and name.lower() in tables:
                raise LocalStoreError(
                    f"the local database already has a table {name!r} that syncunit did not"
                    f" make; the server's stream {stream.name!r} fills a local table of that"
                    " name. Rename the app's table (or use another database file)"
                )
        return made

    def _carry_pending(self, old: Catalog, new: Catalog, pushed: set[str]) -> list[str]:
        """Before the local tables change: keep what the unsent changes wrote.

        An unsent entry holds only column names and reads the values from its row
        when it is numbered. A change that can no longer be sent (its table is no
        longer pushed, or its key changed) becomes a rejection now, with its values;
        one whose columns the new catalog drops is numbered now, its values frozen
        (the server then judges it, as if it had been pushed before the change).
        In-flight changes of a table whose key changed are held (``hold_in_flight``).
        In-flight changes of a table no longer pushed stay in flight while a unit
        pushes anything (the server answers them: from its log if it applied them,
        else it refuses them, which surfaces them); with no unit left they are
        surfaced now (``surface_in_flight``).
        """
        outbox = Outbox(self)
        by_table = {s.local_table: s for s in new.streams}
        was_pushed = {t for u in old.units for t in u.push}
        streams = [s for s in old.streams if s.local_table in was_pushed]
        changes: list[str] = []
        surfaced = 0
        dropped: dict[str, set[str]] = {}
        for s in streams:
            t = s.local_table
            n = by_table.get(t)
            if n is None or t not in pushed:
                surfaced += outbox.surface_unsent(
                    s,
                    f"table {t!r} is no longer synced to the server (it accepts no changes"
                    " to it); this change was not sent",
                    new.streams,
                )
            elif n.key != s.key:
                surfaced += outbox.surface_unsent(
                    s,
                    f"the key of {t!r} changed on the server from {s.key!r} to {n.key!r};"
                    f" this change of the row with {s.key} {{key}} was not sent: make it"
                    " again on the row under its new key, then discard this one",
                    new.streams,
                )
                held = outbox.hold_in_flight(t)
                if held:
                    changes.append(f"held {held} changes of {t} sent before its key changed")
            else:
                gone = {c.name for c in s.columns} - {c.name for c in n.columns}
                if gone:
                    dropped[t] = gone
        if not pushed and outbox.in_flight_from():
            # Numbered, unanswered, and no unit left to carry them (any unit that pushes
            # would: the server answers one it applied from its log, refuses the others).
            surfaced += outbox.surface_in_flight(new.streams)
            self.renew_client_id(same_session=True)
            changes.append("new client id: changes sent before are answered by nobody now")
        if surfaced:
            changes.append(f"surfaced {surfaced} unsendable changes")
        if dropped:
            frozen = outbox.freeze(streams, dropped)
            if frozen:
                changes.append(f"froze {len(frozen)} changes before columns were dropped")
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
                changes += transform(c, s, have, want)
            else:
                for name, typ in want.items():
                    if name not in have:
                        c.execute(f"ALTER TABLE {t} ADD COLUMN {quote(name)} {typ}")
                        changes.append(f"added {s.local_table}.{name}")
                for name in have:
                    if name not in want and not name.startswith("syncunit_"):
                        c.execute(f"ALTER TABLE {t} DROP COLUMN {quote(name)}")
                        changes.append(f"dropped {s.local_table}.{name}")
        else:
            c.execute(f"CREATE TABLE {t} ({column_defs(s.key, want)})")
            changes.append(f"created {s.local_table}")
            # A new table holds nothing: its subscriptions copy again.
            c.execute("DELETE FROM syncunit_holds WHERE local_table = ?", (s.local_table,))
            c.execute("DELETE FROM syncunit_deferred WHERE local_table = ?", (s.local_table,))
            c.execute(
                "DELETE FROM syncunit_cursors WHERE stream LIKE ? ESCAPE '\\'",
                (s.name.replace("_", "\\_") + "@%",),
            )
        self._create_indexes(s)
        row = c.execute(
            "SELECT definition FROM syncunit_cursors WHERE stream = ?", (s.name,)
        ).fetchone()
        # A changed definition keeps the cursor (the server answers with a reset, which
        # is downloaded beside the rows and swapped in when complete), unless the table
        # is new and empty: without a cursor the server sends a plain first copy.
        if row is not None and row[0] != s.definition and not have:
            c.execute("DELETE FROM syncunit_cursors WHERE stream = ?", (s.name,))
            changes.append(f"reset cursor of {s.name}")
        shadow = c.execute(
            "SELECT shadow FROM syncunit_resets WHERE stream = ? AND definition != ?",
            (s.name, s.definition),
        ).fetchone()
        if shadow is not None:  # a re-download of the old definition: start it again
            c.execute(f"DROP TABLE IF EXISTS {quote(shadow[0])}")
            c.execute("DELETE FROM syncunit_resets WHERE stream = ?", (s.name,))
        return changes

    def _drop_retired_indexes(self, old: Catalog, new: Catalog) -> list[str]:
        """Drop the local indexes the old catalog declared and the new one no longer does
        (those it declares are made by ``_migrate``); the rows stay as they are."""
        wanted = {(s.local_table, local_index_name(s, ix)) for s in new.streams for ix in s.indexes}
        tables = {s.local_table for s in new.streams}
        retired = sorted(
            {(s.local_table, local_index_name(s, ix)) for s in old.streams for ix in s.indexes}
            - wanted
        )
        changes = []
        for table, name in retired:
            if table in tables:
                self.conn.execute(f"DROP INDEX IF EXISTS {quote(name)}")
                changes.append(f"dropped index {name}")
        return changes

    def _close_orphans(
        self, old: Catalog, new: Catalog, closing: list[ClosedByCatalog]
    ) -> list[str]:
        """Close the held subscriptions whose unit the new catalog no longer has (or no
        longer pulls): renamed or removed, no request may carry them. Their holds go
        with them (rows nothing else holds are removed), as ``unsubscribe`` does; each
        is added to ``closing``, for the client to report."""
        changes = []
        for sub_id, unit, raw, _, _ in self.subscriptions():
            info = new.unit(unit)
            if info is not None and info.direction != "push":
                continue
            was = old.unit(unit)
            names = set() if was is None else set(was.streams)
            streams = [s for s in old.streams if s.name in names]
            removed = self.close_subscription(sub_id, streams)
            log.warning(
                "subscription %s was closed: the server no longer has a unit %r that"
                " pulls (%d local rows it alone held were removed)",
                sub_id, unit, removed,
            )  # fmt: skip
            changes.append(f"closed subscription {sub_id}")
            closing.append(ClosedByCatalog(sub_id, unit, json.loads(raw), removed))
        return changes

    def _create_indexes(self, s: StreamInfo) -> None:
        cache = int(self.conn.execute("PRAGMA cache_size").fetchone()[0])
        larger = -INDEX_BUILD_CACHE_KIB < cache < 0  # a size in KiB below ours
        if larger:
            self.conn.execute(f"PRAGMA cache_size = {-INDEX_BUILD_CACHE_KIB}")
        try:
            for stmt in local_table_ddl(s)[1:]:  # as in snapshot files: see copy_rows()
                self.conn.execute(stmt)
        finally:
            if larger:
                self.conn.execute(f"PRAGMA cache_size = {cache}")

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
                c.execute(f"DROP INDEX IF EXISTS {quote(local_index_name(s, ix))}")
            self.set_fact(INDEXES_SUSPENDED + s.name, s.local_table)
        return True

    def restore_indexes(self, s: StreamInfo) -> None:
        """Build the secondary indexes ``suspend_indexes`` dropped (idempotent)."""
        with self.atomic():
            self._create_indexes(s)
            self.conn.execute(
                "DELETE FROM syncunit_local WHERE key = ?", (INDEXES_SUSPENDED + s.name,)
            )

    def _end_suspension(self, s: StreamInfo) -> None:
        """A copy that completes makes its table whole: indexes a first copy dropped
        come back in the same transaction."""
        if self.get_fact(INDEXES_SUSPENDED + s.name) is not None:
            self.restore_indexes(s)

    def _renew_triggers(self, catalog: Catalog) -> None:
        """Make the outbox triggers this engine's, where an earlier one made them (a
        database opened after an upgrade): the changes recorded from then on are in
        the form this engine reads best (see ``triggers.py``). Decided again inside the
        write, on the catalog stored then: another process may have applied a new one
        since ``catalog`` was read, with triggers of its own."""
        with self.lock:
            if not self._stale_triggers(catalog):
                return
        with self.atomic():
            raw = self.get_fact("catalog")
            if raw is None:
                return
            for stream in self._stale_triggers(decode_catalog(raw.encode())):
                for stmt in trigger_ddl(stream):
                    self.conn.execute(stmt)

    def _stale_triggers(self, catalog: Catalog) -> list[StreamInfo]:
        """The pushed streams of ``catalog`` whose outbox triggers differ from this
        engine's."""
        made = dict(self.conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'"))
        pushed = {t for u in catalog.units for t in u.push}
        stale = []
        for stream in catalog.streams:
            if stream.local_table not in pushed:
                continue
            creates = [stmt for stmt in trigger_ddl(stream) if stmt.startswith("CREATE")]
            if [made.get(n) for n in trigger_names(stream.local_table)] != creates:
                stale.append(stream)
        return stale

    def _restore_suspended(self, catalog: Catalog) -> None:
        """Restore indexes a copy left suspended (the process ended before it did)."""
        with self.lock:
            rows = self.conn.execute(
                "SELECT key FROM syncunit_local WHERE key LIKE ?", (INDEXES_SUSPENDED + "%",)
            ).fetchall()
        for (key,) in rows:
            info = catalog.stream(key.removeprefix(INDEXES_SUSPENDED))
            if info is not None:
                self.restore_indexes(info)

    @contextmanager
    def bulk(self) -> Iterator[None]:
        """During a sync: no automatic WAL checkpoints until it ends.

        Each checkpoint copies pages back into the database file; during a large
        download the same pages change again and again, so one checkpoint after
        the sync writes each of them once. After a large download that checkpoint
        runs in the background, on a connection of its own (a passive one: the
        app reads and writes meanwhile), so neither the end of the sync nor the
        app's next write waits for it. A small delta leaves the WAL small.
        """
        with self.lock:
            self._bulk += 1
            self.conn.execute("PRAGMA wal_autocheckpoint=0")
        try:
            yield
        finally:
            with self.lock:
                self._bulk -= 1
                if not (self._bulk or self._closed or self._checkpoint_in_background()):
                    self.conn.execute(f"PRAGMA wal_autocheckpoint={AUTO_CHECKPOINT}")

    def _checkpoint_in_background(self) -> bool:
        """Start a background checkpoint if the WAL is past ``BIG_WAL``; hold the lock.

        Automatic checkpoints stay off until it ends (``_checkpoint`` gives them
        back). True when one was started, or one is already under way.
        """
        if self._checkpointer is not None and self._checkpointer.is_alive():
            return True
        wal = None if self.path is None else Path(f"{self.path}-wal")
        if wal is None or not wal.exists() or wal.stat().st_size <= BIG_WAL:
            return False
        self.conn.execute("PRAGMA wal_autocheckpoint=0")
        self._checkpointer = threading.Thread(
            target=self._checkpoint, name="syncunit-checkpoint", daemon=True
        )
        self._checkpointer.start()
        return True

    def _checkpoint(self) -> None:
        """Copy the WAL into the database file, then let commits checkpoint again."""
        try:
            conn = sqlite3.connect(str(self.path), timeout=30)
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            finally:
                conn.close()
        except sqlite3.Error as exc:  # the next commits checkpoint instead
            log.warning("background WAL checkpoint failed: %s", exc)
        with self.lock:
            if not self._bulk and not self._closed:
                self.conn.execute(f"PRAGMA wal_autocheckpoint={AUTO_CHECKPOINT}")

    # -- cursors and sync properties ---------------------------------------------------------

    def cursors(self, streams: Sequence[str]) -> dict[str, str]:
        """The cursor to send per stream: a re-download in progress sends its own."""
        marks = ",".join("?" * len(streams))
        with self.lock:
            rows = self.conn.execute(
                f"SELECT stream, cursor FROM syncunit_cursors WHERE stream IN ({marks})",
                list(streams),
            ).fetchall()
            rows += self.conn.execute(
                f"SELECT stream, cursor FROM syncunit_resets WHERE stream IN ({marks})",
                list(streams),
            ).fetchall()
        return {r[0]: r[1] for r in rows}

    def resets_in_progress(self) -> dict[str, str]:
        """Streams being downloaded again (stream name -> local table)."""
        return dict(self.query("SELECT stream, local_table FROM syncunit_resets"))

    def last_sync_on(self, unit: str) -> str | None:
        """When ``unit`` last completed (ISO 8601, UTC), or None."""
        sql = "SELECT last_sync_on FROM syncunit_sync_properties WHERE unit = ?"
        rows = self.query(sql, (unit,))
        return rows[0][0] if rows else None

    def complete_unit(self, unit: str, result_json: str) -> None:
        """Record LastSyncOn and the run's result (not worth an fsync: a lost one
        only shows an older time)."""
        with self.relaxed():
            self.conn.execute(
                "INSERT INTO syncunit_sync_properties (unit, last_sync_on, last_result)"
                " VALUES (?, ?, ?) ON CONFLICT(unit) DO UPDATE SET"
                " last_sync_on = excluded.last_sync_on, last_result = excluded.last_result",
                (unit, utcnow(), result_json),
            )

    # -- subscriptions ------------------------------------------------------------------------

    def recopy_due(self, names: Sequence[str]) -> bool:
        """Whether a cursor of ``names`` is marked to copy afresh (``recopy.py``)."""
        with self.lock:
            return recopy.due(self.conn, names)

    def take_recopies(self, names: Sequence[str]) -> list[str]:
        """Before a request carrying the cursors ``names`` is built: drop those marked to
        copy afresh (``recopy.py``); return them."""
        with self.lock:
            if not recopy.due(self.conn, names):
                return []
            with self.atomic() as c:
                return recopy.take(c, names)

    def subscription_cursors(self, holder: str, streams: Sequence[str]) -> dict[str, str]:
        """The cursors of a subscription's streams, by stream name."""
        names = {holds.cursor_name(s, holder): s for s in streams}
        marks = ",".join("?" * len(names))
        rows = self.query(
            f"SELECT stream, cursor FROM syncunit_cursors WHERE stream IN ({marks})", list(names)
        )
        return {names[n]: cur for n, cur in rows}

    def open_subscription(
        self, sub_id: str, unit: str, params_json: str, now: float, keep_for: float | None
    ) -> None:
        """Record (or touch) a subscription: the app opened ``unit`` with these values.

        ``keep_for`` None keeps the one set before (a refresh, a triggered run, says
        none); ``math.inf`` holds the subscription until it is closed."""
        stored = None if keep_for is None or math.isinf(keep_for) else keep_for
        with self.atomic() as c:
            c.execute(
                "INSERT INTO syncunit_subscriptions (id, unit, params, opened_at, used_at,"
                " keep_for) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET"
                " used_at = excluded.used_at,"
                " keep_for = CASE WHEN ? THEN keep_for ELSE excluded.keep_for END",
                (sub_id, unit, params_json, utcnow(), now, stored, keep_for is None),
            )

    def touch_subscription(self, sub_id: str, now: float) -> None:
        """Record subscription ``sub_id`` as used at ``now``."""
        with self.atomic() as c:
            c.execute("UPDATE syncunit_subscriptions SET used_at = ? WHERE id = ?", (now, sub_id))

    def subscriptions(self) -> list[tuple[str, str, str, float, float | None]]:
        """Every held subscription: (id, unit, params JSON, used_at, keep_for)."""
        sql = "SELECT id, unit, params, used_at, keep_for FROM syncunit_subscriptions"
        return [(r[0], r[1], r[2], r[3], r[4]) for r in self.query(sql + " ORDER BY opened_at, id")]

    def close_subscription(self, sub_id: str, streams: Sequence[StreamInfo]) -> int:
        """Forget a subscription in one transaction: release its holds (rows no one
        else holds go) and its cursors. Returns the number of rows removed."""
        with self.atomic() as c:
            c.execute("UPDATE syncunit_state SET applying = 1 WHERE id = 1")
            removed = holds.close_subscription(self, sub_id, streams)
            c.execute("UPDATE syncunit_state SET applying = 0 WHERE id = 1")
        return removed

    def carry_out_removals(self, streams: Sequence[StreamInfo]) -> int:
        """Remove the rows whose removal waited for their changes to be answered (and
        that nothing holds now), in one transaction; return how many went."""
        with self.lock:
            if not holds.has_deferred(self.conn):
                return 0
            with self.atomic() as c:
                c.execute("UPDATE syncunit_state SET applying = 1 WHERE id = 1")
                removed = holds.carry_out(c, streams)
                c.execute("UPDATE syncunit_state SET applying = 0 WHERE id = 1")
        return removed

    def rows(self, table: str, columns: Sequence[str] | None = None) -> list[tuple[Any, ...]]:
        """Every row of a local table (for checks and small tables)."""
        cols = "*" if columns is None else ", ".join(map(quote, columns))
        with self.lock:
            return list(self.conn.execute(f"SELECT {cols} FROM {quote(table)}"))
