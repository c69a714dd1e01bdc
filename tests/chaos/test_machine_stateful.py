"""A hypothesis state machine against the pure workflow state machine.

Random starts, outcomes (current, stale, duplicated, reordered), timers, cancels,
retries, signals, pauses, resumes, resets, cancels with compensate, compensate timers, and
crash-and-reload (the state round-tripped through the store's row encoding). Invariants:
terminal states stay terminal (only an operator's retry or reset moves a finished workflow
on), attempts never exceed the policy, a paused workflow has no delay, backoff, wait or
compensate timer armed, a succeeded run is compensated at most once and only if it
succeeded, a compensated workflow has nothing left to compensate, and replaying the events
applied so far from scratch gives the current state.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from hms_mgmt import machine
from hms_mgmt.definitions import RetryPolicy, Step, WorkflowDefinition
from hms_mgmt.errors import InvalidStateError, UnknownStepError
from hms_mgmt.records import StepRun, Workflow
from hms_mgmt.store.rows import run_of as _run
from hms_mgmt.store.rows import run_row as _run_row
from hms_mgmt.store.rows import workflow_of as _workflow
from hms_mgmt.store.rows import workflow_row as _workflow_row
from hms_mgmt.wire.outcomes import Outcome

pytestmark = pytest.mark.chaos

DEFINITIONS = {
    "plain": WorkflowDefinition.build(
        "plain", ["a", "b", "c"], retry=RetryPolicy(max_attempts=3, initial_delay=1.0)
    ).with_version(1),
    "guarded": WorkflowDefinition.build(
        "guarded",
        ["a", Step("b", timeout=5.0, retry=RetryPolicy(max_attempts=2)), "c"],
        retry=RetryPolicy(max_attempts=2, non_retryable=["KeyError"]),
        on_error="recover",
    ).with_version(1),
    "saga": WorkflowDefinition.build(
        "saga",
        [Step("a", compensate="undoA"), Step("b", compensate="undoB", timeout=5.0), "c"],
        retry=RetryPolicy(max_attempts=1),
    ).with_version(1),
}
TERMINAL = {"succeeded", "failed", "cancelled", "compensated"}

results = st.sampled_from(
    [
        {"data": 1},
        {"data": None},
        {"next_step": "a", "data": 2},
        {"next_step": "c", "data": 3},
        {"next_step": "nowhere", "data": 4},
        {"complete": True, "data": 5},
        {"data": 6, "delay": 10},
        {"wait_for": "report", "data": 7, "timeout": 30},
        {"wait_for": "report", "next_step": "c", "data": 8},
    ]
)
errors = st.sampled_from(
    [
        {"type": "RuntimeError", "message": "boom"},
        {"type": "KeyError", "types": ["builtins.KeyError"], "message": "k"},
        {"type": "X", "message": "final", "retryable": False},
        {"type": "Retry", "message": "later", "retry_delay": 3.0},
    ]
)


class WorkflowMachine(RuleBasedStateMachine):
    workflows = Bundle("workflows")

    def __init__(self) -> None:
        super().__init__()
        self.now = 1_000.0
        self.state: dict[str, tuple[Workflow, dict[int, StepRun]]] = {}
        self.log: dict[str, list[tuple[str, Any, float]]] = {}  # events as applied, for replay
        self.outcomes_seen: dict[str, list[Outcome]] = {}
        self.was_terminal: dict[str, str] = {}
        self.count = 0

    # -- applying, as the engine does ------------------------------------------

    def _apply(self, workflow_id: str, kind: str, value: Any) -> None:
        if kind == "reset":  # an operator's reset moves even a finished workflow on
            self.was_terminal.pop(workflow_id, None)
        self.now += 1.0
        self.log[workflow_id].append((kind, value, self.now))
        self.state[workflow_id] = _step(self.state[workflow_id], kind, value, self.now)

    # -- rules ----------------------------------------------------------------

    @rule(target=workflows, name=st.sampled_from(sorted(DEFINITIONS)), delayed=st.booleans())
    def start(self, name: str, delayed: bool) -> str:
        self.count += 1
        workflow_id = f"wf{self.count}"
        run_at = self.now + 20 if delayed else None
        t = machine.start(
            DEFINITIONS[name], workflow_id, {"n": self.count}, self.now, run_at=run_at
        )
        assert t.workflow is not None
        self.state[workflow_id] = (t.workflow, {r.seq: r for r in t.runs})
        self.log[workflow_id] = [("start", (name, run_at), self.now)]
        self.outcomes_seen[workflow_id] = []
        return workflow_id

    @rule(
        workflow_id=workflows,
        kind=st.sampled_from(["started", "heartbeat", "succeeded", "failed"]),
        result=results,
        error=errors,
        back=st.integers(0, 2),
    )
    def outcome(
        self, workflow_id: str, kind: str, result: dict[str, Any], error: dict[str, Any], back: int
    ) -> None:
        workflow, runs = self.state[workflow_id]
        seq = max(1, workflow.seq - back)  # the current run, or a stale one
        run = runs.get(seq)
        event = Outcome(
            workflow_id,
            seq,
            kind,
            step=run.step if run else "",
            attempt=run.attempt if run else 1,
            result=result if kind == "succeeded" else None,
            error=error if kind == "failed" else None,
            started_at=self.now,
            finished_at=self.now,
            handler="h",
        )
        self.outcomes_seen[workflow_id].append(event)
        self._apply(workflow_id, "outcome", event)

    @rule(workflow_id=workflows, data=st.data())
    def duplicate(self, workflow_id: str, data: st.DataObject) -> None:
        seen = self.outcomes_seen[workflow_id]
        if seen:
            self._apply(workflow_id, "outcome", data.draw(st.sampled_from(seen)))

    @rule(
        workflow_id=workflows,
        kind=st.sampled_from(
            [
                machine.TIMER_RUN,
                machine.TIMER_DEADLINE,
                machine.TIMER_WAIT,
                machine.TIMER_COMPENSATE,
            ]
        ),
        late=st.booleans(),
    )
    def timer(self, workflow_id: str, kind: str, late: bool) -> None:
        workflow, _ = self.state[workflow_id]
        if late and workflow.timer_at is not None:
            self.now = max(self.now, workflow.timer_at)
        self._apply(workflow_id, "timer", kind)

    @rule(workflow_id=workflows)
    def cancel(self, workflow_id: str) -> None:
        self._apply(workflow_id, "cancel", "operator")

    @rule(workflow_id=workflows)
    def compensate_due(self, workflow_id: str) -> None:
        """A compensate timer, due at once when armed: a rule of its own, so that chains
        move on often (one kind among the timer rule's four comes too seldom)."""
        self._apply(workflow_id, "timer", machine.TIMER_COMPENSATE)

    @rule(data=st.data(), steps=st.integers(1, 10))
    def a_saga_moves_on(self, data: st.DataObject, steps: int) -> None:
        """Up to ``steps`` ordinary events on one saga that has not finished: its due timer
        fires, or its run out succeeds (three times in four) or fails. Random
        events on random workflows seldom take a saga through a whole chain; this does."""
        sagas = sorted(i for i, (w, _) in self.state.items() if w.name == "saga" and not w.terminal)
        if not sagas:
            return
        workflow_id = data.draw(st.sampled_from(sagas))
        for _ in range(steps):
            workflow, runs = self.state[workflow_id]
            run = runs[workflow.seq]
            if workflow.terminal or workflow.status == "paused":
                return
            if workflow.timer_kind is not None and run.status not in ("pending", "running"):
                if workflow.timer_at is not None:
                    self.now = max(self.now, workflow.timer_at)
                self._apply(workflow_id, "timer", workflow.timer_kind)
                continue
            if run.status not in ("pending", "running"):
                return
            ok = data.draw(st.sampled_from([True, True, True, False]))
            event = Outcome(
                workflow_id,
                run.seq,
                "succeeded" if ok else "failed",
                step=run.step,
                attempt=run.attempt,
                result={"data": run.step} if ok else None,
                error=None if ok else {"type": "RuntimeError", "message": "no"},
                handler="h",
            )
            self.outcomes_seen[workflow_id].append(event)
            self._apply(workflow_id, "outcome", event)

    @rule(workflow_id=workflows)
    def cancel_with_compensate(self, workflow_id: str) -> None:
        self._apply(workflow_id, "cancel_compensate", "operator")

    @rule(workflow_id=workflows)
    def retry(self, workflow_id: str) -> None:
        self._apply(workflow_id, "retry", None)

    @rule(workflow_id=workflows, data=st.integers(-(2**63), 2**63 - 1))  # as clients allow
    def signal(self, workflow_id: str, data: int) -> None:
        self._apply(workflow_id, "signal", data)

    @rule(workflow_id=workflows)
    def pause(self, workflow_id: str) -> None:
        self._apply(workflow_id, "pause", "operator")

    @rule(workflow_id=workflows)
    def resume(self, workflow_id: str) -> None:
        self._apply(workflow_id, "resume", None)

    @rule(workflow_id=workflows, to_step=st.sampled_from(["a", "b", "c", "recover", "nope"]))
    def reset(self, workflow_id: str, to_step: str) -> None:
        self._apply(workflow_id, "reset", to_step)

    @rule(workflow_id=workflows)
    def crash_and_reload(self, workflow_id: str) -> None:
        """The engine restarts: state comes back from the store's rows."""
        workflow, runs = self.state[workflow_id]
        reloaded = _workflow(_workflow_row(workflow))
        self.state[workflow_id] = (reloaded, {seq: _run(_run_row(r)) for seq, r in runs.items()})
        assert self.state[workflow_id][0] == workflow

    # -- invariants -------------------------------------------------------------

    @invariant()
    def terminal_states_stay_terminal(self) -> None:
        for workflow_id, (workflow, _) in self.state.items():
            before = self.was_terminal.get(workflow_id)
            if before in ("succeeded", "cancelled", "compensated"):
                assert workflow.status == before, (workflow_id, before, workflow.status)
            if before == "failed" and workflow.status not in TERMINAL:
                assert self.log[workflow_id][-1][0] in ("retry", "timer", "outcome", "signal")
                assert any(kind == "retry" for kind, _, _ in self.log[workflow_id])
            if workflow.status in TERMINAL:
                self.was_terminal[workflow_id] = str(workflow.status)
            elif before == "failed":
                self.was_terminal.pop(workflow_id)

    @invariant()
    def a_paused_workflow_arms_nothing_that_starts_work(self) -> None:
        for workflow, _ in self.state.values():
            if workflow.status == "paused":
                assert workflow.pause is not None
                assert workflow.timer_kind not in (
                    machine.TIMER_RUN,
                    machine.TIMER_WAIT,
                    machine.TIMER_COMPENSATE,
                )
            else:
                assert workflow.pause is None

    @invariant()
    def each_succeeded_run_is_compensated_at_most_once(self) -> None:
        for workflow, runs in self.state.values():
            definition = DEFINITIONS[workflow.name]
            undone = [
                machine.compensation.compensated_seq(run)
                for run in runs.values()
                if run.status == "succeeded" and machine.compensation.compensated_seq(run)
            ]
            assert len(undone) == len(set(undone)), (workflow.id, undone)
            for seq in undone:
                assert seq is not None and runs[seq].status == "succeeded"
                assert definition.compensation_of(runs[seq].step) is not None
            if workflow.status == "compensated":
                assert machine.compensation.to_compensate(runs.values(), definition) == []

    @invariant()
    def attempts_never_exceed_the_policy(self) -> None:
        for workflow, runs in self.state.values():
            definition = DEFINITIONS[workflow.name]
            for run in runs.values():
                assert 1 <= run.attempt <= definition.policy_for(run.step).max_attempts
            assert sorted(runs) == list(range(1, workflow.seq + 1))

    @invariant()
    def replaying_the_history_gives_the_current_state(self) -> None:
        for workflow_id, events in self.log.items():
            (name, run_at), at = events[0][1], events[0][2]
            t = machine.start(
                DEFINITIONS[name], workflow_id, {"n": int(workflow_id[2:])}, at, run_at=run_at
            )
            assert t.workflow is not None
            replayed = (t.workflow, {r.seq: r for r in t.runs})
            for kind, value, when in events[1:]:
                replayed = _step(replayed, kind, value, when)
            workflow, runs = self.state[workflow_id]
            assert replayed[0] == workflow
            assert replayed[1] == runs


def _step(
    current: tuple[Workflow, dict[int, StepRun]], kind: str, value: Any, now: float
) -> tuple[Workflow, dict[int, StepRun]]:
    """One event through the machine, as the engine folds it (pure; inputs untouched)."""
    workflow, runs = current
    before = copy.deepcopy((workflow, runs))
    definition = DEFINITIONS[workflow.name]
    run = runs[workflow.seq]
    try:
        if kind == "outcome":
            t = machine.apply_outcome(workflow, run, definition, value, now)
        elif kind == "timer" and value == machine.TIMER_COMPENSATE:
            t = machine.compensate(workflow, run, definition, runs.values(), now)
        elif kind == "timer":
            t = machine.fire_timer(workflow, run, definition, value, now)
        elif kind == "cancel":
            t = machine.cancel(workflow, run, value, now)
        elif kind == "cancel_compensate":
            t = machine.cancel(workflow, run, value, now, compensate=True, definition=definition)
        elif kind == "retry":
            seq = (workflow.error or {}).get("seq")
            failed = runs.get(seq, run) if isinstance(seq, int) else run
            t = machine.retry(workflow, failed, definition, now)
        elif kind == "pause":
            t = machine.pause(workflow, run, value, now)
        elif kind == "resume":
            t = machine.resume(workflow, run, definition, now)
        elif kind == "reset":
            last = next((r for r in reversed(runs.values()) if r.step == value), None)
            t = machine.reset(workflow, run, definition, value, last, now, reason="operator")
        else:
            t = machine.signal(workflow, run, definition, "report", value, now)
    except (InvalidStateError, UnknownStepError):
        return current
    assert (workflow, runs) == before, "the machine changed its inputs"
    if t.workflow is None:
        return current
    new_runs = dict(runs)
    for changed in t.runs:
        new_runs[changed.seq] = changed
    return t.workflow, new_runs


WorkflowMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestWorkflowMachine = WorkflowMachine.TestCase
