"""The engine: the only writer of workflow state.

It consumes three queues (client requests, step outcomes, broker dead letters)
into one inbox. A single loop takes what has arrived (up to ``batch_size``),
loads the workflows involved, applies the pure state machine, and commits every
resulting change together with the messages it causes (the outbox) in one
transaction. Only then does it ack what it consumed, hand the outbox rows to
the relay, answer requests and set timers. A crash at any point leaves either
the old state with the messages unacked (they are redelivered) or the new state
with the outbox rows to publish at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bus_adapters.base import (
    JSON_CONTENT_TYPE,
    Bus,
    BusError,
    BusLock,
    Delivery,
    Message,
    ResourceLockedError,
    Subscription,
    UnroutableError,
    redact_url,
    settle,
)
from hms_mgmt import machine, schedules, tracing
from hms_mgmt.definitions import WorkflowDefinition
from hms_mgmt.engine.health import StoreHealth
from hms_mgmt.engine.relay import OutboxRelay
from hms_mgmt.engine.timers import TimerQueue
from hms_mgmt.engine.vhost import StartRefused, take_vhost
from hms_mgmt.errors import (
    DefinitionError,
    HmsError,
    InvalidMessageError,
    PayloadError,
    ScheduleNotFoundError,
    StoreError,
    UnknownWorkflowError,
    WorkflowNotFoundError,
)
from hms_mgmt.faults import Faults
from hms_mgmt.logs import get_logger
from hms_mgmt.records import StepRun, StepStatus, Workflow, WorkflowState
from hms_mgmt.schedules import Schedule
from hms_mgmt.store.base import Batch, OutboxRow, Store
from hms_mgmt.tokens import Signer
from hms_mgmt.topology import (
    COMMANDS_QUEUE,
    DEAD_EXCHANGE,
    DEADLETTERS_QUEUE,
    ENGINE_LOCK_QUEUE,
    RESULTS_QUEUE,
    STEPS_EXCHANGE,
    declare_core,
    declare_step,
    declare_workflow,
    dlq_name,
)
from hms_mgmt.wire.codec import MAX_REPLY_BYTES, batch_body, batches, dumps
from hms_mgmt.wire.fields import Refused
from hms_mgmt.wire.outcomes import Outcome, decode_outcomes
from hms_mgmt.wire.requests import Command, decode_requests, replies_message, reply_item
from hms_mgmt.wire.steps import StepMessage, dead_letter_message, step_headers

log = get_logger("engine")

WAIT_HOLD_MAX = 30.0
REQUEST_MEMORY = 7 * 24 * 3600.0  # how long answers to cancel/retry/signal/start are kept
DEFAULT_RETENTION = 30 * 24 * 3600.0  # finished workflows are pruned after this long
PRUNE_EVERY = 10.0  # seconds between prune steps while nothing is left to prune
PRUNE_STEP = 200  # workflows deleted per prune transaction: small, so the loop never stalls
WATCH_EVERY = 1.0  # seconds between checks of the store
START_THROUGH_DROPS = 60.0  # seconds start-up waits out a broker that dropped it half-way

UNSIGNED = (
    "its token does not match its step run: forged, replayed across runs, or signed by "
    "another engine's store"
)

EXIT_STORE_LOST = 4  # the store failed for longer than the grace period
EXIT_REFUSED = 5  # another engine serves the vhost, or took over the store


@dataclass
class _Event:
    kind: str  # command, outcome, dead_letter, timer
    workflow_id: str
    value: Any
    source: _Received | None = None


@dataclass
class _Received:
    """One message taken from a queue: its events, and items that did not validate."""

    delivery: Delivery | None
    events: list[_Event] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    key: str = ""  # what the items are called in the body: steps, outcomes, requests
    dead_queue: str | None = None  # the step queue whose .dlq takes refused steps


@dataclass
class _Waiter:
    reply_to: str
    request_id: str
    expires_at: float


@dataclass
class _Work:
    """One batch in the making."""

    batch: Batch = field(default_factory=Batch)
    state: dict[str, tuple[Workflow, StepRun | None]] = field(default_factory=dict)
    replies: list[tuple[str, str, bool, Any]] = field(default_factory=list)  # to, id, ok, value
    reads: list[Command] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    timers: list[tuple[str, str, float]] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)  # idempotency key -> workflow id
    answered: dict[str, Any] = field(default_factory=dict)  # request id -> (ok, reply)
    failed_runs: dict[tuple[str, int], StepRun] = field(default_factory=dict)  # for retry
    schedules: dict[str, Schedule | None] = field(default_factory=dict)  # changed in this batch
    ticks: dict[str, tuple[list[float], Schedule]] = field(
        default_factory=dict
    )  # due, computed once

    def reply(self, command: Command, ok: bool, value: Any) -> None:
        if command.reply_to:
            self.replies.append((command.reply_to, command.request_id, ok, value))


class Engine:
    """Run with ``await engine.run()``; stop with :meth:`stop` (or cancel ``run``)."""

    def __init__(
        self,
        bus: Bus,
        store: Store,
        *,
        batch_size: int = 500,
        prefetch: int = 2000,
        cache_size: int = 20_000,
        timer_horizon: float = 60.0,
        clock: Callable[[], float] = time.time,
        store_grace: float = 30.0,
        retention: float | None = DEFAULT_RETENTION,
        new_store: bool = False,
        lock_wait: float = 5.0,
        client_users: frozenset[str] | None = None,
        service_users: frozenset[str] | None = None,
        stuck_after: float = 300.0,
        faults: Faults | None = None,
    ) -> None:
        """An engine over ``bus`` and ``store``; nothing happens until :meth:`run`.

        ``store_grace``: seconds the store may be in trouble before the engine exits.
        ``retention``: seconds a finished workflow is kept (None keeps them for ever).
        ``new_store``: serve a vhost last served from another store (see ``vhost``).
        ``lock_wait``: seconds to wait for a previous engine's lock to be freed.
        ``client_users``/``service_users``: the broker users whose requests (all kinds)
        and whose outcomes and definitions are obeyed; both None obeys every user.
        ``stuck_after``: seconds after which a step not started (or running with no
        timeout) shows as stuck in ``status()`` and the metrics.
        """
        self.stuck_after = stuck_after
        self.bus = bus
        self.store = store
        self.retention = retention
        self.new_store = new_store
        self.lock_wait = lock_wait
        self.client_users = client_users
        self.service_users = service_users
        self.engine_id = secrets.token_hex(8)
        self.health = StoreHealth(store_grace)
        self.exit_code = 0
        self._lock: BusLock | None = None
        self._cut_off = False  # the vhost lock was lost: no commits until it is back
        self._reached_broker = False
        self._held: list[_Received] | None = None  # a batch whose commit failed, to try again
        self._next_prune = 0.0
        self._prunes: list[tuple[float, asyncio.Future[int]]] = []  # asked for by hand
        self._pruned = 0
        self._signer = Signer(b"")
        self.batch_size = batch_size
        self.prefetch = prefetch
        self.clock = clock
        self.definitions: dict[tuple[str, int], WorkflowDefinition] = {}
        self.latest: dict[str, WorkflowDefinition] = {}
        self.timers = TimerQueue(timer_horizon)
        self.schedules: dict[str, Schedule] = {}
        self.faults = faults or Faults()
        self.relay = OutboxRelay(bus, on_unroutable=self._redeclare, faults=self.faults)
        self._inbox: asyncio.Queue[_Received] = asyncio.Queue()
        self._cache: OrderedDict[str, tuple[Workflow, StepRun | None]] = OrderedDict()
        self._cache_size = cache_size
        self._waiters: dict[str, list[_Waiter]] = {}
        self._next_expiry = float("inf")  # the soonest a waiter's hold runs out
        self._subscriptions: list[Subscription] = []
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.stats = {"events": 0, "batches": 0, "started": 0, "finished": 0, "dead_lettered": 0}
        # Called with each batch once it is committed (metrics); it must not raise or block.
        self.on_commit: Callable[[Batch], None] | None = None

    # -- life cycle -----------------------------------------------------------

    async def run(self) -> None:
        """Serve until :meth:`stop` is called or the task is cancelled."""
        try:
            await self._start_through_drops()
        except BaseException:  # refused or failed: let go of what start-up took
            await self._undo_start()
            await self.store.close()
            raise
        try:
            await self._loop()
        finally:
            await self._shutdown()

    async def _start_through_drops(self) -> None:
        """Start; a broker that drops the connection half-way through start-up (a restart)
        is waited for. A broker that cannot be reached at all fails at once (exit code 3)."""
        deadline = time.monotonic() + START_THROUGH_DROPS
        while True:
            try:
                await self.start()
                return
            except BusError as exc:
                if not self._reached_broker or time.monotonic() > deadline:
                    raise
                log.warning("the broker went away during start-up: starting again", error=str(exc))
                await self._undo_start()
                await asyncio.sleep(1.0)

    async def _undo_start(self) -> None:
        for task in list(self._side_tasks):
            task.cancel()
        await asyncio.gather(*self._side_tasks, return_exceptions=True)
        self._subscriptions.clear()
        if self._lock is not None:
            with contextlib.suppress(Exception):
                await self._lock.release()
            self._lock = None
        with contextlib.suppress(Exception):
            await self.bus.close()

    async def start(self) -> None:
        await self.store.open()
        self._signer = Signer(self.store.identity.secret)
        await self.bus.connect()
        self._reached_broker = True
        await declare_core(self.bus, engine=True)
        try:
            self._lock = await take_vhost(
                self.bus,
                self.store.identity,
                self.store.url,
                self.engine_id,
                new_store=self.new_store,
                wait=self.lock_wait,
            )
        except StartRefused:
            if self.store.identity.fresh:  # made by this start: leave nothing behind
                await self.store.discard()
            raise
        await self.store.claim(self.engine_id)
        self._spawn(self._watch_lock(self._lock))
        self._spawn(self._watch_store())
        for definition in await self.store.definitions():
            self._remember(definition)
        for definition in self.latest.values():
            await declare_workflow(self.bus, definition)
        self.schedules = {s.id: s for s in await self.store.schedules()}
        unsent = await self.store.unsent()
        if unsent:
            log.info("publishing outbox rows left from before", count=len(unsent))
            self.relay.submit(unsent)
        for queue, handler in (
            (COMMANDS_QUEUE, self._on_command),
            (RESULTS_QUEUE, self._on_outcome),
            (DEADLETTERS_QUEUE, self._on_dead_letter),
        ):
            self._subscriptions.append(await self.bus.consume(queue, handler, self.prefetch))
        log.info(
            "engine started",
            broker=redact_url(self.bus.url),
            store=redact_url(self.store.url),
            store_id=self.store.identity.store_id,
            engine_id=self.engine_id,
            definitions=sorted(self.latest),
        )
        self.ready.set()

    def checks(self) -> dict[str, bool]:
        """Readiness, check by check: started, connected, holding the vhost, store committing."""
        return {
            "engine": self.ready.is_set() and self.exit_code == 0,
            "broker": self.bus.connected,
            "vhost_lock": self._lock is not None and not self._cut_off,
            "store": self.health.ready,
        }

    def _fail(self, code: int, message: str, **fields: Any) -> None:
        """Stop the engine with an exit code, saying why in one line."""
        if self.exit_code == 0:
            self.exit_code = code
            log.error(message, exit_code=code, **fields)
        self._stopping.set()

    async def _watch_lock(self, lock: BusLock) -> None:
        """The vhost lock went with its connection: hold it again, or stop if another engine has."""
        while not self._stopping.is_set():
            await lock.lost.wait()
            if self._stopping.is_set():
                return
            self._cut_off = True
            log.warning("lost the vhost lock with its connection: pausing until it is back")
            while not self._stopping.is_set():
                try:
                    lock = await self.bus.hold(ENGINE_LOCK_QUEUE)
                except ResourceLockedError:
                    self._fail(
                        EXIT_REFUSED, "another engine took this vhost while this one was cut off"
                    )
                    return
                except BusError:
                    await asyncio.sleep(1.0)
                    continue
                self._lock = lock
                if await self.store.owner() != self.engine_id:
                    self._fail(
                        EXIT_REFUSED,
                        "another engine committed to this store while this one was cut off; "
                        "restart this engine to carry on from the store",
                    )
                    return
                self._cut_off = False
                log.info("holding the vhost lock again")
                break

    async def _watch_store(self) -> None:
        """Every second: is the file still there, whole, and can it commit? Upkeep in between."""
        rescued = False
        while not self._stopping.is_set():
            await asyncio.sleep(WATCH_EVERY)
            probe = time.monotonic() - self.health.last_ok > WATCH_EVERY
            problem = await self.store.watch(probe=probe)
            if problem is None:
                if probe:
                    self.health.ok()
                continue
            self.health.failed(problem)
            if problem.kind == "deleted" and not rescued:
                rescued = True
                try:
                    copy = await self.store.rescue()
                except StoreError as exc:
                    log.error("could not copy the deleted store's content", error=str(exc))
                else:
                    log.error(
                        "copied what the deleted store held (every commit the engine made) to a "
                        "new file: move it back to the store's path and restart the engine",
                        copy=copy,
                    )

    def stop(self) -> None:
        self._stopping.set()

    async def _shutdown(self) -> None:
        for subscription in self._subscriptions:
            with contextlib.suppress(BusError, OSError):
                await subscription.cancel()
        self._subscriptions.clear()
        if not await self.relay.drain(timeout=5.0):
            log.warning("stopping with outbox rows unpublished; they go out at the next start")
        await self.relay.cancel()
        if self.relay.has_confirmed:
            with contextlib.suppress(Exception):
                await self.store.commit(Batch(sent=self.relay.take_confirmed()))
        for task in list(self._side_tasks):
            task.cancel()
        await asyncio.gather(*self._side_tasks, return_exceptions=True)
        if self._lock is not None:
            await self._lock.release()
        with contextlib.suppress(Exception):
            await self.bus.close()
        await self.store.close()
        log.info("engine stopped", **self.stats)

    # -- receiving ------------------------------------------------------------

    def _on_command(self, delivery: Delivery) -> None:
        try:
            commands, refused = decode_requests(delivery)
        except InvalidMessageError as exc:
            self._refuse(delivery, str(exc))
            return
        allowed = []
        for command in commands:
            reason = self._forbidden(delivery.user_id, command.type)
            if reason is None:
                allowed.append(command)
            else:
                refused.append((command.body, reason))
        commands = allowed
        if refused and delivery.reply_to:
            self._answer_refused(delivery.reply_to, refused)
        received = _Received(delivery, refused=refused, key="requests")
        received.events = [
            _Event("command", str(c.body.get("workflow_id", "")), c, received) for c in commands
        ]
        self._inbox.put_nowait(received)

    def _on_outcome(self, delivery: Delivery) -> None:
        try:
            outcomes, refused = decode_outcomes(delivery)
        except InvalidMessageError as exc:
            self._refuse(delivery, str(exc))
            return
        sender = self._forbidden(delivery.user_id, "outcome")
        if sender is not None:
            self._refuse(delivery, sender)
            return
        signed = []
        for outcome in outcomes:
            if self._signer.valid(outcome.workflow_id, outcome.seq, outcome.attempt, outcome.token):
                signed.append(outcome)
            else:
                refused.append((json.loads(outcome.encoded), UNSIGNED))
        outcomes = signed
        received = _Received(delivery, refused=refused, key="outcomes")
        received.events = [_Event("outcome", o.workflow_id, o, received) for o in outcomes]
        self._inbox.put_nowait(received)

    def _on_dead_letter(self, delivery: Delivery) -> None:
        deaths = delivery.headers.get("x-death") or []
        death = deaths[0] if deaths and isinstance(deaths[0], dict) else {}
        queue, reason = str(death.get("queue", "")), str(death.get("reason", "unknown"))
        try:
            steps = StepMessage.decode(delivery)
            if queue and queue != steps[0].topic:
                raise InvalidMessageError(
                    f"message for {steps[0].topic!r} came from queue {queue!r}"
                )
            for step in steps:
                if not self._signer.valid(step.workflow_id, step.seq, step.attempt, step.token):
                    raise InvalidMessageError(f"a step in it: {UNSIGNED}")
        except InvalidMessageError as exc:
            self._refuse(delivery, str(exc), step_queue=queue or None)
            return
        received = _Received(delivery, key="steps", dead_queue=steps[0].topic)
        received.events = [
            _Event("dead_letter", step.workflow_id, (step, reason), received) for step in steps
        ]
        self._inbox.put_nowait(received)

    def _forbidden(self, user: str | None, what: str) -> str | None:
        """Why ``user`` may not send ``what`` (a request type, or "outcome"); None if it may.

        With neither ``client_users`` nor ``service_users`` set, every user of the vhost is
        trusted. Otherwise the broker-validated ``user_id`` decides: client users may send
        every request, service users outcomes and definitions, the engine's own user all.
        """
        if self.client_users is None and self.service_users is None:
            return None
        if user is None:
            return (
                f"{what!r} without a user_id: the engine obeys only messages whose broker user "
                "is named (and checked by RabbitMQ)"
            )
        if user == self.bus.user:
            return None
        if what != "outcome" and user in (self.client_users or ()):
            return None
        if what in ("outcome", "define") and user in (self.service_users or ()):
            return None
        return f"broker user {user!r} may not send {what!r} messages to this engine"

    def _answer_refused(self, reply_to: str, refused: list[Refused]) -> None:
        """Tell the client at once why its request was refused, rather than let it time out."""
        replies = [
            (
                reply_to,
                str(item["request_id"]),
                False,
                {"type": "InvalidMessageError", "message": reason},
            )
            for item, reason in refused
            if isinstance(item, dict) and isinstance(item.get("request_id"), str)
        ]
        if replies:
            self._spawn(self._send_replies(replies))

    def _refuse(self, delivery: Delivery, reason: str, *, step_queue: str | None = None) -> None:
        """Dead-letter a message that cannot be decoded, with the reason; then ack it."""
        log.warning(
            "invalid message dead-lettered",
            queue=step_queue or delivery.queue,
            reason=reason,
            message_id=delivery.message_id,
        )
        self._spawn(
            self._dead_letter_and_ack(
                delivery, delivery.body, delivery.content_type, reason, step_queue
            )
        )

    def _refuse_items(self, received: _Received) -> None:
        """Dead-letter the items of a message that did not validate; then ack the message."""
        assert received.delivery is not None
        reasons = "; ".join(sorted({reason for _, reason in received.refused}))
        log.warning(
            "invalid items dead-lettered",
            queue=received.dead_queue or received.delivery.queue,
            count=len(received.refused),
            reason=reasons[:500],
        )
        body = batch_body(received.key, [dumps(item) for item, _ in received.refused])
        self._spawn(
            self._dead_letter_and_ack(
                received.delivery, body, JSON_CONTENT_TYPE, reasons, received.dead_queue
            )
        )

    async def _dead_letter_and_ack(
        self,
        delivery: Delivery,
        body: bytes,
        content_type: str | None,
        reason: str,
        step_queue: str | None,
    ) -> None:
        headers = {k: v for k, v in delivery.headers.items() if isinstance(k, str)}
        headers["x-hms-reason"] = f"invalid message: {reason}"[:1000]
        headers["x-hms-queue"] = step_queue or delivery.queue
        targets = [(DEAD_EXCHANGE, step_queue)] if step_queue else []
        targets.append(("", dlq_name(delivery.queue)))
        for exchange, key in targets:
            try:
                await self.bus.publish(
                    Message(
                        body=body,
                        exchange=exchange,
                        routing_key=key,
                        headers=headers,
                        message_id=delivery.message_id,
                        content_type=content_type or "application/octet-stream",
                    )
                )
                break
            except UnroutableError:
                continue
            except BusError as exc:
                log.error(
                    "could not dead-letter an invalid message; it stays queued", error=str(exc)
                )
                with contextlib.suppress(BusError, OSError):
                    await delivery.reject(requeue=True)
                return
        self.stats["dead_lettered"] += 1
        await settle(delivery.ack())

    # -- the loop -------------------------------------------------------------

    async def _loop(self) -> None:
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                if self._cut_off or self.health.problem is not None or self._held is not None:
                    await self._sit_out_trouble()
                    continue
                now = self.clock()
                if self.timers.needs_scan(now):
                    await self._scan_timers(now)
                if now >= self._next_prune or self._prunes:
                    await self._prune(now)
                received: list[_Received] = []
                if self._inbox.empty():
                    timeout = self._idle_timeout(now)
                    getter = asyncio.ensure_future(self._inbox.get())
                    done, _ = await asyncio.wait(
                        {getter, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                    )
                    if getter in done:
                        received.append(getter.result())
                    else:
                        getter.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await getter
                        if getter.done() and not getter.cancelled():
                            received.append(getter.result())
                count = sum(len(r.events) for r in received)
                while count < self.batch_size and not self._inbox.empty():
                    item = self._inbox.get_nowait()
                    received.append(item)
                    count += len(item.events)
                now = self.clock()
                due = self.timers.pop_due(now)
                ticking = [s.id for s in self.schedules.values() if s.next_at <= now]
                if due or ticking:
                    timers = _Received(None)
                    timers.events = [_Event("timer", wid, kind, timers) for wid, kind in due]
                    timers.events += [_Event("schedule", "", sid, timers) for sid in ticking]
                    received.append(timers)
                self._expire_waiters(now)
                if received or self.relay.has_confirmed:
                    await self._process(received)
        finally:
            stop.cancel()

    async def _sit_out_trouble(self) -> None:
        """No new work while cut off or while the store is in trouble; a failed batch is retried.

        What was consumed stays unacked, so it waits in RabbitMQ (or comes back to the next
        engine) rather than being acked without a commit.
        """
        if self.health.expired:
            self._fail(
                EXIT_STORE_LOST,
                "the store has been in trouble for too long: exiting",
                cause=str(self.health.problem),
            )
            return
        await asyncio.sleep(WATCH_EVERY)
        held = self._held
        if (
            held is not None
            and not self._cut_off
            and not (self.health.problem is not None and self.health.problem.lasting)
        ):
            self._held = None
            await self._process(held)

    async def _prune(self, now: float) -> None:
        """One small step of retention: finished workflows past it go, with their runs and history."""
        cutoff = None if self.retention is None else now - self.retention
        if self._prunes:
            asked = max(before for before, _ in self._prunes)
            cutoff = asked if cutoff is None else max(cutoff, asked)
        try:
            pruned = 0 if cutoff is None else await self.store.prune(cutoff, PRUNE_STEP)
            forgotten = await self.store.forget_requests(now - REQUEST_MEMORY, PRUNE_STEP * 5)
        except StoreError as exc:
            self.health.failed(exc)
            return
        self.health.ok()
        self._pruned += pruned
        more = pruned == PRUNE_STEP or forgotten == PRUNE_STEP * 5
        self._next_prune = now + (0.05 if more else PRUNE_EVERY)
        if pruned:
            log.debug("pruned finished workflows", count=pruned)
        if not more and self._prunes:
            done, self._prunes = self._prunes, []
            for _, future in done:
                if not future.done():
                    future.set_result(self._pruned)
            self._pruned = 0

    async def prune(self, before: float) -> int:
        """Delete the workflows that finished before ``before`` (by hand); return how many went.

        The loop does it in the same small steps as retention, between batches.
        """
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pruned = 0
        self._prunes.append((before, future))
        return await future

    def _idle_timeout(self, now: float) -> float:
        timeout = max(0.0, self.timers.loaded_until - self.timers.horizon / 2 - now)
        next_due = self.timers.next_due()
        if next_due is not None:
            timeout = min(timeout, max(0.0, next_due - now))
        if self.schedules:
            soonest = min(s.next_at for s in self.schedules.values())
            timeout = min(timeout, max(0.0, soonest - now))
        if self.relay.has_confirmed:
            timeout = min(timeout, 0.5)
        if self._waiters:
            timeout = min(timeout, max(0.0, self._next_expiry - now))
        return min(timeout, 5.0)

    async def _scan_timers(self, now: float) -> None:
        until = now + self.timers.horizon
        limit = 10_000
        rows = await self.store.due_timers(until, limit)
        self.timers.loaded(rows, until, complete=len(rows) < limit)

    async def _process(self, received: list[_Received]) -> None:
        """Apply a batch and make it durable, then let its effects out, in this order:

        1. load what the events need, apply the pure machine, and commit the new state with
           the messages it causes (outbox) and the outbox rows confirmed since (one transaction);
        2. check that the store file is still the one we committed to;
        3. hand the outbox to the relay (publish, confirm, delete on the next commit);
        4. ack what was consumed, only now: a crash before this redelivers it, and every
           event is applied at most once (stale outcomes, answered requests are ignored);
        5. answer requests and wake waiters.

        A batch that fails to commit is held and tried again; nothing is acked meanwhile.
        """
        now = self.clock()
        events = [event for r in received for event in r.events]
        work = _Work()
        work.batch.sent = self.relay.take_confirmed()
        try:
            await self._prepare(events, work, now)
            for event in events:
                self._apply(event, work, now)
            await self.store.commit(work.batch)
        except Exception as exc:
            for event in events:
                self._cache.pop(event.workflow_id, None)
            self.relay.restore_confirmed(work.batch.sent)
            self.timers.loaded_until = float("-inf")  # timers popped for it: read them again
            if isinstance(exc, StoreError):
                if exc.kind == "taken":
                    self._fail(EXIT_REFUSED, str(exc))
                    return
                self.health.failed(exc)
                self._held = received  # tried again once the store takes commits
                return
            log.exception("a batch failed; its messages will be redelivered")
            for item in received:
                if item.delivery is not None:
                    with contextlib.suppress(Exception):  # a closed channel requeues it anyway
                        await item.delivery.reject(requeue=True)
            await asyncio.sleep(1.0)
            return
        moved = self.store.check_file()
        if moved is not None:  # committed into a file no longer there: ack nothing
            self.health.failed(moved)
            return
        self.health.ok()
        self.faults.reached("after_commit")
        if self.on_commit is not None:
            try:
                self.on_commit(work.batch)
            except Exception:
                log.exception("the on_commit hook failed")
        self.stats["batches"] += 1
        self.stats["events"] += len(events)
        horizon = now + self.timers.horizon
        for workflow_id, (workflow, run) in work.state.items():
            if _in_flight(workflow, run, horizon):
                self._cache[workflow_id] = (workflow, run)
                self._cache.move_to_end(workflow_id)
            else:  # finished, or parked on a far timer or a signal: the store has it
                self._cache.pop(workflow_id, None)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        for schedule_id, changed in work.schedules.items():
            if changed is None:
                self.schedules.pop(schedule_id, None)
            else:
                self.schedules[schedule_id] = changed
        self.relay.submit(work.batch.outbox)
        for workflow_id, kind, due in work.timers:
            self.timers.add(workflow_id, kind, due)
        if work.batch.outbox:
            await asyncio.sleep(0)  # let the next steps go out before the acks and replies
        for item in received:
            if item.delivery is None:
                continue
            if item.refused:
                self._refuse_items(item)  # acks once the refused items are dead-lettered
            else:
                await settle(item.delivery.ack())
        self.faults.reached("after_ack")
        try:
            for command in work.reads:
                await self._read(command, work, now)
            for workflow_id in work.finished:
                await self._wake_waiters(workflow_id, work)
        except Exception:  # a read gone wrong must not stop the engine; its client asks again
            log.exception("answering a request failed")
        await self._send_replies(work.replies)

    async def _prepare(self, events: list[_Event], work: _Work, now: float) -> None:
        """Load what the batch needs: workflows, keys and request replies; store definitions."""
        wanted: set[str] = set()
        keys: list[str] = []
        request_ids: list[str] = []
        for event in events:
            if event.kind == "command":
                command: Command = event.value
                if command.type == "define":
                    await self._define(command, work, now)
                    continue
                if command.type in ("start", "cancel", "retry", "signal"):
                    request_ids.append(command.request_id)
                key = command.body.get("idempotency_key")
                if command.type == "start" and isinstance(key, str):
                    keys.append(key)
            if event.kind == "schedule" and event.value in self.schedules:
                ticks, moved = schedules.due(self.schedules[event.value], now)
                work.ticks[event.value] = (ticks, moved)
                wanted.update(schedules.workflow_id(event.value, tick) for tick in ticks)
                continue
            if event.workflow_id and event.workflow_id not in self._cache:
                wanted.add(event.workflow_id)
            elif event.workflow_id:
                work.state[event.workflow_id] = self._cache[event.workflow_id]
        if wanted:
            work.state.update(await self.store.load(list(wanted)))
        if keys:
            work.keys = await self.store.find_by_idempotency_key(keys)
        if request_ids:
            work.answered = await self.store.request_replies(request_ids)
        for event in events:
            if event.kind == "command" and event.value.type == "retry":
                await self._load_failed_run(event.workflow_id, work)

    async def _load_failed_run(self, workflow_id: str, work: _Work) -> None:
        """A retry resumes the run that failed, which may be earlier than the current one."""
        found = work.state.get(workflow_id)
        if found is None or found[0].error is None:
            return
        seq = found[0].error.get("seq")
        if isinstance(seq, int) and (found[1] is None or seq != found[1].seq):
            run = await self.store.run(workflow_id, seq)
            if run is not None:
                work.failed_runs[(workflow_id, seq)] = run

    def _apply(self, event: _Event, work: _Work, now: float) -> None:
        try:
            if event.kind == "command":
                self._apply_command(event.value, work, now)
            elif event.kind == "outcome":
                self._apply_outcome(event, work, now)
            elif event.kind == "dead_letter":
                self._apply_dead_letter(event, work, now)
            elif event.kind == "schedule":
                self._apply_schedule_tick(event.value, work, now)
            else:
                self._apply_timer(event, work, now)
        except Exception as exc:
            # One bad event is refused alone; it never fails the batch it came in.
            if not isinstance(exc, HmsError):
                log.exception("event refused", kind=event.kind, workflow_id=event.workflow_id)
            if event.kind == "command":
                command: Command = event.value
                work.reply(command, False, _error(exc))
                if command.type == "start":  # a retry of this request gets the same answer
                    work.batch.requests.append((command.request_id, [False, _error(exc)], now))
                    work.answered[command.request_id] = (False, _error(exc))
            elif event.kind in ("outcome", "dead_letter"):
                self._refuse_event(event, f"{type(exc).__name__}: {exc}")
            else:
                log.error(
                    "event refused", kind=event.kind, workflow_id=event.workflow_id, error=str(exc)
                )

    def _record(self, work: _Work, t: machine.Transition, workflow_id: str, now: float) -> None:
        """Fold a transition into the batch."""
        batch = work.batch
        for kind, detail in t.history:
            batch.history.append((workflow_id, now, kind, detail))
        wf = t.workflow
        if wf is None:
            return
        batch.workflows[wf.id] = wf
        current = work.state.get(wf.id, (wf, None))[1]
        for run in t.runs:
            batch.runs[(run.workflow_id, run.seq)] = run
            if run.seq == wf.seq:
                current = run
        work.state[wf.id] = (wf, current)
        for step in t.steps:
            token = self._signer.token(step.workflow_id, step.seq, step.attempt)
            batch.outbox.append(
                OutboxRow(
                    message_id=step.message_id,
                    exchange=STEPS_EXCHANGE,
                    routing_key=step.topic,
                    body=step.encode(token),
                    headers=step_headers(
                        step.workflow_id, step.step, step.attempt, step.seq, step.traceparent
                    ),
                    created_at=now,
                )
            )
        for dead in t.dead_letters:
            original = _step_message_of(
                dead.run, dead.workflow, self._definition_of(wf), wf.traceparent
            ).to_message()
            message = dead_letter_message(
                original, reason=dead.reason, attempts=dead.attempts, last_error=dead.error
            )
            batch.outbox.append(_outbox_row(message, now))
            self.stats["dead_lettered"] += 1
        if wf.timer_at is not None and wf.timer_kind is not None:
            work.timers.append((wf.id, wf.timer_kind, wf.timer_at))
        if t.finished:
            work.finished.append(wf.id)
            self.stats["finished"] += 1
            _log_finished(wf)

    def _loaded(self, work: _Work, workflow_id: str) -> tuple[Workflow, StepRun]:
        found = work.state.get(workflow_id)
        if found is None:
            raise WorkflowNotFoundError(f"no workflow with id {workflow_id!r}")
        workflow, run = found
        if run is None:
            raise WorkflowNotFoundError(f"workflow {workflow_id!r} has no step run")
        return workflow, run

    def _apply_outcome(self, event: _Event, work: _Work, now: float) -> None:
        outcome: Outcome = event.value
        if outcome.workflow_id not in work.state:
            self._refuse_event(event, f"outcome for unknown workflow {outcome.workflow_id!r}")
            return
        workflow, run = self._loaded(work, outcome.workflow_id)
        if outcome.step and outcome.step != run.step and outcome.seq == run.seq:
            work.batch.history.append(
                (
                    workflow.id,
                    now,
                    "outcome_ignored",
                    {"seq": outcome.seq, "reason": "step mismatch"},
                )
            )
            return
        t = machine.apply_outcome(workflow, run, self._definition_of(workflow), outcome, now)
        if t.history and t.history[0][0] == "outcome_ignored":
            log.info(
                "outcome ignored",
                workflow_id=workflow.id,
                step=outcome.step,
                attempt=outcome.attempt,
                seq=outcome.seq,
                kind=outcome.kind,
                reason=t.history[0][1]["reason"],
                **tracing.log_fields(workflow.traceparent),
            )
        self._record(work, t, workflow.id, now)

    def _apply_dead_letter(self, event: _Event, work: _Work, now: float) -> None:
        message, reason = event.value
        if message.workflow_id not in work.state:
            self._refuse_event(
                event,
                f"dead-lettered ({reason}) step of unknown workflow {message.workflow_id!r}",
            )
            return
        workflow, run = self._loaded(work, message.workflow_id)
        log.warning(
            "step message dead-lettered by the broker",
            workflow_id=workflow.id,
            step=message.step,
            attempt=message.attempt,
            reason=reason,
            **tracing.log_fields(workflow.traceparent),
        )
        t = machine.dead_lettered(
            workflow, run, self._definition_of(workflow), message.seq, reason, now
        )
        self._record(work, t, workflow.id, now)

    def _refuse_event(self, event: _Event, reason: str) -> None:
        """An item that names no workflow we know: dead-lettered, the store unchanged."""
        if event.source is None or event.source.delivery is None:
            return
        encoded = event.value.encoded if event.kind == "outcome" else event.value[0].encode()
        event.source.refused.append((json.loads(encoded), reason))

    def _apply_schedule_tick(self, schedule_id: str, work: _Work, now: float) -> None:
        """Start the workflows of a schedule's due ticks and move it on, in one transaction."""
        schedule = (
            work.schedules[schedule_id]
            if schedule_id in work.schedules
            else self.schedules.get(schedule_id)
        )
        if schedule is None:
            return
        ticks, moved = work.ticks.get(schedule_id) or schedules.due(schedule, now)
        work.schedules[schedule_id] = moved
        work.batch.schedules[schedule_id] = moved
        definition = self.latest.get(schedule.workflow)
        for tick in ticks:
            workflow_id = schedules.workflow_id(schedule_id, tick)
            if definition is None:
                log.error(
                    "scheduled workflow is not defined",
                    schedule=schedule_id,
                    workflow=schedule.workflow,
                )
                continue
            if workflow_id in work.state:
                continue  # this tick has started its workflow already
            t = machine.start(definition, workflow_id, schedule.payload, now)
            t.note("scheduled_start", schedule=schedule_id, tick=tick)
            self._record(work, t, workflow_id, now)
            self.stats["started"] += 1

    def _apply_schedule_command(self, command: Command, work: _Work, now: float) -> None:
        body = command.body
        if command.type == "unschedule":
            schedule_id = str(body["schedule_id"])
            if schedule_id not in self.schedules and schedule_id not in work.schedules:
                raise ScheduleNotFoundError(f"no schedule with id {schedule_id!r}")
            work.schedules[schedule_id] = None
            work.batch.schedules[schedule_id] = None
            work.reply(command, True, {"schedule_id": schedule_id, "removed": True})
            return
        workflow = str(body["workflow"])
        if workflow not in self.latest:
            raise UnknownWorkflowError(f"cannot schedule {workflow!r}: no such workflow is defined")
        schedule = schedules.new(
            str(body.get("schedule_id") or workflow),
            workflow,
            str(body.get("cron")),
            timezone=str(body.get("timezone") or "UTC"),
            payload=body.get("payload"),
            catch_up=str(body.get("catch_up") or "latest"),
            now=now,
        )
        current = (
            work.schedules[schedule.id]
            if schedule.id in work.schedules
            else self.schedules.get(schedule.id)
        )
        same = current is not None and (
            current.workflow,
            current.cron,
            current.timezone,
            current.payload,
            current.catch_up,
        ) == (
            schedule.workflow,
            schedule.cron,
            schedule.timezone,
            schedule.payload,
            schedule.catch_up,
        )
        if current is not None and same:
            schedule = current  # scheduling again changes nothing (every service start does it)
        else:
            work.schedules[schedule.id] = schedule
            work.batch.schedules[schedule.id] = schedule
        work.reply(command, True, schedule.to_json())

    def _apply_timer(self, event: _Event, work: _Work, now: float) -> None:
        if event.workflow_id not in work.state:
            return
        workflow, run = self._loaded(work, event.workflow_id)
        t = machine.fire_timer(workflow, run, self._definition_of(workflow), event.value, now)
        self._record(work, t, workflow.id, now)

    def _apply_command(self, command: Command, work: _Work, now: float) -> None:
        if command.type == "define":
            return  # stored in _prepare; answered there
        if command.deadline is not None and command.deadline < now:
            log.info(
                "request expired before it was served",
                type=command.type,
                request_id=command.request_id,
            )
            return
        if command.type in ("status", "wait", "list"):
            work.reads.append(command)
            return
        if command.type == "schedules":
            work.reply(command, True, [x.to_json() for x in self.schedules.values()])
            return
        if command.type in ("schedule", "unschedule"):
            self._apply_schedule_command(command, work, now)
            return
        if command.type == "start":
            self._start(command, work, now)
            return
        if command.request_id in work.answered:
            ok, value = work.answered[command.request_id]
            work.reply(command, ok, value)
            return
        workflow_id = str(command.body["workflow_id"])
        try:
            workflow, run = self._loaded(work, workflow_id)
            if command.type == "cancel":
                reason = command.body.get("reason")
                t = machine.cancel(workflow, run, None if reason is None else str(reason), now)
            elif command.type == "retry":
                seq = (workflow.error or {}).get("seq")
                failed = (
                    work.failed_runs.get((workflow_id, seq), run) if isinstance(seq, int) else run
                )
                t = machine.retry(workflow, failed, self._definition_of(workflow), now)
            else:
                t = machine.signal(
                    workflow,
                    run,
                    self._definition_of(workflow),
                    str(command.body["signal"]),
                    command.body.get("data"),
                    now,
                )
        except HmsError as exc:
            reply: tuple[bool, Any] = (False, _error(exc))
        else:
            self._record(work, t, workflow_id, now)
            reply = (
                True,
                {"workflow_id": workflow_id, "status": str(work.state[workflow_id][0].status)},
            )
        work.answered[command.request_id] = reply
        work.batch.requests.append((command.request_id, list(reply), now))
        work.reply(command, *reply)

    def _start(self, command: Command, work: _Work, now: float) -> None:
        body = command.body
        workflow_id = str(body["workflow_id"])
        if command.request_id in work.answered:  # refused before: the same answer again
            ok, value = work.answered[command.request_id]
            work.reply(command, ok, value)
            return
        existing = work.state.get(workflow_id)
        if existing is not None:
            work.reply(command, True, {"workflow_id": workflow_id, "existing": True})
            return
        key = body.get("idempotency_key")
        if isinstance(key, str) and key in work.keys:
            work.reply(command, True, {"workflow_id": work.keys[key], "existing": True})
            return
        name = str(body["workflow"])
        definition = self.latest.get(name)
        if definition is None:
            raise UnknownWorkflowError(
                f"workflow {name!r} is not defined: no step service or client has defined it "
                f"with this engine yet (known: {', '.join(sorted(self.latest)) or 'none'})"
            )
        run_at, delay = body.get("run_at"), body.get("delay")
        if run_at is not None and not isinstance(run_at, int | float):
            raise PayloadError(f"run_at must be a timestamp, not {run_at!r}")
        if delay is not None:
            if not isinstance(delay, int | float) or delay < 0:
                raise PayloadError(f"delay must be seconds >= 0, not {delay!r}")
            run_at = now + delay
        t = machine.start(
            definition,
            workflow_id,
            body.get("payload"),
            now,
            run_at=run_at,
            idempotency_key=key if isinstance(key, str) else None,
            traceparent=tracing.checked(body.get("traceparent")),
        )
        if isinstance(key, str):
            work.keys[key] = workflow_id
        self._record(work, t, workflow_id, now)
        self.stats["started"] += 1
        log.debug(
            "workflow started",
            workflow_id=workflow_id,
            workflow=name,
            **tracing.log_fields(t.workflow.traceparent if t.workflow else None),
        )
        work.reply(command, True, {"workflow_id": workflow_id, "existing": False})

    async def _define(self, command: Command, work: _Work, now: float) -> None:
        try:
            definition = WorkflowDefinition.from_json(command.body["definition"])
        except Exception as exc:  # whatever a malformed definition raises, refuse it
            work.reply(command, False, _error(DefinitionError(f"malformed definition: {exc!r}")))
            return
        latest = self.latest.get(definition.name)
        if latest is not None and latest.to_json() == definition.to_json():
            work.reply(command, True, {"name": latest.name, "version": latest.version})
            return
        version = 1 if latest is None else latest.version + 1
        definition = definition.with_version(version)
        try:
            await declare_workflow(self.bus, definition)
        except BusError as exc:
            work.reply(command, False, _error(HmsError(f"cannot declare queues: {exc}")))
            return
        await self.store.save_definition(definition, now)
        self._remember(definition)
        log.info(
            "workflow defined",
            workflow=definition.name,
            version=version,
            steps=definition.step_names,
        )
        work.reply(command, True, {"name": definition.name, "version": version})

    def _remember(self, definition: WorkflowDefinition) -> None:
        self.definitions[(definition.name, definition.version)] = definition
        latest = self.latest.get(definition.name)
        if latest is None or latest.version < definition.version:
            self.latest[definition.name] = definition

    def _definition_of(self, workflow: Workflow) -> WorkflowDefinition:
        found = self.definitions.get((workflow.name, workflow.version))
        if found is None:
            raise UnknownWorkflowError(
                f"workflow {workflow.name!r} version {workflow.version} is not stored"
            )
        return found

    async def _redeclare(self, row: OutboxRow) -> None:
        workflow, _, step = row.routing_key.partition(".")
        if workflow in self.latest and step:
            await declare_step(self.bus, workflow, step)

    # -- answering --------------------------------------------------------------

    async def _read(self, command: Command, work: _Work, now: float) -> None:
        if command.type == "list":
            body = command.body
            limit = body.get("limit", 50)
            workflows = await self.store.list_workflows(
                status=body.get("status"),
                name=body.get("name"),
                limit=int(limit) if isinstance(limit, int) else 50,
            )
            work.reply(command, True, [_summary(w) for w in workflows])
            return
        workflow_id = str(command.body["workflow_id"])
        in_flight = workflow_id in self._cache  # cached workflows are not finished
        state = None if command.type == "wait" and in_flight else await self.state(workflow_id)
        if state is None and not in_flight:
            work.reply(
                command,
                False,
                _error(WorkflowNotFoundError(f"no workflow with id {workflow_id!r}")),
            )
            return
        if command.type == "wait" and (state is None or not state.terminal) and command.reply_to:
            hold = command.body.get("hold", WAIT_HOLD_MAX)
            hold = (
                min(float(hold), WAIT_HOLD_MAX) if isinstance(hold, int | float) else WAIT_HOLD_MAX
            )
            self._waiters.setdefault(workflow_id, []).append(
                _Waiter(command.reply_to, command.request_id, now + hold)
            )
            self._next_expiry = min(self._next_expiry, now + hold)
            return
        if state is not None:
            work.reply(command, True, state.to_json())

    async def state(self, workflow_id: str) -> WorkflowState | None:
        """A workflow and its runs as the store has them."""
        found = await self.store.workflow_with_runs(workflow_id)
        if found is None:
            return None
        return WorkflowState.of(*found, now=self.clock(), stuck_after=self.stuck_after)

    async def _wake_waiters(self, workflow_id: str, work: _Work) -> None:
        waiters = self._waiters.pop(workflow_id, None)
        if not waiters:
            return
        state = await self.state(workflow_id)
        if state is None:
            return
        value = state.to_json()
        work.replies.extend((w.reply_to, w.request_id, True, value) for w in waiters)

    def _expire_waiters(self, now: float) -> None:
        if now < self._next_expiry:
            return
        self._next_expiry = min(
            (w.expires_at for ws in self._waiters.values() for w in ws if w.expires_at > now),
            default=float("inf"),
        )
        expired: list[tuple[str, str, bool, Any]] = []
        for workflow_id, waiters in list(self._waiters.items()):
            keep = [w for w in waiters if w.expires_at > now]
            expired.extend(
                (w.reply_to, w.request_id, True, {"workflow_id": workflow_id, "terminal": False})
                for w in waiters
                if w.expires_at <= now
            )
            if keep:
                self._waiters[workflow_id] = keep
            else:
                del self._waiters[workflow_id]
        if expired:
            self._spawn(self._send_replies(expired))

    async def _send_replies(self, replies: list[tuple[str, str, bool, Any]]) -> None:
        """One message per client for all its replies of a batch; best effort (clients ask again)."""
        grouped: dict[str, list[bytes]] = {}
        for reply_to, request_id, ok, value in replies:
            grouped.setdefault(reply_to, []).append(_reply_within_limit(request_id, ok, value))
        for reply_to, items in grouped.items():
            for batch in batches(items, len):
                try:
                    await self.bus.publish(replies_message(reply_to, batch), confirm=False)
                except BusError as exc:
                    log.warning("could not send replies; the client will ask again", error=str(exc))

    # -- helpers ---------------------------------------------------------------

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)


