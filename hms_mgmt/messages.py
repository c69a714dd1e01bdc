"""What travels on the bus: step messages, outcomes, requests and replies.

Everything is JSON (``application/json``), at most :data:`MAX_MESSAGE_BYTES`
and :data:`MAX_DEPTH` levels deep. Decoders check every field and raise
:class:`InvalidMessageError` with a reason that names what is wrong; the
reason travels with the message into its dead-letter queue.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from bus_adapters.base import JSON_CONTENT_TYPE, Delivery, Message
from hms_mgmt.errors import InvalidMessageError, PayloadError

try:  # orjson is an optional speed-up (the "fast" extra)
    import orjson

    def dumps(value: Any) -> bytes:
        return orjson.dumps(value)  # type: ignore[no-any-return]

    def _loads(data: bytes) -> Any:
        return orjson.loads(data)

    _DECODE_ERRORS: tuple[type[Exception], ...] = (orjson.JSONDecodeError, RecursionError)
except ImportError:  # pragma: no cover - depends on the environment
    _encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)

    def dumps(value: Any) -> bytes:
        return _encoder.encode(value).encode()

    def _loads(data: bytes) -> Any:
        return json.loads(data.decode("utf-8"))

    _DECODE_ERRORS = (json.JSONDecodeError, RecursionError)

MAX_MESSAGE_BYTES = 1024 * 1024
MAX_DEPTH = 64

STEPS_EXCHANGE = "hms.steps"
DLX_EXCHANGE = "hms.dlx"  # what the broker dead-letters
DEAD_EXCHANGE = "hms.dead"  # what the engine gives up on
COMMANDS_QUEUE = "hms.engine.commands"
RESULTS_QUEUE = "hms.engine.results"
DEADLETTERS_QUEUE = "hms.engine.deadletters"

OUTCOME_KINDS = frozenset({"started", "heartbeat", "succeeded", "failed"})
RESULT_KEYS = frozenset({"next_step", "data", "complete", "delay", "run_at", "wait_for", "timeout"})


def new_id() -> str:
    return uuid.uuid4().hex


def depth(value: Any) -> int:
    """Nesting depth of a JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in item)
    return deepest


def encode_payload(payload: Any, *, what: str = "payload") -> bytes:
    """The payload as JSON, refusing what cannot travel: raises :class:`PayloadError`."""
    try:
        body = dumps(payload)
    except (TypeError, ValueError, OverflowError) as exc:
        raise PayloadError(f"{what} is not JSON-serialisable: {exc}") from exc
    if len(body) > MAX_MESSAGE_BYTES:
        raise PayloadError(f"{what} is {len(body)} bytes as JSON; the limit is {MAX_MESSAGE_BYTES}")
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and depth(payload) > MAX_DEPTH:
        raise PayloadError(f"{what} is nested deeper than {MAX_DEPTH} levels")
    return body


