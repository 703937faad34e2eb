"""Snapshot first sync against row by row, with the device side broken down.

``python -m bench.bootstrap --sizes 100000 1000000`` serves the cached hospital
database of each size twice: once plainly (the device copies row by row) and
once with snapshot files built before serving. Each first sync runs in a fresh
client process; the snapshot runs time each step on the device:

* ``first_request``: the sync request that answers with the offer (and the catalog);
* ``fetch``: download, SHA-256 and decompression (one pass over the bytes);
* ``pages``: the file made the device's database (what the device held copied into
  it, then its pages over the database's, with the cursor), when the device takes it;
* ``install``: otherwise, the rows, local indexes, outbox triggers and cursor in one
  transaction;
* ``delta``: the request that continues from the file's cursor;
* ``ready``: ``client.sync()`` from call to return; the device then holds every
  row, its indexes and its cursor, committed, and works offline;
* after ``ready``, apart: an indexed query (its plan must use the local index)
  and the WAL checkpoint that the device's next write transaction would pay.

Prints a table and, with ``--report``, writes JSON; the load average is
recorded beside every figure. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.clientproc import run_json
from bench.datasets import server_db_copy
from bench.env import STREAM_TABLE, TOKEN, UNIT
from bench.serverproc import ServerProcess

#: Device-side steps timed inside the client process: (module attribute, name).
STEPS = [("offers", "apply_offers"), ("fetch", "fetch"), ("install", "copy_rows")]


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _timed(owner: Any, attr: str, into: dict[str, float], name: str) -> None:
    """Wrap ``owner.attr`` so each call adds its wall time to ``into[name]``."""
    inner: Callable[..., Any] | None = getattr(owner, attr, None)
    if inner is None:
        return

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            into[name] = into.get(name, 0.0) + time.perf_counter() - t0

    setattr(owner, attr, wrapper)


def client_main(url: str, db: Path) -> dict[str, Any]:
    """One first sync in this process; the step times, then the checks after it."""
    from syncunit.client import SyncClient, adopt, bootstrap
    from syncunit.client.run import UnitRun

    steps: dict[str, float] = {}
    for name, attr in STEPS:
        _timed(bootstrap, attr, steps, name)
    _timed(adopt, "adopt", steps, "pages")
    _timed(adopt, "_ready", steps, "pages_ready")  # the device's tables into the file
    _timed(adopt, "_install", steps, "pages_backup")  # the file's pages over the database
    requests: list[float] = []
    inner = UnitRun._request

    def request(self: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return inner(self, *args, **kwargs)
        finally:
            requests.append(time.perf_counter() - t0)

    UnitRun._request = request  # type: ignore[method-assign]
    t0 = time.perf_counter()
    with SyncClient(url, db, token=TOKEN, timeout=600) as client:
        result = client.sync(UNIT)
        ready = time.perf_counter() - t0
        conn = client.store.conn
        q = f'SELECT count(*) FROM "{STREAM_TABLE}" WHERE doctor_id = 7 AND starts_at >= ?'
        plan = " ".join(str(r[-1]) for r in conn.execute("EXPLAIN QUERY PLAN " + q, ("2030",)))
        t1 = time.perf_counter()
        conn.execute(q, ("2030",)).fetchone()
        query_s = time.perf_counter() - t1
        wal = Path(f"{db}-wal")
        wal_mb = wal.stat().st_size / 2**20 if wal.exists() else 0.0
        t1 = time.perf_counter()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        checkpoint_s = time.perf_counter() - t1
    return {
        "ready_s": round(ready, 4),
        "result_seconds": result.seconds,
        "snapshots": result.snapshots,
        "rows": sum(result.rows_in.values()),
        "bytes_in": result.bytes_in,
        "first_request_s": round(requests[0], 4) if requests else None,
        "delta_s": round(sum(requests[1:]), 4) if len(requests) > 1 else None,
        **{f"{k}_s": round(v, 4) for k, v in steps.items()},
        "indexed_query_s": round(query_s, 5),
        "indexed_query_plan": plan,
        "wal_mb_after": round(wal_mb, 1),
        "checkpoint_after_s": round(checkpoint_s, 3),
    }


def _client(url: str, db: Path, *, timeout: float = 600) -> dict[str, Any]:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.bootstrap", "--client", url, "--db", str(db)]
    return run_json(cmd, timeout=timeout)


def measure(n: int, workdir: Path, runs: int) -> dict[str, Any]:
    """Row by row once, then ``runs`` snapshot first syncs, of ``n`` rows."""
    db, _ = server_db_copy(n, workdir)
    device = workdir / f"device-{n}.sqlite"
    out: dict[str, Any] = {"rows": n}
    with ServerProcess(db) as server:
        load = _load()
        plain = _client(server.url, device)
        out["row_by_row"] = {**plain, "load": load}
        print(f"  {n:,} row by row: {plain['ready_s']:.2f}s (load {load})", flush=True)
    snaps = workdir / f"snapshots-{n}"
    t0 = time.perf_counter()
    with ServerProcess(db, snapshots=snaps) as server:
        out["server_build_and_start_s"] = round(time.perf_counter() - t0, 2)
        files = sorted(snaps.glob("*.zst"))
        out["snapshot_files_mb"] = {f.name: round(f.stat().st_size / 2**20, 2) for f in files}
        out["snapshot"] = []
        for _ in range(runs):
            load = _load()
            r = _client(server.url, device)
            out["snapshot"].append({**r, "load": load})
            print(
                f"  {n:,} snapshot: ready {r['ready_s']:.2f}s (fetch {r.get('fetch_s')},"
                f" pages {r.get('pages_s')}, install {r.get('install_s')},"
                f" delta {r['delta_s']}; load {load})",
                flush=True,
            )
    best = min(out["snapshot"], key=lambda r: r["ready_s"])
    out["ratio_rows_vs_snapshot"] = round(out["row_by_row"]["ready_s"] / best["ready_s"], 2)
    for path in workdir.glob(f"*-{n}.sqlite*"):
        path.unlink()
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--runs", type=int, default=2, help="snapshot first syncs per size")
    p.add_argument("--report", type=Path)
    p.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    p.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client:
        print(json.dumps(client_main(args.client, args.db)))
        return
    report: dict[str, Any] = {"load_before": _load(), "cpus": os.cpu_count(), "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="syncunit-bootstrap-") as tmp:
        for n in args.sizes:
            report["sizes"][str(n)] = measure(n, Path(tmp), args.runs)
    report["load_after"] = _load()
    for n, r in report["sizes"].items():
        print(
            f"{int(n):>9,} rows: row by row {r['row_by_row']['ready_s']:.2f}s,"
            f" snapshot best {min(s['ready_s'] for s in r['snapshot']):.2f}s,"
            f" ratio {r['ratio_rows_vs_snapshot']}x"
        )
    if args.report:
        args.report.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
