"""``execute``: start a workflow and wait for its end in one round trip, through the real broker."""

from __future__ import annotations

from typing import Any

import pytest

import hms_mgmt
from tests.conftest import Processes


async def test_execute_returns_the_finished_workflow_in_one_message(
    client: hms_mgmt.Management, daemons: Processes, monkeypatch: pytest.MonkeyPatch
) -> None:
    await client.start("grantApproval", {"warm": True})  # connected, definitions sent
    sent: list[list[bytes]] = []
    requests = client._client
    assert requests is not None
    send = requests._outgoing._send  # the coalescer's sender: one call per message

    async def recording(batch: list[Any]) -> None:
        sent.append([item.body for item in batch])
        await send(batch)

    monkeypatch.setattr(requests._outgoing, "_send", recording)
    state = await client.execute("grantApproval", {"applicant": "Ada", "amount": 5000}, timeout=30)
    assert state.status == "succeeded"
    assert state.input == {"applicant": "Ada", "amount": 5000}
    assert state.steps[0].step == "validateApp"
    first = sent[0]
    assert len(first) == 2 and b'"start"' in first[0] and b'"wait"' in first[1], sent


async def test_execute_with_a_used_idempotency_key_waits_for_the_first_workflow(
    client: hms_mgmt.Management, daemons: Processes
) -> None:
    first = await client.start("grantApproval", {"n": 1}, idempotency_key="form-17")
    state = await client.execute("grantApproval", {"n": 2}, idempotency_key="form-17", timeout=30)
    assert state.workflow_id == first.workflow_id and state.input == {"n": 1}


async def test_execute_refuses_an_unknown_workflow_with_the_start_error(
    client: hms_mgmt.Management, daemons: Processes
) -> None:
    with pytest.raises(hms_mgmt.HmsError, match="noSuchWorkflow"):
        await client.execute("noSuchWorkflow", {}, timeout=20)


async def test_execute_times_out_naming_the_workflow_which_goes_on(
    client: hms_mgmt.Management, daemons: Processes
) -> None:
    with pytest.raises(hms_mgmt.WorkflowTimeoutError) as timed_out:
        await client.execute("slow", {}, timeout=0.5)
    assert isinstance(timed_out.value, TimeoutError)  # as before
    workflow_id = timed_out.value.workflow_id
    assert workflow_id in str(timed_out.value)
    assert (await client.wait(workflow_id, timeout=30)).status == "succeeded"
