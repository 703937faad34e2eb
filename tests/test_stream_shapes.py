"""The delta engine on stream shapes beyond the example's: deep joins, literals, scopes.

Each test is one promise of the delta reader (removals along multi-level joins,
a definition hash that covers literals, no foreign identifiers, removals and
full streams in chunks), on the hospital tables with streams of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from hospital.generate import generate
from hospital.models import appointment, doctor, hospital, patient
from sqlalchemy.dialects import postgresql

from syncunit import Join, Stream, SyncSchema, SyncUnit
from syncunit.errors import DeclarationError, ProblemError
from syncunit.server import Principal, SyncServer, TokenAuth, changes
from syncunit.server.store import ServerStore
from tests.conftest import SIZE
from tests.support import (
    chunks,
    expected_rows,
    local_keys,
    local_rows,
    removed_keys,
    sent_keys,
)

#: Principals by token: two cities (the example data has Lisbon = hospital 1, Porto = 2).
TOKENS = {
    "lisbon": Principal("ana", {"city": "Lisbon", "hospital_id": 1}),
    "porto": Principal("rui", {"city": "Porto", "hospital_id": 2}),
}


def city_appointments(**overrides: Any) -> Stream:
    """Appointments in the principal's city: the filter reads a column two joins away."""
    options: dict[str, Any] = {
        "joins": [
            Join(doctor, appointment.c.doctor_id == doctor.c.id),
            Join(hospital, doctor.c.hospital_id == hospital.c.id),
            Join(patient, appointment.c.patient_id == patient.c.id),
        ],
        "where": hospital.c.city == sa.bindparam("city"),
        "local_table": "LocalCityAppointment",
    }
    options.update(overrides)
    columns = {
        "id": appointment.c.id,
        "status": appointment.c.status,
        "notes": appointment.c.notes,
        "doctor_name": doctor.c.name,
        "city": hospital.c.city,
        "patient_name": patient.c.name,
    }
    return Stream("city_appointments", appointment, columns, **options)


