"""Child workflows on the engine's stages, without a bus: load, apply, follow-ups, commit.

A small driver runs the engine's batch (the loading stage, the pure machine through the
apply stage, the follow-ups, one commit) on a real SQLite file, and plays the step services
by answering the step messages the batches put in the outbox. ``reload`` drops everything
in memory after every batch, as an engine killed and started again would (everything must
be derivable from the store).
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
from hms_mgmt.definitions import RetryPolicy, Step, WorkflowDefinition
from hms_mgmt.engine.apply import Applier
from hms_mgmt.engine.cache import InFlight
from hms_mgmt.engine.engine import follow_up
from hms_mgmt.engine.events import Event, OutcomeEvent, RequestEvent
from hms_mgmt.engine.loading import Loader
from hms_mgmt.engine.registry import Registry
from hms_mgmt.engine.work import Work
from hms_mgmt.records import Workflow, WorkflowState
from hms_mgmt.store.sqlite import SQLiteStore
from hms_mgmt.tokens import Signer
from hms_mgmt.wire.outcomes import Outcome
from hms_mgmt.wire.requests import parse_request

ONCE = RetryPolicy(max_attempts=1)
GRANT = WorkflowDefinition.build("grant", ["validate", "inspect", "finalize"]).with_version(1)
GRANT_ON_ERROR = WorkflowDefinition.build(
    "grantSafe", [Step("validate", retry=ONCE), "inspect", "finalize"], on_error="apologise"
).with_version(1)
INSPECTION = WorkflowDefinition.build(
    "inspection", ["visit", Step("report", retry=ONCE)]
).with_version(1)
NESTED = WorkflowDefinition.build("region", ["split", "gather"]).with_version(1)
TREE = WorkflowDefinition.build("tree", [Step("spawn", retry=ONCE), "done"]).with_version(1)


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
        for definition in (GRANT, GRANT_ON_ERROR, INSPECTION, NESTED, TREE):
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
        self.out += [json.loads(r.body) for r in work.batch.outbox if r.exchange == "hms.steps"]
        if self.reload:  # a crash after the commit: nothing in memory survives
            await self.close()
            await self.open()
        return work

    async def request(self, **fields: Any) -> Work:
        self.requests += 1
        request = parse_request({"request_id": f"r{self.requests}", **fields}, reply_to="c")
        return await self.batch([RequestEvent(request)])

    def message(self, workflow_id: str, step: str | None = None) -> dict[str, Any]:
        for item in self.out:
            if item["workflow_id"] == workflow_id and (step is None or item["step"] == step):
                return item
        raise AssertionError(f"no step message for {workflow_id} {step}: {self.out}")

    async def answer(
        self, workflow_id: str, step: str | None = None, *, fail: bool = False, **result: Any
    ) -> Work:
        item = self.message(workflow_id, step)
        self.out.remove(item)
        outcome = (
            Outcome(workflow_id, item["seq"], "failed", step=item["step"],
                    error={"type": "RuntimeError", "message": "boom"})
            if fail
            else Outcome(workflow_id, item["seq"], "succeeded", step=item["step"],
                         result=result or {"data": {"from": item["step"]}})
        )  # fmt: skip
        return await self.batch([OutcomeEvent(outcome)])

    async def workflow(self, workflow_id: str) -> Workflow:
        return (await self.store.load([workflow_id]))[workflow_id][0]

    async def state(self, workflow_id: str) -> WorkflowState:
        found = await self.store.workflow_with_runs(workflow_id)
        assert found is not None
        return WorkflowState.of(*found)


@pytest.fixture(params=[False, True], ids=["in-memory", "reloaded-after-every-batch"])
async def driver(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    d = Driver(tmp_path / "children.db", reload=request.param)
    await d.open()
    yield d
    await d.close()


INSPECT = {"child": {"workflow": "inspection", "data": {"site": "S-1"}}, "next_step": "finalize"}


async def test_a_child_starts_with_the_step_and_its_end_resumes_the_parent_in_one_commit(
    driver: Driver,
) -> None:
    await driver.request(type="start", workflow_id="p1", workflow="grant", payload={"a": 1})
    await driver.answer("p1", "validate")
    work = await driver.answer("p1", "inspect", **INSPECT)
    child = "p1.inspect.1.0"
    assert set(work.batch.workflows) == {"p1", child}  # one commit: the outcome and the start
    parent = await driver.workflow("p1")
    assert parent.status == "waiting" and parent.wait is not None
    assert parent.wait["children"] == [child]
    waiting = await driver.state("p1")
    assert "child workflow p1.inspect.1.0" in waiting.describe()
    assert waiting.children == [
        {
            "workflow_id": child,
            "workflow": "inspection",
            "status": None,
            "parent_close": "terminate",
        }
    ]
    shown = show(waiting.to_json(), now=driver.now)
    assert "for child workflow p1.inspect.1.0" in shown and f"{child} -" in shown
    child_state = await driver.state(child)
    assert child_state.parent is not None and child_state.parent["id"] == "p1"
    assert "parent    p1 (step inspect)" in show(child_state.to_json(), now=driver.now)
    started = await driver.workflow(child)
    assert started.parent is not None and started.parent["id"] == "p1"
    assert driver.message(child, "visit")["payload"] == {"site": "S-1"}
    await driver.answer(child, "visit")
    assert (await driver.workflow("p1")).status == "waiting"
    work = await driver.answer(child, "report", data={"passed": True})
    assert set(work.batch.workflows) == {"p1", child}  # the child's end and the resume
    assert (await driver.state("p1")).children[0]["status"] == "succeeded"
    assert (await driver.workflow(child)).status == "succeeded"
    assert (await driver.workflow("p1")).status == "running"
    assert driver.message("p1", "finalize")["payload"] == {"passed": True}
    await driver.answer("p1", "finalize")
    state = await driver.state("p1")
    assert state.status == "succeeded"
    assert [s.step for s in state.steps] == ["validate", "inspect", "finalize"]  # ran once each


async def test_a_list_of_children_resumes_the_parent_once_with_their_outputs_in_order(
    driver: Driver,
) -> None:
    await driver.request(type="start", workflow_id="p1", workflow="grant", payload={})
    await driver.answer("p1", "validate")
    children = [{"workflow": "inspection", "data": {"site": i}} for i in range(3)]
    await driver.answer("p1", "inspect", child=children, next_step="finalize")
    ids = [f"p1.inspect.1.{i}" for i in range(3)]
    for child in ids:
        await driver.answer(child, "visit")
    for child in reversed(ids):  # they end out of order
        assert (await driver.workflow("p1")).status == "waiting"
        await driver.answer(child, "report", data={"site": child})
    assert driver.message("p1", "finalize")["payload"] == [{"site": c} for c in ids]
    history = [e.kind for e in await driver.store.history("p1")]
    assert history.count("resumed") == 1 and history.count("step_published") == 3


async def test_a_repeated_start_of_a_child_starts_nothing(driver: Driver) -> None:
    await driver.request(type="start", workflow_id="p1", workflow="grant", payload={})
    await driver.answer("p1", "validate")
    item = driver.message("p1", "inspect")
    await driver.answer("p1", "inspect", **INSPECT)
    child = "p1.inspect.1.0"
    await driver.answer(child, "visit")
    before = await driver.state(child)
    # The same outcome again (a redelivery): stale, it changes nothing.
    again = Outcome("p1", item["seq"], "succeeded", step="inspect", result=INSPECT)
    await driver.batch([OutcomeEvent(again)])
    # And the child's start itself again (as a crash-and-replay would): nothing.
    parent = (await driver.workflow(child)).parent
    assert parent is not None
    start = machine.StartChild(child, "inspection", {"site": "S-1"}, parent, None, 3)
    work = await driver.batch([])  # an empty batch, then the follow-up on its own
    work = Work()
    await driver.loader.load_more([child], work)
    driver.applier.apply(start, work, driver.now)
    assert work.batch.workflows == {} and work.batch.runs == {}
    assert [kind for _, _, kind, _ in work.batch.history] == ["child_start_ignored"]
    after = await driver.state(child)
    assert after.steps == before.steps and after.status == before.status == "running"


async def test_a_failed_child_fails_the_parents_step_with_child_failed_not_retried(
    driver: Driver,
) -> None:
    await driver.request(type="start", workflow_id="p1", workflow="grant", payload={})
    await driver.answer("p1", "validate")
    await driver.answer("p1", "inspect", **INSPECT)
    child = "p1.inspect.1.0"
    await driver.answer(child, "visit")
    await driver.answer(child, "report", fail=True)  # one attempt: the child fails
    assert (await driver.workflow(child)).status == "failed"
    parent = await driver.state("p1")
    assert parent.status == "failed" and parent.error is not None
    assert parent.error["type"] == "ChildFailed" and parent.error["child"] == child
    assert parent.error["child_error"]["message"] == "boom"
    assert parent.error["step"] == "inspect"
    assert [s.step for s in parent.steps] == ["validate", "inspect"]  # not retried
    assert not [m for m in driver.out if m["workflow_id"] == "p1"]


async def test_a_failed_child_takes_the_parent_to_its_error_step(driver: Driver) -> None:
    await driver.request(type="start", workflow_id="p1", workflow="grantSafe", payload={})
    await driver.answer("p1", "validate")
    await driver.answer("p1", "inspect", **INSPECT)
    child = "p1.inspect.1.0"
    await driver.answer(child, "visit")
    await driver.answer(child, "report", fail=True)
    error_step = driver.message("p1", "apologise")
    assert error_step["context"]["error"]["type"] == "ChildFailed"
    assert (await driver.workflow("p1")).status == "running"


async def test_retrying_the_parent_retries_the_failed_child_from_its_failed_step(
    driver: Driver,
) -> None:
    await driver.request(type="start", workflow_id="p1", workflow="grant", payload={})
    await driver.answer("p1", "validate")
    await driver.answer("p1", "inspect", **INSPECT)
    child = "p1.inspect.1.0"
    await driver.answer(child, "visit")
    await driver.answer(child, "report", fail=True)
    work = await driver.request(type="retry", workflow_id="p1")
    assert work.replies[0][2] is True, work.replies
    assert set(work.batch.workflows) == {"p1", child}  # both in the retry's commit
    assert (await driver.workflow("p1")).status == "waiting"
    assert [m["step"] for m in driver.out] == ["report"]  # not visit again
    await driver.answer(child, "report", data={"passed": True})
    assert driver.message("p1", "finalize")["payload"] == {"passed": True}
    steps = [(s.step, s.status) for s in (await driver.state(child)).steps]
    assert steps == [("visit", "succeeded"), ("report", "failed"), ("report", "succeeded")]
    assert [s.step for s in (await driver.state("p1")).steps] == [
        "validate",
        "inspect",
        "finalize",
    ]


async def test_a_sibling_that_ends_after_a_failure_is_kept_for_the_retry(driver: Driver) -> None:
    await driver.request(type="start", workflow_id="p1", workflow="grant", payload={})
    await driver.answer("p1", "validate")
    children = [{"workflow": "inspection", "data": {"site": i}} for i in range(2)]
    await driver.answer("p1", "inspect", child=children)
    first, second = "p1.inspect.1.0", "p1.inspect.1.1"
    await driver.answer(first, "visit")
    await driver.answer(second, "visit")
    await driver.answer(first, "report", fail=True)
    assert (await driver.workflow("p1")).status == "failed"
    await driver.answer(second, "report", data={"site": 1})  # ends after its parent failed
    await driver.request(type="retry", workflow_id="p1")
    await driver.answer(first, "report", data={"site": 0})
    # no next_step: the step after inspect, in order
    assert driver.message("p1", "finalize")["payload"] == [{"site": 0}, {"site": 1}]


async def test_cancelling_the_parent_cancels_its_children_but_the_abandoned(
    driver: Driver,
) -> None:
    await driver.request(type="start", workflow_id="p1", workflow="grant", payload={})
    await driver.answer("p1", "validate")
    children = [
        {"workflow": "inspection", "data": {}},
        {"workflow": "inspection", "data": {}, "parent_close": "abandon"},
    ]
    await driver.answer("p1", "inspect", child=children, next_step="finalize")
    kept, left = "p1.inspect.1.0", "p1.inspect.1.1"
    work = await driver.request(type="cancel", workflow_id="p1", reason="withdrawn")
    assert set(work.batch.workflows) == {"p1", kept}  # one commit
    assert (await driver.workflow("p1")).status == "cancelled"
    cancelled = await driver.workflow(kept)
    assert cancelled.status == "cancelled" and cancelled.error is not None
    assert "parent p1 cancelled: withdrawn" in cancelled.error["message"]
    assert (await driver.workflow(left)).status == "pending"
    await driver.answer(left, "visit")
    await driver.answer(left, "report")  # the abandoned child ends on its own
    assert (await driver.workflow(left)).status == "succeeded"
    assert (await driver.workflow("p1")).status == "cancelled"
    assert not [m for m in driver.out if m["workflow_id"] == "p1"]


async def test_a_cancel_cascades_through_grandchildren(driver: Driver) -> None:
    await driver.request(type="start", workflow_id="p1", workflow="region", payload={})
    await driver.answer("p1", "split", child={"workflow": "grant", "data": {}})
    child = "p1.split.1.0"
    await driver.answer(child, "validate")
    await driver.answer(child, "inspect", **INSPECT)
    grandchild = f"{child}.inspect.1.0"
    assert (await driver.workflow(grandchild)).status == "pending"
    await driver.request(type="cancel", workflow_id="p1")
    for workflow_id in ("p1", child, grandchild):
        assert (await driver.workflow(workflow_id)).status == "cancelled"


async def test_a_grandchilds_end_resumes_its_parent_and_grandparent_in_one_commit(
    driver: Driver,
) -> None:
    await driver.request(type="start", workflow_id="p1", workflow="region", payload={})
    await driver.answer("p1", "split", child={"workflow": "grant", "data": {}})
    child = "p1.split.1.0"
    await driver.answer(child, "validate")
    await driver.answer(child, "inspect", child={"workflow": "inspection", "data": {}},
                        complete=None, next_step=None)  # fmt: skip
    grandchild = f"{child}.inspect.1.0"
    await driver.answer(grandchild, "visit")
    await driver.answer(grandchild, "report", data={"ok": 1})
    await driver.answer(child, "finalize", data={"region": "done"})  # the child ends...
    assert driver.message("p1", "gather")["payload"] == {"region": "done"}  # ...p1 resumes


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (
            {"child": {"workflow": "nope", "data": {}}},
            "child workflow 'nope', which is not defined",
        ),
        ({"child": {"workflow": "inspection"}, "next_step": "nope"}, "next_step 'nope'"),
        (
            {"child": {"workflow": "inspection"}, "wait_for": "x"},
            "returned both 'child' and 'wait_for'; a step that starts children waits for them",
        ),
    ],
)
async def test_children_that_cannot_start_fail_the_step_naming_what_is_wrong(
    tmp_path: Path, result: dict[str, Any], message: str
) -> None:
    driver = Driver(tmp_path / "bad.db")
    await driver.open()
    try:
        await driver.request(type="start", workflow_id="p1", workflow="grant", payload={})
        await driver.answer("p1", "validate")
        await driver.answer("p1", "inspect", **result)
        state = await driver.state("p1")
        assert state.status == "failed" and state.error is not None
        assert message in state.error["message"], state.error
        assert state.steps[-1].attempt == 1  # not retried
        assert await driver.store.list_workflows(name="inspection") == []
    finally:
        await driver.close()


async def test_children_nest_at_most_max_depth_deep_and_the_failure_unwinds_in_one_batch(
    tmp_path: Path,
) -> None:
    """A workflow type whose step starts a child of its own type would nest forever (each
    child starting the next): the child of a workflow MAX_DEPTH deep is refused as
    ``InvalidChild``, and its failure reaches the root in the same batch."""
    from hms_mgmt.machine.children import MAX_DEPTH

    recursive = WorkflowDefinition.build(
        "recursive", [Step("spawn", retry=ONCE), "done"]
    ).with_version(1)
    driver = Driver(tmp_path / "deep.db")
    await driver.open()
    driver.applier.registry.remember(recursive)
    again = {"child": {"workflow": "recursive", "data": {}}, "next_step": "done"}
    try:
        await driver.request(type="start", workflow_id="r", workflow="recursive", payload={})
        family = ["r"]
        for depth in range(1, MAX_DEPTH + 1):
            await driver.answer(family[-1], "spawn", **again)
            family.append(machine.children.child_id(family[-1], "spawn", 1, 0))
            assert (await driver.workflow(family[-1])).parent["depth"] == depth  # type: ignore[index]
        await driver.answer(family[-1], "spawn", **again)  # one more level: refused
        deepest = await driver.state(family[-1])
        assert deepest.status == "failed" and deepest.error is not None
        assert deepest.error["type"] == "InvalidChild"
        assert f"they nest at most {MAX_DEPTH} deep" in deepest.error["message"]
        root = await driver.state("r")
        assert root.status == "failed" and root.error is not None
        assert root.error["type"] == "ChildFailed", root.error
        statuses = [(await driver.workflow(w)).status for w in family]
        assert statuses == ["failed"] * len(family)
        assert len(await driver.store.list_workflows(name="recursive", limit=1000)) == MAX_DEPTH + 1
    finally:
        await driver.close()


def _spawning(n: int) -> dict[str, Any]:
    return {"child": [{"workflow": "tree", "data": {}}] * n, "next_step": "done"}


async def test_a_family_at_its_cap_refuses_more_children_even_within_one_batch(
    driver: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A family (a root and all its descendants) holds at most MAX_FAMILY workflows: two
    steps of one family starting children in the same batch are counted together, and the
    one that would take it over the cap fails with ``InvalidChild`` naming the cap and the
    count; its failure reaches the root in that batch."""
    monkeypatch.setattr(machine.children, "MAX_FAMILY", 6)
    await driver.request(type="start", workflow_id="t", workflow="tree", payload={})
    await driver.answer("t", "spawn", **_spawning(3))  # the family: 4
    kids = [machine.children.child_id("t", "spawn", 1, i) for i in range(3)]
    assert (await driver.workflow(kids[0])).parent["root"] == "t"  # type: ignore[index]
    outcomes = []
    for kid in kids[:2]:
        item = driver.message(kid, "spawn")
        driver.out.remove(item)
        outcomes.append(
            OutcomeEvent(Outcome(kid, item["seq"], "succeeded", step="spawn", result=_spawning(2)))
        )
    work = await driver.batch(outcomes)  # 4 + 2 = 6 is the cap; 6 + 2 is over it
    first, second = await driver.state(kids[0]), await driver.state(kids[1])
    assert first.status == "waiting", first.error
    grandchild = machine.children.child_id(kids[0], "spawn", 1, 0)
    assert (await driver.workflow(grandchild)).parent["root"] == "t"  # type: ignore[index]
    assert second.status == "failed" and second.error is not None
    assert second.error["type"] == "InvalidChild"
    assert "from 6 to 8 workflows; a family holds at most 6" in second.error["message"]
    assert (await driver.state("t")).status == "failed"  # ChildFailed, in the same batch
    assert work.families == {"t": 6}
    assert len(await driver.store.list_workflows(name="tree", limit=100)) == 6
    # A grandchild's step counts the family by its root, read from the store (6 already):
    await driver.answer(grandchild, "spawn", **_spawning(1))
    refused = await driver.state(grandchild)
    assert refused.error is not None and refused.error["type"] == "InvalidChild"
    assert "from 6 to 7 workflows" in refused.error["message"]


