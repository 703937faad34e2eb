"""Files a process holds (an ``flock``) for as long as it writes them, so that another
process can tell one still being written from one left by a process that died.

Used for the server's snapshot builds and the device's snapshot downloads and
installs. Without ``fcntl`` (not POSIX) nothing is locked, and no file is ever taken
for left behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["held_scratch", "unheld"]


def held_scratch(folder: Path, prefix: str, suffix: str) -> tuple[int, Path]:
    """A new file in ``folder``, and a descriptor holding its lock: close it when done.

    Made again if another process removed it between its making and its lock (a
    sweep that found it unheld).
    """
    while True:
        fd, name = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.path.samestat(os.fstat(fd), os.stat(name)):
                return fd, Path(name)
        except OSError:
            pass  # removed between its making and its lock: make another
        os.close(fd)


def unheld(path: Path) -> bool:
    """Whether no live process holds the lock of ``path`` (False if it is gone, or where
    there are no locks)."""
    if fcntl is None:  # pragma: no cover - no locks: never taken for left behind
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False  # gone already
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # a process is writing it
    finally:
        os.close(fd)
    return True
