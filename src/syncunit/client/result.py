"""What a unit run did: rows in and out, bytes, requests, the push's verdicts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["SyncResult"]


@dataclass
class SyncResult:
    """What one unit run did."""

    unit: str
    rows_in: dict[str, int] = field(default_factory=dict)
    rows_removed: dict[str, int] = field(default_factory=dict)
    rows_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    requests: int = 0
    resets: list[str] = field(default_factory=list)
    snapshots: list[str] = field(default_factory=list)  # streams copied from a snapshot file
    applied: int = 0
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    #: Held subscriptions the run closed (each also reported to ``on_error``): their unit
    #: left the server's catalog, or the server refused them.
    closed: list[str] = field(default_factory=list)

    @property
    def total_in(self) -> int:
        return sum(self.rows_in.values())

    @property
    def total_removed(self) -> int:
        return sum(self.rows_removed.values())

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["seconds"] = round(self.seconds, 4)
        return out