def decode_body(body: bytes, content_type: str | None) -> dict[str, Any]:
    """Bytes from the bus as a JSON object, or :class:`InvalidMessageError` saying why not."""
    if content_type != JSON_CONTENT_TYPE:
        raise InvalidMessageError(f"content type {content_type!r} is not {JSON_CONTENT_TYPE}")
    if len(body) > MAX_MESSAGE_BYTES:
        raise InvalidMessageError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessageError(f"body is not UTF-8: {exc}") from exc
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH:
        # Only a body with many brackets can be deep; check it before parsing.
        _check_bracket_depth(body)
    try:
        value = _loads(body)
    except _DECODE_ERRORS as exc:
        raise InvalidMessageError(f"body is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidMessageError(f"body is a JSON {type(value).__name__}, not an object")
    return value


def _check_bracket_depth(body: bytes) -> None:
    level, in_string, escaped = 0, False, False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            level += 1
            if level > MAX_DEPTH:
                raise InvalidMessageError(f"body is nested deeper than {MAX_DEPTH} levels")
        elif byte in (0x5D, 0x7D):
            level -= 1


T = TypeVar("T")


def _field(
    data: dict[str, Any], key: str, kind: type[T] | tuple[type, ...], *, optional: bool = False
) -> Any:
    if key not in data or data[key] is None:
        if optional:
            return None
        raise InvalidMessageError(f"field {key!r} is missing")
    value = data[key]
    if kind is int or kind is float or kind == (int, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and kind is int:
            ok = isinstance(value, int)
        if ok and isinstance(value, float):
            ok = math.isfinite(value)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise InvalidMessageError(f"field {key!r} has the wrong type ({type(value).__name__})")
    return value


def _name(data: dict[str, Any], key: str) -> str:
    from hms_mgmt.definitions import NAME_PATTERN

    value: str = _field(data, key, str)
    if not NAME_PATTERN.match(value):
        raise InvalidMessageError(f"field {key!r} is not a valid name: {value[:100]!r}")
    return value


def _id(data: dict[str, Any], key: str) -> str:
    value: str = _field(data, key, str)
    if not 1 <= len(value) <= 100:
        raise InvalidMessageError(f"field {key!r} must be 1-100 characters")
    return value


def _positive(data: dict[str, Any], key: str) -> int:
    value: int = _field(data, key, int)
    if value < 1:
        raise InvalidMessageError(f"field {key!r} must be >= 1, not {value}")
    return value


@dataclass(frozen=True)
class StepMessage:
    """The engine asks a worker to run one attempt of one step."""

    workflow_id: str
    workflow: str
    step: str
    seq: int
    visit: int
    attempt: int
    payload: Any
    timeout: float | None = None
    context: dict[str, Any] | None = None

    @property
    def topic(self) -> str:
        return f"{self.workflow}.{self.step}"

    @property
    def message_id(self) -> str:
        return f"{self.workflow_id}.{self.seq}"

    @property
    def idempotency_key(self) -> str:
        return f"{self.workflow_id}:{self.step}:{self.visit}"

    def to_message(self) -> Message:
        body = {
            "workflow_id": self.workflow_id,
            "workflow": self.workflow,
            "step": self.step,
            "seq": self.seq,
            "visit": self.visit,
            "attempt": self.attempt,
            "payload": self.payload,
        }
        if self.timeout is not None:
            body["timeout"] = self.timeout
        if self.context:
            body["context"] = self.context
        return Message(
            body=dumps(body),
            exchange=STEPS_EXCHANGE,
            routing_key=self.topic,
            headers=step_headers(self.workflow_id, self.step, self.attempt, self.seq),
            message_id=self.message_id,
        )

    @classmethod
    def decode(cls, delivery: Delivery) -> StepMessage:
        data = decode_body(delivery.body, delivery.content_type)
        message = cls(
            workflow_id=_id(data, "workflow_id"),
            workflow=_name(data, "workflow"),
            step=_name(data, "step"),
            seq=_positive(data, "seq"),
            visit=_positive(data, "visit"),
            attempt=_positive(data, "attempt"),
            payload=data.get("payload"),
            timeout=_field(data, "timeout", (int, float), optional=True),
            context=_field(data, "context", dict, optional=True),
        )
        if (
            delivery.queue
            and not delivery.queue.startswith("hms.")
            and delivery.queue != message.topic
        ):
            raise InvalidMessageError(
                f"message for {message.topic!r} arrived on queue {delivery.queue!r}"
            )
        return message


def step_headers(workflow_id: str, step: str, attempt: int, seq: int) -> dict[str, Any]:
    return {
        "hms-workflow-id": workflow_id,
        "hms-step": step,
        "hms-attempt": attempt,
        "hms-seq": seq,
    }


@dataclass(frozen=True)
class Outcome:
    """A worker reports on one step run: started, heartbeat, succeeded or failed."""

    workflow_id: str
    seq: int
    kind: str
    step: str = ""
    attempt: int = 0
    result: dict[str, Any] | None = None  # normalised, see RESULT_KEYS
    error: dict[str, Any] | None = None  # type, types, message, traceback, retryable, retry_delay
    started_at: float | None = None
    finished_at: float | None = None
    handler: str | None = None
    outcome_id: str = ""

    def to_message(self) -> Message:
        body: dict[str, Any] = {
            "workflow_id": self.workflow_id,
            "seq": self.seq,
            "kind": self.kind,
            "step": self.step,
            "attempt": self.attempt,
        }
        for key in ("result", "error", "started_at", "finished_at", "handler"):
            value = getattr(self, key)
            if value is not None:
                body[key] = value
        return Message(
            body=dumps(body),
            routing_key=RESULTS_QUEUE,
            headers=step_headers(self.workflow_id, self.step, self.attempt, self.seq),
            message_id=self.outcome_id or new_id(),
        )

    @classmethod
    def decode(cls, delivery: Delivery) -> Outcome:
        data = decode_body(delivery.body, delivery.content_type)
        kind = _field(data, "kind", str)
        if kind not in OUTCOME_KINDS:
            raise InvalidMessageError(
                f"field 'kind' is {kind[:50]!r}, not one of {sorted(OUTCOME_KINDS)}"
            )
        result = _field(data, "result", dict, optional=True)
        error = _field(data, "error", dict, optional=True)
        if kind == "succeeded" and result is None:
            raise InvalidMessageError("a succeeded outcome has no 'result'")
        if kind == "failed":
            if error is None:
                raise InvalidMessageError("a failed outcome has no 'error'")
            _field(error, "type", str)
            _field(error, "message", str)
        if result is not None:
            unknown = set(result) - RESULT_KEYS
            if unknown:
                raise InvalidMessageError(f"result has unknown keys {sorted(unknown)}")
        return cls(
            workflow_id=_id(data, "workflow_id"),
            seq=_positive(data, "seq"),
            kind=kind,
            step=_field(data, "step", str, optional=True) or "",
            attempt=_field(data, "attempt", int, optional=True) or 0,
            result=result,
            error=error,
            started_at=_field(data, "started_at", (int, float), optional=True),
            finished_at=_field(data, "finished_at", (int, float), optional=True),
            handler=_field(data, "handler", str, optional=True),
            outcome_id=delivery.message_id or "",
        )


COMMAND_TYPES = frozenset(
    {"define", "start", "status", "wait", "cancel", "retry", "signal", "list"}
)


@dataclass(frozen=True)
class Command:
    """A client's request to the engine; the reply goes to ``reply_to``."""

    type: str
    request_id: str
    body: dict[str, Any]
    reply_to: str | None = None
    deadline: float | None = None

    @classmethod
    def decode(cls, delivery: Delivery) -> Command:
        data = decode_body(delivery.body, delivery.content_type)
        kind = _field(data, "type", str)
        if kind not in COMMAND_TYPES:
            raise InvalidMessageError(f"unknown request type {kind[:50]!r}")
        command = cls(
            type=kind,
            request_id=_id(data, "request_id"),
            body=data,
            reply_to=delivery.reply_to,
            deadline=_field(data, "deadline", (int, float), optional=True),
        )
        if kind in ("start", "status", "wait", "cancel", "retry", "signal"):
            _id(data, "workflow_id")
        if kind in ("start",):
            _name(data, "workflow")
        if kind == "signal":
            _name(data, "signal")
        if kind == "define":
            _field(data, "definition", dict)
        return command


def request_message(
    kind: str,
    fields: dict[str, Any],
    *,
    request_id: str,
    reply_to: str,
    deadline: float | None,
    persistent: bool,
    expiration: float | None,
) -> Message:
    body = {"type": kind, "request_id": request_id, **fields}
    if deadline is not None:
        body["deadline"] = deadline
    return Message(
        body=dumps(body),
        routing_key=COMMANDS_QUEUE,
        message_id=request_id,
        reply_to=reply_to,
        correlation_id=request_id,
        persistent=persistent,
        expiration=expiration,
    )


def reply_message(reply_to: str, request_id: str, ok: bool, value: Any) -> Message:
    body = {"ok": ok, "result": value} if ok else {"ok": False, "error": value}
    return Message(
        body=dumps(body),
        routing_key=reply_to,
        correlation_id=request_id,
        persistent=False,
    )


def dead_letter_message(
    original: Message, *, reason: str, attempts: int | None, last_error: dict[str, Any] | None
) -> Message:
    """A given-up step message for its ``.dlq``, with headers saying why."""
    headers = dict(original.headers)
    headers["x-hms-reason"] = reason
    if attempts is not None:
        headers["x-hms-attempts"] = attempts
    if last_error:
        headers["x-hms-error-type"] = str(last_error.get("type", ""))
        headers["x-hms-error"] = str(last_error.get("message", ""))[:1000]
    return Message(
        body=original.body,
        exchange=DEAD_EXCHANGE,
        routing_key=original.routing_key,
        headers=headers,
        message_id=f"{original.message_id}.dlq",
    )


def normalise_result(value: Any, *, payload: Any, describe: Callable[[], str]) -> dict[str, Any]:
    """A handler's return value as a result dict, or ``ValueError`` naming the handler and value.

    ``None`` passes the step's own payload on; ``nextStep`` is accepted for ``next_step``.
    """
    if value is None:
        return {"data": payload}
    to_result = getattr(value, "to_result", None)
    if callable(to_result):
        value = to_result()
    if not isinstance(value, dict):
        raise ValueError(
            f"{describe()} returned {value!r}; expected a dict such as {{'data': ...}}"
        )
    result = dict(value)
    if "nextStep" in result:
        if "next_step" in result:
            raise ValueError(f"{describe()} returned both 'next_step' and 'nextStep'")
        result["next_step"] = result.pop("nextStep")
    unknown = set(result) - RESULT_KEYS
    if unknown or not result:
        raise ValueError(
            f"{describe()} returned {_short(value)}; expected keys among "
            f"{sorted(RESULT_KEYS)} (unknown: {sorted(unknown)})"
        )
    next_step = result.get("next_step")
    if next_step is not None and not isinstance(next_step, str):
        raise ValueError(f"{describe()} returned next_step {next_step!r}, which is not a step name")
    run_at = result.get("run_at")
    if run_at is not None:
        timestamp = getattr(run_at, "timestamp", None)
        if callable(timestamp):
            result["run_at"] = run_at = timestamp()
        if not isinstance(run_at, int | float):
            raise ValueError(f"{describe()} returned run_at {run_at!r}; expected a datetime")
    for key in ("delay", "timeout"):
        if (
            key in result
            and result[key] is not None
            and (not isinstance(result[key], int | float) or result[key] < 0)
        ):
            raise ValueError(f"{describe()} returned {key} {result[key]!r}; expected seconds >= 0")
    return result


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."
