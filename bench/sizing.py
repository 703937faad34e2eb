"""How many nodes a million devices need: a day of sync load, sized from measured costs.

    python -m bench.sizing --measured bench/results/fleet-postgres.json
    python -m bench.sizing --server-ms 12 --database-ms 6 --devices 1000000

Per-sync CPU costs come from ``bench.fleet`` (server processes' and
PostgreSQL's CPU time divided by the syncs it ran), or from the command line.
The day is simulated hour by hour: each device syncs at its moments (a
morning login, periodic syncs while the app is open, a push per booking),
spread over a working-day curve, with a first copy for the share of devices
that are new or reset that day. For the peak hour it reports the CPU cores
needed for the sync servers and for the database, and the nodes at a target
utilization: Citus workers (tenant-sharded, so the load spreads over them by
tenant) and a coordinator.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

#: Share of a day's syncs in each hour (a working-day curve; sums to 1).
DAY_CURVE = [
    0.004, 0.003, 0.002, 0.002, 0.003, 0.008, 0.025, 0.06, 0.095, 0.1, 0.095, 0.085,
    0.07, 0.08, 0.085, 0.08, 0.07, 0.05, 0.03, 0.02, 0.012, 0.008, 0.006, 0.007,
]  # fmt: skip


def simulate(
    *,
    devices: int,
    syncs_per_day: float,
    pushes_per_day: float,
    first_copies_share: float,
    server_ms: float,
    database_ms: float,
    first_copy_factor: float,
    cores_per_node: int,
    utilization: float,
    coordinator_share: float,
) -> dict[str, float]:
    """The peak hour's load and the nodes it needs."""
    total = sum(DAY_CURVE)
    curve = [h / total for h in DAY_CURVE]
    daily_syncs = devices * (syncs_per_day + pushes_per_day)
    daily_firsts = devices * first_copies_share
    # CPU seconds per hour: ordinary syncs plus first copies (which cost more).
    per_hour_server = [
        h * (daily_syncs * server_ms + daily_firsts * server_ms * first_copy_factor) / 1000
        for h in curve
    ]
    per_hour_db = [
        h * (daily_syncs * database_ms + daily_firsts * database_ms * first_copy_factor) / 1000
        for h in curve
    ]
    peak = max(range(24), key=lambda i: per_hour_server[i] + per_hour_db[i])
    server_cores = per_hour_server[peak] / 3600 / utilization
    db_cores = per_hour_db[peak] / 3600 / utilization
    workers = max(1, math.ceil(db_cores * (1 - coordinator_share) / cores_per_node))
    return {
        "devices": devices,
        "syncs_per_day": daily_syncs + daily_firsts,
        "peak_hour": peak,
        "peak_syncs_per_s": curve[peak] * (daily_syncs + daily_firsts) / 3600,
        "server_cores": server_cores,
        "server_nodes": max(1, math.ceil(server_cores / cores_per_node)),
        "database_cores": db_cores,
        "citus_workers": workers,
        "citus_coordinators": max(1, math.ceil(db_cores * coordinator_share / cores_per_node)),
        "single_primary_enough": db_cores <= cores_per_node,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.sizing", description=__doc__.split("\n")[0])
    ap.add_argument("--measured", type=Path, help="a bench.fleet --json file")
    ap.add_argument("--server-ms", type=float, help="sync server CPU ms per sync")
    ap.add_argument("--database-ms", type=float, help="database CPU ms per sync")
    ap.add_argument("--devices", type=int, default=1_000_000)
    ap.add_argument("--syncs-per-day", type=float, default=24.0, help="pulls per device")
    ap.add_argument("--pushes-per-day", type=float, default=6.0, help="push syncs per device")
    ap.add_argument("--first-copies", type=float, default=0.02, help="share of devices a day")
    ap.add_argument("--first-copy-factor", type=float, default=20.0, help="cost vs. a delta")
    ap.add_argument("--cores-per-node", type=int, default=16)
    ap.add_argument("--utilization", type=float, default=0.6, help="target at the peak")
    ap.add_argument("--coordinator-share", type=float, default=0.15)
    args = ap.parse_args(argv)
    server_ms, database_ms = args.server_ms, args.database_ms
    if args.measured is not None:
        m = json.loads(args.measured.read_text())
        server_ms = server_ms or float(m["server_cpu_ms_per_sync"])
        database_ms = database_ms or float(m["database_cpu_ms_per_sync"])
    if server_ms is None or database_ms is None:
        ap.error("give --measured FILE (from bench.fleet --json) or --server-ms and --database-ms")
    out = simulate(
        devices=args.devices, syncs_per_day=args.syncs_per_day,
        pushes_per_day=args.pushes_per_day, first_copies_share=args.first_copies,
        server_ms=server_ms, database_ms=database_ms,
        first_copy_factor=args.first_copy_factor, cores_per_node=args.cores_per_node,
        utilization=args.utilization, coordinator_share=args.coordinator_share,
    )  # fmt: skip
    out = {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}
    print(json.dumps({"server_ms": server_ms, "database_ms": database_ms, **out}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
