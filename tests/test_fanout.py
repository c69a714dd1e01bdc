"""Fan-out and join on the engine's stages, without a bus, and on the pure machine.

The driver runs the engine's batch (the loading stage, the pure machine through the apply
stage, one commit) on a real SQLite file and plays the step services by answering the step
messages the batches put in the outbox. ``reload`` drops everything in memory after every
batch, as an engine killed and started again would: every branch's state must come back
from the store.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hms_mgmt import machine
from hms_mgmt.cli_format import show
from hms_mgmt.definitions import Parallel, RetryPolicy, Step, WorkflowDefinition
from hms_mgmt.engine.apply import Applier
from hms_mgmt.engine.cache import InFlight
from hms_mgmt.engine.engine import follow_up
from hms_mgmt.engine.events import Event, OutcomeEvent, RequestEvent, TimerEvent
from hms_mgmt.engine.loading import Loader
from hms_mgmt.engine.registry import Registry
from hms_mgmt.engine.work import Work
from hms_mgmt.errors import DefinitionError
from hms_mgmt.machine.branches import BRANCHES_FAILED, INVALID_FAN_OUT, MAX_BRANCHES
from hms_mgmt.records import StepRun, Workflow, WorkflowState
from hms_mgmt.store.sqlite import SQLiteStore
from hms_mgmt.tokens import Signer
from hms_mgmt.wire.codec import MAX_PAYLOAD_BYTES
from hms_mgmt.wire.outcomes import Outcome
from hms_mgmt.wire.requests import parse_request

ONCE = RetryPolicy(max_attempts=1)
GRANT = WorkflowDefinition.build(
    "grant",
    [
        "split",
        Step("creditCheck", retry=ONCE),
        Step("backgroundCheck", retry=ONCE),
        Step("score", retry=ONCE),
        "join",
    ],
).with_version(1)
GRANT_ON_ERROR = WorkflowDefinition.build(
    "grantSafe", ["split", Step("score", retry=ONCE), "join"], on_error="apologise"
).with_version(1)
RETRIED = WorkflowDefinition.build(
    "retried",
    ["split", Step("score", retry=RetryPolicy(max_attempts=2, initial_delay=5.0)), "join"],
).with_version(1)
TIMED = WorkflowDefinition.build(
    "timed", ["split", Step("score", retry=ONCE, timeout=10.0), "join"]
).with_version(1)

SAGA = WorkflowDefinition.build(
    "saga", [Step("hold", compensate="release"), "split", Step("score", retry=ONCE), "join"]
).with_version(1)

STATIC = WorkflowDefinition.build(
    "static",
    [
        "validate",
        Parallel("creditCheck", Step("backgroundCheck", retry=ONCE), tolerate=1),
        "schedule",
    ],
).with_version(1)
STATIC_FIRST = WorkflowDefinition.build(
    "staticFirst", [Parallel("a", "b", max_concurrency=1), "join"]
).with_version(1)
LIMITED = WorkflowDefinition.build(  # branches of a step with a concurrency limit of its own
    "limitedBranches", ["split", Step("score", retry=ONCE, concurrency=1), "join"]
).with_version(1)

FOUR = {
    "fan_out": [
        {"step": "creditCheck", "data": {"n": 0}},
        {"step": "backgroundCheck", "data": {"n": 1}},
        {"step": "score", "data": {"n": 2}},
        {"step": "score", "data": {"n": 3}},
    ],
    "join": "join",
}


def mapping(items: list[Any], **more: Any) -> dict[str, Any]:
    return {"map": {"step": "score", "items": items}, "join": "join", **more}


class Driver:
    """The engine's batch on a SQLite file, and the step services' answers."""

    def __init__(self, path: Path, *, reload: bool = False) -> None:
        self.url = f"sqlite:///{path}"
        self.reload = reload
        self.now = 1000.0
        self.out: list[dict[str, Any]] = []  # step messages published, not answered yet
        self.requests = 0

    async def open(self) -> None:
        self.store = SQLiteStore(self.url)
        await self.store.open()
        registry = Registry(bus=None, store=None)  # type: ignore[arg-type]  # no I/O here
        for definition in (
            GRANT,
            GRANT_ON_ERROR,
            RETRIED,
            TIMED,
            SAGA,
            STATIC,
            STATIC_FIRST,
            LIMITED,
        ):
            registry.remember(definition)
        self.cache = InFlight()
        self.applier = Applier(registry, {}, Signer(b"s" * 32))
        self.loader = Loader(self.store, self.cache, registry, {})

    async def close(self) -> None:
        await self.store.close()

    async def batch(self, events: list[Event]) -> Work:
        self.now += 1
        work = Work()
        await self.loader.load(events, work, self.now)
        for event in events:
            self.applier.apply(event, work, self.now)
        await follow_up(self.loader, self.applier, work, self.now)
        await self.store.commit(work.batch)
        self.cache.update(work.state, self.now + 60)
        if work.slots is not None:  # committed: as the engine does
            self.applier.slots = work.slots
        self.out += [json.loads(r.body) for r in work.batch.outbox if r.exchange == "hms.steps"]
        if self.reload:  # a crash after the commit: nothing in memory survives
            await self.close()
            await self.open()
        return work

    async def request(self, **fields: Any) -> Work:
        self.requests += 1
        request = parse_request({"request_id": f"r{self.requests}", **fields}, reply_to="c")
        return await self.batch([RequestEvent(request)])

    async def start(self, workflow: str = "grant", workflow_id: str = "w1") -> None:
        await self.request(type="start", workflow=workflow, workflow_id=workflow_id, payload={})

    def taken(self, step: str | None = None) -> dict[str, Any]:
        for item in self.out:
            if step is None or item["step"] == step:
                self.out.remove(item)
                return item
        raise AssertionError(f"no step message for {step}: {self.out}")

    async def report(self, item: dict[str, Any], *, fail: bool = False, **result: Any) -> Work:
        outcome = (
            Outcome(item["workflow_id"], item["seq"], "failed", step=item["step"],
                    error={"type": "RuntimeError", "message": f"boom {item['seq']}"})
            if fail
            else Outcome(item["workflow_id"], item["seq"], "succeeded", step=item["step"],
                         result=result or {"data": {"from": item["payload"]}})
        )  # fmt: skip
        return await self.batch([OutcomeEvent(outcome)])

    async def answer(self, step: str | None = None, **kwargs: Any) -> Work:
        return await self.report(self.taken(step), **kwargs)

    async def workflow(self, workflow_id: str = "w1") -> Workflow:
        return (await self.store.load([workflow_id]))[workflow_id][0]

    async def state(self, workflow_id: str = "w1") -> WorkflowState:
        found = await self.store.workflow_with_runs(workflow_id)
        assert found is not None
        return WorkflowState.of(*found)


@pytest.fixture(params=[False, True], ids=["in-memory", "reloaded-after-every-batch"])
async def driver(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    d = Driver(tmp_path / "fanout.db", reload=request.param)
    await d.open()
    yield d
    await d.close()


def kinds(work: Work) -> list[str]:
    return [kind for _, _, kind, _ in work.batch.history]


async def test_a_four_way_fan_out_publishes_every_branch_in_one_commit_and_joins_once(
    driver: Driver,
) -> None:
    await driver.start()
    work = await driver.answer("split", **FOUR)
    assert kinds(work).count("step_published") == 4 and len(driver.out) == 4
    keys = {(item["step"], json.dumps(item["context"])) for item in driver.out}
    assert len(keys) == 4  # each its own run, its branch index in its context
    assert [item["payload"] for item in driver.out] == [{"n": i} for i in range(4)]
    joined = []
    for item in list(reversed(driver.out)):  # the last first: results stay in item order
        driver.out.remove(item)
        work = await driver.report(item, data=item["payload"]["n"] * 10)
        joined.append(kinds(work).count("joined"))
    assert joined == [0, 0, 0, 1]  # in the transaction of the last branch's outcome
    join = driver.taken("join")
    assert join["payload"] == {"results": [0, 10, 20, 30], "errors": []}
    await driver.report(join, data="done")
    state = await driver.state()
    assert state.status == "succeeded" and state.output == "done"
    assert [s.step for s in state.steps].count("score") == 2
    assert state.branches is not None and state.branches["state"] == "joined"
    assert [b["step"] for b in state.branches["branches"]] == [
        "creditCheck",
        "backgroundCheck",
        "score",
        "score",
    ]
    assert "branches of split: 4/4 done, joined (join join)" in state.describe()
    assert WorkflowState.from_json(state.to_json()) == state
    shown = show(state.to_json())
    assert "4/4 done, joined (of split, join join)" in shown


async def test_branches_have_their_own_idempotency_keys() -> None:
    t = machine.start(GRANT, "w1", {}, 1.0)
    assert t.workflow is not None
    outcome = Outcome("w1", 1, "succeeded", result=mapping([1, 2]))
    t = machine.apply_outcome(t.workflow, t.runs[-1], GRANT, outcome, 2.0)
    assert [s.idempotency_key for s in t.steps] == ["w1:score:1:0", "w1:score:1:1"]
    branch_runs = [r for r in t.runs if r.step == "score"]
    assert [r.idempotency_key for r in branch_runs] == ["w1:score:1:0", "w1:score:1:1"]


async def test_max_concurrency_holds_the_rest_until_others_finish(driver: Driver) -> None:
    await driver.start()
    await driver.answer("split", **mapping(list(range(5)), max_concurrency=2))
    seen = []
    while driver.out:
        assert len(driver.out) <= 2
        seen.append(len(driver.out))
        item = driver.taken()
        if item["step"] == "join":
            assert item["payload"]["results"] == [i * 2 for i in range(5)]
            break
        await driver.report(item, data=item["payload"] * 2)
    assert seen[0] == 2


async def test_branches_are_bounded_by_max_concurrency_not_by_their_step_s_limit(
    driver: Driver,
) -> None:
    await driver.start("limitedBranches", "w2")  # w2 runs score as a step: its one slot
    await driver.answer("split", data={})
    assert [(item["workflow_id"], item["step"]) for item in driver.out] == [("w2", "score")]
    await driver.start("limitedBranches", "w1")
    work = await driver.answer("split", **mapping([1, 2, 3]))
    assert [(item["workflow_id"], item["step"]) for item in driver.out[1:]] == [
        ("w1", "score")
    ] * 3  # published, slot or not
    assert "step_queued" not in kinds(work)


async def test_empty_items_go_straight_to_the_join(driver: Driver) -> None:
    await driver.start()
    work = await driver.answer("split", **mapping([]))
    assert "joined" in kinds(work)
    assert driver.taken("join")["payload"] == {"results": [], "errors": []}


async def test_tolerated_failures_join_with_their_errors_listed(driver: Driver) -> None:
    await driver.start()
    await driver.answer("split", **mapping(["a", "b", "c"], tolerate=1))
    first = driver.taken()
    await driver.report(first, fail=True)
    await driver.answer()
    await driver.answer()
    join = driver.taken("join")
    assert join["payload"]["results"] == [None, {"from": "b"}, {"from": "c"}]
    [error] = join["payload"]["errors"]
    assert error["index"] == 0 and error["step"] == "score"
    assert error["error"]["type"] == "RuntimeError"


async def test_more_failures_than_tolerated_cancel_the_unstarted_and_fail_the_workflow(
    driver: Driver,
) -> None:
    await driver.start()
    await driver.answer("split", **mapping(["a", "b", "c", "d"], max_concurrency=3))
    a, b, c = driver.taken(), driver.taken(), driver.taken()
    await driver.batch(  # b has started; c was published but not started
        [OutcomeEvent(Outcome("w1", b["seq"], "started", step="score"))]
    )
    work = await driver.report(a, fail=True)
    assert "branches_cancelled" in kinds(work)
    wf = await driver.workflow()
    assert wf.status == "failed" and wf.error is not None
    assert wf.error["type"] == BRANCHES_FAILED and wf.error["branch"] == 0
    assert "1 of 4 branches" in wf.error["message"]
    assert wf.error["reason"] == "1 branch gave up"  # not "1 branches"
    statuses = [e["status"] for e in wf.branches["branches"]]  # type: ignore[index]
    assert statuses == ["failed", "running", "cancelled", "cancelled"]
    assert len(work.batch.outbox) == 1  # its step message, into the .dlq
    # the running sibling's late outcome is recorded, and changes nothing else
    work = await driver.report(b, data="late")
    assert kinds(work) == ["branch_outcome_late"] and not work.finished
    wf = await driver.workflow()
    assert wf.status == "failed" and wf.branches["branches"][1]["output"] == "late"  # type: ignore[index]
    state = await driver.state()
    assert [s.status for s in state.steps if s.step == "score"] == [
        "failed",
        "succeeded",
        "cancelled",
    ]
    # the cancelled one's outcome is ignored
    work = await driver.report(c, data="too late")
    assert kinds(work) == ["outcome_ignored"]
    # a retry re-runs only the failed and cancelled branches, and keeps the outputs
    await driver.request(type="retry", workflow_id="w1")
    assert sorted(item["payload"] for item in driver.out) == ["a", "c", "d"]
    while (item := driver.taken()) and item["step"] != "join":
        await driver.report(item, data=item["payload"].upper())
    assert item["payload"] == {"results": ["A", "late", "C", "D"], "errors": []}
    keys = [e["status"] for e in (await driver.workflow()).branches["branches"]]  # type: ignore[index]
    assert keys == ["succeeded"] * 4


async def test_a_failed_fan_out_takes_the_error_step(driver: Driver) -> None:
    await driver.start("grantSafe")
    await driver.answer("split", **mapping([1, 2]))
    await driver.answer(fail=True)
    apologise = driver.taken("apologise")
    assert apologise["context"]["error"]["type"] == BRANCHES_FAILED
    assert (await driver.workflow()).status == "running"


async def test_a_branch_is_retried_by_its_policy_when_its_timer_fires(driver: Driver) -> None:
    await driver.start("retried")
    await driver.answer("split", **mapping(["x", "y"]))
    await driver.answer(fail=True)
    wf = await driver.workflow()
    assert wf.timer_kind == machine.TIMER_BRANCH and wf.timer_at is not None
    assert len(driver.out) == 1  # the retry waits for its backoff
    driver.now = wf.timer_at
    await driver.batch([TimerEvent("w1", machine.TIMER_BRANCH)])
    retried = next(item for item in driver.out if item["attempt"] == 2)
    driver.out.remove(retried)
    assert retried["attempt"] == 2 and retried["payload"] == "x"
    await driver.report(retried, data=1)
    await driver.answer("score", data=2)
    assert driver.taken("join")["payload"]["results"] == [1, 2]


async def test_a_branch_past_its_deadline_times_out(driver: Driver) -> None:
    await driver.start("timed")
    await driver.answer("split", **mapping(["x", "y"], tolerate=1))
    x = driver.taken()
    await driver.batch([OutcomeEvent(Outcome("w1", x["seq"], "started", step="score"))])
    wf = await driver.workflow()
    assert wf.timer_kind == machine.TIMER_BRANCH and wf.timer_at is not None
    driver.now = wf.timer_at
    await driver.batch([TimerEvent("w1", machine.TIMER_BRANCH)])
    await driver.answer("score", data=2)
    join = driver.taken("join")
    assert join["payload"]["results"] == [None, 2]
    assert join["payload"]["errors"][0]["error"]["type"] == "StepTimeout"


async def test_cancel_cancels_every_branch_out_and_waiting(driver: Driver) -> None:
    await driver.start()
    await driver.answer("split", **mapping([1, 2, 3], max_concurrency=2))
    await driver.request(type="cancel", workflow_id="w1", reason="no")
    wf = await driver.workflow()
    assert wf.status == "cancelled"
    assert [e["status"] for e in wf.branches["branches"]] == ["cancelled"] * 3  # type: ignore[index]
    state = await driver.state()
    assert all(s.status == "cancelled" for s in state.steps if s.step == "score")
    work = await driver.answer(data=1)
    assert kinds(work) == ["outcome_ignored"]


async def test_pause_holds_unpublished_branches_until_resume(driver: Driver) -> None:
    await driver.start()
    await driver.answer("split", **mapping([1, 2, 3], max_concurrency=1))
    await driver.request(type="pause", workflow_id="w1")
    await driver.answer(data=1)  # the one out finishes; the next is held
    assert driver.out == []
    await driver.request(type="resume", workflow_id="w1")
    item = driver.taken()
    assert item["payload"] == 2
    await driver.report(item, data=2)
    await driver.answer(data=3)
    assert driver.taken("join")["payload"]["results"] == [1, 2, 3]


@pytest.mark.parametrize(
    ("result", "named"),
    [
        ({"map": {"step": "score", "items": [1]}, "join": "nowhere"}, "join 'nowhere'"),
        ({"map": {"step": "nope", "items": [1]}, "join": "join"}, "step 'nope'"),
        ({"fan_out": [{"data": 1}], "join": "join"}, "branch 0 must be a dict"),
        (
            {
                "fan_out": [{"step": "score"}, {"step": "score", "data": 1, "fan_out": []}],
                "join": "join",
            },
            "branch 1 has unknown keys ['fan_out']",
        ),
        (
            {"map": {"step": "score", "items": [1], "data": 2}, "join": "join"},
            "map: it has unknown keys ['data']",
        ),
        ({"map": {"step": "score", "items": [1]}, "join": "join", "tolerate": -1}, "tolerate"),
        (
            {"map": {"step": "score", "items": list(range(MAX_BRANCHES + 1))}, "join": "join"},
            f"at most {MAX_BRANCHES}",
        ),
        (
            {"map": {"step": "score", "items": [1]}, "join": "join", "next_step": "join"},
            "'next_step'",
        ),
    ],
)
async def test_a_fan_out_that_cannot_run_fails_its_step_naming_what_is_wrong(
    tmp_path: Path, result: dict[str, Any], named: str
) -> None:
    driver = Driver(tmp_path / "bad.db")
    await driver.open()
    try:
        await driver.start()
        await driver.answer("split", **result)
        wf = await driver.workflow()
        assert wf.status == "failed" and wf.error is not None
        assert wf.error["type"] == INVALID_FAN_OUT and named in wf.error["message"]
    finally:
        await driver.close()


async def test_a_join_input_over_the_message_limit_fails_with_payload_error(
    driver: Driver,
) -> None:
    await driver.start()
    await driver.answer("split", **mapping([1, 2]))
    half = "x" * (MAX_PAYLOAD_BYTES // 2 + 10)
    await driver.answer(data=half)
    await driver.answer(data=half)
    wf = await driver.workflow()
    assert wf.status == "failed" and wf.error is not None and wf.error["type"] == "PayloadError"
    work = await driver.request(type="retry", workflow_id="w1")
    [(_, _, ok, error)] = work.replies
    assert not ok and "over the message limit" in error["message"]


# -- the pure machine: any order of outcomes, duplicates and stale ones, reloads ----------


def _through_a_row(workflow: Workflow) -> Workflow:
    """The workflow as the store gives it back: a reload between two transitions."""
    from hms_mgmt.store.rows import workflow_of, workflow_row

    return workflow_of(workflow_row(workflow))


def _fanned(count: int, **more: Any) -> tuple[Workflow, StepRun, list[Any]]:
    t = machine.start(GRANT, "w1", {}, 1.0)
    assert t.workflow is not None
    outcome = Outcome("w1", 1, "succeeded", result=mapping(list(range(count)), **more))
    t = machine.apply_outcome(t.workflow, t.runs[-1], GRANT, outcome, 2.0)
    assert t.workflow is not None
    return t.workflow, t.runs[-1], t.steps


@given(data=st.data(), count=st.integers(1, 8), limit=st.integers(1, 8), reload=st.booleans())
@settings(max_examples=150, deadline=None)
def test_any_order_of_outcomes_with_duplicates_and_stale_ones_joins_once_in_item_order(
    data: st.DataObject, count: int, limit: int, reload: bool
) -> None:
    wf, run, out = _fanned(count, max_concurrency=limit)
    out = list(out)
    done: list[Any] = []  # answered: told again, they are duplicates
    joins: list[Any] = []
    now = 10.0
    while out or (done and not joins):
        assert len(out) <= limit
        pick = data.draw(
            st.sampled_from(["next", "duplicate", "stale"]) if done else st.just("next")
        )
        if pick == "next" and out:
            step = out.pop(data.draw(st.integers(0, len(out) - 1)))
            seq, index = step.seq, step.payload
            done.append((seq, index))
        elif pick == "stale":
            seq, index = 999, -1  # no run of this workflow
        elif done:
            seq, index = data.draw(st.sampled_from(done))
        else:
            continue
        outcome = Outcome("w1", seq, "succeeded", result={"data": index * 10})
        now += 1
        t = machine.apply_outcome(wf, run, GRANT, outcome, now)
        for step in t.steps:
            (joins if step.step == "join" else out).append(step)
        if t.workflow is not None:
            wf = _through_a_row(t.workflow) if reload else t.workflow
            run = next((r for r in t.runs if r.seq == wf.seq), run)
        if joins and not out:
            break
    [join] = joins
    assert join.payload == {"results": [i * 10 for i in range(count)], "errors": []}


@given(data=st.data(), count=st.integers(2, 7), tolerate=st.integers(0, 3))
@settings(max_examples=150, deadline=None)
def test_tolerate_and_a_retry_that_runs_only_the_failed_branches(
    data: st.DataObject, count: int, tolerate: int
) -> None:
    wf, run, out = _fanned(count, tolerate=tolerate)
    failing = set(data.draw(st.lists(st.integers(0, count - 1), min_size=1, unique=True)))
    order = data.draw(st.permutations(out))
    joins, gave_up = [], 0
    now = 10.0
    for step in order:
        index = step.payload
        outcome = (
            Outcome("w1", step.seq, "failed", error={"type": "E", "message": str(index)})
            if index in failing
            else Outcome("w1", step.seq, "succeeded", result={"data": index})
        )
        now += 1
        t = machine.apply_outcome(wf, run, GRANT, outcome, now)
        joins += [s for s in t.steps if s.step == "join"]
        gave_up += sum(kind == "workflow_failed" for kind, _ in t.history)
        if t.workflow is not None:
            wf = _through_a_row(t.workflow)
            run = next((r for r in t.runs if r.seq == wf.seq), run)
    if len(failing) <= tolerate:
        [join] = joins
        assert [e["index"] for e in join.payload["errors"]] == sorted(failing)
        assert join.payload["results"] == [None if i in failing else i for i in range(count)]
        return
    assert not joins and gave_up == 1 and wf.status == "failed"
    assert wf.branches is not None
    statuses = {i: e["status"] for i, e in enumerate(wf.branches["branches"])}
    again = {i for i, status in statuses.items() if status in ("failed", "cancelled")}
    t = machine.retry(wf, run, GRANT, 100.0)
    assert sorted(s.payload for s in t.steps) == sorted(again)
    assert again >= {i for i in failing if statuses[i] == "failed"}


async def test_a_failed_fan_out_compensates_what_succeeded_before_it(driver: Driver) -> None:
    await driver.start("saga")
    await driver.answer("hold", data="held")
    await driver.answer("split", **mapping([1, 2]))
    await driver.answer("score", fail=True)
    wf = await driver.workflow()
    assert wf.status == "compensating" and wf.timer_kind == machine.TIMER_COMPENSATE
    await driver.batch([TimerEvent("w1", machine.TIMER_COMPENSATE)])
    release = driver.taken("release")
    assert release["context"]["compensating"]["step"] == "hold"
    await driver.report(release, data="released")
    await driver.batch([TimerEvent("w1", machine.TIMER_COMPENSATE)])
    assert (await driver.workflow()).status == "compensated"


async def test_a_parallel_element_runs_its_steps_as_branches_joined_by_the_next(
    driver: Driver,
) -> None:
    await driver.start("static")
    await driver.answer("validate", data={"app": 7})
    assert sorted(item["step"] for item in driver.out) == ["backgroundCheck", "creditCheck"]
    assert all(item["payload"] == {"app": 7} for item in driver.out)
    await driver.answer("backgroundCheck", fail=True)  # tolerated
    await driver.answer("creditCheck", data="ok")
    join = driver.taken("schedule")
    assert join["payload"]["results"] == ["ok", None]
    assert [e["step"] for e in join["payload"]["errors"]] == ["backgroundCheck"]


async def test_a_parallel_element_first_fans_out_at_the_start(driver: Driver) -> None:
    await driver.request(type="start", workflow="staticFirst", workflow_id="w1", payload={"x": 1})
    assert [item["step"] for item in driver.out] == ["a"]  # max_concurrency=1
    await driver.answer("a", data=1)
    await driver.answer("b", data=2)
    assert driver.taken("join")["payload"] == {"results": [1, 2], "errors": []}


def test_a_parallel_element_survives_the_definitions_json_and_is_checked() -> None:
    again = WorkflowDefinition.from_json(STATIC.to_json(), version=1)
    assert again == STATIC
    assert [s.name for s in again.parallel_at("creditCheck") or []] == [
        "creditCheck",
        "backgroundCheck",
    ]
    with pytest.raises(DefinitionError, match="a step must follow it"):
        WorkflowDefinition.build("w", ["a", Parallel("b", "c")])
    with pytest.raises(DefinitionError, match="needs at least one step"):
        Parallel()
    with pytest.raises(DefinitionError, match="tolerate"):
        Parallel("a", tolerate=-1)
    with pytest.raises(DefinitionError, match="twice"):
        WorkflowDefinition.build("w", [Parallel("a", "b"), "a"])
    # A definition's JSON comes from the bus: a forged group is refused as Parallel() is.
    group = {"group": "a", "tolerate": 0, "max_concurrency": None}
    for forged, message in (
        ({"tolerate": "x"}, "tolerate of Parallel group 'a' of workflow 'w' must be a whole"),
        ({"tolerate": -3}, "tolerate of Parallel group 'a' .* >= 0, not -3"),
        ({"max_concurrency": 0}, "max_concurrency of Parallel group 'a' .* >= 1, not 0"),
        ({"max_concurrency": True}, "max_concurrency .* not True"),
        ({"group": "zzz"}, "group 'zzz' of workflow 'w' starts with step 'a'"),
    ):
        steps = [
            {"name": "a", "parallel": {**group, **forged}},
            {"name": "b", "parallel": {**group, **forged}},
            {"name": "j"},
        ]
        body = {**WorkflowDefinition.build("w", ["a", "b", "j"]).to_json(), "steps": steps}
        for step in steps:
            step.update(retry=None, timeout=None)
        with pytest.raises(DefinitionError, match=message):
            WorkflowDefinition.from_json(body, version=1)
    steps = [
        {"name": "a", "retry": None, "timeout": None, "parallel": group},
        {"name": "b", "retry": None, "timeout": None, "parallel": {**group, "tolerate": 5}},
        {"name": "j", "retry": None, "timeout": None},
    ]
    body = {**WorkflowDefinition.build("w", ["a", "b", "j"]).to_json(), "steps": steps}
    with pytest.raises(DefinitionError, match=r"step 'b' of Parallel group 'a' .* of its own"):
        WorkflowDefinition.from_json(body, version=1)
    # A group inside a group is refused as such, not as a step named "<Parallel object at 0x…>".
    with pytest.raises(DefinitionError, match=r"Parallel\('a', Parallel\('b', 'c'\)\) holds "):
        Parallel("a", Parallel("b", "c"))  # type: ignore[arg-type]


FLAKY = WorkflowDefinition.build(
    "flaky",
    [
        "split",
        Step("score", retry=RetryPolicy(max_attempts=2, initial_delay=1.0, jitter=False)),
        "join",
    ],
).with_version(1)
ACTIONS = ("succeed", "succeed", "fail", "duplicate", "stale", "timer", "pause")


@given(
    data=st.data(),
    count=st.integers(0, 6),
    limit=st.integers(1, 4),
    tolerate=st.integers(0, 2),
    reload=st.booleans(),
)
@settings(max_examples=200, deadline=None)
def test_any_interleaving_of_outcomes_retries_timers_and_pauses_joins_at_most_once(
    data: st.DataObject, count: int, limit: int, tolerate: int, reload: bool
) -> None:
    """Outcomes (failures retried after a backoff), duplicates, stale ones, the branch
    timer and pauses in any order, the workflow reloaded from its row between transitions:
    never more than ``max_concurrency`` branches out, never a join twice, and in the end
    either one join with the results in item order or ``BranchesFailed``."""
    t = machine.start(FLAKY, "w1", {}, 1.0)
    assert t.workflow is not None
    wf, run = t.workflow, t.runs[-1]
    out: dict[int, Any] = {}
    answered: list[int] = []
    joins: list[Any] = []
    now = 2.0

    def apply(t: machine.Transition) -> None:
        nonlocal wf, run
        for step in t.steps:
            if step.step == "join":
                joins.append(step)
            else:
                assert step.seq not in out and step.seq not in answered  # published once
                out[step.seq] = step
        if t.workflow is not None:
            wf = _through_a_row(t.workflow) if reload else t.workflow
            run = next((r for r in t.runs if r.seq == wf.seq), run)
        group = wf.branches
        if group is not None:
            busy = [
                e for e in group["branches"] if e["status"] in ("pending", "running", "scheduled")
            ]
            assert group["state"] != "open" or len(busy) <= limit
        assert len(joins) <= 1

    def report(seq: int, ok: bool) -> None:
        nonlocal now
        now += 1
        outcome = (
            Outcome("w1", seq, "succeeded", result={"data": out_payload.get(seq, -1) * 10})
            if ok
            else Outcome("w1", seq, "failed", error={"type": "E", "message": "no"})
        )
        apply(machine.apply_outcome(wf, run, FLAKY, outcome, now))

    out_payload: dict[int, int] = {}
    result = mapping(list(range(count)), max_concurrency=limit, tolerate=tolerate)
    apply(machine.apply_outcome(wf, run, FLAKY, Outcome("w1", 1, "succeeded", result=result), now))
    for _ in range(data.draw(st.integers(0, 40))):
        if wf.terminal or joins:
            break
        for seq, step in out.items():
            out_payload[seq] = step.payload
        action = data.draw(st.sampled_from(ACTIONS))
        if action in ("succeed", "fail") and out:
            seq = data.draw(st.sampled_from(sorted(out)))
            out.pop(seq)
            answered.append(seq)
            report(seq, action == "succeed")
        elif action == "duplicate" and answered:
            report(data.draw(st.sampled_from(answered)), True)
        elif action == "stale":
            report(999, True)
        elif action == "timer" and wf.timer_kind == machine.TIMER_BRANCH and wf.timer_at:
            now = max(now, wf.timer_at)
            apply(machine.fire_timer(wf, run, FLAKY, machine.TIMER_BRANCH, now))
        elif action == "pause" and not wf.terminal:
            now += 1
            if wf.status == "paused":
                apply(machine.resume(wf, run, FLAKY, now))
            else:
                apply(machine.pause(wf, run, None, now))
    # drain: resume, then every branch succeeds and every timer fires
    for _ in range(100):
        if wf.terminal or joins:
            break
        for seq, step in out.items():
            out_payload[seq] = step.payload
        if wf.status == "paused":
            now += 1
            apply(machine.resume(wf, run, FLAKY, now))
        elif out:
            seq = min(out)
            out.pop(seq)
            answered.append(seq)
            report(seq, True)
        elif wf.timer_kind == machine.TIMER_BRANCH and wf.timer_at:
            now = max(now, wf.timer_at)
            apply(machine.fire_timer(wf, run, FLAKY, machine.TIMER_BRANCH, now))
        else:
            raise AssertionError(f"stuck: {wf.status} {wf.branches}")
    group = wf.branches
    assert group is not None
    gave_up = [i for i, e in enumerate(group["branches"]) if e["status"] == "failed"]
    if wf.status == "failed":
        assert wf.error is not None and wf.error["type"] == BRANCHES_FAILED
        assert len(gave_up) > tolerate and not joins
        return
    [join] = joins
    assert len(gave_up) <= tolerate
    assert join.payload["results"] == [None if i in gave_up else i * 10 for i in range(count)]
    assert [e["index"] for e in join.payload["errors"]] == gave_up


async def test_a_running_branch_does_not_hold_up_the_compensations(driver: Driver) -> None:
    await driver.start("saga")
    await driver.answer("hold", data="held")
    await driver.answer("split", **mapping([1, 2]))
    first, second = driver.taken(), driver.taken()
    await driver.batch([OutcomeEvent(Outcome("w1", second["seq"], "started", step="score"))])
    await driver.report(first, fail=True)  # the second, started, runs on
    await driver.batch([TimerEvent("w1", machine.TIMER_COMPENSATE)])
    release = driver.taken("release")
    await driver.report(second, data="late")  # recorded, ignored
    await driver.report(release, data="released")
    await driver.batch([TimerEvent("w1", machine.TIMER_COMPENSATE)])
    wf = await driver.workflow()
    assert wf.status == "compensated"
    assert wf.branches is not None and wf.branches["branches"][1]["output"] == "late"
