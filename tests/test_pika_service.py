"""The grant step service in plain pika (examples/pika_service) serves a grant end to end."""

from __future__ import annotations

import pytest

import hms_mgmt
from tests.conftest import ROOT, Processes, wait_until

pytestmark = pytest.mark.broker

SERVICE = ROOT / "examples" / "pika_service"


def test_the_pika_service_imports_nothing_of_hms_mgmt() -> None:
    for path in SERVICE.glob("*.py"):
        code = path.read_text()
        assert "import hms_mgmt" not in code and "from hms_mgmt" not in code, path
        assert "bus_adapters" not in code, path


async def test_a_grant_served_by_the_pika_service_succeeds(
    client: hms_mgmt.Management, processes: Processes, vhost: str, store_url: str
) -> None:
    engine = processes.engine(vhost, store_url)
    await wait_until(
        lambda: '"engine started"' in processes.log("engine"), timeout=30, what="the engine"
    )
    service = processes.spawn("pika", ["-m", "examples.pika_service"], {"HMS_BROKER_URL": vhost})
    await wait_until(
        lambda: "serving simpleGrant." in processes.log("pika") or service.poll() is not None,
        timeout=30,
        what="the pika service",
    )
    assert service.poll() is None, processes.log("pika")
    assert "defined simpleGrant version" in processes.log("pika")

    application = {"application_id": "A-17", "applicant_data": {"name": "Ada"}, "amount": 25_000}
    started = await client.start("simpleGrant", application)

    async def waiting() -> bool:
        return (await client.status(started.workflow_id)).status == "waiting"

    await wait_until(waiting, timeout=30, what="the wait for the inspection report")
    await client.signal(started.workflow_id, "inspectionReport", {"passed": True})
    state = await client.wait(started.workflow_id, timeout=30)
    assert state.status == "succeeded", state.describe()
    assert [(s.step, s.attempt, s.status) for s in state.steps] == [
        ("validateApp", 1, "succeeded"),
        ("creditCheck", 1, "succeeded"),
        ("scheduleInspection", 1, "succeeded"),
        ("finalize", 1, "succeeded"),
    ]
    output = state.output
    assert output["approved"] is True and output["credit_score"] == 750
    assert output["validated"] is True and output["inspection_report"] == {"passed": True}
    for run in state.steps:  # the times the service sent, not the engine's receipt
        assert run.started_at is not None and run.finished_at is not None
        assert run.started_at <= run.finished_at
    # An application without an id fails at once: the service says not to retry.
    refused = await client.start("simpleGrant", {"amount": 1})
    state = await client.wait(refused.workflow_id, timeout=30)
    assert state.status == "failed"
    [run] = state.steps
    assert run.error is not None and run.error["type"] == "NonRetryable"
    assert state.error is not None and state.error["reason"] == "not retryable"

    assert Processes.stop(service) == 0, processes.log("pika")
    assert "stopped after 5 steps" in processes.log("pika")
    assert engine.poll() is None
