from __future__ import annotations

import json
from typing import Any

import pytest

from bus_adapters.base import Delivery
from hms_mgmt.errors import InvalidMessageError, PayloadError
from hms_mgmt.messages import (
    MAX_DEPTH,
    MAX_MESSAGE_BYTES,
    Outcome,
    StepMessage,
    batch_body,
    decode_outcomes,
    decode_requests,
    encode_payload,
    normalise_result,
    outcomes_message,
)
from hms_mgmt.results import StepResult


async def _noop(*_: Any) -> None:
    return None


def delivery(
    body: bytes, content_type: str | None = "application/json", queue: str = "w.s"
) -> Delivery:
    return Delivery(
        body=body,
        queue=queue,
        routing_key=queue,
        exchange="hms.steps",
        headers={},
        message_id="m1",
        content_type=content_type,
        correlation_id=None,
        reply_to=None,
        redelivered=False,
        _ack=_noop,
        _reject=_noop,
    )


def step(**overrides: Any) -> StepMessage:
    values: dict[str, Any] = {
        "workflow_id": "wf1",
        "workflow": "w",
        "step": "s",
        "seq": 1,
        "visit": 1,
        "attempt": 1,
        "payload": {"a": 1},
    }
    values.update(overrides)
    return StepMessage(**values)


def test_step_message_round_trip() -> None:
    message = step(timeout=5.0, context={"signal": {"ok": True}})
    wire = message.to_message()
    assert wire.routing_key == "w.s"
    assert wire.headers == {
        "hms-workflow-id": "wf1",
        "hms-step": "s",
        "hms-attempt": 1,
        "hms-seq": 1,
    }
    assert StepMessage.decode(delivery(wire.body)) == [message]
    two = batch_body("steps", [message.encode(), step(seq=2).encode()])
    assert [m.seq for m in StepMessage.decode(delivery(two))] == [1, 2]


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        (b"{not json", "application/json", "not JSON"),
        (b"\xff\xfe\x00", "application/json", "not UTF-8"),
        (b'{"a": 1}', "text/plain", "content type"),
        (b'{"a": 1}', None, "content type"),
        (b"[1, 2]", "application/json", "JSON list, not an object"),
        (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "application/json", "nested deeper"),
        (b'{"a": "' + b"x" * MAX_MESSAGE_BYTES + b'"}', "application/json", "exceeds"),
        (b'{"workflow": "w"}', "application/json", "'steps' must be a non-empty list"),
        (b'{"steps": []}', "application/json", "'steps' must be a non-empty list"),
        (b'{"steps": [{"workflow": "w"}]}', "application/json", "'workflow_id' is missing"),
        (b'{"steps": [7]}', "application/json", "not an object"),
    ],
)
def test_undecodable_step_messages_say_why(
    body: bytes, content_type: str | None, reason: str
) -> None:
    with pytest.raises(InvalidMessageError, match=reason):
        StepMessage.decode(delivery(body, content_type))


def test_step_message_fields_are_type_checked() -> None:
    good = step().to_message().body
    for field, bad in (
        ("seq", "1"),
        ("seq", 0),
        ("attempt", True),
        ("step", "a.b"),
        ("workflow_id", ""),
    ):
        data = json.loads(good)
        data["steps"][0][field] = bad
        body = json.dumps(data).encode()
        with pytest.raises(InvalidMessageError, match=field):
            StepMessage.decode(delivery(body))


def test_step_message_on_the_wrong_queue_is_refused() -> None:
    with pytest.raises(InvalidMessageError, match="arrived on queue"):
        StepMessage.decode(delivery(step().to_message().body, queue="other.queue"))


def test_outcomes_travel_in_batches_and_bad_items_are_refused_alone() -> None:
    good = Outcome("wf1", 2, "succeeded", step="s", attempt=1, result={"data": 1})
    wire = outcomes_message([good.encoded])
    [decoded], refused = decode_outcomes(delivery(wire.body, queue="hms.engine.results"))
    assert decoded == good and refused == []
    bad_items = [
        (b'{"workflow_id": "x", "seq": 1, "kind": "succeeded"}', "no 'result'"),
        (b'{"workflow_id": "x", "seq": 1, "kind": "exploded"}', "kind"),
        (
            b'{"workflow_id": "x", "seq": 1, "kind": "succeeded", "result": {"bogus": 1}}',
            "unknown keys",
        ),
    ]
    body = batch_body("outcomes", [good.encoded] + [item for item, _ in bad_items])
    outcomes, refused = decode_outcomes(delivery(body))
    assert outcomes == [good]
    assert len(refused) == 3
    for (_, reason), (_, expected) in zip(refused, bad_items, strict=True):
        assert expected in reason
    with pytest.raises(InvalidMessageError, match="'outcomes' must be a non-empty list"):
        decode_outcomes(delivery(b'{"outcomes": {}}'))


