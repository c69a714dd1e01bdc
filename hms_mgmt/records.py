"""What the engine records: workflows and step runs, and what ``status()`` returns."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, TypeVar

from hms_mgmt import tracing
from hms_mgmt.bounds import DEFAULT_PRIORITY


class WorkflowStatus(StrEnum):
    PENDING = "pending"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    WAITING = "waiting"
    PAUSED = "paused"  # held by an operator (``client.pause``) until ``client.resume``
    COMPENSATING = "compensating"  # running its compensations, newest first
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    COMPENSATED = "compensated"  # gave up or was cancelled, and every compensation succeeded


class StepStatus(StrEnum):
    PENDING = "pending"
    SCHEDULED = "scheduled"
    QUEUED = "queued"  # over its step's concurrency limit: not published until a slot frees
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


STATUSES = tuple(str(status) for status in WorkflowStatus)
"""Every workflow status, in the order a workflow may go through them."""
QUEUED_FILTER = "queued"
"""A listing's ``status`` filter that is no workflow status: the workflows that have not
finished whose current run is queued (waiting in line for a slot of its step's
concurrency or rate limit)."""
LIST_FILTERS = (*STATUSES, QUEUED_FILTER)
"""What a workflow listing's ``status`` filter takes: a workflow status, or ``queued``."""


R = TypeVar("R")


def evolve(record: R, **changes: Any) -> R:
    """A shallow copy of a record with ``changes``: ``dataclasses.replace`` without re-running
    ``__init__``, about three times as fast (the state machine copies on every event)."""
    copy: R = object.__new__(type(record))
    copy.__dict__.update(record.__dict__, **changes)
    return copy


def idempotency_key(workflow_id: str, step: str, visit: int, branch: int | None = None) -> str:
    """The same across redeliveries and retries of one visit of a step; the next visit's differs.
    A branch of a fan-out (``branch``: its index) has its own, ending in its index."""
    key = f"{workflow_id}:{step}:{visit}"
    return key if branch is None else f"{key}:{branch}"


def branch_of(context: dict[str, Any] | None) -> int | None:
    """The index of the fan-out branch a run is (from its context), or None."""
    about = (context or {}).get("branch")
    return about.get("index") if isinstance(about, dict) else None


TERMINAL = frozenset(
    {
        WorkflowStatus.SUCCEEDED,
        WorkflowStatus.FAILED,
        WorkflowStatus.CANCELLED,
        WorkflowStatus.COMPENSATED,
    }
)
ACTIVE_RUN = frozenset(
    {StepStatus.PENDING, StepStatus.SCHEDULED, StepStatus.QUEUED, StepStatus.RUNNING}
)


@dataclass
class StepRun:
    """One attempt of one step of one workflow (a retry is a new run)."""

    workflow_id: str
    seq: int  # position among the workflow's runs, from 1
    step: str
    visit: int  # how many times the workflow has entered this step, this time included
    attempt: int
    status: StepStatus
    input: Any
    created_at: float
    output: Any = None
    error: dict[str, Any] | None = None
    # ctx.error for an error step, ctx.signal after a wait, ctx.compensating for a compensation
    context: dict[str, Any] | None = None
    due_at: float | None = None  # when a scheduled run is to start
    started_at: float | None = None
    finished_at: float | None = None
    deadline_at: float | None = None  # when a started run times out

    @property
    def idempotency_key(self) -> str:
        return idempotency_key(self.workflow_id, self.step, self.visit, branch_of(self.context))

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepRun:
        values = dict(data)
        values["status"] = StepStatus(values["status"])
        return cls(**values)


