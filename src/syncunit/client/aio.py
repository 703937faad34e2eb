"""``AsyncSyncClient``: the sync engine for asyncio apps (Toga on BeeWare, say).

It is the threaded ``SyncClient`` underneath, not a second engine: the same
local store, outbox, scheduler, results and errors. What blocks (a sync's
network and SQLite work, a local write, closing) runs on a worker thread and is
awaited; what the engine reports from its threads (``on_status``, the events
given as options, watched queries) is handed to the event loop with
``call_soon_threadsafe``, so app callbacks run on the loop's thread, where the
UI lives.

    async with AsyncSyncClient(url, "app.sqlite", token=token) as client:
        client.on_status = show_status
        await client.sync("Login")
        async for rows in client.query_updates("SELECT * FROM LocalAppointment"):
            render(rows)
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from syncunit.client.client import SyncClient, SyncResult
from syncunit.client.reactive import LiveQuery, Rows
from syncunit.client.scheduler import SyncStatus
from syncunit.errors import LocalStoreError, SyncError

__all__ = ["AsyncSyncClient"]

#: The ``SyncClient`` events an ``AsyncSyncClient`` given them as options calls on its loop.
EVENTS = ("on_start", "on_progress", "on_complete", "on_error")


class AsyncSyncClient:
    """``SyncClient``'s semantics with awaitable calls; create it inside the running loop.

    Takes the same arguments as ``SyncClient`` (or an existing one as ``client=``,
    with ``on_status`` at most); ``.client`` is the engine, for anything not wrapped
    here. The callbacks given (``on_status``, ``on_start``, ``on_progress``,
    ``on_complete``, ``on_error``) are called on the event loop, as ``on_status``
    set later is. It belongs to the loop it was created in (its callbacks and watched
    queries are handed to that loop): a call from another running loop raises
    ``SyncError`` (``aclose`` excepted).
    """

    def __init__(
        self,
        server_url: str | None = None,
        local_db: Any = None,
        *,
        client: SyncClient | None = None,
        **options: Any,
    ) -> None:
        try:
            self.loop = asyncio.get_running_loop()
        except RuntimeError:
            raise SyncError(
                "AsyncSyncClient must be created inside the running event loop (in an"
                " async function); outside one, use SyncClient"
            ) from None
        on_status = options.pop("on_status", None)
        if client is None:
            if server_url is None or local_db is None:
                raise TypeError("give server_url and local_db, or client=")
            for name in EVENTS:  # the engine calls them on its threads: the loop's instead
                if options.get(name) is not None:
                    options[name] = self._on_loop(options[name])
            client = SyncClient(server_url, local_db, **options)
        elif options:
            raise TypeError(
                f"{', '.join(options)}: options of a new SyncClient; with client=, set"
                " them on that client"
            )
        self.client = client
        self._on_status: Callable[[SyncStatus], None] | None = None
        if on_status is not None:
            self.on_status = on_status  # through the loop, as when set later

    # -- status ----------------------------------------------------------------------------

    @property
    def status(self) -> SyncStatus:
        """What the engine is doing (a quick local read)."""
        return self.client.status

    @property
    def on_status(self) -> Callable[[SyncStatus], None] | None:
        """Called on the event loop with each new ``SyncStatus``."""
        return self._on_status

    @on_status.setter
    def on_status(self, callback: Callable[[SyncStatus], None] | None) -> None:
        self._check_loop()
        self._on_status = callback
        if callback is None:
            self.client.on_status = None
            return
        self.client.dispatch = self.client.dispatch or self._dispatch
        self.client.on_status = callback

    def _check_loop(self) -> None:
        """Refuse a call from a running loop other than the one this client belongs to:
        what it hands to its loop would never run there."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return  # from a thread without a loop: nothing is handed to one
        if running is not self.loop:
            raise SyncError(
                "this AsyncSyncClient was created in another event loop, and hands its"
                " callbacks and watched queries to that one: create one AsyncSyncClient"
                " per event loop (asyncio.run() makes a new loop each time)"
            )

    def _dispatch(self, call: Callable[[], None]) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(call)

    def _on_loop(self, callback: Callable[..., None]) -> Callable[..., None]:
        """``callback``, called on this client's loop whichever thread calls it."""

        def post(*args: Any) -> None:
            self._dispatch(functools.partial(callback, *args))

        return post

    # -- syncing ---------------------------------------------------------------------------

    async def sync(
        self,
        unit: str,
        params: Mapping[str, Any] | None = None,
        *,
        keep_for: float | None = None,
    ) -> SyncResult:
        """Run ``unit`` (with its client ``params``, a subscription: see
        ``SyncClient.sync``) now, on a worker thread, and return what it did."""
        self._check_loop()
        return await asyncio.to_thread(self.client.sync, unit, params, keep_for=keep_for)

    def trigger(
        self,
        unit: str,
        *,
        discard_pending: bool = False,
        params: Mapping[str, Any] | None = None,
    ) -> bool:
        """Queue ``unit`` (with its ``params``) for the background worker; returns at once."""
        self._check_loop()
        return self.client.trigger(unit, discard_pending=discard_pending, params=params)

    def start(self) -> None:
        """Start the background worker (see ``SyncClient.start``)."""
        self._check_loop()
        self.client.start()

    def set_online(self, online: bool) -> None:
        """Tell the engine about connectivity (see ``SyncClient.set_online``)."""
        self._check_loop()
        self.client.set_online(online)

    async def login(self, token: str) -> SyncResult | None:
        self._check_loop()
        return await asyncio.to_thread(self.client.login, token)

    # -- local data ------------------------------------------------------------------------

    async def insert(self, table: str, values: Mapping[str, Any]) -> Any:
        self._check_loop()
        return await asyncio.to_thread(self.client.insert, table, values)

    async def update(self, table: str, key: Any, values: Mapping[str, Any]) -> None:
        self._check_loop()
        await asyncio.to_thread(self.client.update, table, key, values)

    async def delete(self, table: str, key: Any) -> None:
        self._check_loop()
        await asyncio.to_thread(self.client.delete, table, key)

    async def query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Rows:
        """Rows of ``sql`` on the local database (``LocalStoreError`` if it fails, as
        the threaded client's ``store.query``)."""
        self._check_loop()
        store = self.client.store
        self.client._check_open()

        def run() -> Rows:
            with store.lock:
                try:
                    return [tuple(r) for r in store.conn.execute(sql, params)]
                except store.errors as exc:
                    raise LocalStoreError(f"local query failed: {exc}") from exc

        return await asyncio.to_thread(run)

    def watch_query(
        self,
        sql: str,
        params: Sequence[Any] | dict[str, Any] = (),
        callback: Callable[[Rows], None] | None = None,
    ) -> LiveQuery:
        """``SyncClient.watch_query`` with ``callback`` run on the event loop."""
        self._check_loop()
        return self.client.watch_query(sql, params, callback, dispatch=self._dispatch)

    async def query_updates(
        self, sql: str, params: Sequence[Any] | dict[str, Any] = ()
    ) -> AsyncIterator[Rows]:
        """The rows of ``sql`` now, then each time they change, until the loop stops."""
        self._check_loop()
        results: asyncio.Queue[Rows] = asyncio.Queue()
        live = await asyncio.to_thread(
            self.client.watch_query, sql, params, results.put_nowait, dispatch=self._dispatch
        )
        try:
            while True:
                yield await results.get()
        finally:
            live.cancel()

    # -- lifecycle -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop the worker and watchers (a running sync finishes first), then close."""
        await asyncio.to_thread(self.client.close)

    async def __aenter__(self) -> AsyncSyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
