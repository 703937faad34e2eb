"""Peer baseline: pull/push throughput of a Kinto server backed by PostgreSQL.

Kinto is installed into a private virtualenv under the bench cache and run as a
subprocess (``kinto start``: pserve + waitress, as in its official image) against a
throwaway PostgreSQL 15 cluster. The initial data set is bulk-loaded straight into
Kinto's ``objects`` table; the loaded cluster is cached and copied for every run,
so each run starts from the pristine data set. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

KINTO_REQUIREMENT = "kinto[postgresql]==26.5.0"
PG_BIN = Path(os.environ.get("SYNCUNIT_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_OS_USER = "syncbench"
AUTH = ("bench", "bench")
COLLECTION = "/buckets/b/collections/c"
RECORDS_PATH = f"/v1{COLLECTION}/records"
BATCH_CHUNK = 25  # Kinto's default batch_max_requests; 100 or 500 were not faster
COLUMNS = (
    "id",
    "doctor_id",
    "patient_id",
    "hospital_id",
    "starts_at",
    "ends_at",
    "status",
    "room",
    "notes",
    "patient_name",
    "doctor_name",
    "specialty_name",
    "hospital_name",
)

KINTO_INI = """\
[app:main]
use = egg:kinto
kinto.storage_backend = kinto.core.storage.postgresql
kinto.storage_url = {dsn}
kinto.storage_max_fetch_size = {max_fetch}
kinto.permission_backend = kinto.core.permission.postgresql
kinto.permission_url = {dsn}
kinto.cache_backend = kinto.core.cache.memory
kinto.userid_hmac_secret = syncunit-bench-secret
kinto.bucket_create_principals = system.Authenticated
kinto.batch_max_requests = {batch_max}
multiauth.policies = basicauth

