"""Applying a snapshot offer: download the file, check it, copy its rows in.

The server may answer a stream's first copy with a ``SnapshotOffer`` instead of
chunks. The file is downloaded beside the local database into a ``.part`` file
that a later attempt continues with an HTTP ``Range`` request; its size and
SHA-256 must match the offer. It is then decompressed into a temporary SQLite
file, attached, and its rows are copied into the local table with one
``INSERT ... SELECT`` in the same transaction as the stream's cursor (rows with
a local change not yet pushed are left alone, as a chunk would). Any failure
raises ``SnapshotError``; the caller then asks for the copy row by row.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from syncunit.client.outbox import trigger_ddl
from syncunit.client.store import quote
from syncunit.errors import LocalStoreError, ProtocolError, SyncUnitError
from syncunit.protocol import SnapshotOffer, StreamInfo

if TYPE_CHECKING:
    from syncunit.client.client import SyncClient, SyncResult
    from syncunit.client.store import LocalStore

log = logging.getLogger("syncunit.client")

try:
    import zstandard
except ImportError:  # pragma: no cover
    zstandard = None  # type: ignore[assignment]


class SnapshotError(SyncUnitError):
    """A snapshot could not be downloaded, checked or applied."""


def can_apply() -> bool:
    """Whether this client can decompress snapshot files (zstandard is installed)."""
    return zstandard is not None


def part_path(store: LocalStore, offer: SnapshotOffer) -> Path:
    """Where the download of ``offer`` goes (beside the database file, if it has one)."""
    with store.lock:
        main = store.conn.execute("PRAGMA database_list").fetchone()
    folder = Path(main[2]).parent if main and main[2] else Path(tempfile.gettempdir())
    return folder / f".syncunit-snapshot-{offer.sha256[:24]}.part"


def download(http: httpx.Client, offer: SnapshotOffer, part: Path) -> None:
    """Fetch ``offer``'s file into ``part``, continuing what an earlier attempt left."""
    have = part.stat().st_size if part.exists() else 0
    if have > offer.size:
        part.unlink()
        have = 0
    if have < offer.size:
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with http.stream("GET", offer.path, headers=headers) as r:
                if r.status_code not in (200, 206):
                    raise SnapshotError(f"the snapshot download answered {r.status_code}")
                mode = "ab" if r.status_code == 206 else "wb"  # 200: the whole file again
                with part.open(mode) as f:
                    for block in r.iter_bytes():
                        f.write(block)
        except httpx.HTTPError as exc:
            raise SnapshotError(f"the snapshot download was cut: {exc}") from exc
    size = part.stat().st_size
    digest = hashlib.sha256()
    with part.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    if size != offer.size or digest.hexdigest() != offer.sha256:
        part.unlink()
        raise SnapshotError(
            f"the snapshot file does not match its offer ({size} of {offer.size} bytes,"
            " checksum differs): it was discarded"
        )


def apply(store: LocalStore, info: StreamInfo, offer: SnapshotOffer, part: Path) -> int:
    """Copy the rows of the downloaded file into ``info``'s local table; return how many."""
    if zstandard is None:
        raise SnapshotError("zstandard is not installed")
    fd, name = tempfile.mkstemp(dir=part.parent, suffix=".sqlite")
    os.close(fd)
    plain = Path(name)
    try:
        with part.open("rb") as src, plain.open("wb") as dst:
            zstandard.ZstdDecompressor().copy_stream(src, dst)
        return copy_rows(store, info, plain, offer.cursor)
    except zstandard.ZstdError as exc:
        raise SnapshotError(f"the snapshot file cannot be decompressed: {exc}") from exc
    finally:
        plain.unlink(missing_ok=True)
        part.unlink(missing_ok=True)