@dataclass
class Workflow:
    """A workflow's current state; its runs and history are kept beside it."""

    id: str
    name: str
    version: int
    status: WorkflowStatus
    input: Any
    created_at: float
    updated_at: float
    output: Any = None
    error: dict[str, Any] | None = None
    seq: int = 0  # seq of the current (latest) run
    visits: dict[str, int] = field(default_factory=dict)
    timer_at: float | None = None
    timer_kind: str | None = None
    wait: dict[str, Any] | None = None  # what a waiting workflow waits for
    signals: dict[str, Any] = field(default_factory=dict)  # signals that came before their wait
    idempotency_key: str | None = None
    traceparent: str | None = None  # W3C trace context from start, put in every step message
    retries: int = 0  # operators' retries of it after it failed (``hms workflow retry``, a reset)
    # While paused: since, reason, the status it had (and goes back to), its frozen timer
    # ({"kind", "remaining"}: a delay, a backoff or a wait's timeout) and the seq of a run
    # whose step message is held until resume (``held``). None when not paused.
    pause: dict[str, Any] | None = None
    priority: int = DEFAULT_PRIORITY  # 1 (first) to 5 (last): the order of its queued runs
    # and of its start held by a type pause
    # A child workflow's parent: {"id", "step", "seq", "index", "close"} (see machine.children)
    parent: dict[str, Any] | None = None
    # The latest group of child workflows a step of it started: {"step", "seq", "ids",
    # "close", "next_step", "many", "done": {id: {"status", "output", "error"}}}
    children: dict[str, Any] | None = None
    # The latest fan-out a step of it made: {"step", "seq", "join", "tolerate",
    # "max_concurrency", "state", "branches": [each branch's latest run, or a waiting one]}
    # (see machine.branches)
    branches: dict[str, Any] | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True)
class TypePause:
    """A workflow type paused by an operator (``client.pause_type``): every workflow of it
    (or, with ``step``, of that step) that would publish a step is paused and holds it."""

    workflow: str
    step: str | None
    since: float
    reason: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.workflow, self.step or "")

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def waiting_since(run: StepRun) -> float:
    """Since when a pending run has waited for a step service (a deferred one, from its due time)."""
    return max(run.created_at, run.due_at or 0.0)


def why_stuck(workflow: Workflow, run: StepRun | None, now: float, after: float) -> str | None:
    """Why a workflow seems stuck: a step that no step service has started, or that has run
    with no timeout, for longer than ``after`` seconds. None when it is not."""
    if workflow.terminal or workflow.status == WorkflowStatus.PAUSED or run is None:
        return None  # a paused workflow is held on purpose
    topic = f"{workflow.name}.{run.step}"
    if run.status == StepStatus.PENDING and now - waiting_since(run) > after:
        return (
            f"step {run.step!r} (attempt {run.attempt}) has waited {now - waiting_since(run):.0f}s "
            f"for a step service to start it: is one serving {topic!r}, with free slots? "
            "(Step(schedule_to_start=...) fails such a wait into the retry policy)"
        )
    if (
        run.status == StepStatus.RUNNING
        and run.deadline_at is None
        and run.started_at is not None
        and now - run.started_at > after
    ):
        return (
            f"step {run.step!r} (attempt {run.attempt}) has run for {now - run.started_at:.0f}s "
            "with no timeout to end it (Step(timeout=...) sets one)"
        )
    return None


def _undoes(run: StepRun) -> dict[str, Any] | None:
    about = (run.context or {}).get("compensating")
    if not isinstance(about, dict):
        return None
    return {"step": about.get("step"), "seq": about.get("seq")}


def _step_json(step: StepRecord) -> dict[str, Any]:
    values = dict(step.__dict__)
    if values["undoes"] is None:  # only on compensation runs: older clients read the rest
        del values["undoes"]
    return values


def children_of(workflow: Workflow) -> list[dict[str, Any]]:
    """The child workflows a workflow's latest such step started, as its status shows them:
    id, workflow, status (None while not finished, as far as the parent knows), parent_close."""
    group = workflow.children
    if not group:
        return []
    done = group.get("done", {})
    return [
        {
            "workflow_id": child,
            "workflow": name,
            "status": done.get(child, {}).get("status"),
            "parent_close": close,
        }
        for child, name, close in zip(group["ids"], group["workflows"], group["close"], strict=True)
    ]


