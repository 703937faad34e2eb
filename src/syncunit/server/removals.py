"""The removal proof: which keys may have left a client's scope since its cursor.

A client whose cursor is at version ``since`` may hold any row that was in its
scope at some moment after ``since``. Tombstones record, for each delete and
each update of a column a filter or a join reads, the row's key and the *old*
values of those columns: each one is a state that table's row had during the
window. So a row was possibly in scope in the window when some combination of
states of the tables on its filter's join paths satisfied the filter, each
table taken either as its current row or as one of its tombstones' old images.

The removals are then, exactly (see docs/architecture.md):

    keys k such that k is not in scope now, and the filter held for k on some
    combination of states in which at least one table on k's filter paths is
    an old image recorded after ``since``, each table joined to the next by
    the join conditions evaluated on those states.

A current row takes part only if it existed at that moment: its creation stamp
(``syncunit_created_stamp``, written when it was inserted or its key changed)
does not show the moment's write as already made (``ServerStore.created_before``),
so a row created after a joined row left the scope is never paired with that
joined row's old state.

"That moment" is just before the earliest image's write, and which of a row's
changes came after it is the store's to say (``ServerStore.changed_after``): on
SQLite versions are the commit order; on PostgreSQL they are transaction ids,
and one taken later may commit first, so the snapshot each tombstone keeps of
its write decides, and a change concurrent with that write counts as possibly
before it (at worst that names a key, never misses one).

Combinations with no old image are the current state: in scope now, not a
removal. Two tables on the path changing in one window (a hospital's city and
the doctor's hospital) are both covered, since the combination of the doctor's
old image with the hospital's old image is one of those tried. Nothing else is
named: every key comes from a state in which the filter held, never from a
looser test (so a device never learns the keys of rows outside its scope).
"""

from __future__ import annotations

import itertools
from typing import Any

import sqlalchemy as sa
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import ColumnElement

from syncunit.server.shape import StreamShape, one_at_a_time, seek_after
from syncunit.server.store import ServerStore, tombstones
from syncunit.units import CREATED_STAMP

__all__ = ["removal_keys"]


def _needed_columns(shape: StreamShape, table: sa.Table) -> list[sa.Column[Any]]:
    """The columns of ``table`` the filter and joins read, primary key first."""
    s = shape.stream
    read: set[str] = set()
    for clause in [s.where, *(j.on for j in s.joins)]:
        for e in visitors.iterate(clause) if clause is not None else ():
            if isinstance(e, sa.Column) and e.table is table:
                read.add(e.name)
    pk = list(table.primary_key.columns)
    return [*pk, *(c for c in table.columns if c.name in read and c not in pk)]


def old_images(
    store: ServerStore,
    shape: StreamShape,
    table: sa.Table,
    since: Any,
    n: int | str,
    pinned: Pinned | None = None,
) -> Any:
    """The old states of ``table``'s rows recorded in tombstones after ``since``; only
    those whose ``pinned`` column has an allowed value, when the scope pins one."""
    ts = tombstones.alias(f"ts_{table.name}_{n}")
    cols = [store.old_value(ts.c.old, c).label(c.name) for c in _needed_columns(shape, table)]
    cols.append(store.old_value(ts.c.old, table.c[CREATED_STAMP]).label(CREATED_STAMP))
    cols.append(ts.c.version.label(RECORDED))
    restriction = (pinned or {}).get(table.name)
    if restriction is None:
        q = sa.select(*cols).where(ts.c.table_name == table.name, ts.c.version > since)
        return q.subquery(f"old_{table.name}_{n}")
    # Looked up by the pinned old value, through the index on (old value, version).
    column, allowed = restriction
    old, of_table = store.old_value_lookup(ts, column)
    if store.pins_each_key:
        return _each_allowed(ts, cols, of_table, old, allowed, since, f"{table.name}_{n}")
    q = sa.select(*cols).where(*of_table, ts.c.version > since)
    q = q.where(old.in_(allowed) if isinstance(allowed, sa.Select) else old == allowed)
    return q.subquery(f"old_{table.name}_{n}")


