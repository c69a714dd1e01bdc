"""What the engine's loop takes in: typed events, and the messages they came in.

Each event is decoded and checked once, at intake; after that nothing is a raw dict or a
kind string. An event knows the workflow it is about (``""`` for a schedule's tick, and
for requests about none), which is what the loading stage loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bus_adapters.base import Delivery
from hms_mgmt.wire.fields import Refused
from hms_mgmt.wire.outcomes import Outcome
from hms_mgmt.wire.requests import Request
from hms_mgmt.wire.steps import StepMessage


@dataclass
class Received:
    """One message taken from a queue: its events, and its items that were refused.

    Timer and schedule events come in a ``Received`` with no delivery: nothing to ack.
    """

    delivery: Delivery | None
    events: list[Event] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    key: str = ""  # what the items are called in the body: steps, outcomes, requests
    dead_queue: str | None = None  # the step queue whose .dlq takes refused steps


@dataclass
class RequestEvent:
    """A client's request (start, cancel, status, ...)."""

    request: Request
    source: Received | None = None

    @property
    def workflow_id(self) -> str:
        return self.request.workflow_id


@dataclass
class OutcomeEvent:
    """A step service's report on a step run."""

    outcome: Outcome
    source: Received | None = None

    @property
    def workflow_id(self) -> str:
        return self.outcome.workflow_id


@dataclass
class DeadLetterEvent:
    """A step message the broker dead-lettered (its delivery limit): a failed attempt."""

    step: StepMessage
    reason: str
    source: Received | None = None

    @property
    def workflow_id(self) -> str:
        return self.step.workflow_id


@dataclass
class TimerEvent:
    """A workflow's durable timer came due (a deferred run, a deadline, a wait's timeout)."""

    workflow_id: str
    kind: str


@dataclass
class TickEvent:
    """A cron schedule's tick came due."""

    schedule_id: str
    workflow_id: str = ""


Event = RequestEvent | OutcomeEvent | DeadLetterEvent | TimerEvent | TickEvent
