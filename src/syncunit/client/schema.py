"""Local table schemas: types, DDL, and rebuilding a table on a new schema.

A catalog change that SQLite cannot make with ``ALTER TABLE`` (a column's type,
the key) rebuilds the table the way sqlite-utils' ``transform`` does: create
the new table, copy the rows, drop the old one, rename, in the caller's
transaction. Unpushed rows survive; changes that can no longer be sent become
rejections the app sees.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from typing import Any

from syncunit.client.outbox import retype_in_flight
from syncunit.protocol import LOCAL_SQL_TYPES, Catalog, StreamInfo
from syncunit.protocol import quote_name as quote

__all__ = [
    "INDEXES_SUSPENDED",
    "column_defs",
    "columns_of",
    "indexes_of",
    "quote",
    "sql_type",
    "surface_orphans",
    "transform",
]

#: Fact key prefix marking a stream whose local indexes a first copy dropped.
INDEXES_SUSPENDED = "indexes-suspended:"


def sql_type(logical: str) -> str:
    return LOCAL_SQL_TYPES.get(logical, "TEXT")


def column_defs(key: str, columns: dict[str, str]) -> str:
    return ", ".join(
        f"{quote(n)} {typ}{' PRIMARY KEY' if n == key else ''}" for n, typ in columns.items()
    )


def utcnow() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def transform(
    c: sqlite3.Connection, s: StreamInfo, have: dict[str, tuple[str, int]], want: dict[str, str]
) -> list[str]:
    """Rebuild a local table on a new schema keeping its rows: create, copy, swap.

    Runs inside ``apply_catalog``'s transaction. Values go through SQLite's type
    affinity (a value that does not convert keeps its own type; the server
    judges it if it is pushed). Rows without a value for the (new) key cannot
    be carried over; their pending changes are surfaced by ``surface_orphans``.
    """
    t = quote(s.local_table)
    new = quote(f"syncunit_new_{s.local_table}")
    local_only = {
        n: typ for n, (typ, _) in have.items() if n.startswith("syncunit_") and n not in want
    }
    c.execute(f"DROP TABLE IF EXISTS {new}")
    c.execute(f"CREATE TABLE {new} ({column_defs(s.key, {**want, **local_only})})")
    common = ", ".join(quote(n) for n in [*want, *local_only] if n in have)
    if s.key in have:
        c.execute(
            f"INSERT OR IGNORE INTO {new} ({common}) SELECT {common} FROM {t}"
            f" WHERE {quote(s.key)} IS NOT NULL ORDER BY rowid"
        )
    c.execute(f"DROP TABLE {t}")
    retyped = {n: typ for n, typ in want.items() if n in have and have[n][0] != typ}
    retype_in_flight(c, s.local_table, retyped)
    # Legacy rename: the app's views naming the table are not re-checked mid-swap.
    c.execute("PRAGMA legacy_alter_table=ON")
    try:
        c.execute(f"ALTER TABLE {new} RENAME TO {t}")
    finally:
        c.execute("PRAGMA legacy_alter_table=OFF")
    return [f"rebuilt {s.local_table} (rows kept)"]


def surface_orphans(c: sqlite3.Connection, catalog: Catalog, pushed: set[str]) -> list[str]:
    """Unsent changes that can no longer be sent become rejections the app sees."""
    keys = {s.local_table: s.key for s in catalog.streams}
    moved = 0
    for oid, mid, table, key, op in c.execute(
        "SELECT id, mutation_id, table_name, row_key, op FROM syncunit_outbox"
        " WHERE seq IS NULL ORDER BY id"
    ).fetchall():
        if table not in pushed:
            reason = f"table {table!r} is no longer synced by the server; nothing was sent"
        elif (
            op != "delete"
            and table in keys
            and c.execute(
                f"SELECT 1 FROM {quote(table)} WHERE {quote(keys[table])} = ?", (key,)
            ).fetchone()
            is None
        ):
            reason = f"the row could not be carried over a change of {table!r}'s schema"
        else:
            continue
        c.execute(
            "INSERT INTO syncunit_rejected (mutation_id, seq, table_name, row_key, op,"
            " status, code, reason, attempted, server_row, created_at)"
            " VALUES (?, NULL, ?, ?, ?, 'rejected', 'schema-changed', ?, '{}', NULL, ?)",
            (mid, table, key, op, reason, utcnow()),
        )
        c.execute("DELETE FROM syncunit_outbox WHERE id = ?", (oid,))
        moved += 1
    return [f"surfaced {moved} unsendable changes"] if moved else []


def columns_of(conn: sqlite3.Connection, schema: str, table: str) -> list[tuple[Any, ...]]:
    """``table``'s columns as SQLite describes them (``table_xinfo``)."""
    return [tuple(r) for r in conn.execute(f"PRAGMA {schema}.table_xinfo({quote(table)})")]


def indexes_of(
    conn: sqlite3.Connection, schema: str, table: str, *, named: bool = False
) -> set[tuple[Any, ...]] | None:
    """``table``'s indexes as (unique, key columns), with their names first if
    ``named`` (the key's own index by its origin, ``pk`` or ``u``: SQLite names it
    after the table); None if one is partial."""
    found: set[tuple[Any, ...]] = set()
    for _, index, unique, origin, partial in conn.execute(
        f"PRAGMA {schema}.index_list({quote(table)})"
    ).fetchall():
        if partial:
            return None
        parts = conn.execute(f"PRAGMA {schema}.index_xinfo({quote(index)})").fetchall()
        shape = (unique, tuple((r[2], r[3], r[4]) for r in parts if r[5]))
        found.add(((index if origin == "c" else origin), *shape) if named else shape)
    return found
