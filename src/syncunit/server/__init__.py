"""The server: change tracking, delta reads, and the ASGI app."""

from syncunit.server.app import SyncServer, create_app
from syncunit.server.auth import Authenticator, Principal, TokenAuth
from syncunit.server.backends import open_store
from syncunit.server.store import ServerStore

__all__ = [
    "Authenticator",
    "Principal",
    "ServerStore",
    "SyncServer",
    "TokenAuth",
    "create_app",
    "open_store",
]
