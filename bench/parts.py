"""One side of a sync at a time, variants interleaved in one process: ``python -m bench.parts``.

Figures that a loaded machine leaves readable, since each variant runs right
after the other under the same load:

- ``delta``: the server's part of a 100-row delta (``StreamReader`` frames,
  encoded), CPU per request, after another connection's write each time (it
  empties SQLite's page cache, as the bench's backoffice writes do), with the
  changed rows found through the pinned scope and by the version index.
- ``apply``: the client's write path for a first copy (``apply_chunk`` per
  chunk, indexes suspended and built at the end, as ``SyncClient`` does) against
  the SQLite write limit, on the same recorded rows.

Uses the bench's cached server databases (``bench.datasets``).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
for _p in (str(_ROOT / "examples"), str(_ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench import bounds, scenarios  # noqa: E402
from bench.datasets import server_db_copy  # noqa: E402


def _ms(values: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(statistics.median(values) * 1000, 3),
        "min_ms": round(min(values) * 1000, 3),
    }


def delta_parts(sizes: Sequence[int], rounds: int, workdir: Path) -> dict[str, Any]:
    """Server CPU of one 100-row delta per size: pinned scope against version index."""
    from hospital.units import appointments

    from syncunit.protocol import encode_frame
    from syncunit.server import changes
    from syncunit.server.backends import open_store
    from syncunit.server.cursor import encode_cursor

    out: dict[str, Any] = {}
    for n in sizes:
        db, _ = server_db_copy(n, workdir)
        store = open_store(f"sqlite:///{db}")
        reader = changes.StreamReader(store, appointments, {"hospital_id": 1}, chunk_size=2000)
        with store.snapshot() as (conn, since):
            facts = store.facts(conn)
        epoch, horizon = facts["epoch"], int(facts.get("horizon", "0"))
        token = encode_cursor(reader._cursor(epoch, "done", since=since, high=since))
        scenarios.change_appointments(db, 100, random.Random(1), "parts")
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("CREATE TABLE IF NOT EXISTS bench_parts (x)")
        cpu: dict[str, list[float]] = {"pinned": [], "by_version": []}
        saved = changes.FEW_CHANGES
        try:
            for _ in range(rounds):
                for name, few in (("pinned", -1), ("by_version", saved)):
                    changes.FEW_CHANGES = few
                    other.execute("INSERT INTO bench_parts VALUES (1)")  # caches emptied
                    c0 = time.process_time()
                    with store.snapshot() as (conn, watermark):
                        for frame in reader.frames(conn, watermark, epoch, horizon, token):
                            encode_frame(frame)
                    cpu[name].append(time.process_time() - c0)
        finally:
            changes.FEW_CHANGES = saved
            other.close()
            store.engine.dispose()
        out[str(n)] = {k: _ms(v) for k, v in cpu.items()}
        print(n, out[str(n)], f"load {os.getloadavg()[0]:.2f}", flush=True)
    return out


def apply_parts(rows: int, rounds: int, workdir: Path) -> dict[str, Any]:
    """The client's first-copy write path against the write limit, seconds per copy."""
    from syncunit.client.store import LocalStore
    from syncunit.protocol import Chunk

    db, _ = server_db_copy(rows, workdir)
    rec = bounds.server_encode(db, 2000)
    frames = [f for _, _, fs in bounds._frames(rec) for f in fs]
    columns, stored = bounds.stored_rows(rec)
    cat = bounds.catalog()
    info = next(s for s in cat.streams if s.local_table == "LocalAppointment")
    took: dict[str, list[float]] = {"limit": [], "client": []}
    for _ in range(rounds):
        gc.collect()
        took["limit"].append(
            bounds.sqlite_limit(columns, stored, workdir / "limit.sqlite")["seconds"]
        )
        local = workdir / "apply.sqlite"
        bounds._fresh(local)
        store = LocalStore(local)
        store.apply_catalog(cat)
        gc.collect()
        t0 = time.perf_counter()
        with store.bulk():
            store.suspend_indexes(info)
            for frame in frames:
                if isinstance(frame, Chunk):
                    stream = cat.stream(frame.stream)
                    assert stream is not None
                    store.apply_chunk(stream, frame)
        took["client"].append(time.perf_counter() - t0)
        store.close()
    out = {k: {"median_s": round(statistics.median(v), 4), "min_s": round(min(v), 4)}
           for k, v in took.items()}  # fmt: skip
    print(rows, out, f"load {os.getloadavg()[0]:.2f}", flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=["delta", "apply"])
    p.add_argument("--sizes", default="10000,1000000", help="delta: server table sizes")
    p.add_argument("--rows", type=int, default=100_000, help="apply: rows of the first copy")
    p.add_argument("--rounds", type=int, default=40)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="syncunit-parts-") as tmp:
        if args.part == "delta":
            sizes = [int(x) for x in args.sizes.replace(",", " ").split()]
            delta_parts(sizes, args.rounds, Path(tmp))
        else:
            apply_parts(args.rows, min(args.rounds, 10), Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
