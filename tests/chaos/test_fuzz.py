"""Fuzzing the decoders and the engine with bytes that are almost, or not at all, messages."""

from __future__ import annotations

import json
import math
import random
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import hms_mgmt
from bus_adapters.base import Delivery, Message
from bus_adapters.memory import MemoryBus
from hms_mgmt.bounds import ID_PATTERN, INT_MAX, INT_MIN, MAX_DELAY
from hms_mgmt.errors import InvalidMessageError
from hms_mgmt.results import normalise_result
from hms_mgmt.wire.codec import batch_body, decode_body
from hms_mgmt.wire.outcomes import Outcome, decode_outcomes, outcomes_message
from hms_mgmt.wire.requests import decode_requests, parse_request
from hms_mgmt.wire.steps import StepMessage
from tests.conftest import wait_until

pytestmark = pytest.mark.chaos


async def _noop(*_: Any) -> None:
    return None


def delivery(body: bytes, content_type: str | None, queue: str = "grant.creditCheck") -> Delivery:
    return Delivery(
        body=body,
        queue=queue,
        routing_key=queue,
        exchange="",
        headers={},
        message_id=None,
        content_type=content_type,
        correlation_id=None,
        reply_to="r",
        redelivered=False,
        _ack=_noop,
        _reject=_noop,
    )


VALID = [
    StepMessage("wf", "grant", "creditCheck", 1, 1, 1, {"a": [1, {"b": None}]}).to_message().body,
    outcomes_message([Outcome("wf", 2, "succeeded", step="s", result={"data": 1}).encoded]).body,
    b'{"requests": [{"type": "status", "request_id": "r", "workflow_id": "w"}]}',
    b'{"requests": [{"type": "start", "request_id": "r", "workflow_id": "w", "workflow": "grant",'
    b' "delay": 5, "run_at": 1800000000, "idempotency_key": "k"}]}',
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return draw(st.binary(max_size=300))
    if choice == 1:
        return json.dumps(draw(json_values)).encode()
    base = bytearray(draw(st.sampled_from(VALID)))
    if choice == 2:  # flip, insert or delete bytes
        for _ in range(draw(st.integers(1, 5))):
            at = draw(st.integers(0, len(base) - 1))
            action = draw(st.integers(0, 2))
            if action == 0:
                base[at] = draw(st.integers(0, 255))
            elif action == 1:
                base.insert(at, draw(st.integers(0, 255)))
            else:
                del base[at]
        return bytes(base)
    data = json.loads(base)  # replace one field deep inside with any JSON value
    key = next(iter(data))
    item = data[key][0]
    field = draw(st.sampled_from(sorted(item)))
    item[field] = draw(json_values)
    return json.dumps(data).encode()


content_types = st.sampled_from(["application/json", "application/json", "text/plain", None, ""])


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies(), content_type=content_types)
def test_decoders_only_ever_refuse_with_a_reason(body: bytes, content_type: str | None) -> None:
    for decode in (
        StepMessage.decode,
        decode_outcomes,
        decode_requests,
    ):
        try:
            decode(delivery(body, content_type))  # type: ignore[operator]
        except InvalidMessageError as exc:
            assert str(exc)


def _wide(value: Any) -> bool:
    """Whether a JSON value holds an integer outside 64 bits."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return not INT_MIN <= value <= INT_MAX
    if isinstance(value, list):
        return any(_wide(v) for v in value)
    if isinstance(value, dict):
        return any(_wide(v) for v in value.values())
    return False


def _same(a: Any, b: Any) -> bool:
    """Equal, and of the same JSON types all the way down (an int is not a float)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


finite_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=1000, deadline=None, database=None)
@given(value=finite_json_values)
def test_integers_decode_exactly_or_are_refused(value: Any) -> None:
    body = json.dumps({"v": value}).encode()
    try:
        decoded = decode_body(body, "application/json")
    except InvalidMessageError as exc:
        assert _wide(value), (value, exc)  # refused only for an integer beyond 64 bits...
        assert "outside 64 bits" in str(exc)
    else:
        assert not _wide(value)  # ...and never read as a float
        assert _same(decoded, {"v": value})


ids = st.text(max_size=110) | st.from_regex(ID_PATTERN, fullmatch=True)


