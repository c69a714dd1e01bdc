"""The grant approval workflow of the seed, shared by the service, the submitter and the demo."""

from __future__ import annotations

import asyncio

import hms_mgmt
from hms_mgmt import Step

WORKFLOW = "grantApproval"
# The credit check places a hold on the applicant's credit line; if the grant then gives up
# (the payout in finalize fails), the engine runs releaseCreditHold to undo it.
STEPS: list[str | Step] = [
    "validateApp",
    Step("creditCheck", compensate="releaseCreditHold"),
    "scheduleInspection",
    "finalize",
]


def define(mgmt: hms_mgmt.Management) -> None:
    mgmt.define_workflow(WORKFLOW, STEPS)


def sample_application(number: int) -> dict[str, object]:
    return {
        "application_id": f"A-{number}",
        "applicant_data": {"name": f"Applicant {number}", "ssn_last4": f"{number % 10000:04d}"},
        "amount": 25_000 + number,
    }


async def inspect(mgmt: hms_mgmt.Management, workflow_id: str, timeout: float = 30) -> None:
    """Play the inspector: once the workflow waits for the report, send it."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        state = await mgmt.status(workflow_id)
        if state.status == "waiting":
            break
        if state.terminal or asyncio.get_running_loop().time() > deadline:
            raise RuntimeError(
                f"workflow {workflow_id} never waited for its inspection: {state.status}"
            )
        await asyncio.sleep(0.05)
    await mgmt.signal(workflow_id, "inspectionReport", {"passed": True, "inspector": "R. Diaz"})
