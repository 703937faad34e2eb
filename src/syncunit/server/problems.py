"""Problem responses from the stable catalog of wire errors (``PROBLEM_CODES``).

The catalog lives in the protocol module, so the client imports the codes too.
Each problem has a code that never changes meaning and a title a person can
read; responses are ``application/problem+json`` (RFC 9457) with no stack
traces. Per-mutation problems travel in push results, not as HTTP errors.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from typing import NamedTuple

import msgspec
import sqlalchemy as sa
from starlette.responses import Response

from syncunit.protocol import PROBLEM, PROBLEM_CODES, Problem


class Kind(NamedTuple):
    status: int
    title: str


PROBLEMS: dict[str, Kind] = {code: Kind(*kind) for code, kind in PROBLEM_CODES.items()}


def problem(code: str, detail: str = "", *, unit: str = "", subscription: str = "") -> Problem:
    kind = PROBLEMS[code]
    return Problem(
        type=f"urn:syncunit:problem:{code}",
        title=kind.title,
        status=kind.status,
        code=code,
        detail=detail,
        unit=unit,
        subscription=subscription,
    )


def problem_response(
    code: str,
    detail: str = "",
    headers: Mapping[str, str] | None = None,
    *,
    unit: str = "",
    subscription: str = "",
) -> Response:
    p = problem(code, detail, unit=unit, subscription=subscription)
    return Response(
        msgspec.json.encode(p), status_code=p.status, media_type=PROBLEM, headers=headers
    )


class ProblemException(Exception):
    """Raised inside request handling; becomes a problem response (``unit``: the
    unit it is about, for the device to act on, e.g. the one a ``unit-forbidden`` names;
    ``subscription``: the id of the request's subscription it refuses)."""

    def __init__(
        self,
        code: str,
        detail: str = "",
        *,
        headers: Mapping[str, str] | None = None,
        unit: str = "",
        subscription: str = "",
    ) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.headers = dict(headers or {})
        self.unit = unit
        self.subscription = subscription


#: What a device is told when the database ended the connection its request used, or
#: none could be made.
DATABASE_LOST = (
    "the server's database connection ended or could not be made (a restart, a failover"
    " or the database down); retry shortly"
)


def database_lost(exc: BaseException) -> bool:
    """Whether ``exc`` is the database ending a connection (SQLAlchemy invalidated it) or
    refusing a new one (down, restarting, not accepting connections): a
    ``database-unavailable`` problem, not a failure of the server's code."""
    if not isinstance(exc, sa.exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    # psycopg's error for a connection that could not be made carries no SQLSTATE (the
    # server sent none: refused, or a FATAL at startup); every error of a session has one.
    orig = exc.orig
    return (
        isinstance(exc, sa.exc.OperationalError)
        and type(orig).__module__.startswith("psycopg")
        and getattr(orig, "sqlstate", "") is None
    )


#: What a device is told when the database could not take its request for now (a lock
#: held past a timeout, a statement cancelled, a disk or memory full).
DATABASE_BUSY = "the server's database could not take the request for now ({why}); retry shortly"

#: SQLite result codes (``sqlite_errorname``, extended codes by their prefix) of a
#: failure that passes with time: another writer's lock, a full disk, an I/O error.
_SQLITE_BUSY = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL", "SQLITE_IOERR", "SQLITE_NOMEM")
#: PostgreSQL SQLSTATEs of the same: a lock not granted in time (55P03), a statement
#: cancelled (57014: statement_timeout, pg_cancel_backend), idle in transaction too long
#: (25P03); classes 53 (insufficient resources: disk, memory, connections), 57P (the
#: server shutting down or starting) and 58 (I/O).
_PG_BUSY = ("55P03", "57014", "25P03")
_PG_BUSY_CLASSES = ("53", "57P", "58")


#: Why syncunit's own tables are not there: a device is told both possibilities, and so
#: is the operator (a server started with ``install=False`` whose migration was never
#: run looks, from the database, exactly like a restore under way).
TABLES_MISSING = (
    "syncunit's tables are missing: tracking is not installed (run the install or its"
    " migration) or the database is being restored"
)


class TrackingMissing(RuntimeError):
    """The database holds no tracking (never installed, or a restore is under way)."""


def database_busy(exc: BaseException) -> str | None:
    """Why ``exc`` is the database failing for now, not the request (SQLite locked or
    full, a PostgreSQL lock or statement timeout, a cancelled statement, a full disk,
    SQLAlchemy's pool exhausted); None for any other error. Such a failure is a
    ``database-unavailable`` problem the device retries, never a change's rejection."""
    if isinstance(exc, sa.exc.TimeoutError):
        return "no database connection free in time"
    if isinstance(exc, TrackingMissing):
        return f"{exc} (or the database is being restored)"
    if not isinstance(exc, sa.exc.DBAPIError):
        return None
    orig = exc.orig
    # syncunit's own tables gone: never installed, or the database is being restored (or
    # was replaced). The message's first line names the table (PostgreSQL's further
    # lines quote the SQL).
    said = first_line(exc)
    gone = said.startswith("no such table: syncunit_") or (
        getattr(orig, "sqlstate", None) == "42P01" and said.startswith('relation "syncunit_')
    )
    if gone:
        return f"{TABLES_MISSING} ({said})"
    if isinstance(orig, sqlite3.Error):
        name = getattr(orig, "sqlite_errorname", "") or ""
        busy = name.startswith(_SQLITE_BUSY) or str(orig).startswith("database is locked")
        return first_line(exc) if busy else None
    state = getattr(orig, "sqlstate", None) or ""
    if state in _PG_BUSY or state.startswith(_PG_BUSY_CLASSES):
        return first_line(exc)
    return None


def failure_cause(exc: BaseException) -> str:
    """What a log line says of a database failure: its first line, with the cause a
    device is told when that says more (syncunit's tables missing, the pool exhausted)."""
    said = first_line(exc)
    busy = None if database_lost(exc) else database_busy(exc)
    if busy is None or said in busy:
        return busy or said
    return f"{said} ({busy})"


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (a database error's own, without its SQL)."""
    text = str(getattr(exc, "orig", None) or exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__
