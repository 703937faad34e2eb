"""What a stream's SQL clauses say: their parameters, their literals, their columns,
and whether a joined row's absence can satisfy them.

The declaration (``syncunit.units``) reads its filters and joins through these,
to name a stream's parameters, to hash its definition, and to refuse filters
whose result a missing joined row could change unseen.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.sql import operators, visitors
from sqlalchemy.sql.elements import BinaryExpression, BindParameter, BooleanClauseList, Case, Null
from sqlalchemy.sql.functions import FunctionElement

__all__ = [
    "absence_tables",
    "bind_names",
    "columns_of",
    "describe",
    "json_bind_names",
    "list_bind_names",
]


def bind_names(*clauses: Any) -> list[str]:
    """The names of the parameters (binds without a value) in ``clauses``, sorted."""
    return sorted(
        {
            elem.key
            for elem in _binds(clauses)
            if elem.value is None and elem.callable is None and not elem.key.startswith("%")
        }
    )


def list_bind_names(*clauses: Any) -> set[str]:
    """The names of the parameters in ``clauses`` that take a list (an expanding ``IN``,
    or an ``ARRAY``-typed parameter, as ``= ANY(:p)`` takes on PostgreSQL)."""
    return {
        elem.key
        for elem in _binds(clauses)
        if elem.expanding or isinstance(elem.type, sa.types.ARRAY)
    }


def json_bind_names(*clauses: Any) -> set[str]:
    """The names of the parameters in ``clauses`` typed JSON: they take any JSON value."""
    return {elem.key for elem in _binds(clauses) if isinstance(elem.type, sa.types.JSON)}


def _binds(clauses: tuple[Any, ...]) -> list[BindParameter[Any]]:
    return [
        elem
        for clause in clauses
        if clause is not None
        for elem in visitors.iterate(clause)
        if isinstance(elem, BindParameter)
    ]


def describe(clause: Any) -> Any:
    """A clause as it selects: its SQL and the values of its literals, in order.

    ``str()`` alone renders a literal as a placeholder (``status != :status_1``),
    so two filters with different literals would describe the same.
    """
    if clause is None:
        return None
    values = [
        [type(e.type).__name__, repr(e.effective_value)]
        for e in visitors.iterate(clause)
        if isinstance(e, BindParameter) and not (e.value is None and e.callable is None)
    ]
    # Without literals, the SQL alone (as before): such a stream keeps its hash.
    return [str(clause), values] if values else str(clause)


def columns_of(clause: Any) -> list[sa.Column[Any]]:
    """Every table column ``clause`` reads, in order."""
    if clause is None:
        return []
    return [e for e in visitors.iterate(clause) if isinstance(e, sa.Column)]


NULL_HOLDING = (operators.is_, operators.is_distinct_from, operators.is_not_distinct_from)


def absence_tables(where: Any, joined: set[sa.Table]) -> list[str]:
    """Joined tables whose row's *absence* can satisfy ``where`` (``IS NULL``, ``IS
    [NOT] DISTINCT FROM``, ``coalesce``, ``CASE`` on their columns), unless a
    top-level ``AND`` term requires the row (``t.col IS NOT NULL``)."""
    if where is None:
        return []
    ands = where.clauses if isinstance(where, BooleanClauseList) else [where]
    if isinstance(where, BooleanClauseList) and where.operator is not operators.and_:
        ands = [where]
    guarded = {
        t.left.table
        for t in ands
        if isinstance(t, BinaryExpression) and t.operator is operators.is_not
        if isinstance(t.right, Null) and isinstance(t.left, sa.Column)
    }
    out: list[str] = []
    for e in visitors.iterate(where):
        holds = isinstance(e, Case) or (
            isinstance(e, FunctionElement) and e.name.lower() in ("coalesce", "ifnull", "nvl")
        )
        if isinstance(e, BinaryExpression):
            holds = e.operator in NULL_HOLDING or (
                e.operator is operators.is_not and not isinstance(e.right, Null)
            )
        for c in columns_of(e) if holds else ():
            if c.table in joined - guarded and c.table.name not in out:
                out.append(c.table.name)
    return out
