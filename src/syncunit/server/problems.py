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


#: What a device is told when the database ended the connection its request used.
DATABASE_LOST = "the server's database connection ended (a restart or a failover); retry shortly"


def database_lost(exc: BaseException) -> bool:
    """Whether ``exc`` is the database ending a connection (SQLAlchemy invalidated it):
    a ``database-unavailable`` problem, not a failure of the server's code."""
    return isinstance(exc, sa.exc.DBAPIError) and bool(exc.connection_invalidated)


#: What a device is told when the database stayed locked (SQLite: another process held
#: the write lock past the busy timeout).
DATABASE_LOCKED = "the server's database is locked by another writer; retry shortly"


def database_locked(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite's "database is locked" (another connection held the
    write lock past the busy timeout): a ``database-unavailable`` problem, retried."""
    orig = getattr(exc, "orig", None)
    return (
        isinstance(exc, sa.exc.OperationalError)
        and isinstance(orig, sqlite3.OperationalError)
        and str(orig).startswith("database is locked")
    )


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (a database error's own, without its SQL)."""
    text = str(getattr(exc, "orig", None) or exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__
