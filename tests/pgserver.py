"""A throwaway PostgreSQL server for the tests: ``initdb`` into a temporary directory.

One cluster per test session, on 127.0.0.1 and a free port, with durability
switched off (it is thrown away). Every test gets a fresh database of its own.
Its files go to a tmpfs (``/dev/shm``) when the machine has one with room:
making a database writes some 300 files, which on a busy disk took 0.2 s
against 0.015 s in memory (``SYNCUNIT_TEST_PG_DIR`` names another directory).
PostgreSQL refuses to run as root: under root the server runs as the
``postgres`` system user. When the server binaries are missing they are
installed with ``apt-get install postgresql`` (Debian, Ubuntu); where that is
impossible the PostgreSQL tests are skipped with the reason.

``python -m tests.pgserver`` starts one and prints its URL (until Ctrl-C).
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import psycopg

from tests.filelock import held

#: Where Debian and Ubuntu put the server binaries (newest first).
_DEBIAN_BINS = "/usr/lib/postgresql/*/bin"


#: A tmpfs, where a throwaway cluster's files go when it has ``_SHM_MIN_FREE`` free.
_SHM = "/dev/shm"
_SHM_MIN_FREE = 4 * 2**30


def scratch_dir() -> str | None:
    """Where throwaway clusters put their files: ``SYNCUNIT_TEST_PG_DIR``, else a
    tmpfs with room, else None (the system's temporary directory)."""
    chosen = os.environ.get("SYNCUNIT_TEST_PG_DIR")
    if chosen:
        return chosen
    try:
        st = os.statvfs(_SHM)
    except OSError:
        return None
    return _SHM if st.f_bavail * st.f_frsize >= _SHM_MIN_FREE else None


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries here, and they could not be installed."""


def find_bindir(*, install: bool = True) -> Path:
    """The directory holding ``initdb`` and ``postgres``; installs them if allowed and needed."""
    env = os.environ.get("SYNCUNIT_PG_BINDIR")
    if env:
        return Path(env)
    for _ in range(2):
        candidates = sorted(
            glob.glob(_DEBIAN_BINS), key=lambda p: int(p.split("/")[-2] or 0), reverse=True
        )
        for d in candidates:
            if Path(d, "initdb").exists():
                return Path(d)
        on_path = shutil.which("initdb")
        if on_path:
            return Path(on_path).parent
        if not install:
            break
        install = False
        _apt_install(["postgresql"])
    raise PostgresUnavailable(
        "no PostgreSQL server found: install Debian's 'postgresql' package"
        " (apt-get install postgresql) or set SYNCUNIT_PG_BINDIR to the directory of initdb"
    )


def _apt_install(packages: Sequence[str]) -> None:
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with held("apt"):  # parallel test workers would race for dpkg's lock
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
            subprocess.run(cmd, env=env, check=False, capture_output=True, timeout=600)


_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _worker_index() -> int:
    """This test worker's number under ``pytest -n`` (``gw3``: 3), 0 otherwise."""
    return int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)


def _worker_count() -> int:
    return max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


def free_port() -> int:
    """A port on 127.0.0.1 nothing listens on, for a server started next.

    Picked below the kernel's ephemeral range where it can be: a port from that
    range, closed here and bound by the server a moment later, could meanwhile be
    given to one of the test's outgoing connections. Never the same one twice in a
    session; parallel test workers (``pytest -n``) each pick from their own share of
    the range, so two of them never pick the same port at once.
    """
    low = _ephemeral_low()
    share = range(20000, low)[_worker_index() :: _worker_count()]
    candidates = random.sample(share, min(200, len(share))) if len(share) > 200 else []
    for port in candidates:
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    _HANDED_OUT.add(port)
    return port


