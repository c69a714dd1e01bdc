"""Compensation (sagas) on the pure state machine: the chain's order, exactly once, its
failure and retry, cancel with compensate, pause, and crash-and-reload between any two
transitions."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hms_mgmt import machine
from hms_mgmt.definitions import RetryPolicy, Step, WorkflowDefinition
from hms_mgmt.errors import DefinitionError, InvalidStateError
from hms_mgmt.records import StepRun, StepStatus, Workflow, WorkflowStatus
from hms_mgmt.wire.outcomes import Outcome

NO_RETRY = RetryPolicy(max_attempts=1)
SAGA = WorkflowDefinition.build(
    "grantPayout",
    [
        Step("creditHold", compensate="releaseHold"),
        Step("reserveFunds", compensate="releaseFunds"),
        "notify",  # nothing to undo
        Step("bookInspection", compensate="cancelInspection"),
        "payout",
    ],
    retry=RetryPolicy(max_attempts=2, initial_delay=1, jitter=False),
).with_version(1)
COMPENSATIONS = {"releaseHold", "releaseFunds", "cancelInspection"}


class Saga:
    """Drives one workflow as the engine would: the state is the workflow and its runs
    (what the store keeps), so :meth:`reload` is a crash and a restart."""

    def __init__(self, definition: WorkflowDefinition = SAGA) -> None:
        self.definition = definition
        self.now = 1000.0
        self.runs: dict[int, StepRun] = {}
        self.history: list[str] = []
        self.dead: list[machine.DeadLetter] = []
        self.published: list[tuple[str, int]] = []
        t = machine.start(definition, "wf1", {"app": 1}, self.now)
        assert t.workflow is not None
        self.workflow: Workflow = t.workflow
        self._fold(t)

    def _fold(self, t: machine.Transition) -> machine.Transition:
        self.history += [kind for kind, _ in t.history]
        if t.workflow is not None:
            self.workflow = t.workflow
        for run in t.runs:
            self.runs[run.seq] = run
        self.published += [(m.step, m.seq) for m in t.steps]
        self.dead += t.dead_letters
        return t

    @property
    def current(self) -> StepRun:
        return self.runs[self.workflow.seq]

    def outcome(self, kind: str = "succeeded", seq: int | None = None, **values: Any) -> None:
        self.now += 1
        seq = self.workflow.seq if seq is None else seq
        if kind == "succeeded":
            values.setdefault("result", {"data": {"done": self.runs[seq].step, "seq": seq}})
        if kind == "failed":
            values.setdefault("error", {"type": "RuntimeError", "message": "boom"})
        event = Outcome("wf1", seq, kind, step=self.runs[seq].step, **values)
        self._fold(
            machine.apply_outcome(self.workflow, self.current, self.definition, event, self.now)
        )

    def timer(self) -> None:
        """Fire whatever timer the workflow has, as the engine's timer queue would."""
        kind, at = self.workflow.timer_kind, self.workflow.timer_at
        if kind is None or at is None:
            return
        self.now = max(self.now, at)
        if kind == machine.TIMER_COMPENSATE:
            t = machine.compensate(
                self.workflow, self.current, self.definition, self.runs.values(), self.now
            )
        else:
            t = machine.fire_timer(self.workflow, self.current, self.definition, kind, self.now)
        self._fold(t)

    def reload(self) -> None:
        """A crash and a restart: the workflow and its runs read back as stored (JSON)."""
        self.workflow = Workflow(
            **{**json.loads(json.dumps(self.workflow.__dict__)), "status": self.workflow.status}
        )
        self.runs = {
            seq: StepRun.from_json(json.loads(json.dumps(run.to_json())))
            for seq, run in self.runs.items()
        }

    def compensations(self, status: StepStatus = StepStatus.SUCCEEDED) -> list[tuple[str, str]]:
        """(compensation step, the step it compensated) of the runs with ``status``, in order."""
        return [
            (run.step, (run.context or {})["compensating"]["step"])
            for run in sorted(self.runs.values(), key=lambda r: r.seq)
            if machine.compensation.compensated_seq(run) is not None and run.status == status
        ]

    def through(self, steps: int) -> None:
        for _ in range(steps):
            self.outcome()


