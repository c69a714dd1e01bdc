"""The engine's apply stage on its own: events in, pending writes, replies and timers out.

No bus, no store: the work is filled as the loading stage would fill it.
"""

from __future__ import annotations

import json
from typing import Any

from bus_adapters.base import Delivery
from hms_mgmt import machine
from hms_mgmt.definitions import WorkflowDefinition
from hms_mgmt.engine.apply import Applier
from hms_mgmt.engine.events import OutcomeEvent, Received, RequestEvent, TimerEvent
from hms_mgmt.engine.registry import Registry
from hms_mgmt.engine.work import Work
from hms_mgmt.records import StepStatus
from hms_mgmt.tokens import Signer
from hms_mgmt.wire.outcomes import Outcome
from hms_mgmt.wire.requests import parse_request

GRANT = WorkflowDefinition.build("grant", ["validate", "check"]).with_version(1)
SIGNER = Signer(b"s" * 32)


def applier() -> Applier:
    registry = Registry(bus=None, store=None)  # type: ignore[arg-type]  # apply does no I/O
    registry.remember(GRANT)
    return Applier(registry, {}, SIGNER)


def request(**fields: Any) -> RequestEvent:
    return RequestEvent(parse_request({"request_id": "r1", **fields}, reply_to="client-1"))


def delivery() -> Delivery:
    async def nothing(*_: Any) -> None:
        return None

    return Delivery(
        b"", "hms.engine.results", "", "", {}, "m1", None, None, None, False, nothing, nothing
    )


def test_a_start_makes_a_workflow_its_first_run_and_a_signed_step_message() -> None:
    work = Work()
    applier().apply(
        request(type="start", workflow_id="wf", workflow="grant", payload={"a": 1}), work, 10.0
    )
    assert work.batch.workflows["wf"].status == "pending"
    assert [(r.step, r.status) for r in work.batch.runs.values()] == [("validate", "pending")]
    [row] = work.batch.outbox
    item = json.loads(row.body)
    assert (row.routing_key, item["payload"]) == ("grant.validate", {"a": 1})
    assert SIGNER.valid("wf", 1, 1, item["token"])
    assert work.replies == [("client-1", "r1", True, {"workflow_id": "wf", "existing": False})]
    assert work.started == 1 and work.logs == []


def test_an_outcome_moves_a_loaded_workflow_on_and_a_stale_one_changes_nothing() -> None:
    start = machine.start(GRANT, "wf", {}, 10.0)
    assert start.workflow is not None
    work = Work(state={"wf": (start.workflow, start.runs[-1])})
    done = Outcome("wf", 1, "succeeded", step="validate", attempt=1, result={"data": {"ok": 1}})
    applier().apply(OutcomeEvent(done), work, 11.0)
    assert work.state["wf"][1] is not None and work.state["wf"][1].step == "check"
    assert work.batch.runs[("wf", 1)].status == StepStatus.SUCCEEDED
    again = Work(state=dict(work.state))
    applier().apply(OutcomeEvent(done), again, 12.0)  # a duplicate: its run is not current
    assert not again.batch.workflows and not again.batch.outbox
    assert [event for _, _, event, _ in again.batch.history] == ["outcome_ignored"]
    assert again.logs[0][1] == "outcome ignored"  # logged only once the batch commits


def test_an_outcome_for_an_unknown_workflow_is_refused_with_its_message() -> None:
    source = Received(delivery(), key="outcomes")
    work = Work()
    applier().apply(OutcomeEvent(Outcome("ghost", 1, "started"), source), work, 1.0)
    [(item, reason)] = source.refused
    assert item["workflow_id"] == "ghost" and "unknown workflow 'ghost'" in reason
    assert not work.batch


def test_a_cancel_is_answered_once_and_a_repeat_gets_the_same_answer() -> None:
    start = machine.start(GRANT, "wf", {}, 10.0)
    assert start.workflow is not None
    work = Work(state={"wf": (start.workflow, start.runs[-1])})
    applier().apply(request(type="cancel", workflow_id="wf"), work, 11.0)
    assert work.batch.workflows["wf"].status == "cancelled"
    assert work.batch.requests == [
        ("r1", [True, {"workflow_id": "wf", "status": "cancelled"}], 11.0)
    ]
    repeat = Work(state=dict(work.state), answered={"r1": (True, {"workflow_id": "wf"})})
    applier().apply(request(type="cancel", workflow_id="wf"), repeat, 12.0)
    assert not repeat.batch.workflows
    assert repeat.replies == [("client-1", "r1", True, {"workflow_id": "wf"})]


def test_a_bad_event_is_refused_alone() -> None:
    work = Work()
    applier().apply(request(type="start", workflow_id="wf", workflow="nope"), work, 1.0)
    applier().apply(TimerEvent("not-loaded", machine.TIMER_RUN), work, 1.0)
    [(_, _, ok, error)] = work.replies
    assert not ok and error["type"] == "UnknownWorkflowError"
    assert work.batch.requests and work.answered["r1"][0] is False  # a retry gets the same