async def test_a_family_of_max_family_workflows_refuses_one_more(tmp_path: Path) -> None:
    """The real cap: a root with MAX_FAMILY - 2 descendants stored may start one child, not
    two more; a workflow outside the family (another root's id) is not counted."""
    from hms_mgmt.machine.children import MAX_FAMILY
    from hms_mgmt.records import evolve
    from hms_mgmt.store.base import Batch

    driver = Driver(tmp_path / "big.db")
    await driver.open()
    try:
        for root in ("big", "bigger", "big-"):
            await driver.request(type="start", workflow_id=root, workflow="tree", payload={})
        model = await driver.workflow("big")
        seeded = Batch()
        for i in range(MAX_FAMILY - 2):  # descendants as stored, without their steps
            wid = f"big.seed.1.{i}"
            seeded.workflows[wid] = evolve(model, id=wid, parent={"id": "big", "root": "big"})
        await driver.store.commit(seeded)
        await driver.answer("big", "spawn", **_spawning(2))
        refused = await driver.state("big")
        assert refused.error is not None and refused.error["type"] == "InvalidChild"
        assert (
            f"from {MAX_FAMILY - 1} to {MAX_FAMILY + 1} workflows; "
            f"a family holds at most {MAX_FAMILY}" in refused.error["message"]
        )
        await driver.answer("bigger", "spawn", **_spawning(2))  # not of big's family
        assert (await driver.workflow("bigger")).status == "waiting"
    finally:
        await driver.close()


