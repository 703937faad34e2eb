"""Conflict policies and business rules for pushed mutations.

A stream's ``policy`` decides what happens when a pushed change meets a row
that changed on the server since the client saw it:

* ``LastWriteWins()`` (the default, as in the method): the change is applied;
* ``Detect(merge=True)``: the change conflicts when a column it changes has a
  different value on the server than the client's base value (what the client
  last saw); columns the server did not change merge column by column;
* ``Resolve(fn)``: like ``Detect``, but a conflict is handed to ``fn``, which
  returns the values to write, ``None`` (the server's row stands: reported as
  a conflict), or ``Reject(reason)``.

Business rules are functions ``rule(ctx) -> str | None``; a string rejects the
mutation with that reason and its savepoint undoes it. ``ctx.row`` is the row
after the change (a delete: the row being deleted). Rules run only for rows in
the principal's write scope, after that scope check. An inserted or updated
row is already written when its rules run, so rules that query its table
should leave out ``ctx.key``; deletes are checked before they are written.

A push of many new rows is written as one batch when every rule of the
stream has a set-based form (``@set_check(fn)`` on the rule): ``fn(batch)``
sees all the batch's rows written at once (all in the write scope) and returns
whether each of them passes. If it says no (or any row fails another check),
the batch is undone and its mutations are applied one by one with the per-row
rules, so results are those of the one-by-one path; a set-based form only has
to be a conservative yes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

__all__ = [
    "BatchContext",
    "Conflict",
    "ConflictPolicy",
    "Detect",
    "LastWriteWins",
    "MutationContext",
    "Reject",
    "Resolve",
    "Rule",
    "SetCheck",
    "set_check",
]


@dataclass(frozen=True)
class Reject:
    """Returned by a resolver to reject the mutation with a reason."""

    reason: str


@dataclass(frozen=True)
class Conflict:
    """A pushed change that meets a row changed on the server (base-table column names)."""

    table: str
    key: Any
    op: Literal["insert", "update", "delete"]
    server: Mapping[str, Any] | None  # the row as it is now; None if deleted
    client: Mapping[str, Any]  # the values the client wants to write
    base: Mapping[str, Any]  # what the client saw before its change, but values too large to send
    columns: tuple[str, ...]  # the columns in conflict


Resolution = Mapping[str, Any] | Reject | None


class ConflictPolicy:
    """Base class of conflict policies."""

    name = "policy"
    detects = True

    def resolve(self, conflict: Conflict) -> Resolution:
        """What to do with a detected conflict (default: the server's row stands)."""
        return None


class LastWriteWins(ConflictPolicy):
    """The pushed change is applied whatever the server holds (the method's default)."""

    name = "last-write-wins"
    detects = False


@dataclass
class Detect(ConflictPolicy):
    """Report changes to columns that changed on the server since the client saw them.

    With ``merge`` (default), changed columns that did not change on the server
    are applied even when other columns of the row did.
    """

    merge: bool = True
    name = "detect"


@dataclass
class Resolve(ConflictPolicy):
    """Hand detected conflicts to ``resolver``."""

    resolver: Callable[[Conflict], Resolution]
    merge: bool = True
    name = "resolve"

    def resolve(self, conflict: Conflict) -> Resolution:
        return self.resolver(conflict)


@dataclass
class MutationContext:
    """What a business rule sees: the change about to be written."""

    conn: Connection
    table: str
    op: Literal["insert", "update", "delete"]
    key: Any
    #: The full row after the change (base-table column names); an insert's left-out
    #: columns hold what the database stores in them (their defaults).
    row: Mapping[str, Any]
    principal_id: str
    params: Mapping[str, Any] = field(default_factory=dict)


Rule = Callable[[MutationContext], str | None]


@dataclass
class BatchContext:
    """What a rule's set-based form sees: new rows, all written, of one table."""

    conn: Connection
    table: str
    keys: Sequence[Any]  # the rows' keys (base-table values), in push order
    #: The rows as written (base-table column names), left-out columns' defaults included.
    rows: Sequence[Mapping[str, Any]]
    principal_id: str
    params: Mapping[str, Any] = field(default_factory=dict)


SetCheck = Callable[[BatchContext], bool]


def set_check(check: SetCheck) -> Callable[[Rule], Rule]:
    """Give a rule a set-based form for batches of new rows (see the module docs).

    ``check(batch)`` returns True only if the rule, run row by row in push
    order, would accept every row of the batch; False sends the batch down the
    one-by-one path, where the rule itself decides.
    """

    def attach(rule: Rule) -> Rule:
        rule.set_check = check  # type: ignore[attr-defined]
        return rule

    return attach


def set_check_of(rule: Rule) -> SetCheck | None:
    """The set-based form attached to ``rule`` by ``set_check``, or None."""
    check = getattr(rule, "set_check", None)
    return check if callable(check) else None
