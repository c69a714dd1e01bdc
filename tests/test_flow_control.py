"""Flow control on the pure state machine: pause, resume and reset of one workflow.

Unit cases first, then hypothesis properties over interleavings of outcomes, timers, pauses,
resumes, cancels, resets and crash-reloads (the state round-tripped through the store's rows).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hms_mgmt import machine
from hms_mgmt.definitions import RetryPolicy, Step, WorkflowDefinition
from hms_mgmt.errors import InvalidStateError, UnknownStepError
from hms_mgmt.records import StepRun, StepStatus, Workflow, WorkflowState, WorkflowStatus
from hms_mgmt.store.rows import run_of, run_row, workflow_of, workflow_row
from hms_mgmt.wire.outcomes import Outcome

GRANT = WorkflowDefinition.build(
    "grantApproval",
    [
        "validateApp",
        Step("creditCheck", timeout=30, retry=RetryPolicy(max_attempts=3, jitter=False)),
        "scheduleInspection",
        "finalize",
    ],
    retry=RetryPolicy(max_attempts=2, initial_delay=5.0, jitter=False),
).with_version(1)


class Flow:
    """One workflow driven through the machine, its state kept as the engine keeps it."""

    def __init__(self, definition: WorkflowDefinition = GRANT, **start: Any) -> None:
        self.definition = definition
        self.now = 1000.0
        self.runs: dict[int, StepRun] = {}
        self.history: list[str] = []
        self.sent: list[Any] = []
        t = machine.start(definition, "wf1", {"app": 1}, self.now, **start)
        assert t.workflow is not None
        self.workflow: Workflow = t.workflow
        self.fold(t)

    def fold(self, t: machine.Transition) -> machine.Transition:
        self.history += [kind for kind, _ in t.history]
        if t.workflow is not None:
            self.workflow = t.workflow
        for run in t.runs:
            self.runs[run.seq] = run
        self.sent += t.steps
        return t

    @property
    def current(self) -> StepRun:
        return self.runs[self.workflow.seq]

    def tick(self, seconds: float = 1.0) -> None:
        self.now += seconds

    def outcome(self, kind: str = "succeeded", seq: int | None = None, **values: Any) -> Any:
        self.tick()
        seq = self.workflow.seq if seq is None else seq
        run = self.runs[seq]
        if kind == "succeeded":
            values.setdefault("result", {"data": {"from": run.step}})
        if kind == "failed":
            values.setdefault("error", {"type": "RuntimeError", "message": "boom"})
        event = Outcome("wf1", seq, kind, step=run.step, attempt=run.attempt, **values)
        return self.fold(
            machine.apply_outcome(self.workflow, self.current, self.definition, event, self.now)
        )

    def timer(self, kind: str, at: float | None = None) -> machine.Transition:
        self.now = at if at is not None else max(self.now, self.workflow.timer_at or self.now)
        return self.fold(
            machine.fire_timer(self.workflow, self.current, self.definition, kind, self.now)
        )

    def pause(self, reason: str | None = "bureau down") -> machine.Transition:
        self.tick()
        return self.fold(machine.pause(self.workflow, self.current, reason, self.now))

    def resume(self) -> machine.Transition:
        self.tick()
        return self.fold(machine.resume(self.workflow, self.current, self.definition, self.now))

    def signal(self, name: str, data: Any = None) -> machine.Transition:
        self.tick()
        return self.fold(
            machine.signal(self.workflow, self.current, self.definition, name, data, self.now)
        )

    def reset(self, to_step: str, **options: Any) -> machine.Transition:
        self.tick()
        last = next((r for r in reversed(self.runs.values()) if r.step == to_step), None)
        options.setdefault("has_data", "data" in options)
        return self.fold(
            machine.reset(
                self.workflow, self.current, self.definition, to_step, last, self.now, **options
            )
        )

    def reload(self) -> None:
        """A crash: the state comes back from the store's rows."""
        self.workflow = workflow_of(workflow_row(self.workflow))
        self.runs = {seq: run_of(run_row(run)) for seq, run in self.runs.items()}


# -- pause and resume ---------------------------------------------------------------------


def test_a_running_step_finishes_while_paused_and_its_next_step_waits_for_resume() -> None:
    f = Flow()
    f.outcome("started")
    f.pause()
    assert f.workflow.status == WorkflowStatus.PAUSED
    assert f.workflow.pause is not None and f.workflow.pause["status"] == "running"
    t = f.outcome()  # the running attempt's outcome is recorded...
    assert f.runs[1].status == StepStatus.SUCCEEDED
    assert t.steps == [] and len(f.sent) == 1  # ...but creditCheck is not published
    assert f.current.step == "creditCheck" and f.current.status == StepStatus.PENDING
    assert f.workflow.status == WorkflowStatus.PAUSED and "step_held" in f.history
    assert f.workflow.pause["held"] == f.current.seq
    f.reload()  # a pause survives a restart
    resumed = f.resume()
    assert [s.step for s in resumed.steps] == ["creditCheck"]
    assert f.workflow.status == WorkflowStatus.RUNNING and f.workflow.pause is None
    assert "workflow_resumed" in f.history