def give_up_current(s: Saga) -> None:
    """Fail the current run until its retries are exhausted."""
    step = s.current.step
    while (
        not s.workflow.terminal
        and s.current.step == step
        and s.workflow.timer_kind != machine.TIMER_COMPENSATE
    ):
        if s.current.status == StepStatus.SCHEDULED:
            s.timer()
        s.outcome("failed")


def run_chain(s: Saga) -> None:
    """Fire compensate timers and succeed compensations until the chain ends."""
    for _ in range(50):
        if s.workflow.terminal:
            return
        if s.workflow.timer_kind == machine.TIMER_COMPENSATE:
            s.timer()
        elif s.current.status in (StepStatus.PENDING, StepStatus.RUNNING):
            s.outcome()
        else:
            s.timer()
    raise AssertionError("the chain did not end")


# -- definitions ------------------------------------------------------------------------------


def test_a_compensation_is_a_step_with_a_queue_outside_the_ordered_list() -> None:
    assert [s.name for s in SAGA.steps] == [
        "creditHold",
        "reserveFunds",
        "notify",
        "bookInspection",
        "payout",
    ]
    assert {s.name for s in SAGA.compensations} == COMPENSATIONS
    assert set(SAGA.step_names) >= COMPENSATIONS  # each has its queue <workflow>.<step>
    assert SAGA.compensation_of("creditHold") == "releaseHold"
    assert SAGA.compensation_of("notify") is None
    assert SAGA.next_after("bookInspection") == "payout"


def test_a_compensation_keeps_its_own_retry_policy_and_round_trips() -> None:
    own = RetryPolicy(max_attempts=7, jitter=False)
    d = WorkflowDefinition.build(
        "w", [Step("a", compensate=Step("undoA", retry=own, timeout=5)), "b"]
    )
    assert d.policy_for("undoA").max_attempts == 7
    assert d.timeout_for("undoA") == 5
    again = WorkflowDefinition.from_json(json.loads(json.dumps(d.to_json())))
    assert again == d
    assert WorkflowDefinition.from_json(SAGA.to_json(), 1) == SAGA


@pytest.mark.parametrize(
    ("steps", "on_error", "words"),
    [
        (lambda: [Step("a", compensate="b"), "b"], None, ["'b'", "'a'", "'w'", "ordinary step"]),
        (lambda: [Step("a", compensate="oops"), "b"], "oops", ["'oops'", "'w'", "on_error"]),
        (lambda: [Step("a", compensate="a")], None, ["'a'", "ordinary step"]),
        (lambda: [Step("a", compensate="x.y")], None, ["'x.y'", "'a'"]),
        (
            lambda: [Step("a", compensate=Step("u", compensate="v"))],
            None,
            ["'u'", "'a'", "compensation of its own"],
        ),
        (
            lambda: [Step("a", compensate=Step("u", timeout=1)), Step("b", compensate=Step("u"))],
            None,
            ["'u'", "'b'", "'w'", "different settings"],
        ),
    ],
)
def test_bad_compensations_are_refused_naming_the_step_and_workflow(
    steps: Any, on_error: str | None, words: list[str]
) -> None:
    with pytest.raises(DefinitionError) as refused:
        WorkflowDefinition.build("w", steps(), on_error=on_error)
    for word in words:
        assert word in str(refused.value)


def test_the_on_error_step_cannot_have_a_compensation() -> None:
    with pytest.raises(DefinitionError, match="on_error step 'oops' of workflow 'w'"):
        WorkflowDefinition.build("w", ["a"], on_error=Step("oops", compensate="undo"))


def test_a_handler_cannot_jump_into_a_compensation() -> None:
    assert SAGA.bad_next_step("creditHold", "h") is None
    problem = SAGA.bad_next_step("releaseHold", "h")
    assert problem is not None and "compensation step" in problem


# -- the chain --------------------------------------------------------------------------------