def branches_of(workflow: Workflow) -> dict[str, Any] | None:
    """A workflow's latest fan-out, as its status shows it: the step that fanned out, the
    join, its state (open, joined, failed, cancelled), and each branch's step, status
    (``waiting`` before it is published), run (seq) and attempt. None if it has none."""
    group = workflow.branches
    if not group:
        return None
    return {
        "step": group["step"],
        "join": group["join"],
        "state": group["state"],
        "tolerate": group["tolerate"],
        "max_concurrency": group["max_concurrency"],
        "branches": [
            {
                "index": index,
                "step": entry["step"],
                "status": str(entry["status"]),
                "seq": entry.get("seq"),
                "attempt": entry.get("attempt"),
            }
            for index, entry in enumerate(group["branches"])
        ],
    }


def summary(workflow: Workflow, attributes: dict[str, str] | None = None) -> dict[str, Any]:
    """A workflow in a list (``hms workflow list``, ``client.list``, ``GET /api/workflows``),
    with its business keys."""
    error = workflow.error or {}
    return {
        "workflow_id": workflow.id,
        "name": workflow.name,
        "status": str(workflow.status),
        "created_at": workflow.created_at,
        "updated_at": workflow.updated_at,
        "error": {k: error.get(k) for k in ("type", "message", "step", "attempts")}
        if workflow.error
        else None,
        "trace_id": tracing.trace_id(workflow.traceparent),
        "attributes": attributes or {},
        "priority": workflow.priority,
    }