def test_a_pause_freezes_a_backoff_and_resume_rearms_what_was_left() -> None:
    f = Flow()
    f.outcome("failed")  # retry after 5 s
    assert f.workflow.timer_kind == machine.TIMER_RUN
    f.tick(2)
    f.pause()  # 3 s were left (pause takes a second)
    assert f.workflow.timer_at is None and f.workflow.timer_kind is None
    assert f.workflow.pause is not None
    assert f.workflow.pause["timer"] == {"kind": "run", "remaining": pytest.approx(2.0)}
    assert not f.timer(machine.TIMER_RUN, at=f.now + 3600).changed  # frozen, however long
    f.resume()
    assert f.workflow.timer_kind == machine.TIMER_RUN
    assert f.workflow.timer_at == pytest.approx(f.now + 2.0)
    assert f.current.due_at == pytest.approx(f.now + 2.0)
    assert f.workflow.status == WorkflowStatus.RUNNING
    f.timer(machine.TIMER_RUN)
    assert f.sent[-1].attempt == 2


def test_a_pause_freezes_a_wait_keeps_signals_and_holds_the_step_a_signal_leads_to() -> None:
    f = Flow()
    f.outcome(result={"wait_for": "report", "next_step": "finalize", "data": 1, "timeout": 100})
    f.tick(40)
    f.pause()
    assert f.workflow.pause is not None and f.workflow.pause["status"] == "waiting"
    assert f.workflow.pause["timer"]["kind"] == "wait"
    assert f.workflow.pause["timer"]["remaining"] == pytest.approx(59.0)
    f.signal("other", 1)  # kept for a wait to come
    assert f.workflow.signals == {"other": 1}
    t = f.signal("report", {"passed": True})  # ends the wait; finalize is held
    assert t.steps == [] and f.current.step == "finalize"
    assert f.workflow.status == WorkflowStatus.PAUSED and f.workflow.timer_at is None
    assert f.workflow.pause["timer"] is None and f.workflow.pause["status"] == "running"
    t = f.resume()
    assert [s.step for s in t.steps] == ["finalize"]
    assert t.steps[0].context == {"signal": {"passed": True}}


def test_a_wait_resumed_with_time_left_times_out_that_much_later() -> None:
    f = Flow()
    f.outcome(result={"wait_for": "report", "data": 1, "timeout": 100})
    f.pause()
    f.tick(10_000)
    f.resume()
    assert f.workflow.status == WorkflowStatus.WAITING
    assert f.workflow.timer_at == pytest.approx(f.now + 99.0)
    assert f.workflow.wait is not None and f.workflow.wait["until"] == f.workflow.timer_at


def test_a_running_attempt_keeps_its_deadline_while_paused() -> None:
    f = Flow()
    f.outcome()  # creditCheck, timeout 30
    f.outcome("started")
    f.pause()
    assert f.workflow.timer_kind == machine.TIMER_DEADLINE  # not frozen
    t = f.timer(machine.TIMER_DEADLINE)
    assert f.runs[2].status == StepStatus.TIMED_OUT and t.steps == []
    assert f.workflow.status == WorkflowStatus.PAUSED
    assert f.workflow.pause is not None and f.workflow.pause["timer"]["kind"] == "run"
    f.resume()
    f.timer(machine.TIMER_RUN)
    assert (f.sent[-1].step, f.sent[-1].attempt) == ("creditCheck", 2)


def test_cancel_works_on_a_paused_workflow() -> None:
    f = Flow()
    f.pause()
    f.fold(machine.cancel(f.workflow, f.current, "withdrawn", f.now))
    assert f.workflow.status == WorkflowStatus.CANCELLED and f.workflow.pause is None
    assert f.current.status == StepStatus.CANCELLED
    with pytest.raises(InvalidStateError, match="already cancelled; cannot pause"):
        f.pause()


def test_a_paused_workflow_whose_last_step_succeeds_finishes() -> None:
    f = Flow(WorkflowDefinition.build("w", ["a"]).with_version(1))
    f.pause()
    f.outcome()
    assert f.workflow.status == WorkflowStatus.SUCCEEDED and f.workflow.pause is None


def test_pause_and_resume_refuse_the_wrong_state_naming_it() -> None:
    f = Flow()
    with pytest.raises(InvalidStateError, match="is pending, not paused; cannot resume"):
        f.resume()
    f.pause()
    with pytest.raises(InvalidStateError, match="already paused"):
        f.pause()


def test_a_paused_delayed_start_stays_scheduled_on_resume() -> None:
    f = Flow(run_at=1100.0)
    f.pause()
    assert f.workflow.pause is not None and f.workflow.pause["status"] == "scheduled"
    f.tick(500)
    f.resume()
    assert f.workflow.status == WorkflowStatus.SCHEDULED
    assert f.workflow.timer_at == pytest.approx(f.now + 99.0)  # paused at 1001


