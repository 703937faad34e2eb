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
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from syncunit.errors import SyncUnitError
from syncunit.protocol import SnapshotOffer, StreamInfo

if TYPE_CHECKING:
    from syncunit.client.store import LocalStore

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
        return store.apply_snapshot(info, plain, offer.cursor)
    except zstandard.ZstdError as exc:
        raise SnapshotError(f"the snapshot file cannot be decompressed: {exc}") from exc
    finally:
        plain.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
