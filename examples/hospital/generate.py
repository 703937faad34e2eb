"""Deterministic sample data for the hospital example, of any size."""

from __future__ import annotations

import datetime as dt
import random
import uuid

import sqlalchemy as sa

from .models import appointment, doctor, hospital, patient, specialty, staff

CITIES = ["Lisbon", "Porto", "Braga", "Coimbra", "Faro", "Aveiro", "Evora", "Leiria"]
SPECIALTIES = [
    "Cardiology", "Dermatology", "Neurology", "Oncology", "Pediatrics", "Psychiatry",
    "Radiology", "Orthopedics", "Ophthalmology", "Urology", "Gastroenterology", "Endocrinology",
]  # fmt: skip
FIRST = ["Ana", "Rui", "Marta", "Joao", "Ines", "Pedro", "Sofia", "Tiago", "Rita", "Nuno", "Eva"]
LAST = ["Silva", "Santos", "Ferreira", "Pereira", "Oliveira", "Costa", "Rodrigues", "Martins"]
EPOCH = dt.datetime(2026, 1, 5, 8, 0)


def time_ordered_id(rng: random.Random, when: dt.datetime) -> str:
    """A UUIDv7-shaped key for ``when``: deterministic for a seeded generator."""
    ms = int(when.replace(tzinfo=dt.UTC).timestamp() * 1000)
    value = (ms << 80) | (0x7 << 76) | (rng.getrandbits(12) << 64) | (0b10 << 62)
    return str(uuid.UUID(int=value | rng.getrandbits(62)))


def generate(
    engine: sa.Engine,
    *,
    appointments: int = 100_000,
    hospitals: int = 8,
    doctors: int = 160,
    patients: int | None = None,
    seed: int = 7,
) -> dict[str, int]:
    """Fill empty tables; returns row counts. Staff ``token-h{N}`` works at hospital N."""
    rng = random.Random(seed)
    patients = patients or max(100, appointments // 5)
    with engine.begin() as conn:
        conn.execute(
            hospital.insert(),
            [
                {"id": i, "name": f"{CITIES[(i - 1) % len(CITIES)]} General {i}",
                 "city": CITIES[(i - 1) % len(CITIES)]}
                for i in range(1, hospitals + 1)
            ],
        )  # fmt: skip
        conn.execute(
            specialty.insert(), [{"id": i + 1, "name": n} for i, n in enumerate(SPECIALTIES)]
        )
        conn.execute(
            doctor.insert(),
            [
                {"id": i, "name": f"Dr. {rng.choice(FIRST)} {rng.choice(LAST)} {i}",
                 "hospital_id": (i - 1) % hospitals + 1,
                 "specialty_id": rng.randint(1, len(SPECIALTIES))}
                for i in range(1, doctors + 1)
            ],
        )  # fmt: skip
        conn.execute(
            staff.insert(),
            [
                {"id": i, "name": f"Desk {i}", "hospital_id": i, "token": f"token-h{i}"}
                for i in range(1, hospitals + 1)
            ],
        )
        batch: list[dict[str, object]] = []
        for i in range(1, patients + 1):
            batch.append(
                {"id": i, "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
                 "phone": f"+351 9{rng.randint(10_000_000, 99_999_999)}"}
            )  # fmt: skip
            if len(batch) == 10_000:
                conn.execute(patient.insert(), batch)
                batch = []
        if batch:
            conn.execute(patient.insert(), batch)
            batch = []
        # Appointments in time order (as they are booked), so keys are time-ordered too.
        for i in range(appointments):
            start = EPOCH + dt.timedelta(minutes=15 * (i // doctors) * 2 + rng.randint(0, 1) * 15)
            batch.append(
                {
                    "id": time_ordered_id(rng, start - dt.timedelta(days=30)),
                    "doctor_id": i % doctors + 1,
                    "patient_id": rng.randint(1, patients),
                    "starts_at": start,
                    "ends_at": start + dt.timedelta(minutes=15),
                    "status": "booked",
                    "room": f"R{rng.randint(1, 40)}",
                    "notes": rng.choice(["", "first visit", "follow-up", "bring test results"]),
                }
            )
            if len(batch) == 10_000:
                conn.execute(appointment.insert(), batch)
                batch = []
        if batch:
            conn.execute(appointment.insert(), batch)
    return {
        "hospitals": hospitals,
        "specialties": len(SPECIALTIES),
        "doctors": doctors,
        "patients": patients,
        "appointments": appointments,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m syncunit.examples.hospital.generate --database URL``: a sample database."""
    import argparse

    from .server import build

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--database", required=True, help="e.g. sqlite:///hospital.sqlite")
    parser.add_argument("--appointments", type=int, default=100_000)
    parser.add_argument("--hospitals", type=int, default=8)
    parser.add_argument("--doctors", type=int, default=160)
    args = parser.parse_args(argv)
    server = build(args.database)
    counts = generate(
        server.store.engine,
        appointments=args.appointments,
        hospitals=args.hospitals,
        doctors=args.doctors,
    )
    print(", ".join(f"{v:,} {k}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
