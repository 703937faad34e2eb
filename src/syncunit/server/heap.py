"""A server process's start-up objects, kept out of every later full garbage collection.

CPython's full collection walks every object the collector tracks, and no thread of
the process runs meanwhile. A started server holds tens of thousands of them (its
modules, SQLAlchemy's tables and compiled statements, the app's schema): on a small
machine one full collection of such a heap takes 40 to 100 ms, and one falls inside a
large push or first copy now and then (see ``docs/performance.md``). Those objects
live as long as the process. Frozen once the server has started (``gc.freeze``), they
are never walked again: the full collections that follow walk what came after.
"""

from __future__ import annotations

import gc
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)


def freeze_heap() -> int:
    """Collect the garbage, then freeze every object left; the number frozen.

    A frozen object is never collected: garbage it becomes part of later stays in
    memory. Call it once the process has built what it keeps for its whole life.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class FreezeOnStartup:
    """ASGI middleware: ``freeze_heap`` once ``app`` has started.

    It acts when the app reports its lifespan startup complete (after its startup
    handlers, before the first request), so it needs a runner that sends lifespan
    events (uvicorn does by default). It is for a process whose main app this is:
    ``syncunit serve`` uses it; an app that mounts a ``SyncServer`` inside its own
    can wrap its own app in it, or call ``freeze_heap`` once it has started.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        #: Objects frozen when the app started (0 until then).
        self.frozen = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def started(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                self.frozen = freeze_heap()
                log.debug("froze %d objects of the started server", self.frozen)
            await send(message)

        await self.app(scope, receive, started)
