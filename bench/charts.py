"""One PNG per scenario, drawn from the bench report with matplotlib (optional)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

Report = dict[str, Any]


def _k(n: int | str) -> str:
    n = int(n)
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else f"{n // 1000}k"


def draw(report: Report, outdir: Path) -> tuple[list[Path], str | None]:
    """Draw every chart the report has data for; return the files, or a note why none."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed: pip install matplotlib"
    outdir.mkdir(parents=True, exist_ok=True)
    plt.rcParams.update(
        {"figure.dpi": 110, "font.size": 9, "axes.spines.top": False, "axes.spines.right": False}
    )
    makers: dict[str, Callable[[Any, Report], bool]] = {
        "initial_sync": _initial,
        "bounds": _bounds,
        "chunk_size": _chunks,
        "delta": _delta,
        "anti_pattern": _anti_pattern,
        "push": _push,
        "memory": _memory,
        "peer": _peer,
    }
    files = []
    for name, make in makers.items():
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        try:
            drawn = make(ax, report)
        except (KeyError, TypeError, ValueError):
            drawn = False
        if drawn:
            fig.tight_layout()
            path = outdir / f"{name}.png"
            fig.savefig(path)
            files.append(path)
        plt.close(fig)
    return files, None


def _label_bars(ax: Any, bars: Any, fmt: str = "{:,.0f}") -> None:
    for bar in bars:
        ax.annotate(
            fmt.format(bar.get_height()),
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )


def _initial(ax: Any, r: Report) -> bool:
    head = str(r["config"]["headline_size"])
    names = [f"initial sync {_k(n)}" for n in r["initial"]]
    values = [v["rows_per_s"] for v in r["initial"].values()]
    lim = r["limits"].get(head)
    if lim:
        names += ["server read+encode", "client decode+apply", "SQLite limit"]
        values += [
            lim["server_encode"]["rows_per_s"],
            lim["client_apply"]["rows_per_s"],
            lim["sqlite_insert"]["rows_per_s"],
        ]
    peer = r.get("kinto") or {}
    if peer.get("available"):
        names.append("Kinto pull + write")
        values.append(peer["full_pull_with_client"]["records_per_s"])
    colors = ["#2b6cb0"] * len(r["initial"]) + ["#a0aec0"] * (len(names) - len(r["initial"]))
    if peer.get("available"):
        colors[-1] = "#dd6b20"
    bars = ax.bar(names, values, color=colors)
    _label_bars(ax, bars)
    ax.set_ylabel("rows per second")
    ax.set_title(f"Initial sync from an empty device ({_k(head)} rows unless noted)")
    ax.tick_params(axis="x", labelrotation=20)
    return True


def _bounds(ax: Any, r: Report) -> bool:
    head = str(r["config"]["headline_size"])
    lim = r["limits"][head]
    init = r["initial"][head]
    enc, app = lim["server_encode"], lim["client_apply"]
    parts = {
        "server: SQL read + columns": enc["read_s"],
        "server: msgpack": enc["encode_s"],
        "server: zstd": enc["compress_s"],
        "client: unzstd + decode": app["decompress_s"] + app["decode_s"],
        "client: apply_chunk": app["apply_s"],
    }
    names = [*parts, "SQLite limit (1 txn)", "end to end (HTTP)"]
    values = [*parts.values(), lim["sqlite_insert"]["seconds"], init["seconds"]]
    colors = ["#4a5568"] * 3 + ["#2b6cb0"] * 2 + ["#a0aec0", "#2f855a"]
    bars = ax.barh(names, values, color=colors)
    for bar in bars:
        ax.annotate(
            f"{bar.get_width() * 1000:,.0f} ms",
            (bar.get_width(), bar.get_y() + 0.4),
            va="center",
            fontsize=8,
        )
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(f"Where the time of a {_k(head)}-row initial sync goes")
    return True


def _chunks(ax: Any, r: Report) -> bool:
    sweep = r["chunk_sweep"]
    if not sweep:
        return False
    xs = [c["chunk_size"] for c in sweep["curve"]]
    ys = [c["rows_per_s"] for c in sweep["curve"]]
    ax.plot(xs, ys, marker="o", color="#2b6cb0")
    ax.set_xscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("chunk size (rows per chunk, log scale)")
    ax.set_ylabel("rows per second")
    ax.set_ylim(0, max(ys) * 1.15)
    ax2 = ax.twinx()
    ax2.plot(
        xs, [c["client_peak_rss_mb"] for c in sweep["curve"]], marker="s", ls="--", color="#dd6b20"
    )
    ax2.set_ylabel("client peak RSS (MB)", color="#dd6b20")
    ax.set_title(f"Initial sync of {_k(sweep['rows'])} rows by chunk size")
    return True


