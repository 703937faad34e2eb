"""Subscriptions on the device, and which of them holds which local row.

A unit run with client parameters (``client.sync("PatientDetails",
params={"patient_id": 42})``) is a **subscription**: it is recorded in
``syncunit_subscriptions``, and its streams' cursors are kept as
``stream@Unit?{"patient_id":42}`` in ``syncunit_cursors``, one per parameter
values, so reopening is a delta and two values never share a cursor.

In a local table that a stream with client parameters fills, ``syncunit_holds``
records which subscription holds which row. The table's stream without
parameters (Login's) is recorded there as ``''``, but only beside a
subscription's hold: a row without any hold is that stream's alone, so its
chunks cost one lookup while no subscription holds rows of the table. A
removal, a reset or closing a subscription releases only its own holds; a row
is deleted when no hold remains. A subscription's fresh copy (a reset) that takes
more than one response keeps the rows it held until it completes: its holds are
set aside as retiring (``retiring``) and released with the copy's last chunk,
except those the new copy took again.

A row with an unpushed local change stays where a removal would delete it
(pulls don't clobber): the removal is recorded in ``syncunit_deferred`` and
carried out once the change is answered and no hold remains (``carry_out``),
unless the server sends the row again meanwhile.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from syncunit.client.schema import quote
from syncunit.protocol import Chunk, StreamInfo

if TYPE_CHECKING:
    from syncunit.client.store import LocalStore

__all__ = [
    "DDL",
    "DEFERRED_DDL",
    "apply_held",
    "carry_out",
    "close_subscription",
    "defer",
    "release",
    "reread",
    "undefer",
]

#: The engine tables of subscriptions (migration step 3).
DDL = [
    "CREATE TABLE syncunit_subscriptions (id TEXT PRIMARY KEY, unit TEXT NOT NULL,"
    " params TEXT NOT NULL, opened_at TEXT NOT NULL, used_at REAL NOT NULL, keep_for REAL)",
    "CREATE TABLE syncunit_holds (local_table TEXT NOT NULL, row_key NOT NULL,"
    " holder TEXT NOT NULL, PRIMARY KEY (local_table, row_key, holder)) WITHOUT ROWID",
    "CREATE INDEX ix_syncunit_holds_holder ON syncunit_holds (holder, local_table)",
]

#: Removals put off while the row had an unpushed change (migration step 4).
DEFERRED_DDL = [
    "CREATE TABLE syncunit_deferred (local_table TEXT NOT NULL, row_key NOT NULL,"
    " PRIMARY KEY (local_table, row_key)) WITHOUT ROWID",
]


def cursor_name(stream: str, holder: str | None) -> str:
    """Where a stream's cursor is kept: its name, or ``stream@subscription``."""
    return f"{stream}@{holder}" if holder else stream


def has_holds(conn: sqlite3.Connection, table: str) -> bool:
    row = conn.execute("SELECT 1 FROM syncunit_holds WHERE local_table = ? LIMIT 1", (table,))
    return row.fetchone() is not None


#: Keys bound in one ``IN (...)``, at most (fewer if the connection allows fewer variables).
KEYS_PER_QUERY = 500


def has_pending(conn: sqlite3.Connection, table: str) -> bool:
    """Whether a change to a row of ``table`` is in the outbox."""
    row = conn.execute("SELECT 1 FROM syncunit_outbox WHERE table_name = ? LIMIT 1", (table,))
    return row.fetchone() is not None


def pending_among(conn: sqlite3.Connection, table: str, keys: Iterable[Any]) -> set[Any]:
    """Those of ``keys`` whose rows of ``table`` have a change in the outbox: looked up
    by key, a few hundred at a time, however many changes the outbox holds."""
    wanted = list(dict.fromkeys(keys))
    found: set[Any] = set()
    if not wanted or not has_pending(conn, table):
        return found
    step = min(KEYS_PER_QUERY, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) - 1)
    for i in range(0, len(wanted), step):
        part = wanted[i : i + step]
        marks = ",".join("?" * len(part))
        rows = conn.execute(
            "SELECT DISTINCT row_key FROM syncunit_outbox"
            f" WHERE table_name = ? AND row_key IN ({marks})",
            (table, *part),
        )
        found.update(r[0] for r in rows)
    return found


#: Marks a subscription's holds set aside by its fresh copy under way.
_RETIRING = "\x1fretiring:"


def retiring(holder: str) -> str:
    """The holder name of ``holder``'s holds set aside by a fresh copy under way."""
    return _RETIRING + holder


