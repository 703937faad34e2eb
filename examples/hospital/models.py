"""The server's normalized tables (SQLAlchemy Core; ORM users pass ``Model.__table__``)."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

hospital = sa.Table(
    "hospital",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(120), nullable=False),
    sa.Column("city", sa.String(80), nullable=False),
)

specialty = sa.Table(
    "specialty",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(80), nullable=False),
)

doctor = sa.Table(
    "doctor",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(120), nullable=False),
    sa.Column("hospital_id", sa.ForeignKey("hospital.id"), nullable=False, index=True),
    sa.Column("specialty_id", sa.ForeignKey("specialty.id"), nullable=False, index=True),
)

patient = sa.Table(
    "patient",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(120), nullable=False),
    sa.Column("phone", sa.String(40), nullable=False),
)

appointment = sa.Table(
    "appointment",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),  # UUIDv7, may be made on a device
    sa.Column("doctor_id", sa.ForeignKey("doctor.id"), nullable=False),
    sa.Column("patient_id", sa.ForeignKey("patient.id"), nullable=False, index=True),
    sa.Column("starts_at", sa.DateTime, nullable=False),
    sa.Column("ends_at", sa.DateTime, nullable=False),
    sa.Column("status", sa.String(20), nullable=False, default="booked"),
    sa.Column("room", sa.String(20), nullable=False, default=""),
    sa.Column("notes", sa.Text, nullable=False, default=""),
    # A doctor's appointments by end time: joins find a doctor's rows by its prefix,
    # and the double-booking rule reads only the appointments that end after a start.
    sa.Index("ix_appointment_doctor_ends", "doctor_id", "ends_at"),
)

#: Staff who use the app; the token authenticates them, ``hospital_id`` is their scope.
staff = sa.Table(
    "staff",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(120), nullable=False),
    sa.Column("hospital_id", sa.ForeignKey("hospital.id"), nullable=False),
    sa.Column("token", sa.String(64), nullable=False, unique=True),
)
