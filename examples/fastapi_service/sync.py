"""What the technicians' devices sync, declared on the ORM models' tables.

* **Field** (both directions): the sites of the technician's region, and the
  technician's work orders with the site's name and address copied in, so the
  app lists them without joins. Work orders changed on the device are pushed.
"""

from __future__ import annotations

import sqlalchemy as sa

from fastapi_service.models import Site, Technician, WorkOrder
from syncunit import Join, Stream, SyncSchema, SyncUnit
from syncunit.policies import Detect
from syncunit.server import Principal, SyncServer, TokenAuth

site, work_order = Site.__table__, WorkOrder.__table__

sites = Stream(
    "sites",
    site,
    [site.c.id, site.c.name, site.c.address],
    where=site.c.region_id == sa.bindparam("region_id"),
    local_table="LocalSite",
)

work_orders = Stream(
    "work_orders",
    work_order,
    {
        "id": work_order.c.id,
        "site_id": work_order.c.site_id,
        "technician_id": work_order.c.technician_id,
        "title": work_order.c.title,
        "status": work_order.c.status,
        "due_on": work_order.c.due_on,
        "notes": work_order.c.notes,
        "site_name": site.c.name,
        "site_address": site.c.address,
    },
    joins=[Join(site, work_order.c.site_id == site.c.id)],
    where=work_order.c.technician_id == sa.bindparam("technician_id"),
    local_table="LocalWorkOrder",
    indexes=[["due_on"]],
    policy=Detect(merge=True),
)

schema = SyncSchema([SyncUnit("Field", [sites, work_orders], direction="both")])


def technician_auth(engine: sa.Engine) -> TokenAuth:
    """The service's own API tokens; a technician's scope is its region and itself."""

    def lookup(token: str) -> Principal | None:
        with engine.connect() as conn:
            row = conn.execute(
                sa.select(Technician.id, Technician.region_id, Technician.dispatcher).where(
                    Technician.api_token == token
                )
            ).first()
        if row is None:
            return None
        return Principal(
            id=f"technician:{row.id}",
            params={"technician_id": row.id, "region_id": row.region_id},
            admin=bool(row.dispatcher),
        )

    return TokenAuth(lookup)


def build(database: str, **options: object) -> SyncServer:
    """The sync server (for ``syncunit ddl|serve fastapi_service.sync:build``).

    Tracking is installed by the Alembic migration, not here (``install=False``).
    """
    engine = sa.create_engine(database)
    options.setdefault("install", False)
    return SyncServer(schema, database, authenticate=technician_auth(engine), **options)  # type: ignore[arg-type]
