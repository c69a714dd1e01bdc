"""The grant step service: a handler per step of the grant (its credit and background
checks run at once) and of its site inspection, and one that releases a credit hold.

Run it with ``python -m hms_mgmt.worker examples.grant_approval.service:mgmt``
(from the repository root), beside ``python -m hms_mgmt.engine``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import hms_mgmt
from examples.grant_approval.workflow import INSPECTION, WORKFLOW, define

INSPECTION_DEADLINE = 14 * 24 * 3600  # no report in two weeks: the workflow fails

mgmt = hms_mgmt.init(service_name="GrantWorkflow")
define(mgmt)


@mgmt.on_step(f"{WORKFLOW}.validateApp")
async def validate_app(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    application = dict(ctx.payload)
    if not application.get("application_id"):
        raise hms_mgmt.NonRetryableError("application has no application_id")
    application["validated"] = True
    return {"next_step": "creditCheck", "data": application}


@mgmt.on_step(f"{WORKFLOW}.creditCheck")
async def credit_check(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    # A real service would call a credit bureau here and place a hold on the applicant's
    # credit line for the amount, keyed by ctx.idempotency_key.
    hold = f"H-{ctx.payload['application_id']}"
    return {"data": {**ctx.payload, "credit_score": 750, "credit_hold": hold}}


@mgmt.on_step(f"{WORKFLOW}.backgroundCheck")
async def background_check(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    # Runs at the same time as creditCheck, with the same payload (a Parallel group).
    return {"data": {"background_clear": True}}


@mgmt.on_step(f"{WORKFLOW}.releaseCreditHold")
async def release_credit_hold(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    # The compensation of creditCheck: runs when the grant gives up after the hold was
    # placed. ctx.compensating["output"] is what creditCheck returned.
    hold = (ctx.compensating or {}).get("output", {}).get("credit_hold")
    return {"data": {"released": hold}}


@mgmt.on_step(f"{WORKFLOW}.scheduleInspection")
async def schedule_inspection(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    # The join of the two checks: ctx.payload is {"results": [credit, background], "errors"}.
    # The site inspection is a workflow of its own (its id: <grant id>.scheduleInspection.1.0),
    # with its own steps and history; the grant waits for it, and finalize gets its output.
    credit, background = ctx.payload["results"]
    checked = {**credit, **background}
    return {"child": {"workflow": INSPECTION, "data": checked}, "next_step": "finalize"}


@mgmt.on_step(f"{INSPECTION}.bookInspection")
async def book_inspection(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    # Book the visit for later, then wait (holding no worker, message or memory) for the
    # inspector's report: ``signal(inspection_id, "inspectionReport", report)``.
    booked = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0).isoformat()
    return {
        "wait_for": "inspectionReport",
        "timeout": INSPECTION_DEADLINE,
        "next_step": "recordReport",
        "data": {**ctx.payload, "inspection_booked_for": booked},
    }


@mgmt.on_step(f"{INSPECTION}.recordReport")
async def record_report(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    return {"data": {**ctx.payload, "inspection_report": ctx.signal or {}}}


@mgmt.on_step(f"{WORKFLOW}.finalize")
async def finalize(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    report = ctx.payload.get("inspection_report") or {}
    approved = ctx.payload.get("credit_score", 0) >= 700 and bool(report.get("passed"))
    if approved and ctx.payload.get("payout_account") == "closed":  # the bank says no
        raise hms_mgmt.NonRetryableError("payout refused: the applicant's account is closed")
    return {"data": {**ctx.payload, "approved": approved}}
