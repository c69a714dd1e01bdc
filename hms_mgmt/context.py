"""What a step handler receives, and the shape of a handler."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from hms_mgmt.records import idempotency_key

Handler = Callable[["StepContext"], Any]


@dataclass
class StepContext:
    """What a handler gets: the step's payload and where it stands."""

    payload: Any
    workflow_id: str
    workflow: str
    step: str
    attempt: int
    seq: int
    visit: int
    error: dict[str, Any] | None = None  # for an error step: the failure that led here
    signal: Any = None  # after a wait: the signal's data
    # for a compensation: the run it undoes, {"step", "seq", "output"} (its input is payload)
    compensating: dict[str, Any] | None = None
    traceparent: str | None = None  # W3C trace context of the workflow (from start)
    branch: int | None = None  # for a fan-out branch: its index (in the fan-out or the items)
    _heartbeat: Callable[[], Awaitable[None]] | None = field(default=None, repr=False)

    @property
    def idempotency_key(self) -> str:
        """The same across redeliveries and retries of this step run; use it for side effects."""
        return idempotency_key(self.workflow_id, self.step, self.visit, self.branch)

    @property
    def trace_id(self) -> str | None:
        """The trace id of :attr:`traceparent`, for log lines and lookups."""
        return None if self.traceparent is None else self.traceparent.split("-")[1]

    async def heartbeat(self) -> None:
        """Tell the engine this step is alive: its timeout starts again from now."""
        if self._heartbeat is not None:
            await self._heartbeat()
