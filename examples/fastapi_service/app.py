"""The FastAPI service: its own REST API on the ORM, plus syncunit mounted at ``/sync``.

Run it (after ``alembic upgrade head``)::

    FIELD_DATABASE_URL=sqlite:///field.sqlite uvicorn fastapi_service.app:app

Devices sync with ``SyncClient("http://host:8000/sync", "device.sqlite", token=...)``.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from typing import Annotated

import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel
from sqlalchemy.orm import Session, sessionmaker

from fastapi_service.models import WorkOrder
from fastapi_service.sync import build


class WorkOrderIn(BaseModel):
    site_id: int
    technician_id: int
    title: str
    due_on: dt.date
    notes: str = ""


class WorkOrderOut(WorkOrderIn):
    id: str
    status: str


def session(request: Request) -> Iterator[Session]:
    """An ORM session per request."""
    with request.app.state.sessions() as s:
        yield s


Db = Annotated[Session, Depends(session)]


def create_service(database_url: str) -> FastAPI:
    """The service on ``database_url`` (migrated with Alembic beforehand)."""
    api = FastAPI(title="Field service")
    api.state.sessions = sessionmaker(sa.create_engine(database_url))

    @api.get("/work-orders/{order_id}")
    def get_work_order(order_id: str, s: Db) -> WorkOrderOut:
        order = s.get(WorkOrder, order_id)
        if order is None:
            raise HTTPException(404, f"no work order {order_id}")
        return _out(order)

    @api.post("/work-orders", status_code=201)
    def create_work_order(body: WorkOrderIn, s: Db) -> WorkOrderOut:
        order = WorkOrder(**body.model_dump())
        s.add(order)
        s.commit()
        return _out(order)

    @api.post("/work-orders/{order_id}/reassign")
    def reassign(order_id: str, technician_id: int, s: Db) -> WorkOrderOut:
        order = s.get(WorkOrder, order_id)
        if order is None:
            raise HTTPException(404, f"no work order {order_id}")
        order.technician_id = technician_id
        s.commit()
        return _out(order)

    # The sync server: its own engine and pool on the same database.
    api.mount("/sync", build(database_url).app)
    return api


def _out(order: WorkOrder) -> WorkOrderOut:
    return WorkOrderOut(
        id=order.id,
        site_id=order.site_id,
        technician_id=order.technician_id,
        title=order.title,
        due_on=order.due_on,
        notes=order.notes,
        status=order.status,
    )


def __getattr__(name: str) -> FastAPI:
    if name == "app":  # ``uvicorn fastapi_service.app:app``
        return create_service(os.environ.get("FIELD_DATABASE_URL", "sqlite:///field.sqlite"))
    raise AttributeError(name)
