"""The grant approval workflow of the seed, shared by the service, the submitter and the demo."""

from __future__ import annotations

import hms_mgmt

WORKFLOW = "grantApproval"
STEPS = ["validateApp", "creditCheck", "scheduleInspection", "finalize"]


def define(mgmt: hms_mgmt.Management) -> None:
    mgmt.define_workflow(WORKFLOW, STEPS)


def sample_application(number: int) -> dict[str, object]:
    return {
        "application_id": f"A-{number}",
        "applicant_data": {"name": f"Applicant {number}", "ssn_last4": f"{number % 10000:04d}"},
        "amount": 25_000 + number,
    }
