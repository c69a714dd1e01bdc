"""One batch in the making: what the loading stage found, and what applying the events made."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hms_mgmt.machine.limits import Group, Slots
from hms_mgmt.machine.transition import FollowUp
from hms_mgmt.records import StepRun, TypePause, Workflow
from hms_mgmt.schedules import Schedule
from hms_mgmt.store.base import Batch
from hms_mgmt.wire.requests import Request
from hms_mgmt.wire.steps import StepMessage

REDELIVERED = "redelivered"
"""The history entry of a step message delivered again, counted by the poison guard."""

Reply = tuple[str, str, bool, Any]
"""To whom (``reply_to``), for which request, ok or not, and the value or the error."""


@dataclass
class Work:
    # Loaded before applying:
    state: dict[str, tuple[Workflow, StepRun | None]] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # idempotency key -> workflow id
    answered: dict[str, Any] = field(default_factory=dict)  # request id -> [ok, reply]
    failed_runs: dict[tuple[str, int], StepRun] = field(default_factory=dict)  # for retry
    last_runs: dict[tuple[str, str], StepRun] = field(default_factory=dict)  # for reset: a
    # step's latest run, by (workflow id, step)
    ticks: dict[str, tuple[list[float], Schedule]] = field(default_factory=dict)  # due ticks
    # (workflow id, seq) -> the ids of the redeliveries of its step message counted so far
    redeliveries: dict[tuple[str, int], set[str]] = field(default_factory=dict)
    # All the runs of a workflow whose compensate timer fired, by workflow id: the chain's
    # next compensation is derived from them
    runs_of: dict[str, list[StepRun]] = field(default_factory=dict)
    # The workflows a type pause holds, oldest first, for its resume: by (workflow, step or "")
    type_held: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    # The size of each family a step of this batch may start children in, by its root's id:
    # as stored, then with the children this batch starts (machine.children.MAX_FAMILY)
    families: dict[str, int] = field(default_factory=dict)
    # Made by applying, written in one transaction:
    batch: Batch = field(default_factory=Batch)
    # ... and let out once it is committed:
    replies: list[Reply] = field(default_factory=list)
    reads: list[Request] = field(default_factory=list)  # status, wait, list: answered after
    finished: list[str] = field(default_factory=list)
    timers: list[tuple[str, str, float]] = field(default_factory=list)
    schedules: dict[str, Schedule | None] = field(default_factory=dict)  # changed; None: gone
    type_pauses: dict[tuple[str, str], TypePause | None] = field(default_factory=dict)  # same
    slots: Slots | None = None  # the concurrency slots, if this batch changed them
    stalled: set[Group] = field(default_factory=set)  # groups with free slots and a line
    # whose next run was not loaded: admitted by the next batch
    admitting: set[tuple[str, str]] = field(default_factory=set)  # steps being admitted
    publishing: list[StepMessage] = field(default_factory=list)  # what the transition
    # being recorded publishes
    follow: list[FollowUp] = field(default_factory=list)  # for other workflows, applied
    # before the commit (children started, cancelled or retried; parents told)
    logs: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)  # level, event
    started: int = 0
    dead_lettered: int = 0

    def count_child(self, parent: dict[str, Any], by: int) -> None:
        """A child start asked for (``by`` 1) or found already made (-1): its family's size,
        as this batch knows it, for the next step in the batch that starts children."""
        root = parent.get("root")
        if isinstance(root, str) and root in self.families:
            self.families[root] += by

    def failed_run(self, workflow: Workflow, run: StepRun) -> StepRun:
        """The run a failed workflow's error names (what its retry runs again), loaded
        beside its latest run; the latest when the error names none."""
        seq = (workflow.error or {}).get("seq")
        return self.failed_runs.get((workflow.id, seq), run) if isinstance(seq, int) else run

    def reply(self, request: Request, ok: bool, value: Any) -> None:
        if request.reply_to:
            self.replies.append((request.reply_to, request.request_id, ok, value))

    def log(self, level: str, message: str, **fields: Any) -> None:
        """A line to log once the batch has committed (a rolled-back batch says nothing)."""
        self.logs.append((level, message, fields))
