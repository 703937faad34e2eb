"""The status an app listens to: ``SyncClient(on_status=...)``.

``StatusFeed`` keeps what the scheduler's ``SyncStatus`` does not know (how far
the running unit's download and upload are, the last error of a sync run
directly) and tells the listener each new status once, through the app's
``dispatch`` when it gives one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from syncunit.client.reactive import Dispatch
from syncunit.client.scheduler import Progress, SyncStatus

log = logging.getLogger("syncunit.client")

__all__ = ["StatusFeed"]


class StatusFeed:
    """Progress of the running unit, the last error, and the last status told."""

    def __init__(self) -> None:
        self.download: Progress | None = None
        self.upload: Progress | None = None
        self.last_error: tuple[str, str] | None = None
        self._told: SyncStatus | None = None

    def complete(self, status: SyncStatus) -> SyncStatus:
        """``status`` (the scheduler's) with progress, and the last error if it has none."""
        if status.last_error is None and self.last_error is not None:
            unit, error = self.last_error
            status = replace(status, last_error=error, last_error_unit=unit)
        return replace(status, download=self.download, upload=self.upload)

    def idle(self) -> None:
        self.download = self.upload = None

    def failed(self, unit: str, exc: Exception) -> None:
        self.last_error = (unit, str(exc))
        self.idle()

    def downloaded(self, unit: str, done: int, total: int) -> None:
        self.download = Progress(unit, done, max(total, done))

    def sending(self, unit: str, count: int, pending: int) -> None:
        """``count`` mutations go out now, of ``pending`` the run sends in all."""
        done = self.upload.done if self.upload is not None else 0
        self.upload = Progress(unit, done, max(pending, done + count))

    def answered(self, count: int) -> None:
        if self.upload is not None:
            u = self.upload
            self.upload = Progress(u.unit, u.done + count, u.total)

    def tell(
        self,
        status: Callable[[], SyncStatus],
        listener: Callable[[SyncStatus], None] | None,
        dispatch: Dispatch | None,
    ) -> None:
        """Call ``listener`` with the current status, unless it was told that one last."""
        if listener is None:
            return
        try:
            now = status()
        except Exception:  # a closed store: nothing to tell
            return
        if now == self._told:
            return
        self._told = now

        def call() -> None:
            try:
                listener(now)
            except Exception:
                log.exception("an on_status callback failed")

        if dispatch is None:
            call()
        else:
            dispatch(call)
