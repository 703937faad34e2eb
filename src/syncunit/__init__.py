"""syncunit: offline-first data sync for Python.

The client side (``SyncClient``, ``LocalStore``) needs only the standard
library's sqlite3 and httpx. The declaration API (``Stream``, ``Join``,
``SyncUnit``, ``SyncSchema``) and the server (``syncunit.server``) need
SQLAlchemy and Starlette; they are imported lazily so a client-only install
works.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from syncunit.client import (
    AsyncSyncClient,
    LiveQuery,
    LocalStore,
    Progress,
    RetryPolicy,
    SyncClient,
    SyncResult,
    SyncStatus,
)
from syncunit.errors import (
    AuthError,
    DeclarationError,
    LocalStoreError,
    NetworkError,
    ProblemError,
    ProtocolError,
    RequestRejected,
    SyncCancelled,
    SyncError,
    SyncUnitError,
    UnknownUnitError,
)
from syncunit.ids import uuid7

if TYPE_CHECKING:
    from syncunit.units import Join, Param, Stream, SyncSchema, SyncUnit

__version__ = "0.1.0"

__all__ = [
    "AsyncSyncClient",
    "AuthError",
    "DeclarationError",
    "Join",
    "LiveQuery",
    "LocalStore",
    "LocalStoreError",
    "NetworkError",
    "Param",
    "ProblemError",
    "Progress",
    "ProtocolError",
    "RequestRejected",
    "RetryPolicy",
    "Stream",
    "SyncCancelled",
    "SyncClient",
    "SyncError",
    "SyncResult",
    "SyncSchema",
    "SyncStatus",
    "SyncUnit",
    "SyncUnitError",
    "UnknownUnitError",
    "__version__",
    "uuid7",
]

_LAZY = {"Join", "Param", "Stream", "SyncSchema", "SyncUnit"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from syncunit import units

        return getattr(units, name)
    raise AttributeError(f"module 'syncunit' has no attribute {name!r}")