def test_every_descendant_id_starts_with_its_roots_family_prefix() -> None:
    """Long ids end in a digest; the descendants of a root still share its family prefix,
    and the family's size counts the root once."""
    children = machine.children
    for root in ("r", "p" * 78, "q" * 79, "s" * 100):
        prefix = children.family_prefix(root)
        assert not children.family_prefix("x" + root[1:]).startswith(prefix)
        wid = root
        for level in range(4):
            wid = children.child_id(wid, "spawn", 1, level)
            assert wid.startswith(prefix), (root, wid)
        assert children.family_size(root, 0 if len(root) < 79 else 1) == 1


def test_a_childs_id_is_derived_from_the_step_run_and_is_always_a_valid_id() -> None:
    from hms_mgmt.bounds import ID_PATTERN

    assert machine.children.child_id("p1", "inspect", 2, 0) == "p1.inspect.2.0"
    long = machine.children.child_id("p" * 100, "inspect", 1, 7)
    assert ID_PATTERN.fullmatch(long) and len(long) == 100
    assert long == machine.children.child_id("p" * 100, "inspect", 1, 7)
    assert long != machine.children.child_id("p" * 100, "inspect", 1, 8)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "a list of 0 children"),
        ("inspection", "expected {'workflow': name"),
        ({"workflow": "a.b"}, "not a workflow name"),
        ({"workflow": "w", "parent_close": "stay"}, "parent_close 'stay'"),
        ({"workflow": "w", "input": 1}, "unknown keys ['input']"),
    ],
)
def test_a_bad_child_shape_is_refused_by_the_step_service_and_on_the_wire(
    value: Any, message: str
) -> None:
    from hms_mgmt.errors import InvalidMessageError
    from hms_mgmt.results import normalise_result

    with pytest.raises(ValueError, match="handler h returned a bad child") as refused:
        normalise_result({"child": value}, payload=None, describe=lambda: "handler h")
    assert message in str(refused.value)
    with pytest.raises(InvalidMessageError, match="result field 'child'"):
        Outcome.from_json(
            {"workflow_id": "w", "seq": 1, "kind": "succeeded", "result": {"child": value}}
        )


