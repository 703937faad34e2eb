"""Real network faults (not CI): devices in network namespaces, netem, partitions.

    sudo .venv/bin/python -m bench.netem --devices 4 --minutes 2

Each device runs in its own network namespace, joined to the host by a veth
pair (10.231.N.2 <-> 10.231.N.1); the notes server of the test suite listens
on the host ends only. On each device's link: netem latency, jitter and loss
(when the kernel has ``sch_netem``), and partitions (the link taken down for a
few seconds, at random). Device processes write, update and delete notes and
sync in a loop; at the end the network heals, each device drains its outbox,
and the run checks the invariants: every device equals the server's rows for
its principal, nothing is pending, every insert was applied at most once and
each one the device kept was applied. It prints operations, faults injected
and invariant violations (the goal: 0). Needs root (``ip netns``, ``tc``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NOTE_COLUMNS = "id, owner, title, body, tag, n, data"


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), str(ROOT / "src"), str(ROOT / "examples")])
    return {**os.environ, "PYTHONPATH": path}


# -- the processes ------------------------------------------------------------------------


def serve(directory: str, port: int, hosts: list[str]) -> None:
    """The notes server, listening on the host end of each device's link."""
    import uvicorn

    from tests.test_push_support import NotesApp

    def make(app: Any) -> Any:
        socks = []
        for host in hosts:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            s.listen(128)
            socks.append(s)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        return uvicorn.Server(config), socks

    holder: list[Any] = []
    NotesApp(Path(directory), lambda app: holder.append(make(app)) or _Url(port), name="netem")
    server, socks = holder[0]
    print("serving", flush=True)
    server.run(sockets=socks)


class _Url:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"


def device(url: str, path: str, owner: str, seconds: float, seed: int) -> None:
    """Random local work and syncs until ``seconds`` pass, then drain when told (stdin)."""
    from syncunit.client import SyncClient
    from syncunit.errors import SyncError

    rng = random.Random(seed)
    token = {"u1": "t1", "u2": "t2"}[owner]
    client = SyncClient(url, path, token=token, timeout=3, chunk_size=20)
    stats = {"writes": 0, "syncs": 0, "sync_errors": 0, "inserted": []}
    while True:
        try:
            client.catalog()
            break
        except SyncError:
            time.sleep(0.5)
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        keys = [r[0] for r in client.store.query("SELECT id FROM LocalNote")]
        what = rng.random()
        if what < 0.4 or not keys:
            n += 1
            key = f"{owner}-{seed}-{n}"
            client.insert("LocalNote", {"id": key, "owner": owner, "title": "x", "n": n})
            stats["inserted"].append(key)
        elif what < 0.7:
            client.update("LocalNote", rng.choice(keys), {"title": f"t{n}", "n": n})
        elif what < 0.8:
            client.delete("LocalNote", rng.choice(keys))
        else:
            stats["syncs"] += 1
            try:
                client.sync("Sync")
            except SyncError:
                stats["sync_errors"] += 1
        stats["writes"] += what < 0.8
        time.sleep(rng.random() * 0.05)
    print("ready", flush=True)
    sys.stdin.readline()  # the network is healed
    for _ in range(20):
        try:
            client.sync("Sync")
            if client.outbox.count() == 0:
                client.sync("Sync")
                break
        except SyncError:
            time.sleep(0.5)
    print("drained", flush=True)
    sys.stdin.readline()  # every device drained: one last pull sees the others' pushes
    try:
        client.sync("Sync")
    except SyncError:
        stats["sync_errors"] += 1
    stats["pending"] = client.outbox.count()
    stats["rejected"] = len(client.outbox.rejected())
    client.close()
    print(json.dumps(stats), flush=True)


