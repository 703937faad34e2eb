"""``ServerStore`` for tenant-sharded Citus (11 or later): past one writer node.

Transaction ids are per node, so a watermark read on the coordinator says
nothing about a shard's writers. Every stream must therefore be scoped to the
distribution column (the tenant, a principal parameter such as
``hospital_id``), and a pull reads its watermark *on the node that holds that
tenant*, as the first statement of its transaction there, so the watermark and
the rows come from one snapshot of one node. That node's ``system_identifier``
is part of the cursor's epoch: when the tenant's shards move to another node
(a rebalance), its transaction ids mean nothing there and the tenant's cursors
reset instead of skipping rows.

What the deployment provides (see ``docs/scaling.md``):

* the tracked tables distributed by the tenant column and co-located;
  ``syncunit_tombstones``, ``syncunit_clients`` and ``syncunit_mutations``
  co-located with them (tombstones carry the tenant in their ``old`` image,
  since the tenant column is a scope column of every stream);
* ``citus.enable_unsafe_triggers`` on (the install sets it for its own
  transaction), so the row triggers run on the workers, next to the shards.

The delegated function ``syncunit_node_watermark(tenant)`` is created by the
install and distributed with ``force_delegation``, so Citus runs it on the
tenant's node inside the pull's transaction.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from syncunit.server.migrations import TableTracking
from syncunit.server.postgres import PostgresStore, postgres_engine

__all__ = ["CitusStore"]

_NODE_FUNCTION = """CREATE OR REPLACE FUNCTION syncunit_node_watermark(tenant {type})
RETURNS TABLE (watermark bigint, node text) LANGUAGE sql AS $$
  SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint - 1,
         (SELECT system_identifier FROM pg_control_system())::text
$$"""


class CitusStore(PostgresStore):
    """Change tracking on Citus: per-tenant watermarks read on the tenant's node."""

    tracking_format = "citus/2"

    def __init__(
        self,
        engine: Engine,
        *,
        tenant: str,
        colocate_with: str,
        tenant_type: str = "bigint",
        replicas: Sequence[Engine] = (),
    ) -> None:
        """``tenant``: the principal parameter that holds the distribution column's
        value; ``colocate_with``: a distributed table the tenants' shards follow."""
        super().__init__(engine, replicas=replicas)
        self.tenant = tenant
        self.colocate_with = colocate_with
        self.tenant_type = tenant_type

    @classmethod
    def from_url(  # type: ignore[override]
        cls, url: str, *, tenant: str, colocate_with: str, tenant_type: str = "bigint"
    ) -> CitusStore:
        return cls(
            postgres_engine(url), tenant=tenant, colocate_with=colocate_with,
            tenant_type=tenant_type,
        )  # fmt: skip

    # -- install -------------------------------------------------------------------------

    def migration_ddl(self, number: int) -> list[str]:
        out = super().migration_ddl(number)
        if number == 1:
            out += [
                _NODE_FUNCTION.format(type=self.tenant_type),
                "SELECT create_distributed_function("
                f"'syncunit_node_watermark({self.tenant_type})', '$1',"
                f" colocate_with := '{self.colocate_with}', force_delegation := true)",
            ]
        return out

    def table_tracking_ddl(
        self, table: sa.Table, tracking: TableTracking, have: set[str]
    ) -> list[str]:
        # Triggers on distributed tables run on the workers: Citus asks to be told.
        return [
            "SET LOCAL citus.enable_unsafe_triggers TO on",
            *super().table_tracking_ddl(table, tracking, have),
        ]

    # -- reading -------------------------------------------------------------------------

    @contextmanager
    def snapshot(
        self,
        *,
        replica: bool = False,
        at_least: int = 0,
        scope: Mapping[str, Any] | None = None,
    ) -> Iterator[tuple[Connection, int]]:
        if scope is None or self.tenant not in scope:
            raise ValueError(
                f"on Citus every pull is scoped to a tenant: the principal needs"
                f" the parameter {self.tenant!r} (the distribution column's value)"
            )
        with self.engine.connect() as conn:
            conn = conn.execution_options(
                isolation_level="REPEATABLE READ", postgresql_readonly=True
            )
            with conn.begin():
                # The first statement, delegated to the tenant's node: its snapshot.
                row = conn.execute(
                    sa.text("SELECT watermark, node FROM syncunit_node_watermark(:t)"),
                    {"t": scope[self.tenant]},
                ).one()
                conn.info["syncunit_node"] = str(row.node)
                yield conn, int(row.watermark)

    def current_version(self) -> int:
        """The coordinator's watermark: enough for the live monitor to notice activity."""
        return super().current_version()

    def epoch_and_horizon(self, conn: Connection) -> tuple[str, int]:
        epoch, horizon = super().epoch_and_horizon(conn)
        node = conn.info.get("syncunit_node")
        return (f"{epoch}@{node}" if node else epoch), horizon
