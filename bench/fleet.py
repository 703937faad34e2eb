"""Many devices at once: a fleet syncing and pushing against several server processes.

    python -m bench.fleet --backend postgres --devices 200 --workers 2
    python -m bench.fleet --backend sqlite   --devices 200 --workers 2

Starts ``syncunit serve --workers N`` on a fresh database (PostgreSQL: a
throwaway cluster of its own; SQLite: a file), then client processes, each
running its share of the devices as threads. Every device downloads its
hospital (``Login``), then books ``--rounds`` slots of its own, each followed by
a sync of ``Online`` (push and pull). Reports syncs per second and latency
percentiles, then verifies that every device equals the server for its scope
and that every booking was applied exactly once (no push lost or doubled).
Not run in CI: it is a measurement.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.env import EXAMPLES, ROOT, ensure_paths, subprocess_env

HOSPITALS = 8


def _device_run(args: tuple[str, str, int, int, int, int]) -> list[dict[str, Any]]:
    """One client process: ``count`` devices as threads; their timings and keys."""
    url, workdir, first, count, rounds, hospitals = args
    from syncunit.client import SyncClient

    out: list[dict[str, Any]] = [{} for _ in range(count)]

    def device(i: int) -> None:
        n = first + i
        h = 1 + n % hospitals
        token = f"token-h{h}"
        rec: dict[str, Any] = {"n": n, "hospital": h, "keys": [], "latency": [], "errors": []}
        out[i] = rec
        try:
            with SyncClient(url, Path(workdir) / f"dev{n}.sqlite", token=token) as c:
                t = time.perf_counter()
                c.sync("Login")
                rec["first"] = time.perf_counter() - t
                doctors = [  # the doctors of its hospital
                    r[0]
                    for r in c.store.query(
                        'SELECT DISTINCT doctor_id FROM "LocalAppointment" ORDER BY 1'
                    )
                ]
                for r in range(rounds):
                    start = dt.datetime(2040, 1, 1) + dt.timedelta(hours=n * rounds + r)
                    key = c.insert(
                        "LocalAppointment",
                        {"doctor_id": doctors[(n + r) % len(doctors)], "patient_id": 1 + n % 50,
                         "starts_at": start.isoformat(),
                         "ends_at": (start + dt.timedelta(minutes=30)).isoformat(),
                         "status": "booked", "room": f"F{n}", "notes": ""},
                    )  # fmt: skip
                    rec["keys"].append(key)
                    t = time.perf_counter()
                    result = c.sync("Online")
                    rec["latency"].append(time.perf_counter() - t)
                    if result.applied != 1:
                        rec["errors"].append(f"round {r}: {result.to_dict()}")
                t = time.perf_counter()
                c.sync("Login")
                rec["latency"].append(time.perf_counter() - t)
                rec["client_id"] = c.client_id
        except Exception as exc:  # reported, never dropped
            rec["errors"].append(repr(exc))

    threads = [threading.Thread(target=device, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _final_sync(args: tuple[str, str, list[tuple[int, int]]]) -> dict[int, list[str]]:
    """Once every device has finished: each syncs again and reports what it holds."""
    url, workdir, devices = args
    from syncunit.client import SyncClient

    held: dict[int, list[str]] = {}
    for n, h in devices:
        with SyncClient(url, Path(workdir) / f"dev{n}.sqlite", token=f"token-h{h}") as c:
            c.sync("Login")
            held[n] = sorted(r[0] for r in c.store.query('SELECT id FROM "LocalAppointment"'))
    return held


def _tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and every process below it (Linux /proc)."""
    from bench.serverproc import cpu_seconds

    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        try:
            total += cpu_seconds(pid)
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        todo += [int(c) for c in children]
    return total


