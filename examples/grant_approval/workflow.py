"""The grant approval workflow of the seed, shared by the service, the submitter and the demo."""

from __future__ import annotations

import asyncio

import hms_mgmt
from hms_mgmt import Parallel, Step

WORKFLOW = "grantApproval"
# The credit and background checks run at once (scheduleInspection joins them). The credit
# check places a hold on the applicant's credit line; if the grant then gives up (the
# payout in finalize fails), the engine runs releaseCreditHold to undo it.
STEPS: list[str | Step | Parallel] = [
    "validateApp",
    Parallel(Step("creditCheck", compensate="releaseCreditHold"), "backgroundCheck"),
    "scheduleInspection",
    "finalize",
]
INSPECTION = "siteInspection"  # a child workflow of scheduleInspection
INSPECTION_STEPS = ["bookInspection", "recordReport"]


def define(mgmt: hms_mgmt.Management) -> None:
    mgmt.define_workflow(WORKFLOW, STEPS)
    mgmt.define_workflow(INSPECTION, INSPECTION_STEPS)


def inspection_of(workflow_id: str) -> str:
    """The id of a grant's site inspection: derived from the step that starts it."""
    return f"{workflow_id}.scheduleInspection.1.0"


def sample_application(number: int) -> dict[str, object]:
    return {
        "application_id": f"A-{number}",
        "applicant_data": {"name": f"Applicant {number}", "ssn_last4": f"{number % 10000:04d}"},
        "amount": 25_000 + number,
    }


async def inspect(mgmt: hms_mgmt.Management, workflow_id: str, timeout: float = 30) -> None:
    """Play the inspector: once the grant waits for its site inspection (a child workflow),
    send the report to the inspection, which waits for it."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        state = await mgmt.status(workflow_id)
        if state.status == "waiting":  # its inspection has started, in the same commit
            break
        if state.terminal or asyncio.get_running_loop().time() > deadline:
            raise RuntimeError(
                f"workflow {workflow_id} never waited for its inspection: {state.status}"
            )
        await asyncio.sleep(0.05)
    report = {"passed": True, "inspector": "R. Diaz"}
    await mgmt.signal(inspection_of(workflow_id), "inspectionReport", report)
