"""The one exception tree of syncunit.

    SyncUnitError
    ├── DeclarationError     a table, stream or unit is declared wrongly
    ├── ProtocolError        a wire message could not be read (malformed, wrong version),
    │                        or the URL leads to something else than a syncunit server
    ├── LocalStoreError      the client's local database cannot do what was asked
    │                        (retryable when busy, locked, full or failing I/O)
    ├── DatabaseRestored     the server's database is a restored copy: renew its epoch first
    ├── DatabaseTooNew       a newer syncunit migrated the server's database: run that one
    └── SyncError            a sync run failed
        ├── NetworkError         the server could not be reached or the stream was cut: retryable
        ├── SyncCancelled        close() stopped the run: the unit stays queued, nothing is lost
        ├── DeviceBusy           another sync of the device's database held on too long: retryable
        └── ProblemError         the server answered with an application/problem+json error
            ├── AuthError            401 or 403: not retried (code token-provider: the
            │                        device's token provider failed: retried)
            ├── UnknownUnitError     404: the unit does not exist on the server
            └── RequestRejected      400, 413, 415, 422: the request itself is wrong: not retried

Library code translates sqlite3, SQLAlchemy and httpx exceptions at the boundary
(``raise ... from exc``) so callers only ever catch these.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthError",
    "DatabaseRestored",
    "DatabaseTooNew",
    "DeclarationError",
    "DeviceBusy",
    "LocalStoreError",
    "NetworkError",
    "ProblemError",
    "ProtocolError",
    "RequestRejected",
    "SyncCancelled",
    "SyncError",
    "SyncUnitError",
    "UnknownUnitError",
]


class SyncUnitError(Exception):
    """Base class of every error syncunit raises."""


class DatabaseRestored(SyncUnitError):
    """The server's database is a restored or copied one (a backup, another cluster).

    Serving it as it is would let clients skip or resurrect rows; renewing its
    epoch (``syncunit renew-epoch``, ``ServerStore.renew_epoch()``) makes every
    client re-download instead.
    """


class DatabaseTooNew(SyncUnitError):
    """A newer syncunit migrated the server's database past the migrations this one knows.

    This version refuses to install on it (it would take the newer tracking for
    tampered, re-install its own and reset every stream): serve it with the
    newer version, and stop servers of older versions before such an upgrade.
    """


class DeclarationError(SyncUnitError):
    """A tracked table, stream or sync unit is declared in a way that cannot work."""


class ProtocolError(SyncUnitError):
    """A wire message is malformed or speaks an unsupported protocol version."""


#: SQLite's primary result codes of causes that pass: the database busy or locked (an
#: app's write transaction held past the busy timeout), a full disk, an I/O error.
TRANSIENT_SQLITE_CODES = frozenset({5, 6, 10, 13})  # BUSY, LOCKED, IOERR, FULL


class LocalStoreError(SyncUnitError):
    """The client's local SQLite database refused an operation.

    ``retryable`` is true when the cause may pass by itself: the database was busy
    or locked (another connection's write transaction held it past the busy
    timeout), the disk was full, or an I/O error. The background worker then keeps
    the unit queued and tries it again after its backoff, as for a network error.
    """

    @property
    def retryable(self) -> bool:
        """Whether trying again later can help (read from the driver error behind it)."""
        cause, seen = self.__cause__, 0
        while cause is not None and seen < 8:  # a LocalStoreError may wrap another
            code = getattr(cause, "sqlite_errorcode", None)
            if isinstance(code, int):  # extended codes carry the primary one in the low byte
                return code & 0xFF in TRANSIENT_SQLITE_CODES
            cause, seen = cause.__cause__, seen + 1
        return False


class SyncError(SyncUnitError):
    """A sync run failed; ``retryable`` says whether trying again later can help."""

    retryable: bool = False


class NetworkError(SyncError):
    """The server was unreachable, or the connection broke mid-sync."""

    retryable = True


class DeviceBusy(SyncError):
    """Another sync of the same device database (another client object, another
    process) ran longer than ``lock_timeout``: the runs of one database take turns.
    Nothing was read or written; the message says who holds the database."""

    retryable = True


class SyncCancelled(SyncError):
    """``close()`` stopped the run before it ended: the chunks it applied stay, its
    changes wait in the outbox, and a queued unit stays queued for the next ``start()``.
    Not a failure: ``on_error`` is not called."""


class ProblemError(SyncError):
    """The server answered with a problem document (RFC 9457), or with an error that is
    not one (a proxy's page: ``code`` is the client's own ``http-error``)."""

    def __init__(self, status: int, code: str, title: str, detail: str = "", **extra: Any) -> None:
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail
        self.extra = extra
        self.retryable = status >= 500 or status == 429 or code == "schema-changed"
        message = f"{status} {code}: {title}"
        if detail:
            message += f" ({detail})"
        super().__init__(message)


class AuthError(ProblemError):
    """The server refused the credentials (401) or the action (403)."""


class UnknownUnitError(ProblemError):
    """The server has no sync unit of that name (404)."""


class RequestRejected(ProblemError):
    """The server rejected the request as malformed or too large."""


def problem_error(
    status: int, code: str, title: str, detail: str = "", **extra: Any
) -> ProblemError:
    """Build the most specific ``ProblemError`` subclass for an HTTP status."""
    cls: type[ProblemError]
    if status in (401, 403):
        cls = AuthError
    elif status == 404 and code.startswith("unknown-"):
        cls = UnknownUnitError
    elif status in (400, 409, 413, 415, 422) and code != "schema-changed":
        cls = RequestRejected
    else:
        cls = ProblemError
    return cls(status, code, title, detail, **extra)
