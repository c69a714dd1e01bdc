"""``StepResult``: what a handler may return instead of a plain dict."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from hms_mgmt.bounds import check_attributes, check_delay, check_run_at, child_problem, short
from hms_mgmt.wire.outcomes import RESULT_KEYS


def _timestamp(moment: datetime) -> float:
    try:
        return moment.timestamp()
    except (OverflowError, ValueError, OSError) as exc:
        raise ValueError(f"StepResult run_at {short(moment)} has no timestamp: {exc}") from None


class StepResult:
    """A handler's decision: go on (to ``next_step`` or the next in order), finish, or wait.

    ``StepResult(data)`` goes on in order; ``StepResult(data, next_step="x")``
    jumps; ``StepResult.complete(data)`` ends the workflow with ``data`` as its
    output; ``delay`` or ``run_at`` defer the next step; ``attributes`` adds business keys
    to the workflow (searchable, see ``client.list(attributes=...)``), with this transition.
    """

    __slots__ = ("_result",)

    def __init__(
        self,
        data: Any = None,
        *,
        next_step: str | None = None,
        delay: float | None = None,
        run_at: datetime | float | None = None,
        attributes: dict[str, str] | None = None,
    ) -> None:
        result: dict[str, Any] = {"data": data}
        if attributes:
            result["attributes"] = check_attributes(attributes, "StepResult attributes")
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
    def complete(cls, data: Any = None, *, attributes: dict[str, str] | None = None) -> StepResult:
        """End the workflow now, successfully, with ``data`` as its output."""
        result = cls(data, attributes=attributes)
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
        attributes: dict[str, str] | None = None,
    ) -> StepResult:
        """Park the workflow until ``signal`` arrives (or ``timeout`` seconds pass)."""
        result = cls(data, next_step=next_step, attributes=attributes)
        result._result["wait_for"] = signal
        if timeout is not None:
            check_delay(timeout, "StepResult.wait_for timeout")
            result._result["timeout"] = timeout
        return result

    @classmethod
    def child(
        cls,
        workflow: str | list[dict[str, Any]],
        data: Any = None,
        *,
        next_step: str | None = None,
        parent_close: str = "terminate",
        attributes: dict[str, str] | None = None,
    ) -> StepResult:
        """Start child workflow ``workflow`` with ``data`` and wait for it; ``next_step``
        (or the next in order) then runs with its output as payload. ``workflow`` may be a
        list of children (``{"workflow", "data", "parent_close"}``): the next step then gets
        their outputs, in order. ``parent_close="abandon"``: cancelling this workflow leaves
        the child running."""
        if isinstance(workflow, list):
            children: Any = workflow
        else:
            children = {"workflow": workflow, "data": data}
            if parent_close != "terminate":
                children["parent_close"] = parent_close
        problem = child_problem(children)
        if problem is not None:
            raise ValueError(f"StepResult.child: {problem}")
        result = cls(None, next_step=next_step, attributes=attributes)
        del result._result["data"]
        result._result["child"] = children
        return result

    def to_result(self) -> dict[str, Any]:
        return dict(self._result)

    def __repr__(self) -> str:
        return f"StepResult({self._result!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StepResult) and other._result == self._result

    __hash__ = None  # type: ignore[assignment]


def normalise_result(value: Any, *, payload: Any, describe: Callable[[], str]) -> dict[str, Any]:
    """A handler's return value as a result dict, or ``ValueError`` naming the handler and value.

    ``None`` passes the step's own payload on; ``nextStep`` is accepted for ``next_step``.
    """
    if value is None:
        return {"data": payload}
    to_result = getattr(value, "to_result", None)
    if callable(to_result):
        value = to_result()
    if not isinstance(value, dict):
        raise ValueError(
            f"{describe()} returned {value!r}; expected a dict such as {{'data': ...}}"
        )
    result = dict(value)
    if "nextStep" in result:
        if "next_step" in result:
            raise ValueError(f"{describe()} returned both 'next_step' and 'nextStep'")
        result["next_step"] = result.pop("nextStep")
    unknown = set(result) - RESULT_KEYS
    if unknown or not result:
        raise ValueError(
            f"{describe()} returned {_short(value)}; expected keys among "
            f"{sorted(RESULT_KEYS)} (unknown: {sorted(unknown)})"
        )
    next_step = result.get("next_step")
    if next_step is not None and not isinstance(next_step, str):
        raise ValueError(f"{describe()} returned next_step {next_step!r}, which is not a step name")
    run_at = result.get("run_at")
    if run_at is not None:
        timestamp = getattr(run_at, "timestamp", None)
        if callable(timestamp):
            try:
                result["run_at"] = run_at = timestamp()
            except (OverflowError, ValueError, OSError) as exc:
                raise ValueError(f"{describe()} returned run_at {short(run_at)}: {exc}") from None
        try:
            check_run_at(run_at, "run_at")
        except ValueError as exc:
            raise ValueError(f"{describe()} returned run_at {short(run_at)}; {exc}") from None
    for key in ("delay", "timeout"):
        if result.get(key) is not None:
            try:
                check_delay(result[key], key)
            except ValueError as exc:
                raise ValueError(
                    f"{describe()} returned {key} {short(result[key])}; {exc}"
                ) from None
    if result.get("child") is not None:
        problem = child_problem(result["child"])
        if problem is not None:
            raise ValueError(f"{describe()} returned a bad child: {problem}")
    attributes = result.get("attributes")
    if attributes is not None:
        try:
            result["attributes"] = check_attributes(attributes)
        except ValueError as exc:
            raise ValueError(f"{describe()} returned bad attributes: {exc}") from None
    return result


def _short(value: Any) -> str:
    return short(value, 200)
