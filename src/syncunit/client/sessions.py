"""Sessions on a shared device: logging a principal out, and its parked changes.

The server binds a client id to the first principal that pushes from it. A
logout therefore gives the device a new client id; what the old session could
not push is parked (``Outbox.park``) under its old id, out of the next
principal's sight, and offered to the server again at each ``login``: the
server accepts it only from the principal it is bound to. A session that never
pushed is bound to nobody yet, so it is offered only with the same token (a token
provider is asked for it, at logout and at login); one whose token cannot be
known (no token, a provider that fails) stays parked.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from functools import cached_property
from typing import TYPE_CHECKING

import httpx

from syncunit.client.outbox import Budget
from syncunit.client.prefetch import FramePrefetch
from syncunit.client.run import syncunit_answer, too_large, too_large_reason
from syncunit.errors import (
    AuthError,
    LocalStoreError,
    NetworkError,
    ProblemError,
    RequestRejected,
    SyncError,
    problem_error,
)
from syncunit.protocol import (
    PROTOCOL_VERSION,
    Catalog,
    Encoding,
    Failure,
    Mutation,
    MutationResult,
    PushResults,
    SyncRequest,
    UnitInfo,
    content_type,
    encode_request,
)

if TYPE_CHECKING:
    from syncunit.client.client import SyncClient

__all__ = ["logout", "push_parked", "push_units", "token_problem"]

log = logging.getLogger("syncunit.client")

#: Refusals of a parked push that say the device's catalog is not the server's.
STALE_CATALOG = frozenset({"schema-changed", "unknown-unit"})


def token_problem(token: object) -> str | None:
    """What keeps ``token`` from going out as ``Authorization: Bearer <token>``, or None.

    A bearer token is non-empty ASCII text, without control characters (a line break,
    say) and without spaces at either end; the token itself is never quoted back.
    """
    if not isinstance(token, str):
        return f"the token is a {type(token).__name__}, not text"
    if not token.strip():
        return "the token is empty" if not token else "the token is only whitespace"
    for i, c in enumerate(token):
        if not c.isascii():
            return (
                f"the token holds the non-ASCII character U+{ord(c):04X} at position {i};"
                " a bearer token is ASCII text"
            )
        if c < " " or c == "\x7f":
            return (
                f"the token holds the control character U+{ord(c):04X} at position {i},"
                " as a line break read with it from a file would"
            )
    if token != token.strip():
        return "the token starts or ends with a space (strip it)"
    return None


def logout(client: SyncClient, *, clear: bool, push: bool) -> int:
    """``SyncClient.logout``: end the session; return how many changes were kept."""
    if client._sync_owner == threading.get_ident():
        raise SyncError("logout() cannot be called from inside a sync (a callback)")
    if client._live is not None:
        client._live.stop()
        client._live = None
    client.scheduler.stop(None)
    catalog = client.store.catalog()
    if push and catalog is not None and client.outbox.count():
        for unit in push_units(catalog):
            try:
                client.sync(unit.name)
            except SyncError as exc:
                log.info("logout: pending changes kept for later (%s)", exc)
                break
    streams = [] if catalog is None else catalog.streams
    with client._exclusive("logout"), client.store.atomic():
        try:
            kept = client.outbox.park(streams, client.client_id)
        except LocalStoreError as exc:  # e.g. a synced column the app renamed
            raise LocalStoreError(f"the session was not ended: {exc}") from exc
        if kept:
            # A session the server never saw push is bound to no principal: only the
            # same token may push it later (it would be taken by anyone otherwise).
            bound = client.store.get_fact("bound") == client.client_id
            owner = "" if bound else (_credential_digest(client) or UNOWNED)
            client.store.set_fact(f"parked:{client.client_id}", owner)
            # Who the server said this session is: the same principal is known again
            # with any credential, and its conflicts come back without a push.
            tag = client._session_principal()
            if tag is not None:
                client.store.set_fact(f"parked-tag:{client.client_id}", tag)
        client.client_id = client.store.end_session(clear=clear)
    client._set_token(None)
    return kept


def push_parked(client: SyncClient) -> int:
    """``SyncClient.push_parked``: push the parked changes this principal owns, and bring
    back into sight the conflicts and rejections of its sessions (one run of the
    database: see ``devicelock.py``)."""
    with client._exclusive("push of parked changes"):
        return _push_parked(client)


def _push_parked(client: SyncClient) -> int:
    catalog = client.store.catalog()
    if catalog is None:
        return 0
    units = push_units(catalog)
    applied = 0
    me = _Me(client)
    migrated = False
    for client_id in client.outbox.parked():
        mutations = client.outbox.parked_mutations(client_id)
        owner = client.store.get_fact(f"parked:{client_id}")
        if owner is None:
            continue
        tag = client.store.get_fact(f"parked-tag:{client_id}")
        # A tag only ever adds a match: one that differs from the current principal's
        # (the server's key may have changed since) falls back to the rules before it.
        tagged = tag is not None and tag == me.tag
        if tagged and not mutations:
            # Only conflicts and rejections: nothing to push, and the server has said
            # this principal is the session's own.
            _bring_back(client, client_id)
            continue
        if not tagged and owner != "" and owner != me.digest:
            continue  # unbound: only the same token may push it (bound, the server checks)
        if not mutations:
            continue
        mine = tagged or (owner != "" and owner == me.digest)
        try:
            try:
                applied += _offer_session(client, client_id, catalog, units, mine)
            except ProblemError as exc:
                if exc.code not in STALE_CATALOG or migrated:
                    raise
                # Parked under a catalog the server no longer has (its hash, or the
                # unit it named, is gone): migrate to the server's, as a sync does,
                # then send them again, once.
                migrated = True
                catalog = client._catalog(refresh=True)
                units = push_units(catalog)
                applied += _offer_session(client, client_id, catalog, units, mine)
        except ProblemError as exc:
            if exc.retryable:  # the server is busy or failing: every session waits
                log.info("parked changes stay parked for now (%s)", exc)
                break
            # Refused (another principal's session, a bad request): this session only.
            log.info("parked changes of an ended session stay parked (%s)", exc)
        except SyncError as exc:
            log.info("parked changes stay parked for now (%s)", exc)
            break
    return applied


def _offer_session(
    client: SyncClient, client_id: str, catalog: Catalog, units: list[UnitInfo], mine: bool
) -> int:
    """Push the parked changes of session ``client_id`` through the first of ``units``;
    with no unit that takes changes, none of them can be sent: they are surfaced to
    the principal they are known to be of (``mine``; a bound session whose principal
    the server never said stays parked: only the server could tell)."""
    if units:
        return _push_session(client, client_id, catalog, units[0].name, mine)
    if not mine:
        return 0
    mutations = client.outbox.parked_mutations(client_id)
    applied = client.outbox.unpark(client_id, _unsendable(mutations))[0]
    _forget(client, client_id)
    return applied


def _push_session(
    client: SyncClient, client_id: str, catalog: Catalog, unit: str, mine: bool
) -> int:
    """Push the parked changes of session ``client_id`` through ``unit`` in batches the
    server takes (sized as the outbox's pushes), each unparked as it is answered;
    return how many applied.

    A crash between batches loses nothing: those answered are recorded, the others
    still parked, and a batch sent again is answered from the server's log. A change
    no request can carry (too large, alone) becomes a rejection of the session
    (``Outbox.withdraw_parked``), and the changes after it go on; a session left
    with rejections only comes back into sight if it is known to be this principal's
    (``mine``), else it stays parked for its principal.
    """
    pushed_tables = {t for u in catalog.units for t in u.push}
    streams = [s for s in catalog.streams if s.local_table in pushed_tables]
    headers = {"Content-Type": content_type(client.encoding)}
    applied = 0
    cap = client.push_batch
    while True:
        budget = Budget(client.push_limits, json=client.encoding == "json")
        batch = client.outbox.parked_batch(client_id, cap, budget)
        if not batch:
            break
        request = SyncRequest(
            protocol=PROTOCOL_VERSION,
            client_id=client_id,
            schema_hash=catalog.schema_hash,
            cursors={},
            mutations=batch,
        )
        body = encode_request(request, client.encoding)
        try:
            response = client._send("POST", f"/v1/sync/{unit}", content=body, headers=headers)
        except RequestRejected as exc:
            smaller = _too_large(client, client_id, exc, batch)
            if smaller is None:
                raise
            cap = smaller
            continue
        syncunit_answer(response, content_type(client.encoding))
        try:
            pushed = _first_push_results(response, client.encoding)
        finally:
            response.close()
        if pushed is None:
            break
        seqs = {m.seq for m in batch}
        json_answer = client.encoding == "json"
        applied += client.outbox.unpark(client_id, pushed, streams, json_answer=json_answer)[0]
        if not any(r.seq in seqs for r in pushed.results):
            break  # nothing of the batch answered: it stays parked
    left = client.outbox.parked().get(client_id)
    if left and mine and not client.outbox.parked_mutations(client_id):
        _bring_back(client, client_id)
    elif not left:
        _forget(client, client_id)
    return applied


def _too_large(
    client: SyncClient, client_id: str, exc: RequestRejected, batch: list[Mutation]
) -> int | None:
    """The server refused the parked ``batch`` as too large (413): how many changes the
    next request carries (``run.too_large``), the change no request can carry
    withdrawn as a rejection of the session; None if ``exc`` stands."""
    verdict = too_large(exc, batch[0].seq, batch[-1].seq)
    if verdict is None:
        return None
    withdrawn, cap = verdict
    if withdrawn is not None:
        reason = too_large_reason(exc, "make the change again")
        if not client.outbox.withdraw_parked(client_id, withdrawn, exc.code, reason):
            return None
        return client.push_batch
    log.info("parked changes: a batch of %d was refused (%s)", len(batch), exc.code)
    return None if len(batch) == 1 else cap


def _unsendable(mutations: list[Mutation]) -> PushResults:
    """Verdicts for parked changes no unit can carry: each is surfaced with its values."""
    reason = (
        "the server takes no changes through any unit now; this change, kept from an"
        " earlier session, was not pushed after it (if it was sent before, the server may"
        " have applied it): compare with the server's row, then discard this one"
    )
    return PushResults(
        results=[
            MutationResult(m.seq, m.id, "rejected", reason, "schema-changed") for m in mutations
        ],
        last_seq=0,
    )


class _Me:
    """Who is using the client now, each asked at most once: the server's tag of the
    principal (a catalog request if no answer of this session said it) and a digest
    of the credentials."""

    def __init__(self, client: SyncClient) -> None:
        self.client = client

    @cached_property
    def tag(self) -> str | None:
        tag = self.client._session_principal()
        if tag is None:
            try:
                self.client._send("GET", "/v1/catalog").close()
            except SyncError as exc:
                log.info("parked changes: the server could not say who is signed in (%s)", exc)
            tag = self.client._session_principal()
        return tag

    @cached_property
    def digest(self) -> str | None:
        return _credential_digest(self.client)


def _bring_back(client: SyncClient, client_id: str) -> None:
    """Bring session ``client_id``'s conflicts and rejections (nothing left to push)
    back into sight: it is known to be this principal's."""
    client.outbox.unpark(client_id, PushResults(results=[], last_seq=0))
    _forget(client, client_id)


def _forget(client: SyncClient, client_id: str) -> None:
    with client.store.atomic():
        client.store.conn.execute(
            "DELETE FROM syncunit_local WHERE key IN (?, ?)",
            (f"parked:{client_id}", f"parked-tag:{client_id}"),
        )


def _first_push_results(response: httpx.Response, encoding: Encoding) -> PushResults | None:
    try:
        with FramePrefetch(response, encoding) as frames:
            for frame in frames:
                if isinstance(frame, PushResults):
                    return frame
                if isinstance(frame, Failure):
                    raise problem_error(frame.status, frame.code, frame.title, frame.detail)
    except httpx.HTTPError as exc:
        raise NetworkError(f"the push of parked changes was cut: {exc}") from exc
    return None


#: The owner of a parked session that never pushed and whose credentials were unknown at
#: logout: no digest equals it, so it is never offered to anyone (it stays in ``parked()``).
UNOWNED = "unowned"


def _credential_digest(client: SyncClient) -> str | None:
    """A digest of the credentials of the principal using ``client``, or None if unknown.

    A token provider is asked (the header may be absent, or stale); a provider
    that fails, or no token at all, identifies nobody.
    """
    provider = client._token_provider
    if provider is not None:
        try:
            client._ask_token(provider)
        except AuthError as exc:
            log.info("parked changes: the token provider failed (%s)", exc.detail)
            return None
    authorization = client.http.headers.get("Authorization")
    if not authorization:
        return None
    return hashlib.sha256(authorization.encode()).hexdigest()


def push_units(catalog: Catalog) -> list[UnitInfo]:
    """Units that push, push-only ones first (they pull nothing back)."""
    units = [u for u in catalog.units if u.push and u.direction != "pull"]
    return sorted(units, key=lambda u: u.direction != "push")
