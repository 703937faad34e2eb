"""Snapshot bootstrap: a large first copy as one prebuilt, compressed SQLite file.

A device's first sync of a big scope (a hospital's whole agenda) would insert
its rows chunk by chunk. Instead, the server builds once, in the background,
a SQLite file holding that stream's rows for those parameters, compresses it
with zstd, and offers it (``SnapshotOffer``) to every device whose request has
no cursor for the stream: the 50 tablets of one hospital share one file.

* **Consistent**: the rows are read in one read snapshot (within the tenant's
  scope, on a store that shards by tenant), and the file's cursor is a finished
  first copy at that snapshot's watermark, exactly what the row-by-row copy
  would end with; the device's next request takes a normal delta from it.
* **Scope**: a file is keyed by the stream's definition hash and the hash of
  the principal's parameters, read with the stream's own query; it is offered,
  and served, only to a principal whose parameters hash the same and who may
  read the stream (the checks of a sync: see ``SyncServer.get_snapshot``).
* **Fresh**: a file is offered while its cursor is valid (same epoch, above
  the tombstone horizon) and at most ``max_lag`` versions behind; an older one
  is rebuilt in the background, and the device copies row by row meanwhile. A
  build that failed (a full disk) is started again only after a backoff.
* **Shared**: the folder is the list of files. Each file ``<name>.sqlite.zst``
  has a side file ``<name>.json`` (stream, hashes, watermark, rows, size,
  checksum, cursor); both are published together under the folder's lock
  (``.lock``), so every server process on the folder offers and serves every
  file, whichever built it. The name ends with the checksum: a file, once
  published, never changes. One whose size is no longer the one published
  (truncated on the server's disk) is not offered: it is removed, and built again.
* **Bounded**: at most ``keep`` files in the folder; the least recently offered
  goes first (a side file's modification time is when it was last offered). A
  process starting on the folder keeps the files it can use and removes the
  rest: files without a valid side file, and the ``*.building`` files of builds
  whose process died (a live build holds a lock on its file).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import zstandard
from sqlalchemy.engine import Connection

from syncunit.heldfiles import held_scratch, unheld
from syncunit.protocol import local_table_ddl
from syncunit.server.changes import StreamReader, params_hash
from syncunit.server.cursor import decode_cursor, encode_cursor
from syncunit.server.limits import shorten
from syncunit.server.problems import ProblemException
from syncunit.server.store import ServerStore
from syncunit.units import Stream

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("syncunit.server")

TABLE = "rows"  # the one table of a snapshot file
DATA = ".sqlite.zst"  # a published file
META = ".json"  # its side file
BUILDING = ".building"  # a build's scratch file, locked by the process writing it
#: What a file's name may hold (it comes from the request's path).
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
#: Seconds before a build that failed is started again; doubled with each failure in a
#: row, up to the second.
BUILD_RETRY_DELAY = 60.0
MAX_BUILD_RETRY_DELAY = 3600.0


@dataclass(frozen=True)
class Snapshot:
    """One built file: a stream's rows for one parameter hash at one watermark."""

    name: str
    path: Path
    stream: str
    definition: str
    params: str
    watermark: int
    rows: int
    size: int
    sha256: str
    cursor: str


