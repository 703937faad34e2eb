"""Applying a snapshot offer: download the file, check it, copy its rows in.

The server may answer a stream's first copy with a ``SnapshotOffer`` instead of
chunks. ``fetch`` downloads the file beside the local database into a ``.part``
file that a later attempt continues with an HTTP ``Range`` request, and in the
same pass over the bytes hashes it (its size and SHA-256 must match the offer)
and decompresses it into a plain SQLite file. A device that holds little else
takes that file as its database, page by page (``adopt``); otherwise
``copy_rows`` attaches the file and copies its rows into the local table in one
transaction with the stream's cursor. Any failure raises ``SnapshotError`` or
``LocalStoreError``; the caller then asks for the copy row by row. The
decompressed file and the download are locked while in use; the next install
removes the decompressed files a killed process left, and this database's
downloads that no offer of the response continues (``sweep``); a completed sync
removes the downloads of streams copied row by row since (``sweep_copied``).

The file's table has exactly the local table's columns and indexes
(``local_table_ddl``), so an empty local table without triggers takes it with
SQLite's transfer optimization: ``INSERT INTO t SELECT * FROM file.rows`` copies
each record and index entry as stored, with no decoding and no index sort. The
engine's own triggers (the outbox's, the reactive queries') are dropped and
created again inside the transaction, and rows the table already holds (local
changes not yet pushed, rows a subscription holds) are set aside and put back
over the copy, so pulls still never clobber. A table the app gave triggers,
columns or indexes of its own takes the rows with a plain upsert instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import re
import sqlite3
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import httpx

from syncunit.client import adopt, holds
from syncunit.client.schema import columns_of, indexes_of
from syncunit.client.store import quote
from syncunit.errors import LocalStoreError, ProtocolError, SyncUnitError
from syncunit.heldfiles import held_scratch, unheld
from syncunit.protocol import SnapshotOffer, StreamInfo

if TYPE_CHECKING:
    from syncunit.client.client import SyncClient, SyncResult
    from syncunit.client.store import LocalStore

log = logging.getLogger("syncunit.client")

try:
    import zstandard
except ImportError:  # pragma: no cover
    zstandard = None  # type: ignore[assignment]
try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

#: The schema name the snapshot file is attached under.
SNAP = "syncunit_snapshot"
#: How the decompressed files beside the database begin.
SCRATCH = ".syncunit-snapshot-"
#: Where rows the local table already holds wait while the file's rows go in.
KEPT = "temp.syncunit_snapshot_kept"
#: The facts naming the stream of each download (``.part``), by its file name.
DOWNLOAD = "snapshot_download:"


class SnapshotError(SyncUnitError):
    """A snapshot could not be downloaded, checked or applied."""


def can_apply() -> bool:
    """Whether this client can decompress snapshot files (zstandard is installed)."""
    return zstandard is not None


def part_path(store: LocalStore, offer: SnapshotOffer) -> Path:
    """Where the download of ``offer`` goes (beside the database file, if it has one,
    named after it: databases that share a folder keep their downloads apart)."""
    return _parts_of(store) / f"{_part_prefix(store)}{offer.sha256[:24]}.part"


def _main_file(store: LocalStore) -> Path | None:
    """The store's database file (None: in memory), also for a connection it was given."""
    with store.lock:
        main = store.conn.execute("PRAGMA database_list").fetchone()
    return Path(main[2]) if main and main[2] else None


def _parts_of(store: LocalStore) -> Path:
    main = _main_file(store)
    return main.parent if main is not None else Path(tempfile.gettempdir())


def _part_prefix(store: LocalStore) -> str:
    main = _main_file(store)
    return f"{SCRATCH}{main.name if main is not None else ''}-"