def apply_offers(client: SyncClient, offers: list[SnapshotOffer], result: SyncResult) -> bool:
    """Apply the snapshot offers of a response; False if one failed.

    A failed one (cut download, wrong checksum, unreadable file) leaves its
    stream without a cursor: the next request copies it row by row.
    """
    catalog = client.store.catalog()
    ok = True
    for offer in offers:
        info = None if catalog is None else catalog.stream(offer.stream)
        if info is None:
            raise ProtocolError(f"server offered a snapshot of unknown stream {offer.stream!r}")
        part = part_path(client.store, offer)
        try:
            download(client.http, offer, part)
            rows = apply(client.store, info, offer, part)
        except (SnapshotError, LocalStoreError) as exc:
            log.warning("snapshot of %s not used, copying row by row: %s", offer.stream, exc)
            ok = False
            continue
        result.bytes_in += offer.size
        t = info.local_table
        result.rows_in[t] = result.rows_in.get(t, 0) + rows
        result.snapshots.append(offer.stream)
        if client.on_progress is not None:
            client._emit(client.on_progress, result.unit, rows, rows)
    return ok


def copy_rows(store: LocalStore, stream: StreamInfo, path: Path, cursor: str) -> int:
    """Copy the rows of a snapshot file (table ``rows``) into the stream's local table.

    One transaction with the stream's cursor, as a chunk; rows with a local
    change not yet pushed keep it. Returns the rows in the file.
    """
    t, key = quote(stream.local_table), quote(stream.key)
    names = [c.name for c in stream.columns]
    cols = ", ".join(map(quote, names))
    sets = ", ".join(f"{quote(c)} = excluded.{quote(c)}" for c in names if c != stream.key)
    upsert = f"DO UPDATE SET {sets}" if sets else "DO NOTHING"
    with store.lock:
        try:
            store.conn.execute("ATTACH DATABASE ? AS syncunit_snapshot", (str(path),))
        except store.errors as exc:
            raise LocalStoreError(f"cannot open the snapshot file: {exc}") from exc
        try:
            have = [r[1] for r in store.conn.execute("PRAGMA syncunit_snapshot.table_info(rows)")]
            if have != names:
                raise LocalStoreError(
                    f"the snapshot has columns {have}, the catalog {names}: refresh the catalog"
                )
            suspended = store.suspend_indexes(stream)
            try:
                with store.atomic() as c:
                    pushed = stream.local_table in store.pushed
                    for stmt in trigger_ddl(stream)[:3] if pushed else []:
                        c.execute(stmt)
                    local = [r[1] for r in c.execute(f"PRAGMA table_info({t})")]
                    empty = c.execute(f"SELECT 1 FROM {t} LIMIT 1").fetchone() is None
                    pending = c.execute(
                        "SELECT 1 FROM syncunit_outbox WHERE table_name = ? LIMIT 1",
                        (stream.local_table,),
                    ).fetchone()
                    if empty and pending is None and local == names:
                        # No rows, no local changes, no triggers, the same columns in
                        # the same order: SQLite copies the file's pages as they are.
                        c.execute(f"INSERT INTO {t} SELECT * FROM syncunit_snapshot.rows")
                    else:
                        c.execute(
                            f"INSERT INTO {t} ({cols}) SELECT {cols}"
                            f" FROM syncunit_snapshot.rows WHERE {key} NOT IN"
                            " (SELECT row_key FROM syncunit_outbox WHERE table_name = ?)"
                            f" ON CONFLICT({key}) {upsert}",
                            (stream.local_table,),
                        )
                    (rows,) = c.execute("SELECT count(*) FROM syncunit_snapshot.rows").fetchone()
                    for stmt in trigger_ddl(stream)[3:] if pushed else []:
                        c.execute(stmt)
                    c.execute(
                        "INSERT INTO syncunit_cursors (stream, local_table, definition, cursor)"
                        " VALUES (?, ?, ?, ?) ON CONFLICT(stream) DO UPDATE SET"
                        " cursor = excluded.cursor, definition = excluded.definition",
                        (stream.name, stream.local_table, stream.definition, cursor),
                    )
            finally:
                if suspended:
                    store.restore_indexes(stream)
        except store.errors as exc:
            raise LocalStoreError(f"cannot apply the snapshot: {exc}") from exc
        finally:
            store.conn.execute("DETACH DATABASE syncunit_snapshot")
    return int(rows)
