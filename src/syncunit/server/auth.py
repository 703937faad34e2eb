"""Who is syncing: principals, pluggable authentication, signed tokens.

An authenticator takes the Starlette request and returns a ``Principal`` (or
None: 401). The principal's ``params`` fill the streams' row filters and write
rules, and its ``units`` (None: all) are the sync units it may run; the client
never sends filter values.

Two authenticators come built in: ``TokenAuth`` (opaque tokens looked up in a
mapping or a function, e.g. a token table) and ``JWTAuth`` (signed JSON Web
Tokens with an expiry, verified locally with PyJWT; keys rotate by ``kid``).
Any function ``request -> Principal | None`` works too; ``first_of`` tries
several in turn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from syncunit.clauses import json_bind_names, list_bind_names
from syncunit.protocol import INT64_MAX, INT64_MIN
from syncunit.server.limits import shorten
from syncunit.server.problems import ProblemException

if TYPE_CHECKING:
    from syncunit.units import Stream, SyncSchema, SyncUnit

__all__ = ["Authenticator", "JWTAuth", "Principal", "TokenAuth", "first_of"]


@dataclass(frozen=True)
class Principal:
    """An authenticated user.

    ``params`` are the values its row filters use; ``admin`` lets the principal
    read the inspector page (``/inspector``); ``units`` names the sync units it
    may run (None: every unit). A principal that loses a unit, or a parameter
    value, has what it may no longer hold removed on its next sync.
    ``admin`` and ``units`` are keyword-only: ``Principal("ana", {...}, units={"Login"})``.
    """

    id: str
    params: Mapping[str, Any] = field(default_factory=dict)
    _: KW_ONLY
    admin: bool = False
    units: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.units is not None and not isinstance(self.units, frozenset):
            object.__setattr__(self, "units", frozenset(self.units))

    def scope(self, stream: Stream, selection: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The values ``stream`` is read with: this principal's own, plus the client
        parameters ``stream`` itself declares, taken from ``selection`` (a unit opened
        on client parameters, already checked: they only narrow the scope).

        A value of ``selection`` that ``stream`` does not declare is not used, even if
        another stream of the unit declares it: it never replaces the principal's
        value of the same name. A name ``stream`` declares as a client parameter is
        never read from the principal, so a selection lacking it fails loudly.
        """
        own = {n: v for n, v in self.params.items() if n not in stream.client_params}
        chosen = selection or {}
        own.update((n, chosen[n]) for n in stream.client_params if n in chosen)
        return own


Authenticator = Callable[[Request], Principal | None]


def authorize_unit(principal: Principal, unit: SyncUnit, *, subscription: str = "") -> None:
    """Raise a 403 problem naming ``unit`` unless ``principal`` may run it (directly, or
    as the ``subscription`` of a request to another unit)."""
    if principal.units is not None and unit.name not in principal.units:
        asked = f" (asked as subscription {subscription!r})" if subscription else ""
        raise ProblemException(
            "unit-forbidden",
            f"principal {principal.id!r} may not run unit {unit.name!r}{asked}",
            unit=unit.name,
        )


def authorize_stream(principal: Principal, stream: Stream, params: Mapping[str, Any]) -> None:
    """Raise a 403 problem unless ``principal`` has the parameters ``stream`` filters on
    and the stream's ``authorize`` hook lets it read the stream with ``params`` (the
    client parameters of the request)."""
    missing = [p for p in stream.principal_parameters if p not in principal.params]
    if missing:
        raise ProblemException(
            "missing-parameter",
            f"stream {stream.name!r} filters on {', '.join(missing)}, which"
            f" principal {principal.id!r} does not have",
        )
    check_hook(principal, stream, params)


def check_hook(
    principal: Principal, stream: Stream, params: Mapping[str, Any], *, writing: bool = False
) -> None:
    """Raise a 403 problem unless the stream's ``authorize`` hook lets ``principal`` use
    it with ``params``: read it, or push to it (``writing``, with no client parameters:
    a pushing unit has none)."""
    if stream.authorize is None or stream.authorize(principal, dict(params)):
        return
    if writing:
        raise ProblemException(
            "forbidden", f"principal {principal.id!r} may not write to stream {stream.name!r}"
        )
    raise ProblemException(
        "forbidden",
        f"principal {principal.id!r} may not read stream {stream.name!r} with {dict(params)!r}",
    )


def bound_parameters(schema: SyncSchema) -> dict[str, bool]:
    """The principal parameters the schema's streams bind in their SQL (filters, joins,
    write rules, queries): name -> whether some stream binds it as a list (an ``IN``,
    an ``ARRAY``). Parameters typed JSON take any value: they are left out."""
    bound: dict[str, bool] = {}
    free: set[str] = set()
    for stream in schema.streams.values():
        clauses = [stream.where, *(j.on for j in stream.joins), stream.write_where, stream.query]
        lists = list_bind_names(*clauses)
        free |= json_bind_names(*clauses)
        for name in (*stream.parameters, *stream.write_parameters):
            if name not in stream.client_params:
                bound[name] = bound.get(name, False) or name in lists
    return {name: many for name, many in bound.items() if name not in free}


