"""Pushed inserts of new rows, written as one batch with set-based checks.

A device that worked offline pushes runs of new rows (bookings made in the
field). One by one, each costs a savepoint, an insert, a scope query and its
rules' queries. Here a run is written with one ``executemany`` inside one
savepoint, and checked with one statement per check over the whole run:

1. every mutation maps and validates (the same ``_map`` as one by one);
2. no key repeats in the run, and none exists on the server yet (the insert
   fails on the primary key otherwise);
3. after the insert, every row is in the principal's write scope (one query);
4. every business rule's set-based form (``policies.set_check``) says yes.

If any check says no, or the database refuses a statement of the batch (a
constraint, a value its column cannot hold, a rule's query that fails), the
savepoint is rolled back and the caller applies the run one mutation at a time,
so each mutation gets exactly the result it would get alone: the batch is only
a faster way to reach the same "applied" for all. Only what would end the
request one by one too (a lost connection, a lost serialization race) ends it
here.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from syncunit.policies import BatchContext, set_check_of
from syncunit.protocol import Mutation
from syncunit.server.auth import Principal
from syncunit.server.mutation import _Savepoint, insert_defaults, sql_nulls
from syncunit.server.values import Rejected, coerce, coerce_key, to_datetime
from syncunit.units import Stream, logical_type

if TYPE_CHECKING:
    from syncunit.server.push import PushApplier

log = logging.getLogger("syncunit.server")

#: Most mutations written as one batch; a run longer than this is cut in batches.
BATCH_MAX = 1000
#: Fewest mutations worth a batch (below, the one-by-one path is as fast).
BATCH_MIN = 4


def batchable(applier: PushApplier, s: Stream | None) -> bool:
    """Whether inserts into ``s`` may be batched: every rule has a set-based form."""
    return s is not None and all(set_check_of(rule) is not None for rule in s.rules)


#: A batch's keys and its rows as base-table columns, mapped and coerced.
Prepared = tuple[list[Any], list[dict[str, Any]]]


def prepare_batch(
    applier: PushApplier, s: Stream, mutations: Sequence[Mutation]
) -> Prepared | None:
    """Keys and rows of ``mutations`` (inserts into ``s``); None if they must go one by
    one (a value refused, a key repeated, rows of different columns)."""
    try:
        store = applier.store
        prepared = _columnar(
            s, mutations, nul=store.text_holds_nul, native=store.native_decimals_and_zones
        )
        if prepared is None:
            prepared = _one_by_one(applier, s, mutations)
    except Rejected:
        return None
    if prepared is None:
        return None
    keys, rows = prepared
    columns = rows[0].keys()
    if len(set(keys)) != len(keys) or any(r.keys() != columns for r in rows):
        return None
    return prepared


def write_batch(
    applier: PushApplier,
    conn: Connection,
    principal: Principal,
    s: Stream,
    mutations: Sequence[Mutation],
    prepared: Prepared | None,
) -> bool:
    """Write ``mutations`` (inserts into ``s``, ``prepared`` by ``prepare_batch``) at
    once; False if they must go one by one.

    On False nothing of the batch remains written.
    """
    if prepared is None:
        return False
    keys, rows = prepared
    # A key that exists already (an upsert) is not looked for first: the plain INSERT
    # fails on the primary key, the savepoint is rolled back and the one-by-one path
    # checks it against the policy. Batches are almost always new rows.
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    savepoint = _Savepoint(dbapi)
    try:
        ok = _write_and_check(applier, conn, principal, s, keys, rows)
    except sa.exc.SQLAlchemyError as exc:
        if _fails_the_request(applier, exc):
            raise  # the transaction is gone or doomed: nothing to roll back to
        # The database refused a value or a statement of the batch (a key that exists,
        # an integer too large for its column, a rule's query): the
        # one-by-one path gives each mutation its own result (or retries it).
        ok = False
    except BaseException:
        savepoint.rollback()
        raise
    if ok:
        savepoint.commit()
    else:
        savepoint.rollback()
    return ok


def _fails_the_request(applier: PushApplier, exc: sa.exc.SQLAlchemyError) -> bool:
    """Whether ``exc`` ends the whole request, as it would one by one: the connection
    is lost, or the transaction lost a race and is run again (``PushApplier.apply``).
    Anything else is left to the one-by-one path: a value of the batch's data is
    answered per mutation, and a lock or a timeout is tried again per change, then
    fails the request, or rejects a change that fails so request after request."""
    return isinstance(exc, sa.exc.DBAPIError) and (
        exc.connection_invalidated or applier.store.retryable(exc)
    )


def _columnar(
    s: Stream, mutations: Sequence[Mutation], *, nul: bool, native: bool = True
) -> tuple[list[Any], list[dict[str, Any]]] | None:
    """Keys and rows of the batch, each column coerced in one pass over the batch.

    For the common batch: every mutation names the same columns, all of them known
    and writable, with no NULL (a default may apply) and no second key. Returns
    None otherwise (``_one_by_one`` then maps each mutation as ``_map`` does).
    Raises ``Rejected`` on a value ``coerce`` refuses (``nul``: as ``coerce`` takes it;
    ``native``: as ``coerce_key``).
    """
    names = tuple(mutations[0].values)
    plan = _plan(s, names)
    if plan is None or not names:
        return None
    given = [m.values for m in mutations]
    # Each mutation's values in ``names`` order, taken in C (one tuple per mutation).
    if any(tuple(v) != names for v in given):
        return None
    table = list(map(operator.itemgetter(*names), given))  # one name: its values
    if len(names) == 1:
        by_name = {names[0]: tuple(table)}
    else:
        by_name = dict(zip(names, zip(*table, strict=True), strict=True))
    if any(None in column for column in by_name.values()):
        return None
    raw_keys = [m.key for m in mutations]
    if s.key in by_name and list(by_name[s.key]) != raw_keys:
        return None
    pk = s.key_column
    keys = _coerce_column(raw_keys, pk, s.key, key=True, native=native)
    if any(k is None for k in keys):
        return None
    columns = [_coerce_column(list(by_name[n]), c, n, nul, native=native) for n, c in plan]
    out = [c.name for _, c in plan] + [pk.name]
    rows = [dict(zip(out, row, strict=True)) for row in zip(*columns, keys, strict=True)]
    return keys, rows


def _coerce_column(
    values: list[Any],
    column: sa.Column[Any],
    local: str,
    nul: bool = True,
    key: bool = False,
    native: bool = True,
) -> list[Any]:
    """``coerce`` of each value (``coerce_key`` for the ``key``), in one pass for the
    plain cases (same checks, same results); anything else value by value."""
    kind = logical_type(column.type)
    if kind == "integer" and all(type(v) is int for v in values):
        return values
    plain_text = kind == "text" and not isinstance(column.type, sa.Enum)  # a label: checked
    if plain_text and all(type(v) is str for v in values):
        length = getattr(column.type, "length", None)
        fits = length is None or max(map(len, values), default=0) <= length
        if fits and (nul or not any("\x00" in v for v in values)):
            return values
    if key:
        return [coerce_key(v, column, local, native=native) for v in values]
    if kind == "datetime" and all(type(v) is str for v in values):
        try:
            return [to_datetime(v, column) for v in values]
        except (ValueError, OverflowError):
            pass  # coerce says which value and why
    return [coerce(v, column, local, nul=nul, native=native) for v in values]


def _one_by_one(
    applier: PushApplier, s: Stream, mutations: Sequence[Mutation]
) -> tuple[list[Any], list[dict[str, Any]]] | None:
    """Keys and rows of the batch, each mutation mapped by ``_map``."""
    pk = s.key_column
    keys: list[Any] = []
    rows: list[dict[str, Any]] = []
    for m in mutations:
        key = coerce_key(m.key, pk, s.key, native=applier.store.native_decimals_and_zones)
        if key is None:
            return None
        changes = applier._map(s, m, list(m.values))
        keys.append(key)
        rows.append({**changes, pk.name: key})
    return keys, rows


def _plan(s: Stream, names: tuple[str, ...]) -> list[tuple[str, sa.Column[Any]]] | None:
    """The base column of each local column in ``names`` but the key; None if one is
    unknown or read-only (``_map`` then says why)."""
    plan = []
    for name in names:
        if name == s.key:
            continue
        column = s.writable(name) if name in s.columns else None
        if column is None:
            return None
        plan.append((name, column))
    return plan


def _write_and_check(
    applier: PushApplier,
    conn: Connection,
    principal: Principal,
    s: Stream,
    keys: list[Any],
    rows: list[dict[str, Any]],
) -> bool:
    st = applier._statements(s)
    fill, computed = insert_defaults(s.base, rows[0])  # every row has the same columns
    if fill:
        rows = [{**fill, **r} for r in rows]
    applier.store.insert_new_rows(conn, s.base, [sql_nulls(s.base, r) for r in rows])
    params = applier._scope_params(s, principal)
    # A count, not the rows: no row objects to build for a check that needs none.
    scoped = conn.execute(st.scope_count, {**params, "keys": keys}).scalar_one()
    if scoped != len(keys):
        return False
    blank = dict.fromkeys(c.name for c in s.base.columns)
    full = [{**blank, **r} for r in rows]
    if computed:  # the rules see the defaults the database filled, as one by one
        pk = s.key_column
        read = conn.execute(sa.select(pk, *computed).where(pk.in_(keys))).mappings()
        stored = {r[pk.name]: r for r in read}
        if len(stored) != len(keys):
            return False
        for row, key in zip(full, keys, strict=True):
            found = stored.get(key)
            if found is None:
                return False  # a key that reads back otherwise: one by one
            row.update((c.name, found[c.name]) for c in computed)
    batch = BatchContext(
        conn=conn,
        table=s.local_table,
        keys=keys,
        rows=full,
        principal_id=principal.id,
        params=principal.params,
    )
    for rule in s.rules:
        check = set_check_of(rule)
        if check is None:
            return False
        try:
            if not check(batch):
                return False
        except sa.exc.SQLAlchemyError:
            raise
        except Exception:  # the app's code: the one-by-one path reports it per mutation
            log.exception("set-based form of rule %r failed on %s", rule, s.local_table)
            return False
    return True
