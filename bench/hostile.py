"""Honest devices beside hostile ones: stalled readers and a decompression-bomb sender.

Run ``python -m bench.hostile`` (not in CI). The hospital server runs in its own
process with its default limits. Hospital 1's token is stolen: ``--stalled``
connections send a sync with it and never read the answer (reconnecting when
the server drops them), and one sender posts zstd bombs at ``--bomb-rate``
compressed bytes a second. Meanwhile ``--devices`` honest devices (one per
hospital 2..N+1) run ``Online`` syncs, each pushing a booking now and then.

An honest device that gets 429 or 503 waits what ``Retry-After`` says and
tries again, as the client's scheduler does; its latency includes the wait.
Reported: the honest syncs' latency (p50, p99, max), retries and failures, the
attackers' answers by status, and the server's peak memory before and during
the attack.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import zstandard

from bench.env import ensure_paths
from bench.serverproc import ServerProcess

STOLEN = "token-h1"


def make_database(path: Path, devices: int) -> None:
    """Hospitals 1..devices+1; hospital 1's appointments carry 3 kB of notes each, so a
    response to the stolen token is far larger than the socket buffers."""
    from hospital.generate import generate
    from hospital.models import metadata

    from syncunit.server import open_store

    store = open_store(f"sqlite:///{path}")
    metadata.create_all(store.engine)
    from hospital.units import schema

    store.install(schema)
    hospitals = devices + 1
    generate(store.engine, appointments=300 * hospitals, hospitals=hospitals,
             doctors=4 * hospitals, patients=50 * hospitals)  # fmt: skip
    with store.engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE appointment SET notes = hex(zeroblob(1500)) WHERE doctor_id IN"
            " (SELECT id FROM doctor WHERE hospital_id = 1)"
        )
    store.engine.dispose()


class Stalled(threading.Thread):
    """Sends a sync and never reads; opens a new one when the server drops it."""

    def __init__(self, url: str, stop: threading.Event, counts: collections.Counter[str]) -> None:
        super().__init__(daemon=True)
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.stop = stop
        self.counts = counts

    def run(self) -> None:
        body = b'{"protocol":1,"client_id":"stalled","chunk_size":50}'
        head = (
            f"POST /v1/sync/Login HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {STOLEN}\r\n"
            "Content-Type: application/json\r\nAccept-Encoding: identity\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        while not self.stop.is_set():
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            try:
                sock.connect((self.host, self.port))
                sock.sendall(head + body)
                self.counts["stalled-sent"] += 1
                sock.settimeout(0.5)
                while not self.stop.is_set():
                    try:  # peek only: never take the data, so the window stays shut
                        if sock.recv(1, socket.MSG_PEEK) == b"":
                            self.counts["stalled-dropped"] += 1
                            break
                    except TimeoutError:
                        pass
                    time.sleep(0.5)
            except OSError:
                self.counts["stalled-error"] += 1
                time.sleep(0.5)
            finally:
                sock.close()


class Bomber(threading.Thread):
    """Posts zstd bombs (each decompressing to 2 GiB) at ``rate`` compressed bytes a second."""

    def __init__(self, url: str, rate: int, stop: threading.Event,
                 counts: collections.Counter[str]) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.url = url
        self.rate = rate
        self.stop = stop
        self.counts = counts
        zero = b"\0" * (64 * 1024 * 1024)
        cctx = zstandard.ZstdCompressor(level=3)
        frame = cctx.compress(zero)
        self.bomb = frame * 32  # 2 GiB once decompressed
        self.sent = 0

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {STOLEN}", "Content-Encoding": "zstd",
                   "Content-Type": "application/vnd.syncunit.v1+msgpack"}  # fmt: skip
        started = time.monotonic()
        with httpx.Client(timeout=30) as http:
            while not self.stop.is_set():
                try:
                    r = http.post(f"{self.url}/v1/sync/Online", content=self.bomb, headers=headers)
                    self.counts[f"bomb-{r.status_code}"] += 1
                except httpx.HTTPError:
                    self.counts["bomb-error"] += 1
                self.sent += len(self.bomb)
                ahead = self.sent / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    self.stop.wait(ahead)


def honest(url: str, n: int, folder: Path, stop: threading.Event, every: float,
           latencies: list[float], failures: list[str],
           retries: list[str]) -> None:  # fmt: skip
    from syncunit import ProblemError, SyncClient

    client = SyncClient(url, folder / f"device{n}.sqlite", token=f"token-h{n + 2}")
    try:
        for _ in range(10):  # the first download, retried as a scheduler would
            try:
                client.sync("Login")
                break
            except ProblemError as exc:
                time.sleep(float(exc.extra.get("retry_after", 1)))
        ready.wait()
        rounds = 0
        while not stop.is_set():
            rounds += 1
            if rounds % 3 == 0:
                doctors = client.store.query("SELECT id FROM LocalDoctor WHERE hospital_id = ?",
                                             (n + 2,))  # fmt: skip
                start = dt.datetime(2040, 1, 1) + dt.timedelta(hours=n * 1000 + rounds)
                client.insert("LocalAppointment", {
                    "doctor_id": doctors[0][0], "patient_id": 1, "status": "booked",
                    "starts_at": start.isoformat(), "room": "1", "notes": "",
                    "ends_at": (start + dt.timedelta(minutes=30)).isoformat()})  # fmt: skip
            t0 = time.perf_counter()
            for attempt in range(3):  # as an app's scheduler would: wait what Retry-After says
                try:
                    client.sync("Online")
                    latencies.append(time.perf_counter() - t0)
                    break
                except ProblemError as exc:
                    if exc.status not in (429, 503) or attempt == 2:
                        failures.append(f"ProblemError {exc.code}: {exc}")
                        break
                    retries.append(exc.code)
                    time.sleep(float(exc.extra.get("retry_after", 1)))
                except Exception as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                    break
            stop.wait(every)
    finally:
        client.close()


ready = threading.Event()


def run(devices: int, stalled: int, bomb_rate: int, seconds: float, every: float) -> dict[str, Any]:
    ensure_paths()
    folder = Path(tempfile.mkdtemp(prefix="syncunit-hostile-"))
    db = folder / "server.sqlite"
    make_database(db, devices)
    counts: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    failures: list[str] = []
    retries: list[str] = []
    stop = threading.Event()
    with ServerProcess(db) as server:
        rss_before = server.peak_rss_mb()
        threads = [
            threading.Thread(target=honest, daemon=True,
                             args=(server.url, n, folder, stop, every, latencies, failures,
                                   retries))
            for n in range(devices)
        ]  # fmt: skip
        for t in threads:
            t.start()
        time.sleep(2.0)  # the devices' first downloads
        rss_warm = server.peak_rss_mb()
        attackers: list[threading.Thread] = [Stalled(server.url, stop, counts)
                                             for _ in range(stalled)]  # fmt: skip
        if bomb_rate:
            attackers.append(Bomber(server.url, bomb_rate, stop, counts))
        for t in attackers:
            t.start()
        time.sleep(1.0)
        ready.set()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join(60)
        rss_after = server.peak_rss_mb()
    lat = sorted(latencies)
    p = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 3) if lat else None  # noqa: E731
    return {
        "devices": devices, "stalled_readers": stalled, "bomb_bytes_per_s": bomb_rate,
        "seconds": seconds, "honest_syncs": len(lat), "honest_failures": len(failures),
        "failure_kinds": collections.Counter(f.split(":")[0] for f in failures),
        "honest_retries": collections.Counter(retries),
        "p50_s": p(0.50), "p99_s": p(0.99), "max_s": round(lat[-1], 3) if lat else None,
        "mean_s": round(statistics.fmean(lat), 3) if lat else None,
        "attackers": dict(counts),
        "server_peak_rss_mb": {"idle": rss_before, "after_first_syncs": rss_warm,
                               "under_attack": rss_after},
    }  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--stalled", type=int, default=50)
    parser.add_argument("--bomb-rate", type=int, default=1024 * 1024, help="bytes a second")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--every", type=float, default=0.5, help="pause between syncs")
    args = parser.parse_args(argv)
    report = run(args.devices, args.stalled, args.bomb_rate, args.seconds, args.every)
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