def _delta(ax: Any, r: Report) -> bool:
    sizes = sorted(r["delta"], key=int)
    ms = [r["delta"][s]["ms"] for s in sizes]
    bars = ax.bar([_k(s) + " rows" for s in sizes], ms, color="#2b6cb0", label="syncunit")
    _label_bars(ax, bars, "{:.1f} ms")
    peer = r.get("kinto") or {}
    if peer.get("available"):
        ax.axhline(
            peer["delta"]["ms"],
            color="#dd6b20",
            ls="--",
            label=f"Kinto _since ({_k(peer['records'])} records)",
        )
        ax.legend()
    changes = r["delta"][sizes[0]]["changes"]
    ax.set_yscale("log")
    ax.set_ylabel("ms per delta (median, log scale)")
    ax.set_title(f"Delta sync of {changes} changed rows, by server table size")
    return True


def _anti_pattern(ax: Any, r: Report) -> bool:
    ap = r["anti_pattern"]
    if not ap:
        return False
    names = ["delete-all / create-all", f"delta ({ap['delta_changes']} changes)"]
    ax.bar(names, [ap["seconds"], ap["delta_seconds"]], color=["#c53030", "#2f855a"])
    ax.set_ylabel("seconds")
    ax.set_ylim(0, ap["seconds"] * 1.25)
    for i, (s, b) in enumerate(
        [(ap["seconds"], ap["bytes"]), (ap["delta_seconds"], ap["delta_bytes"])]
    ):
        ax.annotate(
            f"{s * 1000:,.0f} ms\n{b / 1024:,.0f} KiB", (i, s), ha="center", va="bottom", fontsize=8
        )
    ax.set_title(f"Re-downloading {_k(ap['rows'])} rows vs syncing what changed")
    return True


def _push(ax: Any, r: Report) -> bool:
    push = r.get("push") or {}
    if not push.get("mutations_per_s"):
        return False
    names = [f"syncunit push ({push['mutations']:,} in one run)"]
    values = [push["mutations_per_s"]]
    peer = r.get("kinto") or {}
    if peer.get("available"):
        bw = peer["batch_write"]
        names.append(f"Kinto batch write ({bw['requests_per_batch']}/request)")
        values.append(bw["records_per_s"])
    bars = ax.bar(names, values, color=["#2b6cb0", "#dd6b20"][: len(values)])
    _label_bars(ax, bars)
    ax.axhline(20000, color="#718096", ls="--", label="target: 20,000/s")
    ax.set_ylabel("mutations per second")
    ax.set_title("Pushing local changes")
    ax.legend()
    return True


def _memory(ax: Any, r: Report) -> bool:
    sizes = list(r["initial"])
    peak = [r["initial"][s]["client_peak_rss_mb"] for s in sizes]
    base = [r["initial"][s]["client_base_rss_mb"] for s in sizes]
    labels = [_k(s) + " rows" for s in sizes]
    ax.bar(labels, base, color="#a0aec0", label="before the sync (interpreter + imports)")
    bars = ax.bar(
        labels,
        [p - b for p, b in zip(peak, base, strict=True)],
        bottom=base,
        color="#2b6cb0",
        label="added by the sync",
    )
    for bar, p in zip(bars, peak, strict=True):
        ax.annotate(
            f"{p:.0f} MB",
            (bar.get_x() + bar.get_width() / 2, p),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_ylabel("client peak RSS (MB)")
    ax.set_ylim(0, max(peak) * 1.4)
    ax.set_title("Client memory during an initial sync")
    ax.legend(loc="upper left")
    return True


def _peer(ax: Any, r: Report) -> bool:
    peer = r.get("kinto") or {}
    ratios = r["ratios"]
    if not peer.get("available"):
        return False
    names = ["initial rows/s", "bytes/row (inverse)", "delta speed", "push vs batch write"]
    values = [
        ratios.get("initial_vs_kinto"),
        1 / ratios["bytes_vs_kinto"] if ratios.get("bytes_vs_kinto") else None,
        1 / ratios["delta_vs_kinto_since"] if ratios.get("delta_vs_kinto_since") else None,
        ratios.get("push_vs_kinto_batch"),
    ]
    shown = [(n, v) for n, v in zip(names, values, strict=True) if v]
    bars = ax.bar([n for n, _ in shown], [v for _, v in shown], color="#2b6cb0")
    _label_bars(ax, bars, "{:.1f}x")
    ax.axhline(1, color="#dd6b20", ls="--", label="Kinto = 1")
    ax.set_ylabel("syncunit / Kinto (higher is better)")
    ax.set_title(f"syncunit against Kinto 26 + PostgreSQL ({_k(peer['records'])} records)")
    ax.legend()
    return True
