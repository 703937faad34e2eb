"""What a client should hold: a stream's rows for a principal, read on the server now.

Used by the demo, the tests and operators to check invariant 1 of the design:
after a sync, each local table equals the stream's query on the server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from syncunit.server.changes import StreamReader, to_wire
from syncunit.server.store import ServerStore
from syncunit.units import Stream

__all__ = ["Difference", "compare", "scope_rows"]


def scope_rows(
    store: ServerStore, stream: Stream, params: Mapping[str, Any]
) -> list[tuple[Any, ...]]:
    """Every row ``stream`` sends to a principal with ``params``, as stored on a client."""
    reader = StreamReader(store, stream, params, chunk_size=1)
    query = stream.query if stream.mode == "full" else reader.rows_select()
    assert query is not None
    with store.snapshot(scope=params) as (conn, _):
        rows = conn.execute(query, reader.params).all()
    return [tuple(to_wire(v) for v in row) for row in rows]


@dataclass
class Difference:
    """How a local table differs from the server's view of the stream."""

    stream: str
    missing: list[Any] = field(default_factory=list)  # keys on the server, not on the client
    extra: list[Any] = field(default_factory=list)  # keys on the client, not on the server
    changed: list[Any] = field(default_factory=list)  # keys whose values differ

    @property
    def equal(self) -> bool:
        return not (self.missing or self.extra or self.changed)

    def __str__(self) -> str:
        if self.equal:
            return f"{self.stream}: equal"
        return (
            f"{self.stream}: {len(self.missing)} missing, {len(self.extra)} extra,"
            f" {len(self.changed)} changed (e.g. {(self.missing + self.extra + self.changed)[:3]})"
        )


def compare(
    stream: Stream,
    server_rows: Sequence[tuple[Any, ...]],
    local_rows: Sequence[tuple[Any, ...]],
    *,
    ignore: set[Any] | None = None,
) -> Difference:
    """Compare rows in the stream's column order; ``ignore`` keys (pending local changes)."""
    k = list(stream.columns).index(stream.key)
    server = {r[k]: tuple(r) for r in server_rows}
    local = {r[k]: tuple(r) for r in local_rows}
    skip = ignore or set()
    diff = Difference(stream.name)
    diff.missing = sorted(set(server) - set(local) - skip, key=str)
    diff.extra = sorted(set(local) - set(server) - skip, key=str)
    diff.changed = sorted(
        (key for key in set(server) & set(local) - skip if server[key] != local[key]), key=str
    )
    return diff