class _Intake:
    """Hashes the compressed bytes as they come, and decompresses them into ``out`` on
    a thread of its own: both release the GIL, so two cores share one download."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.digest = hashlib.sha256()
        self.size = 0
        self.error: Exception | None = None
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=64)
        self._thread = threading.Thread(target=self._inflate, name="syncunit-inflate", daemon=True)
        self._thread.start()

    def _inflate(self) -> None:
        inflate = zstandard.ZstdDecompressor().decompressobj()
        while (block := self._queue.get()) is not None:
            if self.error is None:  # after an error: only drain, so take() never blocks
                try:
                    self.out.write(inflate.decompress(block))
                except (zstandard.ZstdError, OSError) as exc:
                    self.error = exc

    def take(self, block: bytes) -> None:
        self.digest.update(block)
        self.size += len(block)
        self._queue.put(block)

    def close(self) -> None:
        """Wait for the decompression to catch up (idempotent)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def restart(self) -> _Intake:
        """The same output file, empty, taking a new file from its first byte."""
        self.close()
        self.out.seek(0)
        self.out.truncate()
        return _Intake(self.out)


def fetch(
    http: httpx.Client,
    offer: SnapshotOffer,
    part: Path,
    plain: Path,
    result: SyncResult | None = None,
) -> None:
    """Download ``offer``'s file into ``part`` and decompress it into ``plain``, checked.

    What an earlier attempt left in ``part`` is read again (hashed and
    decompressed) and the rest asked for with ``Range``. A cut keeps ``part``
    for the next attempt; a file that does not match its offer is discarded.
    The request, if one goes out, counts in ``result.requests``.
    """
    if zstandard is None:
        raise SnapshotError("zstandard is not installed")
    held = _hold(part)  # while it is being written, no sweep removes it
    try:
        _fetch(http, offer, part, plain, result)
    except OSError as exc:  # a full disk, a file system gone read-only: copy row by row
        raise SnapshotError(f"cannot write the snapshot download {part.name}: {exc}") from exc
    finally:
        os.close(held)


def _hold(part: Path) -> int:
    """A descriptor of ``part`` (made if need be) holding its lock; SnapshotError if
    another download of the same file holds it."""
    try:
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise SnapshotError(f"cannot write the snapshot download {part}: {exc}") from exc
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SnapshotError("another download of this snapshot file is going on") from None
    return fd


def _fetch(
    http: httpx.Client, offer: SnapshotOffer, part: Path, plain: Path, result: SyncResult | None
) -> None:
    have = part.stat().st_size if part.exists() else 0
    if have > offer.size:
        part.unlink()
        have = 0
    with plain.open("w+b") as out:
        intake = _Intake(out)
        try:
            if have:
                with part.open("rb") as f:
                    while block := f.read(1 << 20):
                        intake.take(block)
            if have < offer.size:
                intake = _download(http, offer, part, have, intake, result)
        finally:
            intake.close()
    if isinstance(intake.error, zstandard.ZstdError):
        part.unlink(missing_ok=True)
        raise SnapshotError(f"the snapshot file cannot be decompressed: {intake.error}")
    if intake.error is not None:
        raise SnapshotError(f"the snapshot file cannot be written: {intake.error}")
    if intake.size != offer.size or intake.digest.hexdigest() != offer.sha256:
        part.unlink(missing_ok=True)
        raise SnapshotError(
            f"the snapshot file does not match its offer ({intake.size} of {offer.size} bytes,"
            " checksum differs): it was discarded"
        )


def _download(
    http: httpx.Client,
    offer: SnapshotOffer,
    part: Path,
    have: int,
    intake: _Intake,
    result: SyncResult | None,
) -> _Intake:
    headers = {"Range": f"bytes={have}-"} if have else {}
    if result is not None:
        result.requests += 1
    try:
        with http.stream("GET", offer.path, headers=headers) as r:
            if r.status_code not in (200, 206):
                raise SnapshotError(f"the snapshot download answered {r.status_code}")
            if r.status_code == 200 and have:  # the whole file again: start over
                intake = intake.restart()
            with part.open("ab" if r.status_code == 206 else "wb") as f:
                for block in r.iter_bytes():
                    f.write(block)
                    intake.take(block)
                    if intake.size > offer.size:
                        break  # more than offered: the checksum check refuses it
    except httpx.HTTPError as exc:
        raise SnapshotError(f"the snapshot download was cut: {exc}") from exc
    finally:
        intake.close()
    return intake


