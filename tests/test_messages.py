from __future__ import annotations

import json
import math
import re
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from bus_adapters.base import Delivery
from hms_mgmt.bounds import ID_PATTERN, MAX_DELAY, valid_id
from hms_mgmt.definitions import check_name
from hms_mgmt.errors import DefinitionError, InvalidMessageError, PayloadError, Retry
from hms_mgmt.results import StepResult, normalise_result
from hms_mgmt.wire.codec import (
    MAX_DEPTH,
    MAX_MESSAGE_BYTES,
    batch_body,
    decode_body,
    dumps,
    encode_payload,
)
from hms_mgmt.wire.outcomes import Outcome, decode_outcomes, outcomes_message
from hms_mgmt.wire.requests import Request, decode_requests, parse_request
from hms_mgmt.wire.steps import StepMessage


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
    from hms_mgmt.wire.codec import BATCH_BYTES, batches

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


# -- bounded delays, 64-bit integers, ids and keys ------------------------------------------

NOW = time.time()
TOO_LATE = NOW + MAX_DELAY + 3600


def _command(**fields: Any) -> Request:
    return parse_request(
        {"type": "start", "request_id": "r1", "workflow_id": "wf1", "workflow": "w", **fields}
    )


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("delay", math.inf, "inf"),
        ("delay", math.nan, "nan"),
        ("delay", 1e308, "1e+308"),
        ("delay", MAX_DELAY + 1, str(MAX_DELAY + 1)),
        ("delay", -1, "-1"),
        ("delay", "soon", "'soon'"),
        ("delay", True, "True"),
        ("run_at", math.nan, "nan"),
        ("run_at", math.inf, "inf"),
        ("run_at", TOO_LATE, repr(TOO_LATE)),
        ("run_at", -5, "-5"),
    ],
)
def test_start_requests_with_unbounded_times_are_refused_naming_the_value(
    field: str, value: Any, named: str
) -> None:
    with pytest.raises(InvalidMessageError, match=field) as refused:
        _command(**{field: value})
    assert named in str(refused.value) and "10 years" in str(refused.value)


def test_start_requests_with_times_in_bounds_are_accepted() -> None:
    for fields in (
        {"delay": 0},
        {"delay": MAX_DELAY},
        {"delay": 2.5},
        {"run_at": 0},
        {"run_at": NOW + MAX_DELAY - 60},
    ):
        assert _command(**fields).workflow_id == "wf1"
    # on the wire too: a float orjson reads is still refused when out of bounds
    body = batch_body(
        "requests",
        [b'{"type":"start","request_id":"r","workflow_id":"w","workflow":"w","delay":1e308}'],
    )
    commands, refused = decode_requests(delivery(body))
    assert commands == [] and "1e+308" in refused[0][1]


@pytest.mark.parametrize(
    "result",
    [
        {"data": 1, "delay": 1e308},
        {"data": 1, "delay": MAX_DELAY + 1},
        {"data": 1, "run_at": 1e300},
        {"data": 1, "run_at": TOO_LATE},
        {"wait_for": "e", "timeout": 1e308},
    ],
)
def test_outcomes_with_unbounded_times_are_refused(result: dict[str, Any]) -> None:
    item = json.dumps({"workflow_id": "w", "seq": 1, "kind": "succeeded", "result": result})
    outcomes, refused = decode_outcomes(delivery(batch_body("outcomes", [item.encode()])))
    assert outcomes == [] and "10 years" in refused[0][1]


def test_failed_outcomes_with_an_unbounded_retry_delay_are_refused() -> None:
    error = {"type": "Retry", "message": "m", "retry_delay": 1e308}
    item = json.dumps({"workflow_id": "w", "seq": 1, "kind": "failed", "error": error})
    outcomes, refused = decode_outcomes(delivery(batch_body("outcomes", [item.encode()])))
    assert outcomes == [] and "retry_delay" in refused[0][1] and "1e+308" in refused[0][1]


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ({"data": 1, "delay": math.inf}, "delay inf"),
        ({"data": 1, "delay": math.nan}, "delay nan"),
        ({"data": 1, "delay": 1e308}, "delay 1e+308"),
        ({"data": 1, "run_at": math.nan}, "run_at nan"),
        ({"data": 1, "run_at": datetime(9999, 1, 1, tzinfo=UTC)}, "run_at 253370764800.0"),
        ({"wait_for": "e", "timeout": math.inf}, "timeout inf"),
    ],
)
def test_handler_results_with_unbounded_times_fail_naming_the_value(
    value: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValueError, match=r"handler h of w\.s returned") as refused:
        normalise_result(value, payload=None, describe=describe)
    assert named in str(refused.value) and "10 years" in str(refused.value)


