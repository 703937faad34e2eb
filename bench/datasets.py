"""Generated hospital server databases, cached by size and copied per run.

Every appointment belongs to hospital 1, so the measured principal
(``token-h1``) has all of them in scope: N appointments means N
``LocalAppointment`` rows on the device.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import time
from pathlib import Path

from bench.env import EXAMPLES, cache_dir, ensure_paths

DOCTORS = 160


def _source_key() -> str:
    """Hash of the example's model and generator: a change invalidates the cache."""
    digest = hashlib.sha256()
    for name in ("models.py", "generate.py", "units.py"):
        digest.update((EXAMPLES / "hospital" / name).read_bytes())
    return digest.hexdigest()[:10]


def cached_server_db(appointments: int) -> tuple[Path, float | None]:
    """The cached server database with ``appointments`` rows; build it if missing.

    Returns the path and the build time in seconds (None on a cache hit).
    """
    path = cache_dir() / f"hospital-{appointments}-d{DOCTORS}-{_source_key()}.sqlite"
    if path.exists():
        return path, None
    ensure_paths()
    from hospital.generate import generate
    from hospital.server import build

    tmp = path.with_suffix(".building")
    _remove(tmp)
    started = time.perf_counter()
    server = build(f"sqlite:///{tmp}")
    generate(server.store.engine, appointments=appointments, hospitals=1, doctors=DOCTORS)
    server.store.engine.dispose()
    conn = sqlite3.connect(tmp)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    _remove(Path(f"{tmp}-wal"), Path(f"{tmp}-shm"))
    tmp.rename(path)
    for stale in cache_dir().glob(f"hospital-{appointments}-*.sqlite"):
        if stale != path:  # built from an older version of the example
            stale.unlink()
    return path, time.perf_counter() - started


def server_db_copy(
    appointments: int, workdir: Path, *, analyze: bool = False
) -> tuple[Path, float | None]:
    """A private copy of the cached database, free to mutate.

    With ``analyze`` the copy gets SQLite planner statistics (``ANALYZE``),
    which the library does not gather itself: a what-if for query plans.
    """
    source, built = cached_server_db(appointments)
    target = workdir / f"server-{appointments}.sqlite"
    _remove(target, Path(f"{target}-wal"), Path(f"{target}-shm"))
    shutil.copyfile(source, target)
    if analyze:
        conn = sqlite3.connect(target)
        conn.execute("ANALYZE")
        conn.commit()
        conn.close()
    return target, built


def _remove(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)
