"""Snapshot bootstrap: a large first copy as one prebuilt, compressed SQLite file.

A device's first sync of a big scope (a hospital's whole agenda) would insert
its rows chunk by chunk. Instead, the server builds once, in the background,
a SQLite file holding that stream's rows for those parameters, compresses it
with zstd, and offers it (``SnapshotOffer``) to every device whose request has
no cursor for the stream: the 50 tablets of one hospital share one file.

* **Consistent**: the rows are read in one read snapshot, and the file's
  cursor is a finished first copy at that snapshot's watermark, exactly what
  the row-by-row copy would end with; the device's next request takes a normal
  delta from it.
* **Scope**: a file is keyed by the stream's definition hash and the hash of
  the principal's parameters, read with the stream's own query; it is offered,
  and served, only to a principal whose parameters hash the same.
* **Fresh**: a file is offered while its cursor is valid (same epoch, above
  the tombstone horizon) and at most ``max_lag`` versions behind; an older one
  is rebuilt in the background, and the device copies row by row meanwhile.
* **Bounded**: at most ``keep`` files; the least recently offered goes first.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard
from sqlalchemy.engine import Connection

from syncunit.protocol import local_table_ddl
from syncunit.server.changes import StreamReader, params_hash
from syncunit.server.cursor import decode_cursor, encode_cursor
from syncunit.server.store import ServerStore
from syncunit.units import Stream

log = logging.getLogger("syncunit.server")

TABLE = "rows"  # the one table of a snapshot file


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
    """Builds, keeps and offers snapshot files in ``directory``."""

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
        self._ready: dict[tuple[str, str], Snapshot] = {}
        self._used: dict[str, float] = {}
        self._building: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

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
        key = (s.definition_hash, reader.phash)
        with self._lock:
            snap = self._ready.get(key)
        if snap is not None:
            valid = reader._valid(conn, decode_cursor(snap.cursor), watermark, epoch, horizon)
            if valid and watermark - snap.watermark <= self.max_lag and snap.path.exists():
                with self._lock:
                    self._used[snap.name] = time.monotonic()
                return snap
        rows = conn.execute(reader.shape.count(), reader.params).scalar_one()
        if rows >= self.min_rows:
            self.build_later(s, reader.params)
        return None

    def find(self, name: str, stream: Stream, params: Mapping[str, Any]) -> Snapshot | None:
        """The snapshot ``name`` if it holds ``stream`` for these parameters, else None."""
        with self._lock:
            snap = next((x for x in self._ready.values() if x.name == name), None)
        if snap is None or snap.stream != stream.name:
            return None
        if snap.params != params_hash(stream, params) or snap.definition != stream.definition_hash:
            return None
        return snap

    # -- building ------------------------------------------------------------------------

    def build_later(self, stream: Stream, params: Mapping[str, Any]) -> None:
        """Build a snapshot on a background thread, unless one is being built."""
        key = (stream.definition_hash, params_hash(stream, params))
        with self._lock:
            if key in self._building:
                return
            self._building.add(key)

        def run() -> None:
            try:
                self.build(stream, params)
            except Exception:
                log.exception("building a snapshot of %s failed", stream.name)
            finally:
                with self._lock:
                    self._building.discard(key)

        threading.Thread(target=run, name="syncunit-snapshot", daemon=True).start()

    def build(self, stream: Stream, params: Mapping[str, Any]) -> Snapshot:
        """Build the snapshot of ``stream`` for ``params`` now, in one read snapshot."""
        reader = StreamReader(self.store, stream, params, chunk_size=5000)
        pk = stream.key_column
        fd, raw_name = tempfile.mkstemp(dir=self.directory, suffix=".building")
        os.close(fd)
        raw = Path(raw_name)
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
                with self.store.snapshot() as (conn, watermark):
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
            name = f"{stream.name}-{reader.phash[:12]}-{watermark}"
            path = self.directory / f"{name}.sqlite.zst"
            digest = hashlib.sha256()
            tmp = path.with_suffix(".part")
            with raw.open("rb") as src, tmp.open("wb") as dst:
                writer = zstandard.ZstdCompressor(level=3).stream_writer(dst, closefd=False)
                while block := src.read(1 << 20):
                    writer.write(block)
                writer.flush(zstandard.FLUSH_FRAME)
            with tmp.open("rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
            tmp.replace(path)
        finally:
            raw.unlink(missing_ok=True)
        snap = Snapshot(
            name=name,
            path=path,
            stream=stream.name,
            definition=stream.definition_hash,
            params=reader.phash,
            watermark=watermark,
            rows=rows,
            size=path.stat().st_size,
            sha256=digest.hexdigest(),
            cursor=encode_cursor(done),
        )
        with self._lock:
            old = self._ready.get((snap.definition, snap.params))
            self._ready[(snap.definition, snap.params)] = snap
            self._used[snap.name] = time.monotonic()
            dropped = self._evict()
        if old is not None and old.name != snap.name:
            dropped.append(old)
        for gone in dropped:
            gone.path.unlink(missing_ok=True)
        return snap

    def _evict(self) -> list[Snapshot]:
        """Drop the least recently offered snapshots beyond ``keep`` (under the lock)."""
        dropped: list[Snapshot] = []
        while len(self._ready) > self.keep:
            key = min(self._ready, key=lambda k: self._used.get(self._ready[k].name, 0.0))
            snap = self._ready.pop(key)
            self._used.pop(snap.name, None)
            dropped.append(snap)
        return dropped
