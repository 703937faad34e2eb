"""Keys for rows created on a client: time-ordered UUIDs (version 7).

Time-ordered keys keep B-tree inserts local on both sides; random UUIDs
scatter them across the index.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

_lock = threading.Lock()
_last = [0, 0]


def uuid7() -> str:
    """A UUIDv7 string (RFC 9562): 48-bit milliseconds, then a counter and random bits."""
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last[0]:
            ms = _last[0]
            _last[1] += 1
        else:
            _last[0] = ms
            _last[1] = int.from_bytes(os.urandom(2), "big") & 0x3FF
        seq = _last[1] & 0xFFF
    rand = int.from_bytes(os.urandom(8), "big") & 0x3FFF_FFFF_FFFF_FFFF
    value = (ms << 80) | (0x7 << 76) | (seq << 64) | (0b10 << 62) | rand
    return str(uuid.UUID(int=value))
