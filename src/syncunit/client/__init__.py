"""The client: a local SQLite store and the sync engine that fills it."""

from syncunit.client.client import SyncClient, SyncResult
from syncunit.client.store import LocalStore

__all__ = ["LocalStore", "SyncClient", "SyncResult"]
