"""The benchmark's step service: four trivial handlers, each copies the payload and adds a key."""

from __future__ import annotations

from typing import Any

import hms_mgmt

STEPS = ["validateApp", "creditCheck", "scheduleInspection", "finalize"]

service = hms_mgmt.init(service_name="bench-grant-service")  # broker from HMS_BROKER_URL
service.define_workflow("grantApproval", STEPS)


def _handler(step: str) -> Any:
    async def handler(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
        data = dict(ctx.payload)
        data[step] = "ok"
        return {"data": data}

    handler.__qualname__ = step
    return handler


for _step in STEPS:
    service.on_step(f"grantApproval.{_step}", _handler(_step))


def payload(number: int) -> dict[str, Any]:
    """About 200 bytes of JSON, like the peers' payload."""
    return {
        "wf": f"wf-{number}",
        "applicant": {"name": "Jane Q. Example", "id": "APP-0042-7731"},
        "program": "home-repair-grant",
        "amount": 12500,
        "currency": "EUR",
        "counter": "bench",
        "expect": number,
        "done": "bench-done",
    }


# A 10-way fan-out: split maps ten checks, the join gathers them (12 steps a workflow).
FANOUT_STEPS = ["split", "check", "join"]
FANOUT_WIDTH = 10
service.define_workflow("fanned", FANOUT_STEPS)


@service.on_step("fanned.split")
async def split(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    items = [{"part": i} for i in range(FANOUT_WIDTH)]
    return {"map": {"step": "check", "items": items}, "join": "join"}


@service.on_step("fanned.check")
async def check(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    return {"data": {**ctx.payload, "check": "ok"}}


@service.on_step("fanned.join")
async def join(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    return {"data": {"checked": len(ctx.payload["results"])}}
