"""The pure state machine, without a bus or a store."""

from __future__ import annotations

from typing import Any

import pytest

from hms_mgmt import machine
from hms_mgmt.definitions import RetryPolicy, Step, WorkflowDefinition
from hms_mgmt.errors import InvalidStateError
from hms_mgmt.records import StepRun, StepStatus, Workflow, WorkflowStatus
from hms_mgmt.wire.outcomes import Outcome

GRANT = WorkflowDefinition.build(
    "grantApproval", ["validateApp", "creditCheck", "scheduleInspection", "finalize"]
).with_version(1)


class Run:
    """Drives one workflow through the machine, keeping state as the engine would."""

    def __init__(self, definition: WorkflowDefinition = GRANT, payload: Any = None, **start: Any):
        self.definition = definition
        self.now = 1000.0
        self.runs: dict[int, StepRun] = {}
        self.history: list[str] = []
        self.sent: list[Any] = []
        self.dead: list[machine.DeadLetter] = []
        t = machine.start(definition, "wf1", payload or {"app": 1}, self.now, **start)
        self.workflow: Workflow = t.workflow  # type: ignore[assignment]
        self._fold(t)

    def _fold(self, t: machine.Transition) -> machine.Transition:
        self.history += [kind for kind, _ in t.history]
        if t.workflow is not None:
            self.workflow = t.workflow
        for run in t.runs:
            self.runs[run.seq] = run
        self.sent += t.steps
        self.dead += t.dead_letters
        return t

    @property
    def current(self) -> StepRun:
        return self.runs[self.workflow.seq]

    def outcome(
        self, kind: str = "succeeded", seq: int | None = None, **values: Any
    ) -> machine.Transition:
        self.now += 1
        seq = self.workflow.seq if seq is None else seq
        if kind == "succeeded":
            values.setdefault("result", {"data": {"from": self.runs[seq].step}})
        if kind == "failed":
            values.setdefault("error", {"type": "RuntimeError", "message": "boom"})
        event = Outcome("wf1", seq, kind, step=self.runs[seq].step, **values)
        return self._fold(
            machine.apply_outcome(self.workflow, self.current, self.definition, event, self.now)
        )

    def timer(self, kind: str, at: float | None = None) -> machine.Transition:
        self.now = at if at is not None else (self.workflow.timer_at or self.now)
        return self._fold(
            machine.fire_timer(self.workflow, self.current, self.definition, kind, self.now)
        )


def test_a_grant_runs_its_four_steps_in_order() -> None:
    r = Run()
    assert r.workflow.status == WorkflowStatus.PENDING
    for _ in range(4):
        r.outcome()
    assert r.workflow.status == WorkflowStatus.SUCCEEDED
    assert [m.step for m in r.sent] == [
        "validateApp",
        "creditCheck",
        "scheduleInspection",
        "finalize",
    ]
    assert [run.status for run in r.runs.values()] == [StepStatus.SUCCEEDED] * 4
    assert r.workflow.output == {"from": "finalize"}
    assert r.sent[1].payload == {"from": "validateApp"}  # data flows on


def test_next_step_jumps_and_complete_finishes() -> None:
    r = Run()
    r.outcome(result={"next_step": "finalize", "data": 1})
    assert r.current.step == "finalize"
    r2 = Run()
    r2.outcome(result={"complete": True, "data": "early"})
    assert r2.workflow.status == WorkflowStatus.SUCCEEDED
    assert r2.workflow.output == "early"


def test_a_next_step_outside_the_workflow_fails_the_step_naming_it() -> None:
    r = Run()
    r.outcome(
        result={"next_step": "bogus", "data": 1},
        handler="handler app.validate of grantApproval.validateApp",
    )
    assert r.workflow.status == WorkflowStatus.FAILED
    error = r.runs[1].error or {}
    assert error["type"] == "InvalidNextStep"
    assert "'bogus'" in error["message"] and "app.validate" in error["message"]
    assert len(r.runs) == 1  # not retried
    assert len(r.dead) == 1