def test_step_results_and_retries_refuse_unbounded_times_when_made() -> None:
    for make in (
        lambda: StepResult(1, delay=math.inf),
        lambda: StepResult(1, delay=1e308),
        lambda: StepResult(1, run_at=math.nan),
        lambda: StepResult(1, run_at=datetime(9999, 1, 1, tzinfo=UTC)),
        lambda: StepResult.wait_for("e", timeout=math.inf),
        lambda: Retry(delay=math.inf),
        lambda: Retry(delay=math.nan),
        lambda: Retry(delay=MAX_DELAY + 1),
    ):
        with pytest.raises(ValueError, match="10 years"):
            make()
    retry = Retry(delay=5)
    assert retry.delay == 5
    with pytest.raises(ValueError, match="Retry delay must be seconds"):
        retry.delay = math.inf  # set later: still refused, so a worker never sends it
    assert StepResult(1, delay=MAX_DELAY).to_result() == {"data": 1, "delay": MAX_DELAY}


@pytest.mark.parametrize(
    ("literal", "named"),
    [
        (str(2**64), str(2**64)),
        (str(-(2**63) - 1), str(-(2**63) - 1)),
        ("123456789012345678901234567890", "123456789012345678901234567890"),
        ("9" * 5000, "(5000 digits)"),
    ],
)
def test_integers_beyond_64_bits_are_refused_naming_them(literal: str, named: str) -> None:
    body = b'{"a": [1, {"b": ' + literal.encode() + b"}]}"
    with pytest.raises(InvalidMessageError, match="outside 64 bits") as refused:
        decode_body(body, "application/json")
    assert named in str(refused.value)


def test_integers_within_64_bits_floats_and_digit_strings_decode_as_they_are() -> None:
    body = (
        b'{"max": 18446744073709551615, "min": -9223372036854775808, "float": 1e19,'
        b' "long float": 12345678901234567890123.5, "exp": 12345678901234567890123e-3,'
        b' "text": "123456789012345678901234567890", "esc": "\\"12345678901234567890123"}'
    )
    value = decode_body(body, "application/json")
    assert value["max"] == 2**64 - 1 and isinstance(value["max"], int)
    assert value["min"] == -(2**63) and isinstance(value["min"], int)
    assert isinstance(value["float"], float) and isinstance(value["exp"], float)
    assert value["text"] == "123456789012345678901234567890"


def test_payloads_with_integers_beyond_64_bits_are_refused_naming_them() -> None:
    for wide in (2**64, -(2**63) - 1, 10**5000):
        with pytest.raises(PayloadError, match="64-bit") as refused:
            encode_payload({"a": [1, wide]})
        if wide != 10**5000:
            assert str(wide) in str(refused.value)
    assert encode_payload([2**64 - 1, -(2**63)]) == b"[18446744073709551615,-9223372036854775808]"


BAD_IDS = ["line\nbreak\x1b[31m", "../../etc/passwd", "", "x" * 101, "-lead", "ok\n", "a b", 7]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_requests_outcomes_and_steps_with_bad_workflow_ids_are_refused(bad: Any) -> None:
    for kind in ("start", "status", "wait", "cancel", "retry", "signal"):
        item = {"type": kind, "request_id": "r1", "workflow_id": bad, "workflow": "w"}
        item["signal"] = "s"
        with pytest.raises(InvalidMessageError, match="workflow_id"):
            parse_request(item)
    with pytest.raises(InvalidMessageError, match="request_id"):
        parse_request({"type": "status", "request_id": bad, "workflow_id": "w"})
    with pytest.raises(InvalidMessageError, match="workflow_id"):
        Outcome.from_json({"workflow_id": bad, "seq": 1, "kind": "heartbeat"})
    with pytest.raises(InvalidMessageError, match="workflow_id"):
        StepMessage.from_json(
            {"workflow_id": bad, "workflow": "w", "step": "s", "seq": 1, "visit": 1, "attempt": 1}
        )
    if isinstance(bad, str):
        with pytest.raises(InvalidMessageError, match=re.escape(ID_PATTERN.pattern)):
            parse_request({"type": "status", "request_id": "r", "workflow_id": bad})


