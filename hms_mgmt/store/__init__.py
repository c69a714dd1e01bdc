"""The engine's store: the interface (``base``), SQLite (``sqlite``) and PostgreSQL (``postgres``).

The factory is here.
"""

from hms_mgmt.store.base import Batch, OutboxRow, Store


def shared(url: str) -> bool:
    """Whether several engines may point at this store (one active, the others standing by):
    PostgreSQL, yes; SQLite is single-engine by construction."""
    return url.startswith(("postgresql://", "postgres://"))


def open_store(url: str) -> Store:
    """The store for a URL: ``sqlite:///relative.db``, ``sqlite:////abs.db``, ``sqlite:///:memory:``,
    ``postgresql://user:password@host:port/db`` (or ``postgres://``)."""
    if url.startswith("sqlite://"):
        from hms_mgmt.store.sqlite import SQLiteStore

        return SQLiteStore(url)
    if url.startswith(("postgresql://", "postgres://")):
        from hms_mgmt.store.postgres import PostgresStore

        return PostgresStore(url)
    raise ValueError(
        f"unsupported store URL {url!r}: use sqlite:///path.db or postgresql://user@host/db"
    )


__all__ = ("Batch", "OutboxRow", "Store", "open_store", "shared")
