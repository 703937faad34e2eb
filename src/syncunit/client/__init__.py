"""The client: a local SQLite store and the sync engine that fills it."""

from syncunit.client.aio import AsyncSyncClient
from syncunit.client.client import SyncClient, SyncResult
from syncunit.client.reactive import LiveQuery
from syncunit.client.scheduler import Progress, RetryPolicy, SyncStatus
from syncunit.client.store import LocalStore, connect

__all__ = [
    "AsyncSyncClient",
    "LiveQuery",
    "LocalStore",
    "Progress",
    "RetryPolicy",
    "SyncClient",
    "SyncResult",
    "SyncStatus",
    "connect",
]
