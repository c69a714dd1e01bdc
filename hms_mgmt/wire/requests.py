"""Requests from clients to the engine, and the engine's replies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bus_adapters.base import Delivery, Message
from hms_mgmt.bounds import check_delay, check_key, check_run_at, check_schedule_id
from hms_mgmt.errors import InvalidMessageError
from hms_mgmt.topology import COMMANDS_EXCHANGE, COMMANDS_QUEUE
from hms_mgmt.wire.codec import batch_body, dumps, new_id
from hms_mgmt.wire.fields import Refused, decode_items, field, ident, name

WORKFLOW_STATUSES = frozenset(
    {"pending", "scheduled", "running", "waiting", "succeeded", "failed", "cancelled"}
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
        kind = field(data, "type", str)
        if kind not in COMMAND_TYPES:
            raise InvalidMessageError(f"unknown request type {kind[:50]!r}")
        command = cls(
            type=kind,
            request_id=ident(data, "request_id"),
            body=data,
            reply_to=reply_to,
            deadline=field(data, "deadline", (int, float), optional=True),
        )
        if kind in ("start", "status", "wait", "cancel", "retry", "signal"):
            ident(data, "workflow_id")
        if kind == "start":
            name(data, "workflow")
            if data.get("delay") is not None:
                check_delay(data["delay"], "field 'delay'", InvalidMessageError)
            if data.get("run_at") is not None:
                check_run_at(data["run_at"], "field 'run_at'", InvalidMessageError)
            if data.get("idempotency_key") is not None:
                check_key(data["idempotency_key"], "field 'idempotency_key'", InvalidMessageError)
        if kind == "wait":
            field(data, "hold", (int, float), optional=True)
        if kind == "signal":
            name(data, "signal")
        if kind == "define":
            field(data, "definition", dict)
        if kind == "schedule":
            name(data, "workflow")
            field(data, "cron", str)
            if data.get("schedule_id") is not None:
                name(data, "schedule_id")
            check_schedule_id(data.get("schedule_id") or data["workflow"], InvalidMessageError)
        if kind == "unschedule":
            name(data, "schedule_id")
        if kind == "list":
            status = data.get("status")
            if status is not None and (
                not isinstance(status, str) or status not in WORKFLOW_STATUSES
            ):
                raise InvalidMessageError(f"status {str(status)[:50]!r} is not a workflow status")
            if data.get("name") is not None:
                name(data, "name")
            limit = field(data, "limit", int, optional=True)
            if limit is not None and not 1 <= limit <= 1000:
                raise InvalidMessageError(f"limit must be 1 to 1000, not {limit}")
        return command


def decode_requests(delivery: Delivery) -> tuple[list[Command], list[Refused]]:
    return decode_items(
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