def _run_as() -> str | None:
    """The user the server must run as: ``postgres`` under root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "postgres"], check=True, timeout=60
        )
    return "postgres"


class PostgresServer:
    """One throwaway cluster: ``start()``, ``create_database()``, ``stop()``."""

    def __init__(
        self,
        *,
        bindir: Path | None = None,
        port: int | None = None,
        settings: dict[str, str] | None = None,
        datadir: Path | None = None,
    ) -> None:
        self.bindir = bindir or find_bindir()
        self.port = port or free_port()
        self.user = _run_as()
        self.root = Path(tempfile.mkdtemp(prefix="syncunit-pg-", dir=scratch_dir()))
        self.datadir = datadir or self.root / "data"
        self.settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.root),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "400",
            "shared_buffers": "64MB",
            "max_prepared_transactions": "10",
            "wal_level": "replica",
            "max_wal_senders": "4",
            "log_min_messages": "warning",
            # Autovacuum's ANALYZE takes transaction ids at random moments: the cluster-wide
            # watermark would move between two syncs that a test expects to be identical.
            "autovacuum": "off",
            **(settings or {}),
        }
        self._names = itertools.count(1)
        self._chown(self.root)

    # -- processes ---------------------------------------------------------------------

    def _chown(self, path: Path) -> None:
        if self.user is not None:
            shutil.chown(path, self.user, self.user)

    def run(self, args: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
        """Run one of the server's programs (as the server's user)."""
        return subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            user=self.user,
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.root,
            **kw,  # type: ignore[call-overload]
        )

    def init(self) -> None:
        self.run(
            ["initdb", "-D", str(self.datadir), "-U", "postgres", "-A", "trust",
             "-E", "UTF8", "--locale=C", "--no-sync"]
        )  # fmt: skip
        with (self.datadir / "postgresql.auto.conf").open("a") as f:
            for k, v in self.settings.items():
                f.write(f"{k} = '{v}'\n")
        with (self.datadir / "pg_hba.conf").open("a") as f:
            f.write("host replication all 127.0.0.1/32 trust\n")

    def start(self) -> PostgresServer:
        if not (self.datadir / "PG_VERSION").exists():
            self.init()
        # On the command line: a copied data directory (a standby) keeps its own port.
        opts = f"-c port={self.port} -c unix_socket_directories={self.root}"
        self.run(
            ["pg_ctl", "-D", str(self.datadir), "-l", str(self.root / "log"), "-o", opts,
             "-w", "start"]
        )  # fmt: skip
        return self

    def standby(self) -> PostgresServer:
        """A streaming hot standby of this server (pg_basebackup over loopback), started."""
        replica = PostgresServer(bindir=self.bindir)
        replica.datadir = replica.root / "data"
        self.run(
            ["pg_basebackup", "-D", str(replica.datadir), "-h", "127.0.0.1", "-p",
             str(self.port), "-U", "postgres", "-X", "stream", "-R", "--no-sync",
             "--checkpoint=fast"]
        )  # fmt: skip
        return replica.start()

    def lsn(self) -> str:
        """The primary's WAL insert position (asynchronous commits: ahead of what is written)."""
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        assert row is not None
        return str(row[0])

    def wait_for_replay(self, lsn: str, timeout: float = 30.0) -> None:
        """Wait until this standby has replayed the primary's WAL up to ``lsn``."""
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            while True:
                row = conn.execute(
                    "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)
                ).fetchone()
                if row is not None and row[0]:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the standby did not replay up to {lsn}")
                time.sleep(0.02)

    def stop(self, *, remove: bool = True) -> None:
        if (self.datadir / "postmaster.pid").exists():
            self.run(["pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop"])
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        path = self.root / "log"
        return path.read_text() if path.exists() else ""

    # -- databases --------------------------------------------------------------------

    def dsn(self, database: str = "postgres") -> str:
        """A libpq connection string (for psycopg and the command line tools)."""
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={database}"

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str) -> None:
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def create_database(self, prefix: str = "test", *, template: str = "template0") -> str:
        """A new empty database; returns its name."""
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        self.admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return name

    def drop_database(self, name: str) -> None:
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def wait_until_ready(dsn: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(dsn, connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


if __name__ == "__main__":  # pragma: no cover
    pg = PostgresServer().start()
    print(pg.url(), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        pg.stop()
