"""Fuzzing the decoders and the engine with bytes that are almost, or not at all, messages."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hms_mgmt
from bus_adapters.base import Delivery, Message
from bus_adapters.memory import MemoryBus
from hms_mgmt.errors import InvalidMessageError
from hms_mgmt.messages import (
    Outcome,
    StepMessage,
    decode_outcomes,
    decode_requests,
    outcomes_message,
)
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