def apply_offers(client: SyncClient, offers: list[SnapshotOffer], result: SyncResult) -> list[Path]:
    """Apply the snapshot offers of a response; return the downloads of those that failed.

    A failed one (cut download, wrong checksum, unreadable file) leaves its
    stream without a cursor: the next request copies it row by row. An encrypted
    store downloads none (its client does not ask for them; a server that offers
    anyway gets the request again without them). A cut
    download stays on disk (returned) until that copy completes, so a run that
    fails altogether resumes it next time.
    """
    if client.store.encrypted:  # the files are plain SQLite: the rows would sit in the clear
        log.warning("snapshots not used on an encrypted store: copying row by row")
        return [part_path(client.store, offer) for offer in offers]
    catalog = client.store.catalog()
    failed: list[Path] = []
    # Files done with go after the last install: freeing their blocks (hundreds of MB)
    # holds the file system up, and the next install would wait on it.
    done: list[Path] = []
    try:
        # The largest first: a device takes a file's pages only while it holds little else.
        for n, offer in enumerate(sorted(offers, key=lambda o: o.size, reverse=True)):
            info = None if catalog is None else catalog.stream(offer.stream)
            if info is None:
                raise ProtocolError(f"server offered a snapshot of unknown stream {offer.stream!r}")
            part = part_path(client.store, offer)
            if n == 0:
                sweep(part.parent, client.store, offers)
            plain: Path | None = None  # made inside the try: a full disk fails its making
            try:
                _note_download(client.store, part, offer)
                fd, plain = scratch(part.parent)  # its own name: an earlier one may still go
                fetch(client.http, offer, part, plain, result)
                done.append(part)  # checked: whatever the copy does, never used again
                with client.store.bulk():  # the WAL is checkpointed once, after the sync
                    taken = adopt.adopt(client.store, info, plain, offer)
                    rows = copy_rows(client.store, info, plain, offer) if taken is None else taken
            except (SnapshotError, LocalStoreError) as exc:
                log.warning("snapshot of %s not used, copying row by row: %s", offer.stream, exc)
                failed.append(part)
                continue
            finally:
                if plain is not None:
                    os.close(fd)  # before the removal: the last close of a removed file frees it
                    done.append(plain)
            if client._watcher is not None:  # the triggers that tell it were off meanwhile
                client._watcher.notify([info.local_table])
            result.bytes_in += offer.size
            t = info.local_table
            result.rows_in[t] = result.rows_in.get(t, 0) + rows
            result.snapshots.append(offer.stream)
            if client.on_progress is not None:
                client._emit(client.on_progress, result.unit, rows, rows)
    finally:
        discard(*done)
    return failed


def scratch(folder: Path) -> tuple[int, Path]:
    """A new file in ``folder`` for a decompressed snapshot, and a descriptor that
    holds its lock for as long as this process uses it (see ``sweep``)."""
    try:
        return held_scratch(folder, SCRATCH, ".sqlite")
    except OSError as exc:
        raise SnapshotError(f"cannot make a file for the snapshot in {folder}: {exc}") from exc


def _note_download(store: LocalStore, part: Path, offer: SnapshotOffer) -> None:
    """Record which stream the download ``part`` is for, before it starts: once that
    stream holds a cursor (copied row by row when the file could not be used), no
    offer will continue the download, and ``sweep_copied`` removes it."""
    with store.atomic():
        store.set_fact(DOWNLOAD + part.name, offer.stream)


def sweep_copied(store: LocalStore) -> None:
    """Remove this database's downloads (``.part``) of streams that hold a cursor now.

    A download that could not be used (the disk filled up while it was
    decompressed, a cut the run did not resume) is kept for the next attempt,
    but a stream copied row by row meanwhile is never offered a file again: run
    after a sync completes, this frees what the run that failed left (a whole
    compressed snapshot). A download another process holds stays.
    """
    try:
        notes = store.query(
            "SELECT key, value FROM syncunit_local WHERE substr(key, 1, ?) = ?",
            (len(DOWNLOAD), DOWNLOAD),
        )
        if not notes:
            return
        streams = [stream for _, stream in notes]
        copied = {
            name
            for (name,) in store.query(
                "SELECT stream FROM syncunit_cursors"
                f" WHERE stream IN ({','.join('?' * len(streams))})",
                streams,
            )
        }
        folder = _parts_of(store)
        gone = []
        for key, stream in notes:
            if stream not in copied:
                continue  # a first copy still to come: it may be offered the file again
            part = folder / key.removeprefix(DOWNLOAD)
            if part.exists():
                if not unheld(part):
                    continue  # being downloaded now (or no locks on this system)
                log.info("removing %s: its stream was copied row by row", part.name)
                discard(part)
            gone.append((key,))
        if gone:
            with store.atomic() as c:
                c.executemany("DELETE FROM syncunit_local WHERE key = ?", gone)
    except (LocalStoreError, OSError) as exc:  # tried again after the next sync
        log.warning("cannot remove the snapshot downloads no longer needed: %s", exc)


