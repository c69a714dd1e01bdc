"""What a transition of the state machine is: the changed workflow and runs, its history,
and the messages it causes; and the kinds of a workflow's timer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hms_mgmt.records import StepRun, Workflow
from hms_mgmt.wire.steps import StepMessage

TIMER_RUN = "run"  # a scheduled run (delayed step, retry backoff) is due
TIMER_DEADLINE = "deadline"  # a started run has not finished in time
TIMER_WAIT = "wait"  # a wait for a signal has run out
TIMER_START = "start"  # a published run has not been started by any step service in time
TIMER_COMPENSATE = "compensate"  # a compensating workflow's next compensation is due
TIMER_BRANCH = "branch"  # a fan-out's branch is due (a retry's backoff) or past its deadline
TIMER_ADMIT = "admit"  # a queued run's admission: durable for a rate limit's next one,
# in memory only for a line left with free slots


@dataclass
class DeadLetter:
    """A given-up run whose step message goes into its ``.dlq``."""

    run: StepRun
    workflow: str
    reason: str
    attempts: int
    error: dict[str, Any] | None


@dataclass(frozen=True)
class StartChild:
    """Start a child workflow (``workflow_id``, derived from its parent's step run)."""

    workflow_id: str
    workflow: str
    data: Any
    parent: dict[str, Any]
    traceparent: str | None
    priority: int


@dataclass(frozen=True)
class ChildFinished:
    """A child workflow ended: its parent (``workflow_id``) records it, and may resume."""

    workflow_id: str
    child_id: str
    seq: int  # the parent's step run that started the child
    status: str
    output: Any
    error: dict[str, Any] | None


@dataclass(frozen=True)
class CancelChild:
    """Its parent was cancelled: cancel this child (``parent_close="terminate"``)."""

    workflow_id: str
    reason: str


@dataclass(frozen=True)
class RetryChild:
    """Its parent was retried: retry this failed child from its failed step."""

    workflow_id: str


FollowUp = StartChild | ChildFinished | CancelChild | RetryChild
"""What a transition asks of another workflow, applied in the same batch (and commit)."""


@dataclass
class Transition:
    """What an event changed: the new workflow, runs created or changed, history, messages,
    and business keys set."""

    workflow: Workflow | None = None
    runs: list[StepRun] = field(default_factory=list)
    history: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    steps: list[StepMessage] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    attributes: dict[str, str] = field(default_factory=dict)  # business keys to set
    follow: list[FollowUp] = field(default_factory=list)  # events for parents and children
    quiet: bool = False  # records a finished workflow's late branch outcome: ends nothing

    @property
    def changed(self) -> bool:
        return self.workflow is not None

    @property
    def finished(self) -> bool:
        return self.workflow is not None and self.workflow.terminal and not self.quiet

    def note(self, event: str, /, **detail: Any) -> None:
        self.history.append((event, detail))