def test_status_shows_a_pause_and_a_held_step_is_not_stuck() -> None:
    f = Flow()
    f.outcome("started")
    f.pause("audit")
    f.outcome()
    state = WorkflowState.of(f.workflow, list(f.runs.values()), now=f.now + 10_000, stuck_after=1)
    assert state.status == "paused" and state.stuck is None
    assert state.paused is not None and state.paused["reason"] == "audit"
    assert "paused (resumes as running): audit" in state.describe()
    assert WorkflowState.from_json(state.to_json()).paused == state.paused


# -- reset ----------------------------------------------------------------------------------


def test_a_reset_runs_a_step_again_with_its_last_input_as_a_new_visit() -> None:
    f = Flow()
    f.outcome(result={"data": {"score": 1}})
    for _ in range(2):
        f.outcome("failed")
        f.timer(machine.TIMER_RUN)
    f.outcome("failed")  # its third attempt: creditCheck gives up
    assert f.workflow.status == WorkflowStatus.FAILED
    t = f.reset("creditCheck", reason="bureau fixed")
    assert f.workflow.status == WorkflowStatus.RUNNING and f.workflow.error is None
    [step] = t.steps
    assert (step.step, step.visit, step.attempt, step.payload) == (
        "creditCheck",
        2,
        1,
        {"score": 1},
    )
    assert f.current.idempotency_key == "wf1:creditCheck:2"  # a new key
    assert "workflow_reset" in f.history


def test_a_reset_takes_new_data_and_ignores_the_running_steps_late_outcome() -> None:
    f = Flow()
    f.outcome()
    f.outcome("started")
    running = f.current.seq
    t = f.reset("validateApp", data={"fixed": True}, signals="drop")
    assert f.runs[running].status == StepStatus.CANCELLED
    assert f.runs[running].error is not None and f.runs[running].error["type"] == "Reset"
    assert t.steps[0].payload == {"fixed": True}
    late = f.outcome(seq=running)
    assert not late.changed and f.history[-1] == "outcome_ignored"


def test_a_reset_of_a_succeeded_workflow_and_of_a_paused_one() -> None:
    f = Flow(WorkflowDefinition.build("w", ["a", "b"]).with_version(1))
    f.outcome()
    f.outcome()
    assert f.workflow.status == WorkflowStatus.SUCCEEDED
    f.reset("b")
    assert f.workflow.status == WorkflowStatus.RUNNING and f.workflow.output is None
    f.pause()
    t = f.reset("a")  # the new run is held: the workflow stays paused
    assert t.steps == [] and f.workflow.status == WorkflowStatus.PAUSED
    assert [s.step for s in f.resume().steps] == ["a"]


def test_a_reset_to_an_unknown_step_or_one_never_run_is_a_clear_error() -> None:
    f = Flow()
    with pytest.raises(UnknownStepError, match=r"has no step 'nope'; its steps are validateApp"):
        f.reset("nope")
    with pytest.raises(InvalidStateError, match="'finalize' has not run in workflow wf1"):
        f.reset("finalize")
    with pytest.raises(InvalidStateError, match="signals must be 'keep' or 'drop'"):
        f.reset("validateApp", signals="lose")
    f.reset("finalize", data={"x": 1})  # with data it can


# -- properties ---------------------------------------------------------------------------

ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("outcome"), st.sampled_from(["started", "succeeded", "failed"])),
        st.tuples(st.just("stale"), st.integers(1, 3)),
        st.tuples(
            st.just("result"),
            st.sampled_from(
                [
                    {"data": 1, "delay": 20},
                    {"wait_for": "report", "data": 2, "timeout": 50},
                    {"next_step": "validateApp", "data": 3},
                ]
            ),
        ),
        st.tuples(st.just("timer"), st.sampled_from(["run", "deadline", "wait", "start"])),
        st.tuples(st.just("wait"), st.floats(0, 100)),
        st.tuples(st.just("signal"), st.sampled_from(["report", "other"])),
        st.tuples(st.just("pause"), st.none()),
        st.tuples(st.just("resume"), st.none()),
        st.tuples(st.just("cancel"), st.none()),
        st.tuples(st.just("reset"), st.sampled_from(["validateApp", "creditCheck"])),
        st.tuples(st.just("reload"), st.none()),
    ),
    max_size=40,
)


def act(f: Flow, action: str, value: Any) -> machine.Transition | None:
    """One event, as the engine applies it; an event the machine refuses changes nothing."""
    try:
        if action == "outcome":
            return f.outcome(value) if f.current.status != StepStatus.SCHEDULED else None
        if action == "stale":
            return f.outcome("succeeded", seq=max(1, f.workflow.seq - value))
        if action == "result":
            return f.outcome("succeeded", result=value)
        if action == "timer":
            return f.timer(value)
        if action == "wait":
            f.tick(value)
            return None
        if action == "signal":
            return f.signal(value)
        if action == "pause":
            return f.pause()
        if action == "resume":
            return f.resume()
        if action == "cancel":
            return f.fold(machine.cancel(f.workflow, f.current, None, f.now))
        if action == "reset":
            return f.reset(value, data={"again": True})
        f.reload()
    except InvalidStateError:
        pass
    return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=ACTIONS)
