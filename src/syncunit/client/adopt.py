"""Installing a snapshot file by its pages, on a device that holds little else.

``bootstrap.copy_rows`` copies a snapshot's records into the local table, which
at a million rows is SQLite writing four B-trees entry by entry. A device whose
database is small beside the file (a first sync) can do better: the file
becomes the database. ``adopt`` renames the file's table to the local table,
copies everything the device's database holds into the file (its tables and
rows, indexes, triggers, views, ``sqlite_sequence``, ``user_version``), writes
the stream's cursor there, and then copies the file's pages over the device's
database with SQLite's backup API, in one write transaction.

Nothing the device wrote may be lost: the copy into the file reads the device's
database in one read transaction, and the backup takes the database's write
lock with its first step and checks, before any page is committed, that no
other connection committed since that read (``PRAGMA data_version``). If one
did, the backup is rolled back and the caller copies the rows as before.

``adopt`` returns None, changing nothing on the device, whenever the file
cannot simply be taken: a table that is not empty or has changes or holds, other
columns or indexes than the file's, the app's own triggers or foreign keys on
it, a device database that is not a plain file the standard ``sqlite3`` module
can open beside this connection, virtual tables or statistics tables, another
page size or text encoding, or a device database larger than a quarter of the
file and than 4 MB (copying it into the file would cost what the pages save).
The log says why (``syncunit.client``, level INFO).
"""

from __future__ import annotations

import logging
import sqlite3
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from syncunit.client.applying import save_cursor
from syncunit.client.schema import INDEXES_SUSPENDED, columns_of, indexes_of, quote
from syncunit.protocol import SnapshotOffer, StreamInfo

if TYPE_CHECKING:
    from syncunit.client.store import LocalStore

log = logging.getLogger("syncunit.client")

#: The schema name the device's database is attached under, in the file's connection.
DEVICE = "syncunit_device"
#: A device database up to this share of the file's pages is copied into the file,
MAX_DEVICE_SHARE = 0.25
#: or up to this many pages (a device's engine tables and a few hundred rows).
SMALL_DEVICE_PAGES = 1024
#: How much of the file the backup reads through a memory map (on 64-bit systems):
#: 0.43 to 0.46 s instead of 0.50 to 0.53 s for 1M rows. A read error of a mapped
#: file is a signal, not an error; this one was written a moment ago and no other
#: process touches it (it is locked: ``bootstrap.scratch``).
MAP_BYTES = 1 << 30
#: Pages the backup copies per step: the first step takes the write lock, and the
#: check that nothing else was written runs before the second (see ``_install``).
STEP_PAGES = 8192


class Changed(Exception):
    """Another connection wrote to the device's database while the file was readied."""


def adopt(store: LocalStore, stream: StreamInfo, path: Path, offer: SnapshotOffer) -> int | None:
    """Make the snapshot file at ``path`` the device's database, if the device allows.

    Returns the rows installed, or None if the file cannot be taken this way (the
    device's database is then as it was, and the caller copies the rows).
    """
    with store.lock:
        taken = _adopt(store.conn, stream, path, offer, store.sync_level)
    if isinstance(taken, str):
        log.info("snapshot of %s not installed by pages (%s): copying it", stream.name, taken)
        return None
    log.info("snapshot of %s installed by pages (%d rows)", stream.name, taken)
    return taken


def _adopt(
    conn: Any, stream: StreamInfo, path: Path, offer: SnapshotOffer, level: int
) -> int | str:
    """The rows installed, or why the file could not be (``level``: the device's
    ``synchronous`` setting, restored after the install)."""
    if type(conn) is not sqlite3.Connection or conn.in_transaction:
        return "the device's connection is not the sqlite3 module's, or is in a transaction"
    device = _device_file(conn)
    if device is None:
        return "the device's database is not a file"
    if _temp_triggers_of_the_app(conn, stream.local_table):
        return "the table has triggers of the app"
    try:
        file = sqlite3.connect(path.resolve().as_uri(), isolation_level=None, uri=True)
    except sqlite3.Error as exc:
        return str(exc)
    try:
        file.execute("PRAGMA journal_mode=MEMORY")  # a scratch file, but one that rolls back
        file.execute("PRAGMA synchronous=OFF")
        if sys.maxsize > 2**32:  # read mapped: see MAP_BYTES
            file.execute(f"PRAGMA mmap_size = {MAP_BYTES}")
        file.execute(f"ATTACH DATABASE ? AS {DEVICE}", (device.as_uri() + "?mode=ro",))
        seen = _ready(file, stream, offer)
        if isinstance(seen, str):
            return seen
        try:
            _install(file, conn, seen, level)
        except (Changed, sqlite3.Error):
            # The rows are copied from the file instead, from its table ``rows``.
            file.execute(f"ALTER TABLE main.{quote(stream.local_table)} RENAME TO rows")
            raise
    except Changed:
        return "another connection wrote to the device's database meanwhile"
    except sqlite3.Error as exc:
        return str(exc)
    finally:
        file.close()
    return offer.rows


