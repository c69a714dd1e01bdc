"""A four-step grant workflow, ``simpleGrant``, served with pika and json only.

It is the grant approval of the Python example (``examples/grant_approval``) without its
parallel checks, its inspection child workflow and its compensation: those are the same
messages, only more of them. It has a name of its own, so that running both examples on
one vhost does not make one redefine the other's workflow.

What a step service does, in order (docs/wire-format.md says why):

1. define the workflow: a ``define`` request to the exchange ``hms.commands``, answered on
   RabbitMQ's direct reply-to once the engine has stored it and declared its step queues;
2. consume each step queue ``simpleGrant.<step>`` (manual acks, a prefetch);
3. for each step message (``{"steps": [...]}``), for each run in it: report ``started``,
   run the handler, report ``succeeded`` (or ``failed``) with ``started_at``,
   ``finished_at`` and the run's ``token`` echoed, on the exchange ``hms.results``;
4. ack the step message only once the broker has confirmed the outcomes (publisher
   confirms, ``mandatory``): a crash before that redelivers the step, and the engine
   ignores an outcome for a run that is no longer current.

Settings: ``HMS_BROKER_URL`` (default ``amqp://guest:guest@localhost:5672/``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.parse
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pika
import pika.exceptions

WORKFLOW = "simpleGrant"
STEPS = ["validateApp", "creditCheck", "scheduleInspection", "finalize"]
INSPECTION_DEADLINE = 14 * 24 * 3600  # no report in two weeks: the workflow fails
JSON = "application/json"


class NonRetryable(Exception):
    """Fail the attempt and tell the engine not to try again."""


# -- the handlers: payload (and context) in, a result out ------------------------------------


def validate_app(payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    if not payload.get("application_id"):
        raise NonRetryable("application has no application_id")
    return {"next_step": "creditCheck", "data": {**payload, "validated": True}}


def credit_check(payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    return {"data": {**payload, "credit_score": 750}}  # no next_step: the next in order


def schedule_inspection(payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    booked = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0).isoformat()
    return {  # wait for signal("inspectionReport", report), then run finalize
        "wait_for": "inspectionReport",
        "timeout": INSPECTION_DEADLINE,
        "next_step": "finalize",
        "data": {**payload, "inspection_booked_for": booked},
    }


def finalize(payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    report = context.get("signal") or {}
    approved = payload.get("credit_score", 0) >= 700 and bool(report.get("passed"))
    return {"data": {**payload, "inspection_report": report, "approved": approved}}


HANDLERS = {
    "validateApp": validate_app,
    "creditCheck": credit_check,
    "scheduleInspection": schedule_inspection,
    "finalize": finalize,
}

DEFINITION: dict[str, Any] = {  # what hms_mgmt's define_workflow(WORKFLOW, STEPS) sends
    "name": WORKFLOW,
    "steps": [{"name": step, "retry": None, "timeout": None} for step in STEPS],
    "retry": {},  # the default policy: 3 attempts, backoff from 1 s
    "on_error": None,
}


# -- the wire ---------------------------------------------------------------------------------


class Service:
    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.user = urllib.parse.unquote(parts.username or "guest")
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()  # basic_publish now waits for the broker's confirm
        self.served = 0

    def properties(self, **more: Any) -> pika.BasicProperties:
        return pika.BasicProperties(
            content_type=JSON,  # anything else is refused
            delivery_mode=2,  # persistent
            message_id=uuid.uuid4().hex,
            user_id=self.user,  # RabbitMQ checks it; the engine may be told to trust only some
            **more,
        )

    def define(self, timeout: float = 60.0) -> dict[str, Any]:
        """Send the workflow's definition and wait for the engine's answer.

        Until an engine has declared ``hms.commands`` the broker refuses the publish (it
        closes the channel): then wait a second and try again, until ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._define(deadline)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if time.monotonic() > deadline:
                    raise
                print(f"not yet: {exc}", file=sys.stderr)
                self.connection.sleep(1.0)
                self.channel = self.connection.channel()
                self.channel.confirm_delivery()

    def _define(self, deadline: float) -> dict[str, Any]:
        request_id = uuid.uuid4().hex
        replies: list[dict[str, Any]] = []

        def on_reply(channel: Any, method: Any, properties: Any, body: bytes) -> None:
            replies.extend(json.loads(body)["replies"])

        # Direct reply-to: consume it (no ack) before publishing with it as reply_to.
        self.channel.basic_consume("amq.rabbitmq.reply-to", on_reply, auto_ack=True)
        request = {
            "type": "define",
            "request_id": request_id,
            "deadline": time.time() + max(0.0, deadline - time.monotonic()),
            "definition": DEFINITION,
        }
        self.channel.basic_publish(
            exchange="hms.commands",
            routing_key="hms.engine.commands",
            body=json.dumps({"requests": [request]}).encode(),
            properties=self.properties(reply_to="amq.rabbitmq.reply-to"),
            mandatory=True,
        )
        while time.monotonic() < deadline:
            self.connection.process_data_events(time_limit=0.2)
            for reply in replies:
                if reply["request_id"] == request_id:
                    if not reply["ok"]:
                        raise RuntimeError(f"the engine refused the definition: {reply['error']}")
                    result: dict[str, Any] = reply["result"]
                    return result
        raise TimeoutError("no answer to the definition in time: is an engine up?")

    def serve(self) -> None:
        self.channel.basic_qos(prefetch_count=10)
        for step in STEPS:
            self.channel.basic_consume(f"{WORKFLOW}.{step}", self.on_step)
        print(f"serving {', '.join(f'{WORKFLOW}.{s}' for s in STEPS)}", flush=True)
        self.channel.start_consuming()

    def stop(self) -> None:
        self.connection.add_callback_threadsafe(self.channel.stop_consuming)

    def on_step(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        try:
            if properties.content_type != JSON:
                raise ValueError(f"content type {properties.content_type!r}")
            runs = json.loads(body)["steps"]
            if not isinstance(runs, list) or not runs:
                raise ValueError("'steps' is not a non-empty list")
        except (ValueError, KeyError, TypeError) as exc:
            # Not a step message: reject it; the broker dead-letters it, the engine files it
            # into the step's .dlq with the reason.
            print(f"invalid step message {properties.message_id}: {exc}", file=sys.stderr)
            channel.basic_nack(method.delivery_tag, requeue=False)
            return
        self.publish([self.run(step) for step in runs])
        channel.basic_ack(method.delivery_tag)  # only now: the outcomes are confirmed
        self.served += len(runs)

    def run(self, step: dict[str, Any]) -> dict[str, Any]:
        """Report ``started`` at once, run the handler; its outcome, still to send."""
        run = {
            "workflow_id": step["workflow_id"],
            "seq": step["seq"],
            "attempt": step["attempt"],
            "step": step["step"],
            "token": step.get("token"),  # echo it, or the engine refuses the outcome
        }
        started_at = time.time()
        self.publish([{**run, "kind": "started", "started_at": started_at}])
        handler = HANDLERS[step["step"]]
        try:
            result = handler(step.get("payload") or {}, step.get("context") or {})
        except Exception as exc:
            failed = {
                **run,
                "kind": "failed",
                "error": {
                    "type": type(exc).__name__,
                    "message": str(exc),
                    "retryable": not isinstance(exc, NonRetryable),
                },
                "started_at": started_at,
                "finished_at": time.time(),
                "handler": f"examples.pika_service {handler.__name__}",
            }
            return failed
        succeeded = {
            **run,
            "kind": "succeeded",
            "result": result,
            "started_at": started_at,
            "finished_at": time.time(),
            "handler": f"examples.pika_service {handler.__name__}",
        }
        return succeeded

    def publish(self, outcomes: list[dict[str, Any]]) -> None:
        """Outcomes in one message, confirmed by the broker (raises if not)."""
        if outcomes:
            self.channel.basic_publish(
                exchange="hms.results",
                routing_key="hms.engine.results",
                body=json.dumps({"outcomes": outcomes}).encode(),
                properties=self.properties(),
                mandatory=True,  # unroutable: an error, not a silent drop
            )


def main() -> int:
    url = os.environ.get("HMS_BROKER_URL", "amqp://guest:guest@localhost:5672/")
    url = url.split("?", 1)[0]  # pika refuses query parameters it does not know
    service = Service(url)
    signal.signal(signal.SIGTERM, lambda *_: service.stop())
    signal.signal(signal.SIGINT, lambda *_: service.stop())
    answer = service.define()
    print(f"defined {answer['name']} version {answer['version']}", flush=True)
    try:
        service.serve()
    finally:
        print(f"stopped after {service.served} steps", flush=True)
        if service.connection.is_open:
            service.connection.close()
    return 0
