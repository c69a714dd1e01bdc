"""The step service the chaos suite runs, killed and restarted at will.

Every handler run appends one line, ``<workflow_id> <seq> <attempt>``, to the file
named by ``HMS_CHAOS_EXEC_LOG`` (one ``write`` on an ``O_APPEND`` file: lines never
interleave), so the suite can count handler executions beyond one.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import hms_mgmt
from hms_mgmt import RetryPolicy, Step

GRANT = ["validateApp", "creditCheck", "scheduleInspection", "finalize"]

chaos = hms_mgmt.init(service_name="chaos-service", concurrency=50)
chaos.define_workflow(
    "grant", GRANT, retry=RetryPolicy(max_attempts=5, initial_delay=0.2, max_delay=1.0)
)
chaos.define_workflow(
    "poison", ["swallow", "after"], retry=RetryPolicy(max_attempts=2, initial_delay=0.1)
)


def record(ctx: hms_mgmt.StepContext) -> None:
    path = os.environ.get("HMS_CHAOS_EXEC_LOG")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{ctx.workflow_id} {ctx.seq} {ctx.attempt}\n".encode())
        finally:
            os.close(fd)


def _grant_step(name: str) -> Any:
    async def handler(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
        record(ctx)
        pause = ctx.payload.get("sleep", 0)
        if pause:
            await asyncio.sleep(pause)
        return {"data": {**ctx.payload, name: ctx.attempt}}

    handler.__qualname__ = name
    return handler


for _step in GRANT:
    chaos.on_step(f"grant.{_step}", _grant_step(_step))


@chaos.on_step("poison.swallow")
async def swallow(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    record(ctx)
    if ctx.payload.get("poison"):
        os._exit(1)  # kills its worker on every delivery
    return {"data": ctx.payload}


@chaos.on_step("poison.after")
async def after(ctx: hms_mgmt.StepContext) -> None:
    record(ctx)


# A first attempt that hangs for ever: the step's timeout must cancel it in the worker,
# freeing its slot for the retry.
chaos.define_workflow(
    "hang",
    [Step("stall", timeout=1.0, retry=RetryPolicy(max_attempts=3, initial_delay=0.1)), "after"],
)


@chaos.on_step("hang.stall")
async def stall(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    record(ctx)
    if ctx.attempt == 1:
        await asyncio.Event().wait()
    return {"data": ctx.payload}


@chaos.on_step("hang.after")
async def after_stall(ctx: hms_mgmt.StepContext) -> None:
    record(ctx)


# A handler that blocks the event loop (time.sleep in async def): reported, not silent.
chaos.define_workflow("hog", ["block"])


@chaos.on_step("hog.block")
async def block(ctx: hms_mgmt.StepContext) -> None:
    record(ctx)
    time.sleep(float(ctx.payload.get("block", 0)))  # noqa: ASYNC251 - the point of the case


# A saga whose last step always fails: its three compensations run newest first, each once
# (the chaos case kills the engine in the middle of the chains).
SAGA = ["creditHold", "reserveFunds", "bookInspection", "payout"]
SAGA_UNDO = {
    "creditHold": "releaseHold",
    "reserveFunds": "releaseFunds",
    "bookInspection": "cancelInspection",
}
chaos.define_workflow(
    "saga",
    [Step(step, compensate=SAGA_UNDO.get(step)) for step in SAGA],
    retry=RetryPolicy(max_attempts=2, initial_delay=0.1, max_delay=0.5),
)


def _saga_step(name: str) -> Any:
    async def handler(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
        record(ctx)
        await asyncio.sleep(ctx.payload.get("sleep", 0))
        if name == "payout":
            raise RuntimeError("the payout bounced")
        return {"data": {**ctx.payload, name: ctx.attempt}}

    handler.__qualname__ = f"saga_{name}"
    return handler


for _step in [*SAGA, *SAGA_UNDO.values()]:
    chaos.on_step(f"saga.{_step}", _saga_step(_step))
# A parent whose step starts three grant workflows as children, then closes with their
# outputs: the engine killed while children finish must resume each parent once.
chaos.define_workflow("family", ["open", "spawn", "close"])


@chaos.on_step("family.open")
async def open_family(ctx: hms_mgmt.StepContext) -> None:
    record(ctx)


@chaos.on_step("family.spawn")
async def spawn(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    record(ctx)
    children = [{"workflow": "grant", "data": {**ctx.payload, "child": i}} for i in range(3)]
    return {"child": children, "next_step": "close"}


@chaos.on_step("family.close")
async def close_family(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    record(ctx)
    return {"data": {"children": [output["child"] for output in ctx.payload]}}


# A step with a concurrency limit: each run notes how many of its step's runs this step
# service had inside at once as it came in (one process, so the count is exact).
LIMIT = 3
chaos.define_workflow("limited", ["admit", Step("inspect", concurrency=LIMIT), "close"])
_inside = 0


@chaos.on_step("limited.admit")
async def limited_admit(ctx: hms_mgmt.StepContext) -> None:
    record(ctx)


@chaos.on_step("limited.inspect")
async def limited_inspect(ctx: hms_mgmt.StepContext) -> None:
    # {"inside": path, "sleep": s}: a line per run, the count of runs inside with it
    global _inside
    record(ctx)
    _inside += 1
    try:
        fd = os.open(ctx.payload["inside"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{_inside}\n".encode())
        finally:
            os.close(fd)
        await asyncio.sleep(float(ctx.payload.get("sleep", 0)))
    finally:
        _inside -= 1


@chaos.on_step("limited.close")
async def limited_close(ctx: hms_mgmt.StepContext) -> None:
    record(ctx)


# A map of six scores, three out at once, then a join: the engine killed between branch
# outcomes and the join must join each workflow once, with the results in item order.
chaos.define_workflow("fanned", ["split", "score", "join"])


@chaos.on_step("fanned.split")
async def split(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    record(ctx)
    items = [{"i": i} for i in range(6)]
    return {"map": {"step": "score", "items": items}, "join": "join", "max_concurrency": 3}


@chaos.on_step("fanned.score")
async def score(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    record(ctx)
    await asyncio.sleep(0.1 + 0.1 * (ctx.payload["i"] % 3))  # long enough to kill amid
    return {"data": ctx.payload["i"] * 10}


@chaos.on_step("fanned.join")
async def join(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    record(ctx)
    return {"data": ctx.payload["results"]}


# A type whose step starts a child of its own type, for ever: the engine refuses the one
# past its depth bound (InvalidChild), and each level above fails in turn (ChildFailed).
chaos.define_workflow("runaway", ["spawn", "close"])


@chaos.on_step("runaway.spawn")
async def runaway_spawn(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    record(ctx)
    return {"child": {"workflow": "runaway", "data": ctx.payload}, "next_step": "close"}


@chaos.on_step("runaway.close")
async def runaway_close(ctx: hms_mgmt.StepContext) -> None:
    record(ctx)
