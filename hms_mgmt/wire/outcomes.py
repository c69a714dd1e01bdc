"""Outcomes: a step service reports on a step run (started, heartbeat, succeeded, failed)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from dataclasses import field as field_
from typing import Any

from bus_adapters.base import Delivery, Message
from hms_mgmt.bounds import check_attributes, check_delay, check_run_at, child_problem
from hms_mgmt.errors import InvalidMessageError
from hms_mgmt.topology import RESULTS_EXCHANGE, RESULTS_QUEUE
from hms_mgmt.wire.codec import batch_body, dumps, new_id
from hms_mgmt.wire.fields import Refused, decode_items, field, ident, name, positive, token

OUTCOME_KINDS = frozenset({"started", "heartbeat", "succeeded", "failed"})
RESULT_KEYS = frozenset(
    {
        "next_step",
        "data",
        "complete",
        "delay",
        "run_at",
        "wait_for",
        "timeout",
        "attributes",
        "child",
        "fan_out",
        "map",
        "join",
        "tolerate",
        "max_concurrency",
    }
)


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
    # Why the outcome as sent did not validate, when it still names its run and carries a
    # token (see from_wire): it then stands for a failed attempt (MalformedOutcome), and
    # ``raw`` is the item as it came, for the dead letter kept for forensics.
    malformed: str | None = field_(default=None, compare=False)
    raw: Any = field_(default=None, compare=False, repr=False)

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
        kind = field(data, "kind", str)
        if kind not in OUTCOME_KINDS:
            raise InvalidMessageError(
                f"field 'kind' is {kind[:50]!r}, not one of {sorted(OUTCOME_KINDS)}"
            )
        result = field(data, "result", dict, optional=True)
        error = field(data, "error", dict, optional=True)
        if kind == "succeeded" and result is None:
            raise InvalidMessageError("a succeeded outcome has no 'result'")
        if kind == "failed":
            if error is None:
                raise InvalidMessageError("a failed outcome has no 'error'")
            field(error, "type", str)
            field(error, "message", str)
        if result is not None:
            unknown = set(result) - RESULT_KEYS
            if unknown:
                raise InvalidMessageError(f"result has unknown keys {sorted(unknown)}")
            _check_result(result)
        if error is not None:
            _check_error(error)
        return cls(
            workflow_id=ident(data, "workflow_id"),
            seq=positive(data, "seq"),
            kind=kind,
            step=field(data, "step", str, optional=True) or "",
            attempt=field(data, "attempt", int, optional=True) or 0,
            result=result,
            error=error,
            started_at=field(data, "started_at", (int, float), optional=True),
            finished_at=field(data, "finished_at", (int, float), optional=True),
            handler=field(data, "handler", str, optional=True),
            token=token(data),
        )

    @classmethod
    def from_wire(cls, data: Any) -> Outcome:
        """An item of an outcomes message: :meth:`from_json`, or, for an item that does not
        validate but names its run (``workflow_id``, ``seq``, ``attempt``) and carries a
        token, a ``failed`` outcome with the error ``MalformedOutcome`` saying what is wrong.

        The engine applies it only if the token is right: a step service that answers its
        run with a malformed outcome fails the attempt, not retried (the same code would
        answer the same way), rather than leaving the workflow running for ever.
        """
        try:
            return cls.from_json(data)
        except (InvalidMessageError, TypeError, ValueError, KeyError, AttributeError) as exc:
            problem = str(exc) if isinstance(exc, InvalidMessageError) else f"malformed: {exc!r}"
            try:
                workflow_id, seq, attempt = ident(data, "workflow_id"), positive(data, "seq"), 0
                attempt = field(data, "attempt", int, optional=True) or 0
                signature = token(data)
            except (InvalidMessageError, TypeError, AttributeError):
                raise exc from None
            if not signature:
                raise
        step = data.get("step")
        kind = data.get("kind")
        what = f"{kind[:50]!r} outcome" if isinstance(kind, str) else "outcome"
        return cls(
            workflow_id=workflow_id,
            seq=seq,
            kind="failed",
            step=step if isinstance(step, str) else "",
            attempt=attempt,
            error={
                "type": MALFORMED,
                "message": f"the step service sent a malformed {what}: {problem}; not retried: "
                "the same code would send the same reply",
                "retryable": False,
            },
            token=signature,
            malformed=problem,
            raw=data,
        )

    @property
    def as_sent(self) -> Any:
        """The item as it came (a malformed one) or as it would be sent, for a dead letter."""
        return self.raw if self.malformed is not None else json.loads(self.encoded)


MALFORMED = "MalformedOutcome"
"""The error type of an attempt whose step service answered with a malformed outcome."""


def _check_result(result: dict[str, Any]) -> None:
    """The fields of a result the engine acts on have the types it needs."""
    for key in ("delay", "timeout"):
        if result.get(key) is not None:
            check_delay(result[key], f"result field {key!r}", InvalidMessageError)
    if result.get("run_at") is not None:
        check_run_at(result["run_at"], "result field 'run_at'", InvalidMessageError)
    for key in ("next_step", "wait_for"):
        if result.get(key) is not None:
            name(result, key)
    field(result, "complete", bool, optional=True)
    if result.get("child") is not None:
        problem = child_problem(result["child"])
        if problem is not None:
            raise InvalidMessageError(f"result field 'child': {problem}")
    if result.get("attributes") is not None:
        check_attributes(result["attributes"], "result field 'attributes'", InvalidMessageError)


def _check_error(error: dict[str, Any]) -> None:
    types = error.get("types")
    if types is not None and (
        not isinstance(types, list) or not all(isinstance(t, str) for t in types)
    ):
        raise InvalidMessageError("error field 'types' must be a list of strings")
    field(error, "retryable", bool, optional=True)
    if error.get("retry_delay") is not None:
        check_delay(error["retry_delay"], "error field 'retry_delay'", InvalidMessageError)


def decode_outcomes(delivery: Delivery) -> tuple[list[Outcome], list[Refused]]:
    return decode_items(delivery, "outcomes", Outcome.from_wire)


def outcomes_message(encoded: list[bytes]) -> Message:
    return Message(
        body=batch_body("outcomes", encoded),
        exchange=RESULTS_EXCHANGE,
        routing_key=RESULTS_QUEUE,
        message_id=new_id(),
        headers={"hms-count": len(encoded)},
    )
