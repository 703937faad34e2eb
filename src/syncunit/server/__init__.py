"""The server: change tracking, delta reads, and the ASGI app."""

from syncunit.errors import DatabaseRestored, DatabaseTooNew
from syncunit.server.app import SyncServer, create_app
from syncunit.server.auth import Authenticator, JWTAuth, Principal, TokenAuth, first_of
from syncunit.server.backends import open_store
from syncunit.server.limits import Limits
from syncunit.server.store import ServerStore

__all__ = [
    "Authenticator",
    "DatabaseRestored",
    "DatabaseTooNew",
    "JWTAuth",
    "Limits",
    "Principal",
    "ServerStore",
    "SyncServer",
    "TokenAuth",
    "create_app",
    "first_of",
    "open_store",
]
