"""Concurrency limits at admission, on the apply stage (no bus, no store).

Unit cases first, then a hypothesis property over interleavings of outcomes, timers,
cancels, resets, pauses, type pauses and crash-reloads: a limit is never exceeded, the
slots are always exactly what the runs say (no slot leaks), and no group is left with a
free slot and a line once its admissions have run.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hms_mgmt import machine
from hms_mgmt.definitions import RetryPolicy, Step, WorkflowDefinition
from hms_mgmt.engine.apply import Applier
from hms_mgmt.engine.events import Event, OutcomeEvent, RequestEvent, TimerEvent
from hms_mgmt.engine.loading import Loader
from hms_mgmt.engine.registry import Registry
from hms_mgmt.engine.work import Work
from hms_mgmt.errors import DefinitionError, HmsError
from hms_mgmt.machine.limits import ACTIVE, QUEUED, Slots, group_of
from hms_mgmt.records import StepRun, StepStatus, Workflow
from hms_mgmt.store.rows import run_of, run_row, workflow_of, workflow_row
from hms_mgmt.tokens import Signer
from hms_mgmt.topology import STEPS_EXCHANGE
from hms_mgmt.wire.outcomes import Outcome
from hms_mgmt.wire.requests import parse_request

LIMIT = 2
GRANT = WorkflowDefinition.build(
    "grant",
    [
        "validate",
        Step(
            "check",
            concurrency=LIMIT,
            concurrency_key="region",
            timeout=30,
            schedule_to_start=60,
            retry=RetryPolicy(max_attempts=2, initial_delay=5.0, jitter=False),
        ),
        "finalize",
    ],
).with_version(1)
RATED = WorkflowDefinition.build(  # the same, with a rate limit: one check a minute
    "grant",
    [
        "validate",
        Step(
            "check",
            concurrency=LIMIT,
            concurrency_key="region",
            rate_limit="1/m",
            timeout=30,
            schedule_to_start=60,
            retry=RetryPolicy(max_attempts=2, initial_delay=5.0, jitter=False),
        ),
        "finalize",
    ],
).with_version(1)
SIGNER = Signer(b"s" * 32)


class World:
    """The engine's committed state (the store's rows and the slots) and its batches."""

    def __init__(self, definition: WorkflowDefinition = GRANT) -> None:
        self.definition = definition
        self.limit = definition.step("check").concurrency  # type: ignore[union-attr]
        self.registry = Registry(bus=None, store=None)  # type: ignore[arg-type]  # no I/O here
        self.registry.remember(definition)
        self.store: dict[str, tuple[Workflow, StepRun | None]] = {}
        self.type_pauses: dict[tuple[str, str], Any] = {}
        self.applier = Applier(self.registry, {}, SIGNER, self.type_pauses)
        self.loader = Loader(None, None, self.registry, {}, lambda: self.applier.slots)  # type: ignore[arg-type]
        self.now = 1000.0
        self.requests = 0
        self.published: list[tuple[str, int, str, float]] = []  # (workflow id, seq, step, at)
        self.admits: list[str] = []  # heads the engine would admit in the next batch

    def batch(self, events: list[Event]) -> Work:
        """Load as the loading stage does (the events' workflows, the heads of their lines),
        apply, and commit."""
        self.now += 1.0
        if self.admits:
            events = [TimerEvent(head, machine.TIMER_ADMIT) for head in self.admits] + events
            self.admits = []
        work = Work()
        ids = {e.workflow_id for e in events if e.workflow_id}
        ids.update(self.loader._line_heads(sorted(ids)))
        for e in events:
            if isinstance(e, TimerEvent) and e.kind == machine.TIMER_ADMIT:
                ids.update(self.loader._line_heads([e.workflow_id], every_key=True))
        work.state = {i: self.store[i] for i in ids if i in self.store}
        for e in events:
            if isinstance(e, RequestEvent) and e.request.kind == "resume_type":
                key = (e.request.workflow, e.request.step or "")  # type: ignore[attr-defined]
                held = [i for i, (w, _) in self.store.items() if machine.paused_by(w, key)]
                work.type_held[key] = held
                work.state.update({i: self.store[i] for i in held})
        for event in events:
            self.applier.apply(event, work, self.now)
        for workflow_id in work.batch.workflows:
            self.store[workflow_id] = work.state[workflow_id]
        for row in work.batch.outbox:
            if row.exchange != STEPS_EXCHANGE:
                continue  # a dead letter
            body = json.loads(row.body)
            self.published.append((body["workflow_id"], body["seq"], body["step"], self.now))
        if work.slots is not None:
            self.applier.slots = work.slots
        for group in work.stalled:
            line = self.applier.slots.line(group)
            if line:
                self.admits.append(line[0])
        for paused, pause in work.type_pauses.items():
            if pause is None:
                self.type_pauses.pop(paused, None)
            else:
                self.type_pauses[paused] = pause
        return work

    def request(self, **fields: Any) -> RequestEvent:
        self.requests += 1
        body = {"request_id": f"r{self.requests}", **fields}
        return RequestEvent(parse_request(body, reply_to="client"))

    def start(self, workflow_id: str, region: str | None, priority: int = 3) -> Work:
        payload = {} if region is None else {"region": region}
        event = self.request(
            type="start",
            workflow_id=workflow_id,
            workflow="grant",
            payload=payload,
            priority=priority,
        )
        return self.batch([event])

    def outcome(self, workflow_id: str, kind: str, **fields: Any) -> Event:
        _workflow, run = self.store[workflow_id]
        assert run is not None
        return OutcomeEvent(
            Outcome(workflow_id, run.seq, kind, step=run.step, attempt=run.attempt, **fields)
        )

    def crash(self) -> None:
        """A restart: the rows read back from the store, the slots rebuilt from them."""
        rows: dict[str, tuple[Workflow, StepRun | None]] = {}
        for workflow_id, (workflow, run) in self.store.items():
            back = workflow_of(tuple(workflow_row(workflow)))
            rows[workflow_id] = (back, None if run is None else run_of(tuple(run_row(run))))
        self.store = rows
        limited = [  # what the store's limited_runs query finds
            (w, r)
            for w, r in rows.values()
            if r is not None
            and not w.terminal
            and r.status in (StepStatus.PENDING, StepStatus.RUNNING, StepStatus.QUEUED)
        ]
        slots = Slots.build(limited, _versions_of(self.registry))
        interval = self.definition.step("check").rate_interval  # type: ignore[union-attr]
        if interval is not None:  # as the engine does: the rate starts afresh
            slots.next_at[("grant", "check")] = self.now + interval
        self.applier = Applier(self.registry, {}, SIGNER, self.type_pauses, slots)
        self.admits = [line[0] for line in map(slots.line, slots.queued) if line]

    def check(self) -> None:
        """The limit holds, the slots are exactly what the stored runs say, and no line with
        a free slot is forgotten (liveness): its admission is due in the next batch, or a
        durable timer in line waits for the rate limit."""
        expected = Slots.build(list(self.store.values()), lambda w: self.definition)
        slots = self.applier.slots
        assert slots.of == expected.of
        for group, members in expected.active.items():
            assert len(members) <= self.limit, f"{group}: {sorted(members)} out at once"
        open_lines = [g for g in slots.queued if slots.taken(g) < self.limit]
        if open_lines and not self.admits:
            armed = [
                i
                for g in open_lines
                for i in slots.queued[g]
                if self.store[i][0].timer_kind == machine.TIMER_ADMIT
            ]
            assert armed, f"{open_lines}: free slots and a line, but no admission armed"
        interval = self.definition.step("check").rate_interval  # type: ignore[union-attr]
        if interval is not None:  # publications of check keep to the rate: n of them span at
            # least n - 2 intervals (one may go early to make up for a late timer)
            times = sorted(at for _, _, step, at in self.published if step == "check")
            for i, j in itertools.combinations(range(len(times)), 2):
                assert times[j] - times[i] >= (j - i - 1) * interval - 1e-6, times

    def fire_next_admission(self) -> bool:
        armed = sorted(
            (w.timer_at or 0.0, i)
            for i, (w, _) in self.store.items()
            if w.timer_kind == machine.TIMER_ADMIT
        )
        if not armed:
            return False
        self.now = max(self.now, armed[0][0] - 1.0)  # a batch is a second on
        self.batch([TimerEvent(armed[0][1], machine.TIMER_ADMIT)])
        return True

    def settled(self) -> None:
        """With admissions run (and rate timers fired), no group has a free slot and a line."""
        for _ in range(200):
            armed = sorted(
                (w.timer_at or 0.0, i)
                for i, (w, _) in self.store.items()
                if w.timer_kind == machine.TIMER_ADMIT
            )
            if self.admits:
                self.batch([])
            elif armed:
                self.now = max(self.now, armed[0][0])
                self.batch([TimerEvent(armed[0][1], machine.TIMER_ADMIT)])
            else:
                break
        slots = self.applier.slots
        for group in slots.queued:
            assert slots.taken(group) >= self.limit, f"{group} has a free slot and a line"


def _versions_of(registry: Registry) -> Callable[[Workflow], WorkflowDefinition | None]:
    return lambda w: registry.versions.get((w.name, w.version))


# -- definitions --------------------------------------------------------------------------


def test_a_definition_checks_its_limits_with_errors_naming_the_step() -> None:
    with pytest.raises(DefinitionError, match="concurrency of step 'check' must be a whole"):
        Step("check", concurrency=0)
    with pytest.raises(DefinitionError, match="concurrency of step 'check' must be a whole"):
        Step("check", concurrency=2.5)  # type: ignore[arg-type]
    with pytest.raises(DefinitionError, match="concurrency_key of step 'check' needs a concur"):
        Step("check", concurrency_key="region")
    with pytest.raises(DefinitionError, match="concurrency_key of step 'check' must be the name"):
        Step("check", concurrency=1, concurrency_key="")
    step = Step("check", concurrency=5, concurrency_key="region")
    back = Step.from_json(step.to_json())
    assert (back.concurrency, back.concurrency_key) == (5, "region")
    assert "concurrency" not in Step("plain").to_json()  # older definitions compare equal


def test_the_group_of_a_run_is_the_value_of_its_key_and_runs_without_it_share_one() -> None:
    def run(payload: Any) -> StepRun:
        return StepRun("w", 1, "check", 1, 1, StepStatus.PENDING, payload, created_at=1.0)

    assert group_of(GRANT, run({"region": "eu"})) == ("grant", "check", "eu")
    assert group_of(GRANT, run({"region": 7})) == ("grant", "check", "7")
    assert group_of(GRANT, run({})) == group_of(GRANT, run("not a dict")) == ("grant", "check", "")
    other = StepRun("w", 1, "validate", 1, 1, StepStatus.PENDING, {}, created_at=1.0)
    assert group_of(GRANT, other) is None


# -- admission ----------------------------------------------------------------------------


def _to_check(world: World, workflow_id: str) -> None:
    """The workflow's validate succeeds: it goes on to check with the same payload."""
    world.batch([_outcome(world, workflow_id, "succeeded")])


def test_runs_over_the_limit_wait_queued_and_a_finished_run_admits_the_oldest_in_its_batch() -> (
    None
):
    world = World()
    for i in range(4):
        world.start(f"w{i}", "eu")
        _to_check(world, f"w{i}")
    statuses = [world.store[f"w{i}"][1].status for i in range(4)]  # type: ignore[union-attr]
    assert statuses == ["pending", "pending", "queued", "queued"]
    checks = [p for p in world.published if p[2] == "check"]
    assert [p[0] for p in checks] == ["w0", "w1"]  # the queued ones were not published
    world.start("w9", "us")  # another key has its own slots
    _to_check(world, "w9")
    assert world.store["w9"][1].status == "pending"  # type: ignore[union-attr]
    work = world.batch([world.outcome("w1", "succeeded", result={"data": {}})])
    assert world.store["w2"][1].status == "pending"  # type: ignore[union-attr]
    assert world.store["w3"][1].status == "queued"  # type: ignore[union-attr]
    assert [e for _, _, e, _ in work.batch.history].count("step_admitted") == 1
    assert any(p[:3] == ("w2", 2, "check") for p in world.published)
    world.check()


def test_a_cancelled_run_frees_its_slot_and_a_cancelled_queued_run_leaves_the_line() -> None:
    world = World()
    for i in range(4):
        world.start(f"w{i}", None)
        _to_check(world, f"w{i}")
    world.batch([world.request(type="cancel", workflow_id="w3")])
    assert world.store["w3"][1].status == "cancelled"  # type: ignore[union-attr]
    world.batch([world.request(type="cancel", workflow_id="w0")])
    assert world.store["w2"][1].status == "pending"  # type: ignore[union-attr]
    world.check()
    assert world.applier.slots.waiting() == 0


def test_a_paused_workflow_admitted_holds_its_step_and_frees_the_slot_for_the_next() -> None:
    world = World()
    for i in range(4):
        world.start(f"w{i}", None)
        _to_check(world, f"w{i}")
    world.batch([world.request(type="pause", workflow_id="w2")])
    world.batch([world.outcome("w0", "succeeded", result={"data": {}})])
    w2, run2 = world.store["w2"]
    assert w2.status == "paused" and run2 is not None and run2.status == "pending"
    assert (w2.pause or {}).get("held") == run2.seq  # held, not published, no slot
    assert world.store["w3"][1].status == "pending"  # type: ignore[union-attr]
    assert not any(p[0] == "w2" and p[2] == "check" for p in world.published)
    world.check()
    world.batch([world.outcome("w1", "succeeded", result={"data": {}})])
    world.batch([world.request(type="resume", workflow_id="w2")])
    assert world.store["w2"][1].status == "pending"  # type: ignore[union-attr]
    assert any(p[0] == "w2" and p[2] == "check" for p in world.published)
    world.check()


# -- the property -------------------------------------------------------------------------

ACTIONS = st.sampled_from(
    ["start", "started", "succeeded", "failed", "timer", "cancel", "pause", "resume",
     "reset", "pause_type", "resume_type", "crash", "batch", "due", "due", "to_check", "to_check"]
)  # fmt: skip


REGIONS = st.sampled_from(["eu", "us", None])
PRIORITIES = st.integers(1, 5)


ROUND = WorkflowDefinition.build(  # one check a minute, shared by every key: what the round
    "grant",  # robin is for (each key has its own concurrency slots, plenty of them here)
    ["validate", Step("check", concurrency=10, concurrency_key="region", rate_limit="1/m")],
).with_version(1)


@pytest.mark.parametrize(
    "definition", [GRANT, RATED, ROUND], ids=["concurrency", "and-rate", "rate-shared-by-keys"]
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_across_any_interleaving_the_limit_holds_and_no_slot_leaks(
    definition: WorkflowDefinition, data: st.DataObject
) -> None:
    world = World(definition)
    ids: list[str] = []
    type_paused = False
    for _ in range(data.draw(st.integers(5, 60))):
        action = data.draw(ACTIONS)
        if action == "due":  # the next admission timer fires
            world.fire_next_admission()
            world.check()
            continue
        if action == "to_check":  # a new workflow straight on to check
            workflow_id = f"w{len(ids)}"
            ids.append(workflow_id)
            world.start(workflow_id, data.draw(REGIONS), data.draw(PRIORITIES))
            _to_check(world, workflow_id)
            world.check()
            continue
        if action == "start" or not ids:
            workflow_id = f"w{len(ids)}"
            ids.append(workflow_id)
            world.start(workflow_id, data.draw(REGIONS), data.draw(PRIORITIES))
            continue
        workflow_id = data.draw(st.sampled_from(ids))
        workflow, _run = world.store[workflow_id]
        if action in ("started", "succeeded", "failed"):
            world.batch([_outcome(world, workflow_id, action)])
        elif action == "timer":
            if workflow.timer_kind is not None:
                world.now = max(world.now, workflow.timer_at or 0.0)
                world.batch([TimerEvent(workflow_id, workflow.timer_kind)])
        elif action in ("cancel", "pause", "resume"):
            world.batch([world.request(type=action, workflow_id=workflow_id)])
        elif action == "reset":
            to = data.draw(st.sampled_from(["validate", "check", "finalize"]))
            world.batch([world.request(type="reset", workflow_id=workflow_id, to_step=to)])
        elif action == "pause_type" and not type_paused:
            world.batch([world.request(type="pause_type", workflow="grant", step="check")])
            type_paused = True
        elif action == "resume_type" and type_paused:
            world.batch([world.request(type="resume_type", workflow="grant", step="check")])
            type_paused = False
        elif action == "crash":
            world.crash()  # type pauses are stored: they survive it
        elif action == "batch":  # several workflows' outcomes in one batch
            chosen = data.draw(st.lists(st.sampled_from(ids), min_size=1, max_size=4, unique=True))
            world.batch([_outcome(world, i, "succeeded") for i in chosen])
        world.check()
    world.settled()
    world.check()


def _outcome(world: World, workflow_id: str, kind: str) -> Event:
    _, run = world.store[workflow_id]
    assert run is not None
    if kind == "succeeded":
        return world.outcome(workflow_id, kind, result={"data": run.input})
    if kind == "failed":
        return world.outcome(workflow_id, kind, error={"type": "E", "message": "m"})
    return world.outcome(workflow_id, kind)


def test_slots_rebuilt_after_a_crash_are_the_slots_before_it() -> None:
    world = World()
    for i in range(5):
        world.start(f"w{i}", "eu" if i % 2 else None)
        _to_check(world, f"w{i}")
    before = world.applier.slots.copy()
    world.crash()
    assert world.applier.slots == before
    assert {s for _, s, _ in before.of.values()} == {ACTIVE, QUEUED}


def test_a_rate_limit_queues_runs_due_too_soon_and_arms_a_durable_timer_for_the_next() -> None:
    world = World(RATED)
    for i in range(3):
        world.start(f"w{i}", f"k{i}")  # three keys: the concurrency limit is not what holds
        _to_check(world, f"w{i}")
    assert [world.store[f"w{i}"][1].status for i in range(3)] == [  # type: ignore[union-attr]
        "pending",
        "queued",
        "queued",
    ]
    head, _ = world.store["w1"]
    first = next(at for w, _, step, at in world.published if w == "w0" and step == "check")
    assert head.timer_kind == "admit" and head.timer_at == first + 60.0  # in the store's row
    world.now = first + 30.0
    world.batch([TimerEvent("w1", machine.TIMER_ADMIT)])  # early (a stale copy): nothing
    assert world.store["w1"][1].status == "queued"  # type: ignore[union-attr]
    world.now = first + 59.0  # a batch is a second on
    world.batch([TimerEvent("w2", machine.TIMER_ADMIT)])  # whichever fires: oldest first
    assert world.store["w1"][1].status == "pending"  # type: ignore[union-attr]
    assert world.store["w1"][0].timer_kind != "admit"
    assert world.store["w2"][1].status == "queued"  # type: ignore[union-attr]
    nxt = world.store["w2"][0]
    second = next(at for w, _, step, at in world.published if w == "w1" and step == "check")
    assert second == first + 60.0
    assert nxt.timer_kind == "admit" and nxt.timer_at == second + 60.0  # the next admission
    world.check()


def test_rate_limits_are_checked_with_errors_naming_the_step() -> None:
    for bad in ("10", "0/s", "10/d", "ten/s", 10):
        with pytest.raises(DefinitionError, match="rate_limit of step 'check' must be 'N/s'"):
            Step("check", rate_limit=bad)  # type: ignore[arg-type]
    assert Step("check", rate_limit="20/s").rate_interval == pytest.approx(0.05)
    assert Step("check", rate_limit="30/m").rate_interval == pytest.approx(2.0)
    assert Step.from_json(Step("c", rate_limit="5/h").to_json()).rate_limit == "5/h"


def test_a_rate_slower_than_one_run_in_ten_years_is_refused() -> None:
    """Its admission timer would be due past every other timer's bound (1e-300/s: 1e300 s)."""
    for slow in ("1e-300/s", "0.0000001/h"):
        with pytest.raises(DefinitionError, match="one run in 10 years at least"):
            Step("check", rate_limit=slow)
    assert Step("check", rate_limit="0.5/h").rate_interval == pytest.approx(7200.0)


# -- priorities ---------------------------------------------------------------------------


def test_a_start_s_priority_is_checked_where_it_is_given() -> None:
    from hms_mgmt.client import _start_fields
    from hms_mgmt.errors import PayloadError

    body = {"type": "start", "request_id": "r", "workflow_id": "w", "workflow": "grant"}
    assert parse_request(body).priority == 3  # type: ignore[attr-defined]
    assert parse_request({**body, "priority": 1}).priority == 1  # type: ignore[attr-defined]
    for bad in (0, 6, "1", True, 2.0):
        with pytest.raises(HmsError, match="field 'priority' must be a whole number from 1"):
            parse_request({**body, "priority": bad})
        with pytest.raises(PayloadError, match="priority must be a whole number from 1"):
            _start_fields("grant", {}, None, None, None, None, None, bad)  # type: ignore[arg-type]


def _checks(world: World) -> list[str]:
    """The workflows whose check was published, in order."""
    return [w for w, _, step, _ in world.published if step == "check"]


def test_a_queued_run_of_a_better_priority_is_admitted_first_however_new() -> None:
    world = World()
    for i, priority in enumerate([3, 3, 5, 3, 1]):
        world.start(f"w{i}", "eu", priority)
        _to_check(world, f"w{i}")
    assert world.applier.slots.line(("grant", "check", "eu")) == ["w4", "w3", "w2"]
    for i in (0, 1, 4):
        world.batch([world.outcome(f"w{i}", "succeeded", result={"data": {}})])
    assert _checks(world) == ["w0", "w1", "w4", "w3", "w2"]
    world.check()


def test_a_priority_survives_a_crash_the_line_rebuilt_in_the_same_order() -> None:
    world = World()
    for i, priority in enumerate([3, 3, 5, 1]):
        world.start(f"w{i}", None, priority)
        _to_check(world, f"w{i}")
    world.crash()
    assert world.applier.slots.line(("grant", "check", "")) == ["w3", "w2"]
    world.batch([world.outcome("w0", "succeeded", result={"data": {}})])
    assert _checks(world)[-1] == "w3"


def _run_admissions(world: World) -> None:
    """Every admission in turn: those due in the next batch, then the timers."""
    while world.admits or world.fire_next_admission():
        if world.admits:
            world.batch([])


def test_a_rate_limit_shared_by_keys_admits_them_in_turn_so_no_backlog_starves_a_key() -> None:
    world = World(ROUND)
    for i, region in enumerate(["eu", "eu", "eu", "eu", "us", "us"]):
        world.start(f"w{i}", region)
        _to_check(world, f"w{i}")
    _run_admissions(world)
    # w0 went at once; then us (never served) and eu take turns, each its oldest first
    assert _checks(world) == ["w0", "w4", "w1", "w5", "w2", "w3"]


def test_priority_goes_before_the_turn_of_keys_and_the_turn_before_age() -> None:
    world = World(ROUND)
    world.start("w0", "eu")
    _to_check(world, "w0")  # published: the rate is spent
    for i, (region, priority) in enumerate(
        [("eu", 1), ("us", 3), ("eu", 1), ("asia", 3), ("us", 2)], start=1
    ):
        world.start(f"w{i}", region, priority)
        _to_check(world, f"w{i}")
    _run_admissions(world)
    # priority 1 (both eu), then 2 (us), then 3: asia, never served, before us
    assert _checks(world) == ["w0", "w1", "w3", "w5", "w4", "w2"]


def test_a_type_pause_releases_the_starts_it_held_by_priority_then_oldest() -> None:
    world = World()
    world.batch([world.request(type="pause_type", workflow="grant")])
    for i, priority in enumerate([5, 3, 1, 3]):
        world.start(f"w{i}", f"k{i}", priority)
    assert [w for w, _, _, _ in world.published] == []  # held
    world.batch([world.request(type="resume_type", workflow="grant")])
    assert [w for w, _, _, _ in world.published] == ["w2", "w1", "w3", "w0"]


def test_an_admission_timer_that_fires_out_of_turn_is_spent_not_left_armed() -> None:
    """The regression behind a liveness failure of the property with priorities: a timer
    that fired before the rate was due, while another run's turn was next, stayed armed in
    the store (in the past) until its run was admitted."""
    world = World(RATED)
    world.start("w0", "eu")
    _to_check(world, "w0")  # published: the next check in a minute
    world.start("w1", "eu")
    _to_check(world, "w1")  # queued: the timer of the next admission
    due = world.store["w1"][0].timer_at
    assert due is not None
    world.start("w2", "us", priority=1)
    _to_check(world, "w2")  # its turn comes first: it holds a timer too
    assert world.store["w2"][0].timer_at == due
    world.crash()  # the rate starts afresh, a minute from now: after w1's timer
    world.batch([])  # the lines' heads admitted after the restart: the rate is not due
    assert world.store["w2"][0].timer_at == world.applier.slots.next_at[("grant", "check")]
    assert world.store["w1"][0].timer_at == due < world.applier.slots.next_at[("grant", "check")]
    world.now = due
    world.batch([TimerEvent("w1", machine.TIMER_ADMIT)])  # fires out of turn, too early
    assert world.store["w1"][0].timer_kind is None  # spent, not left armed in the past
    assert world.store["w1"][1].status == "queued"  # type: ignore[union-attr]
    world.check()  # w2's timer still holds the next admission
    world.settled()
    assert _checks(world) == ["w0", "w2", "w1"]
    world.check()
