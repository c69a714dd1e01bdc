"""What travels on the bus: step messages, outcomes, requests and replies.

Everything is JSON (``application/json``), at most :data:`MAX_MESSAGE_BYTES`
and :data:`MAX_DEPTH` levels deep. Decoders check every field and raise
:class:`InvalidMessageError` with a reason that names what is wrong; the
reason travels with the message into its dead-letter queue.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from bus_adapters.base import JSON_CONTENT_TYPE, Delivery, Message
from hms_mgmt import tracing
from hms_mgmt.errors import InvalidMessageError, PayloadError

try:  # orjson is a dependency; the fallback keeps a platform without its wheels working
    import orjson

    def dumps(value: Any) -> bytes:
        return orjson.dumps(value)

    def _loads(data: bytes) -> Any:
        return orjson.loads(data)

    _DECODE_ERRORS: tuple[type[Exception], ...] = (orjson.JSONDecodeError, RecursionError)
except ImportError:  # pragma: no cover - depends on the environment
    _encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)

    def dumps(value: Any) -> bytes:
        return _encoder.encode(value).encode()

    def _loads(data: bytes) -> Any:
        return json.loads(data.decode("utf-8"))

    _DECODE_ERRORS = (ValueError, RecursionError)  # ValueError: over 4300 digits, too

_strict = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def check_finite(value: Any) -> None:
    """Raise ``ValueError`` for NaN or Infinity, which JSON cannot carry (orjson writes null)."""
    _strict.encode(value)


MAX_MESSAGE_BYTES = 1024 * 1024
MAX_PAYLOAD_BYTES = MAX_MESSAGE_BYTES - 16 * 1024  # room for the envelope around a payload
MAX_REPLY_BYTES = 64 * 1024 * 1024  # the engine's answers (a long workflow's state) may be larger
MAX_DEPTH = 64
MAX_DELAY = 10 * 365 * 86400
"""The longest delay, wait timeout or retry delay in seconds (10 years); ``run_at`` may be at
most this far ahead."""
INT_MIN, INT_MAX = -(2**63), 2**64 - 1
"""The integers JSON may carry here: what orjson writes (it reads wider ones as floats)."""
ID_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,99}$")
"""Workflow and request ids; match with ``fullmatch`` (``$`` alone lets a final newline in)."""
ID_RULE = (
    "1-100 letters, digits, '_', '.', ':' or '-', starting with a letter, digit or '_' "
    f"({ID_PATTERN.pattern})"
)
MAX_KEY_LENGTH = 200
"""Idempotency keys: 1 to this many printable characters."""

STEPS_EXCHANGE = "hms.steps"
DLX_EXCHANGE = "hms.dlx"  # what the broker dead-letters
DEAD_EXCHANGE = "hms.dead"  # what the engine gives up on
COMMANDS_EXCHANGE = "hms.commands"  # clients' requests (direct): its own exchange, so that
RESULTS_EXCHANGE = "hms.results"  # ... broker permissions can say who may write which
COMMANDS_QUEUE = "hms.engine.commands"
RESULTS_QUEUE = "hms.engine.results"
DEADLETTERS_QUEUE = "hms.engine.deadletters"
ENGINE_LOCK_QUEUE = "hms.engine.lock"  # exclusive: held by the one engine serving the vhost
ENGINE_RECORD_QUEUE = "hms.engine.record"  # the serving engine's record: host, pid, store

WORKFLOW_STATUSES = frozenset(
    {"pending", "scheduled", "running", "waiting", "succeeded", "failed", "cancelled"}
)
OUTCOME_KINDS = frozenset({"started", "heartbeat", "succeeded", "failed"})
RESULT_KEYS = frozenset({"next_step", "data", "complete", "delay", "run_at", "wait_for", "timeout"})


def new_id() -> str:
    return uuid.uuid4().hex


def short(value: Any, limit: int = 100) -> str:
    """``repr(value)`` for an error message: at most ``limit`` characters, safe for any value."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an integer of over 4300 digits, a deep structure
        bits = value.bit_length() if isinstance(value, int) else None
        text = f"<an integer of {bits} bits>" if bits else f"<a {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_delay(value: Any, what: str, error: type[Exception] = ValueError) -> float:
    """``value`` as seconds from 0 to :data:`MAX_DELAY`, or ``error`` naming it."""
    if not _real(value) or (isinstance(value, float) and not math.isfinite(value)):
        ok = False
    else:
        ok = 0 <= value <= MAX_DELAY
    if not ok:
        raise error(f"{what} must be seconds from 0 to {MAX_DELAY} (10 years), not {short(value)}")
    return float(value)


