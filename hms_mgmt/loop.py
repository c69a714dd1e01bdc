"""Run a daemon's event loop: uvloop when it is installed (the ``fast`` extra), else asyncio's."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop if available and not disabled with ``HMS_UVLOOP=0``."""
    if os.environ.get("HMS_UVLOOP", "1") != "0":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            result: T = uvloop.run(main)  # untyped without uvloop installed
            return result
    return asyncio.run(main)