def _each_allowed(
    ts: Any,
    cols: list[Any],
    of_table: list[ColumnElement[bool]],
    old: ColumnElement[Any],
    allowed: Any,
    since: Any,
    name: str,
) -> Any:
    """``old_images``'s restricted read, one allowed value at a time through the index
    on (old value, version), for a planner that trusts its statistics over the index
    (as ``ScopeDriver.each_key`` reads the rows)."""

    def rows(value: Any) -> sa.Select[Any]:
        return sa.select(*cols).where(*of_table, seek_after(old, ts.c.version, value, since))

    if not isinstance(allowed, sa.Select):
        return rows(allowed).subquery(f"old_{name}")
    values = allowed.distinct().subquery(f"allowed_{name}")  # each value once
    return one_at_a_time(values, rows, f"each_{name}").subquery(f"old_{name}")


#: The column of an old image holding the version of the tombstone it came from.
RECORDED = "syncunit_recorded_at_version"


def _changed_since(
    store: ServerStore, table: sa.Table, keys: list[Any], at: Any, below: Any, n: int
) -> Any:
    """Whether ``table``'s row with primary key ``keys`` changed after the moment just
    before the write at ``at`` and, when ``below`` is given, before the state its
    tombstone at ``below`` recorded: then that state (the current row, when ``below``
    is None) was not its state at that moment (``ServerStore.changed_after``)."""
    ts = tombstones.alias(f"later_{table.name}_{n}")
    lookups = [store.old_value_lookup(ts, col) for col in table.primary_key.columns]
    of_table = lookups[0][1]  # the same for every column of the key: the table's
    cond = [*of_table, *store.changed_after(ts, at, below)]
    cond += [old == key for (old, _), key in zip(lookups, keys, strict=True)]
    return sa.exists().where(*cond)


#: Per table on the scope driver's chain: (column, the value or keys it may hold).
Pinned = dict[str, tuple[sa.Column[Any], Any]]


def pinned_scope(store: ServerStore, shape: StreamShape, since: Any) -> Pinned:
    """What the filter's pinning equality allows each table on its chain to hold.

    A state that passed the filter had the driver's column equal to its value, and
    linked to the base along the chain through states that did too: so an old image
    can only matter if its pinned column holds a value some state (current or
    old) of the next table out allowed. Tombstones are then read through an index
    on those old values, not all of them since the cursor.
    """
    driver = shape.driver
    if driver is None:
        return {}
    out: Pinned = {}
    table = driver.column.table
    assert isinstance(table, sa.Table)
    out[table.name] = (driver.column, driver.value)
    allowed: Any = None
    for i in range(len(driver.chain) - 1, -1, -1):
        fk, key = driver.chain[i]  # fk on the nearer table names key on the farther one
        far = key.table
        assert isinstance(far, sa.Table)
        col, allow = out[far.name]
        cond = col.in_(allow) if isinstance(allow, sa.Select) else col == allow
        old = old_images(store, shape, far, since, f"pin{i}", out)
        # coalesce(): a value without the column's type affinity, which SQLite would
        # otherwise apply to the old value and so not use the index on it.
        # A common table expression: written once at the top of the statement, however
        # many combinations read it (nested, it would overflow SQLite's parser stack).
        allowed = sa.union(
            sa.select(sa.func.coalesce(key, None)).where(cond), sa.select(old.c[key.name])
        ).cte(f"pinned_{_near_name(fk)}")
        near = fk.table
        assert isinstance(near, sa.Table)
        out[near.name] = (fk, sa.select(allowed.c[0]))
    return out


def _near_name(fk: sa.Column[Any]) -> str:
    return f"{fk.table.name}_{fk.name}"