@dataclass
class StepRecord:
    """One step run as a user reads it."""

    step: str
    attempt: int
    status: StepStatus
    input: Any
    output: Any
    error: dict[str, Any] | None
    seq: int
    visit: int
    created_at: float
    due_at: float | None
    started_at: float | None
    finished_at: float | None
    deadline_at: float | None = None  # when a started run times out, if its step has a timeout
    undoes: dict[str, Any] | None = None  # a compensation run's: the step and seq it undoes

    @property
    def duration(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at


@dataclass
class WorkflowState:
    """What ``status()`` and ``wait()`` return: a workflow and its step runs, in order."""

    workflow_id: str
    name: str
    status: WorkflowStatus
    input: Any
    output: Any
    error: dict[str, Any] | None
    created_at: float
    updated_at: float
    steps: list[StepRecord]
    current_step: str | None = None
    scheduled_at: float | None = None
    waiting_for: dict[str, Any] | None = None
    traceparent: str | None = None
    stuck: str | None = None  # why the workflow seems stuck, when it does
    attributes: dict[str, str] = field(default_factory=dict)  # business keys
    paused: dict[str, Any] | None = None  # while paused: since, reason, the status it resumes to
    parent: dict[str, Any] | None = None  # a child workflow's parent: id, name, step, index
    # The child workflows its latest such step started: workflow_id, workflow, status
    # (None while not finished), parent_close
    children: list[dict[str, Any]] = field(default_factory=list)
    priority: int = DEFAULT_PRIORITY  # 1 (first) to 5 (last): the order of its queued runs
    # and of its start held by a type pause
    # Its latest fan-out: step, join, state and each branch's step, status, seq and attempt
    # (see branches_of); only in the JSON when it has one
    branches: dict[str, Any] | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def of(
        cls,
        workflow: Workflow,
        runs: list[StepRun],
        *,
        now: float | None = None,
        stuck_after: float | None = None,
        attributes: dict[str, str] | None = None,
    ) -> WorkflowState:
        current = runs[-1] if runs else None
        stuck = (
            None
            if now is None or stuck_after is None
            else why_stuck(workflow, current, now, stuck_after)
        )
        return cls(
            workflow_id=workflow.id,
            name=workflow.name,
            status=workflow.status,
            input=workflow.input,
            output=workflow.output,
            error=workflow.error,
            created_at=workflow.created_at,
            updated_at=workflow.updated_at,
            steps=[
                StepRecord(
                    step=r.step,
                    attempt=r.attempt,
                    status=r.status,
                    input=r.input,
                    output=r.output,
                    error=r.error,
                    seq=r.seq,
                    visit=r.visit,
                    created_at=r.created_at,
                    due_at=r.due_at,
                    started_at=r.started_at,
                    finished_at=r.finished_at,
                    deadline_at=r.deadline_at,
                    undoes=_undoes(r),
                )
                for r in runs
            ],
            current_step=None if current is None or workflow.terminal else current.step,
            scheduled_at=workflow.timer_at if workflow.timer_kind == "run" else None,
            waiting_for=workflow.wait,
            traceparent=workflow.traceparent,
            stuck=stuck,
            attributes=dict(attributes or {}),
            paused=workflow.pause,
            parent=workflow.parent,
            children=children_of(workflow),
            priority=workflow.priority,
            branches=branches_of(workflow),
        )

    def to_json(self) -> dict[str, Any]:
        # Shallow copies, not dataclasses.asdict: the values are JSON already, and asdict's
        # deep copy cost a third of a millisecond per reply.
        values = dict(self.__dict__)
        values["steps"] = [_step_json(step) for step in self.steps]
        if values["branches"] is None:  # only with a fan-out: older clients read the rest
            del values["branches"]
        return values

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkflowState:
        known = {f.name for f in fields(cls)}  # a newer engine's fields are left out
        values = {k: v for k, v in data.items() if k in known}
        values["status"] = WorkflowStatus(values["status"])
        values["steps"] = [
            StepRecord(**{**s, "status": StepStatus(s["status"])}) for s in values["steps"]
        ]
        return cls(**values)

    def describe(self) -> str:
        """A few lines for people: the status and each step run."""
        lines = [f"workflow {self.workflow_id} ({self.name}): {self.status}"]
        for r in self.steps:
            took = f" in {r.duration * 1000:.2f} ms" if r.duration is not None else ""
            undoes = f" (undoes {r.undoes['step']} #{r.undoes['seq']})" if r.undoes else ""
            line = f"  {r.seq:>3}. {r.step}{undoes} attempt {r.attempt}: {r.status}{took}"
            if r.error:
                line += f" ({r.error.get('type')}: {r.error.get('message')})"
            lines.append(line)
        if self.error:
            lines.append(f"  error: {self.error.get('type')}: {self.error.get('message')}")
        if self.attributes:
            keys = ", ".join(f"{k}={v}" for k, v in sorted(self.attributes.items()))
            lines.append(f"  attributes: {keys}")
        if self.parent:
            lines.append(f"  parent: {self.parent.get('id')} (step {self.parent.get('step')})")
        if self.children:
            shown = self.children[:10]
            listed = ", ".join(f"{c['workflow_id']} ({c['status'] or 'running'})" for c in shown)
            more = f" and {len(self.children) - 10} more" if len(self.children) > 10 else ""
            lines.append(f"  children: {listed}{more}")
        if self.priority != DEFAULT_PRIORITY:
            lines.append(f"  priority: {self.priority}")
        if self.branches:
            group = self.branches
            done = sum(b["status"] in ("succeeded", "failed", "timed_out", "cancelled")
                       for b in group["branches"])  # fmt: skip
            lines.append(
                f"  branches of {group['step']}: {done}/{len(group['branches'])} done, "
                f"{group['state']} (join {group['join']})"
            )
        if self.waiting_for:
            lines.append(f"  waiting for {self.waiting_for.get('event')!r}")
        if self.paused:
            why = f": {self.paused.get('reason')}" if self.paused.get("reason") else ""
            lines.append(f"  paused (resumes as {self.paused.get('status')}){why}")
        if self.stuck:
            lines.append(f"  stuck: {self.stuck}")
        if self.status == WorkflowStatus.SUCCEEDED and self.output is not None:
            text = json.dumps(self.output, default=str)
            lines.append(f"  output: {text if len(text) <= 300 else text[:300] + '...'}")
        return "\n".join(lines)


__all__ = [
    "ACTIVE_RUN",
    "TERMINAL",
    "StepRecord",
    "StepRun",
    "StepStatus",
    "TypePause",
    "Workflow",
    "WorkflowState",
    "WorkflowStatus",
]