def test_the_fourth_step_fails_and_three_compensations_run_newest_first_once_each() -> None:
    s = Saga()
    s.through(4)  # creditHold, reserveFunds, notify, bookInspection
    assert s.current.step == "payout"
    give_up_current(s)
    assert s.workflow.status == WorkflowStatus.COMPENSATING
    assert s.workflow.error is not None and s.workflow.error["step"] == "payout"
    assert [d.run.step for d in s.dead] == ["payout"]  # given up: in its .dlq as ever
    run_chain(s)
    assert s.workflow.status == WorkflowStatus.COMPENSATED
    assert s.workflow.error is not None and s.workflow.error["step"] == "payout"  # why
    assert s.compensations() == [
        ("cancelInspection", "bookInspection"),
        ("releaseFunds", "reserveFunds"),
        ("releaseHold", "creditHold"),
    ]
    published = [step for step, _ in s.published if step in COMPENSATIONS]
    assert published == ["cancelInspection", "releaseFunds", "releaseHold"]


def test_each_compensation_gets_the_input_and_output_of_the_run_it_undoes() -> None:
    s = Saga()
    s.through(4)
    give_up_current(s)
    s.timer()
    run = s.current
    inspection = next(r for r in s.runs.values() if r.step == "bookInspection")
    assert run.step == "cancelInspection"
    assert run.input == inspection.input
    assert run.context == {
        "compensating": {
            "step": "bookInspection",
            "seq": inspection.seq,
            "output": inspection.output,
        }
    }
    assert run.idempotency_key == "wf1:cancelInspection:1"


def test_only_succeeded_steps_with_a_compensation_are_compensated() -> None:
    s = Saga()
    s.through(1)  # creditHold succeeded
    give_up_current(s)  # reserveFunds gives up: never succeeded, nothing to undo for it
    run_chain(s)
    assert s.workflow.status == WorkflowStatus.COMPENSATED
    assert s.compensations() == [("releaseHold", "creditHold")]


def test_a_failure_before_any_step_with_a_compensation_ends_failed_as_before() -> None:
    d = WorkflowDefinition.build("w", ["first", Step("hold", compensate="release")], retry=NO_RETRY)
    s = Saga(d)
    s.outcome("failed")
    assert s.workflow.status == WorkflowStatus.FAILED
    assert "compensation_started" not in s.history


def test_a_step_with_a_compensation_that_itself_fails_ends_failed_after_nothing_to_do() -> None:
    d = WorkflowDefinition.build("w", [Step("hold", compensate="release")], retry=NO_RETRY)
    s = Saga(d)
    s.outcome("failed")
    assert s.workflow.status == WorkflowStatus.COMPENSATING
    s.timer()
    assert s.workflow.status == WorkflowStatus.FAILED
    assert s.workflow.error is not None and s.workflow.error["step"] == "hold"
    assert s.compensations(StepStatus.PENDING) == []


def test_a_step_visited_twice_is_compensated_twice_newest_first() -> None:
    d = WorkflowDefinition.build(
        "w", [Step("hold", compensate="release"), "check", "pay"], retry=NO_RETRY
    )
    s = Saga(d)
    s.outcome()  # hold (visit 1)
    s.outcome(result={"next_step": "hold", "data": {"again": True}})  # check goes back
    s.outcome()  # hold (visit 2)
    s.outcome()  # check
    s.outcome("failed")  # pay
    run_chain(s)
    assert s.workflow.status == WorkflowStatus.COMPENSATED
    releases = [r for r in s.runs.values() if r.step == "release"]
    assert [r.context["compensating"]["seq"] for r in releases if r.context] == [3, 1]
    assert [r.idempotency_key for r in releases] == ["wf1:release:1", "wf1:release:2"]
    assert releases[0].input == {"again": True}


def test_duplicate_and_stale_outcomes_and_timers_change_nothing() -> None:
    s = Saga()
    s.through(4)
    give_up_current(s)
    s.timer()
    first = s.workflow.seq
    s.outcome()  # cancelInspection succeeded
    before = (s.workflow, dict(s.runs))
    s.outcome(seq=first)  # the same outcome again
    s.outcome("failed", seq=first)  # a late failure of it
    s.outcome(seq=first - 1)  # an old forward run's outcome
    assert (s.workflow, dict(s.runs)) == before
    s.timer()  # releaseFunds
    assert s.current.step == "releaseFunds"
    again = machine.compensate(s.workflow, s.current, s.definition, s.runs.values(), s.now + 5)
    assert not again.changed  # a timer fired twice starts nothing twice
    run_chain(s)
    assert len(s.compensations()) == 3