[server:main]
use = egg:waitress#main
host = 127.0.0.1
port = {port}
"""


def cache_root() -> Path:
    """Directory for the Kinto virtualenv (``SYNCUNIT_BENCH_CACHE`` overrides)."""
    default = Path.home() / ".cache" / "syncunit-bench"
    return Path(os.environ.get("SYNCUNIT_BENCH_CACHE", default))


def pg_root() -> Path:
    """Directory for PostgreSQL clusters; must be reachable by the postgres OS user."""
    if os.geteuid() == 0:
        return Path(os.environ.get("SYNCUNIT_BENCH_PG_CACHE", "/var/tmp/syncunit-bench-pg"))
    return cache_root() / "pg"


def _run(
    cmd: Sequence[str | Path], timeout: float = 300, **kw: Any
) -> subprocess.CompletedProcess[Any]:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, timeout=timeout, **kw)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace")[-2000:]
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{err}")
    return proc


def ensure_kinto_venv() -> tuple[Path, str]:
    """Create (or reuse) the private Kinto virtualenv; return (bin dir, Kinto version)."""
    venv = cache_root() / "kinto-venv"
    bindir = venv / "bin"
    probe = [
        "-c",
        "import importlib.metadata as m, kinto, psycopg2, sqlalchemy, waitress;"
        "print(m.version('kinto'))",
    ]
    wanted = KINTO_REQUIREMENT.split("==")[1]
    if (bindir / "python").exists():
        ok = subprocess.run([str(bindir / "python"), *probe], capture_output=True, text=True)
        if ok.returncode == 0 and ok.stdout.strip() == wanted:
            return bindir, wanted
        shutil.rmtree(venv)
    try:
        venv.parent.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "venv", venv], timeout=300)
        _run([bindir / "python", "-m", "pip", "install", "-q", KINTO_REQUIREMENT], timeout=900)
        version = _run([bindir / "python", *probe], text=True).stdout.strip()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(venv, ignore_errors=True)
        raise RuntimeError(f"Kinto could not be installed: {exc}") from exc
    return bindir, version


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_pg_user(cmd: Sequence[str | Path]) -> list[str]:
    """Prefix a command so that it runs as the unprivileged postgres OS user when root."""
    if os.geteuid() != 0:
        return [str(c) for c in cmd]
    return ["runuser", "-u", PG_OS_USER, "--", *map(str, cmd)]


def _ensure_pg_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        if subprocess.run(["id", PG_OS_USER], capture_output=True).returncode != 0:
            _run(
                [
                    "useradd",
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    PG_OS_USER,
                ]
            )
        shutil.chown(path, PG_OS_USER, PG_OS_USER)


class Postgres:
    """A PostgreSQL cluster in ``datadir`` listening on 127.0.0.1 only."""

    def __init__(self, datadir: Path) -> None:
        self.datadir = datadir
        self.port = _free_port()
        self.running = False

    @property
    def dsn(self) -> str:
        return f"postgresql://{PG_OS_USER}@127.0.0.1:{self.port}/kinto"

    def init(self) -> None:
        _ensure_pg_dir(self.datadir)
        _run(
            _as_pg_user(
                [
                    PG_BIN / "initdb",
                    "-D",
                    self.datadir,
                    "-U",
                    PG_OS_USER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                ]
            ),
            cwd=self.datadir,
        )

    def start(self) -> None:
        opts = (
            f"-p {self.port} -k {self.datadir} -c listen_addresses=127.0.0.1 "
            "-c timezone=UTC -c log_timezone=UTC"
        )
        _run(
            _as_pg_user(
                [
                    PG_BIN / "pg_ctl",
                    "-D",
                    self.datadir,
                    "-l",
                    self.datadir / "server.log",
                    "-o",
                    opts,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            ),
            timeout=90,
            cwd=self.datadir,
        )
        self.running = True

    def stop(self) -> None:
        if not self.running:
            return
        try:
            _run(
                _as_pg_user(
                    [PG_BIN / "pg_ctl", "-D", self.datadir, "-m", "fast", "-w", "-t", "60", "stop"]
                ),
                timeout=90,
                cwd=self.datadir,
            )
        except (RuntimeError, subprocess.TimeoutExpired):
            pid_file = self.datadir / "postmaster.pid"
            if pid_file.exists():
                os.kill(int(pid_file.read_text().split()[0]), 9)
        self.running = False

    def psql(self, sql: str, db: str = "kinto", stdin: bytes | None = None) -> str:
        cmd: list[str | Path] = [
            PG_BIN / "psql",
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-At",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            PG_OS_USER,
            "-d",
            db,
            "-c",
            sql,
        ]
        return str(_run(cmd, timeout=900, input=stdin).stdout.decode())


class KintoServer:
    """``kinto start`` subprocess from the private virtualenv."""

    def __init__(self, bindir: Path, workdir: Path, dsn: str, max_fetch: int) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.ini = workdir / "kinto.ini"
        self.ini.write_text(
            KINTO_INI.format(dsn=dsn, max_fetch=max_fetch, batch_max=BATCH_CHUNK, port=self.port)
        )
        self.bindir = bindir
        self.log = workdir / "kinto.log"
        self.env = {**os.environ, "KINTO_INI": str(self.ini)}
        self.proc: subprocess.Popen[bytes] | None = None

    def migrate(self) -> None:
        _run([self.bindir / "kinto", "migrate", "--ini", self.ini], timeout=120, env=self.env)

    def start(self, timeout: float = 60.0) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.bindir / "kinto"), "start", "--ini", str(self.ini)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Kinto exited early:\n{self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.base}/v1/", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"Kinto did not answer within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)


def _strip(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k not in ("id", "last_modified")}


def _dataset_key(records: Sequence[dict[str, Any]]) -> str:
    digest = hashlib.sha256()
    for rec in records:
        digest.update(json.dumps(rec, sort_keys=True, separators=(",", ":")).encode())
    return f"{len(records)}-{digest.hexdigest()[:16]}"


def _copy_payload(records: Sequence[dict[str, Any]]) -> bytes:
    """CSV rows for ``objects`` in Kinto's storage format (id/last_modified out of data)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    now = datetime.now(UTC).replace(tzinfo=None)
    base = now - timedelta(milliseconds=len(records) + 1000)
    for i, rec in enumerate(records):
        stamp = (base + timedelta(milliseconds=i)).isoformat(sep=" ", timespec="milliseconds")
        writer.writerow(
            [
                rec["id"],
                COLLECTION,
                "record",
                stamp,
                json.dumps(_strip(rec), separators=(",", ":")),
                "f",
            ]
        )
    return buf.getvalue().encode()


