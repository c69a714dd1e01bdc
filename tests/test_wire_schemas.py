"""The JSON Schemas of the wire format (``hms_mgmt/wire/schemas``) against the code.

Every message the engine, a step service and a client send in a flow on the in-memory bus
is valid under its schema; and on a set of good and bad items the decoders refuse exactly
what the schemas refuse, but for the few differences listed (and checked) below.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from typing import Any

import jsonschema
import pytest

import hms_mgmt
from bus_adapters.base import Message
from bus_adapters.memory import MemoryBus
from hms_mgmt import Step
from hms_mgmt.bounds import MAX_DELAY
from hms_mgmt.errors import InvalidMessageError
from hms_mgmt.topology import COMMANDS_EXCHANGE, RESULTS_EXCHANGE, STEPS_EXCHANGE
from hms_mgmt.wire import SCHEMAS, schema
from hms_mgmt.wire.outcomes import Outcome
from hms_mgmt.wire.requests import parse_request
from hms_mgmt.wire.steps import StepMessage
from tests.conftest import wait_until

Validator = jsonschema.Draft202012Validator


def validator(name: str, item: str) -> Validator:
    """A validator of one item of a message: ``#/$defs/<item>`` of the message's schema."""
    return Validator({"$defs": schema(name)["$defs"], "$ref": f"#/$defs/{item}"})


STEP = validator("step-message", "step")
OUTCOME = validator("outcomes-message", "outcome")
REQUEST = validator("requests-message", "request")


def test_the_schemas_are_valid_json_schemas_shipped_with_the_package() -> None:
    for name in SCHEMAS:
        Validator.check_schema(schema(name))
    with pytest.raises(ValueError, match="no schema"):
        schema("nope")


# -- what the code sends is valid ------------------------------------------------------------


