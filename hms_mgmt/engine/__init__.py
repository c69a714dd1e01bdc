"""The engine daemon: ``python -m hms_mgmt.engine``."""

from hms_mgmt.engine.engine import Engine

__all__ = ("Engine",)