def _combination(
    store: ServerStore,
    shape: StreamShape,
    images: tuple[sa.Table, ...],
    since: Any,
    n: int,
    pinned: Pinned,
) -> sa.Select[Any]:
    """Base keys whose filter held with ``images`` taken as old images, the rest current."""
    s = shape.stream
    olds = {t.name: old_images(store, shape, t, since, n, pinned) for t in images}

    def swap(e: Any, **_: Any) -> Any:
        if isinstance(e, sa.Column) and isinstance(e.table, sa.Table) and e.table.name in olds:
            return olds[e.table.name].c[e.name]
        return None

    def sub(clause: Any, swap: Any = swap) -> Any:
        return visitors.replacement_traverse(clause, {}, swap)

    # Tables that are images, and the tables linking them to the base, must join;
    # the others join as in the stream's query (outer).
    linked: set[str] = {t.name for t in images}
    for t in images:
        linked.update(p.name for p in shape.path(t))
    wanted = {t.name for t in shape.filter_tables()}
    base = olds.get(s.base.name, s.base)
    from_: Any = base
    for j in s.joins:
        if j.table.name not in wanted:
            continue
        target = olds.get(j.table.name, j.table)
        if j.table.name in linked:
            from_ = from_.join(target, sub(j.on))
        else:
            from_ = from_.outerjoin(target, sub(j.on))
    key = base.c[s.key_column.name]
    q = sa.select(key.label("k")).select_from(from_)
    if s.where is not None:
        q = q.where(sub(s.where))
    # One moment: just before the earliest of the images' tombstones. Each image must
    # be its row's state then (its row's first tombstone since that moment), and each
    # current row must have been current then: created before it (every tombstone at
    # or below its creation stamp was written before it existed; none: older than
    # the stamps) and no tombstone since. (Which changes came after the moment is the
    # store's to say, ``changed_after``: on PostgreSQL ids are not the commit order.)
    at = store.least(*(olds[t.name].c[RECORDED] for t in images))
    for t in shape.filter_tables():
        if t.name in olds:
            old = olds[t.name]
            keys = [old.c[c.name] for c in t.primary_key.columns]
            q = q.where(~_changed_since(store, t, keys, at, old.c[RECORDED], n))
            # An image of a row created after the moment (and gone or changed since)
            # is no state of it then: its tombstone keeps its creation stamp.
            q = q.where(store.created_before(old.c[CREATED_STAMP], at))
        else:
            # coalesce(): no type affinity, so SQLite uses the index on the old value.
            keys = [sa.func.coalesce(c, None) for c in t.primary_key.columns]
            q = q.where(~_changed_since(store, t, keys, at, None, n))
            q = q.where(store.created_before(t.c[CREATED_STAMP], at))
    return q


def removal_keys(
    store: ServerStore,
    shape: StreamShape,
    in_scope: sa.Select[Any],
    since: Any,
    after: Any,
    *,
    restricted: bool = True,
) -> sa.Select[Any]:
    """The keys to remove, in key order (after ``after`` when given).

    ``in_scope`` is the stream's rows query; a key it finds now is not removed.
    ``restricted``: old images are read only where the scope pins an allowed value
    (``pinned_scope``); False reads every tombstone of the filter's tables since
    ``since``, cheaper when they are few. The keys are the same: an image outside
    the pinned values never meets the filter.
    """
    s = shape.stream
    tables = shape.filter_tables()
    pinned = pinned_scope(store, shape, since) if restricted else {}
    parts: list[sa.Select[Any]] = []
    n = 0
    for size in range(1, len(tables) + 1):
        for images in itertools.combinations(tables, size):
            n += 1
            parts.append(_combination(store, shape, images, since, n, pinned))
    gone = sa.union(*parts).subquery("gone") if len(parts) > 1 else parts[0].subquery("gone")
    now = in_scope.with_only_columns(sa.literal(1)).where(s.key_column == gone.c.k)
    q = sa.select(gone.c.k).where(~now.exists()).order_by(gone.c.k)
    if after is not None:
        q = q.where(gone.c.k > after)
    return q
