"""The one place that maps a database URL (or engine) to its ``ServerStore``.

The interface (``store``) knows no implementation; each backend module knows
only the interface; this module knows them all.
"""

from __future__ import annotations

from sqlalchemy.engine import Engine

from syncunit.server.store import ServerStore

__all__ = ["open_store"]


def open_store(url_or_engine: str | Engine) -> ServerStore:
    """The ``ServerStore`` for a database URL or engine: SQLite or PostgreSQL."""
    engine = url_or_engine if isinstance(url_or_engine, Engine) else None
    url = str(url_or_engine) if engine is None else engine.url.render_as_string()
    if url.startswith("sqlite"):
        from syncunit.server.sqlite import SQLiteStore

        return SQLiteStore(engine) if engine is not None else SQLiteStore.from_url(url)
    if url.startswith(("postgresql", "postgres:")):
        try:
            from syncunit.server.postgres import PostgresStore
        except ImportError as exc:  # psycopg missing
            raise ValueError(
                f"PostgreSQL needs psycopg 3: pip install 'syncunit[postgres]' ({exc})"
            ) from exc
        return PostgresStore(engine) if engine is not None else PostgresStore.from_url(url)
    raise ValueError(
        f"unsupported database URL {url!r}: syncunit's server runs on SQLite"
        " (sqlite:///path) or PostgreSQL (postgresql://user@host/dbname)"
    )
