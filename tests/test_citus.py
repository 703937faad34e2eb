"""The Citus store, where a Citus cluster is at hand; skipped, saying why, elsewhere.

Citus is not in the package registries this project installs from, so the
test runs only against a cluster named by ``SYNCUNIT_CITUS_URL`` (a
coordinator with the ``citus`` extension, e.g. ``postgresql://postgres@host:5432/db``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import sqlalchemy as sa

from syncunit.client import SyncClient
from syncunit.server import Principal, SyncServer, TokenAuth
from syncunit.units import Stream, SyncSchema, SyncUnit

CITUS_URL = os.environ.get("SYNCUNIT_CITUS_URL")
pytestmark = pytest.mark.skipif(
    CITUS_URL is None,
    reason="Citus is not installed here (it is not in the package registries): set"
    " SYNCUNIT_CITUS_URL to a Citus 11+ coordinator to run the Citus store's test",
)

meta = sa.MetaData()
profile = sa.Table(
    "tenant_profile",
    meta,
    sa.Column("tenant_id", sa.BigInteger, primary_key=True),
    sa.Column("name", sa.String(80), nullable=False),
)
profiles = Stream(
    "profiles",
    profile,
    [profile.c.tenant_id, profile.c.name],
    where=profile.c.tenant_id == sa.bindparam("tenant"),
    local_table="LocalProfile",
)
schema = SyncSchema([SyncUnit("Profile", [profiles])])


def test_a_tenant_syncs_from_its_node_and_its_cursor_names_the_node(serve, tmp_path: Path) -> None:
    from syncunit.server.citus import CitusStore

    assert CITUS_URL is not None
    store = CitusStore.from_url(CITUS_URL, tenant="tenant", colocate_with="tenant_profile")
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS tenant_profile CASCADE")
        meta.create_all(conn)
        conn.exec_driver_sql("SELECT create_distributed_table('tenant_profile', 'tenant_id')")
        conn.execute(profile.insert(), [{"tenant_id": t, "name": f"t{t}"} for t in range(1, 9)])
    auth = TokenAuth({"t3": Principal("p3", {"tenant": 3})})
    server = SyncServer(schema, store, authenticate=auth)
    live = serve(server.app)
    with SyncClient(live.url, tmp_path / "d.sqlite", token="t3") as device:
        device.sync("Profile")
        assert device.store.rows("LocalProfile", ["tenant_id", "name"]) == [(3, "t3")]
        with store.engine.begin() as conn:
            conn.execute(profile.update().where(profile.c.tenant_id == 3).values(name="moved"))
        device.sync("Profile")
        assert device.store.rows("LocalProfile", ["tenant_id", "name"]) == [(3, "moved")]
        with store.snapshot(scope={"tenant": 3}) as (conn, _):
            epoch, _horizon = store.epoch_and_horizon(conn)
        assert "@" in epoch  # the node's system identifier is part of the epoch
    store.engine.dispose()