def test_ids_of_the_documented_pattern_are_accepted() -> None:
    for good in ("a", "_x", "A-17:x.y_z", "x" * 100, "0193a2b4c5d6e7f8", "nightly-1764100800"):
        assert valid_id(good)
        assert parse_request({"type": "status", "request_id": good, "workflow_id": good})


@pytest.mark.parametrize("key", ["", "a\nb", "tab\there", "x" * 201, 5, "\x1b[31m"])
def test_start_requests_with_bad_idempotency_keys_are_refused(key: Any) -> None:
    with pytest.raises(InvalidMessageError, match="idempotency_key"):
        _command(idempotency_key=key)
    assert _command(idempotency_key="A-17 é " + "x" * 190).raw["idempotency_key"]


def test_names_with_a_final_newline_are_refused() -> None:
    with pytest.raises(InvalidMessageError, match="not a valid name"):
        _command(workflow="grant\n")
    with pytest.raises(DefinitionError, match="invalid workflow name"):
        check_name("workflow", "grant\n")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"workflow": "-w"}, "cannot name workflows"),
        ({"workflow": "w", "schedule_id": "-nightly"}, "cannot name workflows"),
        ({"workflow": "w", "schedule_id": "s" * 89}, "at most 88"),
        ({"workflow": "w", "schedule_id": "a.b"}, "not a valid name"),
    ],
)
def test_schedules_whose_workflow_ids_would_be_invalid_are_refused(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidMessageError, match=message):
        parse_request({"type": "schedule", "request_id": "r", "cron": "* * * * *", **fields})
    assert parse_request(
        {"type": "schedule", "request_id": "r", "cron": "* * * * *", "workflow": "w"}
    )


def test_datetimes_dates_and_times_are_refused_naming_the_path() -> None:
    from datetime import date
    from datetime import time as time_of_day

    for value in (datetime.now(UTC), date(2026, 1, 2), time_of_day(9, 30)):
        with pytest.raises(PayloadError, match=r"payload\['a'\]\[0\] is a .*isoformat\(\)"):
            encode_payload({"a": [value]})
    with pytest.raises(PayloadError, match=r"payload\['d'\] is a Decimal"):
        from decimal import Decimal

        encode_payload({"d": Decimal("1.5")})
    with pytest.raises(PayloadError, match=r"payload\['s'\] is a set"):
        encode_payload({"s": {1}})


def test_malformed_outcomes_that_name_their_run_and_carry_a_token_become_failures() -> None:
    run = {"workflow_id": "wf1", "seq": 3, "attempt": 2, "step": "s", "token": "t" * 32}
    for bad, problem in (
        ({"kind": "succeeded"}, "a succeeded outcome has no 'result'"),
        ({"kind": "succeeded", "result": {"next_step": "a.b"}}, "'next_step' is not a valid"),
        ({"kind": "failed", "error": {"type": "E"}}, "field 'message' is missing"),
        ({"kind": "exploded"}, "field 'kind' is 'exploded'"),
        ({"kind": "heartbeat", "started_at": "now"}, "'started_at' has the wrong type"),
    ):
        item = {**run, **bad}
        [outcome], refused = decode_outcomes(delivery(batch_body("outcomes", [dumps(item)])))
        assert refused == []
        assert outcome.kind == "failed" and outcome.malformed is not None
        assert problem in outcome.malformed
        assert (outcome.workflow_id, outcome.seq, outcome.attempt) == ("wf1", 3, 2)
        assert outcome.token == run["token"] and outcome.as_sent == item
        assert outcome.error is not None and outcome.error["type"] == "MalformedOutcome"
        assert outcome.error["retryable"] is False and problem in outcome.error["message"]
    # Without a token, or without a run it could be for, it is refused as before.
    for item in (
        {**run, "kind": "succeeded", "token": None},
        {**run, "kind": "succeeded", "seq": 0},
        {**run, "kind": "succeeded", "attempt": "2"},
        {**run, "kind": "succeeded", "workflow_id": "../x"},
    ):
        outcomes, refused = decode_outcomes(delivery(batch_body("outcomes", [dumps(item)])))
        assert outcomes == [] and len(refused) == 1