def check_run_at(
    value: Any, what: str, error: type[Exception] = ValueError, *, now: float | None = None
) -> float:
    """``value`` as a Unix timestamp from 0 to now + :data:`MAX_DELAY`, or ``error`` naming it."""
    latest = (time.time() if now is None else now) + MAX_DELAY
    if not _real(value) or (isinstance(value, float) and not math.isfinite(value)):
        ok = False
    else:
        ok = 0 <= value <= latest
    if not ok:
        raise error(
            f"{what} must be a Unix timestamp from 0 to 10 years from now ({latest:.0f}), "
            f"not {short(value)}"
        )
    return float(value)


def check_schedule_id(value: Any, error: type[Exception] = ValueError) -> str:
    """A schedule id whose ticks' workflow ids (``<id>-<tick>``) are valid ids."""
    if not (isinstance(value, str) and valid_id(f"{value}-99999999999")):
        raise error(
            f"schedule id {short(value)} cannot name workflows: it must start with a letter, "
            "digit or '_' and be at most 88 characters, so that '<id>-<tick>' is an id"
        )
    return value


def valid_id(value: Any) -> bool:
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def check_id(value: Any, what: str, error: type[Exception] = ValueError) -> str:
    """A workflow or request id matching :data:`ID_PATTERN`, or ``error`` naming it."""
    if not valid_id(value):
        raise error(f"{what} {short(value)} is not a valid id: ids are {ID_RULE}")
    return str(value)


def check_key(
    value: Any, what: str = "idempotency key", error: type[Exception] = ValueError
) -> str:
    """An idempotency key: 1 to :data:`MAX_KEY_LENGTH` printable characters, or ``error``."""
    if not (isinstance(value, str) and 1 <= len(value) <= MAX_KEY_LENGTH and value.isprintable()):
        raise error(
            f"{what} {short(value)} must be 1-{MAX_KEY_LENGTH} printable characters "
            "(no control characters)"
        )
    return value


def encode_payload(payload: Any, *, what: str = "payload") -> bytes:
    """The payload as JSON, refusing what cannot travel: raises :class:`PayloadError`."""
    try:
        body = dumps(payload)  # refuses integers beyond 64 bits and keys that are not strings
        if b"null" in body:
            check_finite(payload)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        wide = _wide_int_in(payload)
        named = (
            "" if wide is None else f" ({short(wide, 60)}; integers must be {INT_MIN} to {INT_MAX})"
        )
        raise PayloadError(f"{what} is not JSON-serialisable: {exc}{named}") from exc
    if len(body) > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"{what} is {len(body)} bytes as JSON; the limit is {MAX_PAYLOAD_BYTES}")
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and _deeper_than(payload, MAX_DEPTH):
        raise PayloadError(f"{what} is nested deeper than {MAX_DEPTH} levels")
    return body


def decode_body(
    body: bytes, content_type: str | None, *, limit: int = MAX_MESSAGE_BYTES
) -> dict[str, Any]:
    """Bytes from the bus as a JSON object, or :class:`InvalidMessageError` saying why not."""
    if content_type != JSON_CONTENT_TYPE:
        raise InvalidMessageError(f"content type {content_type!r} is not {JSON_CONTENT_TYPE}")
    if len(body) > limit:
        raise InvalidMessageError(f"message of {len(body)} bytes exceeds {limit}")
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessageError(f"body is not UTF-8: {exc}") from exc
    try:
        value = _loads(body)  # orjson refuses nesting beyond 1024 levels by itself, safely
    except _DECODE_ERRORS as exc:
        if "depth limit" in str(exc):
            raise InvalidMessageError(f"body is nested deeper than {MAX_DEPTH} levels") from exc
        _refuse_wide_integers(body)  # orjson calls one beyond 1e308 "infinity"
        raise InvalidMessageError(f"body is not JSON: {exc}") from exc
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and _deeper_than(value, MAX_DEPTH):
        raise InvalidMessageError(f"body is nested deeper than {MAX_DEPTH} levels")
    _refuse_wide_integers(body)
    if not isinstance(value, dict):
        raise InvalidMessageError(f"body is a JSON {type(value).__name__}, not an object")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether a decoded JSON value nests deeper than ``limit``; only containers are walked."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if level > limit:
            return True
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, dict | list):
                stack.append((child, level + 1))
    return False


