"""One sync at a time per device database, whichever object or process runs it.

A sync run reads the device's state (cursors, the outbox, the catalog) and writes
back what the server answered. Two runs on one database file at once (two
``SyncClient`` objects, or an app and a background service in two processes)
would each write back without seeing the other's answer: an older chunk applied
after a newer one under a newer cursor, a pull read before a push undoing it.
So every run takes ``DeviceLock`` first, and a second one waits for it.

The lock is an exclusive advisory lock on a file beside the database,
``<database>.syncunit-lock`` (``flock``; ``msvcrt.locking`` on Windows). It locks
between open files, so it also keeps apart two objects of one process; a thread
lock of the store object keeps apart its own threads (the file is locked once per
object). It is not a SQLite lock: the app's reads and writes never wait for it.
A database in memory is seen by one connection only: the thread lock is enough.
The file holds a line saying who holds it, for the error of a run that waited too
long; it stays beside the database (it is empty of data, and a lock on a file
that is removed and made again would not keep two holders apart).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from syncunit.errors import DeviceBusy, SyncCancelled

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]
try:
    import msvcrt
except ImportError:
    msvcrt = None  # type: ignore[assignment]

__all__ = ["LOCK_SUFFIX", "DeviceLock"]

#: The lock file's name is the database file's name with this added.
LOCK_SUFFIX = ".syncunit-lock"
#: Where the byte locked on Windows lies (its locks forbid reading what they cover).
_WINDOWS_OFFSET = 1 << 20
#: Longest pause between two tries for a lock another process holds (seconds).
_LONGEST_PAUSE = 0.05


class DeviceLock:
    """The exclusive lock of one device database's sync runs (see the module).

    Reentrant on the thread that holds it: a run that calls another step
    holding it (a catalog fetch) does not wait for itself.
    """

    def __init__(self, database: Path | None) -> None:
        #: The lock file (None: a database in memory, this object's lock only).
        self.path = None if database is None else database.with_name(database.name + LOCK_SUFFIX)
        self._mutex = threading.Lock()
        self._owner: int | None = None
        self._depth = 0
        self._fd: int | None = None
        self._what = ""

    @contextmanager
    def held(
        self, what: str, timeout: float, cancel: threading.Event | None = None
    ) -> Iterator[bool]:
        """Hold the lock for ``what`` (a run, said in an error of whoever waits for it);
        yields whether this call took it (False: this thread held it already).

        Waits at most ``timeout`` seconds, then raises ``DeviceBusy`` naming the
        holder; raises ``SyncCancelled`` as soon as ``cancel`` is set while waiting.
        """
        me = threading.get_ident()
        if self._owner == me:
            self._depth += 1
            try:
                yield False
            finally:
                self._depth -= 1
            return
        deadline = time.monotonic() + timeout
        self._take_mutex(what, deadline, cancel)
        try:
            self._fd = self._take_file(what, deadline, cancel)
        except BaseException:
            self._mutex.release()
            raise
        self._owner, self._what = me, what
        try:
            yield True
        finally:
            self._owner, self._what = None, ""
            fd, self._fd = self._fd, None
            try:
                if fd is not None:
                    _unlock(fd)
            finally:
                self._mutex.release()

    def holder(self) -> str:
        """Who holds the lock, as its holder wrote it (empty if unknown)."""
        if self._owner is not None and self._what:
            return f"{self._what} (this process, another thread)"
        if self.path is None:
            return ""
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                return f.read(500).strip()
        except OSError:
            return ""

    def _take_mutex(self, what: str, deadline: float, cancel: threading.Event | None) -> None:
        while not self._mutex.acquire(timeout=min(0.1, max(0.0, deadline - time.monotonic()))):
            self._check(what, deadline, cancel)

    def _take_file(self, what: str, deadline: float, cancel: threading.Event | None) -> int | None:
        if self.path is None or (fcntl is None and msvcrt is None):
            return None
        pause = 0.002
        while True:
            fd = _open(self.path)
            try:
                if _try_lock(fd) and _same_file(fd, self.path):
                    _describe(fd, what)
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            self._check(what, deadline, cancel, pause)
            pause = min(pause * 2, _LONGEST_PAUSE)

    def _check(
        self, what: str, deadline: float, cancel: threading.Event | None, pause: float = 0.0
    ) -> None:
        if cancel is not None and cancel.is_set():
            raise SyncCancelled(f"{what} was cancelled by close() while it waited for the device")
        if time.monotonic() >= deadline:
            holder = self.holder() or "another sync of this database"
            where = "" if self.path is None else f" (lock file {self.path})"
            raise DeviceBusy(
                f"{what} waited too long for another sync of the same device database"
                f" to end{where}: held by {holder}. Runs of one database take turns;"
                " try again later, or raise lock_timeout"
            )
        if pause:
            if cancel is not None:
                cancel.wait(pause)
            else:
                time.sleep(pause)


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise DeviceBusy(f"cannot open the device's lock file {path}: {exc}") from exc


def _try_lock(fd: int) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise DeviceBusy(f"cannot lock the device's lock file: {exc}") from exc
        return True
    os.lseek(fd, _WINDOWS_OFFSET, os.SEEK_SET)  # pragma: no cover - Windows
    try:  # pragma: no cover - Windows
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:  # pragma: no cover - Windows
        return False
    return True  # pragma: no cover - Windows


def _unlock(fd: int) -> None:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        else:  # pragma: no cover - Windows
            os.lseek(fd, _WINDOWS_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path`` (removed meanwhile: lock the new one)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _describe(fd: int, what: str) -> None:
    """Write who holds the lock into its file (for the error of a run that waits)."""
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    text = (
        f"{what}, in process {os.getpid()} ({program}), thread"
        f" {threading.current_thread().name}, since {since} UTC\n"
    )
    try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, text.encode())
    except OSError:
        pass  # only the error message of a waiting run would be vaguer
