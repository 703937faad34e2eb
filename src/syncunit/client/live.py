"""The client side of live changes: a long-poll loop on a background thread.

It asks the server whether a unit has new changes in scope; when it does, the
watcher triggers the unit (or calls a function) and waits for that sync to end
before asking again. Errors (a server restart, a dropped connection) back off
exponentially and reconnect; nothing spins. More held subscriptions than one
request may carry (the server's bound, ``protocol.PUSH_LIMITS``) are asked
about in turns: each poll carries the next group.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx
import msgspec

from syncunit.client.run import held
from syncunit.errors import (
    ProblemError,
    ProtocolError,
    SyncCancelled,
    SyncUnitError,
    UnknownUnitError,
)
from syncunit.protocol import (
    PROTOCOL_VERSION,
    PushLimits,
    Subscription,
    SyncRequest,
    content_type,
    encode_request,
)

if TYPE_CHECKING:
    from syncunit.client.client import SyncClient

log = logging.getLogger("syncunit.client")


def _own_params(exc: Exception) -> bool:
    """Whether ``exc`` refuses the watched unit's own parameters: it names no
    subscription (one it names is closed, and the polls go on without it)."""
    return (
        isinstance(exc, ProblemError)
        and exc.code == "invalid-parameter"
        and not exc.extra.get("subscription")
    )


class LiveAnswer(msgspec.Struct):
    unit: str
    changed: bool


class LiveWatcher:
    """Long-polls ``POST /v1/live/{unit}`` and reacts to changes."""

    def __init__(
        self,
        client: SyncClient,
        unit: str,
        on_change: Callable[[str], None],
        *,
        wait: float = 20.0,
        max_backoff: float = 30.0,
    ) -> None:
        self.client = client
        self.unit = unit
        self.on_change = on_change
        self.wait = wait
        self.max_backoff = max_backoff
        self.min_interval = 0.5
        self.polls = 0
        self.errors = 0
        self.changes = 0
        #: Where the next poll's group of held subscriptions starts (more than one
        #: request may carry go in turns).
        self._turn = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="syncunit-live", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 0.2) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        backoff = 0.5
        streak = 0  # failures in a row
        while not self._stop.is_set():
            try:
                changed = self._poll()
            except (
                SyncUnitError,
                httpx.HTTPError,
                msgspec.DecodeError,
                OSError,
                sqlite3.ProgrammingError,
            ) as exc:
                if self._stop.is_set() or isinstance(exc, SyncCancelled):
                    return  # close() or another watch() stopped it: not a failure
                if isinstance(exc, ProblemError) and self._close_named(exc):
                    continue  # closed and reported as a sync does: polled without it
                self.errors += 1
                streak += 1
                if isinstance(exc, (UnknownUnitError, ProtocolError)) or _own_params(exc):
                    # An unknown unit, a URL that is no syncunit server, a unit that takes
                    # client parameters (a poll carries none): polling again cannot help;
                    # the app is told and watch() can be called again. Anything else (a
                    # refused or unrenewable token, a bound the server lowered) may
                    # pass: told once, then polled again, backing off.
                    log.warning("live changes for %s stopped: %s", self.unit, exc)
                    self._report(exc)
                    return
                if streak == 1:  # retried: only the first of a run of failures is told
                    self._report(exc)
                log.info("live changes for %s: %s; retrying in %.1f s", self.unit, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(self.max_backoff, backoff * 2)
                continue
            backoff = 0.5
            streak = 0
            if changed and not self._stop.is_set():
                self.changes += 1
                try:
                    self.on_change(self.unit)
                except Exception:
                    log.exception("the live change callback failed")
                self._settle()
                self._stop.wait(self.min_interval)  # never spin, whatever the callback does

    def _close_named(self, exc: ProblemError) -> bool:
        """Close the held subscription a refused poll names (its values, its unit gone
        from the server, a stream's hook), as a sync does; False if it names none held."""
        if not exc.extra.get("subscription"):
            return False
        try:
            with self.client._exclusive("closing a refused subscription"):
                return self.client._close_refused(exc)
        except SyncUnitError as failed:  # the database busy past lock_timeout, say
            log.info("live changes for %s: could not close it: %s", self.unit, failed)
            return False

    def _report(self, exc: Exception) -> None:
        """Tell the app about a failed poll, as a failed run is told: ``on_error`` and
        ``status.last_error``."""
        client = self.client
        client._emit(client.on_error, self.unit, exc)
        client._feed.failed(self.unit, exc)
        client._status_changed()

    def _poll(self) -> bool:
        catalog = self.client.store.catalog()
        info = None if catalog is None else catalog.unit(self.unit)
        streams = [] if info is None else info.streams
        body = encode_request(
            SyncRequest(
                protocol=PROTOCOL_VERSION,
                client_id=self.client.client_id,
                schema_hash="" if catalog is None else catalog.schema_hash,
                cursors=self.client.store.cursors(streams) if streams else {},
                subscriptions=[]
                if catalog is None
                else self._group(held(self.client, self.unit, catalog)),
            )
        )
        self.polls += 1
        # Through the client's own sending: a token provider is asked for the credentials,
        # and asked again when the server answers 401 (the token expired).
        response = self.client._send(
            "POST",
            f"/v1/live/{self.unit}",
            params={"wait": str(self.wait)},
            content=body,
            headers={"Content-Type": content_type("msgpack")},
            timeout=self.wait + 15.0,
        )
        try:
            content = response.read()
        finally:
            response.close()
        try:
            return msgspec.json.decode(content, type=LiveAnswer).changed
        except msgspec.DecodeError as exc:
            raise ProtocolError(
                f"the answer to a live poll of {self.unit!r} is not a syncunit server's:"
                f" {exc} (check the server URL)"
            ) from exc

    def _group(self, subs: list[Subscription]) -> list[Subscription]:
        """The held subscriptions this poll carries: all, or the next group of as many
        as the server allows in one request (a refusal told the device a lower bound)."""
        bound = (self.client.push_limits or PushLimits()).subscriptions
        if len(subs) <= bound:
            return subs
        start = self._turn % len(subs)
        self._turn = start + bound
        return (subs[start:] + subs[:start])[:bound]

    def _settle(self) -> None:
        """Wait for the triggered sync to finish so the next poll sends fresh cursors."""
        deadline = time.monotonic() + 120.0
        scheduler = self.client.scheduler
        while not self._stop.is_set() and time.monotonic() < deadline:
            if not scheduler.busy_with(self.unit):
                return
            self._stop.wait(0.1)
