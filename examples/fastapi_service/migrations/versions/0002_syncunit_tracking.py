"""Install syncunit's change tracking for the tables the devices sync.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05

The statements are those ``syncunit ddl fastapi_service.sync:build --app-dir examples
--database URL --fresh`` prints: syncunit's own tables, a version, a creation version
and two timestamp columns on each tracked table, the triggers that stamp them and
record deletes, and the indexes deltas read a device's scope through (the mounted server,
with ``install=False``, creates none). They are computed from the sync schema when the
migration runs; to pin them instead, paste that command's output here. After upgrading
syncunit, or changing which tables or columns the streams use, add a migration that runs
``syncunit ddl`` (without ``--fresh``) output: it adds only what is missing and recreates
the triggers.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from fastapi_service.sync import schema

from syncunit.server import open_store

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    # A store on its own engine, used only to compile the DDL for this database's
    # dialect: it never connects. The statements run on the migration's connection.
    store = open_store(bind.engine.url.render_as_string(hide_password=False))
    try:
        statements = [*store.tracking_ddl(schema, existing=False), *store.scope_index_ddl(schema)]
    finally:
        store.engine.dispose()
    for stmt in statements:
        bind.exec_driver_sql(stmt)


def downgrade() -> None:
    """Remove everything the upgrade made, by syncunit's name: its triggers (and, on
    PostgreSQL, their functions), its tables, and the tracking columns with their indexes."""
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    for table in schema.tracked_tables():
        for index in inspector.get_indexes(table.name):
            if "syncunit" in str(index["name"]):
                op.drop_index(str(index["name"]), table_name=table.name)
    if bind.dialect.name == "sqlite":
        objects = bind.exec_driver_sql(
            "SELECT type, name FROM sqlite_master WHERE name LIKE 'syncunit%' AND type != 'index'"
            " ORDER BY type = 'table'"  # triggers first
        ).all()
        for kind, name in objects:
            bind.exec_driver_sql(f'DROP {kind.upper()} IF EXISTS "{name}"')
    elif bind.dialect.name == "postgresql":
        # Triggers first, then their functions, then the tables: each query names what
        # its DROP takes, in the current schema.
        for query, drop in (
            (
                "SELECT format('%I ON %s', tgname, tgrelid::regclass) FROM pg_trigger"
                " WHERE tgname LIKE 'syncunit%' AND NOT tgisinternal",
                "DROP TRIGGER IF EXISTS {}",
            ),
            (
                "SELECT oid::regprocedure::text FROM pg_proc WHERE proname LIKE 'syncunit%'"
                " AND pronamespace = current_schema()::regnamespace",
                "DROP FUNCTION IF EXISTS {}",
            ),
            (
                "SELECT format('%I', tablename) FROM pg_tables"
                " WHERE tablename LIKE 'syncunit%' AND schemaname = current_schema()",
                "DROP TABLE IF EXISTS {} CASCADE",
            ),
        ):
            for name in bind.execute(sa.text(query)).scalars().all():
                bind.exec_driver_sql(drop.format(name))
    else:
        raise NotImplementedError(f"this example's downgrade has no {bind.dialect.name} form")
    for table in schema.tracked_tables():
        with op.batch_alter_table(table.name) as batch:
            for column in (
                "syncunit_version",
                "syncunit_created_at",
                "syncunit_updated_at",
                "syncunit_created_stamp",
            ):
                batch.drop_column(column)
