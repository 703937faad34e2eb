"""Live changes: a long-poll that tells a client its unit has new changes in scope.

``POST /v1/live/{unit}?wait=25`` takes the same body as a sync (client id and
cursors) and answers ``{"unit": ..., "changed": true}`` as soon as one of the
unit's streams has changes in the principal's scope, or ``"changed": false``
when the wait is over. One monitor per server polls the database's version
(a single cheap query) while anyone waits; the per-client scope check runs only
when that version moved. Waits are capped in time, and in number in total and per
principal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import anyio.to_thread

from syncunit.server.auth import Principal
from syncunit.server.changes import StreamReader
from syncunit.server.cursor import newest_cursor
from syncunit.server.problems import first_line
from syncunit.server.store import ServerStore
from syncunit.units import SyncUnit

log = logging.getLogger("syncunit.server")


class VersionMonitor:
    """Polls the store's version while clients wait; wakes them when it moves."""

    def __init__(self, store: ServerStore, *, interval: float = 0.2) -> None:
        self.store = store
        self.interval = interval
        self.version = -1
        self.waiters = 0
        self._changed: asyncio.Condition | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def wait_beyond(self, seen: int, timeout: float) -> int:
        """Wait until the version exceeds ``seen`` or ``timeout`` passes; return it."""
        loop = asyncio.get_running_loop()
        if self._changed is None or self._loop is not loop:
            # asyncio objects belong to one event loop: the app may be served again by a
            # new one (a server restarted in the same process), so start afresh there.
            self._loop = loop
            self._changed = asyncio.Condition()
            self._task = None
        self.waiters += 1
        try:
            if self._task is None or self._task.done():
                self._task = asyncio.create_task(self._run())
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda: self.version > seen), timeout
                    )
            return self.version
        finally:
            self.waiters -= 1

    async def _run(self) -> None:
        changed = self._changed
        assert changed is not None
        failing = False
        while self.waiters > 0 and self._changed is changed:
            try:
                version = await anyio.to_thread.run_sync(self.store.current_version)
            except Exception as exc:  # a database restart: the waiters wait on, it is read again
                if not failing:
                    log.warning("live changes: reading the version failed: %s", first_line(exc))
                failing = True
                await asyncio.sleep(max(self.interval, 1.0))
                continue
            failing = False
            if version != self.version:
                self.version = version
                async with changed:
                    changed.notify_all()
            await asyncio.sleep(self.interval)


def unit_has_changes(
    store: ServerStore,
    unit: SyncUnit,
    principal: Principal,
    client_params: Mapping[str, Any],
    cursors: Mapping[str, str],
) -> bool:
    """Whether a sync of ``unit`` (opened on ``client_params``) with these cursors would
    bring ``principal`` anything; each stream read in its own scope, as a sync reads it."""
    at_least = newest_cursor(cursors.values())
    with store.snapshot(replica=True, at_least=at_least, scope=principal.params) as (
        conn,
        watermark,
    ):
        epoch, horizon = store.epoch_and_horizon(conn)
        for stream in unit.streams:
            reader = StreamReader(
                store, stream, principal.scope(stream, client_params), chunk_size=1
            )
            if reader.has_changes(conn, watermark, epoch, horizon, cursors.get(stream.name)):
                return True
    return False
