"""Requests from clients to the engine, and the engine's replies."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as field_
from typing import Any, ClassVar

from bus_adapters.base import Delivery, Message
from hms_mgmt import tracing
from hms_mgmt.bounds import (
    DEFAULT_PRIORITY,
    check_attributes,
    check_delay,
    check_key,
    check_priority,
    check_run_at,
    check_schedule_id,
    check_time,
)
from hms_mgmt.definitions import WorkflowDefinition
from hms_mgmt.errors import DefinitionError, InvalidMessageError
from hms_mgmt.records import LIST_FILTERS
from hms_mgmt.topology import COMMANDS_EXCHANGE, COMMANDS_QUEUE
from hms_mgmt.wire.codec import batch_body, dumps, new_id
from hms_mgmt.wire.fields import Refused, decode_items, field, ident, name, positive, token


@dataclass(frozen=True, kw_only=True)
class Request:
    """A client's request to the engine, decoded and checked once, at the edge.

    Requests travel in batches (``{"requests": [...]}``) and their replies too
    (``{"replies": [...]}``, matched by ``request_id``); the reply goes to ``reply_to``.
    ``raw`` is the item as it came, for a dead letter should the engine refuse it.
    """

    kind: ClassVar[str]
    request_id: str
    reply_to: str | None = None
    deadline: float | None = None
    raw: dict[str, Any] = field_(default_factory=dict, repr=False, compare=False)
    workflow_id: str = ""  # the workflow the request is about ("" for none)

    @classmethod
    def parse(cls, data: dict[str, Any], **common: Any) -> Request:
        return cls(**common)


@dataclass(frozen=True, kw_only=True)
class _About(Request):
    """A request about one workflow (its ``workflow_id`` is required)."""

    @classmethod
    def parse(cls, data: dict[str, Any], **common: Any) -> Request:
        return cls(workflow_id=ident(data, "workflow_id"), **common)


@dataclass(frozen=True, kw_only=True)
class DefineRequest(Request):
    """A definition to store; one that does not parse is answered with a ``DefinitionError``
    naming what is wrong (``problem``), like any definition the engine refuses."""

    kind = "define"
    definition: WorkflowDefinition | None
    problem: str | None = None

    @classmethod
    def parse(cls, data: dict[str, Any], **common: Any) -> Request:
        body = field(data, "definition", dict)
        try:
            return cls(definition=WorkflowDefinition.from_json(body), **common)
        except (DefinitionError, TypeError, ValueError, KeyError, AttributeError) as exc:
            return cls(definition=None, problem=f"malformed definition: {exc}", **common)


@dataclass(frozen=True, kw_only=True)
class StartRequest(_About):
    kind = "start"
    workflow: str
    payload: Any = None
    delay: float | None = None
    run_at: float | None = None
    idempotency_key: str | None = None
    traceparent: str | None = None
    attributes: dict[str, str] = field_(default_factory=dict)  # business keys
    priority: int = DEFAULT_PRIORITY  # 1 (first) to 5 (last)

    @classmethod
    def parse(cls, data: dict[str, Any], **common: Any) -> Request:
        delay, run_at, key = data.get("delay"), data.get("run_at"), data.get("idempotency_key")
        priority = data.get("priority")
        attributes = data.get("attributes")
        return cls(
            workflow_id=ident(data, "workflow_id"),
            workflow=name(data, "workflow"),
            payload=data.get("payload"),
            delay=None if delay is None else check_delay(delay, "field 'delay'", _INVALID),
            run_at=None if run_at is None else check_run_at(run_at, "field 'run_at'", _INVALID),
            idempotency_key=None
            if key is None
            else check_key(key, "field 'idempotency_key'", _INVALID),
            traceparent=tracing.checked(data.get("traceparent")),  # W3C: ignore an invalid one
            attributes={}
            if attributes is None
            else check_attributes(attributes, "field 'attributes'", _INVALID),
            priority=DEFAULT_PRIORITY
            if priority is None
            else check_priority(priority, "field 'priority'", _INVALID),
            **common,
        )


@dataclass(frozen=True, kw_only=True)
class StatusRequest(_About):
    kind = "status"


@dataclass(frozen=True, kw_only=True)
class WaitRequest(_About):
    kind = "wait"
    hold: float | None = None  # seconds the engine may hold the answer for a change

    @classmethod
    def parse(cls, data: dict[str, Any], **common: Any) -> Request:
        hold = field(data, "hold", (int, float), optional=True)
        return cls(workflow_id=ident(data, "workflow_id"), hold=hold, **common)


@dataclass(frozen=True, kw_only=True)
class _AboutWithReason(_About):
    """A request about one workflow that an operator may give a reason for."""

    reason: str | None = None

    @classmethod
    def parse(cls, data: dict[str, Any], **common: Any) -> Request:
        reason = data.get("reason")
        return cls(
            workflow_id=ident(data, "workflow_id"),
            reason=None if reason is None else str(reason)[:1000],
            **common,
        )


@dataclass(frozen=True, kw_only=True)
class CancelRequest(_AboutWithReason):
    kind = "cancel"
    compensate: bool = False  # compensate the steps that succeeded, then end compensated

    @classmethod
    def parse(cls, data: dict[str, Any], **common: Any) -> Request:
        compensate = data.get("compensate", False)
        if not isinstance(compensate, bool):
            raise InvalidMessageError(f"compensate must be true or false, not {compensate!r}")
        reason = data.get("reason")
        return cls(
            workflow_id=ident(data, "workflow_id"),
            reason=None if reason is None else str(reason)[:1000],
            compensate=compensate,
            **common,
        )


@dataclass(frozen=True, kw_only=True)
class RetryRequest(_About):
    kind = "retry"


@dataclass(frozen=True, kw_only=True)
class SignalRequest(_About):
    kind = "signal"
    signal: str
    data: Any = None

    @classmethod
    def parse(cls, data: dict[str, Any], **common: Any) -> Request:
        return cls(
            workflow_id=ident(data, "workflow_id"),
            signal=name(data, "signal"),
            data=data.get("data"),
            **common,
        )


@dataclass(frozen=True, kw_only=True)
class PauseRequest(_AboutWithReason):
    kind = "pause"


@dataclass(frozen=True, kw_only=True)
class ResumeRequest(_About):
    kind = "resume"


@dataclass(frozen=True, kw_only=True)
class PauseTypeRequest(Request):
    """Pause a workflow type, or one step of it (``step``)."""

    kind = "pause_type"
    workflow: str
    step: str | None = None
    reason: str | None = None

    @classmethod
    def parse(cls, data: dict[str, Any], **common: Any) -> Request:
        reason = data.get("reason")
        return cls(
            workflow=name(data, "workflow"),
            step=None if data.get("step") is None else name(data, "step"),
            reason=None if reason is None else str(reason)[:1000],
            **common,
        )


@dataclass(frozen=True, kw_only=True)
class ResumeTypeRequest(Request):
    """Resume a paused workflow type (or step of it): what it held is released, in order."""

    kind = "resume_type"
    workflow: str
    step: str | None = None

    @classmethod
    def parse(cls, data: dict[str, Any], **common: Any) -> Request:
        return cls(
            workflow=name(data, "workflow"),
            step=None if data.get("step") is None else name(data, "step"),
            **common,
        )


SIGNALS_ON_RESET = ("keep", "drop")


@dataclass(frozen=True, kw_only=True)
class ResetRequest(_About):
    """Back to ``to_step``: with ``data`` if the request has that field, else the step's
    last input."""

    kind = "reset"
    to_step: str
    data: Any = None
    has_data: bool = False
    signals: str = "keep"
    reason: str | None = None

    @classmethod
    def parse(cls, data: dict[str, Any], **common: Any) -> Request:
        signals = data.get("signals", "keep")
        if signals not in SIGNALS_ON_RESET:
            raise InvalidMessageError(
                f"field 'signals' must be 'keep' or 'drop', not {str(signals)[:50]!r}"
            )
        reason = data.get("reason")
        return cls(
            workflow_id=ident(data, "workflow_id"),
            to_step=name(data, "to_step"),
            data=data.get("data"),
            has_data="data" in data,
            signals=signals,
            reason=None if reason is None else str(reason)[:1000],
            **common,
        )


@dataclass(frozen=True, kw_only=True)
class ListRequest(Request):
    kind = "list"
    status: str | None = None
    name: str | None = None
    limit: int = 50
    attributes: dict[str, str] = field_(default_factory=dict)  # all must match
    since: float | None = None  # created at or after (seconds since the epoch)
    until: float | None = None  # created before

    @classmethod
    def parse(cls, data: dict[str, Any], **common: Any) -> Request:
        status = data.get("status")
        if status is not None and (not isinstance(status, str) or status not in LIST_FILTERS):
            raise InvalidMessageError(
                f"status {str(status)[:50]!r} is not a workflow status (nor 'queued')"
            )
        limit = field(data, "limit", int, optional=True)
        if limit is not None and not 1 <= limit <= 1000:
            raise InvalidMessageError(f"limit must be 1 to 1000, not {limit}")
        attributes = data.get("attributes")
        since, until = (
            None if data.get(key) is None else check_time(data[key], f"field {key!r}", _INVALID)
            for key in ("since", "until")
        )
        return cls(
            status=status,
            name=None if data.get("name") is None else name(data, "name"),
            limit=50 if limit is None else limit,
            since=since,
            until=until,
            attributes={}
            if attributes is None
            else check_attributes(attributes, "field 'attributes'", _INVALID),
            **common,
        )


@dataclass(frozen=True, kw_only=True)
class ScheduleRequest(Request):
    kind = "schedule"
    schedule_id: str
    workflow: str
    cron: str
    timezone: str = "UTC"
    payload: Any = None
    catch_up: str = "latest"

    @classmethod
    def parse(cls, data: dict[str, Any], **common: Any) -> Request:
        workflow = name(data, "workflow")
        schedule_id = workflow if data.get("schedule_id") is None else name(data, "schedule_id")
        check_schedule_id(schedule_id, _INVALID)
        return cls(
            schedule_id=schedule_id,
            workflow=workflow,
            cron=field(data, "cron", str),
            timezone=str(data.get("timezone") or "UTC"),
            payload=data.get("payload"),
            catch_up=str(data.get("catch_up") or "latest"),
            **common,
        )


@dataclass(frozen=True, kw_only=True)
class UnscheduleRequest(Request):
    kind = "unschedule"
    schedule_id: str

    @classmethod
    def parse(cls, data: dict[str, Any], **common: Any) -> Request:
        return cls(schedule_id=name(data, "schedule_id"), **common)


@dataclass(frozen=True, kw_only=True)
class SchedulesRequest(Request):
    kind = "schedules"


@dataclass(frozen=True, kw_only=True)
class RedeliveredRequest(_About):
    """A step service's question about a step message delivered again (``redelivered``):
    run it, or dead-letter it? The poison guard of classic step queues: the engine counts
    the run's deliveries in its store and says ``dead_letter`` past the delivery limit.
    ``delivery`` is the worker's own id for this delivery: asked twice, it counts once."""

    kind = "redelivered"
    seq: int
    attempt: int
    token: str | None
    delivery: str

    @classmethod
    def parse(cls, data: dict[str, Any], **common: Any) -> Request:
        return cls(
            workflow_id=ident(data, "workflow_id"),
            seq=positive(data, "seq"),
            attempt=positive(data, "attempt"),
            token=token(data),
            delivery=ident(data, "delivery"),
            **common,
        )


