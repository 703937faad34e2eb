"""Metrics in the Prometheus text format, at ``GET /metrics``.

Counted as requests go (labels: the unit's name, never a device or a principal):

* ``syncunit_syncs_total{unit, outcome}``: sync responses by how they ended:
  ``ok``, ``more`` (the server's read budget ended it; the client continues),
  ``failed``, ``stalled`` (the client stopped reading), ``cut`` (it went away);
* ``syncunit_rows_sent_total{unit, kind}`` (``upsert``, ``remove``),
  ``syncunit_mutations_received_total{unit}``,
  ``syncunit_request_bytes_total{unit}``, ``syncunit_response_bytes_total{unit}``
  (as they travelled: compressed, when the body was);
* ``syncunit_push_results_total{unit, status}`` (``applied``, ``conflict``, ``rejected``);
* ``syncunit_sync_duration_seconds{unit}`` (request to last frame) and
  ``syncunit_push_duration_seconds{unit}`` histograms;
* ``syncunit_refused_requests_total{code}``: problem responses by code: refusals,
  and failures before a response began (``internal``, ``database-unavailable``).

Read when scraped: ``syncunit_live_waiters`` (long-polls waiting),
``syncunit_syncs_running``, ``syncunit_watermark`` and the watermark's lag
behind open writing transactions (``syncunit_watermark_lag_seconds``,
``..._transactions``: 0 where writers are serialized, as on SQLite),
``syncunit_tombstones`` and ``syncunit_tombstone_horizon``, and
``syncunit_database_up`` (0 when those reads failed).

Each ``SyncServer`` has its own ``CollectorRegistry`` (``server.metrics.registry``):
several servers in one process never mix their numbers. Register more
collectors on it to add your own.

Who may read it: admin principals (as for the inspector), or anyone with the
``metrics_token`` given to the server, sent as ``Authorization: Bearer <token>``
(what a Prometheus scrape job's ``authorization`` setting sends).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio.to_thread
import sqlalchemy as sa
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from syncunit.protocol import Chunk, Failure, Frame, PushResults, close_frames
from syncunit.server.admission import SyncSlots
from syncunit.server.auth import Principal
from syncunit.server.live import VersionMonitor
from syncunit.server.problems import ProblemException, failure_cause
from syncunit.server.store import ServerStore, tombstones

log = logging.getLogger("syncunit.server")

__all__ = ["ServerMetrics", "SyncTally"]

#: Seconds: a small delta sync takes milliseconds, a first copy of a big unit minutes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class SyncTally:
    """What one sync response carried, counted as its frames go by."""

    def __init__(self) -> None:
        self.upserted = 0
        self.removed = 0
        self.failed = False
        self.results: dict[str, int] = {}

    def watch(self, frames: Iterator[Frame]) -> Iterator[Frame]:
        """Pass ``frames`` on unchanged, counting them (closing it closes ``frames``)."""
        try:
            for frame in frames:
                if isinstance(frame, Chunk):
                    self.upserted += frame.row_count()
                    self.removed += len(frame.removed)
                elif isinstance(frame, PushResults):
                    for r in frame.results:
                        self.results[r.status] = self.results.get(r.status, 0) + 1
                elif isinstance(frame, Failure):
                    self.failed = True
                yield frame
        finally:
            close_frames(frames)


class ServerMetrics:
    """The server's metrics, on a registry of its own, and the ``/metrics`` route."""

    def __init__(
        self,
        store: ServerStore,
        monitor: VersionMonitor,
        slots: SyncSlots,
        principal_of: Callable[[Request], Awaitable[Principal]],
        token: str | None = None,
    ) -> None:
        self.principal_of = principal_of
        self.token = token
        self.registry = CollectorRegistry()
        r = self.registry
        self.syncs = Counter(
            "syncunit_syncs", "Sync responses by unit and how they ended", ["unit", "outcome"],
            registry=r,
        )  # fmt: skip
        self.rows_sent = Counter(
            "syncunit_rows_sent", "Rows sent to devices (upserted or removed)", ["unit", "kind"],
            registry=r,
        )  # fmt: skip
        self.mutations = Counter(
            "syncunit_mutations_received", "Mutations devices pushed", ["unit"], registry=r
        )
        self.bytes_in = Counter(
            "syncunit_request_bytes", "Sync request bodies, as received", ["unit"], registry=r
        )
        self.bytes_out = Counter(
            "syncunit_response_bytes", "Sync response bodies, as encoded", ["unit"], registry=r
        )
        self.push_results = Counter(
            "syncunit_push_results", "Pushed mutations by result", ["unit", "status"], registry=r
        )
        self.sync_seconds = Histogram(
            "syncunit_sync_duration_seconds", "From a sync request to its last frame",
            ["unit"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.push_seconds = Histogram(
            "syncunit_push_duration_seconds", "Applying a request's mutations",
            ["unit"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.refused = Counter(
            "syncunit_refused_requests", "Requests answered with a problem response", ["code"],
            registry=r,
        )  # fmt: skip
        r.register(_StateCollector(store, monitor, slots))

    def record_sync(
        self, unit: str, outcome: str, tally: SyncTally, bytes_in: int, bytes_out: int,
        mutations: int, seconds: float,
    ) -> None:  # fmt: skip
        """Count one sync response that ended."""
        self.syncs.labels(unit, outcome).inc()
        self.rows_sent.labels(unit, "upsert").inc(tally.upserted)
        self.rows_sent.labels(unit, "remove").inc(tally.removed)
        self.mutations.labels(unit).inc(mutations)
        self.bytes_in.labels(unit).inc(bytes_in)
        self.bytes_out.labels(unit).inc(bytes_out)
        for status, n in tally.results.items():
            self.push_results.labels(unit, status).inc(n)
        self.sync_seconds.labels(unit).observe(seconds)

    # -- the endpoint --------------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [Route("/metrics", self.endpoint, methods=["GET"])]

    async def endpoint(self, request: Request) -> Response:
        await self._admit(request)
        body = await anyio.to_thread.run_sync(generate_latest, self.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})

    async def _admit(self, request: Request) -> None:
        """The metrics token, or an admin principal; else 401 or 403."""
        if self.token:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() == "bearer" and secrets.compare_digest(
                given.strip().encode(), self.token.encode()
            ):
                return
        principal = await self.principal_of(request)
        if not principal.admin:
            raise ProblemException(
                "forbidden",
                "metrics are for admin principals, or for the server's metrics token",
            )


class _StateCollector(Collector):
    """Gauges read when scraped: long-polls, running syncs, watermark, tombstones."""

    def __init__(self, store: ServerStore, monitor: VersionMonitor, slots: SyncSlots) -> None:
        self.store = store
        self.monitor = monitor
        self.slots = slots
        #: Whether the last scrape could not read the database: an outage (a restore,
        #: a restart) is logged once, when it begins, not at every scrape.
        self._down = False

    def describe(self) -> list[Metric]:
        return []  # read only when scraped: no database work at registration

    def collect(self) -> Iterator[Metric]:
        waiters = self.monitor.waiters
        yield _gauge("syncunit_live_waiters", "Long-polls waiting for changes", waiters)
        yield _gauge("syncunit_syncs_running", "Syncs holding a database slot", self.slots.used)
        try:
            facts = self._database_facts()
        except Exception as exc:
            if not self._down:
                self._down = True
                if isinstance(exc, sa.exc.SQLAlchemyError):  # the database's: its first line
                    log.warning("metrics: reading the database failed: %s", failure_cause(exc))
                else:  # the server's own: a traceback
                    log.warning("metrics: reading the database failed", exc_info=True)
            yield _gauge("syncunit_database_up", "Whether the scrape could read the database", 0)
            return
        if self._down:
            self._down = False
            log.info("metrics: reading the database works again")
        yield _gauge("syncunit_database_up", "Whether the scrape could read the database", 1)
        yield _gauge("syncunit_watermark", "The highest version handed out", facts["watermark"])
        yield _gauge(
            "syncunit_watermark_lag_seconds",
            "Age of the oldest open writing transaction holding the watermark back",
            facts["lag_seconds"],
        )
        yield _gauge(
            "syncunit_watermark_lag_transactions",
            "Transactions between the watermark and the next one",
            facts["lag_transactions"],
        )
        yield _gauge("syncunit_tombstones", "Tombstones kept", facts["tombstones"])
        yield _gauge(
            "syncunit_tombstone_horizon",
            "The highest version whose tombstones were pruned",
            facts["horizon"],
        )
        # The snapshot cache's size, hits and misses go here once the server has one.

    def _database_facts(self) -> dict[str, Any]:
        with self.store.engine.connect() as conn, conn.begin():
            watermark = self.store.watermark(conn)
            count = sa.select(sa.func.count()).select_from(tombstones)
            n = int(conn.execute(count).scalar_one())
            horizon = int(self.store.facts(conn).get("horizon", "0"))
        lag_seconds, lag_transactions = 0.0, 0
        # Stores with concurrent writers say how far open transactions hold it back.
        lag_of = getattr(self.store, "watermark_lag", None)
        lag = lag_of() if callable(lag_of) else None
        if lag is not None:
            lag_seconds = float(lag.seconds)
            lag_transactions = int(lag.transactions)
        return {
            "watermark": watermark,
            "tombstones": n,
            "horizon": horizon,
            "lag_seconds": lag_seconds,
            "lag_transactions": lag_transactions,
        }


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)