def test_a_compensation_is_retried_by_its_own_policy() -> None:
    d = WorkflowDefinition.build(
        "w",
        [Step("hold", compensate=Step("release", retry=RetryPolicy(3, 1, jitter=False))), "pay"],
        retry=NO_RETRY,
    )
    s = Saga(d)
    s.outcome()
    s.outcome("failed")
    s.timer()
    s.outcome("failed")
    assert s.current.step == "release" and s.current.status == StepStatus.SCHEDULED
    assert s.current.attempt == 2
    s.timer()
    s.outcome()
    s.timer()
    assert s.workflow.status == WorkflowStatus.COMPENSATED
    assert {r.idempotency_key for r in s.runs.values() if r.step == "release"} == {"wf1:release:1"}


def test_a_compensation_that_gives_up_fails_the_workflow_and_retry_resumes_there() -> None:
    s = Saga()
    s.through(4)
    give_up_current(s)
    s.timer()
    s.outcome()  # cancelInspection
    s.timer()
    assert s.current.step == "releaseFunds"
    give_up_current(s)
    assert s.workflow.status == WorkflowStatus.FAILED
    error = s.workflow.error or {}
    assert error["reason"] == "compensation_failed"
    assert error["type"] == "CompensationFailed"
    assert error["step"] == "releaseFunds"
    assert error["compensation"]["compensated_step"] == "reserveFunds"
    assert "releaseFunds" in error["message"] and "reserveFunds" in error["message"]
    assert error["original"]["step"] == "payout"  # why it was compensating
    assert [d.run.step for d in s.dead] == ["payout", "releaseFunds"]
    assert s.dead[-1].reason == "compensation_failed: attempts exhausted"  # x-hms-reason
    failed_seq = error["seq"]
    assert s.runs[failed_seq].step == "releaseFunds"

    t = machine.retry(s.workflow, s.runs[failed_seq], s.definition, s.now)
    s._fold(t)
    assert s.workflow.status == WorkflowStatus.COMPENSATING
    assert s.workflow.error is not None and s.workflow.error["step"] == "payout"
    run_chain(s)
    assert s.workflow.status == WorkflowStatus.COMPENSATED
    assert s.compensations() == [
        ("cancelInspection", "bookInspection"),
        ("releaseFunds", "reserveFunds"),
        ("releaseHold", "creditHold"),
    ]
    funds = [r for r in s.runs.values() if r.step == "releaseFunds"]
    assert {r.idempotency_key for r in funds} == {"wf1:releaseFunds:1"}  # same key throughout
    assert [step for step, _ in s.published].count("cancelInspection") == 1  # not again


def test_a_compensations_next_step_is_ignored() -> None:
    s = Saga()
    s.through(4)
    give_up_current(s)
    s.timer()
    s.outcome(result={"next_step": "payout", "complete": True, "data": {"undone": 1}})
    assert s.current.status == StepStatus.SUCCEEDED
    assert s.current.output == {"undone": 1}
    assert "compensation_result_ignored" in s.history
    assert s.workflow.status == WorkflowStatus.COMPENSATING
    run_chain(s)
    assert s.workflow.status == WorkflowStatus.COMPENSATED


def test_on_error_runs_first_then_the_compensations() -> None:
    d = WorkflowDefinition.build(
        "w", [Step("hold", compensate="release"), "pay"], retry=NO_RETRY, on_error="notifyOps"
    )
    s = Saga(d)
    s.outcome()
    s.outcome("failed")
    assert s.current.step == "notifyOps"
    s.outcome()  # the error path finished: the workflow gives up, so it compensates
    assert s.workflow.status == WorkflowStatus.COMPENSATING
    run_chain(s)
    assert s.workflow.status == WorkflowStatus.COMPENSATED
    assert s.compensations() == [("release", "hold")]
    assert s.dead == []  # the error step handled the failure, as before


def test_an_error_step_that_carries_on_does_not_compensate() -> None:
    d = WorkflowDefinition.build(
        "w", [Step("hold", compensate="release"), "pay", "done"], retry=NO_RETRY, on_error="fix"
    )
    s = Saga(d)
    s.outcome()
    s.outcome("failed")
    s.outcome(result={"next_step": "done", "data": {}})
    s.outcome()
    assert s.workflow.status == WorkflowStatus.SUCCEEDED


