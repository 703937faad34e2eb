"""The syncunit benchmark suite: ``python -m bench.run`` or ``syncunit bench``.

Scenarios on the hospital example, every row in the measured user's scope:
initial sync over real HTTP (server in its own process), the SQLite write
limit and each side alone, chunk-size tuning, deltas at growing table sizes,
the delete-all/create-all anti-pattern, a 10,000-mutation push, and Kinto 26
on PostgreSQL as the peer. Prints tables; ``--report`` writes JSON,
``--charts`` a PNG per scenario. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
for _p in (str(_ROOT / "examples"), str(_ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from rich.console import Console  # noqa: E402

from bench import charts, scenarios  # noqa: E402
from bench.datasets import server_db_copy  # noqa: E402
from bench.env import RESULTS, ROOT  # noqa: E402
from bench.pgbench import pg_ratios  # noqa: E402
from bench.report import print_report, ratios, targets  # noqa: E402
from bench.serverproc import ServerProcess  # noqa: E402


@dataclass
class Config:
    """What to run; ``full()`` and ``quick_preset()`` are the two presets."""

    quick: bool
    initial_sizes: list[int]
    delta_sizes: list[int]
    chunk_sizes: list[int]
    chunk_size: int | None  # forced: no sweep
    repeats: int  # initial syncs at the headline size
    sweep_repeats: int
    delta_runs: int
    changes: int
    push_mutations: int
    kinto: bool
    analyze: bool = False
    pouchdb: bool = True
    foreign: bool = True
    server_dbs: tuple[str, ...] = ("sqlite", "postgres")  # the server's database, each run
    #: Delta sizes on PostgreSQL (None: those up to the headline size; a 1M-row data set
    #: takes minutes to generate there).
    pg_delta_sizes: list[int] | None = None

    @property
    def headline_size(self) -> int:
        return self.initial_sizes[0]

    @classmethod
    def full(cls) -> Config:
        return cls(
            quick=False,
            initial_sizes=[100_000, 1_000_000],
            delta_sizes=[10_000, 100_000, 1_000_000],
            chunk_sizes=[500, 1000, 2000, 5000, 10_000, 20_000],
            chunk_size=None,
            repeats=3,
            sweep_repeats=2,
            delta_runs=7,
            changes=100,
            push_mutations=10_000,
            kinto=True,
        )

    @classmethod
    def quick_preset(cls) -> Config:
        return cls(
            quick=True,
            initial_sizes=[5_000, 20_000],
            delta_sizes=[2_000, 5_000, 20_000],
            chunk_sizes=[500, 1000, 2000, 5000],
            chunk_size=None,
            repeats=1,
            sweep_repeats=1,
            delta_runs=3,
            changes=100,
            push_mutations=2_000,
            kinto=True,
        )


def _ints(text: str) -> list[int]:
    return [int(x.replace("_", "")) for x in text.replace(",", " ").split()]


def _backends(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = set(names) - {"sqlite", "postgres"}
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown server database {', '.join(sorted(unknown)) or text!r}:"
            " give sqlite, postgres or sqlite,postgres"
        )
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="syncunit bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small sizes, well under a minute")
    p.add_argument("--report", type=Path, help="write the JSON report here")
    p.add_argument("--charts", type=Path, default=RESULTS, help="PNG directory (%(default)s)")
    p.add_argument("--no-charts", action="store_true")
    p.add_argument("--sizes", type=_ints, help="initial sync sizes; the first is the headline")
    p.add_argument("--delta-sizes", type=_ints, help="server table sizes for the delta")
    p.add_argument("--chunk-sizes", type=_ints, help="chunk sizes to sweep")
    p.add_argument("--chunk-size", type=int, help="use this chunk size, skip the sweep")
    p.add_argument("--no-kinto", action="store_true", help="skip the Kinto peer")
    p.add_argument("--no-pouchdb", action="store_true", help="skip the PouchDB peer")
    p.add_argument(
        "--no-foreign", action="store_true", help="skip the 100-hospital scope-churn figure"
    )
    p.add_argument(
        "--server-db",
        type=_backends,
        metavar="DBS",
        help="server databases to run the scenarios on: sqlite, postgres or"
        " sqlite,postgres (default); the PostgreSQL rows use a throwaway cluster",
    )
    p.add_argument(
        "--pg-delta-sizes",
        type=_ints,
        help="server table sizes for the delta on PostgreSQL (default: up to the headline size)",
    )
    p.add_argument(
        "--analyze",
        action="store_true",
        help="what-if: give the server databases SQLite planner statistics (ANALYZE)",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="SECONDS",
        help="wait up to this long for other processes to leave the CPUs idle",
    )
    p.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one)")
    return p.parse_args(argv)


def config_from(args: argparse.Namespace) -> Config:
    cfg = Config.quick_preset() if args.quick else Config.full()
    if args.sizes:
        cfg.initial_sizes = args.sizes
    if args.delta_sizes:
        cfg.delta_sizes = args.delta_sizes
    if args.chunk_sizes:
        cfg.chunk_sizes = args.chunk_sizes
    if args.chunk_size:
        cfg.chunk_size = args.chunk_size
    cfg.kinto = cfg.kinto and not args.no_kinto
    cfg.pouchdb = cfg.pouchdb and not args.no_pouchdb
    cfg.foreign = cfg.foreign and not args.no_foreign
    cfg.analyze = args.analyze
    if args.server_db:
        cfg.server_dbs = args.server_db
    if args.pg_delta_sizes:
        cfg.pg_delta_sizes = args.pg_delta_sizes
    return cfg


def busy_cpus(seconds: float = 1.0) -> float | None:
    """How many CPUs were busy (any process) over ``seconds``: other load skews timings."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    cpus = os.cpu_count() or 1
    return round(cpus * (1 - (idle1 - idle0) / max(1, total1 - total0)), 2)