# -- the orchestra ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--loss", type=float, default=5.0, help="netem loss, percent")
    p.add_argument("--delay", type=int, default=40, help="netem delay, ms (jitter: half)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.netem needs root (ip netns, tc)", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="syncunit-netem-"))
    port = 18000 + rng.randrange(1000)
    links = [(f"sut-h{i}", f"sut-d{i}", f"sut-ns{i}", f"10.231.{i}.1", f"10.231.{i}.2")
             for i in range(args.devices)]  # fmt: skip
    faults = {"partitions": 0, "netem": "unavailable"}
    procs: list[subprocess.Popen[str]] = []
    try:
        for host_if, dev_if, ns, host_ip, dev_ip in links:
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", dev_if)
            sh("ip", "link", "set", dev_if, "netns", ns)
            sh("ip", "addr", "add", f"{host_ip}/24", "dev", host_if)
            sh("ip", "link", "set", host_if, "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{dev_ip}/24", "dev", dev_if)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", dev_if, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            netem = sh(
                "tc", "qdisc", "add", "dev", host_if, "root", "netem", "delay",
                f"{args.delay}ms", f"{args.delay // 2}ms", "loss", f"{args.loss}%", check=False,
            )  # fmt: skip
            if netem.returncode == 0:
                faults["netem"] = f"delay {args.delay}ms±{args.delay // 2}ms loss {args.loss}%"
            else:
                faults["netem"] = f"unavailable ({netem.stderr.strip()})"
        hosts = [link[3] for link in links]
        server = subprocess.Popen(
            [sys.executable, "-m", "bench.netem", "_serve", str(work), str(port), *hosts],
            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(server)
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "serving"
        seconds = args.minutes * 60
        owners = ["u1", "u2"]
        devices = []
        for i, (_, _, ns, host_ip, _) in enumerate(links):
            cmd = [
                "ip", "netns", "exec", ns, sys.executable, "-m", "bench.netem", "_device",
                f"http://{host_ip}:{port}", str(work / f"device{i}.sqlite"), owners[i % 2],
                str(seconds), str(args.seed * 100 + i),
            ]  # fmt: skip
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            devices.append(proc)
            procs.append(proc)
        end = time.monotonic() + seconds
        while time.monotonic() < end:  # partitions: a link down for 2 to 8 seconds
            time.sleep(rng.uniform(1, 4))
            host_if = rng.choice(links)[0]
            sh("ip", "link", "set", host_if, "down")
            faults["partitions"] += 1
            time.sleep(rng.uniform(2, 8))
            sh("ip", "link", "set", host_if, "up")
        for host_if, *_ in links:  # heal
            sh("ip", "link", "set", host_if, "up")
            sh("tc", "qdisc", "del", "dev", host_if, "root", check=False)
        for proc in devices:
            assert proc.stdout is not None
            assert proc.stdin is not None
            while proc.stdout.readline().strip() != "ready":
                pass
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in devices:
            assert proc.stdout is not None
            assert proc.stdin is not None
            while proc.stdout.readline().strip() != "drained":
                pass
        for proc in devices:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in devices:
            out, _ = proc.communicate(timeout=300)
            results.append(json.loads(out.strip().splitlines()[-1]))
        report = check(work, results, owners)
        report["faults"] = faults
        report["devices"] = args.devices
        report["minutes"] = args.minutes
        print(json.dumps(report, indent=2))
        return 0 if report["violations"] == 0 else 1
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for host_if, _, ns, _, _ in links:
            sh("ip", "link", "del", host_if, check=False)
            sh("ip", "netns", "del", ns, check=False)


def check(work: Path, results: list[dict[str, Any]], owners: list[str]) -> dict[str, Any]:
    server = sqlite3.connect(work / "netem-server.sqlite")
    violations: list[str] = []
    applied = dict(
        server.execute("SELECT note_id, count(*) FROM audit WHERE op = 'insert' GROUP BY note_id")
    )
    for i, stats in enumerate(results):
        owner = owners[i % 2]
        local = sqlite3.connect(work / f"device{i}.sqlite")
        mine = local.execute(f"SELECT {NOTE_COLUMNS} FROM LocalNote ORDER BY id").fetchall()
        theirs = server.execute(
            f"SELECT {NOTE_COLUMNS} FROM note WHERE owner = ? ORDER BY id", (owner,)
        ).fetchall()
        if mine != theirs:
            violations.append(f"device {i}: {len(mine)} rows, the server {len(theirs)}")
        if stats["pending"]:
            violations.append(f"device {i}: {stats['pending']} changes still pending")
        for key in stats["inserted"]:
            if applied.get(key, 0) > 1:
                violations.append(f"{key} inserted {applied[key]} times")
        kept = {r[0] for r in mine}
        for key in stats["inserted"]:
            if key in kept and applied.get(key, 0) != 1:
                violations.append(f"{key} is on device {i} but was never applied")
        local.close()
    server.close()
    return {
        "operations": {
            "writes": sum(r["writes"] for r in results),
            "syncs": sum(r["syncs"] for r in results),
            "failed_syncs": sum(r["sync_errors"] for r in results),
            "rejected": sum(r["rejected"] for r in results),
        },
        "violations": len(violations),
        "violation_list": violations[:20],
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["_serve"]:
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    elif sys.argv[1:2] == ["_device"]:
        device(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]), int(sys.argv[6]))
    else:
        sys.exit(main())