# -- cancel, pause, reset -----------------------------------------------------------------------


def test_cancel_with_compensate_compensates_then_ends_compensated() -> None:
    s = Saga()
    s.through(2)
    notify = s.current
    s._fold(machine.cancel(s.workflow, notify, "no", s.now, compensate=True, definition=SAGA))
    assert s.runs[notify.seq].status == StepStatus.CANCELLED
    assert s.workflow.status == WorkflowStatus.COMPENSATING
    run_chain(s)
    assert s.workflow.status == WorkflowStatus.COMPENSATED
    assert s.workflow.error == {"type": "Cancelled", "message": "no"}
    assert s.compensations() == [("releaseFunds", "reserveFunds"), ("releaseHold", "creditHold")]


def test_cancel_with_compensate_and_nothing_to_undo_is_a_plain_cancel() -> None:
    s = Saga()
    s._fold(machine.cancel(s.workflow, s.current, None, s.now, compensate=True, definition=SAGA))
    assert s.workflow.status == WorkflowStatus.COMPENSATING  # creditHold is out: its outcome
    assert s.current.status == StepStatus.PENDING  # decides
    s.outcome("failed")  # not retried: nothing to undo
    assert s.current.attempt == 1 and s.current.status == StepStatus.FAILED
    s.timer()
    assert s.workflow.status == WorkflowStatus.CANCELLED
    d = WorkflowDefinition.build("w", ["a", Step("b", compensate="c")])
    plain = Saga(d)
    plain._fold(
        machine.cancel(plain.workflow, plain.current, None, 1, compensate=True, definition=d)
    )
    assert plain.workflow.status == WorkflowStatus.CANCELLED


def test_a_step_out_at_a_cancel_with_compensate_is_let_finish_and_undone_too() -> None:
    s = Saga()
    s.through(1)
    s.outcome("started")  # reserveFunds runs in a step service
    out = s.current
    s._fold(machine.cancel(s.workflow, out, "stop", s.now, compensate=True, definition=SAGA))
    assert s.runs[out.seq].status == StepStatus.RUNNING  # not cancelled: it may take effect
    assert s.workflow.status == WorkflowStatus.COMPENSATING
    s.timer()  # no compensate timer yet: nothing happens
    assert s.current.seq == out.seq
    s.outcome()  # it succeeded: its effect is undone with the rest, and nothing goes on
    run_chain(s)
    assert s.workflow.status == WorkflowStatus.COMPENSATED
    assert s.compensations() == [("releaseFunds", "reserveFunds"), ("releaseHold", "creditHold")]
    assert "notify" not in [step for step, _ in s.published]


def test_a_step_out_at_a_cancel_with_compensate_that_times_out_is_not_undone() -> None:
    d = WorkflowDefinition.build(
        "w", [Step("hold", compensate="release"), Step("charge", compensate="refund", timeout=5)]
    )
    s = Saga(d)
    s.outcome()
    s.outcome("started")
    s._fold(machine.cancel(s.workflow, s.current, None, s.now, compensate=True, definition=d))
    assert s.workflow.timer_kind == machine.TIMER_DEADLINE  # its deadline still runs
    s.timer()
    assert s.runs[2].status == StepStatus.TIMED_OUT and s.runs[2].attempt == 1
    run_chain(s)
    assert s.workflow.status == WorkflowStatus.COMPENSATED
    assert s.compensations() == [("release", "hold")]


def test_a_plain_cancel_while_compensating_stops_the_chain() -> None:
    s = Saga()
    s.through(4)
    give_up_current(s)
    s.timer()
    out = s.current
    s._fold(machine.cancel(s.workflow, out, "stop", s.now))
    assert s.workflow.status == WorkflowStatus.CANCELLED
    assert s.runs[out.seq].status == StepStatus.CANCELLED
    s.outcome(seq=out.seq)  # its late outcome is ignored
    assert s.workflow.status == WorkflowStatus.CANCELLED
    with pytest.raises(InvalidStateError):
        machine.cancel(s.workflow, out, None, s.now)


