"""The service's ORM models: regions, technicians, customer sites and work orders.

Nothing here knows about sync: tracking columns and triggers are added by a
migration (``migrations/versions/0002_syncunit_tracking.py``), and the ORM
ignores the columns it does not map.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Boolean, Date, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from syncunit import uuid7


class Base(DeclarativeBase):
    pass


class Region(Base):
    __tablename__ = "region"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(80))


class Technician(Base):
    __tablename__ = "technician"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(120))
    region_id: Mapped[int] = mapped_column(ForeignKey("region.id"))
    api_token: Mapped[str] = mapped_column(String(64), unique=True)
    #: Dispatchers may read the sync inspector (``/sync/inspector``).
    dispatcher: Mapped[bool] = mapped_column(Boolean, default=False)


class Site(Base):
    __tablename__ = "site"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(120))
    address: Mapped[str] = mapped_column(String(200))
    region_id: Mapped[int] = mapped_column(ForeignKey("region.id"))


class WorkOrder(Base):
    __tablename__ = "work_order"

    #: Client-created rows need keys no other device can take: time-ordered UUIDs.
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=lambda: str(uuid7()))
    site_id: Mapped[int] = mapped_column(ForeignKey("site.id"))
    technician_id: Mapped[int] = mapped_column(ForeignKey("technician.id"))
    title: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), default="open")
    due_on: Mapped[dt.date] = mapped_column(Date)
    notes: Mapped[str] = mapped_column(Text, default="")

    site: Mapped[Site] = relationship()
