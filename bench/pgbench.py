"""The bench's scenarios with the server on PostgreSQL (``--server-db postgres``).

The same hospital data sets, client and scenarios as the SQLite rows
(``bench.scenarios``); only the server's database changes: a throwaway
PostgreSQL cluster (``bench.pgserver``), one fresh copy of the data set per
size, and the 100-hospital scope churn (``bench.foreign.run_foreign_pg``:
quiet rounds, then the foreign writes, then busy rounds, in one database,
since a copy would have its own epoch and reset the device). Returns
``{"available": False, "reason": ...}`` when PostgreSQL cannot run here, as
the peers do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import scenarios
from bench.pgserver import PG_BIN, PostgresDatasets, unavailable_reason
from bench.serverproc import ServerProcess

Log = Callable[[str], None]


def run_postgres(
    *,
    workdir: Path,
    headline: int,
    initial_sizes: Sequence[int],
    delta_sizes: Sequence[int],
    chunk_size: int | None,
    repeats: int,
    delta_runs: int,
    changes: int,
    push_mutations: int,
    log: Log,
    scope_churn: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Initial syncs, deltas and the push with the server on PostgreSQL."""
    reason = unavailable_reason()
    if reason is not None:
        log(f"  PostgreSQL rows skipped: {reason}")
        return {"available": False, "reason": reason}
    out: dict[str, Any] = {
        "available": True,
        "bin": str(PG_BIN),
        "initial": {},
        "delta": {},
        "push": None,
        "datasets": {},
        "server_peak_rss_mb": {},
        "scope_churn": None,
    }
    sizes = sorted(set(initial_sizes) | set(delta_sizes) | {headline})
    try:
        with PostgresDatasets(workdir) as pg:
            out["version"] = _server_version(pg)
            for n in [headline, *(s for s in sizes if s != headline)]:
                url = pg.database(n)
                out["datasets"][str(n)] = {"generated_s": round(pg.generated_seconds(n) or 0, 1)}
                log(f"PostgreSQL server with {n:,} appointments (generated in "
                    f"{out['datasets'][str(n)]['generated_s']}s)")  # fmt: skip
                device = workdir / f"device-{n}.sqlite"  # where initial_runs leaves it
                with ServerProcess(url, log=workdir / f"pg-server-{n}.log") as server:
                    if n in initial_sizes:
                        out["initial"][str(n)] = scenarios.initial_runs(
                            server, workdir, n, chunk_size, repeats if n == headline else 1, log
                        )
                    else:
                        scenarios.initial_sync(server, device, chunk_size)
                    if n in delta_sizes or n == headline:
                        d = scenarios.delta_runs(
                            server, url, device, changes, delta_runs, chunk_size
                        )
                        out["delta"][str(n)] = d
                        log(f"  PostgreSQL delta of {changes} at {n:,}: {d['ms']} ms")
                    if n == headline:
                        out["push"] = scenarios.push_runs(server, device, push_mutations, repeats)
                        log(f"  PostgreSQL push: {out['push'].get('mutations_per_s')} mutations/s")
                    out["server_peak_rss_mb"][str(n)] = server.peak_rss_mb()
                pg.drop(url)
                for path in workdir.glob(f"*-{n}.sqlite*"):
                    path.unlink()
            if scope_churn is not None:
                log("PostgreSQL: one hospital's 10-row delta, quiet and after foreign writes")
                from bench.foreign import run_foreign_pg

                out["scope_churn"] = run_foreign_pg(pg, workdir=workdir, **scope_churn)
                log(f"  PostgreSQL scope churn: {out['scope_churn'].get('ratio')}")
    except Exception as exc:  # figures of their own: never fail the bench for them
        log(f"  PostgreSQL rows could not run: {exc}")
        out["error"] = f"{type(exc).__name__}: {str(exc)[-1500:]}"
    return out


def _server_version(pg: PostgresDatasets) -> str:
    import psycopg

    with psycopg.connect(pg.dsn("postgres")) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