def _percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))] if values else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.fleet", description=__doc__.split("\n")[0])
    ap.add_argument("--backend", choices=["postgres", "sqlite"], default="postgres")
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2, help="server processes")
    ap.add_argument("--clients", type=int, default=4, help="client processes")
    ap.add_argument("--rounds", type=int, default=5, help="bookings (push syncs) per device")
    ap.add_argument("--appointments", type=int, default=8000, help="rows in the server")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    ensure_paths()
    import sqlalchemy as sa
    from hospital.generate import generate
    from hospital.models import metadata

    from syncunit.server import open_store

    work = Path(tempfile.mkdtemp(prefix="syncunit-fleet-"))
    pg = None
    if args.backend == "postgres":
        from tests.pgserver import PostgresServer

        pg = PostgresServer(settings={"fsync": "on", "synchronous_commit": "on"}).start()
        url = pg.url(pg.create_database("fleet"))
    else:
        url = f"sqlite:///{work / 'server.sqlite'}"
    store = open_store(url)
    metadata.create_all(store.engine)
    generate(store.engine, appointments=args.appointments, hospitals=HOSPITALS, doctors=80)
    from tests.pgserver import free_port

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "syncunit", "serve", "hospital.server:build", "--database", url,
         "--app-dir", str(EXAMPLES), "--port", str(port), "--workers", str(args.workers),
         "--log-level", "warning"],
        env=subprocess_env(), cwd=ROOT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        import httpx

        for _ in range(600):
            try:
                if httpx.get(f"{base}/v1/catalog", timeout=2).status_code == 401:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        db_root = (
            int((pg.datadir / "postmaster.pid").read_text().split()[0]) if pg is not None else None
        )
        cpu0 = (_tree_cpu(server.pid), _tree_cpu(db_root) if db_root else 0.0)
        per = -(-args.devices // args.clients)
        jobs = [
            (base, str(work), k * per, min(per, args.devices - k * per), args.rounds, HOSPITALS)
            for k in range(args.clients)
            if args.devices - k * per > 0
        ]
        t0 = time.perf_counter()
        with mp.get_context("spawn").Pool(len(jobs)) as pool:
            devices = [d for part in pool.map(_device_run, jobs) for d in part]
        wall = time.perf_counter() - t0
        server_cpu = _tree_cpu(server.pid) - cpu0[0]
        db_cpu = (_tree_cpu(db_root) - cpu0[1]) if db_root else 0.0
        # The load is over: every device syncs once more, then must equal the server.
        parts = [
            [(d["n"], d["hospital"]) for d in devices[k :: len(jobs)]] for k in range(len(jobs))
        ]
        with mp.get_context("spawn").Pool(len(jobs)) as pool:
            for held in pool.map(_final_sync, [(base, str(work), p) for p in parts]):
                for d in devices:
                    if d["n"] in held:
                        d["local"] = held[d["n"]]
    finally:
        server.terminate()
        server.wait(30)

    # -- verify ----------------------------------------------------------------------
    problems: list[str] = []
    with store.engine.connect() as conn:
        for d in devices:
            problems += [f"device {d['n']}: {e}" for e in d["errors"]]
            if "local" not in d:
                continue
            scope = sorted(
                r[0] for r in conn.execute(
                    sa.text("SELECT a.id FROM appointment a JOIN doctor o ON o.id = a.doctor_id"
                            " WHERE o.hospital_id = :h"), {"h": d["hospital"]})
            )  # fmt: skip
            if scope != d["local"]:
                problems.append(f"device {d['n']}: differs from the server for its hospital")
            count = conn.execute(
                sa.text("SELECT count(*) FROM appointment WHERE id = ANY(:k)")
                if args.backend == "postgres"
                else sa.text("SELECT count(*) FROM appointment WHERE id IN :k").bindparams(
                    sa.bindparam("k", expanding=True)
                ),
                {"k": list(d["keys"])},
            ).scalar_one()
            seq = conn.execute(
                sa.text("SELECT last_seq FROM syncunit_clients WHERE client_id = :c"),
                {"c": d["client_id"]},
            ).scalar()
            if count != args.rounds or seq != args.rounds:
                problems.append(f"device {d['n']}: {count} bookings on the server, last_seq {seq}")
    store.engine.dispose()
    if pg is not None:
        pg.stop()

    latencies = [x for d in devices for x in d["latency"]]
    firsts = [d["first"] for d in devices if "first" in d]
    n_syncs = max(1, len(latencies) + len(firsts))
    figures = {
        "backend": args.backend, "devices": args.devices, "server_processes": args.workers,
        "rounds": args.rounds, "server_rows": args.appointments, "wall_s": round(wall, 2),
        "syncs": len(latencies) + len(firsts),
        "syncs_per_s": round((len(latencies) + len(firsts)) / wall, 1),
        "push_sync_p50_ms": round(_percentile(latencies, 0.5) * 1000, 1),
        "push_sync_p99_ms": round(_percentile(latencies, 0.99) * 1000, 1),
        "first_sync_p50_ms": round(statistics.median(firsts) * 1000, 1) if firsts else None,
        "first_sync_p99_ms": round(_percentile(firsts, 0.99) * 1000, 1),
        "bookings": sum(len(d["keys"]) for d in devices),
        "server_cpu_s": round(server_cpu, 2), "database_cpu_s": round(db_cpu, 2),
        "server_cpu_ms_per_sync": round(1000 * server_cpu / n_syncs, 2),
        "database_cpu_ms_per_sync": round(1000 * db_cpu / n_syncs, 2),
        "problems": len(problems),
    }  # fmt: skip
    print(json.dumps(figures, indent=2))
    for p in problems[:20]:
        print("PROBLEM", p)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
