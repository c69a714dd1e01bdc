"""Step services the broker tests run as separate processes (``python -m hms_mgmt.worker``)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import hms_mgmt
from hms_mgmt import RetryPolicy, Step

GRANT = ["validateApp", "creditCheck", "scheduleInspection", "finalize"]

grant = hms_mgmt.init(service_name="test-grant-service")  # broker from HMS_BROKER_URL
grant.define_workflow("grantApproval", GRANT)
grant.define_workflow("badNext", ["first", "second"])


def _step(name: str) -> Any:
    async def handler(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
        # {"fail_once": "creditCheck"} fails that step's first attempt; "fail_always", every one.
        if ctx.payload.get("fail_always") == name or (
            ctx.payload.get("fail_once") == name and ctx.attempt == 1
        ):
            raise RuntimeError(f"{name} is unavailable (attempt {ctx.attempt})")
        result: dict[str, Any] = {"data": {**ctx.payload, name: ctx.attempt}}
        if ctx.payload.get("tag") == name:  # {"tag": "creditCheck"}: that step adds a key
            result["attributes"] = {"checked_by": name}
        return result

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


grant.define_workflow("traced", ["look"])


@grant.on_step("traced.look")
async def look(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    from opentelemetry import trace

    span = trace.get_current_span().get_span_context()
    return {"data": {"traceparent": ctx.traceparent, "span_trace_id": f"{span.trace_id:032x}"}}


grant.define_workflow("slow", ["nap", "after"])


@grant.on_step("slow.nap")
async def nap(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    await asyncio.sleep(float(ctx.payload.get("seconds", 1.5)))
    return {"data": ctx.payload}


@grant.on_step("slow.after")
async def after(ctx: hms_mgmt.StepContext) -> None:
    return None


# -- failures (retries, error paths, timeouts, dead letters) ---------------------------------

QUICK = RetryPolicy(max_attempts=3, initial_delay=0.5, backoff=2.0, jitter=False)
ONCE = RetryPolicy(max_attempts=2, initial_delay=0.2, jitter=False)

grant.define_workflow("flaky", ["wobble", "done"], retry=QUICK)
grant.define_workflow("doomed", ["explode"], retry=ONCE)
grant.define_workflow("doomedWithErrorPath", ["explode"], retry=ONCE, on_error="notifyApplicant")
grant.define_workflow(
    "picky",
    ["refuse"],
    retry=RetryPolicy(max_attempts=5, initial_delay=0.2, non_retryable=[KeyError]),
)
grant.define_workflow(
    "sluggish",
    [
        Step(
            "slowStep",
            timeout=1.0,
            retry=RetryPolicy(max_attempts=2, initial_delay=0.1, jitter=False),
        )
    ],
)
grant.define_workflow("gated", ["gate", "after"], retry=RetryPolicy(max_attempts=1))
grant.define_workflow("held", [Step("hold", timeout=300.0)])
grant.define_workflow(
    "backoff", ["stumble"], retry=RetryPolicy(max_attempts=3, initial_delay=2.0, jitter=False)
)


@grant.on_step("flaky.wobble")
async def wobble(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    if ctx.attempt < 3:
        raise RuntimeError(f"attempt {ctx.attempt} failed")
    return {"data": {**ctx.payload, "attempts": ctx.attempt}}


@grant.on_step("flaky.done")
async def done(ctx: hms_mgmt.StepContext) -> None:
    return None


async def explode(ctx: hms_mgmt.StepContext) -> None:
    raise RuntimeError("credit bureau down")


grant.on_step("doomed.explode", explode)
grant.on_step("doomedWithErrorPath.explode", explode)


@grant.on_step("doomedWithErrorPath.notifyApplicant")
async def notify_applicant(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    return {"data": {"notified": True, "failure": ctx.error}}


@grant.on_step("picky.refuse")
async def refuse(ctx: hms_mgmt.StepContext) -> None:
    if ctx.payload["how"] == "non-retryable":
        raise hms_mgmt.NonRetryableError("applicant is not eligible")
    raise KeyError("ssn")


@grant.on_step("sluggish.slowStep")
async def slow_step(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    if ctx.attempt == 1:
        await asyncio.sleep(2.5)  # past the 1 s timeout: its outcome arrives late
    return {"data": {"finished_attempt": ctx.attempt}}


@grant.on_step("gated.gate")
def gate(ctx: hms_mgmt.StepContext) -> dict[str, Any]:  # a plain function: runs in a thread
    if not Path(ctx.payload["unlock"]).exists():
        raise RuntimeError("gate closed")
    return {"data": ctx.payload}


@grant.on_step("held.hold")
def hold(ctx: hms_mgmt.StepContext) -> dict[str, Any]:  # runs in a thread
    release, until = Path(ctx.payload["release"]), time.monotonic() + 60
    while not release.exists() and time.monotonic() < until:  # running, within its deadline
        time.sleep(0.05)
    return {"data": ctx.payload}


@grant.on_step("gated.after")
async def after_gate(ctx: hms_mgmt.StepContext) -> None:
    return None


@grant.on_step("backoff.stumble")
async def stumble(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    if ctx.payload.get("always_fail") or ctx.attempt == 1:
        raise RuntimeError(f"stumbled on attempt {ctx.attempt}")
    return {"data": {"attempt": ctx.attempt}}


# -- time and waiting -----------------------------------------------------------------------

grant.define_workflow("inspection", ["request", "finalize"])
grant.define_workflow("later", ["first", "second"])


@grant.on_step("inspection.request")
async def request_inspection(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    await asyncio.sleep(float(ctx.payload.get("sleep", 0)))
    return {
        "wait_for": "inspectionReport",
        "timeout": ctx.payload.get("timeout"),
        "next_step": "finalize",
        "data": ctx.payload,
    }


@grant.on_step("inspection.finalize")
async def finalize_inspection(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    return {"data": {**ctx.payload, "report": ctx.signal}}


@grant.on_step("later.first")
async def first_later(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    return {"data": ctx.payload, "delay": ctx.payload["delay"]}


@grant.on_step("later.second")
async def second_later(ctx: hms_mgmt.StepContext) -> None:
    return None


# -- flow control (pause, resume, reset): each run notes itself in a file ---------------------

grant.define_workflow("noted", ["first", "second"])


def _noted(name: str) -> Any:
    async def handler(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
        # {"note": path} gets a line per run; {"seconds": s} makes "first" take that long,
        # {"delay": d} defers "second" by d seconds.
        _note(ctx.payload["note"], f"{ctx.workflow_id} {name} {ctx.attempt}")
        result: dict[str, Any] = {"data": ctx.payload}
        if name == "first":
            await asyncio.sleep(float(ctx.payload.get("seconds", 0)))
            if ctx.payload.get("delay"):
                result["delay"] = ctx.payload["delay"]
        return result

    handler.__qualname__ = f"noted_{name}"
    return handler


for _name in ("first", "second"):
    grant.on_step(f"noted.{_name}", _noted(_name))


# -- hung handlers and a blocked event loop (the worker's deadlines, the loop monitor) -----

grant.define_workflow("hung", [Step("hang", timeout=1.0, retry=ONCE)])
grant.define_workflow("hungThread", [Step("block", timeout=1.0, retry=ONCE)])
grant.define_workflow("loopHog", ["hog"])


def _note(path: str, line: str) -> None:
    with open(path, "a") as out:  # a few bytes to a local file
        out.write(line + "\n")


@grant.on_step("hung.hang")
async def hang(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    if ctx.attempt == 1:  # hangs past its timeout, noting what happens to it in a file
        _note(ctx.payload["note"], "started")
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            _note(ctx.payload["note"], "cancelled")
            raise
    return {"data": {"attempt": ctx.attempt}}


@grant.on_step("hungThread.block")
def block_in_a_thread(ctx: hms_mgmt.StepContext) -> dict[str, Any]:  # runs in a thread
    if ctx.attempt == 1:  # past its timeout, until the file named "release" exists (or 60 s)
        release, until = Path(ctx.payload["release"]), time.monotonic() + 60
        while not release.exists() and time.monotonic() < until:
            time.sleep(0.05)
    return {"data": {"attempt": ctx.attempt}}


@grant.on_step("loopHog.hog")
async def hog_the_loop(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    # Blocks the event loop: never do this (await asyncio.sleep, or use a plain function).
    time.sleep(float(ctx.payload.get("seconds", 3)))  # noqa: ASYNC251
    return {"data": ctx.payload}


# A step service whose handler kills its own process on every delivery of a poison payload:
# the poison-message protection of each step queue type (tests/test_step_queues.py).
crasher = hms_mgmt.init(service_name="test-crasher")
crasher.define_workflow("crashing", ["swallow"], retry=RetryPolicy(max_attempts=1))


@crasher.on_step("crashing.swallow")
async def swallow(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    if ctx.payload.get("poison"):
        os._exit(1)  # no outcome, no ack: the broker delivers it again
    return {"data": ctx.payload}


# -- concurrency limits: each creditCheck notes how many run at once, across processes -------

grant.define_workflow("limited", ["validateApp", Step("creditCheck", concurrency=5), "finalize"])


@grant.on_step("limited.validateApp")
async def limited_validate(ctx: hms_mgmt.StepContext) -> None:
    return None


@grant.on_step("limited.creditCheck")
async def limited_credit_check(ctx: hms_mgmt.StepContext) -> None:
    # {"dir": path}: a file per run while it runs in <path>/running, and a line per run in
    # <path>/counts with how many files it saw after a pause (so every overlap is seen).
    running = Path(ctx.payload["dir"]) / "running"
    mine = running / f"{ctx.workflow_id}-{ctx.attempt}"
    mine.touch()
    try:
        await asyncio.sleep(0.2)
        seen = len(list(running.iterdir()))
        _note(str(Path(ctx.payload["dir"]) / "counts"), str(seen))
        await asyncio.sleep(0.1 + float(ctx.payload.get("seconds", 0)))
    finally:
        mine.unlink()


@grant.on_step("limited.finalize")
async def limited_finalize(ctx: hms_mgmt.StepContext) -> None:
    return None


# -- rate limits: each rated call notes when it started ---------------------------------------

grant.define_workflow("rated", [Step("call", rate_limit="20/s")])


@grant.on_step("rated.call")
async def rated_call(ctx: hms_mgmt.StepContext) -> None:
    _note(ctx.payload["note"], f"{time.time():.6f}")  # {"note": path}: a line per call


# -- compensation (sagas): each step and compensation notes itself in a file --------------------

SAGA = ["creditHold", "reserveFunds", "bookInspection", "payout"]
SAGA_UNDO = {"creditHold": "releaseHold", "reserveFunds": "releaseFunds"}
SAGA_UNDO["bookInspection"] = "cancelInspection"
grant.define_workflow(
    "saga",
    [Step(step, compensate=SAGA_UNDO.get(step)) for step in SAGA],
    retry=RetryPolicy(max_attempts=2, initial_delay=0.1, jitter=False),
)


def _saga_step(name: str) -> Any:
    async def handler(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
        # {"note": path}: a line per run; {"fail": step}: that step always fails;
        # {"seconds": s}: each step takes that long.
        _note(ctx.payload["note"], f"{ctx.workflow_id} {name} {ctx.attempt}")
        await asyncio.sleep(float(ctx.payload.get("seconds", 0)))
        if ctx.payload.get("fail") == name:
            raise RuntimeError(f"{name} refused")
        return {"data": {**ctx.payload, name: f"{name}-done"}}

    handler.__qualname__ = f"saga_{name}"
    return handler


def _saga_undo(name: str) -> Any:
    async def handler(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
        # A line per run: the workflow, the compensation, the step it undoes, the output it
        # got, its idempotency key. It fails while the file {"block": path} exists.
        about = ctx.compensating or {}
        output = (about.get("output") or {}).get(about.get("step"))
        line = f"{ctx.workflow_id} {name} {about.get('step')} {output} {ctx.idempotency_key}"
        _note(ctx.payload["note"], line)
        await asyncio.sleep(float(ctx.payload.get("seconds", 0)))
        block = ctx.payload.get("block")
        if block and name == "releaseFunds" and await asyncio.to_thread(os.path.exists, block):
            raise RuntimeError(f"{name} cannot reach the bank")
        return {"data": {"undone": about.get("step")}, "next_step": "nowhere"}  # ignored

    handler.__qualname__ = f"saga_{name}"
    return handler


for _name in SAGA:
    grant.on_step(f"saga.{_name}", _saga_step(_name))
for _name in SAGA_UNDO.values():
    grant.on_step(f"saga.{_name}", _saga_undo(_name))
# -- child workflows: a parent's step starts siteVisit children, each run noted in a file ----

grant.define_workflow("withChildren", ["open", "review", "close"])
grant.define_workflow("siteVisit", ["visit", Step("report", retry=ONCE)])


@grant.on_step("withChildren.open")
async def open_file(ctx: hms_mgmt.StepContext) -> None:
    return None


@grant.on_step("withChildren.review")
async def start_site_visits(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    # {"children": n} site visits, those listed in {"abandon": [...]} left to run on if the
    # parent is cancelled; the rest of the payload goes to each.
    abandoned = ctx.payload.get("abandon", [])
    children = [
        {
            "workflow": "siteVisit",
            "data": {**ctx.payload, "site": i},
            "parent_close": "abandon" if i in abandoned else "terminate",
        }
        for i in range(ctx.payload.get("children", 1))
    ]
    return {"child": children, "next_step": "close"}


@grant.on_step("withChildren.close")
async def close_file(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    return {"data": {"reports": ctx.payload}}


@grant.on_step("siteVisit.visit")
def visit_site(ctx: hms_mgmt.StepContext) -> dict[str, Any]:  # runs in a thread
    # {"hold": path}: runs until that file exists (at most a minute)
    _note(ctx.payload["note"], f"{ctx.workflow_id} visit {ctx.attempt}")
    release = ctx.payload.get("hold")
    until = time.monotonic() + 60
    while release and not Path(release).exists() and time.monotonic() < until:
        time.sleep(0.05)
    return {"data": ctx.payload}


@grant.on_step("siteVisit.report")
def report_site(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    # fails (once: its policy) until the file {"unlock": path} exists
    _note(ctx.payload["note"], f"{ctx.workflow_id} report {ctx.attempt}")
    if not Path(ctx.payload["unlock"]).exists():
        raise RuntimeError("the inspector's report was rejected")
    return {"data": {"site": ctx.payload["site"], "passed": True}}


# -- priorities: one check at a time; each notes its tag when it starts --------------------

grant.define_workflow("prioritized", [Step("check", concurrency=1)])


@grant.on_step("prioritized.check")
async def prioritized_check(ctx: hms_mgmt.StepContext) -> None:
    # {"note": path, "tag": t, "seconds": s}: a line "<tag>" per run as it starts
    _note(ctx.payload["note"], str(ctx.payload["tag"]))
    await asyncio.sleep(float(ctx.payload.get("seconds", 0)))


# -- fan-out and join: branches note themselves; score notes how many run at once --------------

grant.define_workflow("fanned", ["split", "creditCheck", "backgroundCheck", "score", "join"])


@grant.on_step("fanned.split")
async def fan_out(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    # {"dir": path, "items": n, "max_concurrency": k}: a map of n scores; no items: four ways
    folder = ctx.payload["dir"]
    (Path(folder) / "running").mkdir(exist_ok=True)
    limit = ctx.payload.get("max_concurrency", 10)
    if "items" in ctx.payload:
        items = [{"i": i, "dir": folder} for i in range(ctx.payload["items"])]
        return {"map": {"step": "score", "items": items}, "join": "join", "max_concurrency": limit}
    branches = [
        {"step": "creditCheck", "data": {"i": 0, "dir": folder}},
        {"step": "backgroundCheck", "data": {"i": 1, "dir": folder}},
        {"step": "score", "data": {"i": 2, "dir": folder}},
        {"step": "score", "data": {"i": 3, "dir": folder}},
    ]
    return {"fan_out": branches, "join": "join", "tolerate": 0, "max_concurrency": limit}


def _check(name: str) -> Any:
    async def handler(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
        _note(str(Path(ctx.payload["dir"]) / "keys"), ctx.idempotency_key)
        return {"data": {"check": name, "i": ctx.payload["i"], "branch": ctx.branch}}

    handler.__qualname__ = name
    return handler


grant.on_step("fanned.creditCheck", _check("creditCheck"))
grant.on_step("fanned.backgroundCheck", _check("backgroundCheck"))


@grant.on_step("fanned.score")
async def score(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    folder = Path(ctx.payload["dir"])
    _note(str(folder / "keys"), ctx.idempotency_key)
    mine = folder / "running" / f"{ctx.workflow_id}-{ctx.seq}"
    mine.touch()
    try:
        await asyncio.sleep(0.05)
        _note(str(folder / "counts"), str(len(list((folder / "running").iterdir()))))
        await asyncio.sleep(0.05)
    finally:
        mine.unlink()
    return {"data": {"score": ctx.payload["i"] * 2, "branch": ctx.branch}}


@grant.on_step("fanned.join")
async def join(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
    return {"data": ctx.payload, "complete": True}
