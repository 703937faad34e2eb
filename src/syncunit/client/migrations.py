"""Numbered migrations of the client's own tables (``syncunit_*``).

A device in the field holds a local database made by some earlier version of
the engine; opening it with this one runs, in one transaction, every step
above the number recorded in ``syncunit_local`` (key ``store_version``). Steps
are never renumbered or edited once released: a change to the engine's tables
is a new step at the end. ``PRAGMA user_version`` is left to the app.

* 1: the layout of 0.1.0: facts, SyncProperties, cursors, outbox, queue;
* 2: ``syncunit_resets`` (a re-download in progress, beside the old copy) and
  ``syncunit_parked`` (changes of a principal who logged out before they
  could be pushed);
* 3: ``syncunit_subscriptions`` and ``syncunit_holds`` (units opened with
  parameter values, and which of them holds which row);
* 4: ``syncunit_deferred`` (removals put off while the row had an unpushed
  change, carried out once it is answered);
* 5: ``syncunit_recopy`` (streams marked to copy afresh, one row per mark; the
  marks earlier versions kept in ``syncunit_local`` move into it).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from syncunit.client.holds import DDL as HOLDS_DDL
from syncunit.client.holds import DEFERRED_DDL
from syncunit.client.recopy import migrate as recopy_marks
from syncunit.client.scheduler import DDL as QUEUE_DDL
from syncunit.client.triggers import DDL as OUTBOX_DDL
from syncunit.client.triggers import REPLACING_DDL
from syncunit.errors import LocalStoreError

__all__ = ["STORE_VERSION", "migrate"]

_V1 = [
    "CREATE TABLE IF NOT EXISTS syncunit_local (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS syncunit_sync_properties ("
    " unit TEXT PRIMARY KEY, last_sync_on TEXT, last_result TEXT)",
    "CREATE TABLE IF NOT EXISTS syncunit_cursors ("
    " stream TEXT PRIMARY KEY, local_table TEXT NOT NULL, definition TEXT NOT NULL,"
    " cursor TEXT NOT NULL)",
    *OUTBOX_DDL,
    *QUEUE_DDL,
]

_V2 = [
    # One row per stream being downloaded again: its rows go to ``shadow`` until the
    # stream completes, then replace the local table's in one transaction.
    "CREATE TABLE syncunit_resets (stream TEXT PRIMARY KEY, local_table TEXT NOT NULL,"
    " shadow TEXT NOT NULL, definition TEXT NOT NULL, cursor TEXT NOT NULL)",
    # Changes of an ended session (``client_id``) kept for its principal: frozen
    # mutations (kind 'mutation', body the wire payload) and unresolved conflicts and
    # rejections (kind 'rejected', body the syncunit_rejected row as JSON).
    "CREATE TABLE syncunit_parked (id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " client_id TEXT NOT NULL, kind TEXT NOT NULL, seq INTEGER, body BLOB NOT NULL,"
    " parked_at TEXT NOT NULL)",
    "CREATE INDEX ix_syncunit_parked_client ON syncunit_parked (client_id, seq)",
]

Step = list[str] | Callable[[sqlite3.Connection], None]

#: The steps, in order; step n brings the database to version n.
STEPS: list[Step] = [_V1, _V2, HOLDS_DDL, DEFERRED_DDL, recopy_marks, REPLACING_DDL]
STORE_VERSION = len(STEPS)


def current_version(conn: sqlite3.Connection) -> int:
    """The version of a database's engine tables: 0 for a new database."""
    has_facts = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'syncunit_local'"
    ).fetchone()
    if has_facts is None:
        return 0
    row = conn.execute("SELECT value FROM syncunit_local WHERE key = 'store_version'").fetchone()
    return 1 if row is None else int(row[0])  # 0.1.0 recorded no version


def refuse_newer(conn: sqlite3.Connection) -> int:
    """The database's version; ``LocalStoreError`` if a newer engine made it (it is
    left as it is)."""
    have = current_version(conn)
    if have > STORE_VERSION:
        raise LocalStoreError(
            f"the local database was made by a newer syncunit (store version {have});"
            f" this one knows up to {STORE_VERSION}: upgrade syncunit"
        )
    return have


def migrate(conn: sqlite3.Connection) -> list[int]:
    """Run the steps this database lacks (the caller holds a transaction); return them.

    A database made by a newer engine is refused rather than misread.
    """
    have = refuse_newer(conn)
    ran: list[int] = []
    for n in range(have + 1, STORE_VERSION + 1):
        step = STEPS[n - 1]
        if callable(step):
            step(conn)
        else:
            for stmt in step:
                conn.execute(stmt)
        ran.append(n)
    if ran or have == 0:
        conn.execute(
            "INSERT INTO syncunit_local (key, value) VALUES ('store_version', ?)"
            " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (str(STORE_VERSION),),
        )
    return ran