def pg_ratios(r: dict[str, Any]) -> dict[str, Any]:
    """The PostgreSQL rows against the SQLite rows of the same run (None where missing)."""
    pg = r.get("postgres") or {}
    if not pg.get("available"):
        return {}
    head = str(r["config"]["headline_size"])

    def get(d: Any, *keys: str) -> Any:
        for k in keys:
            d = d.get(k) if isinstance(d, dict) else None
        return d

    def div(a: Any, b: Any, nd: int = 3) -> float | None:
        return round(a / b, nd) if a is not None and b else None

    deltas = sorted(pg.get("delta", {}), key=int)
    lim = get(r, "limits", head, "sqlite_insert", "rows_per_s")
    return {
        "pg_initial_rows_per_s": get(pg, "initial", head, "rows_per_s"),
        "pg_initial_vs_limit": div(get(pg, "initial", head, "rows_per_s"), lim),
        "pg_initial_vs_sqlite": div(
            get(pg, "initial", head, "rows_per_s"), get(r, "initial", head, "rows_per_s")
        ),
        "pg_delta_vs_sqlite": div(
            get(pg, "delta", head, "seconds"), get(r, "delta", head, "seconds")
        ),
        "pg_delta_1m_vs_10k": div(
            get(pg, "delta", deltas[-1], "seconds"), get(pg, "delta", deltas[0], "seconds")
        )
        if len(deltas) > 1
        else None,
        "pg_scope_churn_busy_vs_quiet": get(pg, "scope_churn", "ratio"),
        "pg_scope_churn_analyzed_vs_quiet": get(pg, "scope_churn", "ratio_analyzed"),
        "pg_push_mutations_per_s": get(pg, "push", "mutations_per_s"),
        "pg_push_vs_sqlite": div(
            get(pg, "push", "mutations_per_s"), get(r, "push", "mutations_per_s")
        ),
    }


def pg_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """The PostgreSQL rows of the scenario table: (scenario, size, time, rate, bytes, notes)."""
    pg = r.get("postgres") or {}
    if not pg.get("available"):
        return [("PostgreSQL server", "", "", "", "", f"not run: {pg.get('reason', 'skipped')}")]
    if pg.get("error"):
        return [("PostgreSQL server", "", "", "", "", f"failed: {pg['error'][:120]}")]
    out = []
    for n, v in pg.get("initial", {}).items():
        out.append((
            "initial sync, PostgreSQL", f"{int(n):,}", f"{v['seconds']:.3g} s",
            f"{v['rows_per_s']:,.0f} rows/s", f"{v['bytes']:,} ({v['bytes_per_row']} B/row)",
            f"chunk {v['chunk_size']}; CPU client {v['client_cpu_s']} s,"
            f" server {v['server_cpu_s']} s; runs {v.get('runs_seconds')}",
        ))  # fmt: skip
    for n, d in sorted(pg.get("delta", {}).items(), key=lambda kv: int(kv[0])):
        out.append((
            f"delta ({d['changes']} changes), PostgreSQL", f"{int(n):,}", f"{d['ms']} ms", "",
            f"{d['bytes']:,}", f"server CPU {d.get('server_cpu_ms_mean')} ms (mean); no-change sync"
            f" {d['no_change_ms']} ms; runs {d['runs_ms']}",
        ))  # fmt: skip
    churn = pg.get("scope_churn") or {}
    if churn.get("ratio") is not None:
        out.append((
            "scope churn, PostgreSQL", f"{churn['appointments']:,}",
            f"{churn['quiet']['ms']} / {churn['busy']['ms']} /"
            f" {churn['busy_analyzed']['ms']} ms", f"{churn['ratio']}x", "",
            f"10-row delta: quiet / after {sum(churn['foreign_writes'].values()):,} foreign"
            f" writes / the same after ANALYZE ({churn['ratio_analyzed']}x)",
        ))  # fmt: skip
    push = pg.get("push") or {}
    if push:
        out.append((
            "push, PostgreSQL", f"{push.get('mutations', 0):,}", f"{push.get('seconds')} s",
            f"{push.get('mutations_per_s') or 0:,.0f} mutations/s", f"{push.get('bytes_out')} out",
            push.get("note") or f"{push.get('requests')} requests; CPU server"
            f" {push.get('server_cpu_s')} s, client {push.get('client_cpu_s')} s",
        ))  # fmt: skip
    return out
