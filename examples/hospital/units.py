"""What the hospital app syncs, and when (the method's sync units).

* **Splash**: a small summary for the home screen, replaced whole.
* **Login**: every doctor, and the appointments of the user's hospital,
  denormalized so the agenda needs no joins.
"""

from __future__ import annotations

import sqlalchemy as sa

from hospital.models import appointment, doctor, hospital, patient, specialty
from syncunit import Join, Stream, SyncSchema, SyncUnit

my_hospital = sa.bindparam("hospital_id")  # filled from the signed-in staff member

doctors = Stream(
    "doctors",
    doctor,
    {
        "id": doctor.c.id,
        "name": doctor.c.name,
        "hospital_id": doctor.c.hospital_id,
        "specialty": specialty.c.name,
        "hospital": hospital.c.name,
        "city": hospital.c.city,
    },
    joins=[
        Join(specialty, doctor.c.specialty_id == specialty.c.id),
        Join(hospital, doctor.c.hospital_id == hospital.c.id),
    ],
    local_table="LocalDoctor",
)

appointments = Stream(
    "appointments",
    appointment,
    {
        "id": appointment.c.id,
        "doctor_id": appointment.c.doctor_id,
        "patient_id": appointment.c.patient_id,
        "starts_at": appointment.c.starts_at,
        "ends_at": appointment.c.ends_at,
        "status": appointment.c.status,
        "room": appointment.c.room,
        "notes": appointment.c.notes,
        "patient_name": patient.c.name,
        "doctor_name": doctor.c.name,
        "specialty": specialty.c.name,
        "hospital": hospital.c.name,
    },
    joins=[
        Join(doctor, appointment.c.doctor_id == doctor.c.id),
        Join(patient, appointment.c.patient_id == patient.c.id),
        Join(specialty, doctor.c.specialty_id == specialty.c.id),
        Join(hospital, doctor.c.hospital_id == hospital.c.id),
    ],
    where=doctor.c.hospital_id == my_hospital,
    local_table="LocalAppointment",
    indexes=[["starts_at"], ["doctor_id", "starts_at"]],
)

summary = Stream.full(
    "summary",
    sa.select(
        doctor.c.id.label("doctor_id"),
        doctor.c.name.label("doctor_name"),
        sa.func.count(appointment.c.id).label("booked"),
        sa.func.min(appointment.c.starts_at).label("first_at"),
    )
    .select_from(
        doctor.outerjoin(
            appointment,
            sa.and_(appointment.c.doctor_id == doctor.c.id, appointment.c.status == "booked"),
        )
    )
    .where(doctor.c.hospital_id == my_hospital)
    .group_by(doctor.c.id, doctor.c.name),
    key="doctor_id",
    local_table="LocalSummary",
)

splash = SyncUnit("Splash", [summary])
login = SyncUnit("Login", [doctors, appointments])

schema = SyncSchema([splash, login])