def holders_of(conn: sqlite3.Connection, table: str, key: Any) -> set[str]:
    """The holders of row ``key`` of ``table`` (a retiring hold counts as its
    subscription's; ``''``: the stream without parameters)."""
    rows = conn.execute(
        "SELECT holder FROM syncunit_holds WHERE local_table = ? AND row_key = ?", (table, key)
    )
    return {r[0].removeprefix(_RETIRING) for r in rows}


def held_by(conn: sqlite3.Connection, table: str, holder: str) -> list[Any]:
    rows = conn.execute(
        "SELECT row_key FROM syncunit_holds WHERE local_table = ? AND holder = ?", (table, holder)
    )
    return [r[0] for r in rows]


def release(
    conn: sqlite3.Connection,
    stream: StreamInfo,
    keys: Sequence[Any],
    holder: str,
) -> int:
    """Drop ``holder``'s hold on ``keys``; delete the rows no one holds any more (those
    with an unpushed change wait: ``defer``).

    Returns the number of rows deleted.
    """
    if not keys:
        return 0
    table = stream.local_table
    conn.executemany(
        "DELETE FROM syncunit_holds WHERE local_table = ? AND row_key = ? AND holder = ?",
        [(table, k, holder) for k in keys],
    )
    kept: set[Any] = set()
    for k in keys:
        left = {
            r[0]
            for r in conn.execute(
                "SELECT holder FROM syncunit_holds WHERE local_table = ? AND row_key = ?",
                (table, k),
            )
        }
        if left:
            kept.add(k)
            if left == {""}:  # only the plain stream's mark: the row is its alone again
                conn.execute(
                    "DELETE FROM syncunit_holds WHERE local_table = ? AND row_key = ?", (table, k)
                )
    free = [k for k in keys if k not in kept]
    pending = pending_among(conn, table, free)
    defer(conn, table, [k for k in free if k in pending])
    gone = [(k,) for k in free if k not in pending]
    if not gone:
        return 0
    cur = conn.executemany(f"DELETE FROM {quote(table)} WHERE {quote(stream.key)} = ?", gone)
    return max(cur.rowcount, 0)


def reset_plain(conn: sqlite3.Connection, stream: StreamInfo) -> int:
    """The plain stream starts over: its marks go, and every row no subscription holds
    and without an unpushed change."""
    table, t, key = stream.local_table, quote(stream.local_table), quote(stream.key)
    conn.execute("DELETE FROM syncunit_holds WHERE local_table = ? AND holder = ''", (table,))
    cur = conn.execute(
        f"DELETE FROM {t} WHERE {key} NOT IN (SELECT row_key FROM syncunit_holds"
        f" WHERE local_table = ?1) AND {key} NOT IN"
        " (SELECT row_key FROM syncunit_outbox WHERE table_name = ?1)",
        (table,),
    )
    return max(cur.rowcount, 0)


def mark_plain(conn: sqlite3.Connection, table: str, keys: Sequence[Any]) -> None:
    """The plain stream holds ``keys`` too: record it where a subscription holds them."""
    conn.executemany(
        "INSERT OR IGNORE INTO syncunit_holds SELECT ?1, ?2, '' WHERE EXISTS"
        " (SELECT 1 FROM syncunit_holds WHERE local_table = ?1 AND row_key = ?2)",
        [(table, k) for k in keys],
    )


def apply_held(store: LocalStore, stream: StreamInfo, chunk: Chunk, holder: str) -> tuple[int, int]:
    """Apply a subscription's chunk in place (in the caller's transaction): its
    removals and reset release this holder only. Returns (upserted, removed)."""
    c = store.conn
    table, t, key = stream.local_table, quote(stream.local_table), quote(stream.key)
    upserted = removed = 0
    old = retiring(holder)
    if chunk.reset:
        # What it held stays in sight until the fresh copy completes.
        c.execute(
            "UPDATE OR IGNORE syncunit_holds SET holder = ? WHERE local_table = ? AND holder = ?",
            (old, table, holder),
        )
        c.execute(
            "DELETE FROM syncunit_holds WHERE local_table = ? AND holder = ?", (table, holder)
        )
    removed += release(c, stream, list(chunk.removed), holder)
    if chunk.row_count():
        k = chunk.columns.index(stream.key)
        rows: Any = chunk.row_list()
        keys = [r[k] for r in rows]
        if table in store.plain:  # a row here without holds is the plain stream's
            c.executemany(
                f"INSERT OR IGNORE INTO syncunit_holds SELECT ?2, {key}, '' FROM {t}"
                f" WHERE {key} = ?1 AND NOT EXISTS (SELECT 1 FROM syncunit_holds"
                " WHERE local_table = ?2 AND row_key = ?1)",
                [(v, table) for v in keys],
            )
        c.executemany(
            "INSERT OR IGNORE INTO syncunit_holds VALUES (?, ?, ?)",
            [(table, v, holder) for v in keys],
        )
        undefer(c, table, keys)
        pending = pending_among(c, table, keys)
        if pending:
            rows = [r for r in rows if r[k] not in pending]
        c.executemany(store._upsert_sql(stream, tuple(chunk.columns)), rows)
        upserted = len(keys)
    if chunk.complete:
        removed += release(c, stream, held_by(c, table, old), old)
    return upserted, removed