def _cpu_ticks() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its
    waited-for children) so far: their difference is what other processes used."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    busy = (sum(fields) - fields[3] - fields[4]) / ticks
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system


def environment() -> dict[str, Any]:
    def git(*a: str) -> str:
        try:
            return subprocess.run(
                ["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    return {
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--", "src", "examples")),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "busy_cpus_before": busy_cpus(),
        "loadavg_before": os.getloadavg()[0],
    }


def run(cfg: Config, workdir: Path, console: Console) -> dict[str, Any]:
    """Every scenario, in an order that reuses each server and synced device."""

    def log(msg: str) -> None:
        console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {msg}")

    started = time.perf_counter()
    head = cfg.headline_size
    env = environment()
    ticks0 = _cpu_ticks()
    if (env["busy_cpus_before"] or 0) > 0.3:
        log(f"[yellow]other processes keep {env['busy_cpus_before']} CPUs busy: timings suffer[/]")
    report: dict[str, Any] = {
        "environment": env,
        "config": {**asdict(cfg), "headline_size": head},
        "datasets": {},
        "server_peak_rss_mb": {},
        "initial": {},
        "limits": {},
        "chunk_sweep": None,
        "delta": {},
        "anti_pattern": None,
        "push": None,
        "kinto": None,
        "pouchdb": None,
        "scope_churn": None,
        "bootstrap": {},
        "timings": {},
    }
    chunk = cfg.chunk_size
    report["config"]["chunk_size_source"] = "forced" if chunk else "sweep"
    sizes = sorted(set(cfg.initial_sizes) | set(cfg.delta_sizes) | {head})
    records: list[dict[str, Any]] = []
    order = [head, *(s for s in sizes if s != head)] if "sqlite" in cfg.server_dbs else []
    for n in order:
        t_size = time.perf_counter()
        db, built = server_db_copy(n, workdir, analyze=cfg.analyze)
        report["datasets"][str(n)] = {"generated_s": None if built is None else round(built, 1)}
        if built is not None:
            log(f"generated the {n:,}-appointment server database in {built:.1f}s (now cached)")
        device = workdir / f"device-{n}.sqlite"
        with ServerProcess(db) as server:
            log(f"server with {n:,} appointments on {server.url}")
            if n == head and chunk is None:
                sweep = scenarios.chunk_sweep(
                    server, workdir, cfg.chunk_sizes, cfg.sweep_repeats, log
                )
                report["chunk_sweep"] = sweep
                chunk = sweep["best_chunk_size"]
                log(f"  fastest chunk size: {chunk}")
            if n in cfg.initial_sizes:
                repeats = cfg.repeats if n == head else 1
                # At the headline size, the limit right after each sync: the machine's
                # speed drifts over minutes by more than the margin to the target.
                limit = scenarios.limit_probe(db, workdir, chunk or 2000) if n == head else None
                report["initial"][str(n)] = scenarios.initial_runs(
                    server, workdir, n, chunk, repeats, log, limit
                )
            else:
                scenarios.initial_sync(server, device, chunk)
            if n in cfg.delta_sizes or n == head:
                d = scenarios.delta_runs(server, db, device, cfg.changes, cfg.delta_runs, chunk)
                report["delta"][str(n)] = d
                log(f"  delta of {cfg.changes} at {n:,}: {d['ms']} ms, {d['bytes']:,} bytes")
            if n == head:
                ap = scenarios.delete_all_create_all(server, device, chunk)
                delta = report["delta"][str(n)]
                ap.update(
                    {
                        "delta_changes": delta["changes"],
                        "delta_seconds": delta["seconds"],
                        "delta_bytes": delta["bytes"],
                        "time_saved_s": round(ap["seconds"] - delta["seconds"], 4),
                        "bytes_saved": ap["bytes"] - delta["bytes"],
                    }
                )
                report["anti_pattern"] = ap
                log(f"  delete-all/create-all: {ap['seconds']:.2f}s, {ap['bytes']:,} bytes")
                report["push"] = scenarios.push_runs(
                    server, device, cfg.push_mutations, cfg.repeats
                )
                log(
                    f"  push: {report['push'].get('mutations_per_s')} mutations/s (median of"
                    f" {report['push'].get('runs_mutations_per_s')}) "
                    f"{report['push'].get('note', '')}"
                )
            report["server_peak_rss_mb"][str(n)] = server.peak_rss_mb()
        if n == max(cfg.initial_sizes):
            # The same first sync, answered with a prebuilt snapshot file and a delta.
            with ServerProcess(db, snapshots=workdir / "snapshots") as snap_server:
                runs = [
                    scenarios.initial_sync(snap_server, device, chunk)
                    for _ in range(2 if cfg.quick else 3)
                ]
            best = min(runs, key=lambda r: r["seconds"])
            report["bootstrap"] = {str(n): {**best, "runs_seconds": [r["seconds"] for r in runs]}}
            log(
                f"  snapshot bootstrap {n:,}: {best['seconds']:.2f}s,"
                f" {best['rows_per_s']:,.0f} rows/s"
            )
        if n in cfg.initial_sizes:
            db, _ = server_db_copy(
                n, workdir, analyze=cfg.analyze
            )  # pristine: the deltas and the push changed it
            lim, recs = scenarios.limits(db, workdir, chunk or 2000)
            report["limits"][str(n)] = lim
            log(
                f"  limit {lim['sqlite_insert']['rows_per_s']:,.0f} rows/s; server alone "
                f"{lim['server_encode']['rows_per_s']:,.0f}; client alone "
                f"{lim['client_apply']['rows_per_s']:,.0f}"
            )
            if n == head:
                records = recs
        for path in workdir.glob(f"*-{n}.sqlite*"):
            path.unlink()
        report["timings"][str(n)] = round(time.perf_counter() - t_size, 1)
    if "sqlite" in cfg.server_dbs and len(set(cfg.delta_sizes)) >= 2:
        t0 = time.perf_counter()
        report["delta_pairs"] = _delta_pairs(cfg, workdir, chunk, log)
        report["timings"]["delta_pairs"] = round(time.perf_counter() - t0, 1)
    if "postgres" in cfg.server_dbs:
        t0 = time.perf_counter()
        from bench.pgbench import run_postgres

        report["postgres"] = run_postgres(
            workdir=workdir,
            headline=head,
            initial_sizes=[n for n in cfg.initial_sizes if n <= head],
            delta_sizes=cfg.pg_delta_sizes or [n for n in cfg.delta_sizes if n <= head],
            chunk_size=chunk,
            repeats=cfg.repeats,
            delta_runs=cfg.delta_runs,
            changes=cfg.changes,
            push_mutations=cfg.push_mutations,
            log=log,
            scope_churn=(
                None
                if not cfg.foreign
                else {"appointments": 20_000, "doctors": 200, "foreign": 5_000, "runs": 5}
                if cfg.quick
                else {"appointments": 100_000, "doctors": 1_000, "foreign": 50_000, "runs": 15}
            ),
        )
        report["timings"]["postgres"] = round(time.perf_counter() - t0, 1)
    else:
        report["postgres"] = {"available": False, "reason": "skipped (--server-db sqlite)"}
    if cfg.kinto and records:
        log(f"Kinto peer with {len(records):,} records")
        t0 = time.perf_counter()
        report["kinto"] = scenarios.kinto(records, workdir, cfg.quick, log)
        report["timings"]["kinto"] = round(time.perf_counter() - t0, 1)
    else:
        report["kinto"] = {
            "available": False,
            "reason": "skipped (--no-kinto, or no SQLite rows to load)",
        }
    if cfg.foreign and "sqlite" in cfg.server_dbs:
        log("100 hospitals: one hospital's delta, quiet and after foreign writes")
        t0 = time.perf_counter()
        try:
            from bench.foreign import run_foreign

            small = cfg.quick
            report["scope_churn"] = run_foreign(
                appointments=20_000 if small else 100_000,
                doctors=200 if small else 1_000,
                foreign=5_000 if small else 50_000,
                runs=5 if small else 15,
                workdir=workdir,
            )
        except Exception as exc:  # a figure of its own: never fail the bench for it
            log(f"  scope churn could not run: {exc}")
            report["scope_churn"] = {"error": f"{type(exc).__name__}: {exc}"}
        report["timings"]["scope_churn"] = round(time.perf_counter() - t0, 1)
    if cfg.pouchdb and records:
        log(f"PouchDB peer with {len(records):,} records")
        t0 = time.perf_counter()
        report["pouchdb"] = scenarios.pouchdb(records, workdir, log)
        report["timings"]["pouchdb"] = round(time.perf_counter() - t0, 1)
    else:
        report["pouchdb"] = {
            "available": False,
            "reason": "skipped (--no-pouchdb, or no SQLite rows to load)",
        }
    env["loadavg_after"] = os.getloadavg()[0]
    ticks1 = _cpu_ticks()
    if ticks0 is not None and ticks1 is not None:
        # Other processes' CPUs during the run (the servers and clients are ours).
        wall = time.perf_counter() - started
        others = max(0.0, (ticks1[0] - ticks0[0]) - (ticks1[1] - ticks0[1]))
        env["other_busy_cpus_during"] = round(others / max(wall, 1e-9), 2)
        if env["other_busy_cpus_during"] > 0.3:
            log(
                f"[yellow]other processes kept {env['other_busy_cpus_during']} CPUs busy"
                " during the run: timings suffer; repeat on a quiet machine[/]"
            )
    report["ratios"] = {**ratios(report), **pg_ratios(report)}
    report["targets"] = targets(report["ratios"])
    report["timings"]["total"] = round(time.perf_counter() - started, 1)
    return report


def _delta_pairs(
    cfg: Config, workdir: Path, chunk: int | None, log: scenarios.Log
) -> dict[str, Any]:
    """The delta at the smallest and at the largest table, alternated round by round.

    The per-size deltas above run minutes apart, and this machine's speed drifts
    over minutes by more than the difference measured: here each round takes
    both, back to back, and ``delta_1m_vs_10k`` is the median of the rounds' ratios.
    """
    small, large = min(cfg.delta_sizes), max(cfg.delta_sizes)
    with contextlib.ExitStack() as stack:
        targets = []
        for n in (small, large):
            db, _ = server_db_copy(n, workdir, analyze=cfg.analyze)
            device = workdir / f"pair-device-{n}.sqlite"
            server = stack.enter_context(ServerProcess(db))
            scenarios.initial_sync(server, device, chunk)
            targets.append((server, db, device))
        lo, hi = scenarios.delta_rounds(targets, cfg.changes, cfg.delta_runs, chunk)
    for n in (small, large):
        for path in workdir.glob(f"*-{n}.sqlite*"):
            path.unlink()
    log(
        f"  deltas alternated, {small:,} / {large:,}: {lo['ms']} / {hi['ms']} ms,"
        f" median ratio {hi['pair_ratio_median']}"
    )
    return {"sizes": [small, large], str(small): lo, str(large): hi}


def main(argv: list[str] | None = None) -> int:
    """Run the bench; 0 when it ran (targets are reported, not enforced)."""
    if argv and argv[0] == "--":  # ``syncunit bench -- --quick`` passes the separator on
        argv = argv[1:]
    args = parse_args(argv)
    cfg = config_from(args)
    console = Console()
    if args.wait_idle:
        deadline = time.monotonic() + args.wait_idle
        while (busy := busy_cpus(2.0)) is not None and busy > 0.3 and time.monotonic() < deadline:
            console.print(f"[dim]waiting for idle CPUs ({busy} busy)[/]")
    scratch = args.workdir or Path(tempfile.mkdtemp(prefix="syncunit-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        report = run(cfg, scratch, console)
    finally:
        if args.workdir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    if not args.no_charts:
        files, note = charts.draw(report, args.charts)
        report["charts"] = [str(f) for f in files] if files else note
    print_report(report, console)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"report: {args.report}")
    if not args.no_charts:
        console.print(f"charts: {report['charts']}")
    console.print(f"total {report['timings']['total']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
