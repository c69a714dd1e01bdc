"""Change notices for the dashboard's live updates (``GET /api/events``, Server-Sent Events).

The engine calls :meth:`Changes.on_batch` after each committed batch. With nobody
listening it returns at once; with listeners it only adds the batch's workflow ids
(and their new statuses) to a pending set, and at most ``rate`` times a second one
small notice goes to every listener: ``{"workflows": {id: status, ...}, "more": bool}``.
The page then reads what it shows again through the JSON API. A listener that does not
keep up loses notices (its queue is small and never blocks the engine), not the engine's
time: the next notice makes it read again anyway.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hms_mgmt.store.base import Batch

MAX_IDS = 100  # workflow ids named in one notice; beyond that "more": true
QUEUE = 8  # notices a slow listener may have waiting


class Changes:
    def __init__(self, *, rate: float = 2.0) -> None:
        self.interval = 1.0 / rate
        self._listeners: set[asyncio.Queue[bytes | None]] = set()
        self._pending: dict[str, str] = {}
        self._more = False
        self._flush: asyncio.TimerHandle | None = None

    @property
    def listeners(self) -> int:
        return len(self._listeners)

    def on_batch(self, batch: Batch) -> None:
        """After a committed batch: note its workflows, for the next notice."""
        if not self._listeners:
            return
        pending = self._pending
        for workflow_id, workflow in batch.workflows.items():
            if len(pending) >= MAX_IDS and workflow_id not in pending:
                self._more = True
                break
            pending[workflow_id] = str(workflow.status)
        if (pending or self._more) and self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(self.interval, self._send)

    def _send(self) -> None:
        self._flush = None
        notice: dict[str, Any] = {"workflows": self._pending, "more": self._more}
        self._pending, self._more = {}, False
        self.publish(b"event: changed\ndata: " + json.dumps(notice).encode() + b"\n\n")

    def publish(self, message: bytes | None) -> None:
        for queue in self._listeners:
            if queue.full():  # a listener that does not keep up: it loses this one
                continue
            queue.put_nowait(message)

    def listen(self) -> asyncio.Queue[bytes | None]:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE)
        self._listeners.add(queue)
        return queue

    def leave(self, queue: asyncio.Queue[bytes | None]) -> None:
        self._listeners.discard(queue)

    def close(self) -> None:
        """The server is stopping: every stream ends (``None``), so none holds it up."""
        for queue in self._listeners:
            while queue.full():
                queue.get_nowait()
            queue.put_nowait(None)