def test_a_paused_workflow_publishes_nothing_until_it_is_resumed(
    actions: list[tuple[str, Any]],
) -> None:
    f = Flow()
    for action, value in actions:
        was_paused = f.workflow.status == WorkflowStatus.PAUSED
        held = (f.workflow.pause or {}).get("held")
        t = act(f, action, value)
        if was_paused and action != "resume" and t is not None:
            assert t.steps == [], (action, value)
        paused = f.workflow.status == WorkflowStatus.PAUSED
        if paused:
            assert f.workflow.pause is not None
            # nothing that would start new work is armed: no delay, backoff or wait timer
            assert f.workflow.timer_kind in (None, machine.TIMER_DEADLINE, machine.TIMER_START)
            if f.workflow.pause["held"] is not None:  # a held run is the current, not out
                assert f.workflow.pause["held"] == f.current.seq
        else:
            assert f.workflow.pause is None
        if was_paused and action == "resume" and t is not None:
            # resume publishes the one step it held, and only that
            assert [s.seq for s in t.steps] == ([held] if held == f.current.seq else [])
    if f.workflow.status == WorkflowStatus.PAUSED:
        f.resume()  # resuming then finishing works like any workflow
        assert f.workflow.status != WorkflowStatus.PAUSED


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=ACTIONS, after=ACTIONS, to_step=st.sampled_from(["validateApp", "creditCheck"]))
def test_a_reset_ignores_every_outcome_from_before_it(
    before: list[tuple[str, Any]], after: list[tuple[str, Any]], to_step: str
) -> None:
    f = Flow()
    for action, value in before:
        act(f, action, value)
    last_before = f.workflow.seq
    f.reset(to_step, data={"reset": True})
    assert f.current.step == to_step and f.current.seq == last_before + 1
    for action, value in after:
        if action == "stale":  # an outcome of any run from before the reset
            seq = 1 + value % last_before
            for kind in ("started", "succeeded", "failed"):
                state = (f.workflow, dict(f.runs))
                t = f.outcome(kind, seq=seq)
                assert not t.changed and f.history[-1] == "outcome_ignored"
                assert (f.workflow, f.runs) == state
        else:
            act(f, action, value)


# -- the engine's apply stage -----------------------------------------------------------------


def _applier() -> Any:
    from hms_mgmt.engine.apply import Applier
    from hms_mgmt.engine.registry import Registry
    from hms_mgmt.tokens import Signer

    registry = Registry(bus=None, store=None)  # type: ignore[arg-type]  # apply does no I/O
    registry.remember(GRANT)
    return Applier(registry, {}, Signer(b"s" * 32))


def _request(**fields: Any) -> Any:
    from hms_mgmt.engine.events import RequestEvent
    from hms_mgmt.wire.requests import parse_request

    return RequestEvent(parse_request({"request_id": "r1", **fields}, reply_to="client-1"))


def test_pause_resume_and_reset_requests_are_applied_and_answered_once() -> None:
    from hms_mgmt.engine.events import OutcomeEvent
    from hms_mgmt.engine.work import Work

    f = Flow()
    work = Work(state={"wf1": (f.workflow, f.current)})
    applier = _applier()
    applier.apply(_request(type="pause", workflow_id="wf1", reason="audit"), work, 1001.0)
    assert work.replies[-1] == ("client-1", "r1", True, {"workflow_id": "wf1", "status": "paused"})
    done = Outcome("wf1", 1, "succeeded", step="validateApp", attempt=1, result={"data": 2})
    applier.apply(OutcomeEvent(done), work, 1002.0)
    assert work.batch.outbox == [] and work.timers == []  # creditCheck held, nothing armed
    assert work.batch.workflows["wf1"].status == "paused"
    resume = Work(state=dict(work.state))
    applier.apply(_request(type="resume", workflow_id="wf1", request_id="r2"), resume, 1003.0)
    [row] = resume.batch.outbox
    assert row.routing_key == "grantApproval.creditCheck"
    reset = Work(state=dict(resume.state))
    applier.apply(
        _request(type="reset", workflow_id="wf1", request_id="r3", to_step="validateApp"),
        reset,
        1004.0,
    )
    [row] = reset.batch.outbox  # validateApp again, with its last input: the workflow's
    assert row.routing_key == "grantApproval.validateApp"
    assert reset.replies[-1][2:] == (True, {"workflow_id": "wf1", "status": "running"})
    unknown = Work(state=dict(reset.state))
    applier.apply(
        _request(type="reset", workflow_id="wf1", request_id="r4", to_step="nope"), unknown, 1005.0
    )
    ok, error = unknown.replies[-1][2:]
    assert not ok and error["type"] == "UnknownStepError" and "'nope'" in error["message"]


