"""Who is syncing: principals and pluggable authentication.

An authenticator takes the Starlette request and returns a ``Principal`` (or
None: 401). The principal's ``params`` fill the streams' row filters; the
client never sends filter values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

__all__ = ["Authenticator", "Principal", "TokenAuth"]


@dataclass(frozen=True)
class Principal:
    """An authenticated user; ``params`` are the values its row filters use.

    ``admin`` lets the principal read the inspector page (``/inspector``).
    """

    id: str
    params: Mapping[str, Any] = field(default_factory=dict)
    admin: bool = False


Authenticator = Callable[[Request], Principal | None]


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class TokenAuth:
    """Bearer-token authentication from a mapping or a lookup function.

    ``TokenAuth({"secret": Principal("ana", {"hospital_id": 1})})``, or
    ``TokenAuth(lookup)`` where ``lookup(token)`` returns a principal or None
    (for example a query on a token table). Called in a worker thread.
    """

    def __init__(self, tokens: Mapping[str, Principal] | Callable[[str], Principal | None]) -> None:
        self._lookup: Callable[[str], Principal | None]
        if callable(tokens):
            self._lookup = tokens
        else:
            table = dict(tokens)
            self._lookup = table.get

    def __call__(self, request: Request) -> Principal | None:
        token = bearer_token(request)
        return None if token is None else self._lookup(token)
