"""Row values as JSON text in the device's own tables (the outbox's row images, the
rows marked to copy afresh): bytes (BLOB values) as ``{"$bytes": hex}``; the outbox's
triggers write a REAL as ``{"$real": text}`` (exact, infinities included)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["bad_value", "dumps", "loads"]


def _encode_bytes(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": bytes(value).hex()}
    raise TypeError(f"cannot store {type(value).__name__} as a row value")


def _decode(obj: dict[str, Any]) -> Any:
    if len(obj) == 1:
        if isinstance(obj.get("$bytes"), str):
            return bytes.fromhex(obj["$bytes"])
        if isinstance(obj.get("$real"), str):
            return float(obj["$real"])
    return obj


def dumps(value: Any) -> str:
    """JSON text of ``value``; bytes as ``{"$bytes": hex}``."""
    return json.dumps(value, default=_encode_bytes)


def loads(text: str) -> Any:
    """``value`` back from ``dumps`` (or a trigger's ``json_object``), bytes and reals
    included."""
    try:
        return json.loads(text, object_hook=_decode)
    except json.JSONDecodeError:
        # Triggers of earlier versions let json_object() write an infinite REAL as a
        # bare ``Inf``, which is not JSON: read as ``Infinity``.
        return json.loads(_infinities(text), object_hook=_decode)


def _infinities(text: str) -> str:
    """``text`` with each ``Inf`` outside its strings spelled ``Infinity``."""
    out: list[str] = []
    i, quoted = 0, False
    while i < len(text):
        c = text[i]
        if quoted:
            if c == "\\":
                out.append(text[i : i + 2])
                i += 2
                continue
            quoted = c != '"'
        elif c == '"':
            quoted = True
        elif text.startswith("Inf", i) and not text.startswith("Infinity", i):
            out.append("Infinity")
            i += 3
            continue
        out.append(c)
        i += 1
    return "".join(out)


def bad_value(exc: Exception, values: Mapping[str, Any]) -> str:
    """What was wrong with a write of ``values`` that the driver refused with ``exc``:
    an integer SQLite cannot hold is named by its column."""
    if isinstance(exc, OverflowError):
        for name, value in values.items():
            if isinstance(value, int) and not -(2**63) <= value < 2**63:
                return (
                    f"column {name!r}: {value} does not fit in SQLite's 64-bit INTEGER"
                    " (store it as text, or keep it within -2**63 .. 2**63-1)"
                )
    return str(exc)