def test_a_reset_request_with_bad_signals_is_refused_naming_them() -> None:
    from hms_mgmt.errors import InvalidMessageError
    from hms_mgmt.wire.requests import parse_request

    with pytest.raises(InvalidMessageError, match="'signals' must be 'keep' or 'drop', not 'x'"):
        parse_request(
            {"type": "reset", "request_id": "r", "workflow_id": "w", "to_step": "a", "signals": "x"}
        )
    with pytest.raises(InvalidMessageError, match="to_step"):
        parse_request({"type": "reset", "request_id": "r", "workflow_id": "w"})


# -- the hms command ----------------------------------------------------------------------------


async def test_hms_workflow_pause_resume_and_reset_one_or_many(
    memory_url: str, store_url: str
) -> None:
    """The verbs as an operator types them, through the engine's HTTP API."""
    import asyncio

    from aiohttp.test_utils import TestServer

    from bus_adapters import open_bus
    from hms_mgmt.engine.api import EngineApi
    from hms_mgmt.engine.engine import Engine
    from hms_mgmt.metrics import EngineMetrics
    from hms_mgmt.store import open_store
    from tests.conftest import hms

    engine = Engine(open_bus(memory_url), open_store(store_url))
    running = asyncio.ensure_future(engine.run())
    await asyncio.wait_for(engine.ready.wait(), 10)
    api = EngineApi(engine, EngineMetrics())
    server = TestServer(api.app())
    await server.start_server()
    env = {"HMS_ENGINE_URL": str(server.make_url("")).rstrip("/")}
    try:
        await api.client.connect()
        await api.client.define(WorkflowDefinition.build("grant", ["validate", "check"]))
        await api.client.define(WorkflowDefinition.build("other", ["validate"]))
        ids = [(await api.client.start("grant", {"n": n})).workflow_id for n in range(3)]
        other = (await api.client.start("other", {})).workflow_id

        paused = await hms("workflow", "pause", ids[0], "--reason", "audit", env=env)
        assert (paused.returncode, paused.stdout) == (0, f"{ids[0]}: paused\n"), paused.stderr
        shown = await hms("workflow", "show", ids[0], env=env)
        assert "resumes as pending" in shown.stdout and "(audit)" in shown.stdout
        again = await hms("workflow", "pause", ids[0], env=env)
        assert again.returncode == 1 and "already paused" in again.stderr
        resumed = await hms("workflow", "resume", ids[0], env=env)
        assert resumed.stdout == f"{ids[0]}: pending\n"

        one = await hms(
            "workflow", "reset", ids[1], "--to-step", "validate", "--data", '{"n": 9}', env=env
        )
        assert one.stdout == f"{ids[1]}: running at validate\n", one.stderr
        state = await api.client.status(ids[1])
        assert [(s.step, s.status, s.input) for s in state.steps] == [
            ("validate", "cancelled", {"n": 1}),
            ("validate", "pending", {"n": 9}),
        ]
        null = await hms(
            "workflow", "reset", ids[1], "--to-step", "validate", "--data", "null", env=env
        )  # a null input, not "no data"
        assert null.returncode == 0, null.stderr
        assert (await api.client.status(ids[1])).steps[-1].input is None
        unknown = await hms("workflow", "reset", ids[1], "--to-step", "nope", env=env)
        assert unknown.returncode == 1 and "has no step 'nope'" in unknown.stderr

        many = await hms(
            "workflow", "reset", "--status", "pending", "--name", "grant", "--to-step", "validate",
            env=env,
        )  # fmt: skip
        assert many.returncode == 0, many.stderr
        assert sorted(many.stdout.split("\n")[:-1]) == sorted(
            f"{i}: running at validate" for i in (ids[0], ids[2])
        )
        assert "2 of 2 reset to validate" in many.stderr
        assert (await api.client.status(other)).status == "pending"  # another name: untouched
        for workflow_id in (ids[0], ids[2]):  # each with its own last input
            state = await api.client.status(workflow_id)
            assert state.steps[-1].input == state.steps[0].input and state.steps[-1].visit == 2

        neither = await hms("workflow", "reset", "--to-step", "validate", env=env)
        assert neither.returncode == 2 and "--status and/or --name" in neither.stderr
    finally:
        await server.close()
        engine.stop()
        await running


