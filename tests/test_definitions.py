from __future__ import annotations

import math
from typing import Any

import pytest

import hms_mgmt
from hms_mgmt.definitions import RetryPolicy, Step, WorkflowDefinition, split_topic
from hms_mgmt.errors import DefinitionError

GRANT = ["validateApp", "creditCheck", "scheduleInspection", "finalize"]


def test_define_workflow_keeps_the_order() -> None:
    mgmt = hms_mgmt.init(service_name="t", broker_url="memory://unused")
    definition = mgmt.define_workflow("grantApproval", GRANT)
    assert definition.step_names == GRANT
    assert definition.next_after("creditCheck") == "scheduleInspection"
    assert definition.next_after("finalize") is None


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([], "has no steps"),
        (["a", "b", "a"], "names step 'a' twice"),
        (["a.b"], "invalid step name 'a.b'"),
        (["ok", "bad*"], r"invalid step name 'bad\*'"),
        ("validateApp", "must be a list"),
    ],
)
def test_bad_definitions_fail_at_once(steps: list[str], message: str) -> None:
    mgmt = hms_mgmt.init(service_name="t", broker_url="memory://unused")
    with pytest.raises(DefinitionError, match=message):
        mgmt.define_workflow("grantApproval", steps)


def test_workflow_names_refuse_routing_characters() -> None:
    for name in ("grant.approval", "grant#", "grant*", ""):
        with pytest.raises(DefinitionError):
            WorkflowDefinition.build(name, ["a"])


def test_on_step_checks_the_step_against_a_local_definition() -> None:
    mgmt = hms_mgmt.init(service_name="t", broker_url="memory://unused")
    mgmt.define_workflow("grantApproval", GRANT)

    @mgmt.on_step("grantApproval.validateApp")
    async def validate(ctx: hms_mgmt.StepContext) -> None:
        return None

    assert mgmt.handlers["grantApproval.validateApp"] is validate
    with pytest.raises(DefinitionError, match="has no step 'nope'"):
        mgmt.on_step("grantApproval.nope", validate)
    with pytest.raises(DefinitionError, match=r"expected '<workflow>\.<step>'"):
        mgmt.on_step("grantApproval", validate)


def test_split_topic() -> None:
    assert split_topic("grantApproval.creditCheck") == ("grantApproval", "creditCheck")


def test_retry_policy_backoff_is_bounded_and_jittered() -> None:
    policy = RetryPolicy(max_attempts=5, initial_delay=1.0, backoff=2.0, max_delay=5.0)
    assert policy.delay_after(1, 0.999) <= 1.0
    assert policy.delay_after(1, 0.0) == 0.5
    assert policy.delay_after(3, 0.999) <= 4.0
    assert policy.delay_after(10, 0.999) <= 5.0
    exact = RetryPolicy(initial_delay=1.0, backoff=3.0, jitter=False)
    assert [exact.delay_after(n, 0.3) for n in (1, 2, 3)] == [1.0, 3.0, 9.0]


def test_retry_policy_validates() -> None:
    with pytest.raises(DefinitionError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(DefinitionError):
        RetryPolicy(backoff=0.5)
    policy = RetryPolicy(non_retryable=[KeyError, "PermissionError"])
    assert policy.is_non_retryable(["builtins.KeyError", "builtins.LookupError"])
    assert policy.is_non_retryable(["builtins.PermissionError"])
    assert not policy.is_non_retryable(["builtins.ValueError"])


def test_definitions_round_trip_as_json() -> None:
    definition = WorkflowDefinition.build(
        "grantApproval",
        ["validateApp", Step("creditCheck", retry=RetryPolicy(max_attempts=5), timeout=30)],
        retry=RetryPolicy(max_attempts=2),
        on_error="notifyApplicant",
    )
    again = WorkflowDefinition.from_json(definition.to_json(), version=3)
    assert again.to_json() == definition.to_json()
    assert again.version == 3
    assert again.policy_for("creditCheck").max_attempts == 5
    assert again.policy_for("validateApp").max_attempts == 2
    assert again.timeout_for("creditCheck") == 30
    assert again.step("notifyApplicant") is not None
    assert again.next_after("notifyApplicant") is None


def test_error_step_may_not_also_be_an_ordinary_step() -> None:
    with pytest.raises(DefinitionError, match="also an ordinary step"):
        WorkflowDefinition.build("w", ["a", "b"], on_error="b")


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda: RetryPolicy(initial_delay=math.inf), "initial_delay must be seconds"),
        (lambda: RetryPolicy(max_delay=1e308), "max_delay must be seconds"),
        (lambda: RetryPolicy(max_delay=math.nan), "max_delay must be seconds"),
        (lambda: RetryPolicy(backoff=math.inf), "backoff must be a finite number"),
        (lambda: RetryPolicy(backoff=math.nan), "backoff must be a finite number"),
        (lambda: Step("a", timeout=math.inf), "timeout of step 'a' must be seconds"),
        (lambda: Step("a", timeout=0), "timeout of step 'a' must be > 0"),
    ],
)
def test_retry_delays_and_timeouts_are_finite_and_bounded(make: Any, named: str) -> None:
    with pytest.raises(DefinitionError, match=named):
        make()