_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
# A number of 19 digits or more (-2**63 has 19, 2**64 - 1 has 20) where JSON puts numbers:
# digits inside strings (hex ids, tokens) seldom follow one of these.
_LONG_DIGITS = re.compile(rb"[:,\[]\s*-?[0-9]{19}")
_NUMBER = re.compile(rb"-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def _refuse_wide_integers(body: bytes) -> None:
    """Refuse JSON text with an integer literal outside 64 bits; scanned only when the body
    has a run of 19 digits."""
    if _LONG_DIGITS.search(body):
        wide = _wide_literal(body)
        if wide is not None:
            raise InvalidMessageError(
                f"body has the integer {wide}, outside 64 bits ({INT_MIN} to {INT_MAX}); "
                "send such a number as a string"
            )


def _wide_literal(body: bytes) -> str | None:
    """The first integer literal of (valid) JSON text outside 64 bits, shortened; else None.

    orjson reads such an integer as a float, silently; strings are dropped first.
    """
    for match in _NUMBER.finditer(_STRINGS.sub(b'""', body)):
        literal = match.group()
        if match.group(1) or match.group(2) or len(literal) < 19:
            continue  # a fraction or an exponent is a float anyway
        digits = literal.lstrip(b"-").lstrip(b"0")
        if len(digits) > 20 or not INT_MIN <= int(literal) <= INT_MAX:
            text = literal.decode()
            return text if len(text) <= 40 else f"{text[:30]}... ({len(digits)} digits)"
    return None


def _wide_int_in(value: Any) -> int | None:
    """The first integer in a value that is outside 64 bits (for an error message)."""
    stack, seen = [value], 0
    while stack and seen < 1_000_000:
        item = stack.pop()
        seen += 1
        if isinstance(item, int) and not isinstance(item, bool):
            if not INT_MIN <= item <= INT_MAX:
                return item
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return None


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
    if not NAME_PATTERN.fullmatch(value):
        raise InvalidMessageError(f"field {key!r} is not a valid name: {value[:100]!r}")
    return value


def _id(data: dict[str, Any], key: str) -> str:
    return check_id(_field(data, key, str), f"field {key!r}", InvalidMessageError)


def _token(data: dict[str, Any]) -> str | None:
    value: str | None = _field(data, "token", str, optional=True)
    if value is not None and len(value) > 128:
        raise InvalidMessageError("field 'token' is longer than 128 characters")
    return value


def _positive(data: dict[str, Any], key: str) -> int:
    value: int = _field(data, key, int)
    if value < 1:
        raise InvalidMessageError(f"field {key!r} must be >= 1, not {value}")
    return value


def _items(data: dict[str, Any], key: str) -> list[Any]:
    items = data.get(key)
    if not isinstance(items, list) or not items:
        raise InvalidMessageError(f"field {key!r} must be a non-empty list")
    if len(items) > MAX_BATCH:
        raise InvalidMessageError(f"{len(items)} items in {key!r}; at most {MAX_BATCH}")
    return items


MAX_BATCH = 1000
"""Items in one message at most: step runs, outcomes, requests or replies."""
BATCH_BYTES = 512 * 1024
"""A batch stops growing past this many bytes (a single item may be larger)."""


def batches(
    items: Iterable[T], size_of: Callable[[T], int], *, max_items: int = MAX_BATCH
) -> Iterator[list[T]]:
    """Items grouped into batches of at most ``max_items`` and :data:`BATCH_BYTES`.

    A batch is closed before an item that would take it past the byte limit, so a
    batch never exceeds it unless a single item does (and then it travels alone).
    """
    batch: list[T] = []
    size = 0
    for item in items:
        length = size_of(item) + 1
        if batch and (len(batch) >= max_items or size + length > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += length
    if batch:
        yield batch


def batch_body(key: str, items: list[bytes]) -> bytes:
    """``{"<key>": [item, ...]}`` from items already encoded (no re-encoding)."""
    return b'{"' + key.encode() + b'":[' + b",".join(items) + b"]}"


@dataclass(frozen=True)
class StepMessage:
    """The engine asks a worker to run one attempt of one step.

    On the wire a message carries a list of them (``{"steps": [...]}``), all for
    the same queue: the relay groups runs published together, so a busy engine
    sends one message for many runs. A message is acked, redelivered and
    dead-lettered as a whole; every run in it is still applied at most once.
    """

    workflow_id: str
    workflow: str
    step: str
    seq: int
    visit: int
    attempt: int
    payload: Any
    timeout: float | None = None
    context: dict[str, Any] | None = None
    traceparent: str | None = None  # the workflow's W3C trace context
    token: str | None = None  # the engine's signature of this run; outcomes carry it back
    schedule_to_start: float | None = None  # the engine wants a "started" report at once

    @property
    def topic(self) -> str:
        return f"{self.workflow}.{self.step}"

    @property
    def message_id(self) -> str:
        return f"{self.workflow_id}.{self.seq}"

    @property
    def idempotency_key(self) -> str:
        return f"{self.workflow_id}:{self.step}:{self.visit}"

    def encode(self, token: str | None = None) -> bytes:
        """This run as one item of a step message, signed with ``token`` if given."""
        token = token or self.token
        body: dict[str, Any] = {
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
        if self.traceparent is not None:
            body["traceparent"] = self.traceparent
        if token is not None:
            body["token"] = token
        if self.schedule_to_start is not None:
            body["schedule_to_start"] = self.schedule_to_start
        return dumps(body)

    def to_message(self) -> Message:
        """A message carrying just this run."""
        return Message(
            body=batch_body("steps", [self.encode()]),
            exchange=STEPS_EXCHANGE,
            routing_key=self.topic,
            headers=step_headers(
                self.workflow_id, self.step, self.attempt, self.seq, self.traceparent
            ),
            message_id=self.message_id,
        )

    @classmethod
    def from_json(cls, data: Any) -> StepMessage:
        if not isinstance(data, dict):
            raise InvalidMessageError(f"a step is a JSON {type(data).__name__}, not an object")
        return cls(
            workflow_id=_id(data, "workflow_id"),
            workflow=_name(data, "workflow"),
            step=_name(data, "step"),
            seq=_positive(data, "seq"),
            visit=_positive(data, "visit"),
            attempt=_positive(data, "attempt"),
            payload=data.get("payload"),
            timeout=_field(data, "timeout", (int, float), optional=True),
            context=_field(data, "context", dict, optional=True),
            traceparent=tracing.checked(data.get("traceparent")),  # W3C: ignore an invalid one
            token=_token(data),
            schedule_to_start=_field(data, "schedule_to_start", (int, float), optional=True),
        )

    @classmethod
    def decode(cls, delivery: Delivery) -> list[StepMessage]:
        """Every run in a step message; any invalid one makes the whole message invalid."""
        data = decode_body(delivery.body, delivery.content_type)
        try:
            steps = [cls.from_json(item) for item in _items(data, "steps")]
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            if isinstance(exc, InvalidMessageError):
                raise
            raise InvalidMessageError(f"malformed step: {exc!r}") from exc
        topics = {step.topic for step in steps}
        if len(topics) > 1:
            raise InvalidMessageError(
                f"one message carries steps of several queues: {sorted(topics)}"
            )
        topic = steps[0].topic
        if delivery.queue and not delivery.queue.startswith("hms.") and delivery.queue != topic:
            raise InvalidMessageError(f"message for {topic!r} arrived on queue {delivery.queue!r}")
        return steps


def step_headers(
    workflow_id: str, step: str, attempt: int, seq: int, traceparent: str | None = None
) -> dict[str, Any]:
    headers: dict[str, Any] = {
        "hms-workflow-id": workflow_id,
        "hms-step": step,
        "hms-attempt": attempt,
        "hms-seq": seq,
    }
    if traceparent is not None:
        headers["traceparent"] = traceparent
    return headers


@dataclass(frozen=True)
class Outcome:
    """A worker reports on one step run: started, heartbeat, succeeded or failed.

    Outcomes travel in batches (``{"outcomes": [...]}``): a worker sends
    whatever has finished since its last publish in one message.
    """

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
    token: str | None = None  # the step message's token, echoed

    @functools.cached_property
    def encoded(self) -> bytes:
        """This outcome as one item of an outcomes message (encoded once)."""
        body: dict[str, Any] = {
            "workflow_id": self.workflow_id,
            "seq": self.seq,
            "kind": self.kind,
            "step": self.step,
            "attempt": self.attempt,
        }
        for key in ("result", "error", "started_at", "finished_at", "handler", "token"):
            value = getattr(self, key)
            if value is not None:
                body[key] = value
        return dumps(body)

    @classmethod
    def from_json(cls, data: Any) -> Outcome:
        if not isinstance(data, dict):
            raise InvalidMessageError(f"an outcome is a JSON {type(data).__name__}, not an object")
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
            _check_result(result)
        if error is not None:
            _check_error(error)
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
            token=_token(data),
        )


def _check_result(result: dict[str, Any]) -> None:
    """The fields of a result the engine acts on have the types it needs."""
    for key in ("delay", "timeout"):
        if result.get(key) is not None:
            check_delay(result[key], f"result field {key!r}", InvalidMessageError)
    if result.get("run_at") is not None:
        check_run_at(result["run_at"], "result field 'run_at'", InvalidMessageError)
    for key in ("next_step", "wait_for"):
        if result.get(key) is not None:
            _name(result, key)
    _field(result, "complete", bool, optional=True)


def _check_error(error: dict[str, Any]) -> None:
    types = error.get("types")
    if types is not None and (
        not isinstance(types, list) or not all(isinstance(t, str) for t in types)
    ):
        raise InvalidMessageError("error field 'types' must be a list of strings")
    _field(error, "retryable", bool, optional=True)
    if error.get("retry_delay") is not None:
        check_delay(error["retry_delay"], "error field 'retry_delay'", InvalidMessageError)


Refused = tuple[Any, str]
"""An item of a batch that did not validate, and why."""


def _decode_items(
    delivery: Delivery, key: str, parse: Callable[[Any], T]
) -> tuple[list[T], list[Refused]]:
    """The valid items of a batch message and the refused ones; a bad envelope raises."""
    data = decode_body(delivery.body, delivery.content_type)
    good: list[T] = []
    refused: list[Refused] = []
    for item in _items(data, key):
        try:
            good.append(parse(item))
        except InvalidMessageError as exc:
            refused.append((item, str(exc)))
        except (TypeError, ValueError, KeyError, AttributeError) as exc:  # a check we missed
            refused.append((item, f"malformed item: {exc!r}"))
    return good, refused


def decode_outcomes(delivery: Delivery) -> tuple[list[Outcome], list[Refused]]:
    return _decode_items(delivery, "outcomes", Outcome.from_json)


def outcomes_message(encoded: list[bytes]) -> Message:
    return Message(
        body=batch_body("outcomes", encoded),
        exchange=RESULTS_EXCHANGE,
        routing_key=RESULTS_QUEUE,
        message_id=new_id(),
        headers={"hms-count": len(encoded)},
    )


COMMAND_TYPES = frozenset(
    {"define", "start", "status", "wait", "cancel", "retry", "signal", "list"}
    | {"schedule", "unschedule", "schedules"}
)


@dataclass(frozen=True)
class Command:
    """A client's request to the engine; the reply goes to ``reply_to``.

    Requests travel in batches (``{"requests": [...]}``) and their replies too
    (``{"replies": [...]}``, matched by ``request_id``).
    """

    type: str
    request_id: str
    body: dict[str, Any]
    reply_to: str | None = None
    deadline: float | None = None

    @classmethod
    def from_json(cls, data: Any, reply_to: str | None = None) -> Command:
        if not isinstance(data, dict):
            raise InvalidMessageError(f"a request is a JSON {type(data).__name__}, not an object")
        kind = _field(data, "type", str)
        if kind not in COMMAND_TYPES:
            raise InvalidMessageError(f"unknown request type {kind[:50]!r}")
        command = cls(
            type=kind,
            request_id=_id(data, "request_id"),
            body=data,
            reply_to=reply_to,
            deadline=_field(data, "deadline", (int, float), optional=True),
        )
        if kind in ("start", "status", "wait", "cancel", "retry", "signal"):
            _id(data, "workflow_id")
        if kind == "start":
            _name(data, "workflow")
            if data.get("delay") is not None:
                check_delay(data["delay"], "field 'delay'", InvalidMessageError)
            if data.get("run_at") is not None:
                check_run_at(data["run_at"], "field 'run_at'", InvalidMessageError)
            if data.get("idempotency_key") is not None:
                check_key(data["idempotency_key"], "field 'idempotency_key'", InvalidMessageError)
        if kind == "wait":
            _field(data, "hold", (int, float), optional=True)
        if kind == "signal":
            _name(data, "signal")
        if kind == "define":
            _field(data, "definition", dict)
        if kind == "schedule":
            _name(data, "workflow")
            _field(data, "cron", str)
            if data.get("schedule_id") is not None:
                _name(data, "schedule_id")
            check_schedule_id(data.get("schedule_id") or data["workflow"], InvalidMessageError)
        if kind == "unschedule":
            _name(data, "schedule_id")
        if kind == "list":
            status = data.get("status")
            if status is not None and (
                not isinstance(status, str) or status not in WORKFLOW_STATUSES
            ):
                raise InvalidMessageError(f"status {str(status)[:50]!r} is not a workflow status")
            if data.get("name") is not None:
                _name(data, "name")
            limit = _field(data, "limit", int, optional=True)
            if limit is not None and not 1 <= limit <= 1000:
                raise InvalidMessageError(f"limit must be 1 to 1000, not {limit}")
        return command


def decode_requests(delivery: Delivery) -> tuple[list[Command], list[Refused]]:
    return _decode_items(
        delivery, "requests", lambda item: Command.from_json(item, delivery.reply_to)
    )


def request_item(
    kind: str, fields: dict[str, Any], *, request_id: str, deadline: float | None
) -> bytes:
    body = {"type": kind, "request_id": request_id, **fields}
    if deadline is not None:
        body["deadline"] = deadline
    return dumps(body)


def requests_message(
    items: list[bytes], *, reply_to: str, persistent: bool, expiration: float | None
) -> Message:
    return Message(
        body=batch_body("requests", items),
        exchange=COMMANDS_EXCHANGE,
        routing_key=COMMANDS_QUEUE,
        message_id=new_id(),
        reply_to=reply_to,
        persistent=persistent,
        expiration=expiration,
        headers={"hms-count": len(items)},
    )


def reply_item(request_id: str, ok: bool, value: Any) -> bytes:
    if ok:
        return dumps({"request_id": request_id, "ok": True, "result": value})
    return dumps({"request_id": request_id, "ok": False, "error": value})


def replies_message(reply_to: str, items: list[bytes]) -> Message:
    return Message(body=batch_body("replies", items), routing_key=reply_to, persistent=False)


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
            try:
                result["run_at"] = run_at = timestamp()
            except (OverflowError, ValueError, OSError) as exc:
                raise ValueError(f"{describe()} returned run_at {short(run_at)}: {exc}") from None
        try:
            check_run_at(run_at, "run_at")
        except ValueError as exc:
            raise ValueError(f"{describe()} returned run_at {short(run_at)}; {exc}") from None
    for key in ("delay", "timeout"):
        if result.get(key) is not None:
            try:
                check_delay(result[key], key)
            except ValueError as exc:
                raise ValueError(
                    f"{describe()} returned {key} {short(result[key])}; {exc}"
                ) from None
    return result


def _short(value: Any) -> str:
    return short(value, 200)