def test_cancel_with_compensate_of_a_compensating_workflow_is_refused() -> None:
    s = Saga()
    s.through(2)
    s._fold(machine.cancel(s.workflow, s.current, None, s.now, compensate=True, definition=SAGA))
    with pytest.raises(InvalidStateError, match="already compensating"):
        machine.cancel(s.workflow, s.current, None, s.now, compensate=True, definition=SAGA)


def test_pause_holds_the_chain_and_resume_carries_on() -> None:
    s = Saga()
    s.through(4)
    give_up_current(s)
    s.timer()
    s._fold(machine.pause(s.workflow, s.current, "look", s.now))
    assert s.workflow.status == WorkflowStatus.PAUSED
    s.outcome()  # the compensation out finishes while paused: the next one is held
    assert s.workflow.status == WorkflowStatus.PAUSED and s.workflow.timer_kind is None
    published = len(s.published)
    s._fold(machine.resume(s.workflow, s.current, s.definition, s.now))
    assert s.workflow.status == WorkflowStatus.COMPENSATING
    assert s.workflow.timer_kind == machine.TIMER_COMPENSATE
    run_chain(s)
    assert s.workflow.status == WorkflowStatus.COMPENSATED
    assert len(s.published) == published + 2


def test_a_paused_workflow_cancelled_with_compensate_stays_paused_until_resume() -> None:
    s = Saga()
    s.through(2)
    s._fold(machine.pause(s.workflow, s.current, None, s.now))
    s._fold(machine.cancel(s.workflow, s.current, None, s.now, compensate=True, definition=SAGA))
    assert s.workflow.status == WorkflowStatus.PAUSED
    assert (s.workflow.pause or {})["status"] == "compensating"
    s.timer()  # nothing: frozen
    assert s.workflow.status == WorkflowStatus.PAUSED
    s._fold(machine.resume(s.workflow, s.current, s.definition, s.now))
    run_chain(s)
    assert s.workflow.status == WorkflowStatus.COMPENSATED


def test_reset_while_compensating_goes_forward_and_keeps_what_was_compensated() -> None:
    s = Saga()
    s.through(4)
    give_up_current(s)
    s.timer()
    s.outcome()  # cancelInspection undid bookInspection
    s.timer()  # releaseFunds out
    out = s.current
    t = machine.reset(s.workflow, out, SAGA, "bookInspection", None, s.now, data={}, has_data=True)
    s._fold(t)
    assert s.workflow.status == WorkflowStatus.RUNNING and s.workflow.timer_kind is None
    assert s.runs[out.seq].status == StepStatus.CANCELLED
    s.through(1)  # bookInspection again
    give_up_current(s)  # payout fails again
    run_chain(s)
    assert s.workflow.status == WorkflowStatus.COMPENSATED
    assert s.compensations() == [
        ("cancelInspection", "bookInspection"),
        ("cancelInspection", "bookInspection"),  # the new visit
        ("releaseFunds", "reserveFunds"),
        ("releaseHold", "creditHold"),
    ]
    with pytest.raises(Exception, match="compensation step"):
        machine.reset(s.workflow, None, SAGA, "releaseHold", None, s.now)


# -- crash and reload ---------------------------------------------------------------------------