def test_metrics_count_resets_and_a_reset_failure_as_a_refailure() -> None:
    from hms_mgmt.metrics import EngineMetrics
    from hms_mgmt.store.base import Batch
    from tests.test_metrics import count

    metrics = EngineMetrics()
    f = Flow(
        WorkflowDefinition.build("w", ["a"], retry=RetryPolicy(max_attempts=1)).with_version(1)
    )

    def commit(t: machine.Transition) -> None:
        assert t.workflow is not None
        metrics.on_batch(
            Batch(
                workflows={t.workflow.id: t.workflow},
                history=[(t.workflow.id, f.now, kind, detail) for kind, detail in t.history],
            )
        )

    commit(f.outcome("failed"))
    for _ in range(2):  # reset, and it fails again each time
        commit(f.reset("a"))
        commit(f.outcome("failed"))
    commit(f.reset("a"))
    commit(f.outcome())
    finished = "hms_workflows_finished_total"
    assert count(metrics, finished, workflow="w", status="failed") == 1
    assert count(metrics, "hms_workflows_refailed_total", workflow="w") == 2
    assert count(metrics, finished, workflow="w", status="succeeded") == 1
    assert count(metrics, "hms_workflow_resets_total", workflow="w") == 3
    assert f.workflow.retries == 3


# -- paused workflow types ----------------------------------------------------------------------


def test_a_paused_type_holds_new_starts_and_its_running_workflows_next_steps() -> None:
    from hms_mgmt.engine.events import OutcomeEvent
    from hms_mgmt.engine.work import Work

    applier = _applier()
    work = Work()
    applier.apply(_request(type="start", workflow_id="wf-a", workflow="grantApproval"), work, 1.0)
    applier.apply(
        _request(type="pause_type", request_id="p1", workflow="grantApproval", reason="audit"),
        work,
        2.0,
    )
    assert work.replies[-1][2] is True and work.batch.type_pauses
    applier.apply(
        _request(type="start", request_id="r2", workflow_id="wf-b", workflow="grantApproval"),
        work,
        3.0,
    )
    applier.apply(
        _request(type="start", request_id="r3", workflow_id="wf-c", workflow="grantApproval"),
        work,
        3.5,
    )
    # wf-a was published before the pause; wf-b and wf-c are held at their first step
    assert [row.routing_key for row in work.batch.outbox] == ["grantApproval.validateApp"]
    for workflow_id in ("wf-b", "wf-c"):
        held = work.state[workflow_id][0]
        assert held.status == "paused" and held.pause is not None
        assert held.pause["type"] == ["grantApproval", ""] and held.pause["status"] == "pending"
    done = Outcome("wf-a", 1, "succeeded", step="validateApp", attempt=1, result={"data": 1})
    applier.apply(OutcomeEvent(done), work, 4.0)  # a running one's next step is held too
    assert len(work.batch.outbox) == 1 and work.state["wf-a"][0].status == "paused"
    again = Work(state=dict(work.state))
    applier.type_pauses = {k: v for k, v in work.type_pauses.items() if v is not None}
    applier.apply(
        _request(type="pause_type", request_id="p2", workflow="grantApproval"), again, 5.0
    )
    assert again.replies[-1][3]["message"] == "grantApproval is already paused"

    resume = Work(state=dict(work.state))
    resume.type_held[("grantApproval", "")] = ["wf-b", "wf-a"]  # as loaded (order re-checked)
    applier.apply(
        _request(type="resume_type", request_id="p3", workflow="grantApproval"), resume, 6.0
    )
    ok, answer = resume.replies[-1][2:]
    assert ok and answer["released"] == 3
    # released in the order they were created: wf-a's creditCheck, then wf-b's and wf-c's starts
    assert [
        (row.routing_key, json.loads(row.body)["workflow_id"]) for row in resume.batch.outbox
    ] == [
        ("grantApproval.creditCheck", "wf-a"),
        ("grantApproval.validateApp", "wf-b"),
        ("grantApproval.validateApp", "wf-c"),
    ]
    assert resume.batch.type_pauses == {("grantApproval", ""): None}
    assert all(wf.status != "paused" for wf, _ in resume.state.values())


def test_a_paused_step_of_a_type_holds_only_that_step() -> None:
    from hms_mgmt.engine.events import OutcomeEvent
    from hms_mgmt.engine.work import Work

    applier = _applier()
    work = Work()
    applier.apply(
        _request(type="pause_type", request_id="p1", workflow="grantApproval", step="creditCheck"),
        work,
        1.0,
    )
    applier.apply(_request(type="start", workflow_id="wf", workflow="grantApproval"), work, 2.0)
    assert [row.routing_key for row in work.batch.outbox] == ["grantApproval.validateApp"]
    done = Outcome("wf", 1, "succeeded", step="validateApp", attempt=1, result={"data": 1})
    applier.apply(OutcomeEvent(done), work, 3.0)
    assert len(work.batch.outbox) == 1 and work.state["wf"][0].status == "paused"
    for n, (bad, message) in enumerate(
        (
            ({"workflow": "nope"}, "'nope' is not defined"),
            ({"workflow": "grantApproval", "step": "nope"}, "has no step 'nope'"),
        )
    ):
        applier.apply(_request(type="pause_type", request_id=f"x{n}", **bad), work, 4.0)
        assert message in work.replies[-1][3]["message"]
    applier.apply(
        _request(type="resume_type", request_id="r9", workflow="grantApproval"), work, 5.0
    )
    assert work.replies[-1][3]["message"] == "grantApproval is not paused; cannot resume it"


