"""Bytes and non-finite reals in a JSON answer: the server writes them as base64 text,
and as ``protocol.NON_FINITE`` text (MessagePack carries them as they are). A device
that speaks JSON turns the values of its blob and real columns back into bytes and
floats before it stores them: a chunk's rows and removed keys, and the server's row
in a verdict. Only streams with a blob or real column are looked at.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from syncunit.errors import ProtocolError
from syncunit.protocol import NON_FINITE, Chunk, StreamInfo

__all__ = ["blob_columns", "chunk_bytes", "row_bytes"]


def blob_columns(info: StreamInfo) -> frozenset[str]:
    """The names of ``info``'s columns of logical type ``blob``."""
    return frozenset(c.name for c in info.columns if c.type == "blob")


def _text_columns(info: StreamInfo) -> dict[str, Callable[[Any, str, str], Any]]:
    """``info``'s columns whose values a JSON answer may carry as text, each with what
    reads them back (given the value, the stream's name and the column's)."""
    readers = {"blob": _bytes, "real": _real}
    return {c.name: readers[c.type] for c in info.columns if c.type in readers}


def _real(value: Any, stream: str, column: str) -> Any:
    """A non-finite real's text as its float; any other value as it is."""
    return NON_FINITE.get(value, value) if isinstance(value, str) else value


def _bytes(value: Any, stream: str, column: str) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:
            pass
    raise ProtocolError(
        f"the server sent {value!r:.80} for blob column {column!r} of stream {stream!r};"
        " a JSON answer carries bytes as base64 text"
    )


def chunk_bytes(chunk: Chunk, info: StreamInfo) -> Chunk:
    """``chunk`` of a JSON answer with its blob columns' values as bytes (no key is
    binary: the declaration refuses it) and its real columns' non-finite values as
    floats; the same chunk if the stream has neither.

    Raises ``ProtocolError`` for a blob value that is not base64 text.
    """
    readers = _text_columns(info)
    if not readers:
        return chunk
    name = chunk.stream
    changes: dict[str, Any] = {}
    at = [i for i, c in enumerate(chunk.columns) if c in readers]
    if at and chunk.row_count():
        if chunk.json_rows:
            data = [list(col) for col in zip(*chunk.row_list(), strict=True)]
            changes.update(json_rows="", json_count=0)
        else:
            data = list(chunk.data)
        for i in at:
            column, read = chunk.columns[i], readers[chunk.columns[i]]
            data[i] = [read(v, name, column) for v in data[i]]
        changes["data"] = data
    return msgspec.structs.replace(chunk, **changes) if changes else chunk


def row_bytes(row: Mapping[str, Any], info: StreamInfo) -> dict[str, Any]:
    """A server's row (a verdict's) in a JSON answer, its blob columns' values as bytes
    and its real columns' non-finite values as floats.

    Raises ``ProtocolError`` for a blob value that is not base64 text.
    """
    out = dict(row)
    for column, read in _text_columns(info).items():
        if column in out:
            out[column] = read(out[column], info.name, column)
    return out