def sweep(
    folder: Path, store: LocalStore | None = None, offers: list[SnapshotOffer] | None = None
) -> None:
    """Remove the decompressed snapshots of installs whose process died: files no
    process holds the lock of (a killed install would leave hundreds of MB).

    Given the ``store`` and the ``offers`` of a response, also remove that store's
    downloads (``.part``) that none of the offers continues: the server built
    another file meanwhile, and no offer will ever name this one again.
    """
    if fcntl is None:  # pragma: no cover - not on POSIX: they stay
        return
    paths = list(folder.glob(f"{SCRATCH}*.sqlite"))
    if store is not None:
        prefix = _part_prefix(store)
        wanted = {part_path(store, offer).name for offer in offers or ()}
        # This database's downloads only: another's name may start with this one's.
        ours = re.compile(re.escape(prefix) + r"[0-9a-f]{24}\.part")
        paths += [p for p in folder.iterdir() if ours.fullmatch(p.name) and p.name not in wanted]
    for path in paths:
        if not unheld(path):
            continue  # in use (its lock is let go before the removal, which frees the blocks)
        log.info("removing %s, left by a download or install that will not go on", path.name)
        discard(path)


def discard(*paths: Path) -> None:
    """Remove files; on a thread of its own if one is large: freeing its blocks takes a
    while, and the file system holds other removals (and creations) up meanwhile."""
    if max(map(_size, paths), default=0) > 16 << 20:
        threading.Thread(target=_unlink, args=paths, name="syncunit-discard").start()
    else:
        _unlink(*paths)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # gone already
        return 0


