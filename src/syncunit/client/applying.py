"""Applying a pull's chunks to the local tables: in place, or beside the old copy.

Methods of ``LocalStore`` (``store.py``), kept here as a mixin: each chunk is
applied with its cursor in one transaction; a pull leaves rows with a local
change the server has not answered alone; the outbox triggers stay quiet
(dropped and made again inside a large chunk's transaction, a flag for a small
one); a first copy's rows go in as plain INSERTs (only the insert trigger set
aside), merged instead where a key is already there; an upsert rewrites index
entries only where an indexed value changed; a reset of more than one chunk
goes into a shadow table, swapped in when complete.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, cast

import msgspec

from syncunit.client import holds
from syncunit.client.schema import INDEXES_SUSPENDED, column_defs, quote, sql_type
from syncunit.client.triggers import trigger_ddl
from syncunit.errors import LocalStoreError
from syncunit.protocol import Chunk, StreamInfo

if TYPE_CHECKING:
    from syncunit.client.store import LocalStore

__all__ = ["BULK_ROWS", "ChunkApply", "save_cursor"]

#: Chunks of at least this many rows are applied with the outbox triggers dropped.
BULK_ROWS = 256


def save_cursor(
    conn: sqlite3.Connection, stream: StreamInfo, cursor: str, holder: str | None = None
) -> None:
    """Record where ``stream`` (as ``holder`` holds it) continues from."""
    conn.execute(
        "INSERT INTO syncunit_cursors (stream, local_table, definition, cursor)"
        " VALUES (?, ?, ?, ?) ON CONFLICT(stream) DO UPDATE SET"
        " cursor = excluded.cursor, definition = excluded.definition",
        (holds.cursor_name(stream.name, holder), stream.local_table, stream.definition, cursor),
    )


class ChunkApply:
    """``LocalStore``'s chunk application: the store is ``self``."""

    if TYPE_CHECKING:  # what these methods use of the store
        conn: sqlite3.Connection
        errors: tuple[type[Exception], ...]
        pushed: set[str]
        held: set[str]
        copying: set[str]
        fresh_copies: set[str]
        rereading: set[str]
        _upserts: dict[tuple[str, tuple[str, ...], bool], str]
        _fixes: dict[tuple[str, tuple[str, ...]], tuple[str, str, list[int]] | None]

        def relaxed(self) -> AbstractContextManager[sqlite3.Connection]: ...
        def get_fact(self, key: str) -> str | None: ...
        def _end_suspension(self, s: StreamInfo) -> None: ...

    # -- applying chunks -----------------------------------------------------------------------

    def apply_chunk(
        self, stream: StreamInfo, chunk: Chunk, holder: str | None = None
    ) -> tuple[int, int]:
        """Apply one chunk and store its cursor in one transaction; return (upserted, removed).

        ``holder`` names the subscription the chunk belongs to (None: the unit's
        stream without parameters); a subscription's chunks apply in place and
        release only its own rows (``holds.py``).

        Pulls don't clobber: rows with a local change the server has not accepted
        yet are left as they are; the push resolves them.

        A reset (a full re-download) that takes more than one chunk goes into a
        shadow table beside the local one, and its cursor beside the stream's: the
        app keeps reading its complete previous rows, an interrupted download
        resumes, and the chunk that completes it swaps the new rows in, in one
        transaction.

        A stream in ``fresh_copies`` opens a copy the request asked for without its
        cursor (a stream new to the unit as the device knew it): a first copy is the
        whole picture, so over rows the device holds already it is a reset too.
        """
        first_copy = stream.name in self.fresh_copies
        self.fresh_copies.discard(stream.name)
        try:
            with self.relaxed() as c:  # a lost chunk is fetched again: no fsync
                if holder and stream.local_table in self.held:
                    name = holds.cursor_name(stream.name, holder)
                    if name in self.rereading:  # a delta from the cursor dropped: copied anew
                        return 0, 0
                    if (
                        not chunk.reset
                        and not c.execute(
                            "SELECT 1 FROM syncunit_cursors WHERE stream = ?", (name,)
                        ).fetchone()
                    ):
                        # A first copy is the whole picture: rows it held before go too.
                        chunk = msgspec.structs.replace(chunk, reset=True)
                    with self._quiet(stream, bulk=False):
                        done = holds.apply_held(cast("LocalStore", self), stream, chunk, holder)
                    self._save_cursor(stream, chunk.cursor, holder)
                    return done
                shadow = c.execute(
                    "SELECT shadow FROM syncunit_resets WHERE stream = ?", (stream.name,)
                ).fetchone()
                if not chunk.reset and self._first_copy_over_rows(
                    stream, first_copy, shadow is not None
                ):
                    # A first copy is the whole picture: rows pushed or copied before it
                    # that are not in it (moved out of scope, deleted meanwhile) go too.
                    chunk = msgspec.structs.replace(chunk, reset=True)
                if chunk.reset and not chunk.complete:
                    return self._apply_shadow(stream, chunk, self._start_shadow(stream))
                if shadow is not None and not chunk.reset:
                    return self._apply_shadow(stream, chunk, shadow[0])
                if shadow is not None:  # a reset in one chunk replaces the one under way
                    self._drop_shadow(stream.name, shadow[0])
                return self._apply_in_place(stream, chunk)
        except self.errors as exc:
            raise LocalStoreError(f"cannot apply a chunk to {stream.local_table}: {exc}") from exc

    def _first_copy_over_rows(self, stream: StreamInfo, first_copy: bool, shadow: bool) -> bool:
        """Whether a chunk that is no reset opens a first copy over rows already there:
        with no cursor yet (rows written here, pushed, or kept by a logout), or asked for
        without the cursor the device holds (``first_copy``: a stream new to the unit as
        the device knew it, the device holding its rows from another unit), which also
        replaces a re-download under way."""
        c = self.conn
        if shadow:
            return first_copy
        cursor = "SELECT 1 FROM syncunit_cursors WHERE stream = ?"
        if not first_copy and c.execute(cursor, (stream.name,)).fetchone() is not None:
            return False
        return (
            c.execute(f"SELECT 1 FROM {quote(stream.local_table)} LIMIT 1").fetchone() is not None
        )

    def _apply_in_place(self, stream: StreamInfo, chunk: Chunk) -> tuple[int, int]:
        # The outbox triggers must not record server changes. For a large chunk they
        # are dropped and created again inside the transaction (other connections
        # never see them missing); for a small one a flag in syncunit_state keeps
        # them quiet, at the cost of a check per row.
        rows_in = chunk.row_count()
        bulk = rows_in >= BULK_ROWS and stream.local_table in self.pushed
        # Rows subscriptions hold too (a table without any costs one lookup).
        held = stream.local_table in self.held and holds.has_holds(self.conn, stream.local_table)
        if (
            stream.name in self.copying
            and rows_in
            and not (chunk.reset or chunk.removed or held)
            and self._insert_new(stream, chunk, bulk)
        ):
            upserted, removed = rows_in, 0
            k = chunk.columns.index(stream.key)
            holds.undefer(self.conn, stream.local_table, [r[k] for r in chunk.row_list()])
        else:
            upserted, removed = self._merge(stream, chunk, rows_in, bulk, held)
        if chunk.complete:
            self._end_suspension(stream)
        self._save_cursor(stream, chunk.cursor)
        return upserted, removed

    def _insert_new(self, stream: StreamInfo, chunk: Chunk, bulk: bool) -> bool:
        """A first copy's chunk as plain INSERTs, its keys being new; False, with nothing
        left of the attempt, when one is not (the app or a push wrote the row since the
        copy began) or a local change is pending: the caller merges the rows instead.

        A plain INSERT fires the insert triggers only, so only those are set aside
        (creating the update trigger again is most of the cost of swapping them all;
        an upsert would compile it in).
        """
        c = self.conn
        if holds.has_pending(c, stream.local_table):
            return False
        sql = self._upsert_sql(stream, tuple(chunk.columns), new=True)
        ddl = trigger_ddl(stream)
        n = len(ddl) // 2  # the drops, then the creates, of the triggers (see trigger_ddl)
        inserts = (0, n - 1)  # after insert, before insert
        c.execute("SAVEPOINT syncunit_insert_new")  # any other error: the caller rolls back
        try:
            if bulk:
                for i in inserts:
                    c.execute(ddl[i])
            else:
                c.execute("UPDATE syncunit_state SET applying = 1 WHERE id = 1")
            c.executemany(sql, chunk.row_list())
            if bulk:
                for i in inserts:
                    c.execute(ddl[n + i])
            else:
                c.execute("UPDATE syncunit_state SET applying = 0 WHERE id = 1")
        except sqlite3.IntegrityError:
            c.execute("ROLLBACK TO syncunit_insert_new")
            c.execute("RELEASE syncunit_insert_new")
            return False
        c.execute("RELEASE syncunit_insert_new")
        return True

    def _merge(
        self, stream: StreamInfo, chunk: Chunk, rows_in: int, bulk: bool, held: bool
    ) -> tuple[int, int]:
        """Apply a chunk's reset, removals and rows over what the table holds."""
        c = self.conn
        t = quote(stream.local_table)
        key = quote(stream.key)
        upserted = removed = 0
        with self._quiet(stream, bulk):
            if chunk.reset and held:
                removed += holds.reset_plain(c, stream)
            elif chunk.reset:
                cur = c.execute(
                    f"DELETE FROM {t} WHERE {key} NOT IN"
                    " (SELECT row_key FROM syncunit_outbox WHERE table_name = ?)",
                    (stream.local_table,),
                )
                removed += cur.rowcount
            if held:
                removed += holds.release(c, stream, list(chunk.removed), "")
            else:
                # Kept for their changes: removed once these are answered (holds.carry_out).
                pending = holds.pending_among(c, stream.local_table, chunk.removed)
                holds.defer(c, stream.local_table, [k for k in chunk.removed if k in pending])
                gone = [(k,) for k in chunk.removed if k not in pending]
                if gone:
                    cur = c.executemany(f"DELETE FROM {t} WHERE {key} = ?", gone)
                    removed += max(cur.rowcount, 0)
            if rows_in:
                k = chunk.columns.index(stream.key)
                rows: Any = chunk.row_list()
                keys = [r[k] for r in rows]
                if held:
                    holds.mark_plain(c, stream.local_table, keys)
                holds.undefer(c, stream.local_table, keys)
                pending = holds.pending_among(c, stream.local_table, keys)
                if pending:
                    rows = [r for r in rows if r[k] not in pending]
                self._write_rows(stream, tuple(chunk.columns), rows)
                upserted = rows_in  # received; rows with pending changes kept theirs
        return upserted, removed

    @contextmanager
    def _quiet(self, stream: StreamInfo, bulk: bool) -> Iterator[None]:
        """The outbox triggers do not record what runs inside (in a transaction)."""
        c = self.conn
        ddl = trigger_ddl(stream)
        if bulk:
            for stmt in ddl[: len(ddl) // 2]:
                c.execute(stmt)
        else:
            c.execute("UPDATE syncunit_state SET applying = 1 WHERE id = 1")
        yield
        if bulk:
            for stmt in ddl[len(ddl) // 2 :]:
                c.execute(stmt)
        else:
            c.execute("UPDATE syncunit_state SET applying = 0 WHERE id = 1")

    def _save_cursor(self, stream: StreamInfo, cursor: str, holder: str | None = None) -> None:
        save_cursor(self.conn, stream, cursor, holder)

    # -- re-downloads beside the old copy ---------------------------------------------------

    def _start_shadow(self, stream: StreamInfo) -> str:
        c = self.conn
        shadow = f"syncunit_reset_{stream.local_table}"
        c.execute(f"DROP TABLE IF EXISTS {quote(shadow)}")
        want = {col.name: sql_type(col.type) for col in stream.columns}
        c.execute(f"CREATE TABLE {quote(shadow)} ({column_defs(stream.key, want)})")
        c.execute(
            "INSERT INTO syncunit_resets (stream, local_table, shadow, definition, cursor)"
            " VALUES (?, ?, ?, ?, '') ON CONFLICT(stream) DO UPDATE SET"
            " shadow = excluded.shadow, definition = excluded.definition, cursor = ''",
            (stream.name, stream.local_table, shadow, stream.definition),
        )
        return shadow

    def _drop_shadow(self, stream_name: str, shadow: str) -> None:
        self.conn.execute(f"DROP TABLE IF EXISTS {quote(shadow)}")
        self.conn.execute("DELETE FROM syncunit_resets WHERE stream = ?", (stream_name,))

    def _apply_shadow(self, stream: StreamInfo, chunk: Chunk, shadow: str) -> tuple[int, int]:
        c = self.conn
        s, key = quote(shadow), quote(stream.key)
        if chunk.removed:
            c.executemany(f"DELETE FROM {s} WHERE {key} = ?", [(k,) for k in chunk.removed])
        upserted = chunk.row_count()
        if upserted:
            sql = self._upsert_sql(stream, tuple(chunk.columns), shadow)
            c.executemany(sql, chunk.row_list())
        if not chunk.complete:
            c.execute(
                "UPDATE syncunit_resets SET cursor = ? WHERE stream = ?",
                (chunk.cursor, stream.name),
            )
            return upserted, 0
        # Complete: the new copy replaces the old one; rows with unpushed changes stay.
        t = quote(stream.local_table)
        pending = "SELECT row_key FROM syncunit_outbox WHERE table_name = ?"
        names = ", ".join(quote(col.name) for col in stream.columns)
        bulk = stream.local_table in self.pushed
        held = stream.local_table in self.held and holds.has_holds(c, stream.local_table)
        with self._quiet(stream, bulk):
            if held:  # rows subscriptions hold stay; the new copy overwrites them
                removed = holds.reset_plain(c, stream)
                holds.mark_plain(
                    c,
                    stream.local_table,
                    [r[0] for r in c.execute(f"SELECT {key} FROM {s}")],
                )
            else:
                removed = c.execute(
                    f"DELETE FROM {t} WHERE {key} NOT IN ({pending})", (stream.local_table,)
                ).rowcount
            # Rows the new copy brings stand; those kept only for their changes wait.
            brought = [r[0] for r in c.execute(f"SELECT {key} FROM {s}")]
            holds.undefer(c, stream.local_table, brought)
            c.execute(
                f"INSERT OR REPLACE INTO {t} ({names}) SELECT {names} FROM {s}"
                f" WHERE {key} NOT IN ({pending})",
                (stream.local_table,),
            )
        self._drop_shadow(stream.name, shadow)
        self._end_suspension(stream)
        self._save_cursor(stream, chunk.cursor)
        return upserted, max(removed, 0)

    def _write_rows(
        self,
        stream: StreamInfo,
        columns: tuple[str, ...],
        rows: Iterable[Sequence[Any]],
    ) -> None:
        """Upsert ``rows`` into the stream's local table, rewriting index entries only
        where an indexed value changed.

        An upsert that sets every column rewrites each secondary index entry of each
        row it updates, changed or not: in a large table those entries sit on pages
        of their own, so a delta dirtied (and wrote to the WAL) about three pages per
        row instead of one. Here the upsert sets the columns no index reads, and a
        second statement sets the indexed ones only on rows where one of them
        differs. Same rows in the end. A first copy (its rows all new: the second
        statement would only cost a lookup per row) takes the single statement.
        """
        c = self.conn
        split = self._index_fix(stream, columns)
        if (
            split is None
            or stream.name in self.copying
            or self.get_fact(INDEXES_SUSPENDED + stream.name) is not None
        ):
            c.executemany(self._upsert_sql(stream, columns), rows)
            return
        upsert, fix, picks = split
        rows = list(rows)
        c.executemany(upsert, rows)
        c.executemany(fix, [[r[i] for i in picks] for r in rows])

    def _index_fix(
        self, stream: StreamInfo, columns: tuple[str, ...]
    ) -> tuple[str, str, list[int]] | None:
        """For ``_write_rows``: the upsert of the columns no index reads, the update of
        the indexed ones where they differ, and the positions of its parameters."""
        cache_key = (stream.local_table, columns)
        if cache_key in self._fixes:
            return self._fixes[cache_key]
        indexed = {col for ix in stream.indexes for col in ix} - {stream.key}
        fixed = [col for col in columns if col in indexed]
        split = None
        if fixed:
            plain = [col for col in columns if col not in indexed]
            sets = ", ".join(f"{quote(col)} = ?" for col in fixed)
            # Binary collation and the type too: a value that merely compares equal
            # (another case, 1 against 1.0) is written, as the plain upsert would.
            differs = " OR ".join(
                f"{quote(col)} IS NOT ? COLLATE BINARY OR typeof({quote(col)}) IS NOT typeof(?)"
                for col in fixed
            )
            fix = (
                f"UPDATE {quote(stream.local_table)} SET {sets}"
                f" WHERE {quote(stream.key)} = ? AND ({differs})"
            )
            at = [columns.index(col) for col in fixed]
            picks = [*at, columns.index(stream.key), *(i for i in at for _ in range(2))]
            split = (self._upsert_sql(stream, columns, only=plain), fix, picks)
        self._fixes[cache_key] = split
        return split

    def _upsert_sql(
        self,
        stream: StreamInfo,
        columns: tuple[str, ...],
        table: str | None = None,
        *,
        only: Sequence[str] | None = None,
        new: bool = False,
    ) -> str:
        """The upsert of ``columns`` into ``table``; ``only``: the columns a conflict sets
        (default: all but the key); ``new``: a plain INSERT, failing on a key that exists."""
        table = table or stream.local_table
        cache_key = (table, columns, new)
        sql = None if only is not None else self._upserts.get(cache_key)
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
                f"{quote(c)} = excluded.{quote(c)}"
                for c in (columns if only is None else only)
                if c != stream.key
            )
            sql = f"INSERT INTO {quote(table)} ({names}) VALUES ({marks})"
            if not new:
                sql += (
                    f" ON CONFLICT({quote(stream.key)}) DO UPDATE SET {sets}"
                    if sets
                    else " ON CONFLICT DO NOTHING"
                )
            if only is None:
                self._upserts[cache_key] = sql
        return sql
