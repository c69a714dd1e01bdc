"""An engine hosted in the management object's own process: the one-process demo.

Imported only when ``init(store_url=...)`` asks for it, so that a client or a step
service never loads the engine and the store.
"""

from __future__ import annotations

import asyncio
import contextlib

from bus_adapters import open_bus
from hms_mgmt.engine.engine import Engine
from hms_mgmt.errors import HmsError
from hms_mgmt.settings import Settings
from hms_mgmt.store import open_store


class HostedEngine:
    def __init__(self, engine: Engine, task: asyncio.Task[None]) -> None:
        self.engine = engine
        self._task = task

    @classmethod
    async def start(cls, broker_url: str, store_url: str, *, name: str) -> HostedEngine:
        """An engine running in this process, once it is ready (or the error that stopped it)."""
        engine = Engine(
            open_bus(broker_url, name=f"{name}:engine"),
            open_store(store_url),
            step_queue_type=Settings.from_env().step_queue_type,
        )
        task = asyncio.get_running_loop().create_task(engine.run())
        ready = asyncio.ensure_future(engine.ready.wait())
        await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            ready.cancel()
            task.result()  # raises what stopped it
            raise HmsError("the in-process engine stopped during start-up")
        return cls(engine, task)

    async def stop(self) -> None:
        self.engine.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