def close_subscription(store: LocalStore, sub_id: str, streams: Sequence[StreamInfo]) -> int:
    """Release every hold of a subscription and forget its cursors (in the caller's
    transaction); return the number of rows removed."""
    c = store.conn
    removed = 0
    for s in streams:
        for holder in (sub_id, retiring(sub_id)):
            removed += release(c, s, held_by(c, s.local_table, holder), holder)
        c.execute("DELETE FROM syncunit_cursors WHERE stream = ?", (cursor_name(s.name, sub_id),))
    c.execute("DELETE FROM syncunit_subscriptions WHERE id = ?", (sub_id,))
    return removed


def reread(
    conn: sqlite3.Connection, streams: Sequence[StreamInfo], table: str, key: Any
) -> list[str]:
    """The row ``key`` of ``table`` went (a change to it was refused, and the answer
    carried no row) while subscriptions still hold it: their streams of the table lose
    their cursors, so each copies afresh on its next refresh and brings the row back as
    it shows it. Returns the cursors dropped (``stream@subscription``)."""
    holders = sorted(holders_of(conn, table, key) - {""})
    names = [s.name for s in streams if s.local_table == table and s.params]
    dropped = [cursor_name(n, h) for h in holders for n in names]
    conn.executemany("DELETE FROM syncunit_cursors WHERE stream = ?", [(d,) for d in dropped])
    return dropped


def defer(conn: sqlite3.Connection, table: str, keys: Sequence[Any]) -> None:
    """Remember that the rows ``keys`` were to be removed but have unpushed changes."""
    if keys:
        conn.executemany(
            "INSERT OR IGNORE INTO syncunit_deferred VALUES (?, ?)", [(table, k) for k in keys]
        )


def undefer(conn: sqlite3.Connection, table: str, keys: Sequence[Any]) -> None:
    """The server sent the rows ``keys`` again: a removal put off no longer stands."""
    if keys and has_deferred(conn, table):
        conn.executemany(
            "DELETE FROM syncunit_deferred WHERE local_table = ? AND row_key = ?",
            [(table, k) for k in keys],
        )


def has_deferred(conn: sqlite3.Connection, table: str | None = None) -> bool:
    """Whether a removal waits on ``table`` (None: on any table)."""
    sql = "SELECT 1 FROM syncunit_deferred"
    row = conn.execute(
        *((sql + " WHERE local_table = ? LIMIT 1", (table,)) if table else (sql + " LIMIT 1",))
    )
    return row.fetchone() is not None


def carry_out(conn: sqlite3.Connection, streams: Sequence[StreamInfo]) -> int:
    """Carry out the removals put off for rows whose changes are now answered (in the
    caller's transaction, the outbox triggers quiet): a row no hold keeps is deleted.
    Returns the number of rows deleted."""
    if not has_deferred(conn):
        return 0
    removed = 0
    keys = {s.local_table: s.key for s in streams}
    tables = [r[0] for r in conn.execute("SELECT DISTINCT local_table FROM syncunit_deferred")]
    for table in tables:
        answered = (
            "local_table = ?1 AND NOT EXISTS (SELECT 1 FROM syncunit_outbox o"
            " WHERE o.table_name = ?1 AND o.row_key = syncunit_deferred.row_key)"
        )
        if table in keys:
            cur = conn.execute(
                f"DELETE FROM {quote(table)} WHERE {quote(keys[table])} IN"
                f" (SELECT row_key FROM syncunit_deferred WHERE {answered} AND NOT EXISTS"
                " (SELECT 1 FROM syncunit_holds h WHERE h.local_table = ?1"
                " AND h.row_key = syncunit_deferred.row_key))",
                (table,),
            )
            removed += max(cur.rowcount, 0)
        # Done (or held again, or the table is no longer synced): the record goes.
        conn.execute(f"DELETE FROM syncunit_deferred WHERE {answered}", (table,))
    return removed
