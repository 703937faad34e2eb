"""Profile a scenario on both sides with py-spy: ``python -m bench.profile [initial|delta|push]``.

The server runs in its own process and the client in this one, each with
py-spy attached. Both write collapsed stacks (``*.txt``, also viewable with
speedscope or inferno); the top costs are printed: self time (the function on
top of the stack) and total time (anywhere on the stack).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
for _p in (str(_ROOT / "examples"), str(_ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench import scenarios  # noqa: E402
from bench.datasets import server_db_copy  # noqa: E402
from bench.env import RESULTS, TOKEN, UNIT  # noqa: E402
from bench.serverproc import ServerProcess  # noqa: E402

_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^)]*?)(?::\d+)?\)$")


def py_spy() -> str:
    """The py-spy executable next to this interpreter, or on PATH."""
    local = Path(sys.executable).with_name("py-spy")
    found = str(local) if local.exists() else shutil.which("py-spy")
    if not found:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    return found


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    file = m["file"]
    for marker in ("site-packages/", "src/", "lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{m['fn']} ({file})"


def top_costs(collapsed: Path, limit: int = 15) -> dict[str, Any]:
    """Self and total sample shares per function from a py-spy ``raw`` file."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        samples += n
        if frames:
            own[frames[-1]] += n
        for f in set(frames):
            total[f] += n

    def share(c: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": f, "share": round(k / samples, 3)} for f, k in c.most_common(limit)]

    return {"samples": samples, "self": share(own), "total": share(total)}


class Spy:
    """``py-spy record`` attached to a running process until ``stop()``."""

    def __init__(self, pid: int, out: Path, rate: int) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [py_spy(), "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
             "--output", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=60)


def _initial(server: ServerProcess, work: Path, chunk: int | None, _: int) -> dict[str, Any]:
    from syncunit.client import SyncClient

    with SyncClient(server.url, work / "device.sqlite", token=TOKEN, chunk_size=chunk) as c:
        res = c.sync(UNIT)
    return {"seconds": round(res.seconds, 3), "rows": res.total_in, "bytes": res.bytes_in}


def _delta(server: ServerProcess, work: Path, chunk: int | None, runs: int) -> dict[str, Any]:
    out = scenarios.delta_runs(server, server.db, work / "device.sqlite", 100, runs, chunk)
    return {"ms": out["ms"], "runs": runs}


def _push(server: ServerProcess, work: Path, chunk: int | None, count: int) -> dict[str, Any]:
    return scenarios.push(server, work / "device.sqlite", count)


SCENARIOS: dict[str, tuple[Callable[..., dict[str, Any]], int]] = {
    "initial": (_initial, 0),
    "delta": (_delta, 50),  # 50 deltas of 100 changes
    "push": (_push, 10_000),  # 10,000 mutations
}


def profile(
    scenario: str,
    rows: int,
    outdir: Path,
    chunk_size: int | None,
    rate: int,
    *,
    analyze: bool = False,
) -> dict[str, Any]:
    """Run ``scenario`` against a ``rows``-row server with py-spy on both sides."""
    outdir.mkdir(parents=True, exist_ok=True)
    run, amount = SCENARIOS[scenario]
    work = Path(tempfile.mkdtemp(prefix="syncunit-profile-"))
    server_out = outdir / f"{scenario}-{rows}-server.txt"
    client_out = outdir / f"{scenario}-{rows}-client.txt"
    try:
        db, _ = server_db_copy(rows, work, analyze=analyze)
        with ServerProcess(db) as server:
            if scenario != "initial":
                _initial(server, work, chunk_size, 0)  # the device the scenario starts from
            spies = [Spy(server.pid, server_out, rate), Spy(os.getpid(), client_out, rate)]
            time.sleep(1.0)  # let py-spy attach
            try:
                measured = run(server, work, chunk_size, amount)
            finally:
                for spy in spies:
                    spy.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "scenario": scenario,
        "rows": rows,
        "measured": measured,
        "server": top_costs(server_out),
        "client": top_costs(client_out),
        "files": [str(server_out), str(client_out)],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("scenario", nargs="?", choices=sorted(SCENARIOS), default="initial")
    parser.add_argument("--rows", type=int, default=100_000, help="appointments on the server")
    parser.add_argument("--chunk-size", type=int)
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--out", type=Path, default=RESULTS / "profile")
    parser.add_argument("--analyze", action="store_true", help="ANALYZE the server database")
    args = parser.parse_args(argv)
    result = profile(
        args.scenario, args.rows, args.out, args.chunk_size, args.rate, analyze=args.analyze
    )
    print(f"{args.scenario} on {args.rows:,} rows (slowed down by profiling): {result['measured']}")
    for side in ("server", "client"):
        costs = result[side]
        print(f"\n{side}: {costs['samples']} samples")
        for kind in ("self", "total"):
            print(f"  top {kind} time:")
            for row in costs[kind]:
                print(f"    {row['share'] * 100:5.1f}%  {row['function']}")
    out = args.out / f"{args.scenario}-{args.rows}-top.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