def _device_file(conn: sqlite3.Connection) -> Path | None:
    """The device's database file, if it is one (not in memory, not temporary)."""
    for _, name, file in conn.execute("PRAGMA database_list"):
        if name == "main":
            return Path(file).resolve() if file else None
    return None  # pragma: no cover - every connection has main


def _temp_triggers_of_the_app(conn: sqlite3.Connection, table: str) -> bool:
    """Temporary triggers are the connection's own: the file cannot see them."""
    return (
        conn.execute(
            "SELECT 1 FROM sqlite_temp_master WHERE type = 'trigger' AND tbl_name = ?"
            " AND substr(name, 1, 9) != 'syncunit_'",
            (table,),
        ).fetchone()
        is not None
    )


def _device_refuses(file: sqlite3.Connection, stream: StreamInfo) -> str | None:
    """Why the device cannot take the file's pages, if it cannot: the local table
    must be empty, with nothing waiting, held or suspended, the engine's triggers
    only and no foreign keys; the database without virtual or statistics tables.
    Read through the file's connection, in the read snapshot it copies from."""
    table, d = stream.local_table, DEVICE
    checks: list[tuple[str, str, tuple[Any, ...]]] = [
        ("the table holds rows", f"SELECT 1 FROM {d}.{quote(table)} LIMIT 1", ()),
        (
            "changes wait to be pushed",
            f"SELECT 1 FROM {d}.syncunit_outbox WHERE table_name = ? LIMIT 1",
            (table,),
        ),
        (
            "subscriptions hold rows",
            f"SELECT 1 FROM {d}.syncunit_holds WHERE local_table = ? LIMIT 1",
            (table,),
        ),
        (
            "its indexes are suspended",
            f"SELECT 1 FROM {d}.syncunit_local WHERE key = ?",
            (INDEXES_SUSPENDED + stream.name,),
        ),
        ("the table has foreign keys", f"PRAGMA {d}.foreign_key_list({quote(table)})", ()),
        (
            "the table has triggers of the app",
            f"SELECT 1 FROM {d}.sqlite_master WHERE type = 'trigger' AND tbl_name = ?"
            " AND substr(name, 1, 9) != 'syncunit_'",
            (table,),
        ),
        (
            "the database has virtual or statistics tables",
            f"SELECT 1 FROM {d}.sqlite_master WHERE type = 'table'"
            " AND (sql LIKE 'CREATE VIRTUAL%' OR substr(name, 1, 11) = 'sqlite_stat')",
            (),
        ),
    ]
    for why, sql, args in checks:
        if file.execute(sql, args).fetchone() is not None:
            return why
    return None


def _file_refuses(file: sqlite3.Connection, table: str) -> str | None:
    """Why the file cannot become the device's database, if it cannot: its ``rows``
    must be the local table exactly (columns, indexes by name), the two databases
    of one page size (of one text encoding too, or the device would not attach),
    the device's the smaller by far."""

    def one(sql: str) -> Any:
        return file.execute(sql).fetchone()[0]

    if one("PRAGMA main.page_size") != one(f"PRAGMA {DEVICE}.page_size"):
        return "another page size"  # a database in WAL mode takes a backup of its own only
    used = one(f"PRAGMA {DEVICE}.page_count") - one(f"PRAGMA {DEVICE}.freelist_count")
    if used > max(SMALL_DEVICE_PAGES, MAX_DEVICE_SHARE * one("PRAGMA main.page_count")):
        return f"the device's database has {used} pages in use, the file {one('PRAGMA page_count')}"
    if columns_of(file, "main", "rows") != columns_of(file, DEVICE, table):
        return "other columns"
    if indexes_of(file, "main", "rows", named=True) != indexes_of(file, DEVICE, table, named=True):
        return "other indexes"
    return None


