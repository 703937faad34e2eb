"""Alembic environment for the field service (online migrations only)."""

from __future__ import annotations

import os

import sqlalchemy as sa
from alembic import context
from fastapi_service.models import Base

config = context.config
url = os.environ.get("FIELD_DATABASE_URL") or config.get_main_option("sqlalchemy.url")
assert url, "set FIELD_DATABASE_URL or sqlalchemy.url"

engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
