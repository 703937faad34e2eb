"""What bounds an initial sync: each side alone, and the SQLite write limit.

* ``server_encode``: the server's read-and-encode path without a network or a
  client: ``StreamReader`` frames (rows as JSON where the store writes it, as for
  the client), ``protocol.encode_frame`` and the server's zstd compressor;
* ``client_apply``: the client's path without a network or a server: the
  recorded compressed bytes decompressed, decoded by ``FrameDecoder`` and
  applied by ``LocalStore.apply_chunk``;
* ``sqlite_limit``: the same rows, already Python tuples, written into an empty
  file with the client's DDL and indexes, one transaction, fastest pragmas.
"""

from __future__ import annotations

import gc
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.env import ensure_paths

HOSPITAL = {"hospital_id": 1}


@dataclass
class Recording:
    """The compressed response pieces of one stream, and how long making them took."""

    pieces: list[bytes] = field(default_factory=list)
    rows: int = 0
    frames: int = 0
    read_s: float = 0.0
    encode_s: float = 0.0
    compress_s: float = 0.0
    raw_bytes: int = 0

    @property
    def wire_bytes(self) -> int:
        return sum(len(p) for p in self.pieces)

    def summary(self) -> dict[str, Any]:
        total = self.read_s + self.encode_s + self.compress_s
        return {
            "rows": self.rows,
            "frames": self.frames,
            "seconds": round(total, 4),
            "rows_per_s": _rate(self.rows, total),
            "read_s": round(self.read_s, 4),
            "encode_s": round(self.encode_s, 4),
            "compress_s": round(self.compress_s, 4),
            "msgpack_bytes": self.raw_bytes,
            "zstd_bytes": self.wire_bytes,
            "bytes_per_row": round(self.wire_bytes / self.rows, 1) if self.rows else None,
        }


def _rate(n: int, seconds: float) -> float | None:
    return round(n / seconds, 1) if seconds > 0 else None


def catalog() -> Any:
    """The hospital catalog, as a client receives it."""
    ensure_paths()
    from hospital.units import schema

    return schema.catalog()


def server_encode(db: Path, chunk_size: int) -> Recording:
    """Read the appointments stream for hospital 1 and encode it as the server does."""
    ensure_paths()
    from hospital.units import appointments

    from syncunit.protocol import Chunk, encode_frame
    from syncunit.server.backends import open_store
    from syncunit.server.changes import StreamReader
    from syncunit.server.streaming import Compressor

    store = open_store(f"sqlite:///{db}")
    comp = Compressor("zstd")
    rec = Recording()
    gc.collect()
    try:
        with store.snapshot() as (conn, watermark):
            facts = store.facts(conn)
            reader = StreamReader(
                store, appointments, HOSPITAL, chunk_size=chunk_size, json_rows=True
            )
            frames = reader.frames(
                conn, watermark, facts["epoch"], int(facts.get("horizon", "0")), None
            )
            while True:
                t0 = time.perf_counter()
                frame = next(frames, None)
                t1 = time.perf_counter()
                if frame is None:
                    break
                raw = encode_frame(frame)
                t2 = time.perf_counter()
                piece = comp.feed(raw) + comp.flush()
                t3 = time.perf_counter()
                rec.read_s += t1 - t0
                rec.encode_s += t2 - t1
                rec.compress_s += t3 - t2
                rec.frames += 1
                rec.raw_bytes += len(raw)
                rec.pieces.append(piece)
                if isinstance(frame, Chunk):
                    rec.rows += frame.row_count()
            rec.pieces.append(comp.flush(final=True))
    finally:
        store.engine.dispose()
    return rec


def _frames(rec: Recording) -> Iterator[tuple[float, float, list[Any]]]:
    """Each recorded piece decompressed and decoded: (unzstd seconds, decode seconds, frames)."""
    import zstandard

    from syncunit.protocol import FrameDecoder

    decoder = FrameDecoder("msgpack")
    dz = zstandard.ZstdDecompressor().decompressobj()
    for piece in rec.pieces:
        t0 = time.perf_counter()
        raw = dz.decompress(piece)
        t1 = time.perf_counter()
        frames = list(decoder.feed(raw))
        yield t1 - t0, time.perf_counter() - t1, frames