@settings(max_examples=1000, deadline=None, database=None)
@given(workflow_id=ids, request_id=ids)
def test_ids_are_accepted_exactly_when_they_match_the_pattern(
    workflow_id: str, request_id: str
) -> None:
    item = {"type": "status", "request_id": request_id, "workflow_id": workflow_id}
    body = batch_body("requests", [json.dumps(item).encode()])
    commands, refused = decode_requests(delivery(body, "application/json"))
    valid = all(ID_PATTERN.fullmatch(i) for i in (workflow_id, request_id))
    assert len(commands) == (1 if valid else 0), refused
    outcome = {"workflow_id": workflow_id, "seq": 1, "kind": "heartbeat"}
    body = batch_body("outcomes", [json.dumps(outcome).encode()])
    outcomes, _ = decode_outcomes(delivery(body, "application/json"))
    assert len(outcomes) == (1 if ID_PATTERN.fullmatch(workflow_id) else 0)


seconds = (
    st.floats()
    | st.integers(-(2**70), 2**70)
    | st.floats(-10.0, MAX_DELAY + 10.0)
    | st.sampled_from([0, MAX_DELAY, MAX_DELAY + 1, -1, 1e308, 2**64])
)


def _in_bounds(value: float, high: float) -> bool:
    return math.isfinite(value) and 0 <= value <= high


@settings(max_examples=1000, deadline=None, database=None)
@given(delay=seconds, run_at=seconds | st.floats(1.7e9, 2.2e9))
def test_times_are_accepted_exactly_within_bounds(delay: float, run_at: float) -> None:
    latest = time.time() + MAX_DELAY
    assume(abs(run_at - latest) > 60)  # the bound moves with the clock
    start = {"type": "start", "request_id": "r", "workflow_id": "w", "workflow": "g"}
    for field, value, high in (("delay", delay, MAX_DELAY), ("run_at", run_at, latest)):
        ok = _in_bounds(value, high)
        try:
            parse_request({**start, field: value})
        except InvalidMessageError as exc:
            assert not ok and field in str(exc)
        else:
            assert ok, (field, value)
        body = batch_body("requests", [json.dumps({**start, field: value}).encode()])
        try:  # on the wire: JSON has no NaN or Infinity, and wide integers are refused whole
            commands, _ = decode_requests(delivery(body, "application/json"))
        except InvalidMessageError:
            assert not ok
        else:
            assert len(commands) == (1 if ok else 0)
        result = {"data": 1, "timeout" if field == "delay" else field: value}
        try:
            normalise_result(result, payload=None, describe=lambda: "handler h")
        except ValueError as exc:
            assert not ok and "handler h returned" in str(exc)
        else:
            assert ok, (field, value)
        try:
            Outcome.from_json({"workflow_id": "w", "seq": 1, "kind": "succeeded", "result": result})
        except InvalidMessageError:
            assert not ok
        else:
            assert ok


async def test_the_engine_survives_a_storm_of_garbage(memory_url: str, store_url: str) -> None:
    rng = random.Random(7)

    def garbage() -> bytes:
        base = bytearray(rng.choice(VALID))
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(len(base))
            base[at] = rng.randrange(256)
        return bytes(base)

    async with hms_mgmt.init(
        service_name="fuzz", broker_url=memory_url, store_url=store_url
    ) as mgmt:
        mgmt.define_workflow("grant", ["creditCheck"])

        @mgmt.on_step("grant.creditCheck")
        async def credit_check(ctx: hms_mgmt.StepContext) -> None:
            return None

        await mgmt.serve()
        bus = MemoryBus(memory_url)
        for _ in range(2000):
            body = garbage()
            await bus.publish(
                Message(body, routing_key=rng.choice(["hms.engine.results", "hms.engine.commands"]))
            )
            await bus.publish(
                Message(body, exchange="hms.steps", routing_key="grant.creditCheck"), confirm=False
            )

        def settled() -> bool:
            stats = bus.statistics()
            return all(
                stats[q]["ready"] == 0 and stats[q]["unacked"] == 0
                for q in ("hms.engine.results", "hms.engine.commands", "grant.creditCheck")
            )

        await wait_until(settled, timeout=60, what="every garbage message handled")
        started = await mgmt.start("grant", {"after": "the storm"})
        assert (await mgmt.wait(started.workflow_id, timeout=10)).status == "succeeded"
