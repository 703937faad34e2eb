"""The stable catalog of wire errors.

Each problem has a code that never changes meaning and a title a person can
read; responses are ``application/problem+json`` (RFC 9457) with no stack
traces. Per-mutation problems travel in push results, not as HTTP errors.
"""

from __future__ import annotations

from typing import NamedTuple

import msgspec
from starlette.responses import Response

from syncunit.protocol import PROBLEM, Problem


class Kind(NamedTuple):
    status: int
    title: str


PROBLEMS: dict[str, Kind] = {
    "unauthenticated": Kind(401, "Authentication required"),
    "forbidden": Kind(403, "Not allowed"),
    "missing-parameter": Kind(403, "The principal lacks a parameter this unit filters on"),
    "unknown-unit": Kind(404, "No such sync unit"),
    "malformed-request": Kind(400, "The request body could not be read"),
    "unsupported-protocol": Kind(400, "Unsupported protocol version"),
    "invalid-request": Kind(422, "The request is well-formed but not valid"),
    "sequence-gap": Kind(409, "Mutations are missing before these"),
    "schema-changed": Kind(409, "The server's schema changed; fetch the catalog again"),
    "body-too-large": Kind(413, "The request body is too large"),
    "too-many-mutations": Kind(413, "Too many mutations in one request"),
    "unsupported-media-type": Kind(415, "Unsupported content type or encoding"),
    "internal": Kind(500, "The server failed"),
    "busy": Kind(503, "Too many clients are waiting for live changes; try again later"),
}


def problem(code: str, detail: str = "") -> Problem:
    kind = PROBLEMS[code]
    return Problem(
        type=f"urn:syncunit:problem:{code}",
        title=kind.title,
        status=kind.status,
        code=code,
        detail=detail,
    )


def problem_response(code: str, detail: str = "") -> Response:
    p = problem(code, detail)
    return Response(msgspec.json.encode(p), status_code=p.status, media_type=PROBLEM)


class ProblemException(Exception):
    """Raised inside request handling; becomes a problem response."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
