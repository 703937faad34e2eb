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
- ``delta-apply``: the client's part of a 100-row delta (``apply_chunk`` of the
  changed rows into a device holding the whole scope), the index entries
  rewritten only where an indexed value changed against every row's entries
  rewritten (the plain upsert of earlier versions).
- ``first-cpu``: whole first syncs (a server process, a fresh client process
  each), each followed by the write limit on the same rows, with both sides' CPU
  over the sync and the client's index build once the copy ends: the bound two
  cores put on ``initial_vs_limit`` (``tail + (client + server - tail) / 2``,
  every second but the tail spread over both cores) beside the ratio measured.

Besides times, each prints the OS reads (``syscr`` of ``/proc/self/io``: pages
SQLite had to read, its cache having missed) and, for the client, the WAL
frames a delta wrote: counts that the machine's load does not move.

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


def _os_reads() -> int:
    """Read calls this process made so far (each page SQLite's cache missed is one)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("syscr:"):
            return int(line.split()[1])
    return 0


def delta_parts(sizes: Sequence[int], rounds: int, workdir: Path) -> dict[str, Any]:
    """Server CPU of one 100-row delta per size: pinned scope against version index."""
    from hospital.server import build
    from hospital.units import appointments

    from syncunit.protocol import encode_frame
    from syncunit.server import changes
    from syncunit.server.backends import open_store
    from syncunit.server.cursor import encode_cursor

    out: dict[str, Any] = {}
    for n in sizes:
        db, _ = server_db_copy(n, workdir)
        build(f"sqlite:///{db}").store.engine.dispose()  # brings the file to this version
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
        reads: dict[str, list[int]] = {"pinned": [], "by_version": []}
        saved = changes.FEW_CHANGES
        try:
            for _ in range(rounds):
                for name, few in (("pinned", -1), ("by_version", saved)):
                    changes.FEW_CHANGES = few
                    other.execute("INSERT INTO bench_parts VALUES (1)")  # caches emptied
                    r0, c0 = _os_reads(), time.process_time()
                    with store.snapshot() as (conn, watermark):
                        for frame in reader.frames(conn, watermark, epoch, horizon, token):
                            encode_frame(frame)
                    cpu[name].append(time.process_time() - c0)
                    reads[name].append(_os_reads() - r0)
        finally:
            changes.FEW_CHANGES = saved
            other.close()
            store.engine.dispose()
        out[str(n)] = {
            k: {**_ms(v), "os_reads": statistics.median(reads[k])} for k, v in cpu.items()
        }
        print(n, out[str(n)], f"load {os.getloadavg()[0]:.2f}", flush=True)
    return out


def delta_apply_parts(sizes: Sequence[int], rounds: int, workdir: Path) -> dict[str, Any]:
    """The client's apply of a 100-row delta chunk into a device holding the whole scope:
    index entries rewritten where an indexed value changed, against every row's."""
    from bench.env import TOKEN
    from bench.serverproc import ServerProcess
    from syncunit.client.store import LocalStore
    from syncunit.protocol import Chunk

    def plain(self: LocalStore, stream: Any, columns: Any, rows: Any) -> None:
        self.conn.executemany(self._upsert_sql(stream, columns), rows)

    split = LocalStore._write_rows
    out: dict[str, Any] = {}
    for n in sizes:
        db, _ = server_db_copy(n, workdir)
        device = workdir / f"device-{n}.sqlite"
        with ServerProcess(db) as server:
            scenarios.initial_sync(server, device, 2000)
            from syncunit.client import SyncClient

            with SyncClient(server.url, device, token=TOKEN) as client:
                client.sync("Login")  # the copy's checkpoint done, as before a delta
        store = LocalStore(device)
        catalog = store.catalog()
        assert catalog is not None
        info = next(s for s in catalog.streams if s.local_table == "LocalAppointment")
        names = [c.name for c in info.columns]
        cols = ", ".join(f'"{c}"' for c in names)
        keys = [r[0] for r in store.conn.execute('SELECT id FROM "LocalAppointment"')]
        cursor = store.cursors([info.name])[info.name]
        rng = random.Random(1)
        wal = Path(f"{device}-wal")
        took: dict[str, list[float]] = {"split": [], "plain": []}
        reads: dict[str, list[int]] = {"split": [], "plain": []}
        frames: dict[str, list[int]] = {"split": [], "plain": []}
        try:
            for i in range(rounds):
                for name in ("split", "plain") if i % 2 else ("plain", "split"):
                    picked = rng.sample(keys, 100)
                    marks = ",".join("?" * len(picked))
                    rows = [
                        list(r)
                        for r in store.conn.execute(
                            f'SELECT {cols} FROM "LocalAppointment" WHERE id IN ({marks})', picked
                        )
                    ]
                    for r in rows:  # as the bench's backoffice: notes and room
                        r[names.index("notes")] = f"changed {i} {name}"
                        r[names.index("room")] = f"R{rng.randint(1, 40)}"
                    store.conn.execute("PRAGMA cache_size=0")  # the rows' pages cold again
                    store.conn.execute("PRAGMA cache_size=-2000")
                    data = [list(c) for c in zip(*rows, strict=True)]
                    chunk = Chunk(info.name, names, data, [], cursor)
                    LocalStore._write_rows = split if name == "split" else plain  # type: ignore[method-assign]
                    w0 = wal.stat().st_size if wal.exists() else 0
                    r0, t0 = _os_reads(), time.perf_counter()
                    with store.bulk():
                        store.apply_chunk(info, chunk)
                    took[name].append(time.perf_counter() - t0)
                    reads[name].append(_os_reads() - r0)
                    frames[name].append(max(0, wal.stat().st_size - w0) // (4096 + 24))
        finally:
            LocalStore._write_rows = split  # type: ignore[method-assign]
            store.close()
        out[str(n)] = {
            k: {
                **_ms(v),
                "os_reads": statistics.median(reads[k]),
                "wal_frames": statistics.median(frames[k]),
            }
            for k, v in took.items()
        }
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


def first_cpu_parts(rows: int, rounds: int, workdir: Path) -> dict[str, Any]:
    """First syncs against the limit, with the CPU each side spent and the bound it sets."""
    from bench.clientproc import run_client
    from bench.serverproc import ServerProcess

    db, _ = server_db_copy(rows, workdir)
    limit = scenarios.limit_probe(db, workdir, 2000)
    device = workdir / "first-cpu.sqlite"
    runs: list[dict[str, float]] = []
    with ServerProcess(db) as server:
        for i in range(rounds + 1):
            bounds._fresh(device)
            cpu0 = server.cpu()
            out = run_client(server.url, device)
            server_cpu = server.cpu() - cpu0
            if i == 0:
                continue  # the server's first request warms its caches
            sync = out["result"]["seconds"]
            client_cpu, tail = out["sync_cpu_seconds"], out["index_build_s"]
            limit_s = limit()
            floor = tail + (client_cpu + server_cpu - tail) / 2
            run = {
                "sync_s": sync,
                "limit_s": limit_s,
                "ratio": limit_s / sync,
                "client_cpu_s": client_cpu,
                "server_cpu_s": server_cpu,
                "index_build_s": tail,
                "bound": limit_s / floor,
            }
            runs.append(run)
            print({k: round(v, 3) for k, v in run.items()}, flush=True)
    out_ = {
        k: {
            "min": round(min(r[k] for r in runs), 4),
            "median": round(statistics.median(r[k] for r in runs), 4),
            "max": round(max(r[k] for r in runs), 4),
        }
        for k in runs[0]
    }
    print(rows, out_, f"load {os.getloadavg()[0]:.2f}", flush=True)
    return out_


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=["delta", "delta-apply", "apply", "first-cpu"])
    p.add_argument("--sizes", default="10000,1000000", help="delta: server table sizes")
    p.add_argument(
        "--rows", type=int, default=100_000, help="apply, first-cpu: rows of the first copy"
    )
    p.add_argument("--rounds", type=int, default=40)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="syncunit-parts-") as tmp:
        sizes = [int(x) for x in args.sizes.replace(",", " ").split()]
        if args.part == "delta":
            delta_parts(sizes, args.rounds, Path(tmp))
        elif args.part == "delta-apply":
            delta_apply_parts(sizes, args.rounds, Path(tmp))
        elif args.part == "first-cpu":
            first_cpu_parts(args.rows, min(args.rounds, 12), Path(tmp))
        else:
            apply_parts(args.rows, min(args.rounds, 10), Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