def test_requests_are_validated_one_by_one() -> None:
    body = batch_body(
        "requests",
        [
            b'{"type": "explode", "request_id": "r1"}',
            b'{"type": "status", "request_id": "r2"}',
            b'{"type": "status", "request_id": "r3", "workflow_id": "w"}',
        ],
    )
    commands, refused = decode_requests(delivery(body))
    assert [c.request_id for c in commands] == ["r3"]
    assert "unknown request type" in refused[0][1]
    assert "workflow_id" in refused[1][1]


def test_payloads_that_cannot_travel_are_refused() -> None:
    with pytest.raises(PayloadError, match="not JSON-serialisable"):
        encode_payload({"when": object()})
    with pytest.raises(PayloadError, match="not JSON-serialisable"):
        encode_payload({"x": float("nan")})
    with pytest.raises(PayloadError, match="not JSON-serialisable"):
        encode_payload({"x": 2**64})  # found by the stateful test: would come back as a float
    with pytest.raises(PayloadError, match="not JSON-serialisable"):
        encode_payload({1: "x"})
    with pytest.raises(PayloadError, match="limit"):
        encode_payload("x" * MAX_MESSAGE_BYTES)
    deep: Any = []
    for _ in range(MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(PayloadError, match="nested deeper"):
        encode_payload(deep)
    assert encode_payload({"ok": [1, 2, {"x": None}]}) == b'{"ok":[1,2,{"x":null}]}'


def describe() -> str:
    return "handler h of w.s"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, {"data": {"p": 1}}),
        ({"data": 2}, {"data": 2}),
        ({"nextStep": "b", "data": 3}, {"next_step": "b", "data": 3}),
        ({"next_step": "b"}, {"next_step": "b"}),
        (StepResult.complete(5), {"data": 5, "complete": True}),
        (StepResult(6, next_step="c"), {"data": 6, "next_step": "c"}),
    ],
)
def test_handler_results_are_normalised(value: Any, expected: dict[str, Any]) -> None:
    assert normalise_result(value, payload={"p": 1}, describe=describe) == expected


@pytest.mark.parametrize(
    "value", [42, "done", {"score": 750}, {}, {"next_step": 7}, {"data": 1, "delay": -1}]
)
def test_odd_handler_results_name_the_handler_and_value(value: Any) -> None:
    with pytest.raises(ValueError, match=r"handler h of w\.s returned"):
        normalise_result(value, payload=None, describe=describe)


def test_batches_close_before_an_item_would_take_them_over_the_limit() -> None:
    from hms_mgmt.messages import BATCH_BYTES, batches

    items = [b"a" * 500_000, b"b" * 600_000, b"c" * 10, b"d" * 10]
    grouped = list(batches(items, len))
    assert [len(g) for g in grouped] == [1, 3] or [len(g) for g in grouped] == [1, 1, 2]
    for group in grouped:
        assert sum(len(i) + 1 for i in group) <= BATCH_BYTES or len(group) == 1
    assert [len(g) for g in batches([b"x"] * 5, len, max_items=2)] == [2, 2, 1]


@pytest.mark.parametrize(
    "result",
    [
        {"data": 1, "delay": "soon"},
        {"data": 1, "run_at": -5},
        {"wait_for": 7},
        {"next_step": "a.b"},
    ],
)
def test_outcomes_with_mistyped_result_fields_are_refused(result: dict[str, Any]) -> None:
    item = json.dumps(
        {"workflow_id": "w", "seq": 1, "kind": "succeeded", "result": result}
    ).encode()
    outcomes, refused = decode_outcomes(delivery(batch_body("outcomes", [item])))
    assert outcomes == [] and len(refused) == 1