def _unlink(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def copy_rows(store: LocalStore, stream: StreamInfo, path: Path, offer: SnapshotOffer) -> int:
    """Copy the rows of a snapshot file (table ``rows``) into the stream's local table.

    One transaction with the stream's cursor, as a first copy row by row: rows
    no longer in scope go, rows with a local change not yet pushed keep it (or
    stay deleted), rows a subscription holds stay. Returns the rows in the file.
    """
    names = [c.name for c in stream.columns]
    with store.lock:
        try:
            store.conn.execute(f"ATTACH DATABASE ? AS {SNAP}", (str(path),))
        except store.errors as exc:
            raise LocalStoreError(f"cannot open the snapshot file: {exc}") from exc
        try:
            have = [r[1] for r in store.conn.execute(f"PRAGMA {SNAP}.table_info(rows)")]
            if have != names:
                raise LocalStoreError(
                    f"the snapshot has columns {have}, the catalog {names}: refresh the catalog"
                )
            if transferable(store.conn, stream.local_table):
                return _copy(store, stream, offer, transfer=True)
            suspended = store.suspend_indexes(stream)
            try:
                return _copy(store, stream, offer, transfer=False)
            finally:
                if suspended:
                    store.restore_indexes(stream)
        except store.errors as exc:
            raise LocalStoreError(f"cannot apply the snapshot: {exc}") from exc
        finally:
            store.conn.execute(f"DETACH DATABASE {SNAP}")


def transferable(conn: sqlite3.Connection, table: str) -> bool:
    """Whether SQLite can copy the attached file's ``rows`` into an empty ``table``
    as stored: the same columns, a twin in the file of every local index, no
    foreign keys, and no triggers but the engine's (which the copy drops)."""
    if columns_of(conn, "main", table) != columns_of(conn, SNAP, "rows"):
        return False
    mine, theirs = indexes_of(conn, "main", table), indexes_of(conn, SNAP, "rows")
    if mine is None or theirs is None or not mine <= theirs:
        return False
    if conn.execute(f"PRAGMA main.foreign_key_list({quote(table)})").fetchone() is not None:
        return False
    return all(name.startswith("syncunit_") for _, name, _ in _triggers(conn, table))


def _triggers(conn: sqlite3.Connection, table: str) -> list[tuple[str, str, str]]:
    """(schema, name, sql) of the triggers on ``table``, the temporary ones too."""
    return [
        (schema, name, sql)
        for schema in ("main", "temp")
        for name, sql in conn.execute(
            f"SELECT name, sql FROM {schema}.sqlite_master WHERE type = 'trigger'"
            " AND tbl_name = ? ORDER BY name",
            (table,),
        ).fetchall()
    ]


def _copy(store: LocalStore, stream: StreamInfo, offer: SnapshotOffer, *, transfer: bool) -> int:
    table = stream.local_table
    t, key = quote(table), quote(stream.key)
    pending = "SELECT row_key FROM syncunit_outbox WHERE table_name = ?"
    with store.relaxed() as c:  # a lost copy is fetched again: no fsync
        # The engine's triggers must not see the copy (and would stop the transfer).
        engine = [x for x in _triggers(c, table) if x[1].startswith("syncunit_")]
        for schema, name, _ in engine:
            c.execute(f"DROP TRIGGER {schema}.{quote(name)}")
        held = table in store.held and holds.has_holds(c, table)
        # A first copy is the whole picture: rows not in it go, unless a local change
        # waits to be pushed or a subscription holds them.
        if held:
            holds.reset_plain(c, stream)
        else:
            c.execute(f"DELETE FROM {t} WHERE {key} NOT IN ({pending})", (table,))
        if transfer:
            kept = c.execute(f"SELECT 1 FROM {t} LIMIT 1").fetchone() is not None
            if kept:  # set aside: the transfer needs an empty table
                c.execute(f"CREATE TABLE {KEPT} AS SELECT * FROM {t}")
                c.execute(f"DELETE FROM {t}")
            rows = c.execute(f"INSERT INTO {t} SELECT * FROM {SNAP}.rows").rowcount
            # Pulls don't clobber: a row with a change not yet pushed is the device's.
            c.execute(f"DELETE FROM {t} WHERE {key} IN ({pending})", (table,))
            if kept:
                c.execute(
                    f"INSERT INTO {t} SELECT * FROM {KEPT} WHERE {key} IN ({pending})", (table,)
                )
                c.execute(  # held rows the file has take its version, as a copy would
                    f"INSERT INTO {t} SELECT * FROM {KEPT} WHERE {key} NOT IN ({pending})"
                    " ON CONFLICT DO NOTHING",
                    (table,),
                )
                c.execute(f"DROP TABLE {KEPT}")
        else:
            cols = ", ".join(quote(col.name) for col in stream.columns)
            sets = ", ".join(
                f"{quote(col.name)} = excluded.{quote(col.name)}"
                for col in stream.columns
                if col.name != stream.key
            )
            rows = c.execute(
                f"INSERT INTO {t} ({cols}) SELECT {cols} FROM {SNAP}.rows"
                f" WHERE {key} NOT IN ({pending})"
                f" ON CONFLICT({key}) {f'DO UPDATE SET {sets}' if sets else 'DO NOTHING'}",
                (table,),
            ).rowcount
            (rows,) = c.execute(f"SELECT count(*) FROM {SNAP}.rows").fetchone()
        if held:  # the plain stream holds the rows subscriptions hold too
            c.execute(
                f"INSERT OR IGNORE INTO syncunit_holds SELECT ?1, {key}, '' FROM {SNAP}.rows"
                f" WHERE {key} IN (SELECT row_key FROM syncunit_holds WHERE local_table = ?1)",
                (table,),
            )
        # The file brings these rows: removals put off for them no longer stand.
        c.execute(
            f"DELETE FROM syncunit_deferred WHERE local_table = ? AND row_key IN"
            f" (SELECT {key} FROM {SNAP}.rows)",
            (table,),
        )
        for schema, _, sql in engine:  # SQLite keeps a temporary one's SQL without TEMP
            c.execute(sql if schema == "main" else "CREATE TEMP " + sql.removeprefix("CREATE "))
        if rows != offer.rows:
            raise SnapshotError(f"the snapshot file holds {rows} rows, its offer {offer.rows}")
        store._end_suspension(stream)
        store._save_cursor(stream, offer.cursor)
    return int(rows)
