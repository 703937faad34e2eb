"""What the hospital app syncs, and when (the method's sync units).

* **Splash**: a small summary for the home screen, replaced whole.
* **Login**: every doctor, and the appointments of the user's hospital,
  denormalized so the agenda needs no joins.
* **SendAppointments**: push the appointments booked or changed on the device.
* **Online**: on reconnect, push everything pending and pull everything changed.
* **PatientDetails**: what the app opens: one patient's full history in this
  hospital (every appointment, across doctors, with notes) and the patient's
  contact fields, synced with ``params={"patient_id": ...}``. Login does not
  pull it; the history fills ``LocalAppointment`` beside Login's rows, and a
  row stays while either holds it.

Appointments use ``Detect``: a change to a column the backoffice changed too is
a conflict; changes to different columns merge. A business rule refuses a
booking that overlaps another of the same doctor.
"""

from __future__ import annotations

import sqlalchemy as sa

from syncunit import Join, Param, Stream, SyncSchema, SyncUnit
from syncunit.policies import BatchContext, Detect, MutationContext, set_check

from .models import appointment, doctor, hospital, patient, specialty

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


_overlap = (
    sa.select(appointment.c.starts_at, appointment.c.ends_at)
    .where(
        appointment.c.doctor_id == sa.bindparam("doctor_id"),
        appointment.c.id != sa.bindparam("key"),
        appointment.c.status == "booked",
        appointment.c.starts_at < sa.bindparam("ends_at", type_=sa.DateTime),
        appointment.c.ends_at > sa.bindparam("starts_at", type_=sa.DateTime),
    )
    .limit(1)
)


_mine = appointment.alias("mine")
_other = appointment.alias("other")
_batch_overlap = (
    sa.select(sa.literal(1))
    .select_from(
        _mine.join(
            _other,
            sa.and_(
                _other.c.doctor_id == _mine.c.doctor_id,
                _other.c.id != _mine.c.id,
                _other.c.status == "booked",
                _other.c.ends_at > _mine.c.starts_at,
                _other.c.starts_at < _mine.c.ends_at,
            ),
        )
    )
    .where(_mine.c.id.in_(sa.bindparam("keys", expanding=True)), _mine.c.status == "booked")
    .limit(1)
)


def _no_double_booking_at_once(batch: BatchContext) -> bool:
    """The rule over a batch of new appointments: none overlaps another (one query)."""
    if any(r["ends_at"] <= r["starts_at"] for r in batch.rows):
        return False
    return batch.conn.execute(_batch_overlap, {"keys": list(batch.keys)}).first() is None


@set_check(_no_double_booking_at_once)
def no_double_booking(ctx: MutationContext) -> str | None:
    """A doctor cannot have two booked appointments at overlapping times."""
    row = ctx.row
    if ctx.op == "delete":
        return None
    if row["ends_at"] <= row["starts_at"]:
        return "an appointment must end after it starts"
    if row["status"] != "booked":
        return None
    clash = ctx.conn.execute(
        _overlap,
        {
            "doctor_id": row["doctor_id"],
            "key": ctx.key,
            "starts_at": row["starts_at"],
            "ends_at": row["ends_at"],
        },
    ).first()
    if clash is None:
        return None
    return (
        f"doctor {row['doctor_id']} is already booked from {clash.starts_at:%Y-%m-%d %H:%M}"
        f" to {clash.ends_at:%H:%M}"
    )


appointment_columns = {
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
}
appointment_joins = [
    Join(doctor, appointment.c.doctor_id == doctor.c.id),
    Join(patient, appointment.c.patient_id == patient.c.id),
    Join(specialty, doctor.c.specialty_id == specialty.c.id),
    Join(hospital, doctor.c.hospital_id == hospital.c.id),
]

appointments = Stream(
    "appointments",
    appointment,
    appointment_columns,
    joins=appointment_joins,
    where=doctor.c.hospital_id == my_hospital,
    local_table="LocalAppointment",
    indexes=[["starts_at"], ["doctor_id", "starts_at"]],
    policy=Detect(merge=True),
    rules=[no_double_booking],
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

# -- what the app opens: one patient, chosen on the device ---------------------------

the_patient = sa.bindparam("patient_id")  # supplied by the app: client.sync(..., params=)
patient_param = {"patient_id": Param("integer", min=1)}

patient_history = Stream(
    "patient_history",
    appointment,
    appointment_columns,
    joins=appointment_joins,
    # The principal's hospital always bounds it: a patient id only narrows.
    where=sa.and_(doctor.c.hospital_id == my_hospital, appointment.c.patient_id == the_patient),
    local_table="LocalAppointment",
    client_params=patient_param,
)

patient_card = Stream.full(
    "patient_card",
    sa.select(patient.c.id, patient.c.name, patient.c.phone).where(
        patient.c.id == the_patient,
        # Only a patient of this hospital: another hospital's patient gives no row.
        sa.exists()
        .where(appointment.c.patient_id == patient.c.id)
        .where(appointment.c.doctor_id == doctor.c.id)
        .where(doctor.c.hospital_id == my_hospital),
    ),
    key="id",
    local_table="LocalPatient",
    client_params=patient_param,
)

splash = SyncUnit("Splash", [summary])
login = SyncUnit("Login", [doctors, appointments])
send_appointments = SyncUnit("SendAppointments", [appointments], direction="push")
online = SyncUnit("Online", [summary, doctors, appointments], direction="both")

patient_details = SyncUnit("PatientDetails", [patient_history, patient_card])

schema = SyncSchema([splash, login, send_appointments, online, patient_details])
