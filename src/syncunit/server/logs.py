"""Structured logs: a request id per request, and the device and unit on every line.

* ``RequestIds`` (ASGI middleware, installed by ``SyncServer``) gives each request
  a ``RequestContext``: a request id (the caller's ``X-Request-ID`` when it is a
  short plain token, else a new one), returned in the ``X-Request-ID`` response
  header; the handlers add the unit and the client id once they know them.
* Every record of the ``syncunit.server`` logger made while the request runs,
  on any of its threads, carries ``request_id``, ``client_id`` and ``unit`` as
  attributes, and ``context``: the three as text, for plain format strings.
* ``LogFormatter`` (text) and ``JsonLogFormatter`` (one JSON object a line) show
  them; ``configure_logging`` installs one on the root logger (``syncunit serve``
  does).

No personal data by default: a line names the device by its client id (a
random id the device made) and never the principal, a token, an address or a
row's values; ``SyncServer(log_principals=True)`` adds the principal's id.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import re
import secrets
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "JsonLogFormatter",
    "LogFormatter",
    "RequestContext",
    "RequestIds",
    "configure_logging",
    "current_request",
]

LOGGER = "syncunit.server"
HEADER = "X-Request-ID"
#: A caller's request id is kept when it looks like one (a proxy's, say); else a new one.
_ACCEPTED_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
#: Where a request's context is found once the request is over (a 500's handler runs then).
SCOPE_KEY = "syncunit.request"


@dataclass
class RequestContext:
    """What the log lines of one request say about it (filled as the request is read)."""

    request_id: str
    unit: str | None = None
    client_id: str | None = None
    #: The principal's id; shown only when the server logs principals.
    principal: str | None = None
    show_principal: bool = False
    started: float = field(default_factory=time.monotonic)
    bytes_in: int = 0

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "request_id": self.request_id,
            "client_id": self.client_id,
            "unit": self.unit,
        }
        if self.show_principal:
            out["principal"] = self.principal
        return out

    def scrub(self, text: str) -> str:
        """``text`` without the principal's id, unless principals are logged."""
        if self.show_principal or not self.principal:
            return text
        return text.replace(repr(self.principal), "<principal>").replace(
            self.principal, "<principal>"
        )


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "syncunit_request", default=None
)


def current_request() -> RequestContext | None:
    """The context of the request running now (None outside a request)."""
    return _current.get()


class RequestIds:
    """ASGI middleware: a ``RequestContext`` per HTTP request, its id in the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = ""
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                given = value.decode("latin-1")
                break
        rid = given if _ACCEPTED_ID.fullmatch(given) else secrets.token_hex(8)
        ctx = RequestContext(rid)
        scope[SCOPE_KEY] = ctx

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = rid
            await send(message)

        token = _current.set(ctx)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _current.reset(token)


class ContextFilter(logging.Filter):
    """Adds the running request's fields to each record (kept when already given)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _current.get()
        values = ctx.fields() if ctx is not None else {}
        for name in ("request_id", "client_id", "unit"):
            if not hasattr(record, name):
                setattr(record, name, values.get(name))
        if "principal" in values and not hasattr(record, "principal"):
            record.principal = values["principal"]
        if not hasattr(record, "context"):
            record.context = _as_text(record)
        return True


def _as_text(record: logging.LogRecord) -> str:
    parts = [
        f"{name}={getattr(record, name)}"
        for name in ("request_id", "client_id", "unit", "principal")
        if getattr(record, name, None) is not None
    ]
    return f"[{' '.join(parts)}] " if parts else ""


def install_filter() -> None:
    """Put the context filter on the server's logger (once)."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(f, ContextFilter) for f in logger.filters):
        logger.addFilter(ContextFilter())


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(context)s%(message)s"


class LogFormatter(logging.Formatter):
    """Plain text lines with the request's id, client id and unit before the message."""

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt, defaults={"context": ""})


#: Attributes every LogRecord has: the rest came through ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "context",
}


class JsonLogFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, the request's fields,
    the fields given with ``extra=``, and the traceback (``exc``) if any."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_"):
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(fmt: str = "text", level: int | str = logging.INFO) -> logging.Handler:
    """Log to stderr in ``fmt`` (``text`` or ``json``) on the root logger; return the handler."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if fmt == "json" else LogFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    install_filter()
    return handler
