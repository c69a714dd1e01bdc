"""Step services the broker tests run as separate processes (``python -m hms_mgmt.worker``)."""

from __future__ import annotations

import asyncio
from typing import Any

import hms_mgmt

GRANT = ["validateApp", "creditCheck", "scheduleInspection", "finalize"]

grant = hms_mgmt.init(service_name="test-grant-service")  # broker from HMS_BROKER_URL
grant.define_workflow("grantApproval", GRANT)
grant.define_workflow("badNext", ["first", "second"])


def _step(name: str) -> Any:
    async def handler(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
        return {"data": {**ctx.payload, name: ctx.attempt}}

    handler.__qualname__ = name
    return handler


for _name in GRANT:
    grant.on_step(f"grantApproval.{_name}", _step(_name))


@grant.on_step("badNext.first")
async def jump_nowhere(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    return {"next_step": "payOut", "data": ctx.payload}


@grant.on_step("badNext.second")
async def second(ctx: hms_mgmt.StepContext) -> None:
    return None


grant.define_workflow("slow", ["nap", "after"])


@grant.on_step("slow.nap")
async def nap(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    await asyncio.sleep(float(ctx.payload.get("seconds", 1.5)))
    return {"data": ctx.payload}


@grant.on_step("slow.after")
async def after(ctx: hms_mgmt.StepContext) -> None:
    return None