async def test_a_paused_parent_records_its_child_and_moves_on_only_when_resumed(
    driver: Driver,
) -> None:
    await driver.request(type="start", workflow_id="p1", workflow="grant", payload={})
    await driver.answer("p1", "validate")
    await driver.answer("p1", "inspect", **INSPECT)
    child = "p1.inspect.1.0"
    await driver.request(type="pause", workflow_id="p1", reason="audit")
    await driver.answer(child, "visit")
    await driver.answer(child, "report", data={"passed": True})
    paused = await driver.workflow("p1")
    assert paused.status == "paused" and paused.pause is not None
    assert paused.children is not None and paused.children["done"][child]["status"] == "succeeded"
    assert not [m for m in driver.out if m["workflow_id"] == "p1"]  # its next step is held
    await driver.request(type="resume", workflow_id="p1")
    assert driver.message("p1", "finalize")["payload"] == {"passed": True}


async def test_a_reset_of_a_waiting_parent_cancels_its_children_and_starts_new_ones(
    driver: Driver,
) -> None:
    await driver.request(type="start", workflow_id="p1", workflow="grant", payload={})
    await driver.answer("p1", "validate")
    await driver.answer("p1", "inspect", **INSPECT)
    await driver.request(type="reset", workflow_id="p1", to_step="inspect")
    first = await driver.workflow("p1.inspect.1.0")
    assert first.status == "cancelled" and first.error is not None
    assert "parent p1 reset to 'inspect'" in first.error["message"]
    assert (await driver.workflow("p1")).status == "running"  # not cancelled by its child
    await driver.answer("p1", "inspect", **INSPECT)
    second = "p1.inspect.2.0"  # a new visit: new children
    await driver.answer(second, "visit")
    await driver.answer(second, "report", data={"second": True})
    assert driver.message("p1", "finalize")["payload"] == {"second": True}


