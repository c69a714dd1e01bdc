"""Where the engine keeps workflow state."""

from hms_mgmt.store.base import Batch, OutboxRow, Store, open_store

__all__ = ("Batch", "OutboxRow", "Store", "open_store")