def _ready(file: sqlite3.Connection, stream: StreamInfo, offer: SnapshotOffer) -> int | str:
    """Turn the file into the device's database with the snapshot in it, in one
    transaction that reads the device's in one read snapshot, checks included (a
    write just before it is seen). Returns the device's ``data_version`` as of
    that read, or why the file cannot be taken."""
    table = stream.local_table
    file.execute("BEGIN")
    try:
        why = _device_refuses(file, stream) or _file_refuses(file, table)
        (rows,) = file.execute("SELECT count(*) FROM main.rows").fetchone()
        if why is None and rows != offer.rows:
            why = "the file holds other rows than offered"
        if why is not None:
            file.execute("ROLLBACK")
            return why
        file.execute(f"ALTER TABLE main.rows RENAME TO {quote(table)}")
        objects = file.execute(
            f"SELECT type, name, tbl_name, sql FROM {DEVICE}.sqlite_master"
            " WHERE sql IS NOT NULL AND substr(name, 1, 7) != 'sqlite_'"
            " ORDER BY type != 'table', type != 'index', rowid"
        ).fetchall()
        for kind, name, on, sql in objects:
            if on == table and kind in ("table", "index"):
                continue  # the file's own, checked to be the same
            file.execute(sql)
            if kind == "table":
                cols = ", ".join(  # not the generated columns: SQLite computes them
                    quote(r[1])
                    for r in file.execute(f"PRAGMA {DEVICE}.table_xinfo({quote(name)})")
                    if r[6] == 0
                )
                file.execute(
                    f"INSERT INTO main.{quote(name)} ({cols})"
                    f" SELECT {cols} FROM {DEVICE}.{quote(name)}"
                )
        if file.execute(
            f"SELECT 1 FROM {DEVICE}.sqlite_master WHERE name = 'sqlite_sequence'"
        ).fetchone():
            file.execute("DELETE FROM main.sqlite_sequence")
            file.execute(f"INSERT INTO main.sqlite_sequence SELECT * FROM {DEVICE}.sqlite_sequence")
        for pragma in ("user_version", "application_id"):
            (value,) = file.execute(f"PRAGMA {DEVICE}.{pragma}").fetchone()
            file.execute(f"PRAGMA main.{pragma} = {int(value)}")
        save_cursor(file, stream, offer.cursor)
        (seen,) = file.execute(f"PRAGMA {DEVICE}.data_version").fetchone()
        file.execute("COMMIT")
    except BaseException:
        if file.in_transaction:
            file.execute("ROLLBACK")
        raise
    return int(seen)


def _install(file: sqlite3.Connection, conn: sqlite3.Connection, seen: int, level: int) -> None:
    """Copy the file's pages over the device's database, in one write transaction.

    The first step takes the device's write lock and copies fewer pages than the
    file has, so nothing is committed yet; the progress call after it checks that
    no other connection wrote since the file read the device, and raising there
    rolls the backup back.

    The commit is not synced (``synchronous=NORMAL``, as the engine commits a
    chunk): lost in a power cut, the database is as it was before, the stream
    has no cursor and is fetched again; the next synced commit (any of the
    app's) makes it durable with the rest of the WAL. Syncing it cost 0.25 s of
    0.65 at a million rows.
    """
    (pages,) = file.execute("PRAGMA main.page_count").fetchone()
    step = max(1, min(STEP_PAGES, pages - 1))
    checked = False

    def progress(status: int, remaining: int, total: int) -> None:
        nonlocal checked
        if status != sqlite3.SQLITE_OK or checked:
            return  # busy (no lock yet: the step is retried), or already checked
        checked = True
        (now,) = file.execute(f"PRAGMA {DEVICE}.data_version").fetchone()
        if now != seen:
            raise Changed

    conn.execute("PRAGMA synchronous=NORMAL")
    try:
        file.backup(conn, pages=step, progress=progress)  # a file has two pages at least
    finally:
        conn.execute(f"PRAGMA synchronous={level}")