def client_apply(rec: Recording, db: Path) -> dict[str, Any]:
    """Decompress, decode and apply ``rec`` into a fresh local store, as the client does."""
    from syncunit.client.store import LocalStore
    from syncunit.protocol import Chunk

    cat = catalog()
    _fresh(db)
    store = LocalStore(db)
    store.apply_catalog(cat)
    # A first copy, as the sync run makes it: every row is new (one upsert each), no
    # automatic checkpoint until the end, the local indexes built once at the end.
    store.copying.update(s.name for s in cat.streams)
    decompress_s = decode_s = apply_s = 0.0
    rows = 0
    gc.collect()
    try:
        with store.bulk():
            t0 = time.perf_counter()
            suspended = [s for s in cat.streams if store.suspend_indexes(s)]
            apply_s += time.perf_counter() - t0
            for unzstd, decode, frames in _frames(rec):
                decompress_s += unzstd
                decode_s += decode
                for frame in frames:
                    if isinstance(frame, Chunk):
                        t0 = time.perf_counter()
                        upserted, _ = store.apply_chunk(cat.stream(frame.stream), frame)
                        apply_s += time.perf_counter() - t0
                        rows += upserted
            t0 = time.perf_counter()
            for s in suspended:
                store.restore_indexes(s)
            apply_s += time.perf_counter() - t0
    finally:
        store.close()
    total = decompress_s + decode_s + apply_s
    return {
        "rows": rows,
        "seconds": round(total, 4),
        "rows_per_s": _rate(rows, total),
        "decompress_s": round(decompress_s, 4),
        "decode_s": round(decode_s, 4),
        "apply_s": round(apply_s, 4),
        "apply_rows_per_s": _rate(rows, apply_s),
    }


def stored_rows(rec: Recording) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The rows of ``rec`` as Python tuples, exactly the values the client stores."""
    from syncunit.protocol import Chunk

    columns: list[str] = []
    rows: list[tuple[Any, ...]] = []
    for _, _, frames in _frames(rec):
        for frame in frames:
            if isinstance(frame, Chunk) and frame.row_count():
                columns = list(frame.columns)
                rows.extend(tuple(r) for r in frame.row_list())
    return columns, rows


def sqlite_limit(
    columns: list[str], rows: list[tuple[Any, ...]], db: Path, *, upsert_sql: bool = False
) -> dict[str, Any]:
    """Write ``rows`` into an empty copy of the client's table: the best SQLite can do.

    The table and its indexes come from ``LocalStore.apply_catalog``, so the
    DDL is the client's (its outbox triggers are dropped: they record the app's
    writes, never the engine's). With ``upsert_sql`` the client's upsert statement is
    used instead of a plain INSERT (same pragmas, one transaction).
    """
    from syncunit.client.store import LocalStore

    cat = catalog()
    info = next(s for s in cat.streams if s.local_table == "LocalAppointment")
    _fresh(db)
    store = LocalStore(db)
    store.apply_catalog(cat)
    sql = store._upsert_sql(info, tuple(columns)) if upsert_sql else None
    store.close()
    conn = sqlite3.connect(db, isolation_level=None)
    # The outbox triggers record the app's writes; the engine's own writes skip them.
    triggers = conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall()
    for (name,) in triggers:
        conn.execute(f'DROP TRIGGER "{name}"')
    for pragma in (
        "journal_mode=OFF",
        "synchronous=OFF",
        "cache_size=-262144",
        "temp_store=MEMORY",
        "locking_mode=EXCLUSIVE",
    ):
        conn.execute(f"PRAGMA {pragma}")
    names = ", ".join(f'"{c}"' for c in columns)
    marks = ", ".join("?" * len(columns))
    sql = sql or f'INSERT INTO "LocalAppointment" ({names}) VALUES ({marks})'
    t0 = time.perf_counter()
    conn.execute("BEGIN")
    conn.executemany(sql, rows)
    conn.execute("COMMIT")
    seconds = time.perf_counter() - t0
    stored = conn.execute('SELECT count(*) FROM "LocalAppointment"').fetchone()[0]
    conn.close()
    if stored != len(rows):
        raise RuntimeError(f"the limit run stored {stored} rows, not {len(rows)}")
    return {
        "rows": len(rows),
        "seconds": round(seconds, 4),
        "rows_per_s": _rate(len(rows), seconds),
        "statement": "upsert" if upsert_sql else "insert",
    }


def _fresh(db: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
