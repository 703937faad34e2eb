"""Ratios, targets and the printed tables of a bench report."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from bench.pgbench import pg_rows

Report = dict[str, Any]


def _div(a: float | None, b: float | None, digits: int = 3) -> float | None:
    return round(a / b, digits) if a is not None and b else None


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def ratios(r: Report) -> dict[str, Any]:
    """The headline ratios; None wherever a side could not be measured."""
    head = str(r["config"]["headline_size"])
    big = str(max(map(int, r["initial"]), default=head))
    deltas = sorted(r["delta"], key=int)
    init, lim = r["initial"].get(head, {}), r["limits"].get(head, {})
    peer = r.get("kinto") or {}
    kpull = peer.get("full_pull_with_client") or peer.get("full_pull") or {}
    ap = r.get("anti_pattern") or {}
    apart = (
        _div(_get(r, "delta", deltas[-1], "seconds"), _get(r, "delta", deltas[0], "seconds"))
        if deltas
        else None
    )
    pairs = r.get("delta_pairs") or {}
    paired = _get(pairs, str(pairs["sizes"][-1]), "pair_ratio_median") if pairs else None
    push_rate = _get(r, "push", "mutations_per_s")
    limit_apart = _div(init.get("rows_per_s"), _get(lim, "sqlite_insert", "rows_per_s"))
    return {
        # Each sync with a limit run right after it (``limit_pairs``) where the run has them.
        "initial_vs_limit": init.get("limit_pair_ratio_median", limit_apart),
        "initial_vs_limit_apart": limit_apart,
        "initial_vs_kinto": _div(init.get("rows_per_s"), kpull.get("records_per_s")),
        "bytes_vs_kinto": _div(init.get("bytes_per_row"), kpull.get("bytes_per_record")),
        "bytes_vs_kinto_gzip": _div(
            init.get("bytes_per_row"), peer.get("gzip_equivalent_bytes_per_record")
        ),
        "delta_vs_kinto_since": _div(
            _get(r, "delta", head, "seconds"), _get(peer, "delta", "seconds")
        ),
        # Alternated round by round (``delta_pairs``) where the run has them.
        "delta_1m_vs_10k": paired if paired is not None else apart,
        "delta_1m_vs_10k_apart": apart,
        "rss_1m_vs_100k": _div(
            _get(r, "initial", big, "client_peak_rss_mb"), init.get("client_peak_rss_mb")
        ),
        "initial_vs_pouchdb": _div(
            init.get("rows_per_s"), _get(r, "pouchdb", "full_pull", "records_per_s")
        ),
        "delta_vs_pouchdb": _div(
            _get(r, "delta", head, "seconds"), _get(r, "pouchdb", "delta", "seconds")
        ),
        "scope_churn_busy_vs_quiet": _get(r, "scope_churn", "ratio"),
        # Row-by-row first sync of the largest size against the same through a snapshot.
        "bootstrap_vs_rows_1m": _div(
            _get(r, "initial", big, "seconds"), _get(r, "bootstrap", big, "seconds")
        ),
        "push_mutations_per_s": push_rate,
        "push_mutations_per_cpu_s": _get(r, "push", "mutations_per_cpu_s"),
        "push_vs_kinto_batch": _div(push_rate, _get(peer, "batch_write", "records_per_s")),
        "server_encode_vs_limit": _div(
            _get(lim, "server_encode", "rows_per_s"), _get(lim, "sqlite_insert", "rows_per_s")
        ),
        "client_apply_vs_limit": _div(
            _get(lim, "client_apply", "rows_per_s"), _get(lim, "sqlite_insert", "rows_per_s")
        ),
        "anti_pattern_time_vs_delta": _div(ap.get("seconds"), ap.get("delta_seconds"), 1),
        "anti_pattern_bytes_vs_delta": _div(ap.get("bytes"), ap.get("delta_bytes"), 1),
    }


TARGETS: list[tuple[str, str, str, float]] = [
    # name, ratio key, comparison, threshold
    ("initial sync >= 85% of the SQLite limit", "initial_vs_limit", ">=", 0.85),
    ("initial sync >= 3x Kinto rows/s", "initial_vs_kinto", ">=", 3.0),
    ("bytes/row <= 30% of Kinto's", "bytes_vs_kinto", "<=", 0.3),
    ("100-change delta no slower than Kinto _since", "delta_vs_kinto_since", "<=", 1.0),
    ("delta at the largest table <= 1.2x at the smallest", "delta_1m_vs_10k", "<=", 1.2),
    ("client peak RSS at the largest size <= 1.5x", "rss_1m_vs_100k", "<=", 1.5),
    ("snapshot first sync >= 5x row by row (largest size)", "bootstrap_vs_rows_1m", ">=", 5.0),
    ("push >= 20,000 mutations/s", "push_mutations_per_s", ">=", 20000.0),
    ("100 hospitals: delta after foreign writes <= 1.5x", "scope_churn_busy_vs_quiet", "<=", 1.5),
]


def targets(ratio: dict[str, Any]) -> dict[str, Any]:
    """Pass/fail per target; ``pass`` is None when the figure is missing."""
    out = {}
    for name, key, op, threshold in TARGETS:
        value = ratio.get(key)
        ok = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        out[key] = {"target": name, "value": value, "threshold": f"{op} {threshold:g}", "pass": ok}
    return out


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and v < 100:
        return f"{v:,.3g}{unit}"
    return f"{v:,.0f}{unit}"


def print_report(r: Report, console: Console) -> None:
    """The scenario table, then the ratios with their targets."""
    t = Table(title="syncunit bench", title_style="bold")
    t.add_column("scenario")
    t.add_column("size", justify="right")
    t.add_column("time", justify="right")
    t.add_column("rate", justify="right")
    t.add_column("bytes", justify="right")
    t.add_column("notes")
    for n, v in r["initial"].items():
        t.add_row(
            "initial sync",
            f"{int(n):,}",
            _fmt(v["seconds"], " s"),
            _fmt(v["rows_per_s"], " rows/s"),
            _fmt(v["bytes_per_row"], " B/row"),
            f"chunk {v['chunk_size'] or 'default'}, first rows {_fmt(v.get('first_rows_s'))} s,"
            f" peak RSS {v['client_peak_rss_mb']} MB",
        )
    for n, lim in r["limits"].items():
        t.add_row(
            "  SQLite limit",
            f"{int(n):,}",
            _fmt(lim["sqlite_insert"]["seconds"], " s"),
            _fmt(lim["sqlite_insert"]["rows_per_s"], " rows/s"),
            "",
            "executemany INSERT, 1 txn",
        )
        t.add_row(
            "  server read+encode",
            f"{int(n):,}",
            _fmt(lim["server_encode"]["seconds"], " s"),
            _fmt(lim["server_encode"]["rows_per_s"], " rows/s"),
            _fmt(lim["server_encode"]["bytes_per_row"], " B/row"),
            "no network",
        )
        t.add_row(
            "  client decode+apply",
            f"{int(n):,}",
            _fmt(lim["client_apply"]["seconds"], " s"),
            _fmt(lim["client_apply"]["rows_per_s"], " rows/s"),
            "",
            "no network",
        )
    sweep = r.get("chunk_sweep") or {}
    for c in sweep.get("curve", []):
        t.add_row(
            "  chunk size",
            f"{c['chunk_size']:,}",
            _fmt(c["seconds"], " s"),
            _fmt(c["rows_per_s"], " rows/s"),
            "",
            f"peak RSS {c['client_peak_rss_mb']} MB",
        )
    for n, d in sorted(r["delta"].items(), key=lambda kv: int(kv[0])):
        t.add_row(
            f"delta ({d['changes']} changes)",
            f"{int(n):,}",
            _fmt(d["ms"], " ms"),
            "",
            _fmt(d["bytes"]),
            f"server CPU {d.get('server_cpu_ms_mean', d.get('server_cpu_ms'))} ms (mean);"
            f" no-change sync {d['no_change_ms']} ms",
        )
    ap = r.get("anti_pattern") or {}
    if ap:
        t.add_row(
            "delete-all/create-all",
            f"{ap['rows']:,}",
            _fmt(ap["seconds"], " s"),
            "",
            _fmt(ap["bytes"]),
            f"{_fmt(ap['time_saved_s'], ' s')} and "
            f"{_fmt(ap['bytes_saved'])} bytes saved by a delta",
        )
    push = r.get("push") or {}
    t.add_row(
        "push",
        f"{push.get('mutations', 0):,}",
        _fmt(push.get("seconds"), " s"),
        _fmt(push.get("mutations_per_s"), " mut/s"),
        _fmt(push.get("bytes_out")),
        push.get("note")
        or f"{push.get('requests')} requests; local insert {_fmt(push.get('local_insert_s'))} s",
    )
    peer = r.get("kinto") or {}
    if peer.get("available"):
        pull = peer["full_pull_with_client"]
        t.add_row(
            "Kinto pull + write",
            f"{peer['records']:,}",
            _fmt(pull["seconds"], " s"),
            _fmt(pull["records_per_s"], " rows/s"),
            _fmt(pull["bytes_per_record"], " B/row"),
            f"page {pull['page_size']}",
        )
        t.add_row(
            "Kinto _since",
            f"{peer['records']:,}",
            _fmt(peer["delta"]["ms"], " ms"),
            "",
            _fmt(peer["delta"]["bytes"]),
            f"{peer['delta']['changes']} changes",
        )
        bw = peer["batch_write"]
        t.add_row(
            "Kinto batch write",
            f"{bw['records']:,}",
            _fmt(bw["seconds"], " s"),
            _fmt(bw["records_per_s"], " rec/s"),
            "",
            f"{bw['requests_per_batch']}/batch",
        )
    else:
        t.add_row("Kinto", "", "", "", "", f"not run: {peer.get('reason', 'skipped')[:80]}")
    for size, b in (r.get("bootstrap") or {}).items():
        t.add_row(
            "snapshot bootstrap",
            f"{int(size):,}",
            _fmt(b["seconds"], " s"),
            _fmt(b["rows_per_s"], " rows/s"),
            _fmt(b["bytes"]),
            "file + delta, fresh device",
        )
    pouch = r.get("pouchdb") or {}
    if pouch.get("available"):
        t.add_row(
            "PouchDB replicate",
            f"{pouch['records']:,}",
            _fmt(pouch["full_pull"]["seconds"], " s"),
            _fmt(pouch["full_pull"]["records_per_s"], " rows/s"),
            "",
            f"batch {pouch['batch_size']}",
        )
        t.add_row(
            "PouchDB delta",
            f"{pouch['records']:,}",
            _fmt(pouch["delta"]["seconds"], " s"),
            "",
            "",
            f"{pouch['delta']['changes']} changes",
        )
    else:
        t.add_row("PouchDB", "", "", "", "", f"not run: {pouch.get('reason', 'skipped')[:80]}")
    for cells in pg_rows(r):
        t.add_row(*cells)
    console.print(t)

    g = Table(title="ratios and targets", title_style="bold")
    g.add_column("ratio")
    g.add_column("value", justify="right")
    g.add_column("target")
    g.add_column("")
    tg = r["targets"]
    for key, value in r["ratios"].items():
        target = tg.get(key)
        verdict = ""
        if target:
            verdict = {True: "[green]pass[/]", False: "[red]FAIL[/]", None: "[yellow]n/a[/]"}[
                target["pass"]
            ]
        g.add_row(key, _fmt(value), target["threshold"] if target else "", verdict)
    console.print(g)


def to_markdown(r: Report) -> str:
    """The report's main figures as Markdown tables (for docs/performance.md)."""
    lines = [
        "| scenario | size | time | rate | bytes | notes |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]

    def row(*cells: Any) -> None:
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")

    for n, v in r["initial"].items():
        row(
            "initial sync",
            f"{int(n):,}",
            _fmt(v["seconds"], " s"),
            _fmt(v["rows_per_s"], " rows/s"),
            f"{v['bytes']:,} ({v['bytes_per_row']} B/row)",
            f"chunk {v['chunk_size']}; appointments announced after"
            f" {_fmt(v.get('stream_start_s'))} s, first rows after {_fmt(v.get('first_rows_s'))} s;"
            f" client peak RSS {v['client_peak_rss_mb']} MB;"
            f" CPU client {v['client_cpu_s']} s, server {v['server_cpu_s']} s",
        )
    for n, lim in r["limits"].items():
        enc, app, ins = lim["server_encode"], lim["client_apply"], lim["sqlite_insert"]
        row(
            "SQLite write limit",
            f"{int(n):,}",
            _fmt(ins["seconds"], " s"),
            _fmt(ins["rows_per_s"], " rows/s"),
            "",
            "executemany INSERT, one transaction",
        )
        row(
            "server read + encode alone",
            f"{int(n):,}",
            _fmt(enc["seconds"], " s"),
            _fmt(enc["rows_per_s"], " rows/s"),
            f"{enc['zstd_bytes']:,}",
            f"read {enc['read_s']} s, msgpack {enc['encode_s']} s, zstd {enc['compress_s']} s",
        )
        row(
            "client decode + apply alone",
            f"{int(n):,}",
            _fmt(app["seconds"], " s"),
            _fmt(app["rows_per_s"], " rows/s"),
            "",
            f"unzstd {app['decompress_s']} s, decode {app['decode_s']} s,"
            f" apply_chunk {app['apply_s']} s",
        )
    for n, d in sorted(r["delta"].items(), key=lambda kv: int(kv[0])):
        row(
            f"delta, {d['changes']} changed rows",
            f"{int(n):,}",
            _fmt(d["ms"], " ms"),
            "",
            f"{d['bytes']:,}",
            f"server CPU {d.get('server_cpu_ms_mean', d.get('server_cpu_ms'))} ms (mean);"
            f" no-change sync {d['no_change_ms']} ms; runs {d['runs_ms']}",
        )
    ap = r.get("anti_pattern") or {}
    if ap:
        row(
            "delete-all/create-all",
            f"{ap['rows']:,}",
            _fmt(ap["seconds"], " s"),
            "",
            f"{ap['bytes']:,}",
            f"vs the delta: {ap['time_saved_s']} s and {ap['bytes_saved']:,} bytes more",
        )
    push = r.get("push") or {}
    row(
        "push",
        f"{push.get('mutations', 0):,}",
        _fmt(push.get("seconds"), " s"),
        _fmt(push.get("mutations_per_s"), " mutations/s"),
        f"{push.get('bytes_out', 0):,} out",
        push.get("note")
        or f"{push.get('requests')} requests; the 10,000 local INSERTs took"
        f" {push.get('local_insert_s')} s",
    )
    peer = r.get("kinto") or {}
    if peer.get("available"):
        pull = peer["full_pull_with_client"]
        row(
            "Kinto pull + SQLite write",
            f"{peer['records']:,}",
            _fmt(pull["seconds"], " s"),
            _fmt(pull["records_per_s"], " rows/s"),
            f"{pull['bytes']:,} ({pull['bytes_per_record']} B/row)",
            f"page size {pull['page_size']}; gzip would give"
            f" {peer.get('gzip_equivalent_bytes_per_record')} B/row",
        )
        row(
            "Kinto `_since`",
            f"{peer['records']:,}",
            _fmt(peer["delta"]["ms"], " ms"),
            "",
            f"{peer['delta']['bytes']:,}",
            f"{peer['delta']['changes']} changed records",
        )
        bw = peer["batch_write"]
        row(
            "Kinto batch write",
            f"{bw['records']:,}",
            _fmt(bw["seconds"], " s"),
            _fmt(bw["records_per_s"], " records/s"),
            "",
            f"{bw['requests_per_batch']} PUTs per POST /v1/batch",
        )
    for size, b in (r.get("bootstrap") or {}).items():
        row(
            "snapshot bootstrap",
            f"{int(size):,}",
            _fmt(b["seconds"], " s"),
            _fmt(b["rows_per_s"], " rows/s"),
            f"{b['bytes']:,}",
            f"prebuilt file, then a delta; fresh device; runs {b['runs_seconds']}",
        )
    pouch = r.get("pouchdb") or {}
    if pouch.get("available"):
        row(
            "PouchDB replicate (LevelDB)",
            f"{pouch['records']:,}",
            _fmt(pouch["full_pull"]["seconds"], " s"),
            _fmt(pouch["full_pull"]["records_per_s"], " rows/s"),
            "",
            f"express-pouchdb {pouch['versions'].get('express-pouchdb')} (memory),"
            f" PouchDB {pouch['versions'].get('pouchdb')}; batch size {pouch['batch_size']}",
        )
        row(
            "PouchDB delta",
            f"{pouch['records']:,}",
            _fmt(pouch["delta"]["seconds"] * 1000, " ms"),
            "",
            "",
            f"{pouch['delta']['changes']} changed records",
        )
    for cells in pg_rows(r):
        row(*cells)
    sweep = r.get("chunk_sweep") or {}
    if sweep:
        lines += [
            "",
            "| chunk size | time | rows/s | client peak RSS |",
            "| ---: | ---: | ---: | ---: |",
        ]
        for c in sweep["curve"]:
            row(
                f"{c['chunk_size']:,}",
                _fmt(c["seconds"], " s"),
                _fmt(c["rows_per_s"]),
                f"{c['client_peak_rss_mb']} MB",
            )
    lines += ["", "| ratio | value | target | verdict |", "| --- | ---: | --- | --- |"]
    for key, value in r["ratios"].items():
        t = r["targets"].get(key)
        verdict = "" if not t else {True: "pass", False: "**fail**", None: "n/a"}[t["pass"]]
        row(f"`{key}`", _fmt(value), t["threshold"] if t else "", verdict)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import json
    import sys
    from pathlib import Path

    print(to_markdown(json.loads(Path(sys.argv[1]).read_text())))
