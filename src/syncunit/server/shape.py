"""A delta stream's shape, and the queries planned from it.

A stream is a base table, a tree of many-to-one joins and a filter. From that
shape come the statements every pass needs, written once in SQLAlchemy Core so
they run on every store:

* ``rows`` (the rows in scope) and ``count`` (how many);
* ``candidates``: keys of base rows whose own row, or a joined row, changed
  since a version. Where the filter pins the scope with an equality
  (``base.col = :p``, or ``joined.col = :p`` reached by equi-joins), the
  changed base rows are found *through the scope*, on an index that leads with
  the scope column and ends with the version: a delta then reads the changes
  in the client's scope, not everyone's.

``scope_indexes`` names those indexes, so the server creates them at install.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.sql import operators, visitors
from sqlalchemy.sql.elements import BinaryExpression, BindParameter, ColumnElement

from syncunit.units import VERSION, Join, Stream

__all__ = ["ScopeDriver", "StreamShape", "equi_link", "scope_indexes"]

#: Equi-links from the base table outwards: ``(fk on the nearer table, key it names)``.
Chain = tuple[tuple[sa.Column[Any], sa.Column[Any]], ...]


def equi_link(join: Join) -> tuple[sa.Column[Any], sa.Column[Any]] | None:
    """For ``ON joined.col = other.col``: (the joined table's column, the other's), or None."""
    on = join.on
    if not isinstance(on, BinaryExpression) or on.operator is not operators.eq:
        return None
    left, right = on.left, on.right
    if not (isinstance(left, sa.Column) and isinstance(right, sa.Column)):
        return None
    if left.table is join.table and right.table is not join.table:
        return left, right
    if right.table is join.table and left.table is not join.table:
        return right, left
    return None


def conjuncts(clause: Any) -> Iterator[Any]:
    """The top-level terms of an ``AND`` (the clause itself when it is not one)."""
    if clause is None:
        return
    if isinstance(clause, sa.sql.elements.BooleanClauseList) and clause.operator is operators.and_:
        for c in clause.clauses:
            yield from conjuncts(c)
    else:
        yield clause


def tables_read(clause: Any) -> list[sa.Table]:
    out: list[sa.Table] = []
    for e in visitors.iterate(clause) if clause is not None else ():
        if isinstance(e, sa.Column) and isinstance(e.table, sa.Table) and e.table not in out:
            out.append(e.table)
    return out


def _climb(chain: Chain, condition: ColumnElement[bool]) -> sa.Select[Any]:
    """The foreign-key values, on the base table's first link, of the rows at the far
    end of ``chain`` that meet ``condition`` (``chain[i]`` is ``(fk_i, pk_i+1)``)."""
    sub: sa.Select[Any] = sa.select(chain[-1][1]).where(condition)
    for i in range(len(chain) - 2, -1, -1):
        sub = sa.select(chain[i][1]).where(chain[i + 1][0].in_(sub))
    return sub


@dataclass(frozen=True)
class ScopeDriver:
    """An equality of the filter that pins the scope: ``column = value``.

    ``chain`` are the equi-links from the base table up to ``column``'s table:
    ``[(base.fk, joined.pk), (joined.fk, next.pk), ...]``; empty when ``column``
    is on the base table. ``lead`` is the base-table column the scope index
    leads with (``column`` itself, or the first link's foreign key).
    """

    column: sa.Column[Any]
    value: ColumnElement[Any]
    chain: Chain

    @property
    def lead(self) -> sa.Column[Any]:
        return self.chain[0][0] if self.chain else self.column

    def restricted(self) -> list[sa.Column[Any]]:
        """The column of each table on the chain that the scope pins: the driver's
        column on its table, the link's foreign key on each table nearer the base."""
        return [*(fk for fk, _ in self.chain), self.column]

    def scope_keys(self) -> ColumnElement[bool]:
        """``base.lead IN (...)`` (or ``base.col = value``): the base rows in the pinned scope."""
        if not self.chain:
            return self.column == self.value
        return self.chain[0][0].in_(_climb(self.chain, self.column == self.value))

    def each_key(self, key: ColumnElement[Any], version: sa.Column[Any], since: Any) -> Any:
        """Keys ``key`` of the base rows in the pinned scope whose ``version`` is above
        ``since``, sought in the (lead, version) index one pinned key at a time
        (``seek_after``, ``one_at_a_time``): a planner whose statistics were taken
        before a burst of writes elsewhere would otherwise take ``version > since``
        for a handful of rows and walk the version index through tens of thousands,
        each checked against the scope (PostgreSQL does)."""
        if not self.chain:
            return sa.select(key).where(seek_after(self.column, version, self.value, since))
        keys = _climb(self.chain, self.column == self.value).subquery("pinned_keys")

        def rows(pinned: ColumnElement[Any]) -> sa.Select[Any]:
            return sa.select(key).where(seek_after(self.lead, version, pinned, since))

        return one_at_a_time(keys, rows, "pinned_rows")


def seek_after(
    column: ColumnElement[Any], version: ColumnElement[Any], value: Any, since: Any
) -> ColumnElement[bool]:
    """``column = value`` and its rows' ``version`` above ``since``, the range written
    ``(column, version) > (value, since)``: the same rows, but only an index on
    (column, version) can serve it, where ``version > since`` lets a planner take an
    index on the version alone."""
    types = [column.type, version.type]  # ``since`` bound as a version (a BIGINT)
    after = sa.tuple_(column, version) > sa.tuple_(value, since, types=types)
    return sa.and_(column == value, after)


def one_at_a_time(
    values: sa.Subquery, rows: Callable[[ColumnElement[Any]], sa.Select[Any]], name: str
) -> sa.Select[Any]:
    """``rows(value)`` for each value of ``values``'s first column, read one value at a
    time: a lateral join fenced with ``OFFSET 0``, which a planner cannot flatten
    into a join it would plan from its statistics."""
    each = rows(values.c[0]).offset(sa.literal_column("0")).lateral(name)
    return sa.select(*each.c).select_from(values.join(each, sa.true()))


class StreamShape:
    """The joins, paths and planned statements of one delta stream."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.by_table = {j.table.name: j for j in stream.joins}
        self.driver = self._find_driver()

    # -- paths -------------------------------------------------------------------------

    def path(self, target: sa.Table) -> list[sa.Table]:
        """The joined tables needed to reach ``target`` from the base table."""
        need: list[sa.Table] = []
        todo = [target]
        while todo:
            t = todo.pop()
            if t is self.stream.base or t in need:
                continue
            need.append(t)
            for e in visitors.iterate(self.by_table[t.name].on):
                if isinstance(e, sa.Column) and isinstance(e.table, sa.Table) and e.table is not t:
                    todo.append(e.table)
        return need

    def filter_tables(self) -> list[sa.Table]:
        """The tables whose values decide whether a base row is in scope, in join order:
        the base table, every table the filter reads, and the tables on the way to them."""
        s = self.stream
        need: set[str] = {s.base.name}
        for t in tables_read(s.where):
            if t is not s.base:
                need.update(p.name for p in self.path(t))
        return [t for t in s.tables if t.name in need]

    def _chain_to(self, table: sa.Table) -> Chain | None:
        """Equi-links from the base table up to ``table``, or None if a link is not one."""
        links: list[tuple[sa.Column[Any], sa.Column[Any]]] = []
        t = table
        while t is not self.stream.base:
            link = equi_link(self.by_table[t.name])
            if link is None:
                return None
            own, parent = link  # joined.own = parent.col; walk towards the base
            links.append((parent, own))
            t = parent.table
        return tuple(reversed(links))

    def _find_driver(self) -> ScopeDriver | None:
        s = self.stream
        if s.mode != "delta":
            return None
        for term in conjuncts(s.where):
            if not isinstance(term, BinaryExpression) or term.operator is not operators.eq:
                continue
            for col, value in ((term.left, term.right), (term.right, term.left)):
                if not (isinstance(col, sa.Column) and col.table in s.tables):
                    continue
                if not isinstance(value, BindParameter) or tables_read(value):
                    continue
                chain = self._chain_to(col.table)
                if chain is not None:
                    return ScopeDriver(col, value, chain)
        return None

    # -- statements --------------------------------------------------------------------

    def rows(self, columns: list[Any], *, drive_by_base: bool = False) -> sa.Select[Any]:
        """The stream's rows. ``drive_by_base`` hides the filter from the planner.

        Wrapped in ``coalesce(filter, false)`` (same rows), the filter can no
        longer turn the outer joins into inner ones and drive the query through a
        joined table's index: the base table stays the outer loop, walked by key
        or reached by key lookups. Deltas (keys from the candidates) and large
        first copies (the key order with no sort) want that.
        """
        s = self.stream
        from_: Any = s.base
        for j in s.joins:
            from_ = from_.outerjoin(j.table, j.on)
        q = sa.select(*columns).select_from(from_)
        if s.where is not None:
            q = q.where(sa.func.coalesce(s.where, sa.false()) if drive_by_base else s.where)
        return q

    def count(self) -> sa.Select[Any]:
        """``count(*)`` of the rows in scope, joining only what the filter reads."""
        s = self.stream
        need = self.filter_tables()
        from_: Any = s.base
        for j in s.joins:
            if j.table in need:
                from_ = from_.outerjoin(j.table, j.on)
        q = sa.select(sa.func.count()).select_from(from_)
        return q if s.where is None else q.where(s.where)

    def effective_version(self, greatest: Any) -> ColumnElement[Any]:
        """The newest version among the base row and its joined rows."""
        return greatest(*(t.c[VERSION] for t in self.stream.tables))  # type: ignore[no-any-return]

    def candidates(
        self,
        since: Any,
        old_images: Callable[[sa.Table], Any] | None = None,
        *,
        pinned: bool = True,
        key: ColumnElement[Any] | None = None,
        each_key: bool = False,
    ) -> sa.CompoundSelect[Any]:
        """Keys of base rows whose own row or a joined row changed after ``since``
        (``key``: another column of the base table that identifies its rows).

        Each part starts from an index: the base rows of the pinned scope by
        (scope column, version) when there is a driver, else the version index;
        for joined tables a chain of ``IN`` subqueries (changed specialties ->
        their doctors -> their appointments), which planners run inside out.
        A joined row deleted (or moved) since has no version to find it by: its
        tombstones' ``old_images`` (a subquery per table) find the base rows that
        joined it, whose copied columns now read NULL (or another row).
        ``pinned=False`` drops the pinned scope from the base rows' part (a superset:
        the caller's scope filter still applies), so the version index drives it.
        ``each_key`` reads that part one pinned key at a time (``ScopeDriver.each_key``),
        for a planner that would otherwise trust its statistics over the index.
        """
        s = self.stream
        pk = s.key_column if key is None else key
        own: Any = sa.select(pk).where(s.base.c[VERSION] > since)
        if self.driver is not None and pinned:
            own = (
                self.driver.each_key(pk, s.base.c[VERSION], since)
                if each_key
                else own.where(self.driver.scope_keys())
            )
        parts = [own]
        for j in s.joins:
            chain = self._in_chain(j.table, since, pk)
            if chain is not None:
                parts.append(chain)
                continue
            from_: Any = s.base
            for t in reversed(self.path(j.table)):
                from_ = from_.join(t, self.by_table[t.name].on)
            parts.append(sa.select(pk).select_from(from_).where(j.table.c[VERSION] > since))
        for j in s.joins if old_images is not None else ():
            assert old_images is not None
            old = old_images(j.table)

            def swap(e: Any, table: sa.Table = j.table, old: Any = old, **_: Any) -> Any:
                if isinstance(e, sa.Column) and e.table is table:
                    return old.c[e.name]
                return None

            from_ = s.base
            for t in reversed(self.path(j.table)):
                on = self.by_table[t.name].on
                if t is j.table:
                    replace: Any = swap
                    from_ = from_.join(old, visitors.replacement_traverse(on, {}, replace))
                else:
                    from_ = from_.join(t, on)
            parts.append(sa.select(pk).select_from(from_))
        return sa.union(*parts)

    def _in_chain(
        self, table: sa.Table, since: Any, key: ColumnElement[Any]
    ) -> sa.Select[Any] | None:
        """``SELECT key WHERE fk IN (SELECT ... WHERE table.version > since)``, or None
        when a join on the way is not a plain equality."""
        chain = self._chain_to(table)
        if chain is None:
            return None
        sub = _climb(chain, table.c[VERSION] > since)
        return sa.select(key).where(chain[0][0].in_(sub))


def tombstone_scope_columns(streams: list[Stream]) -> list[sa.Column[Any]]:
    """The columns whose old values removals look tombstones up by (see ``removals``):
    the primary keys of the tables a filter reads through, and the pinned columns."""
    out: dict[tuple[str, str], sa.Column[Any]] = {}
    for s in streams:
        if s.mode != "delta":
            continue
        shape = StreamShape(s)
        found = [next(iter(t.primary_key.columns)) for t in shape.filter_tables()]
        if shape.driver is not None:
            found += shape.driver.restricted()
        for c in found:
            out.setdefault((c.table.name, c.name), c)
    return list(out.values())


def scope_indexes(streams: list[Stream]) -> list[tuple[str, sa.Table, list[str]]]:
    """The indexes that let deltas read through the scope, as (name, table, columns):
    (scope column, version) on each delta stream's base table whose filter pins the
    scope with an equality."""
    out: dict[str, tuple[str, sa.Table, list[str]]] = {}
    for s in streams:
        driver = StreamShape(s).driver if s.mode == "delta" else None
        if driver is not None:
            name = f"ix_{s.base.name}_{driver.lead.name}_{VERSION}"[:63]
            out.setdefault(name, (name, s.base, [driver.lead.name, VERSION]))
    return list(out.values())