def test_a_cancel_of_a_workflow_held_by_a_type_pause_clears_the_run_it_held() -> None:
    """``hms workflow show`` said "holds run 2 until resumed" after ``cancel --compensate``
    of a workflow a step type pause held, though run 2 was cancelled."""
    from hms_mgmt.cli_format import paused_text
    from hms_mgmt.engine.events import OutcomeEvent
    from hms_mgmt.engine.work import Work

    saga = WorkflowDefinition.build(
        "saga", [Step("reserve", compensate="release"), "charge", "ship"]
    ).with_version(1)
    applier = _applier()
    applier.registry.remember(saga)
    work = Work()
    applier.apply(
        _request(type="pause_type", request_id="p1", workflow="saga", step="charge"), work, 1.0
    )
    applier.apply(_request(type="start", workflow_id="wf", workflow="saga"), work, 2.0)
    done = Outcome("wf", 1, "succeeded", step="reserve", attempt=1, result={"data": 1})
    applier.apply(OutcomeEvent(done), work, 3.0)
    held = work.state["wf"][0]
    assert held.status == "paused" and held.pause is not None and held.pause["held"] == 2
    applier.apply(
        _request(type="cancel", request_id="c1", workflow_id="wf", compensate=True), work, 4.0
    )
    assert work.replies[-1][2] is True
    wf, run = work.state["wf"]
    assert run is not None and run.seq == 2 and run.status == "cancelled"
    assert wf.status == "paused" and wf.pause is not None
    assert wf.pause["status"] == "compensating" and wf.pause["held"] is None
    assert "holds run" not in paused_text(wf.pause)
    # the type's resume releases the compensation, not the cancelled run
    applier.type_pauses = {k: v for k, v in work.type_pauses.items() if v is not None}
    resume = Work(state=dict(work.state))
    applier.apply(
        _request(type="resume_type", request_id="p2", workflow="saga", step="charge"), resume, 5.0
    )
    assert resume.replies[-1][3]["released"] == 1
    resumed = resume.state["wf"][0]
    assert resumed.status == "compensating" and resumed.timer_kind == machine.TIMER_COMPENSATE
    assert resume.batch.outbox == []  # nothing republished for the cancelled run


async def test_hms_workflow_pause_type_and_resume_type(memory_url: str, store_url: str) -> None:
    import asyncio

    from aiohttp.test_utils import TestServer

    from bus_adapters import open_bus
    from hms_mgmt.engine.api import EngineApi
    from hms_mgmt.engine.engine import Engine
    from hms_mgmt.metrics import EngineMetrics
    from hms_mgmt.store import open_store
    from tests.conftest import hms

    engine = Engine(open_bus(memory_url), open_store(store_url))
    running = asyncio.ensure_future(engine.run())
    await asyncio.wait_for(engine.ready.wait(), 10)
    api = EngineApi(engine, EngineMetrics())
    server = TestServer(api.app())
    await server.start_server()
    env = {"HMS_ENGINE_URL": str(server.make_url("")).rstrip("/")}
    try:
        await api.client.connect()
        await api.client.define(WorkflowDefinition.build("grant", ["validate", "check"]))
        paused = await hms("workflow", "pause-type", "grant", "--reason", "bureau down", env=env)
        assert (paused.returncode, paused.stdout) == (0, "grant: paused\n"), paused.stderr
        listed = await hms("definitions", env=env)
        assert "all (bureau down)" in listed.stdout
        ids = [(await api.client.start("grant", {"n": n})).workflow_id for n in range(3)]
        for workflow_id in ids:  # each start is held at its first step
            state = await api.client.status(workflow_id)
            assert state.status == "paused" and state.paused is not None
            assert state.paused["type"] == ["grant", ""] and state.paused["held"] == 1
        shown = await hms("workflow", "show", ids[0], env=env)
        assert "(bureau down) with its type grant (hms workflow resume-type)" in shown.stdout
        again = await hms("workflow", "pause-type", "grant", env=env)
        assert again.returncode == 1 and "grant is already paused" in again.stderr
        unknown = await hms("workflow", "pause-type", "grant", "--step", "nope", env=env)
        assert unknown.returncode == 1 and "has no step 'nope'" in unknown.stderr
        resumed = await hms("workflow", "resume-type", "grant", env=env)
        assert resumed.stdout == "grant: resumed, 3 workflow(s) released\n", resumed.stderr
        for workflow_id in ids:
            assert (await api.client.status(workflow_id)).status == "pending"
        assert "bureau down" not in (await hms("definitions", env=env)).stdout
        not_paused = await hms("workflow", "resume-type", "grant", env=env)
        assert not_paused.returncode == 1 and "is not paused" in not_paused.stderr
    finally:
        await server.close()
        engine.stop()
        await running


