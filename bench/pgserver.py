"""The hospital server databases on a throwaway PostgreSQL cluster, for the bench.

``PostgresDatasets`` starts one cluster (``initdb`` into a temporary
directory, 127.0.0.1 and a free port, as the ``postgres`` user under root),
generates the hospital data set of each size once into a template database
and hands out a fresh copy of it per scenario (``CREATE DATABASE ...
TEMPLATE``), so every scenario starts from the pristine data set, as the
SQLite bench works on a copy of a cached file. The cluster keeps PostgreSQL's
default durability (fsync and synchronous commit on), as a server would run.

``unavailable_reason()`` says why the bench cannot run PostgreSQL here (no
server binaries, no psycopg), or None. Any scenario can use it:

    with PostgresDatasets(workdir) as pg:
        url = pg.database(100_000)        # a private, mutable copy
        with ServerProcess(url) as server:
            ...
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from bench.datasets import DOCTORS
from bench.env import ensure_paths

#: The server binaries (Debian's layout); ``SYNCUNIT_PG_BIN`` overrides, as for Kinto.
PG_BIN = Path(os.environ.get("SYNCUNIT_PG_BIN", "/usr/lib/postgresql/15/bin"))
OS_USER = "postgres"


def unavailable_reason() -> str | None:
    """Why PostgreSQL figures cannot be taken on this machine, or None when they can."""
    if not (PG_BIN / "initdb").exists() or not (PG_BIN / "pg_ctl").exists():
        return f"no PostgreSQL server binaries in {PG_BIN} (set SYNCUNIT_PG_BIN)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg 3 is not installed (pip install 'syncunit[postgres]')"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(OS_USER)
        except KeyError:
            return f"running as root and there is no {OS_USER!r} user to run the server as"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresDatasets:
    """A throwaway cluster holding one template database per data-set size."""

    def __init__(self, workdir: Path | None = None) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        self.user = OS_USER if os.geteuid() == 0 else None
        self.root = Path(tempfile.mkdtemp(prefix="syncunit-bench-pg-", dir=workdir))
        if self.user is not None:
            shutil.chown(self.root, self.user, self.user)
            os.chmod(self.root, 0o755)
            for parent in self.root.parents:  # the server must reach its directory
                if parent == Path("/") or os.stat(parent).st_mode & 0o001:
                    break
                os.chmod(parent, os.stat(parent).st_mode | 0o001)
        self.datadir = self.root / "data"
        self.port = _free_port()
        self.running = False
        self._templates: dict[int, float] = {}  # size -> seconds to generate
        self._names = itertools.count(1)

    # -- the cluster ---------------------------------------------------------------------

    def _run(self, *args: str, timeout: float = 300) -> str:
        proc = subprocess.run(
            [str(PG_BIN / args[0]), *args[1:]],
            # The server's own user and group alone: root's group would deny it the path.
            user=self.user,
            group=self.user,
            extra_groups=[] if self.user else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {proc.stderr[-1500:]}")
        return proc.stdout

    def start(self) -> PostgresDatasets:
        self._run(
            "initdb", "-D", str(self.datadir), "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        opts = (
            f"-c port={self.port} -c listen_addresses=127.0.0.1"
            f" -c unix_socket_directories={self.root} -c max_connections=100"
            " -c timezone=UTC -c log_min_messages=warning"
        )
        self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.root / "log"),
                  "-o", opts, "-w", "-t", "60", "start", timeout=90)  # fmt: skip
        self.running = True
        return self

    def stop(self) -> None:
        if self.running:
            try:
                self._run("pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "-t", "60",
                          "stop", timeout=90)  # fmt: skip
            except (RuntimeError, subprocess.TimeoutExpired):
                pid_file = self.datadir / "postmaster.pid"
                if pid_file.exists():
                    os.kill(int(pid_file.read_text().split()[0]), 9)
            self.running = False
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresDatasets:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- databases -----------------------------------------------------------------------

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of ``database`` (what ``ServerProcess`` and the store take)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def dsn(self, database: str) -> str:
        """The libpq connection string of ``database`` (for psycopg)."""
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={database}"

    def sql(self, statement: str, database: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.dsn(database), autocommit=True) as conn:
            conn.execute(statement)  # type: ignore[arg-type]

    def generated_seconds(self, appointments: int) -> float | None:
        """How long the template of this size took to generate (None: not built yet)."""
        return self._templates.get(appointments)

    def database(self, appointments: int) -> str:
        """A fresh copy of the data set with ``appointments`` rows; returns its URL.

        The first call for a size generates the template (the same generator,
        seed and sizes as the SQLite bench: ``bench.datasets``) and gathers
        planner statistics, as autovacuum would on a server in service.
        """
        template = f"hospital_{appointments}"
        if appointments not in self._templates:
            ensure_paths()
            from hospital.generate import generate
            from hospital.server import build

            t0 = time.perf_counter()
            self.sql(f'CREATE DATABASE "{template}"')
            server = build(self.url(template))
            generate(server.store.engine, appointments=appointments, hospitals=1, doctors=DOCTORS)
            server.store.engine.dispose()
            self.sql("VACUUM ANALYZE", template)
            self.sql("CHECKPOINT")
            self._templates[appointments] = time.perf_counter() - t0
        name = f"run_{appointments}_{next(self._names)}"
        self.sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        # A copy is another database to the store (it would refuse to serve it as
        # restored): give it its own epoch, as an operator does after a restore.
        from syncunit.server.backends import open_store

        store = open_store(self.url(name))
        try:
            store.renew_epoch()
        finally:
            store.engine.dispose()
        return self.url(name)

    def drop(self, url: str) -> None:
        """Drop a copy handed out by ``database``."""
        self.sql(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