class Snapshots:
    """Builds, keeps and offers snapshot files in ``directory`` (shared by processes)."""

    def __init__(
        self,
        store: ServerStore,
        directory: str | os.PathLike[str],
        *,
        min_rows: int = 100_000,
        max_lag: int = 100_000,
        keep: int = 16,
    ) -> None:
        self.store = store
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.min_rows = min_rows
        self.max_lag = max_lag
        self.keep = keep
        self._known: dict[str, Snapshot] = {}  # side files read (a name's never change)
        self._building: set[tuple[str, str]] = set()
        #: Builds that failed, by key: how many in a row, and when one may start again.
        self._failed: dict[tuple[str, str], tuple[int, float]] = {}
        #: Published snapshots whose file was found not to be the size published.
        self._bad: set[str] = set()
        self._lock = threading.Lock()
        #: The clock the build backoff reads (tests set another).
        self.clock: Callable[[], float] = time.monotonic
        self.recover()

    # -- the folder ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _folder(self) -> Iterator[None]:
        """The folder's lock, across processes: publishing, evicting and cleaning take
        it (a build does not, but for its last two renames). A lock on a file of its own
        (``flock``) holds between threads as between processes."""
        with (self.directory / ".lock").open("a") as f:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            yield  # closing the file releases the lock

    def ready(self) -> list[Snapshot]:
        """The published snapshots in the folder, whichever process built them."""
        names = {meta.name.removesuffix(META) for meta in self.directory.glob(f"*{META}")}
        for gone in set(self._known) - names:  # removed by another process
            self._known.pop(gone, None)
        return [snap for name in names if (snap := self._read(name)) is not None]

    def _read(self, name: str) -> Snapshot | None:
        """The snapshot ``name`` as its side file describes it, or None; None too when
        its file is not the size published (gone, truncated, grown: see ``_drop_bad``)."""
        snap = self._described(name)
        if snap is None:
            return None
        if _size(snap.path) != snap.size:  # a stat: the checksum is the device's to check
            with self._lock:
                self._known.pop(name, None)
                self._bad.add(name)
            return None
        return snap

    def _described(self, name: str) -> Snapshot | None:
        """The snapshot ``name`` as its side file describes it (its file unchecked)."""
        snap = self._known.get(name)
        if snap is None:
            meta = self.directory / f"{name}{META}"
            try:
                fields = json.loads(meta.read_bytes())
                snap = Snapshot(path=self.directory / f"{name}{DATA}", **fields)
            except (OSError, ValueError, TypeError):
                return None
            if snap.name != name:
                return None
            self._known[name] = snap
        return snap

    def _drop_bad(self) -> None:
        """Remove the snapshots whose file was found damaged after publishing (``_read``):
        offered, each would be downloaded by every new device and refused; without
        them, the next large first copy builds the file again."""
        with self._lock:
            bad, self._bad = self._bad, set()
        if not bad:
            return
        dropped: list[Path] = []
        with self._folder():
            for name in bad:
                snap = self._described(name)
                if snap is None or _size(snap.path) == snap.size:
                    continue  # removed, or published again (rebuilt), meanwhile
                log.warning(
                    "removing snapshot %s: its file holds %d bytes, %d were published",
                    name, max(_size(snap.path), 0), snap.size,
                )  # fmt: skip
                self._forget(snap)
                dropped.append(snap.path)
        _unlink(*dropped)

    def recover(self) -> None:
        """Take the folder's files into account: keep the published ones, remove what
        no process can use (killed builds, files without a side file), evict to
        ``keep``. Run when the process starts; any number of processes may share the
        folder."""
        with self._folder():
            for path in self.directory.iterdir():
                name = path.name
                if name.endswith(BUILDING):
                    if unheld(path):
                        log.info("removing %s, left by a build that did not finish", name)
                        path.unlink(missing_ok=True)
                elif name.endswith(META):
                    snap = self._read(name.removesuffix(META))
                    if snap is None or _size(snap.path) != snap.size:
                        log.info("removing snapshot %s: its file is missing or unreadable", name)
                        path.unlink(missing_ok=True)
                        self.directory.joinpath(name.removesuffix(META) + DATA).unlink(
                            missing_ok=True
                        )
                elif name.endswith(DATA):
                    if not self.directory.joinpath(name.removesuffix(DATA) + META).exists():
                        log.info("removing %s: it has no side file", name)
                        path.unlink(missing_ok=True)
                elif name.endswith((".part", ".tmp")):  # a publication cut by a kill
                    path.unlink(missing_ok=True)
            dropped = self._evict()
        _unlink(*dropped)

    # -- offering ------------------------------------------------------------------------

    def offer(
        self,
        conn: Connection,
        watermark: int,
        epoch: str,
        horizon: int,
        reader: StreamReader,
    ) -> Snapshot | None:
        """A fresh snapshot of ``reader``'s stream and parameters, or None.

        Called inside the request's read snapshot for a delta stream the device
        holds no cursor of. Without a fresh file, a large scope gets one built in
        the background (this request copies row by row).
        """
        s = reader.stream
        same = [
            x
            for x in self.ready()
            if (x.stream, x.definition, x.params) == (s.name, s.definition_hash, reader.phash)
        ]
        self._drop_bad()
        for snap in sorted(same, key=lambda x: x.watermark, reverse=True):
            valid = reader._valid(conn, decode_cursor(snap.cursor), watermark, epoch, horizon)
            if valid and watermark - snap.watermark <= self.max_lag:
                with contextlib.suppress(OSError):  # offered now: evicted last
                    os.utime(self.directory / f"{snap.name}{META}")
                return snap
        rows = conn.execute(reader.shape.count(), reader.params).scalar_one()
        if rows >= self.min_rows:
            self.build_later(s, reader.params)
        return None

    def find(self, name: str, stream: Stream, params: Mapping[str, Any]) -> Snapshot | None:
        """The snapshot ``name`` if it holds ``stream`` for these parameters, else None."""
        if not _NAME.fullmatch(name):
            return None
        snap = self._read(name)
        if snap is None or snap.stream != stream.name:
            return None
        if snap.params != params_hash(stream, params) or snap.definition != stream.definition_hash:
            return None
        return snap

    # -- building ------------------------------------------------------------------------

    def build_later(self, stream: Stream, params: Mapping[str, Any]) -> None:
        """Build a snapshot on a background thread, unless one is being built, or one
        failed lately: after a failed build (a full disk, a database error) the next
        waits ``BUILD_RETRY_DELAY`` seconds, doubling with each failure in a row up to
        ``MAX_BUILD_RETRY_DELAY`` (the devices copy row by row meanwhile)."""
        key = (stream.definition_hash, params_hash(stream, params))
        with self._lock:
            failures, after = self._failed.get(key, (0, 0.0))
            if key in self._building or self.clock() < after:
                return
            self._building.add(key)
        if self._built_elsewhere(stream, key[1]):
            with self._lock:
                self._building.discard(key)
            return

        def run() -> None:
            try:
                self.build(stream, params)
            except Exception:
                delay = min(MAX_BUILD_RETRY_DELAY, BUILD_RETRY_DELAY * 2**failures)
                log.exception(
                    "building a snapshot of %s failed (not tried again for %.0f s)",
                    stream.name, delay,
                )  # fmt: skip
                with self._lock:
                    self._failed[key] = (failures + 1, self.clock() + delay)
            else:
                with self._lock:
                    self._failed.pop(key, None)
            finally:
                with self._lock:
                    self._building.discard(key)

        threading.Thread(target=run, name="syncunit-snapshot", daemon=True).start()

    def _prefix(self, stream: Stream, phash: str) -> str:
        safe = re.sub(r"[^A-Za-z0-9_]", "_", stream.name)[:40]  # the stream's name is any text
        return f"{safe}-{stream.definition_hash[:8]}-{phash[:12]}-"

    def _built_elsewhere(self, stream: Stream, phash: str) -> bool:
        """Whether another process is building this stream for these parameters now."""
        prefix = self._prefix(stream, phash)
        return any(not unheld(p) for p in self.directory.glob(f"{glob_escape(prefix)}*{BUILDING}"))

    def build(self, stream: Stream, params: Mapping[str, Any]) -> Snapshot:
        """Build the snapshot of ``stream`` for ``params`` now, in one read snapshot
        (scoped to ``params``: a store sharded by tenant reads on the tenant's node)."""
        reader = StreamReader(self.store, stream, params, chunk_size=5000)
        pk = stream.key_column
        prefix = self._prefix(stream, reader.phash)
        raw_fd, raw = held_scratch(self.directory, prefix, BUILDING)
        packed_fd, packed = held_scratch(self.directory, prefix, BUILDING)
        rows = 0
        try:
            out = sqlite3.connect(raw, isolation_level=None)
            try:
                out.execute("PRAGMA journal_mode=OFF")
                out.execute("PRAGMA synchronous=OFF")
                # Exactly the device's local table and indexes (see local_table_ddl):
                # an empty local table takes the records and index entries as they are.
                create_table, *create_indexes = local_table_ddl(stream.info(), TABLE)
                out.execute(create_table)
                insert = f"INSERT INTO {TABLE} VALUES ({', '.join('?' * len(stream.columns))})"
                out.execute("BEGIN")
                with self.store.snapshot(scope=params) as (conn, watermark):
                    self.store.before_long_read(conn)  # the walk reads the whole scope
                    epoch, _ = self.store.epoch_and_horizon(conn)
                    query = reader.rows_select(raw=True).order_by(pk)
                    for part in reader._partitions(conn, query):
                        data = reader._columnar(part)
                        out.executemany(insert, zip(*data, strict=True))
                        rows += len(part)
                    done = reader._cursor(epoch, "done", since=watermark, high=watermark)
                for stmt in create_indexes:  # built once over all rows: sorted, packed
                    out.execute(stmt)
                out.execute("COMMIT")
            finally:
                out.close()
            digest = hashlib.sha256()
            with raw.open("rb") as src, packed.open("wb") as dst:
                writer = zstandard.ZstdCompressor(level=3).stream_writer(dst, closefd=False)
                while block := src.read(1 << 20):
                    writer.write(block)
                writer.flush(zstandard.FLUSH_FRAME)
            with packed.open("rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
            sha = digest.hexdigest()
            name = f"{prefix}{watermark}-{sha[:16]}"
            snap = Snapshot(
                name=name,
                path=self.directory / f"{name}{DATA}",
                stream=stream.name,
                definition=stream.definition_hash,
                params=reader.phash,
                watermark=watermark,
                rows=rows,
                size=packed.stat().st_size,
                sha256=sha,
                cursor=encode_cursor(done),
            )
            dropped = self._publish(snap, packed)
        finally:
            os.close(raw_fd)
            os.close(packed_fd)
            _unlink(raw, packed)
        _unlink(*dropped)
        return snap

    def _publish(self, snap: Snapshot, packed: Path) -> list[Path]:
        """Put the file and its side file in place, under the folder's lock; return
        the files it replaces (older ones of its stream and parameters) or evicts."""
        fields = {k: v for k, v in asdict(snap).items() if k != "path"}
        meta = self.directory / f"{snap.name}{META}"
        tmp = meta.with_suffix(".tmp")
        with self._folder():
            packed.replace(snap.path)
            tmp.write_text(json.dumps(fields))
            tmp.replace(meta)
            self._known[snap.name] = snap
            same = (snap.stream, snap.definition, snap.params)
            older = [
                x
                for x in self.ready()
                if (x.stream, x.definition, x.params) == same
                and x.name != snap.name
                and x.watermark <= snap.watermark
            ]
            for old in older:
                self._forget(old)
            dropped = self._evict()
        return [p for old in older for p in self._files(old)] + dropped

    def _files(self, snap: Snapshot) -> list[Path]:
        return [self.directory / f"{snap.name}{META}", snap.path]

    def _forget(self, snap: Snapshot) -> None:
        """No longer offer ``snap`` (under the folder's lock): its side file goes now."""
        (self.directory / f"{snap.name}{META}").unlink(missing_ok=True)
        self._known.pop(snap.name, None)

    def _evict(self) -> list[Path]:
        """Drop the least recently offered snapshots beyond ``keep`` (under the folder's
        lock); return the data files to remove."""
        ready = sorted(self.ready(), key=lambda x: _mtime(self.directory / f"{x.name}{META}"))
        dropped = ready[: max(0, len(ready) - self.keep)]
        for snap in dropped:
            self._forget(snap)
        return [snap.path for snap in dropped]


#: Most ranges one ``Range`` header may ask for; past it, the whole file is sent (as
#: Starlette's ``FileResponse`` does).
MAX_RANGES = 100


def check_range(header: str, size: int) -> None:
    """Refuse a ``Range`` header of a file of ``size`` bytes that ``FileResponse``
    would answer in plain text: 400 ``invalid-range`` if it cannot be read, 416
    ``range-not-satisfiable`` (with ``Content-Range: bytes */size``) if it starts past
    the end. It reads the header as ``FileResponse`` does; parts it cannot read are
    skipped, as there.
    """
    units, sep, spec = header.partition("=")
    if not sep or units.strip().lower() != "bytes":
        raise ProblemException(
            "invalid-range", f"Range {shorten(header, 60)}: send 'Range: bytes=<first>-'"
        )
    if spec.count(",") + 1 > MAX_RANGES:
        return  # the whole file is sent
    ranges: list[tuple[int, int]] = []
    for part in spec.split(","):
        first, dash, last = part.strip().partition("-")
        if not dash or not (first.strip() or last.strip()):
            continue
        try:
            start = int(first) if first.strip() else max(size - int(last), 0)
            end = int(last) + 1 if first.strip() and last.strip() and int(last) < size else size
        except ValueError:
            continue
        ranges.append((start, end))
    if not ranges:
        raise ProblemException(
            "invalid-range",
            f"Range {shorten(header, 60)} names no byte range; send 'Range: bytes=<first>-'",
        )
    if any(not 0 <= start < size for start, _ in ranges):
        raise ProblemException(
            "range-not-satisfiable",
            f"the file holds {size} bytes: a range starts at 0 to {size - 1}; download it"
            " whole again (without Range)",
            headers={"Content-Range": f"bytes */{size}"},
        )
    if any(start >= end for start, end in ranges):
        raise ProblemException(
            "invalid-range",
            f"Range {shorten(header, 60)}: a range's last byte comes before its first",
        )


def glob_escape(text: str) -> str:
    """``text`` matched literally by ``Path.glob``."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _unlink(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
