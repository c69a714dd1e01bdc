"""Dead-letter queues: see what is in one, and replay what the engine gave up on.

Replaying a given-up step message is the same as ``client.retry(workflow_id)``:
the engine resumes the workflow from its failed step with a fresh series of
attempts, and the message leaves the DLQ. A message the engine could not even
decode has no workflow to resume; it stays where it is.

A dead letter is *settled* once its workflow no longer stands failed at that step run
(``hms-seq``): it was retried since, whatever became of it. ``hms workflow retry`` (the
HTTP API's retry) takes the failed run's dead letters out of their queue as it retries
(:func:`settle`); a replay acks whatever settled letters are left (a retry by
``client.retry``, or one whose dead letter was not yet published) and says so, without
resuming anything.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from bus_adapters.base import Bus, Delivery
from hms_mgmt.client import Client
from hms_mgmt.errors import InvalidStateError, PayloadError, WorkflowNotFoundError


@dataclass(frozen=True)
class DeadLetter:
    message_id: str | None
    workflow_id: str | None
    step: str | None
    seq: int | None  # the given-up step run's
    attempts: int | None
    reason: str | None
    error_type: str | None
    error: str | None
    size: int
    dead_at: float | None = None  # when it was dead-lettered (seconds since the epoch)

    @classmethod
    def of(cls, delivery: Delivery) -> DeadLetter:
        headers = delivery.headers
        attempts, seq = headers.get("x-hms-attempts"), headers.get("hms-seq")
        return cls(
            message_id=delivery.message_id,
            workflow_id=_text(headers.get("hms-workflow-id")),
            step=_text(headers.get("hms-step")),
            seq=seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
            attempts=attempts if isinstance(attempts, int) else None,
            reason=_text(headers.get("x-hms-reason")),
            error_type=_text(headers.get("x-hms-error-type")),
            error=_text(headers.get("x-hms-error")),
            size=len(delivery.body),
            dead_at=_dead_at(headers),
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Replayed:
    message_id: str | None
    workflow_id: str | None
    outcome: str  # resumed, settled (the workflow had moved on: nothing to do) or kept
    detail: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _dead_at(headers: dict[str, Any]) -> float | None:
    """When a message was dead-lettered: the engine's ``x-hms-dead-at``, else the time of the
    broker's last ``x-death`` (a quorum queue's delivery limit), else unknown."""
    at = headers.get("x-hms-dead-at")
    if isinstance(at, int | float) and not isinstance(at, bool):
        return float(at)
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        when = deaths[0].get("time")
        if isinstance(when, datetime):
            return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    return None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


async def peek(bus: Bus, queue: str, limit: int = 100) -> list[DeadLetter]:
    """The first ``limit`` messages of a queue, left in place."""
    held: list[Delivery] = []
    try:
        while len(held) < limit:
            delivery = await bus.get(queue)
            if delivery is None:
                break
            held.append(delivery)
        return [DeadLetter.of(d) for d in held]
    finally:
        for delivery in held:
            await delivery.reject(requeue=True)


async def replay(
    bus: Bus,
    client: Client,
    queue: str,
    *,
    message_id: str | None = None,
    progress: Callable[[Replayed], Awaitable[None]] | None = None,
) -> list[Replayed]:
    """Replay one message (by id) or, with ``message_id=None``, all of them.

    ``progress`` is awaited with each result as it comes (a long replay streams them).
    """
    results: list[Replayed] = []
    kept: list[Delivery] = []
    try:
        async for delivery in _each(bus, queue):
            if message_id is not None and delivery.message_id != message_id:
                kept.append(delivery)
                continue
            result = await _replay_one(client, delivery)
            results.append(result)
            if result.outcome == "kept":
                kept.append(delivery)
            else:
                await delivery.ack()
            if progress is not None:
                await progress(result)
            if message_id is not None:
                break
    finally:
        for delivery in kept:
            await delivery.reject(requeue=True)
    return results


async def purge(bus: Bus, queue: str) -> int:
    """Remove the messages a queue holds now; returns how many went."""
    removed = 0
    async for delivery in _each(bus, queue):
        await delivery.ack()
        removed += 1
    return removed


async def settle(bus: Bus, queue: str, workflow_id: str, seq: int) -> int:
    """Take ``workflow_id``'s dead letters of step runs up to ``seq`` out of ``queue`` (its
    workflow was retried from run ``seq``); returns how many went. Others stay, in order."""
    settled = 0
    kept: list[Delivery] = []
    try:
        async for delivery in _each(bus, queue):
            letter = DeadLetter.of(delivery)
            if _replayable(letter) and letter.workflow_id == workflow_id and _before(letter, seq):
                await delivery.ack()
                settled += 1
            else:
                kept.append(delivery)
    finally:
        for delivery in kept:
            await delivery.reject(requeue=True)
    return settled


async def _each(bus: Bus, queue: str) -> AsyncIterator[Delivery]:
    """The messages the queue holds now, taken one at a time (the caller acks or keeps each);
    none that arrive meanwhile."""
    for _ in range(await bus.queue_length(queue)):
        delivery = await bus.get(queue)
        if delivery is None:
            return
        yield delivery


def _replayable(letter: DeadLetter) -> bool:
    return letter.workflow_id is not None and not (letter.reason or "").startswith(
        "invalid message"
    )


def _before(letter: DeadLetter, seq: int) -> bool:
    return letter.seq is not None and letter.seq <= seq


async def _settled(client: Client, letter: DeadLetter) -> str | None:
    """Why the letter is settled (its workflow no longer stands failed at its run), or None."""
    assert letter.workflow_id is not None
    state = await client.status(letter.workflow_id)
    if state.status == "compensated":  # it gave up, and undid what it had done
        return "settled: its workflow compensated (a compensated workflow is not retried)"
    if state.status != "failed":
        return f"settled: retried since, now {state.status}"
    failed_at = (state.error or {}).get("seq")
    if letter.seq is not None and isinstance(failed_at, int) and failed_at != letter.seq:
        return (
            f"settled: retried since, failed again at run {failed_at} "
            f"({(state.error or {}).get('step')}): replay that run's dead letter"
        )
    return None


async def _replay_one(client: Client, delivery: Delivery) -> Replayed:
    letter = DeadLetter.of(delivery)
    if not _replayable(letter):
        return Replayed(
            letter.message_id, letter.workflow_id, "kept", f"not replayable: {letter.reason}"
        )
    assert letter.workflow_id is not None
    try:
        settled = await _settled(client, letter)
        if settled is not None:
            return Replayed(letter.message_id, letter.workflow_id, "settled", settled)
        await client.retry(letter.workflow_id)
    except InvalidStateError as exc:  # moved on between the look and the retry
        return Replayed(letter.message_id, letter.workflow_id, "settled", f"settled: {exc}")
    except (WorkflowNotFoundError, PayloadError) as exc:  # PayloadError: not a workflow id
        return Replayed(letter.message_id, letter.workflow_id, "kept", str(exc))
    return Replayed(
        letter.message_id, letter.workflow_id, "resumed", f"resumed from step {letter.step}"
    )
