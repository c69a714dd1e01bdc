"""Business keys (attributes): their bounds, and where the pure core takes them."""

from __future__ import annotations

from typing import Any

import pytest

from hms_mgmt import StepResult, machine
from hms_mgmt.bounds import MAX_ATTRIBUTE_VALUE, MAX_ATTRIBUTES, check_attributes
from hms_mgmt.definitions import WorkflowDefinition
from hms_mgmt.errors import InvalidMessageError
from hms_mgmt.records import WorkflowState
from hms_mgmt.results import normalise_result
from hms_mgmt.wire.outcomes import Outcome

DEFINITION = WorkflowDefinition.build("w", ["a", "b"]).with_version(1)


@pytest.mark.parametrize(
    "good",
    [
        {},
        {"application_id": "A-17"},
        {"_x": "v", "a-b_9": "y" * MAX_ATTRIBUTE_VALUE, "k" * 64: "élan"},
        {f"k{i}": "v" for i in range(MAX_ATTRIBUTES)},
    ],
)
def test_good_attributes_pass(good: dict[str, str]) -> None:
    assert check_attributes(good) == good


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (None, "must be a dict of strings to strings, not None"),
        ([("a", "b")], "must be a dict"),
        ({"a.b": "v"}, "key 'a.b' is not a valid key: keys are 1-64 letters"),
        ({"-a": "v"}, "key '-a' is not a valid key"),
        ({"9a": "v"}, "key '9a'"),
        ({"": "v"}, "key '' is not a valid key"),
        ({"k" * 65: "v"}, "is not a valid key"),
        ({1: "v"}, "key 1 is not a valid key"),
        ({"k": 1}, "value 1 of key 'k' must be a string of 1-200 printable characters"),
        ({"k": ""}, "value '' of key 'k'"),
        ({"k": "x" * 201}, "of key 'k' must be a string of 1-200"),
        ({"k": "a\nb"}, r"value 'a\\nb' of key 'k'"),
        ({f"k{i}": "v" for i in range(21)}, "has 21 keys; at most 20 are allowed"),
    ],
)
def test_bad_attributes_are_refused_naming_the_key_or_value(bad: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_attributes(bad)


def test_a_handler_result_carries_attributes_checked() -> None:
    def describe() -> str:
        return "handler h"

    result = normalise_result({"data": 1, "attributes": {"k": "v"}}, payload=0, describe=describe)
    assert result == {"data": 1, "attributes": {"k": "v"}}
    with pytest.raises(ValueError, match=r"handler h returned bad attributes: .*'k k'"):
        normalise_result({"data": 1, "attributes": {"k k": "v"}}, payload=0, describe=describe)
    assert StepResult(1, attributes={"k": "v"}).to_result() == {
        "data": 1,
        "attributes": {"k": "v"},
    }
    assert StepResult.complete(2, attributes={"k": "v"}).to_result()["attributes"] == {"k": "v"}
    assert StepResult.wait_for("go", attributes={"k": "v"}).to_result()["attributes"] == {"k": "v"}
    assert "attributes" not in StepResult(1).to_result()
    with pytest.raises(ValueError, match=r"StepResult attributes key 'a\.b'"):
        StepResult(1, attributes={"a.b": "v"})


def test_an_outcome_with_bad_attributes_is_refused() -> None:
    item = {"workflow_id": "wf", "seq": 1, "kind": "succeeded", "result": {"data": 1}}
    assert Outcome.from_json({**item, "result": {"attributes": {"k": "v"}}}).result == {
        "attributes": {"k": "v"}
    }
    with pytest.raises(InvalidMessageError, match="result field 'attributes' value 3"):
        Outcome.from_json({**item, "result": {"attributes": {"k": 3}}})


def test_the_machine_sets_attributes_at_start_and_on_an_applied_success_only() -> None:
    t = machine.start(DEFINITION, "wf", {}, 1.0, attributes={"application_id": "A-17"})
    assert t.attributes == {"application_id": "A-17"}
    assert t.workflow is not None
    workflow, run = t.workflow, t.runs[0]
    result = {"data": 1, "attributes": {"region": "north"}}
    late = Outcome("wf", run.seq + 5, "succeeded", step="a", attempt=1, result=result)
    assert machine.apply_outcome(workflow, run, DEFINITION, late, 2.0).attributes == {}
    bad_jump = Outcome(
        "wf", run.seq, "succeeded", step="a", attempt=1, result={**result, "next_step": "zz"}
    )
    assert machine.apply_outcome(workflow, run, DEFINITION, bad_jump, 2.0).attributes == {}
    done = Outcome("wf", run.seq, "succeeded", step="a", attempt=1, result=result)
    applied = machine.apply_outcome(workflow, run, DEFINITION, done, 2.0)
    assert applied.attributes == {"region": "north"}
    assert applied.runs[0].output == 1  # the keys are not part of the step's output


def test_a_state_shows_its_attributes_and_reads_back_without_them() -> None:
    t = machine.start(DEFINITION, "wf", {}, 1.0)
    assert t.workflow is not None
    state = WorkflowState.of(t.workflow, t.runs, attributes={"k": "v"})
    assert state.attributes == {"k": "v"} and "attributes: k=v" in state.describe()
    assert WorkflowState.from_json(state.to_json()) == state
    older = state.to_json()
    del older["attributes"]  # from an engine before business keys
    assert WorkflowState.from_json(older).attributes == {}
