"""The FastAPI + SQLAlchemy ORM + Alembic example, end to end.

A fresh database is migrated with Alembic (the service's tables, then syncunit's
tracking), the service writes through its ORM and its own REST API, and a device
syncs through the FastAPI app over real HTTP, with syncunit mounted at ``/sync``.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

pytest.importorskip("fastapi", reason="the example needs fastapi (pip install -e '.[dev]')")
pytest.importorskip("alembic", reason="the example needs alembic (pip install -e '.[dev]')")

from alembic import command
from alembic.config import Config
from fastapi_service.app import create_service
from fastapi_service.models import Region, Site, Technician, WorkOrder
from fastapi_service.sync import schema
from sqlalchemy.orm import Session

from syncunit.client import SyncClient
from syncunit.server import open_store
from tests.support import LiveServer

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fastapi_service"


def alembic_config(url: str) -> Config:
    cfg = Config(str(EXAMPLE / "alembic.ini"))
    cfg.set_main_option("sqlalchemy.url", url)
    return cfg


@pytest.fixture
def database(new_database: Callable[[str], str], monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh database, migrated to head; the service's seed rows written with the ORM."""
    monkeypatch.delenv("FIELD_DATABASE_URL", raising=False)
    url = new_database("field")
    command.upgrade(alembic_config(url), "head")
    engine = sa.create_engine(url)
    with Session(engine) as s:
        s.add_all([Region(id=1, name="North"), Region(id=2, name="South")])
        s.add_all(
            [
                Technician(id=1, name="Ana", region_id=1, api_token="tok-ana"),
                Technician(id=2, name="Bo", region_id=2, api_token="tok-bo"),
                Technician(id=3, name="Dee", region_id=1, api_token="tok-dee", dispatcher=True),
            ]
        )
        s.add_all(
            [
                Site(id=i, name=f"Site {i}", address=f"{i} Main St", region_id=1 + i % 2)
                for i in (1, 2, 3, 4)
            ]
        )
        s.flush()
        for i in range(12):
            s.add(
                WorkOrder(
                    site_id=1 + i % 4,
                    technician_id=1 + i % 2,
                    title=f"Job {i}",
                    due_on=dt.date(2027, 1, 1 + i),
                )
            )
        s.commit()
    engine.dispose()
    return url


@pytest.fixture
def service(database: str, serve: Callable[[Any], LiveServer]) -> LiveServer:
    return serve(create_service(database))


@pytest.fixture
def device(service: LiveServer, tmp_path: Path) -> Iterator[SyncClient]:
    c = SyncClient(f"{service.url}/sync", tmp_path / "ana.sqlite", token="tok-ana", chunk_size=4)
    yield c
    c.close()


def _orm_orders(url: str, technician_id: int) -> dict[str, tuple[Any, ...]]:
    engine = sa.create_engine(url)
    with Session(engine) as s:
        orders = s.scalars(sa.select(WorkOrder).where(WorkOrder.technician_id == technician_id))
        out = {o.id: (o.title, o.status, o.due_on.isoformat(), o.site.name) for o in orders}
    engine.dispose()
    return out


def _local_orders(device: SyncClient) -> dict[str, tuple[Any, ...]]:
    rows = device.store.query(
        "SELECT id, title, status, due_on, site_name FROM LocalWorkOrder ORDER BY id"
    )
    return {r[0]: tuple(r[1:]) for r in rows}


def _triggers(conn: sa.Connection) -> set[tuple[str, str]]:
    """(table, trigger) of every trigger in the database."""
    if conn.dialect.name == "sqlite":
        sql = "SELECT tbl_name, name FROM sqlite_master WHERE type = 'trigger'"
    else:
        sql = "SELECT tgrelid::regclass::text, tgname FROM pg_trigger WHERE NOT tgisinternal"
    return {(r[0], r[1]) for r in conn.exec_driver_sql(sql)}


def _syncunit_objects(conn: sa.Connection) -> list[str]:
    """Whatever in the database has syncunit in its name: tables, indexes, triggers,
    functions, columns."""
    if conn.dialect.name == "sqlite":
        sql = "SELECT name FROM sqlite_master WHERE name LIKE '%syncunit%'"
        columns = [
            f"{t}.{c[1]}"
            for (t,) in conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'table'")
            for c in conn.exec_driver_sql(f'PRAGMA table_info("{t}")')
            if "syncunit" in c[1]
        ]
    else:
        sql = (
            "SELECT relname FROM pg_class WHERE relname LIKE '%syncunit%'"
            " AND relnamespace = 'public'::regnamespace"
            " UNION ALL SELECT tgname FROM pg_trigger WHERE tgname LIKE '%syncunit%'"
            " UNION ALL SELECT proname FROM pg_proc WHERE proname LIKE '%syncunit%'"
        )
        columns = [
            f"{r[0]}.{r[1]}"
            for r in conn.execute(
                sa.text(
                    "SELECT table_name, column_name FROM information_schema.columns"
                    " WHERE table_schema = 'public' AND column_name LIKE '%syncunit%'"
                )
            )
        ]
    return sorted([r[0] for r in conn.execute(sa.text(sql))] + columns)


