"""Stream cursors: opaque to the client, self-describing for the server.

A cursor says what the client has of one stream:

* ``epoch``: the server database it came from (a restored or replaced database
  has another epoch, or its clock is behind the cursor: both reset the stream);
* ``definition`` / ``params``: hashes of the stream definition and of the
  principal parameters it was filtered with (a change resets the stream);
* ``phase``: ``full`` (first copy, keyset on the key), ``removals`` then
  ``upserts`` (a delta pass), ``done`` (everything up to ``since``),
  ``content`` (a full stream, identified by a hash of its rows), or ``copy``
  (a full stream's copy under way: the hash of the rows being sent, and in
  ``after`` how many the client has);
* ``since``: every change at or below this version is on the client;
* ``high``: the watermark when the current pass began; it becomes ``since``
  when the pass completes, even if the pass was resumed in later requests;
* ``after``: the keyset position of the last applied chunk in this pass.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable
from typing import Any, Literal

import msgspec

Phase = Literal["full", "removals", "upserts", "done", "content", "copy"]


class Cursor(msgspec.Struct, array_like=True, frozen=True):
    epoch: str
    definition: str
    params: str
    phase: Phase
    since: int | None = None
    high: int = 0
    after: list[Any] | None = None
    content: str = ""


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(Cursor)


def encode_cursor(cursor: Cursor) -> str:
    return "c1." + base64.urlsafe_b64encode(_enc.encode(cursor)).rstrip(b"=").decode()


def decode_cursor(token: str | None) -> Cursor | None:
    """The cursor a token holds, or None if it is absent or unreadable (a reset)."""
    if not token or not token.startswith("c1."):
        return None
    raw = token[3:]
    try:
        return _dec.decode(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (msgspec.DecodeError, binascii.Error, ValueError):
        return None


# -- signatures ---------------------------------------------------------------------
#
# A client hands its cursors back; one it made up (an older ``since``, another
# phase) could make the server send removals it never checked against that
# client's scope. The server signs every cursor it gives out and treats one
# whose signature does not match as no cursor (the stream starts afresh).

_SIG_BYTES = 16


def sign_cursor(token: str, key: bytes) -> str:
    """``token`` with an HMAC-SHA256 signature appended (``token.signature``)."""
    mac = hmac.new(key, token.encode(), hashlib.sha256).digest()[:_SIG_BYTES]
    return token + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def verify_cursor(signed: str, key: bytes) -> str | None:
    """The token a signed cursor holds, or None if the signature does not match."""
    token, dot, _ = signed.rpartition(".")
    if not dot or not token:
        return None
    return token if hmac.compare_digest(sign_cursor(token, key), signed) else None


def newest_cursor(tokens: Iterable[str]) -> int:
    """The highest watermark any of these cursors was made at (0 for none)."""
    return max((c.high for t in tokens if (c := decode_cursor(t)) is not None), default=0)