def _reply_within_limit(request_id: str, ok: bool, value: Any) -> bytes:
    """A reply, or an error saying it is too large to send (a client reads up to a limit)."""
    item = reply_item(request_id, ok, value)
    if len(item) <= MAX_REPLY_BYTES:
        return item
    error = {
        "type": "PayloadError",
        "message": f"the answer is {len(item)} bytes, over the {MAX_REPLY_BYTES} a reply may carry",
    }
    return reply_item(request_id, False, error)


def _in_flight(workflow: Workflow, run: StepRun | None, horizon: float) -> bool:
    """Whether a workflow is worth keeping in memory: a step out, or a timer due soon.

    Keeping only these bounds the engine's memory by the work in flight, however
    many workflows wait for months or for a signal.
    """
    if workflow.terminal:
        return False
    if run is not None and run.status in (StepStatus.PENDING, StepStatus.RUNNING):
        return True
    return workflow.timer_at is not None and workflow.timer_at <= horizon


def _outbox_row(message: Message, now: float) -> OutboxRow:
    return OutboxRow(
        message_id=message.message_id or "",
        exchange=message.exchange,
        routing_key=message.routing_key,
        body=message.body,
        headers=message.headers,
        created_at=now,
    )


def _step_message_of(
    run: StepRun, workflow: str, definition: WorkflowDefinition, traceparent: str | None = None
) -> StepMessage:
    return StepMessage(
        workflow_id=run.workflow_id,
        workflow=workflow,
        step=run.step,
        seq=run.seq,
        visit=run.visit,
        attempt=run.attempt,
        payload=run.input,
        timeout=definition.timeout_for(run.step),
        context=run.context,
        traceparent=traceparent,
    )


def _error(exc: Exception) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc)}


def _summary(workflow: Workflow) -> dict[str, Any]:
    return {
        "workflow_id": workflow.id,
        "name": workflow.name,
        "status": str(workflow.status),
        "created_at": workflow.created_at,
        "updated_at": workflow.updated_at,
        "error": workflow.error,
    }


def _log_finished(workflow: Workflow) -> None:
    if workflow.status == "failed":
        error = workflow.error or {}
        log.warning(
            "workflow failed",
            workflow_id=workflow.id,
            workflow=workflow.name,
            step=error.get("step"),
            attempt=error.get("attempts"),
            error=error.get("message"),
            **tracing.log_fields(workflow.traceparent),
        )
    else:
        log.debug(
            "workflow finished",
            workflow_id=workflow.id,
            status=str(workflow.status),
            **tracing.log_fields(workflow.traceparent),
        )