def _build_cluster(
    target: Path, records: Sequence[dict[str, Any]], bindir: Path, workdir: Path
) -> None:
    """Create a cluster with Kinto's schema, bucket, collection and the bulk-loaded records."""
    pg = Postgres(target)
    kinto: KintoServer | None = None
    try:
        pg.init()
        pg.start()
        pg.psql("CREATE DATABASE kinto", db="postgres")
        kinto = KintoServer(bindir, workdir, pg.dsn, 10000)
        kinto.migrate()
        kinto.start()
        with httpx.Client(base_url=kinto.base, auth=AUTH, timeout=60) as client:
            client.put("/v1/buckets/b").raise_for_status()
            client.put(f"/v1{COLLECTION}").raise_for_status()
        kinto.stop()
        sql = (
            "SET session_replication_role = replica; "
            "COPY objects (id, parent_id, resource_name, last_modified, data, deleted) "
            "FROM STDIN WITH (FORMAT csv)"
        )
        pg.psql(sql, stdin=_copy_payload(records))
        pg.psql("VACUUM ANALYZE")
        pg.psql("CHECKPOINT")
    finally:
        if kinto is not None:
            kinto.stop()
        pg.stop()


def _prepare_cluster(
    records: Sequence[dict[str, Any]], bindir: Path, workdir: Path, notes: list[str]
) -> tuple[Path, float | None]:
    """Return a private copy of the cached loaded cluster (building it if missing)."""
    root = pg_root()
    _ensure_pg_dir(root)
    for stale in [*root.glob("run-*"), *root.glob("build-*")]:  # from interrupted runs
        if not (stale / "postmaster.pid").exists():
            shutil.rmtree(stale, ignore_errors=True)
    cached = root / f"loaded-{_dataset_key(records)}"
    load_seconds: float | None = None
    if not (cached / "PG_VERSION").exists():
        building = root / f"build-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        t0 = time.perf_counter()
        _build_cluster(building, records, bindir, workdir)
        load_seconds = time.perf_counter() - t0
        shutil.rmtree(cached, ignore_errors=True)
        building.rename(cached)
        olds = sorted(root.glob("loaded-*"), key=lambda p: p.stat().st_mtime)
        for old in [p for p in olds if p != cached][:-2]:
            shutil.rmtree(old, ignore_errors=True)
        notes.append(f"cold cache: cluster built and {len(records)} records bulk-loaded via COPY")
    else:
        os.utime(cached)
        notes.append("warm cache: reused the loaded cluster (copied, pristine)")
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=root))
    os.rmdir(run_dir)
    _run(["cp", "-a", cached, run_dir], timeout=600)
    return run_dir, load_seconds