EVENTS = st.lists(
    st.sampled_from(["ok", "fail", "dup", "stale", "timer", "reload", "again"]),
    min_size=0,
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(events=EVENTS, fail_at=st.integers(min_value=0, max_value=4))
def test_any_interleaving_with_crashes_compensates_each_success_once_newest_first(
    events: list[str], fail_at: int
) -> None:
    """Outcomes (some duplicated or stale), timers fired twice and crashes anywhere: every
    succeeded step with a compensation is compensated exactly once, newest first."""
    s = Saga()
    s.through(fail_at)
    give_up_current(s)
    last_seq = s.workflow.seq
    for event in events:
        if s.workflow.terminal:
            break
        if event == "reload":
            s.reload()
        elif event == "timer" or s.workflow.timer_kind is not None:
            s.timer()
        elif event in ("ok", "fail") and s.current.status in (
            StepStatus.PENDING,
            StepStatus.RUNNING,
        ):
            last_seq = s.workflow.seq
            s.outcome("succeeded" if event == "ok" else "failed")
        elif event == "dup" and s.runs[last_seq].status != StepStatus.PENDING:
            s.outcome(seq=last_seq)
        elif event == "stale":
            s.outcome("failed", seq=1)
        elif event == "again":
            s._fold(machine.compensate(s.workflow, s.current, s.definition, s.runs.values(), s.now))
    if (s.workflow.error or {}).get("reason") == "compensation_failed":  # retry it
        s._fold(machine.retry(s.workflow, s.current, s.definition, s.now))
    s.reload()
    run_chain(s)
    succeeded = [
        r.step
        for r in sorted(s.runs.values(), key=lambda r: r.seq)
        if r.status == StepStatus.SUCCEEDED and SAGA.compensation_of(r.step)
    ]
    expected = [(SAGA.compensation_of(step), step) for step in reversed(succeeded)]
    assert s.compensations() == expected
    assert s.workflow.status == (WorkflowStatus.COMPENSATED if expected else WorkflowStatus.FAILED)


@settings(max_examples=300, deadline=None)
@given(
    before=st.lists(st.sampled_from(["ok", "started", "fail"]), max_size=8),
    after=st.lists(st.sampled_from(["ok", "fail", "dup", "timer", "reload"]), max_size=40),
)
def test_a_cancel_with_compensate_anywhere_undoes_exactly_what_succeeded(
    before: list[str], after: list[str]
) -> None:
    """Forward progress, a cancel with compensate at any point (a run out let finish), then
    outcomes, duplicates, timers and crashes: what succeeded is undone once, newest first."""
    s = Saga()
    for event in before:
        if s.workflow.terminal or s.workflow.status == WorkflowStatus.COMPENSATING:
            break
        if s.current.status == StepStatus.SCHEDULED:
            s.timer()
        elif event == "started" and s.current.status == StepStatus.PENDING:
            s.outcome("started")
        elif event in ("ok", "fail"):
            s.outcome("succeeded" if event == "ok" else "failed")
    if s.workflow.status == WorkflowStatus.SUCCEEDED:
        assert s.compensations() == []  # it finished first: nothing to cancel
        return
    if not s.workflow.terminal and s.workflow.status != WorkflowStatus.COMPENSATING:
        s._fold(
            machine.cancel(s.workflow, s.current, None, s.now, compensate=True, definition=SAGA)
        )
    last = s.workflow.seq
    for event in after:
        if s.workflow.terminal:
            break
        if event == "reload":
            s.reload()
        elif event == "timer":
            s.timer()
        elif event == "dup":
            s.outcome(seq=last)
        elif s.current.status in (StepStatus.PENDING, StepStatus.RUNNING):
            last = s.workflow.seq
            s.outcome("succeeded" if event == "ok" else "failed")
    if (s.workflow.error or {}).get("reason") == "compensation_failed":
        s._fold(machine.retry(s.workflow, s.current, s.definition, s.now))
    run_chain(s)
    succeeded = [
        r.step
        for r in sorted(s.runs.values(), key=lambda r: r.seq)
        if r.status == StepStatus.SUCCEEDED and SAGA.compensation_of(r.step)
    ]
    assert s.compensations() == [(SAGA.compensation_of(step), step) for step in reversed(succeeded)]
    assert s.workflow.terminal


def test_a_compensation_too_large_to_send_fails_the_workflow_naming_it() -> None:
    s = Saga()
    s.outcome(result={"data": {"blob": "x" * 600_000}})  # creditHold's output
    s.outcome(result={"data": {"blob": "y" * 600_000}})  # reserveFunds: input + output > 1 MiB
    s.outcome()  # notify
    s.outcome("failed", error={"type": "E", "message": "m", "retryable": False})  # bookInspection
    s.timer()
    assert s.workflow.status == WorkflowStatus.FAILED
    error = s.workflow.error or {}
    assert error["type"] == "PayloadError" and error["reason"] == "compensation_failed"
    assert "releaseFunds" in error["message"] and "reserveFunds" in error["message"]
    assert error["original"]["step"] == "bookInspection"
    assert not [step for step, _ in s.published if step in COMPENSATIONS]
