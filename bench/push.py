"""The push scenario alone, on SQLite or PostgreSQL: ``python -m bench.push``.

Each run takes a fresh copy of the server database (``--rows`` appointments,
all in the measured user's scope), makes a device with a first sync, writes
``--mutations`` new appointments locally and pushes them in one unit run
(``scenarios.push``, the same code as ``bench.run``). Prints each run and the
median; ``--postgres URL`` runs the server on PostgreSQL instead: the database
named in the URL must exist and may be written; the runner creates the
databases ``syncunit_push_src`` (generated once) and ``syncunit_push_run``
(copied from it for every run) beside it. ``--refused`` measures a second push
of as many rows into the slots the first one booked: the double-booking rule
refuses every one (the batch fails, each mutation goes one by one and is
answered with its reason). Never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.env import ensure_paths

_SOURCE = "syncunit_push_src"
_RUN = "syncunit_push_run"


def _pg_database(url: str, rows: int) -> str:
    """A fresh copy of the generated PostgreSQL database for one run; its URL."""
    import psycopg
    import sqlalchemy as sa

    ensure_paths()
    from hospital.generate import generate
    from hospital.server import build

    from bench.datasets import DOCTORS

    base = sa.make_url(url)
    admin = base.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        have = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (_SOURCE,)).fetchone()
        if have is None:
            conn.execute(f"CREATE DATABASE {_SOURCE}")
            src = base.set(database=_SOURCE).render_as_string(hide_password=False)
            server = build(src)
            generate(server.store.engine, appointments=rows, hospitals=1, doctors=DOCTORS)
            server.store.engine.dispose()
        conn.execute(f"DROP DATABASE IF EXISTS {_RUN} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {_RUN} TEMPLATE {_SOURCE}")
    run = base.set(database=_RUN).render_as_string(hide_password=False)
    from syncunit.server.postgres import PostgresStore

    store = PostgresStore.from_url(run)
    store.renew_epoch()  # a copy: the server refuses it until told it is a new one
    store.engine.dispose()
    return run


def run_once(
    rows: int, mutations: int, postgres: str | None, refused: bool = False
) -> dict[str, Any]:
    """One push of ``mutations`` new rows against a fresh ``rows``-row server; with
    ``refused``, a second push of as many rows into the slots the first one booked,
    measured (the rule refuses every one)."""
    from bench import scenarios
    from bench.datasets import server_db_copy
    from bench.serverproc import ServerProcess

    work = Path(tempfile.mkdtemp(prefix="syncunit-push-"))
    try:
        url = _pg_database(postgres, rows) if postgres else None
        db = work / "unused.sqlite" if url else server_db_copy(rows, work)[0]
        with ServerProcess(db, url=url, log=work / "server.log") as server:
            scenarios.initial_sync(server, work / "device.sqlite", None)
            first = scenarios.push(server, work / "device.sqlite", mutations)
            if not refused:
                return first
            return scenarios.push(server, work / "device.sqlite", mutations, taken=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=100_000, help="appointments on the server")
    p.add_argument("--mutations", type=int, default=10_000, help="new rows pushed")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--postgres", help="a PostgreSQL URL: run the server there")
    p.add_argument(
        "--refused",
        action="store_true",
        help="measure a push the double-booking rule refuses as a whole",
    )
    args = p.parse_args(argv)
    ensure_paths()
    runs = []
    for _ in range(args.runs):
        out = run_once(args.rows, args.mutations, args.postgres, args.refused)
        runs.append(out)
        print(json.dumps(out), flush=True)
    rates = [r["mutations_per_s"] for r in runs if r.get("mutations_per_s")]
    load = os.getloadavg()[0]
    backend = "postgresql" if args.postgres else "sqlite"
    if rates:
        cpu = [r["server_cpu_s"] for r in runs], [r["client_cpu_s"] for r in runs]
        print(
            f"{backend}: median {statistics.median(rates):,.0f} mutations/s over {len(rates)}"
            f" runs ({', '.join(f'{r:,.0f}' for r in rates)}); CPU seconds median: server"
            f" {statistics.median(cpu[0])}, client {statistics.median(cpu[1])};"
            f" load average {load:.2f}"
        )
    return 0 if len(rates) == args.runs else 1


if __name__ == "__main__":
    raise SystemExit(main())