async def test_every_message_of_a_flow_is_valid_under_its_schema(
    memory_url: str, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[Message] = []
    publish = MemoryBus.publish

    async def recording(self: MemoryBus, message: Message, *, confirm: bool = True) -> None:
        sent.append(message)
        await publish(self, message, confirm=confirm)

    monkeypatch.setattr(MemoryBus, "publish", recording)
    async with hms_mgmt.init(service_name="t", broker_url=memory_url, store_url=store_url) as m:
        retry = hms_mgmt.RetryPolicy(max_attempts=2, initial_delay=0.01, jitter=False)
        m.define_workflow(
            "grant", ["check", Step("inspect", timeout=5), "finalize"], on_error="notify"
        )
        m.define_workflow("flaky", ["wobble"], retry=retry)

        @m.on_step("grant.check")
        async def check(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
            return {
                "next_step": "inspect",
                "data": {**ctx.payload, "score": 750},
                "delay": 0,
                "attributes": {"region": "north"},
            }

        @m.on_step("grant.inspect")
        async def inspect(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
            await ctx.heartbeat()
            return {"wait_for": "report", "timeout": 60, "next_step": "finalize", "data": 1}

        @m.on_step("grant.finalize")
        async def finalize(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
            return {"complete": True, "data": {"approved": ctx.signal}}

        @m.on_step("grant.notify")
        async def notify(ctx: hms_mgmt.StepContext) -> None:
            return None

        @m.on_step("flaky.wobble")
        async def wobble(ctx: hms_mgmt.StepContext) -> None:
            raise hms_mgmt.Retry("not yet", delay=0.01)

        await m.serve()
        started = await m.start(
            "grant",
            {"application_id": "A-1"},
            idempotency_key="A-1",
            attributes={"application_id": "A-1"},
        )

        async def waiting() -> bool:
            return (await m.status(started.workflow_id)).status == "waiting"

        await wait_until(waiting, timeout=10, what="the wait for the report")
        await m.signal(started.workflow_id, "report", {"passed": True})
        assert (await m.wait(started.workflow_id, timeout=10)).status == "succeeded"
        doomed = await m.start("flaky", {}, delay=0.01)
        assert (await m.wait(doomed.workflow_id, timeout=10)).status == "failed"
        await m.cancel((await m.start("flaky", {}, delay=3600)).workflow_id, reason="no")
        await m.list()
        found = await m.list(attributes={"application_id": "A-1", "region": "north"})
        assert [w["workflow_id"] for w in found] == [started.workflow_id]
        await m.schedule("flaky", cron="0 9 * * *", schedule_id="nightly")
        await m.schedules()
        await m.unschedule("nightly")

    by_schema = {
        STEPS_EXCHANGE: "step-message",
        RESULTS_EXCHANGE: "outcomes-message",
        COMMANDS_EXCHANGE: "requests-message",
    }
    seen: dict[str, set[str]] = {name: set() for name in SCHEMAS}
    for message in sent:
        if message.exchange in by_schema:
            name = by_schema[message.exchange]
        elif message.exchange == "" and message.routing_key.startswith("hms.reply."):
            name = "replies-message"
        else:
            continue  # dead letters: the bodies of step messages, checked as such above
        body = json.loads(message.body)
        errors = [e.message for e in Validator(schema(name)).iter_errors(body)]
        assert errors == [], (name, body)
        assert message.content_type == "application/json"
        [key] = schema(name)["required"]
        for item in body[key]:
            seen[name].add(str(item.get("kind") or item.get("type") or item.get("ok")))
    assert seen["outcomes-message"] == {"started", "heartbeat", "succeeded", "failed"}
    assert {"define", "start", "signal", "wait", "cancel", "schedule"} <= seen["requests-message"]
    assert seen["step-message"] and seen["replies-message"] == {"True"}


# -- what the decoders refuse, the schemas refuse ------------------------------------------

GOOD_STEP: dict[str, Any] = {
    "workflow_id": "wf-1",
    "workflow": "grantApproval",
    "step": "creditCheck",
    "seq": 2,
    "visit": 1,
    "attempt": 1,
    "payload": {"application_id": "A-17"},
    "timeout": 30,
    "context": {"signal": {"ok": True}},
    "token": "ab" * 16,
    "schedule_to_start": 5,
}
GOOD_OUTCOMES: list[dict[str, Any]] = [
    {"workflow_id": "wf-1", "seq": 2, "attempt": 1, "kind": "started", "token": "t",
     "started_at": 1.7e9},
    {"workflow_id": "wf-1", "seq": 2, "attempt": 1, "kind": "heartbeat", "token": "t"},
    {"workflow_id": "wf-1", "seq": 2, "attempt": 1, "kind": "succeeded", "token": "t",
     "step": "creditCheck", "started_at": 1.7e9, "finished_at": 1.7e9 + 0.2, "handler": "h",
     "result": {"next_step": "finalize", "data": {"score": 750}, "complete": False,
                "delay": 10, "run_at": 1.7e9, "wait_for": "report", "timeout": 60,
                "attributes": {"region": "north"}}},
    {"workflow_id": "wf-1", "seq": 2, "attempt": 3, "kind": "failed", "token": "t",
     "error": {"type": "RuntimeError", "types": ["builtins.RuntimeError"], "message": "down",
               "traceback": "Traceback...", "retryable": True, "retry_delay": 2.5}},
]  # fmt: skip
GOOD_REQUESTS: list[dict[str, Any]] = [
    {"type": "define", "request_id": "r1", "definition": {"name": "g", "steps": []}},
    {"type": "start", "request_id": "r2", "workflow_id": "wf-1", "workflow": "grantApproval",
     "payload": {"a": 1}, "delay": 5, "run_at": 1.7e9, "idempotency_key": "A-17 key",
     "traceparent": "garbage is ignored", "deadline": 1.7e9,
     "attributes": {"application_id": "A-17", "_x-1": "y" * 200}},
    {"type": "status", "request_id": "r3", "workflow_id": "wf-1"},
    {"type": "wait", "request_id": "r4", "workflow_id": "wf-1", "hold": 20},
    {"type": "cancel", "request_id": "r5", "workflow_id": "wf-1", "reason": 7},
    {"type": "retry", "request_id": "r6", "workflow_id": "wf-1"},
    {"type": "signal", "request_id": "r7", "workflow_id": "wf-1", "signal": "report",
     "data": [1]},
    {"type": "list", "request_id": "r8", "status": "failed", "name": "g", "limit": 1000,
     "attributes": {"application_id": "A-17"}},
    {"type": "list", "request_id": "r8q", "status": "queued"},
    {"type": "schedule", "request_id": "r9", "workflow": "nightly", "cron": "0 9 * * *",
     "timezone": "UTC", "payload": None, "catch_up": "all"},
    {"type": "schedule", "request_id": "r10", "workflow": "-dash", "schedule_id": "ok",
     "cron": "* * * * *"},
    {"type": "unschedule", "request_id": "r11", "schedule_id": "nightly"},
    {"type": "schedules", "request_id": "r12"},
    {"type": "pause", "request_id": "r13", "workflow_id": "wf-1", "reason": "audit"},
    {"type": "resume", "request_id": "r14", "workflow_id": "wf-1"},
    {"type": "reset", "request_id": "r15", "workflow_id": "wf-1", "to_step": "validateApp",
     "data": {"fixed": True}, "signals": "drop", "reason": None},
    {"type": "pause_type", "request_id": "r16", "workflow": "grantApproval",
     "step": "creditCheck", "reason": "bureau down"},
    {"type": "resume_type", "request_id": "r17", "workflow": "grantApproval", "step": None},
    {"type": "cancel", "request_id": "r18", "workflow_id": "wf-1", "compensate": True},
]  # fmt: skip

BAD_VALUES: list[Any] = [
    None, "", "x", "a.b", "a\n", "-lead", "x" * 101, 0, -1, 7, 2.5, MAX_DELAY + 1, True,
    [], ["x"], {}, {"bogus": 1}, {"type": "E"}, {"type": "E", "message": "m"},
]  # fmt: skip
"""Values put in each field of each good item in turn (and each field dropped)."""

KNOWN_DIFFERENCES = {
    # The schema cannot say "at most 10 years from now": the bound moves with the clock.
    ("start", "run_at", 1e12),
    # The schema refuses control characters; Python's isprintable refuses format characters too.
    ("start", "idempotency_key", "zero\u200bwidth"),
}
"""Where the decoders refuse what the schemas accept; each is checked to still differ."""


def decoded(kind: str, item: Any) -> bool:
    """Whether the code takes ``item`` as valid (for an outcome: applied as sent)."""
    try:
        if kind == "step":
            StepMessage.from_json(item)
        elif kind == "outcome":
            outcome = Outcome.from_wire(item)
            # The engine then checks the token against the run (workflow_id, seq, attempt):
            # the schema asks for a token and an attempt of 1 or more.
            return outcome.malformed is None and bool(outcome.token) and outcome.attempt >= 1
        else:
            parse_request(item)
    except InvalidMessageError:
        return False
    return True


def variants(good: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield good
    for key in [*list(good), "result", "error", "schedule_id"]:
        dropped = {k: v for k, v in good.items() if k != key}
        if dropped != good:
            yield dropped
        for value in BAD_VALUES:
            changed = copy.deepcopy(good)
            changed[key] = value
            yield changed
    for key in ("result", "error", "attributes"):  # inside the nested objects too
        if isinstance(good.get(key), dict):
            for inner in [*list(good[key]), "bogus"]:
                for value in BAD_VALUES:
                    changed = copy.deepcopy(good)
                    changed[key][inner] = value
                    yield changed


CASES: list[tuple[str, Validator, list[dict[str, Any]]]] = [
    ("step", STEP, [GOOD_STEP]),
    ("outcome", OUTCOME, GOOD_OUTCOMES),
    ("request", REQUEST, GOOD_REQUESTS),
]


@pytest.mark.parametrize(("kind", "checker", "goods"), CASES, ids=[c[0] for c in CASES])
def test_the_decoder_and_the_schema_agree(
    kind: str, checker: Validator, goods: list[dict[str, Any]]
) -> None:
    compared = disagreements = 0
    found: list[str] = []
    for good in goods:
        assert checker.is_valid(good) and decoded(kind, good), good
        for item in variants(good):
            compared += 1
            by_schema, by_code = checker.is_valid(item), decoded(kind, item)
            if by_schema != by_code:
                disagreements += 1
                found.append(f"schema {by_schema}, code {by_code}: {json.dumps(item)[:300]}")
    assert found == [], "\n".join(found[:20])
    assert compared > 100 * len(goods) and disagreements == 0


@pytest.mark.parametrize(("kind", "key", "value"), sorted(KNOWN_DIFFERENCES, key=str))
def test_the_known_differences_still_differ(kind: str, key: str, value: Any) -> None:
    item = {**next(r for r in GOOD_REQUESTS if r["type"] == kind), key: value}
    assert REQUEST.is_valid(item) and not decoded("request", item)


@pytest.mark.parametrize(
    ("kind", "checker", "mutate"),
    [
        ("step", STEP, lambda s: {**s, "seq": "2"}),
        ("outcome", OUTCOME, lambda o: {**o, "kind": "succeeded", "result": None}),
        ("request", REQUEST, lambda r: {**r, "type": "explode"}),
    ],
)
def test_a_schema_error_names_the_field(
    kind: str, checker: Validator, mutate: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    good = {"step": GOOD_STEP, "outcome": GOOD_OUTCOMES[1], "request": GOOD_REQUESTS[2]}[kind]
    errors = list(checker.iter_errors(mutate(good)))
    assert errors and not decoded(kind, mutate(good))


@pytest.mark.parametrize(
    "attributes",
    [
        {"application_id": "A-17"},
        {"_": "x", "a-b_C9": "y" * 200},
        {"x" * 64: "v"},
        {f"k{i}": "v" for i in range(20)},
        {"x" * 65: "v"},
        {"a.b": "v"},
        {"-lead": "v"},
        {"1st": "v"},
        {"": "v"},
        {"a b": "v"},
        {"k": "y" * 201},
        {"k": "tab\there"},
        {"k": 7},
        {f"k{i}": "v" for i in range(21)},
        ["application_id"],
        "A-17",
    ],
)
def test_the_decoder_and_the_schema_agree_on_attributes(attributes: Any) -> None:
    start = {**next(r for r in GOOD_REQUESTS if r["type"] == "start"), "attributes": attributes}
    outcome = copy.deepcopy(GOOD_OUTCOMES[2])
    outcome["result"]["attributes"] = attributes
    assert REQUEST.is_valid(start) == decoded("request", start)
    assert OUTCOME.is_valid(outcome) == decoded("outcome", outcome)
    assert decoded("outcome", outcome) == decoded("request", start)
