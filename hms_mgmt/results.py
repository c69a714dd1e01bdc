"""``StepResult``: what a handler may return instead of a plain dict."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from hms_mgmt.messages import check_delay, check_run_at, short


def _timestamp(moment: datetime) -> float:
    try:
        return moment.timestamp()
    except (OverflowError, ValueError, OSError) as exc:
        raise ValueError(f"StepResult run_at {short(moment)} has no timestamp: {exc}") from None


class StepResult:
    """A handler's decision: go on (to ``next_step`` or the next in order), finish, or wait.

    ``StepResult(data)`` goes on in order; ``StepResult(data, next_step="x")``
    jumps; ``StepResult.complete(data)`` ends the workflow with ``data`` as its
    output; ``delay`` or ``run_at`` defer the next step.
    """

    __slots__ = ("_result",)

    def __init__(
        self,
        data: Any = None,
        *,
        next_step: str | None = None,
        delay: float | None = None,
        run_at: datetime | float | None = None,
    ) -> None:
        result: dict[str, Any] = {"data": data}
        if next_step is not None:
            result["next_step"] = next_step
        if delay is not None:
            check_delay(delay, "StepResult delay")
            result["delay"] = delay
        if run_at is not None:
            timestamp = _timestamp(run_at) if isinstance(run_at, datetime) else run_at
            check_run_at(timestamp, "StepResult run_at")
            result["run_at"] = timestamp
        self._result = result

    @classmethod
    def complete(cls, data: Any = None) -> StepResult:
        """End the workflow now, successfully, with ``data`` as its output."""
        result = cls(data)
        result._result["complete"] = True
        return result

    @classmethod
    def wait_for(
        cls,
        signal: str,
        *,
        next_step: str | None = None,
        data: Any = None,
        timeout: float | None = None,
    ) -> StepResult:
        """Park the workflow until ``signal`` arrives (or ``timeout`` seconds pass)."""
        result = cls(data, next_step=next_step)
        result._result["wait_for"] = signal
        if timeout is not None:
            check_delay(timeout, "StepResult.wait_for timeout")
            result._result["timeout"] = timeout
        return result

    def to_result(self) -> dict[str, Any]:
        return dict(self._result)

    def __repr__(self) -> str:
        return f"StepResult({self._result!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StepResult) and other._result == self._result

    __hash__ = None  # type: ignore[assignment]