# -- the pure machine: any order of the children's ends, duplicates, reloads ---------------


def _through_a_row(workflow: Workflow) -> Workflow:
    """The workflow as the store gives it back: a reload between two transitions."""
    from hms_mgmt.store.rows import workflow_of, workflow_row

    return workflow_of(workflow_row(workflow))


def _waiting_parent(count: int) -> tuple[Workflow, Any, list[str]]:
    t = machine.start(GRANT, "p1", {}, 1.0)
    assert t.workflow is not None
    wf, run = t.workflow, t.runs[-1]
    for seq, result in ((1, {"data": {}}), (2, {"child": [{"workflow": "inspection"}] * count})):
        outcome = Outcome("p1", seq, "succeeded", step=run.step, result=result)
        t = machine.apply_outcome(wf, run, GRANT, outcome, 2.0 + seq)
        assert t.workflow is not None
        wf, run = t.workflow, t.runs[-1]
    ids = [f.workflow_id for f in t.follow if isinstance(f, machine.StartChild)]
    assert wf.status == "waiting" and len(ids) == count
    return wf, run, ids


@given(data=st.data(), count=st.integers(1, 6), reload=st.booleans())
@settings(max_examples=150, deadline=None)
def test_any_order_of_ends_with_duplicates_resumes_the_parent_once_in_item_order(
    data: st.DataObject, count: int, reload: bool
) -> None:
    wf, run, ids = _waiting_parent(count)
    order = data.draw(st.permutations(range(count)))
    repeats = data.draw(st.lists(st.integers(0, count - 1), max_size=4))
    events = list(order) + repeats  # a child's end told again changes nothing more
    published: list[Any] = []
    resumed = 0
    for now, index in enumerate(events, start=10):
        told = machine.ChildFinished("p1", ids[index], run.seq, "succeeded", {"i": index}, None)
        t = machine.children.child_finished(wf, run, GRANT, told, float(now))
        resumed += sum(kind == "resumed" for kind, _ in t.history)
        published += t.steps
        if t.workflow is not None:
            wf = _through_a_row(t.workflow) if reload else t.workflow
            run = next((r for r in t.runs if r.seq == wf.seq), run)
    assert resumed == 1
    [step] = published
    assert step.step == "finalize" and step.payload == [{"i": i} for i in range(count)]


