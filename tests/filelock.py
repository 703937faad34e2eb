"""A lock shared by the test processes of one machine, for steps that must not run twice
at once: installing packages (``apt-get``, ``npm ci``) when parallel test workers
(``pytest -n``) reach them together."""

from __future__ import annotations

import fcntl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def held(name: str) -> Iterator[None]:
    """Hold the machine-wide lock ``name`` (a file in the temporary directory) until the
    block ends; another process asking for it waits."""
    path = Path(tempfile.gettempdir()) / f"syncunit-tests-{name}.lock"
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
