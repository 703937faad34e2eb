"""The hospital sync server: the units, plus staff tokens as authentication.

Run it with ``syncunit serve syncunit.examples.hospital.server:build --database URL``
(from a checkout also ``syncunit serve hospital.server:build --app-dir examples ...``).
"""

from __future__ import annotations

import sqlalchemy as sa

from syncunit.server import Principal, SyncServer, TokenAuth, open_store

from .models import metadata, staff
from .units import schema


def staff_auth(engine: sa.Engine) -> TokenAuth:
    """Bearer tokens from the ``staff`` table; the principal's scope is its hospital."""

    def lookup(token: str) -> Principal | None:
        with engine.connect() as conn:
            row = conn.execute(
                sa.select(staff.c.id, staff.c.hospital_id).where(staff.c.token == token)
            ).first()
        if row is None:
            return None
        return Principal(id=f"staff:{row.id}", params={"hospital_id": row.hospital_id})

    return TokenAuth(lookup)


def build(database: str, **options: object) -> SyncServer:
    """A ``SyncServer`` for the hospital schema on ``database`` (tables created if missing)."""
    store = open_store(database)
    metadata.create_all(store.engine)
    return SyncServer(schema, store, authenticate=staff_auth(store.engine), **options)  # type: ignore[arg-type]