def test_backoff_past_what_a_float_holds_stays_at_max_delay() -> None:
    policy = RetryPolicy(max_attempts=5000, initial_delay=1, backoff=10, max_delay=60, jitter=False)
    assert policy.delay_after(4000, 0.5) == 60.0  # 10.0 ** 3999 overflows a float
    assert RetryPolicy(initial_delay=0, backoff=10, jitter=False).delay_after(4000, 0.5) == 0.0


async def test_a_workflow_of_a_definition_left_out_at_start_up_can_be_cancelled(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the engine's stages: a stored definition that no longer passes the checks is left
    out at start-up. Its workflows can be cancelled (without compensation): the run
    cancelled, nothing published; any other verb is refused saying why (left out, the
    check that failed) and what to do. A fixed definition gets the next version, never the
    left-out one's number."""
    from hms_mgmt import machine
    from hms_mgmt.definitions import UnloadableDefinition
    from hms_mgmt.engine import registry as registry_module
    from hms_mgmt.engine.apply import Applier
    from hms_mgmt.engine.cache import InFlight
    from hms_mgmt.engine.events import RequestEvent
    from hms_mgmt.engine.loading import Loader
    from hms_mgmt.engine.registry import Registry
    from hms_mgmt.engine.work import Work
    from hms_mgmt.store.base import Batch
    from hms_mgmt.store.sqlite import SQLiteStore
    from hms_mgmt.tokens import Signer
    from hms_mgmt.wire.requests import parse_request

    tiny = WorkflowDefinition.build("tiny", [Step("a", concurrency=1), "b"]).with_version(1)
    store = SQLiteStore(f"sqlite:///{tmp_path / 'left.db'}")
    await store.open()
    try:
        started = Batch()
        for wid in ("t1", "t2"):
            t = machine.start(tiny, wid, {}, 1.0)
            assert t.workflow is not None
            started.workflows[wid] = t.workflow
            started.runs.update({(r.workflow_id, r.seq): r for r in t.runs})
        await store.commit(started)
        problem = "step 'a': rate_limit '1e-300/s' is too slow"

        class Stored:  # what the store gives at start-up: tiny v1 no longer passes
            async def definitions(self) -> list[Any]:
                return [UnloadableDefinition("tiny", 1, problem)]

            async def save_definition(self, definition: WorkflowDefinition, now: float) -> None:
                await store.save_definition(definition, now)

        registry = Registry(bus=None, store=Stored())  # type: ignore[arg-type]
        await registry.load()
        assert registry.versions == {} and ("tiny", 1) in registry.left_out
        loader = Loader(store, InFlight(), registry, {})
        applier = Applier(registry, {}, Signer(b"s" * 32))

        async def send(n: int, **fields: Any) -> Work:
            request = parse_request({"request_id": f"q{n}", **fields}, reply_to="c")
            work = Work()
            await loader.load([RequestEvent(request)], work, 2.0 + n)
            applier.apply(RequestEvent(request), work, 2.0 + n)
            await store.commit(work.batch)
            return work

        work = await send(1, type="cancel", workflow_id="t1", reason="left out")
        assert [r[2:] for r in work.replies] == [
            (True, {"workflow_id": "t1", "status": "cancelled"})
        ]
        assert work.batch.outbox == []  # nothing published
        found = await store.workflow_with_runs("t1")
        assert found is not None
        assert found[0].status == "cancelled"
        assert [r.status for r in found[1]] == ["cancelled"]
        assert applier.slots.of == {} and (work.slots is None or work.slots.of == {})

        for n, fields in enumerate(
            [
                {"type": "cancel", "workflow_id": "t2", "compensate": True},
                {"type": "pause", "workflow_id": "t2"},
                {"type": "reset", "workflow_id": "t2", "to_step": "a"},
                {"type": "signal", "workflow_id": "t2", "signal": "go"},
            ],
            start=2,
        ):
            work = await send(n, **fields)
            ((_, _, ok, error),) = work.replies
            assert not ok, fields
            message = error["message"]
            assert "'tiny' version 1 was left out at start-up" in message, message
            assert problem in message and "hms workflow cancel t2" in message
        assert (await store.load(["t2"]))["t2"][0].status == "pending"

        async def declared(*args: Any, **kwargs: Any) -> None:
            return None

        monkeypatch.setattr(registry_module, "declare_workflow", declared)
        fixed = WorkflowDefinition.build("tiny", ["a", "b"])
        assert await registry.define(fixed, 9.0) == {"name": "tiny", "version": 2}
        stored = await store.definitions()
        assert [(d.name, d.version) for d in stored] == [("tiny", 2)]  # v1 was never stored
    finally:
        await store.close()