def test_duplicate_and_stale_outcomes_change_nothing() -> None:
    r = Run()
    r.outcome()
    before = r.workflow
    t = r.outcome(seq=1)  # the first step's outcome again
    assert not t.changed and r.workflow is before
    assert r.history[-1] == "outcome_ignored"
    r.outcome()
    r.outcome()
    r.outcome()
    assert r.workflow.status == WorkflowStatus.SUCCEEDED
    t = r.outcome(seq=4)
    assert not t.changed


def test_started_report_moves_the_run_to_running() -> None:
    r = Run()
    r.outcome("started", started_at=1000.5)
    assert r.current.status == StepStatus.RUNNING
    assert r.workflow.status == WorkflowStatus.RUNNING
    assert not r.outcome("started").changed  # a second started report is ignored
    r.outcome()
    assert r.runs[1].started_at == 1000.5


def test_failures_retry_with_backoff_then_give_up_into_the_dlq() -> None:
    definition = WorkflowDefinition.build(
        "w", ["a", "b"], retry=RetryPolicy(max_attempts=3, initial_delay=2.0, jitter=False)
    ).with_version(1)
    r = Run(definition)
    r.outcome("failed")
    assert r.current.attempt == 2 and r.current.status == StepStatus.SCHEDULED
    assert r.workflow.timer_kind == machine.TIMER_RUN
    assert r.workflow.timer_at == pytest.approx(r.now + 2.0)
    assert not r.timer(machine.TIMER_RUN, at=r.now + 1).changed  # not yet due
    r.timer(machine.TIMER_RUN)
    assert r.current.status == StepStatus.PENDING
    assert r.sent[-1].attempt == 2
    r.outcome("failed")
    assert r.workflow.timer_at == pytest.approx(r.now + 4.0)
    r.timer(machine.TIMER_RUN)
    r.outcome("failed")
    assert r.workflow.status == WorkflowStatus.FAILED
    assert [run.attempt for run in r.runs.values()] == [1, 2, 3]
    assert len(r.dead) == 1 and r.dead[0].attempts == 3
    assert r.workflow.error is not None and r.workflow.error["reason"] == "attempts exhausted"


def test_non_retryable_errors_fail_at_once() -> None:
    definition = WorkflowDefinition.build(
        "w", ["a"], retry=RetryPolicy(non_retryable=[KeyError])
    ).with_version(1)
    r = Run(definition)
    r.outcome("failed", error={"type": "KeyError", "types": ["builtins.KeyError"], "message": "k"})
    assert r.workflow.status == WorkflowStatus.FAILED
    r2 = Run(definition)
    r2.outcome("failed", error={"type": "X", "message": "no", "retryable": False})
    assert r2.workflow.status == WorkflowStatus.FAILED
    assert r2.workflow.error is not None and r2.workflow.error["reason"] == "not retryable"


def test_the_error_path_runs_with_the_failure_and_the_workflow_ends_failed() -> None:
    definition = WorkflowDefinition.build(
        "w", ["a", "b"], retry=RetryPolicy(max_attempts=1), on_error="notify"
    ).with_version(1)
    r = Run(definition)
    r.outcome("failed")
    assert r.current.step == "notify"
    assert r.sent[-1].context == {"error": r.workflow.error}
    assert not r.dead
    r.outcome(result={"data": None})
    assert r.workflow.status == WorkflowStatus.FAILED
    assert r.workflow.error is not None and r.workflow.error["step"] == "a"
    # ... unless the error step returns a next_step
    r2 = Run(definition)
    r2.outcome("failed")
    r2.outcome(result={"next_step": "b", "data": 1})
    r2.outcome()
    assert r2.workflow.status == WorkflowStatus.SUCCEEDED


