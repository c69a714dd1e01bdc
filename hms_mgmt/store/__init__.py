"""The engine's store: the interface (``base``) and SQLite (``sqlite``); the factory is here."""

from hms_mgmt.store.base import Batch, OutboxRow, Store


def open_store(url: str) -> Store:
    """The store for a URL: ``sqlite:///relative.db``, ``sqlite:////abs.db``, ``sqlite:///:memory:``."""
    if url.startswith("sqlite://"):
        from hms_mgmt.store.sqlite import SQLiteStore

        return SQLiteStore(url)
    raise ValueError(f"unsupported store URL {url!r}: use sqlite:///path.db")


__all__ = ("Batch", "OutboxRow", "Store", "open_store")
