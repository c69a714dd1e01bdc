"""Step messages: the engine asks a step service to run one attempt of one step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bus_adapters.base import Delivery, Message
from hms_mgmt import tracing
from hms_mgmt.errors import InvalidMessageError
from hms_mgmt.records import branch_of, idempotency_key
from hms_mgmt.topology import DEAD_EXCHANGE, STEPS_EXCHANGE
from hms_mgmt.wire.codec import batch_body, decode_body, dumps
from hms_mgmt.wire.fields import field, ident, items, name, positive, token


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
        return idempotency_key(self.workflow_id, self.step, self.visit, branch_of(self.context))

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
            workflow_id=ident(data, "workflow_id"),
            workflow=name(data, "workflow"),
            step=name(data, "step"),
            seq=positive(data, "seq"),
            visit=positive(data, "visit"),
            attempt=positive(data, "attempt"),
            payload=data.get("payload"),
            timeout=field(data, "timeout", (int, float), optional=True),
            context=field(data, "context", dict, optional=True),
            traceparent=tracing.checked(data.get("traceparent")),  # W3C: ignore an invalid one
            token=token(data),
            schedule_to_start=field(data, "schedule_to_start", (int, float), optional=True),
        )

    @classmethod
    def decode(cls, delivery: Delivery) -> list[StepMessage]:
        """Every run in a step message; any invalid one makes the whole message invalid."""
        data = decode_body(delivery.body, delivery.content_type)
        try:
            steps = [cls.from_json(item) for item in items(data, "steps")]
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


def dead_letter_message(
    original: Message,
    *,
    reason: str,
    attempts: int | None,
    last_error: dict[str, Any] | None,
    at: float,
) -> Message:
    """A given-up step message for its ``.dlq``, with headers saying why and when."""
    headers = dict(original.headers)
    headers["x-hms-reason"] = reason
    headers["x-hms-dead-at"] = at
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