@given(data=st.data(), count=st.integers(2, 6))
@settings(max_examples=100, deadline=None)
def test_the_first_failure_fails_the_step_once_and_a_retry_asks_only_for_the_failed(
    data: st.DataObject, count: int
) -> None:
    wf, run, ids = _waiting_parent(count)
    order = data.draw(st.permutations(range(count)))
    failing = set(data.draw(st.lists(st.integers(0, count - 1), min_size=1, unique=True)))
    failures = 0
    for now, index in enumerate(order, start=10):
        status = "failed" if index in failing else "succeeded"
        error = {"type": "RuntimeError", "message": f"child {index}"} if index in failing else None
        told = machine.ChildFinished("p1", ids[index], run.seq, status, {"i": index}, error)
        t = machine.children.child_finished(wf, run, GRANT, told, float(now))
        failures += sum(kind == "child_failed" for kind, _ in t.history)
        assert not t.steps  # never resumes
        if t.workflow is not None:
            wf = _through_a_row(t.workflow)
    first = ids[next(i for i in order if i in failing)]
    assert failures == 1 and wf.status == "failed" and wf.error is not None
    assert wf.error["child"] == first
    t = machine.retry(wf, run, GRANT, 100.0)
    retried = [f.workflow_id for f in t.follow if isinstance(f, machine.RetryChild)]
    assert retried == [ids[i] for i in sorted(failing)]
    assert t.workflow is not None and t.workflow.status == "waiting"