TYPE_EVENTS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "start", "succeeded", "failed", "started", "timer", "pause", "resume",
                "pause_type", "pause_step", "resume_type", "resume_step", "reset", "cancel",
                "reload", "wait",
            ]
        ),
        st.integers(0, 2),
    ),
    max_size=50,
)  # fmt: skip


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=TYPE_EVENTS)
def test_workflows_held_by_a_paused_type_publish_nothing_until_it_is_resumed(
    events: list[tuple[str, int]],
) -> None:
    """The engine's apply stage over interleavings of starts, outcomes, timers, pauses of a
    workflow and of its type (or a step of it), resumes, resets, cancels and reloads: a paused
    workflow publishes nothing but through its own resume or its type's."""
    from hms_mgmt.engine.events import OutcomeEvent, TimerEvent
    from hms_mgmt.engine.work import Work

    applier = _applier()
    committed: dict[tuple[str, str], Any] = {}
    applier.type_pauses = committed
    state: dict[str, tuple[Workflow, StepRun | None]] = {}
    now = 1000.0
    for n, (kind, which) in enumerate(events):
        now += 1.0
        workflow_id = f"wf{which}"
        rid = f"r{n}"
        work = Work(state=dict(state))
        found = state.get(workflow_id)
        event: Any
        if kind in ("pause_type", "pause_step", "resume_type", "resume_step"):
            step = "creditCheck" if kind.endswith("_step") else None
            verb = "pause_type" if kind.startswith("pause") else "resume_type"
            event = _request(type=verb, request_id=rid, workflow="grantApproval", step=step)
            key = ("grantApproval", step or "")
            work.type_held[key] = [  # as the loading stage finds them, oldest first
                i
                for _, i in sorted(
                    (wf.created_at, i) for i, (wf, _) in state.items() if machine.paused_by(wf, key)
                )
            ]
        elif kind == "start":
            event = _request(
                type="start", request_id=rid, workflow_id=workflow_id, workflow="grantApproval"
            )
        elif found is None or found[1] is None:
            continue
        elif kind in ("succeeded", "failed", "started"):
            run = found[1]
            event = OutcomeEvent(
                Outcome(
                    workflow_id,
                    run.seq,
                    kind,
                    step=run.step,
                    attempt=run.attempt,
                    result={"data": n} if kind == "succeeded" else None,
                    error={"type": "E", "message": "m"} if kind == "failed" else None,
                )
            )
        elif kind == "timer":
            wf = found[0]
            if wf.timer_at is None or wf.timer_kind is None:
                continue
            now = max(now, wf.timer_at)
            event = TimerEvent(workflow_id, wf.timer_kind)
        elif kind in ("pause", "resume", "cancel"):
            event = _request(type=kind, request_id=rid, workflow_id=workflow_id)
        elif kind == "reset":
            event = _request(
                type="reset", request_id=rid, workflow_id=workflow_id, to_step="validateApp"
            )
        elif kind == "reload":  # a restart: the state comes back from the store's rows
            wf, run = found
            state[workflow_id] = (
                workflow_of(workflow_row(wf)),
                None if run is None else run_of(run_row(run)),
            )
            continue
        else:
            now += 30.0
            continue
        before = {i: wf.status for i, (wf, _) in state.items()}
        applier.apply(event, work, now)
        published = {json.loads(row.body)["workflow_id"] for row in work.batch.outbox}
        releasing = kind in ("resume", "resume_type", "resume_step")
        for i in published:
            if before.get(i) == "paused":  # only a resume lets a paused workflow publish
                assert releasing, (kind, i)
        for i, (wf, _) in work.state.items():
            if wf.status == "paused":
                assert i not in published, (kind, i)
                assert wf.pause is not None
                assert wf.timer_kind not in (machine.TIMER_RUN, machine.TIMER_WAIT)
        state = dict(work.state)  # committed
        for key, pause in work.type_pauses.items():
            if pause is None:
                committed.pop(key, None)
            else:
                committed[key] = pause
        for row in work.batch.outbox:  # nothing of a paused type, or paused step, goes out
            step = row.routing_key.split(".", 1)[1]
            assert ("grantApproval", step) not in committed, (kind, row.routing_key)
            assert ("grantApproval", "") not in committed, (kind, row.routing_key)
        if kind in ("resume_type", "resume_step") and work.replies[-1][2]:
            key = ("grantApproval", "creditCheck" if kind == "resume_step" else "")
            assert not any(machine.paused_by(wf, key) for wf, _ in state.values())


async def test_cancel_refuses_a_compensate_that_is_not_a_bool_before_sending() -> None:
    """``cancel(id, compensate="no")`` would have compensated (a truthy string)."""
    from hms_mgmt.client import Client
    from hms_mgmt.errors import PayloadError

    client = Client(None)  # type: ignore[arg-type]  # refused before any I/O
    for bad in ("no", 1, None):
        with pytest.raises(PayloadError, match="compensate must be True or False"):
            await client.cancel("wf-1", compensate=bad)  # type: ignore[arg-type]