def test_the_migration_installs_tracking(database: str) -> None:
    engine = sa.create_engine(database)
    with engine.connect() as conn:
        triggers = _triggers(conn)
        tracked = {table for table, _ in triggers}
        assert {"work_order", "site"} <= tracked
        assert "technician" not in tracked  # only what the streams read is tracked
        if conn.dialect.name == "sqlite":
            names = {name for _, name in triggers}
            assert {"syncunit_work_order_au", "syncunit_site_ad"} <= names
        epoch = conn.exec_driver_sql("SELECT value FROM syncunit_meta WHERE key = 'epoch'")
        assert epoch.scalar()
        # Rows written through the ORM after the migration carry versions.
        unstamped = conn.exec_driver_sql(
            "SELECT count(*) FROM work_order WHERE syncunit_version IS NULL"
        )
        assert unstamped.scalar() == 0
    engine.dispose()


def test_the_migration_creates_the_scope_indexes(database: str) -> None:
    """What ``syncunit ddl --fresh`` prints, indexes included: the mounted server
    (``install=False``) creates none, so without them deltas read no scope index."""
    store = open_store(database)
    try:
        wanted = [
            ddl.split(" IF NOT EXISTS ", 1)[1].split(" ON ", 1)[0].strip('"')
            for ddl in store.scope_index_ddl(schema)
        ]
        with store.engine.connect() as conn:
            have = store.index_names(conn)
    finally:
        store.engine.dispose()
    assert "ix_work_order_technician_id_syncunit_version" in wanted
    assert [name for name in wanted if name not in have] == []


def _scope_index_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The server's warnings about missing scope indexes, once its check has ended."""
    deadline = time.monotonic() + 10
    while any(t.name == "syncunit-scope-indexes" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the scope index check did not end"
        time.sleep(0.01)
    return [r.getMessage() for r in caplog.records if "scope index" in r.getMessage()]


def test_a_server_without_install_warns_of_missing_scope_indexes(
    database: str,
    serve: Callable[[Any], LiveServer],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = sa.create_engine(database)
    with engine.begin() as conn:
        conn.exec_driver_sql('DROP INDEX "ix_work_order_technician_id_syncunit_version"')
    engine.dispose()
    service = serve(create_service(database))
    with caplog.at_level(logging.WARNING, logger="syncunit"):
        c = SyncClient(f"{service.url}/sync", tmp_path / "ana.sqlite", token="tok-ana")
        try:
            c.sync("Field")
            c.sync("Field")
        finally:
            c.close()
        warnings = _scope_index_warnings(caplog)
    assert len(warnings) == 1  # once per server, not per sync
    assert "1 scope index(es) missing" in warnings[0]
    assert "ix_work_order_technician_id_syncunit_version" in warnings[0]
    assert "syncunit ddl" in warnings[0]


def test_a_device_syncs_through_the_fastapi_app(
    database: str, service: LiveServer, device: SyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="syncunit"):
        result = device.sync("Field")
        assert _scope_index_warnings(caplog) == []  # the migration created them all
    assert result.rows_in == {"LocalSite": 2, "LocalWorkOrder": 6}
    assert _local_orders(device) == _orm_orders(database, 1)

    # The device closes a job; the service's own API reads it back through the ORM.
    job = next(iter(_local_orders(device)))
    device.update("LocalWorkOrder", job, {"status": "done", "notes": "replaced the pump"})
    assert device.sync("Field").applied == 1
    got = httpx.get(f"{service.url}/work-orders/{job}", timeout=10).json()
    assert (got["status"], got["notes"]) == ("done", "replaced the pump")

    # The service creates a job and moves another to Bo: the next sync shows both.
    new = httpx.post(
        f"{service.url}/work-orders",
        json={"site_id": 3, "technician_id": 1, "title": "Inspect boiler", "due_on": "2027-02-01"},
        timeout=10,
    ).json()
    moved = sorted(_local_orders(device))[-1]
    r = httpx.post(
        f"{service.url}/work-orders/{moved}/reassign", params={"technician_id": 2}, timeout=10
    )
    assert r.status_code == 200
    result = device.sync("Field")
    assert result.total_in == 1
    assert result.total_removed == 1
    local = _local_orders(device)
    assert new["id"] in local
    assert moved not in local
    assert local == _orm_orders(database, 1)


def test_the_mounted_app_keeps_the_service_s_auth_and_admin_mark(service: LiveServer) -> None:
    assert httpx.get(f"{service.url}/sync/v1/catalog", timeout=10).status_code == 401
    ok = httpx.get(f"{service.url}/sync/v1/catalog", headers={"Authorization": "Bearer tok-bo"})
    assert ok.status_code == 200
    overview = f"{service.url}/sync/inspector/api/overview"
    assert httpx.get(overview, headers={"Authorization": "Bearer tok-bo"}).status_code == 403
    assert httpx.get(overview, headers={"Authorization": "Bearer tok-dee"}).status_code == 200


def test_the_tracking_migration_downgrades_cleanly(database: str) -> None:
    cfg = alembic_config(database)
    command.downgrade(cfg, "0001")
    engine = sa.create_engine(database)
    with engine.connect() as conn:
        assert _syncunit_objects(conn) == []
    engine.dispose()
    command.upgrade(cfg, "head")  # and upgrades again: every existing row gets a version
    engine = sa.create_engine(database)
    with engine.connect() as conn:
        unstamped = conn.exec_driver_sql(
            "SELECT count(*) FROM work_order WHERE syncunit_version IS NULL"
        )
        assert unstamped.scalar() == 0
    engine.dispose()
