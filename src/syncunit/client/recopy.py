"""Streams copied afresh because a local row may differ from the server's.

A change the device itself turns into a rejection (the server never judged it:
too large to send, or a catalog change made it unsendable) brings no server row
to restore its local row from. The device puts back the row as it saw it before
the change where it knows it, but the server may have changed the row since: a
pull skips a row with an unpushed change (pulls don't clobber), and the cursors
moved past those versions. So the streams that bring the row are marked, and
the next request of each is sent without its cursor, in the same run if the
mark came on the way (``UnitRun``): the first copy it gets back is applied as a
reset, which brings the row back as the server has it, or removes it if the
server has none. Rows with unpushed changes stay as they are (invariant 8); a
newer change to the row ends it as the server has it when it is answered.

A mark is taken only when a request of its stream is built: a response already
on its way carries deltas from the old cursor, applied as usual. Marks live in
``syncunit_recopy``, one row per mark: ``recopy:<cursor name>`` with the table and
key of a row that called for it, so a restart keeps them and each costs one write.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from syncunit.client import holds, rowjson
from syncunit.protocol import StreamInfo

__all__ = ["DDL", "PARKED", "PREFIX", "due", "mark", "mark_parked", "migrate", "take", "unpark"]

#: The name of a stream's marks in ``syncunit_recopy``, before its cursor name.
PREFIX = "recopy:"
#: The name of a parked session's marks (``recopy-parked:<client id>``): rows of its
#: changes withdrawn while it was out of sight, marked when it comes back (``unpark``).
PARKED = "recopy-parked:"

#: The marks, one row each (migration step 5).
DDL = [
    "CREATE TABLE syncunit_recopy (name TEXT NOT NULL, local_table TEXT NOT NULL,"
    " row_key NOT NULL, PRIMARY KEY (name, local_table, row_key)) WITHOUT ROWID",
]


def migrate(conn: sqlite3.Connection) -> None:
    """Migration step 5: create ``syncunit_recopy`` and move into it the marks earlier
    versions kept in ``syncunit_local`` (a JSON list of ``[table, key]`` per name)."""
    for stmt in DDL:
        conn.execute(stmt)
    kept = conn.execute(
        "SELECT key, value FROM syncunit_local"
        " WHERE substr(key, 1, ?) = ? OR substr(key, 1, ?) = ?",
        (len(PREFIX), PREFIX, len(PARKED), PARKED),
    ).fetchall()
    for name, value in kept:
        for table, key in rowjson.loads(value):
            _add(conn, name, table, key)
        conn.execute("DELETE FROM syncunit_local WHERE key = ?", (name,))


def _add(conn: sqlite3.Connection, name: str, table: str, key: Any) -> None:
    conn.execute("INSERT OR IGNORE INTO syncunit_recopy VALUES (?, ?, ?)", (name, table, key))


def _clear(conn: sqlite3.Connection, name: str) -> bool:
    """Drop the marks kept as ``name``; whether there were any."""
    return conn.execute("DELETE FROM syncunit_recopy WHERE name = ?", (name,)).rowcount > 0


def mark(
    conn: sqlite3.Connection, streams: Sequence[StreamInfo], table: str, key: Any
) -> list[str]:
    """Mark the cursors of the streams that bring row ``key`` of ``table`` (in the
    caller's transaction): the table's streams without parameters, unless only
    subscriptions hold the row, and the subscriptions that hold it. Returns them."""
    holders = holds.holders_of(conn, table, key)
    names: list[str] = []
    for s in streams:
        if s.local_table != table:
            continue
        if s.params:
            names += [holds.cursor_name(s.name, h) for h in sorted(holders) if h]
        elif not holders or "" in holders:
            names.append(s.name)
    for name in names:
        _add(conn, PREFIX + name, table, key)
    return names


def mark_parked(conn: sqlite3.Connection, client_id: str, table: str, key: Any) -> None:
    """Remember a row of parked session ``client_id`` to mark when it comes back."""
    _add(conn, PARKED + client_id, table, key)


def unpark(conn: sqlite3.Connection, client_id: str, streams: Sequence[StreamInfo]) -> int:
    """Session ``client_id`` is back in sight: mark its remembered rows; how many."""
    entries = conn.execute(
        "SELECT local_table, row_key FROM syncunit_recopy WHERE name = ?", (PARKED + client_id,)
    ).fetchall()
    for table, key in entries:
        mark(conn, streams, table, key)
    _clear(conn, PARKED + client_id)
    return len(entries)


def due(conn: sqlite3.Connection, names: Iterable[str]) -> bool:
    """Whether any of the cursors ``names`` is marked (reads only)."""
    wanted = [PREFIX + n for n in names]
    if not wanted:
        return False
    marks = ",".join("?" * len(wanted))
    row = conn.execute(
        f"SELECT 1 FROM syncunit_recopy WHERE name IN ({marks}) LIMIT 1", wanted
    ).fetchone()
    return row is not None


def take(conn: sqlite3.Connection, names: Iterable[str]) -> list[str]:
    """Drop the cursors among ``names`` that are marked (a request about to be built
    carries them) and their marks, in the caller's transaction; return them."""
    dropped: list[str] = []
    for name in names:
        if _clear(conn, PREFIX + name):
            conn.execute("DELETE FROM syncunit_cursors WHERE stream = ?", (name,))
            dropped.append(name)
    return dropped