@pytest.fixture(params=["few changes", "through the scope"])
def shaped(
    request: pytest.FixtureRequest,
    store: ServerStore,
    serve: Callable[[Any], Any],
    make_client: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> Any:
    """``shaped(*streams)``: a live server of one unit "Pull" with ``streams`` on the
    example's data; returns (server, live, client factory by token).

    Twice: deltas read as they are here (a few changes and tombstones, by version),
    and as after a burst of writes elsewhere (through the pinned scope, key by key
    on PostgreSQL): ``FEW_CHANGES`` 0."""
    if request.param == "through the scope":
        monkeypatch.setattr(changes, "FEW_CHANGES", 0)
    generate(store.engine, **SIZE)
    state: dict[str, Any] = {}

    def start(*streams: Stream) -> tuple[SyncServer, Any, Callable[..., Any]]:
        server = SyncServer(
            SyncSchema([SyncUnit("Pull", list(streams))]), store, authenticate=TokenAuth(TOKENS)
        )
        if "live" in state:
            state["live"].app = server.app  # a restart with another definition
        else:
            state["live"] = serve(server.app)
        live = state["live"]

        def device(token: str, **options: Any) -> Any:
            return make_client(token, name=f"{token}-device", url=live.url, **options)

        return server, live, device

    return start


def _check(server: SyncServer, device: Any, token: str) -> None:
    """Each local table equals its stream's query on the server for this principal."""
    params = TOKENS[token].params
    for s in server.schema.units["Pull"].streams:
        assert local_rows(device, server, s) == expected_rows(server, s, params), s.name


def _keys(store: ServerStore, query: sa.Select[Any]) -> list[Any]:
    with store.engine.connect() as conn:
        return list(conn.execute(query).scalars())


# -- 1. removals along multi-level joins -------------------------------------------------


def test_hospitals_swapping_cities_swap_the_rows(shaped, store, plain_sql):
    server, _, device = shaped(city_appointments())
    ana = device("lisbon")
    ana.sync("Pull")
    plain_sql("UPDATE hospital SET city = 'Braga' WHERE id = 1")
    plain_sql("UPDATE hospital SET city = 'Lisbon' WHERE id = 2")

    ana.sync("Pull")

    assert local_keys(ana, "LocalCityAppointment") == set(
        _keys(
            store,
            sa.select(appointment.c.id)
            .join(doctor, doctor.c.id == appointment.c.doctor_id)
            .where(doctor.c.hospital_id == 2),
        )
    )
    _check(server, ana, "lisbon")


def test_a_row_whose_hospital_and_doctor_both_changed_is_removed(shaped, store, plain_sql):
    server, _, device = shaped(city_appointments())
    ana = device("lisbon")
    ana.sync("Pull")
    doc = _keys(store, sa.select(doctor.c.id).where(doctor.c.hospital_id == 1))[0]
    # In one window the doctor moves to hospital 2, and hospital 1 to Braga. Alone,
    # neither old image proves the doctor's rows were here: the doctor's (H1) meets
    # H1's new city, H1's (Lisbon) meets only the doctors still in H1. Together they do.
    plain_sql("UPDATE doctor SET hospital_id = 2 WHERE id = :d", {"d": doc})
    plain_sql("UPDATE hospital SET city = 'Braga' WHERE id = 1")

    ana.sync("Pull")

    assert local_keys(ana, "LocalCityAppointment") == set()  # Lisbon has no hospital now
    _check(server, ana, "lisbon")


# -- 2. the definition hash covers literal values ------------------------------------------


def test_a_changed_literal_resets_every_device_to_the_new_scope(shaped, store, plain_sql):
    mine = _keys(store, sa.select(appointment.c.id).order_by(appointment.c.id))
    plain_sql("UPDATE appointment SET status = 'cancelled' WHERE id = :k", {"k": mine[0]})
    plain_sql("UPDATE appointment SET status = 'archived' WHERE id = :k", {"k": mine[1]})

    def stream(status: str) -> Stream:
        where = sa.and_(hospital.c.city == sa.bindparam("city"), appointment.c.status != status)
        return city_appointments(where=where)

    old, new = stream("cancelled"), stream("archived")
    assert old.definition_hash != new.definition_hash
    server, _, device = shaped(old)
    devices = {token: device(token) for token in TOKENS}
    for token, d in devices.items():
        d.sync("Pull")
        _check(server, d, token)

    server2, _, _ = shaped(new)  # the server restarts with the changed literal
    for token, d in devices.items():
        result = d.sync("Pull")
        assert result.resets == ["city_appointments"]
        _check(server2, d, token)


def test_the_definition_hash_covers_columns_joins_and_local_table():
    base = city_appointments()
    changed = [
        city_appointments(local_table="Other"),
        city_appointments(where=hospital.c.city == "Lisbon"),
        city_appointments(where=hospital.c.city == "Porto"),
        city_appointments(joins=[*base.joins[:2], Join(patient, patient.c.id == 1)]),
        Stream("city_appointments", appointment, [appointment.c.id, appointment.c.notes]),
    ]
    hashes = {base.definition_hash, *(s.definition_hash for s in changed)}
    assert len(hashes) == len(changed) + 1
    assert city_appointments().definition_hash == base.definition_hash  # and it is stable


# -- 6. no foreign identifiers --------------------------------------------------------------


def test_removals_never_name_rows_of_another_scope(shaped, store, plain_sql, tap):
    server, _, device = shaped(city_appointments())
    ana = device("lisbon", transport=tap)
    ana.sync("Pull")
    held = local_keys(ana, "LocalCityAppointment")
    porto = _keys(
        store,
        sa.select(appointment.c.id)
        .join(doctor, doctor.c.id == appointment.c.doctor_id)
        .where(doctor.c.hospital_id == 2)
        .order_by(appointment.c.id),
    )
    porto_doctors = _keys(store, sa.select(doctor.c.id).where(doctor.c.hospital_id == 2))
    # Porto's rows are deleted and moved while their doctors, patients and hospital
    # change too (what a lenient proof took as "may have been in scope").
    plain_sql("UPDATE doctor SET name = name || ' (renamed)' WHERE hospital_id = 2")
    plain_sql("UPDATE patient SET name = name || ' (renamed)'")
    plain_sql("UPDATE hospital SET name = 'Porto Central' WHERE id = 2")
    plain_sql("DELETE FROM appointment WHERE id = :k", {"k": porto[0]})
    plain_sql(
        "UPDATE appointment SET doctor_id = :d WHERE id = :k",
        {"d": porto_doctors[1], "k": porto[1]},
    )
    _allow_orphans(store, plain_sql)
    plain_sql("DELETE FROM doctor WHERE id = :d", {"d": porto_doctors[0]})
    mine = sorted(held)[0]
    plain_sql("DELETE FROM appointment WHERE id = :k", {"k": mine})

    ana.sync("Pull")

    assert removed_keys(tap.last, "city_appointments") == [mine]
    _check(server, ana, "lisbon")


def _allow_orphans(store, plain_sql):
    """Let a joined row go while rows still point at it (SQLite does not enforce foreign
    keys unless asked; PostgreSQL does, so its constraints are dropped here)."""
    if store.dialect != "sqlite":
        for col in ("doctor_id", "patient_id"):
            plain_sql(f"ALTER TABLE appointment DROP CONSTRAINT IF EXISTS appointment_{col}_fkey")


# -- 7. removals and full streams in chunks ---------------------------------------------------


def test_removals_travel_in_chunks_and_resume_after_a_cut(shaped, store, plain_sql, tap):
    server, _, device = shaped(city_appointments())
    ana = device("lisbon", transport=tap, chunk_size=16)
    ana.sync("Pull")
    gone = sorted(local_keys(ana, "LocalCityAppointment"))[:40]
    plain_sql.many("DELETE FROM appointment WHERE id = :k", [{"k": k} for k in gone])

    tap.arm(chunks=("city_appointments", 1))
    with pytest.raises(Exception, match="cut"):
        ana.sync("Pull")
    first = chunks(tap.last, "city_appointments")
    assert [len(c.removed) for c in first] == [16]
    ana.sync("Pull")

    resumed = chunks(tap.last, "city_appointments")
    assert [len(c.removed) for c in resumed if c.removed] == [16, 8]  # from where it stopped
    assert not set(gone) & local_keys(ana, "LocalCityAppointment")
    _check(server, ana, "lisbon")


def _city_summary() -> Stream:
    return Stream.full(
        "city_summary",
        sa.select(appointment.c.id.label("id"), appointment.c.status.label("status"))
        .join(doctor, doctor.c.id == appointment.c.doctor_id)
        .where(doctor.c.hospital_id == sa.bindparam("hospital_id")),
        key="id",
        local_table="LocalCitySummary",
    )


def test_a_full_stream_travels_in_chunks_applied_in_one_transaction(shaped, plain_sql, tap):
    server, _, device = shaped(_city_summary())
    ana = device("lisbon", transport=tap, chunk_size=16)
    ana.sync("Pull")
    sent = chunks(tap.last, "city_summary")
    assert len(sent) == 13  # 200 rows
    assert all(c.row_count() <= 16 for c in sent)
    assert [c.reset for c in sent] == [True] + [False] * 12
    _check(server, ana, "lisbon")
    before = ana.store.rows("LocalCitySummary")

    plain_sql("UPDATE appointment SET status = 'cancelled'")
    tap.arm(chunks=("city_summary", 5))
    with pytest.raises(Exception, match="cut"):
        ana.sync("Pull")
    assert ana.store.rows("LocalCitySummary") == before  # all or nothing

    ana.sync("Pull")
    _check(server, ana, "lisbon")
    assert sent_keys(tap.last, "city_summary")


def test_removals_never_pair_states_that_never_coexisted(shaped, store, plain_sql, tap):
    server, _, device = shaped(city_appointments())
    ana = device("lisbon", transport=tap)
    ana.sync("Pull")
    held = local_keys(ana, "LocalCityAppointment")
    doc = _keys(store, sa.select(doctor.c.id).where(doctor.c.hospital_id == 2))[0]
    theirs = set(_keys(store, sa.select(appointment.c.id).where(appointment.c.doctor_id == doc)))
    # Hospital 1 leaves Lisbon; only then does a Porto doctor work there for a while.
    # The doctor's old image (in H1) and H1's old image (in Lisbon) were never true
    # at the same moment: the doctor's rows were never in Lisbon's scope.
    plain_sql("UPDATE hospital SET city = 'Braga' WHERE id = 1")
    plain_sql("UPDATE doctor SET hospital_id = 1 WHERE id = :d", {"d": doc})
    plain_sql("UPDATE doctor SET hospital_id = 2 WHERE id = :d", {"d": doc})

    ana.sync("Pull")

    removed = set(removed_keys(tap.last, "city_appointments"))
    assert removed == held  # everything of hospital 1 left Lisbon...
    assert not removed & theirs  # ...and nothing else is named
    _check(server, ana, "lisbon")


def test_a_deleted_joined_row_clears_the_columns_copied_from_it(shaped, store, plain_sql):
    server, _, device = shaped(city_appointments())
    ana = device("lisbon")
    ana.sync("Pull")
    rows = ana.store.rows("LocalCityAppointment", ["id", "patient_name"])
    victim = rows[0][1]
    _allow_orphans(store, plain_sql)
    plain_sql("DELETE FROM patient WHERE name = :n", {"n": victim})

    ana.sync("Pull")  # the rows stay in scope (the filter does not read patients)

    names = {r[1] for r in ana.store.rows("LocalCityAppointment", ["id", "patient_name"])}
    assert victim not in names
    assert None in names
    _check(server, ana, "lisbon")


def test_removals_never_name_a_row_created_after_its_joined_row_left(shaped, store, plain_sql, tap):
    server, _, device = shaped(city_appointments())
    ana = device("lisbon", transport=tap)
    ana.sync("Pull")
    doc = _keys(store, sa.select(doctor.c.id).where(doctor.c.hospital_id == 1))[0]
    left = set(_keys(store, sa.select(appointment.c.id).where(appointment.c.doctor_id == doc)))
    assert left <= local_keys(ana, "LocalCityAppointment")
    # A Lisbon doctor moves to Porto; only then is an appointment booked with them. Its
    # row never existed while the doctor was in Lisbon: Ana must not learn its key.
    plain_sql("UPDATE doctor SET hospital_id = 2 WHERE id = :d", {"d": doc})
    plain_sql(
        "INSERT INTO appointment (id, doctor_id, patient_id, starts_at, ends_at, status,"
        " room, notes) SELECT 'created-later', :d, patient_id, starts_at, ends_at, status,"
        " room, notes FROM appointment WHERE doctor_id = :d AND id = :k",
        {"d": doc, "k": sorted(left)[0]},
    )

    ana.sync("Pull")

    removed = set(removed_keys(tap.last, "city_appointments"))
    assert "created-later" not in removed
    assert removed == left
    _check(server, ana, "lisbon")


def test_removals_never_name_a_row_created_after_its_joined_row_left_and_gone_since(
    shaped, store, plain_sql, tap
):
    server, _, device = shaped(city_appointments())
    ana = device("lisbon", transport=tap)
    ana.sync("Pull")
    doc = _keys(store, sa.select(doctor.c.id).where(doctor.c.hospital_id == 1))[0]
    left = set(_keys(store, sa.select(appointment.c.id).where(appointment.c.doctor_id == doc)))
    # As above, and the late booking is cancelled for good: its tombstone's old state
    # (this doctor) must not be paired with the doctor's state from before it existed.
    plain_sql("UPDATE doctor SET hospital_id = 2 WHERE id = :d", {"d": doc})
    plain_sql(
        "INSERT INTO appointment (id, doctor_id, patient_id, starts_at, ends_at, status,"
        " room, notes) SELECT 'created-later', :d, patient_id, starts_at, ends_at, status,"
        " room, notes FROM appointment WHERE id = :k",
        {"d": doc, "k": sorted(left)[0]},
    )
    plain_sql("DELETE FROM appointment WHERE id = 'created-later'")

    ana.sync("Pull")

    assert set(removed_keys(tap.last, "city_appointments")) == left
    _check(server, ana, "lisbon")


@pytest.mark.backends("postgres")
def test_a_transaction_open_elsewhere_does_not_blur_the_creation_order(
    shaped, store, plain_sql, tap
):
    server, _, device = shaped(city_appointments())
    ana = device("lisbon", transport=tap)
    ana.sync("Pull")
    doc = _keys(store, sa.select(doctor.c.id).where(doctor.c.hospital_id == 1))[0]
    left = set(_keys(store, sa.select(appointment.c.id).where(appointment.c.doctor_id == doc)))
    # Another transaction holds an id the whole time (the watermark stays behind it),
    # while the doctor moves and, after that commits, a row is booked with them.
    with store.engine.connect() as other, other.begin():
        other.exec_driver_sql("SELECT pg_current_xact_id()")
        plain_sql("UPDATE doctor SET hospital_id = 2 WHERE id = :d", {"d": doc})
        plain_sql(
            "INSERT INTO appointment (id, doctor_id, patient_id, starts_at, ends_at, status,"
            " room, notes) SELECT 'created-later', :d, patient_id, starts_at, ends_at,"
            " status, room, notes FROM appointment WHERE id = :k",
            {"d": doc, "k": sorted(left)[0]},
        )

    ana.sync("Pull")

    assert set(removed_keys(tap.last, "city_appointments")) == left
    _check(server, ana, "lisbon")


def test_removals_never_name_a_key_given_after_its_joined_row_left(shaped, store, plain_sql, tap):
    server, _, device = shaped(city_appointments())
    ana = device("lisbon", transport=tap)
    ana.sync("Pull")
    doc = _keys(store, sa.select(doctor.c.id).where(doctor.c.hospital_id == 1))[0]
    left = set(_keys(store, sa.select(appointment.c.id).where(appointment.c.doctor_id == doc)))
    renamed = sorted(left)[0]
    # The doctor moves to Porto, then one of their rows gets a new key: under that key
    # the row was never in Lisbon (a key change counts as a creation).
    plain_sql("UPDATE doctor SET hospital_id = 2 WHERE id = :d", {"d": doc})
    plain_sql("UPDATE appointment SET id = 'given-later' WHERE id = :k", {"k": renamed})

    ana.sync("Pull")

    assert set(removed_keys(tap.last, "city_appointments")) == left
    _check(server, ana, "lisbon")


# -- full streams whose key can be NULL ------------------------------------------------------


def test_a_full_stream_row_with_a_null_key_fails_the_stream_and_says_why(
    shaped, store, plain_sql, caplog
):
    # Keyed on a column an outer join can leave NULL: a doctor's hospital, by name.
    rooms = Stream.full(
        "rooms",
        sa.select(hospital.c.name.label("hospital"), sa.func.count().label("doctors"))
        .select_from(doctor.outerjoin(hospital, doctor.c.hospital_id == hospital.c.id))
        .group_by(hospital.c.name),
        key="hospital",
        local_table="LocalRooms",
    )
    server, _, device = shaped(rooms)
    ana = device("lisbon")
    ana.sync("Pull")
    before = ana.store.rows("LocalRooms")
    assert before
    assert all(r[0] is not None for r in before)
    _allow_orphans(store, plain_sql)
    if store.dialect != "sqlite":
        plain_sql("ALTER TABLE doctor DROP CONSTRAINT IF EXISTS doctor_hospital_id_fkey")
    plain_sql("UPDATE doctor SET hospital_id = 99 WHERE id = 1")  # now outside any hospital

    with pytest.raises(ProblemError) as info:
        ana.sync("Pull")

    assert info.value.status == 500
    assert ana.store.rows("LocalRooms") == before  # nothing of it applied
    assert "'rooms': a row has a NULL key 'hospital'" in caplog.text
    assert "IS NOT NULL" in caplog.text
    plain_sql("UPDATE doctor SET hospital_id = 1 WHERE id = 1")
    ana.sync("Pull")
    _check(server, ana, "lisbon")


# -- filters that a joined row's absence satisfies ---------------------------------------------


@pytest.mark.parametrize(
    "where",
    [
        doctor.c.name.is_(None),
        sa.or_(hospital.c.city == sa.bindparam("city"), hospital.c.city.is_(None)),
        sa.func.coalesce(hospital.c.city, "Lisbon") == sa.bindparam("city"),
        hospital.c.city.is_distinct_from("Porto"),
        sa.case((hospital.c.city.is_(None), True), else_=False),
    ],
    ids=["is-null", "or-is-null", "coalesce", "distinct-from", "case"],
)
def test_a_filter_a_missing_joined_row_satisfies_is_refused_at_declaration(where):
    # A missing joined row (the outer join's NULLs) satisfies such a filter: inserting
    # that row later moves the base row out of scope and leaves no tombstone to show it.
    with pytest.raises(DeclarationError, match="row is missing") as info:
        city_appointments(where=where)
    assert "IS NOT NULL" in str(info.value)  # says what to write instead


def test_a_filter_reading_a_table_it_does_not_join_is_refused_at_declaration():
    """A membership subquery (rows of the doctors a principal's specialty lists): no
    tracking reaches the subquery's table, so a change there would move rows in or
    out of scope unseen (and the server failed to build with a KeyError)."""
    from hospital.models import specialty

    mine = sa.select(specialty.c.id).where(specialty.c.name == sa.bindparam("specialty"))
    with pytest.raises(DeclarationError, match=r"reads table 'specialty'.*Join 'specialty'"):
        city_appointments(where=doctor.c.specialty_id.in_(mine))
    joined = Join(specialty, doctor.c.specialty_id == specialty.c.id)
    city_appointments(
        joins=[*city_appointments().joins, joined],
        where=specialty.c.name == sa.bindparam("specialty"),
    )


def test_a_join_reading_a_table_it_does_not_join_is_refused_at_declaration():
    from hospital.models import specialty

    listed = sa.select(specialty.c.id).where(specialty.c.name == "Cardiology")
    on = sa.and_(appointment.c.doctor_id == doctor.c.id, doctor.c.specialty_id.in_(listed))
    joins = [
        Join(doctor, on),
        Join(hospital, doctor.c.hospital_id == hospital.c.id),
        Join(patient, appointment.c.patient_id == patient.c.id),
    ]
    with pytest.raises(DeclarationError, match=r"join of 'doctor' reads table 'specialty'"):
        city_appointments(joins=joins)


def test_a_filter_reading_other_rows_of_the_base_table_is_refused_at_declaration():
    """Scope decided by other rows of the same table (a patient's appointments are in
    scope once one of them is flagged): flagging one row moves rows that did not
    change, which no delta sees."""
    flagged = sa.select(appointment.c.patient_id).where(appointment.c.notes == "FLAG")
    where = sa.and_(hospital.c.city == sa.bindparam("city"), appointment.c.patient_id.in_(flagged))
    with pytest.raises(DeclarationError, match="other rows of 'appointment'"):
        city_appointments(where=where)


def test_an_alias_or_a_table_joined_twice_is_refused_at_declaration():
    """Tracking maps a change of a table to the one join that reads it: an alias (the
    referring doctor beside the attending one) failed with an AttributeError, and a
    table joined twice built a query the database refused as ambiguous."""
    base_joins = city_appointments().joins
    referring = doctor.alias("referring")
    aliased = Join(referring, appointment.c.doctor_id == referring.c.id)
    with pytest.raises(DeclarationError, match=r"joined table 'referring' is not a Table"):
        city_appointments(joins=[*base_joins, aliased])
    again = Join(doctor, appointment.c.doctor_id == doctor.c.id)
    with pytest.raises(DeclarationError, match=r"reads table 'doctor' twice"):
        city_appointments(joins=[*base_joins, again])
    with pytest.raises(DeclarationError, match=r"base table 'pick' is not a Table"):
        Stream("picked", sa.select(appointment).subquery("pick"), [appointment.c.id])


def test_a_filter_that_requires_the_joined_row_is_accepted():
    city_appointments(where=sa.and_(doctor.c.id.is_not(None), doctor.c.name.is_(None)))
    city_appointments(where=appointment.c.doctor_id.is_(None))  # the base table's own column
    city_appointments(where=hospital.c.city.is_not(None))


# -- column types ----------------------------------------------------------------------


def _typed(kind: Any) -> sa.Table:
    return sa.Table(
        "item", sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("owner", sa.String(20), nullable=False),
        sa.Column("v", kind),
    )  # fmt: skip


@pytest.mark.parametrize(
    "kind",
    [
        postgresql.ARRAY(sa.Integer),
        postgresql.INET(),
        postgresql.INT4RANGE(),
        postgresql.HSTORE(),
        postgresql.TSVECTOR(),
    ],
    ids=["array", "inet", "range", "hstore", "tsvector"],
)
def test_a_column_no_sync_can_carry_is_refused_at_declaration(kind: Any) -> None:
    """Such a column was sent as text: its values (a list, an address, a range) failed
    every sync of its units, on the server or on the device, for good."""
    item = _typed(kind)
    owned = item.c.owner == sa.bindparam("owner")
    with pytest.raises(DeclarationError, match=r"column 'v' is of type") as info:
        Stream("items", item, list(item.c), where=owned)
    assert repr(kind) in str(info.value)
    assert "sa.cast(item.c.v, sa.Text)" in str(info.value)  # says what to write instead
    summary = sa.select(item.c.owner, sa.func.array_agg(item.c.id).label("ids"))
    with pytest.raises(DeclarationError, match=r"column 'ids' is of type ARRAY"):
        Stream.full("summary", summary.group_by(item.c.owner), key="owner")
    # As the refusal says: sent as text, read-only on devices (a filter may still bind
    # an array, which is no column sent).
    Stream("items", item, {"id": item.c.id, "v": sa.cast(item.c.v, sa.Text)}, where=owned)
    in_list = item.c.id == sa.func.any(sa.bindparam("ids", type_=postgresql.ARRAY(sa.Integer)))
    Stream("listed", item, [item.c.id, item.c.owner], where=sa.and_(owned, in_list))


class _Label(sa.types.TypeDecorator[str]):
    impl = postgresql.CITEXT()
    cache_ok = True


@pytest.mark.parametrize(
    "kind",
    [sa.Interval(), postgresql.INTERVAL(), postgresql.CITEXT(), _Label(), sa.Enum("a", "b")],
    ids=["interval", "pg-interval", "citext", "type-decorator", "enum"],
)
def test_columns_sent_as_text_are_accepted(kind: Any) -> None:
    item = _typed(kind)
    Stream("items", item, list(item.c), where=item.c.owner == sa.bindparam("owner"))


@pytest.mark.backends("postgres")
def test_a_column_cast_as_the_refusal_says_syncs(new_database: Any, serve: Any, tmp_path: Any):
    from syncunit import SyncClient

    meta = sa.MetaData()
    item = sa.Table(
        "item", meta,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("owner", sa.String(20), nullable=False),
        sa.Column("address", postgresql.INET()),
        sa.Column("sizes", postgresql.ARRAY(sa.Integer)),
    )  # fmt: skip
    columns = {
        "id": item.c.id,
        "owner": item.c.owner,
        "address": sa.cast(item.c.address, sa.Text),
        "sizes": sa.cast(item.c.sizes, sa.Text),
    }
    stream = Stream("items", item, columns, where=item.c.owner == sa.bindparam("city"))
    server = SyncServer(
        SyncSchema([SyncUnit("Pull", [stream])]),
        new_database("items"),
        authenticate=TokenAuth(TOKENS),
        install=False,
    )
    meta.create_all(server.store.engine)
    server.store.install(server.schema)
    with server.store.engine.begin() as conn:
        conn.execute(item.insert(), {"id": 1, "owner": "Lisbon", "address": "10.0.0.1",
                                     "sizes": [1, 2]})  # fmt: skip
    device = SyncClient(serve(server.app).url, tmp_path / "items.sqlite", token="lisbon")
    try:
        assert device.sync("Pull").rows_in == {"items": 1}
        rows = device.store.query("SELECT id, owner, address, sizes FROM items")
        assert rows == [(1, "Lisbon", "10.0.0.1/32", "{1,2}")]
    finally:
        device.close()
        server.store.engine.dispose()