REQUESTS: dict[str, type[Request]] = {
    kind.kind: kind
    for kind in (
        DefineRequest,
        StartRequest,
        StatusRequest,
        WaitRequest,
        CancelRequest,
        RetryRequest,
        SignalRequest,
        PauseRequest,
        ResumeRequest,
        ResetRequest,
        PauseTypeRequest,
        ResumeTypeRequest,
        ListRequest,
        ScheduleRequest,
        UnscheduleRequest,
        SchedulesRequest,
        RedeliveredRequest,
    )
}
"""Every request type by its ``type`` on the wire."""
_INVALID = InvalidMessageError


def parse_request(data: Any, reply_to: str | None = None) -> Request:
    """One request item, checked; :class:`InvalidMessageError` names what is wrong."""
    if not isinstance(data, dict):
        raise InvalidMessageError(f"a request is a JSON {type(data).__name__}, not an object")
    kind = field(data, "type", str)
    request_type = REQUESTS.get(kind)
    if request_type is None:
        raise InvalidMessageError(f"unknown request type {kind[:50]!r}")
    return request_type.parse(
        data,
        request_id=ident(data, "request_id"),
        reply_to=reply_to,
        deadline=field(data, "deadline", (int, float), optional=True),
        raw=data,
    )


def decode_requests(delivery: Delivery) -> tuple[list[Request], list[Refused]]:
    return decode_items(delivery, "requests", lambda item: parse_request(item, delivery.reply_to))


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