def _unbindable(value: Any, *, many: bool) -> str | None:
    """Why the database cannot take ``value`` for a parameter (``many``: one that a
    stream compares as a list), or None."""
    if isinstance(value, list | tuple | set | frozenset):
        if not many:
            return f"is a {type(value).__name__}, but the streams compare it to one value"
        for item in value:
            why = _unbindable(item, many=False)
            if why is not None:
                return f"holds an item that {why}"
        return None
    if isinstance(value, Mapping):
        return "is an object, which no stream can compare a column to"
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and not INT64_MIN <= value <= INT64_MAX
    ):
        return "is an integer outside the signed 64-bit range"
    return None


def unusable(principal: Principal, bound: Mapping[str, bool]) -> str | None:
    """Why the server cannot serve ``principal`` (said in the 403 and the log), or None.

    Parameters a stream binds (``bound``) must be values the database can compare:
    text, numbers, a 64-bit integer (or a list of such, where a stream takes a list).
    The others are the ``authorize`` hooks' to read, and may be anything."""
    if not isinstance(principal.id, str):
        return f"id is a {type(principal.id).__name__}"
    if not principal.id:
        return "id is empty"
    if "\x00" in principal.id:
        return "id holds the NUL character (U+0000)"
    for name, value in principal.params.items():
        values = value if isinstance(value, list | tuple | set | frozenset) else (value,)
        if any(isinstance(v, str) and "\x00" in v for v in values):
            return f"parameter {shorten(name, 60)} holds the NUL character (U+0000)"
        if name in bound:
            why = _unbindable(value, many=bound[name])
            if why is not None:
                return f"parameter {name!r} {why}"
    return None


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
        if token is None or len(token) > MAX_TOKEN_LENGTH:
            return None
        return self._lookup(token)


#: Longer bearer tokens are refused before any lookup or signature check.
MAX_TOKEN_LENGTH = 8192


def claims_principal(claims: Mapping[str, Any]) -> Principal | None:
    """The default mapping of verified JWT claims to a principal.

    ``sub`` is the id, ``params`` (an object) the filter values, ``units`` (a
    list, optional) the units it may run. Claims of another shape give None (401).
    """
    sub, params, units = claims.get("sub"), claims.get("params", {}), claims.get("units")
    if not isinstance(sub, str) or not isinstance(params, dict):
        return None
    if units is not None and not (
        isinstance(units, list) and all(isinstance(u, str) for u in units)
    ):
        return None
    return Principal(sub, params, units=None if units is None else frozenset(units))


class JWTAuth:
    """Signed bearer tokens (JSON Web Tokens), verified without a database.

    ``keys`` maps a key id to its verification key: an HMAC secret for
    ``HS256``, a public key (PEM) for ``RS256``/``ES256``/``EdDSA``. A token
    names its key in the ``kid`` header; to rotate, add the new key, sign new
    tokens with it, and remove the old one when its last token has expired.
    With a single key, tokens without ``kid`` use it.

    Every token must carry ``exp`` (and ``sub``); ``audience`` and ``issuer``
    are checked when given; ``leeway`` allows for clock skew. ``principal``
    turns the verified claims into a ``Principal`` (default: ``claims_principal``).
    """

    def __init__(
        self,
        keys: Mapping[str, Any],
        *,
        algorithms: Iterable[str] = ("HS256",),
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 30.0,
        principal: Callable[[Mapping[str, Any]], Principal | None] = claims_principal,
    ) -> None:
        import jwt  # the server extra installs PyJWT

        if not keys:
            raise ValueError("JWTAuth needs at least one key")
        self._jwt = jwt
        self.keys = dict(keys)
        self.algorithms = list(algorithms)
        if "none" in (a.lower() for a in self.algorithms):
            raise ValueError("the 'none' algorithm would accept unsigned tokens")
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self.principal = principal

    def __call__(self, request: Request) -> Principal | None:
        token = bearer_token(request)
        if token is None or len(token) > MAX_TOKEN_LENGTH:
            return None
        return self.verify(token)

    def verify(self, token: str) -> Principal | None:
        """The principal a token stands for, or None if it is not valid now."""
        jwt = self._jwt
        try:
            header = jwt.get_unverified_header(token)
            kid = header.get("kid")
            if kid is None and len(self.keys) == 1:
                key = next(iter(self.keys.values()))
            elif isinstance(kid, str) and kid in self.keys:
                key = self.keys[kid]
            else:
                return None
            claims = jwt.decode(
                token,
                key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "sub"]},
            )
        except jwt.PyJWTError:
            return None
        return self.principal(claims)


def first_of(*authenticators: Authenticator) -> Authenticator:
    """An authenticator that tries each of ``authenticators`` in turn."""

    def authenticate(request: Request) -> Principal | None:
        for auth in authenticators:
            principal = auth(request)
            if principal is not None:
                return principal
        return None

    return authenticate