def test_step_timeout_fails_the_attempt_and_late_outcomes_are_ignored() -> None:
    definition = WorkflowDefinition.build(
        "w", [Step("a", timeout=10, retry=RetryPolicy(max_attempts=2, jitter=False))]
    ).with_version(1)
    r = Run(definition)
    r.outcome("started", started_at=r.now)
    assert r.workflow.timer_kind == machine.TIMER_DEADLINE
    r.outcome("heartbeat")
    deadline = r.workflow.timer_at
    assert deadline == pytest.approx(r.now + 10)
    r.timer(machine.TIMER_DEADLINE)
    assert r.runs[1].status == StepStatus.TIMED_OUT
    assert r.current.attempt == 2
    late = r.outcome(seq=1)
    assert not late.changed
    assert r.history[-1] == "outcome_ignored"


def test_cancel_is_final_and_later_outcomes_are_ignored() -> None:
    r = Run()
    t = machine.cancel(r.workflow, r.current, "applicant withdrew", r.now)
    r._fold(t)
    assert r.workflow.status == WorkflowStatus.CANCELLED
    assert r.current.status == StepStatus.CANCELLED
    assert not r.outcome(seq=1).changed
    with pytest.raises(InvalidStateError, match="already cancelled"):
        machine.cancel(r.workflow, r.current, None, r.now)


def test_retry_resumes_a_failed_workflow_with_fresh_attempts() -> None:
    definition = WorkflowDefinition.build(
        "w", ["a", "b"], retry=RetryPolicy(max_attempts=1)
    ).with_version(1)
    r = Run(definition)
    r.outcome()
    r.outcome("failed")
    assert r.workflow.status == WorkflowStatus.FAILED and r.workflow.retries == 0
    with pytest.raises(InvalidStateError):
        machine.retry(Run(definition).workflow, r.current, definition, r.now)
    r._fold(machine.retry(r.workflow, r.current, definition, r.now))
    assert r.workflow.status == WorkflowStatus.RUNNING and r.workflow.retries == 1
    assert (r.current.step, r.current.attempt, r.current.visit) == ("b", 1, 1)
    r.outcome()
    assert r.workflow.status == WorkflowStatus.SUCCEEDED


def test_delayed_start_and_delayed_steps_are_scheduled() -> None:
    r = Run(run_at=2000.0)
    assert r.workflow.status == WorkflowStatus.SCHEDULED
    assert not r.sent
    r.timer(machine.TIMER_RUN)
    assert len(r.sent) == 1 and r.workflow.status == WorkflowStatus.PENDING
    r.outcome(result={"data": 1, "delay": 60})
    assert r.current.status == StepStatus.SCHEDULED
    assert r.current.due_at == pytest.approx(r.now + 60)


def test_wait_for_a_signal_and_a_signal_that_comes_first() -> None:
    r = Run()
    r.outcome(
        result={"wait_for": "report", "next_step": "finalize", "data": {"x": 1}, "timeout": 100}
    )
    assert r.workflow.status == WorkflowStatus.WAITING
    r._fold(machine.signal(r.workflow, r.current, GRANT, "report", {"ok": True}, r.now))
    assert r.current.step == "finalize"
    assert r.sent[-1].context == {"signal": {"ok": True}}
    early = Run()
    early._fold(machine.signal(early.workflow, early.current, GRANT, "report", 7, early.now))
    early.outcome(result={"wait_for": "report", "data": 1})
    assert early.current.step == "creditCheck"  # resumed at once
    assert early.workflow.status != WorkflowStatus.WAITING


def test_idempotency_key_of_a_run() -> None:
    r = Run()
    assert r.current.idempotency_key == "wf1:validateApp:1"


def test_a_signal_too_large_to_carry_with_the_wait_data_fails_the_workflow() -> None:
    r = Run()
    big = "x" * 600_000
    r.outcome(result={"wait_for": "report", "next_step": "finalize", "data": big})
    r._fold(machine.signal(r.workflow, r.current, GRANT, "report", big, r.now))
    assert r.workflow.status == WorkflowStatus.FAILED
    assert r.workflow.error is not None and r.workflow.error["type"] == "PayloadError"