def _sqlite_client(path: Path) -> sqlite3.Connection:
    path.unlink(missing_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(
        "CREATE TABLE local_appointment (id TEXT PRIMARY KEY, doctor_id INTEGER, "
        "patient_id INTEGER, hospital_id INTEGER, starts_at TEXT, ends_at TEXT, status TEXT, "
        "room TEXT, notes TEXT, patient_name TEXT, doctor_name TEXT, specialty_name TEXT, "
        "hospital_name TEXT)"
    )
    return conn


UPSERT = (
    f"INSERT INTO local_appointment ({', '.join(COLUMNS)}) VALUES "
    f"({', '.join('?' * len(COLUMNS))}) ON CONFLICT(id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[1:])
)


def _write_page(conn: sqlite3.Connection, rows: Iterable[dict[str, Any]]) -> None:
    conn.execute("BEGIN")
    conn.executemany(UPSERT, [tuple(r.get(c) for c in COLUMNS) for r in rows])
    conn.execute("COMMIT")


def _pull(
    client: httpx.Client,
    url: str,
    conn: sqlite3.Connection | None = None,
    keep_bodies: list[bytes] | None = None,
) -> dict[str, Any]:
    """Follow ``Next-Page`` from ``url``; optionally upsert each page into SQLite."""
    count = wire = pages = 0
    encodings: set[str] = set()
    ids: list[str] = []
    t0 = time.perf_counter()
    while url:
        resp = client.get(url)
        resp.raise_for_status()
        data = resp.json()["data"]
        if conn is not None:
            _write_page(conn, data)
        count += len(data)
        pages += 1
        wire += resp.num_bytes_downloaded
        encodings.add(resp.headers.get("Content-Encoding", "identity"))
        ids.extend(r["id"] for r in data)
        if keep_bodies is not None:
            keep_bodies.append(resp.content)
        url = resp.headers.get("Next-Page", "")
    seconds = time.perf_counter() - t0
    return {
        "records": count,
        "pages": pages,
        "seconds": round(seconds, 4),
        "records_per_s": round(count / seconds, 1) if seconds else None,
        "bytes": wire,
        "bytes_per_record": round(wire / count, 1) if count else None,
        "content_encoding": sorted(encodings),
        "_ids": ids,
    }


def _batch(client: httpx.Client, requests: list[dict[str, Any]], defaults: dict[str, Any]) -> None:
    for i in range(0, len(requests), BATCH_CHUNK):
        resp = client.post(
            "/v1/batch", json={"defaults": defaults, "requests": requests[i : i + BATCH_CHUNK]}
        )
        resp.raise_for_status()
        bad = [r["status"] for r in resp.json()["responses"] if r["status"] >= 300]
        if bad:
            raise RuntimeError(f"batch sub-requests failed with statuses {sorted(set(bad))}")


def _verify_load(client: httpx.Client, records: Sequence[dict[str, Any]]) -> None:
    resp = client.head(RECORDS_PATH)
    resp.raise_for_status()
    total = int(resp.headers.get("Total-Objects") or resp.headers["Total-Records"])
    if total != len(records):
        raise RuntimeError(f"Kinto reports {total} records, expected {len(records)}")
    for rec in random.Random(1).sample(list(records), min(5, len(records))):
        got = client.get(f"{RECORDS_PATH}/{rec['id']}")
        got.raise_for_status()
        if _strip(got.json()["data"]) != _strip(rec):
            raise RuntimeError(f"record {rec['id']} read back differs from the loaded one")


def run_kinto_peer(
    records: Sequence[dict[str, Any]],
    changes: Sequence[dict[str, Any]],
    workdir: Path,
    page_sizes: Sequence[int] = (1000, 5000, 10000),
    quick: bool = False,
) -> dict[str, Any]:
    """Benchmark Kinto 26 + PostgreSQL as a sync peer; return a JSON-serializable dict."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    repeats = 1 if quick else 3
    t_setup = time.perf_counter()
    bindir, version = ensure_kinto_venv()
    run_dir, load_seconds = _prepare_cluster(records, bindir, workdir, notes)
    pg = Postgres(run_dir)
    kinto = KintoServer(bindir, workdir, pg.dsn, max(10000, *page_sizes))
    result: dict[str, Any] = {
        "kinto_version": version,
        "records": len(records),
        "server": "kinto start (pserve + waitress, 4 threads), PostgreSQL 15",
        "cache_hit": load_seconds is None,
        "load_seconds": None if load_seconds is None else round(load_seconds, 2),
    }
    try:
        pg.start()
        kinto.start()
        headers = {"Accept-Encoding": "gzip"}
        with httpx.Client(base_url=kinto.base, auth=AUTH, headers=headers, timeout=300) as client:
            _verify_load(client, records)
            result["setup_seconds"] = round(time.perf_counter() - t_setup, 2)
            client.get(RECORDS_PATH, params={"_limit": 100}).raise_for_status()  # warm-up

            by_size: dict[str, dict[str, Any]] = {}
            for size in page_sizes:
                bodies: list[bytes] | None = [] if size == max(page_sizes) else None
                runs = []
                for rep in range(repeats):
                    stats = _pull(
                        client,
                        f"{RECORDS_PATH}?_limit={size}",
                        keep_bodies=bodies if rep == 0 else None,
                    )
                    if len(set(stats.pop("_ids"))) != len(records):
                        raise RuntimeError(f"pull at _limit={size} got {stats['records']} records")
                    runs.append(stats)
                stats = sorted(runs, key=lambda s: s["seconds"])[len(runs) // 2]
                stats["runs_seconds"] = [r["seconds"] for r in runs]
                if bodies:
                    gz = sum(len(gzip.compress(b, 6)) for b in bodies)
                    result["gzip_equivalent_bytes_per_record"] = round(gz / len(records), 1)
                by_size[str(size)] = stats
            best = max(by_size, key=lambda k: by_size[k]["records_per_s"] or 0)
            result["full_pull"] = {"page_size": int(best), **by_size[best], "by_page_size": by_size}
            if by_size[best]["content_encoding"] == ["identity"]:
                notes.append(
                    "Kinto/waitress sent uncompressed JSON despite Accept-Encoding: gzip "
                    "(compression would need a reverse proxy); see "
                    "gzip_equivalent_bytes_per_record"
                )

            conn = _sqlite_client(workdir / "kinto_client.sqlite")
            try:
                stats = _pull(client, f"{RECORDS_PATH}?_limit={best}", conn=conn)
                stats.pop("_ids")
                stored = conn.execute("SELECT count(*) FROM local_appointment").fetchone()[0]
                if stored != len(records):
                    raise RuntimeError(f"client SQLite has {stored} rows, not {len(records)}")
                result["full_pull_with_client"] = {"page_size": int(best), **stats}

                head = client.get(RECORDS_PATH, params={"_limit": 1})
                since = int(head.raise_for_status().headers["ETag"].strip('"'))
                _batch(
                    client,
                    [
                        {"path": f"{RECORDS_PATH}/{c['id']}", "body": {"data": _strip(c)}}
                        for c in changes
                    ],
                    {"method": "PUT"},
                )
                delta = _pull(client, f"{RECORDS_PATH}?_since={since}&_limit={best}", conn=conn)
                changed_ids = sorted(delta.pop("_ids"))
                if changed_ids != sorted(c["id"] for c in changes):
                    raise RuntimeError(
                        f"_since returned {len(changed_ids)} records, "
                        f"expected the {len(changes)} changed ones"
                    )
                for sample in changes[:1]:
                    row = conn.execute(
                        "SELECT notes, status, room FROM local_appointment WHERE id = ?",
                        (sample["id"],),
                    ).fetchone()
                    if row != (sample.get("notes"), sample.get("status"), sample.get("room")):
                        raise RuntimeError("delta was not applied to the client SQLite")
                result["delta"] = {
                    "changes": len(changes),
                    "seconds": delta["seconds"],
                    "ms": round(delta["seconds"] * 1000, 2),
                    "bytes": delta["bytes"],
                    "pages": delta["pages"],
                }
            finally:
                conn.close()

            n_new = 100 if quick else 500
            template = list(records[:n_new]) or [dict.fromkeys(COLUMNS, "")]
            new = [
                {**_strip(template[i % len(template)]), "notes": f"batch {i}"} for i in range(n_new)
            ]
            reqs = [{"path": f"{RECORDS_PATH}/{uuid.uuid4()}", "body": {"data": d}} for d in new]
            t0 = time.perf_counter()
            _batch(client, reqs, {"method": "PUT"})
            seconds = time.perf_counter() - t0
            result["batch_write"] = {
                "records": n_new,
                "requests_per_batch": BATCH_CHUNK,
                "seconds": round(seconds, 3),
                "records_per_s": round(n_new / seconds, 1),
            }
        notes.append(
            f"full pull: median of {repeats} run(s) per page size; timings include JSON "
            "decoding of every page; bytes are response bodies on the wire (no headers)"
        )
        notes.append(
            f"batch write: PUT of new records, {BATCH_CHUNK} sub-requests per POST /v1/batch"
        )
    finally:
        kinto.stop()
        pg.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    result["notes"] = notes
    return result


def synthetic_records(n: int, seed: int = 42) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Generate ``n`` appointment rows plus 100 changed versions of existing rows."""
    rng = random.Random(seed)
    first = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo"]
    last = ["Silva", "Smith", "Wang", "Okafor", "Novak", "Haddad", "Kim", "Berg", "Rossi"]
    specialties = ["cardiology", "dermatology", "neurology", "oncology", "pediatrics"]
    start = datetime(2025, 1, 6, 8, 0)
    records = []
    for _ in range(n):
        begin = start + timedelta(minutes=15 * rng.randrange(0, 50000))
        hospital = rng.randrange(1, 21)
        records.append(
            {
                "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "doctor_id": rng.randrange(1, 2001),
                "patient_id": rng.randrange(1, 200001),
                "hospital_id": hospital,
                "starts_at": begin.isoformat(),
                "ends_at": (begin + timedelta(minutes=30)).isoformat(),
                "status": rng.choice(["booked", "booked", "confirmed", "cancelled"]),
                "room": f"R{rng.randrange(100, 999)}",
                "notes": "" if rng.random() < 0.2 else f"follow-up {rng.getrandbits(64):x} results",
                "patient_name": f"{rng.choice(first)} {rng.choice(last)}",
                "doctor_name": f"Dr. {rng.choice(first)} {rng.choice(last)}",
                "specialty_name": rng.choice(specialties),
                "hospital_name": f"Hospital {hospital}",
            }
        )
    changes = [
        {**rec, "status": "rescheduled", "notes": f"moved {i}", "room": "R001"}
        for i, rec in enumerate(rng.sample(records, min(100, n)))
    ]
    return records, changes


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m bench.kinto_peer --records 5000``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--page-sizes", default="1000,5000,10000")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)
    records, changes = synthetic_records(args.records)
    sizes = tuple(int(s) for s in args.page_sizes.split(","))
    with tempfile.TemporaryDirectory(prefix="kinto-peer-") as tmp:
        workdir = args.workdir or Path(tmp)
        t0 = time.perf_counter()
        result = run_kinto_peer(records, changes, workdir, page_sizes=sizes, quick=args.quick)
        result["wall_seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
