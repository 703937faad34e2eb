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
is deleted when no hold remains (rows with unpushed local changes stay).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from syncunit.client.schema import quote
from syncunit.protocol import Chunk, StreamInfo

if TYPE_CHECKING:
    from syncunit.client.store import LocalStore

__all__ = ["DDL", "apply_held", "close_subscription", "release"]

#: The engine tables of subscriptions (migration step 3).
DDL = [
    "CREATE TABLE syncunit_subscriptions (id TEXT PRIMARY KEY, unit TEXT NOT NULL,"
    " params TEXT NOT NULL, opened_at TEXT NOT NULL, used_at REAL NOT NULL, keep_for REAL)",
    "CREATE TABLE syncunit_holds (local_table TEXT NOT NULL, row_key NOT NULL,"
    " holder TEXT NOT NULL, PRIMARY KEY (local_table, row_key, holder)) WITHOUT ROWID",
    "CREATE INDEX ix_syncunit_holds_holder ON syncunit_holds (holder, local_table)",
]


def cursor_name(stream: str, holder: str | None) -> str:
    """Where a stream's cursor is kept: its name, or ``stream@subscription``."""
    return f"{stream}@{holder}" if holder else stream


def has_holds(conn: sqlite3.Connection, table: str) -> bool:
    row = conn.execute("SELECT 1 FROM syncunit_holds WHERE local_table = ? LIMIT 1", (table,))
    return row.fetchone() is not None


def pending_keys(conn: sqlite3.Connection, table: str) -> set[Any]:
    rows = conn.execute("SELECT row_key FROM syncunit_outbox WHERE table_name = ?", (table,))
    return {r[0] for r in rows}


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
    pending: set[Any],
) -> int:
    """Drop ``holder``'s hold on ``keys``; delete the rows no one holds any more.

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
    gone = [(k,) for k in keys if k not in kept and k not in pending]
    if not gone:
        return 0
    cur = conn.executemany(f"DELETE FROM {quote(table)} WHERE {quote(stream.key)} = ?", gone)
    return max(cur.rowcount, 0)


def reset_plain(conn: sqlite3.Connection, stream: StreamInfo, pending: set[Any]) -> int:
    """The plain stream starts over: its marks go, and every row no subscription holds."""
    table, t, key = stream.local_table, quote(stream.local_table), quote(stream.key)
    conn.execute("DELETE FROM syncunit_holds WHERE local_table = ? AND holder = ''", (table,))
    marks = ",".join("?" * len(pending))
    skip = f" AND {key} NOT IN ({marks})" if pending else ""
    cur = conn.execute(
        f"DELETE FROM {t} WHERE {key} NOT IN (SELECT row_key FROM syncunit_holds"
        f" WHERE local_table = ?){skip}",
        (table, *pending),
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
    pending = pending_keys(c, table)
    if chunk.reset:
        removed += release(c, stream, held_by(c, table, holder), holder, pending)
    removed += release(c, stream, list(chunk.removed), holder, pending)
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
        if pending:
            rows = [r for r in rows if r[k] not in pending]
        c.executemany(store._upsert_sql(stream, tuple(chunk.columns)), rows)
        upserted = len(keys)
    return upserted, removed


def close_subscription(store: LocalStore, sub_id: str, streams: Sequence[StreamInfo]) -> int:
    """Release every hold of a subscription and forget its cursors (in the caller's
    transaction); return the number of rows removed."""
    c = store.conn
    removed = 0
    for s in streams:
        pending = pending_keys(c, s.local_table)
        removed += release(c, s, held_by(c, s.local_table, sub_id), sub_id, pending)
        c.execute("DELETE FROM syncunit_cursors WHERE stream = ?", (cursor_name(s.name, sub_id),))
    c.execute("DELETE FROM syncunit_subscriptions WHERE id = ?", (sub_id,))
    return removed