async def test_an_error_step_cannot_start_children(driver: Driver) -> None:
    await driver.request(type="start", workflow_id="p1", workflow="grantSafe", payload={})
    await driver.answer("p1", "validate", fail=True)  # one attempt, then the error step
    await driver.answer("p1", "apologise", **INSPECT)
    state = await driver.state("p1")
    assert state.status == "failed" and state.error is not None
    assert "an error step cannot start child workflows" in state.error["error_path"]["message"]


def test_step_result_child_makes_the_result_and_refuses_a_bad_one() -> None:
    from hms_mgmt import StepResult

    one = StepResult.child("inspection", {"site": 1}, next_step="finalize")
    assert one.to_result() == {
        "child": {"workflow": "inspection", "data": {"site": 1}},
        "next_step": "finalize",
    }
    left = StepResult.child("inspection", parent_close="abandon").to_result()
    assert left["child"]["parent_close"] == "abandon"
    many = StepResult.child([{"workflow": "a"}, {"workflow": "b", "data": 2}]).to_result()
    assert many == {"child": [{"workflow": "a"}, {"workflow": "b", "data": 2}]}
    with pytest.raises(ValueError, match=r"StepResult\.child: .*parent_close 'stay'"):
        StepResult.child("inspection", parent_close="stay")
    with pytest.raises(ValueError, match="a list of 0 children"):
        StepResult.child([])
