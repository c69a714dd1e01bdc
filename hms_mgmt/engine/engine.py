"""The engine: the only writer of workflow state. This module wires the stages and runs the loop.

Messages come in through :mod:`~hms_mgmt.engine.intake` (decoded, checked, refused) into
one inbox. The loop takes what has arrived (up to ``batch_size`` events), with the timers
and cron ticks due (:mod:`~hms_mgmt.engine.timers`), and :meth:`Engine._process` loads
what they need (:mod:`~hms_mgmt.engine.loading`), applies them (:mod:`~hms_mgmt.engine.apply`,
pure) and commits the result with the messages it causes (the outbox) in one transaction.
Only then does it ack, hand the outbox to the relay (:mod:`~hms_mgmt.engine.relay`) and
answer (:mod:`~hms_mgmt.engine.answers`). A crash at any point leaves either the old
state with the messages unacked (they are redelivered) or the new state with the outbox
rows to publish at start-up.

Around the loop: one engine per vhost (:mod:`~hms_mgmt.engine.vhost`), a watched store
(:mod:`~hms_mgmt.engine.health`), retention (:mod:`~hms_mgmt.engine.retention`).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from typing import Any

from bus_adapters.base import Bus, BusError, Subscription, redact_url, settle
from hms_mgmt import tracing
from hms_mgmt.definitions import WorkflowDefinition
from hms_mgmt.engine.answers import Answers
from hms_mgmt.engine.apply import Applier
from hms_mgmt.engine.cache import InFlight
from hms_mgmt.engine.events import Received
from hms_mgmt.engine.health import WATCH_EVERY, StoreHealth, watch_store
from hms_mgmt.engine.intake import Access, Intake
from hms_mgmt.engine.loading import Loader
from hms_mgmt.engine.reads import EngineReads
from hms_mgmt.engine.registry import Registry
from hms_mgmt.engine.relay import OutboxRelay
from hms_mgmt.engine.retention import DEFAULT_RETENTION, Retention
from hms_mgmt.engine.spans import record_spans
from hms_mgmt.engine.timers import TimerQueue, due_events
from hms_mgmt.engine.vhost import (
    Standby,
    StartRefused,
    VhostLock,
    take_vhost,
)
from hms_mgmt.engine.work import Work
from hms_mgmt.errors import StoreError
from hms_mgmt.faults import Faults
from hms_mgmt.logs import get_logger
from hms_mgmt.machine import TIMER_ADMIT, Slots
from hms_mgmt.machine.limits import Group
from hms_mgmt.machine.transition import RetryChild
from hms_mgmt.records import StepRun, TypePause, Workflow
from hms_mgmt.schedules import Schedule
from hms_mgmt.store.base import Batch, OutboxRow, Store
from hms_mgmt.tokens import Signer
from hms_mgmt.topology import (
    COMMANDS_QUEUE,
    DEADLETTERS_QUEUE,
    DEFAULT_STEP_QUEUE_TYPE,
    RESULTS_QUEUE,
    check_step_queue_type,
    declare_core,
)

log = get_logger("engine")

START_THROUGH_DROPS = 60.0  # seconds start-up waits out a broker that dropped it half-way
TIMER_SCAN_LIMIT = 10_000

FOLLOW_UP_ROUNDS = 100
"""Rounds of follow-ups in one batch at most: as deep as child workflows may nest."""

EXIT_STORE_LOST = 4  # the store failed for longer than the grace period
EXIT_REFUSED = 5  # another engine serves the vhost, or took over the store


class Engine(EngineReads):
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
        standby: bool = False,
        step_queue_type: str | None = DEFAULT_STEP_QUEUE_TYPE,
    ) -> None:
        """An engine over ``bus`` and ``store``; nothing happens until :meth:`run`.

        ``batch_size``: events applied in one transaction at most. ``prefetch``: unacked
        messages per queue. ``cache_size``: in-flight workflows kept in memory.
        ``timer_horizon``: seconds of timers read ahead from the store. ``clock``: the
        time (tests). ``store_grace``: seconds the store may be in trouble before the
        engine exits (code 4). ``retention``: seconds a finished workflow is kept (None:
        for ever). ``new_store``: serve a vhost last served from another store.
        ``lock_wait``: seconds to wait for a previous engine's vhost lock to be freed.
        ``client_users``/``service_users``: the broker users whose requests (all kinds),
        and whose outcomes and definitions, are obeyed; both None obeys every user.
        ``stuck_after``: seconds after which a step not started shows as stuck.
        ``faults``: the chaos suite's fault injection (none by default).
        ``standby``: the store can be shared (PostgreSQL): while another engine serves the
        vhost, stand by and take over when it goes, rather than refuse to start; and when
        another engine takes over from this one, stop with :attr:`deposed` set (the daemon
        then starts a fresh engine, which stands by).
        ``step_queue_type``: ``classic`` or ``quorum``, for step queues not declared yet.
        """
        self.bus = bus
        self.store = store
        self.batch_size = batch_size
        self.prefetch = prefetch
        self.clock = clock
        self.new_store = new_store
        self.lock_wait = lock_wait
        self.faults = faults or Faults()
        self.engine_id = secrets.token_hex(8)
        self.exit_code = 0
        self.ready = asyncio.Event()
        self.stats = {"events": 0, "batches": 0, "started": 0, "finished": 0, "dead_lettered": 0}
        # Called with each batch once it is committed (metrics); it must not raise or block.
        self.on_commit: Callable[[Batch], None] | None = None

        self.health = StoreHealth(store_grace)
        self.registry = Registry(bus, store, check_step_queue_type(step_queue_type))
        self.schedules: dict[str, Schedule] = {}
        self.type_pauses: dict[tuple[str, str], TypePause] = {}  # paused workflow types
        self.cache = InFlight(cache_size)
        self.timers = TimerQueue(timer_horizon)
        self.answers = Answers(bus, store, self.cache, stuck_after=stuck_after, clock=clock)
        self.intake = Intake(bus, Access(bus.user, client_users, service_users), self.answers.send)
        self.applier = Applier(self.registry, self.schedules, self.intake.signer, self.type_pauses)
        self.loader = Loader(
            store, self.cache, self.registry, self.schedules, lambda: self.applier.slots
        )
        self.retention = Retention(store, self.health, retention)
        self.relay = OutboxRelay(bus, on_unroutable=self._redeclare, faults=self.faults)

        self._vhost: VhostLock | None = None
        self._reached_broker = False
        self._held: list[Received] | None = None  # a batch whose commit failed, to try again
        # A commit failed with its connection: it may have committed all the same (PostgreSQL
        # lost the answer), outbox rows included, so the outbox is read back once it commits.
        self._outbox_unsure = False
        self._subscriptions: list[Subscription] = []
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self.standby = Standby(self._stopping) if standby else None
        self.deposed = False  # another engine took over the vhost and the store from this one
        self.active = False  # holding the vhost and the store's claim, serving
        self.active_since: float | None = None
        self.takeovers = 0  # times this engine took over from another (after standing by)

    # -- life cycle -----------------------------------------------------------------------

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
        if self._vhost is not None:
            with contextlib.suppress(Exception):
                await self._vhost.release()
            self._vhost = None
        with contextlib.suppress(Exception):
            await self.bus.close()

    async def start(self) -> None:
        try:
            await self.store.exclude_others(self.lock_wait)
        except StoreError as exc:
            if exc.kind == "in_use":
                raise StartRefused(f"another engine already serves this store: {exc}") from None
            raise
        await self.store.open()
        signer = Signer(self.store.identity.secret)
        self.intake.signer = self.applier.signer = signer
        await self.bus.connect()
        self._reached_broker = True
        await declare_core(self.bus, engine=True)
        try:
            lock = await take_vhost(
                self.bus,
                self.store.identity,
                self.store.url,
                self.engine_id,
                new_store=self.new_store,
                wait=self.lock_wait,
                standby=self.standby,
            )
        except StartRefused:
            if self.store.identity.fresh:  # made by this start: leave nothing behind
                await self.store.discard()
            raise
        if lock is None:  # stopped while standing by
            return
        self._vhost = VhostLock(self.bus, lock)
        # The fencing token: from this commit on, every commit of a previous owner fails in
        # its own transaction (it checks the owner FOR SHARE; this waits for one in flight).
        await self.store.claim(self.engine_id)
        took_over = self.standby is not None and self.standby.since is not None
        if took_over:
            assert self.standby is not None and self.standby.since is not None
            self.takeovers += 1
            before = self.standby.active
            log.warning(
                "taking over: the active engine's lock was freed, and this engine has claimed "
                "the store",
                previous=before.describe() if before else None,
                stood_by_seconds=round(time.time() - self.standby.since, 1),
            )
        self._spawn(self._vhost.watch(self._stopping, self._still_ours, self._refused))
        self._spawn(watch_store(self.store, self.health, self._stopping))
        await self.registry.load()
        self.schedules.update({s.id: s for s in await self.store.schedules()})
        self.type_pauses.update({p.key: p for p in await self.store.type_pauses()})
        await self._rebuild_slots()
        unsent = await self.store.unsent()
        if unsent:
            log.info("publishing outbox rows left from before", count=len(unsent))
            self.relay.submit(unsent)
        for queue, handler in (
            (COMMANDS_QUEUE, self.intake.on_request),
            (RESULTS_QUEUE, self.intake.on_outcome),
            (DEADLETTERS_QUEUE, self.intake.on_dead_letter),
        ):
            self._subscriptions.append(await self.bus.consume(queue, handler, self.prefetch))
        log.info(
            "engine started",
            broker=redact_url(self.bus.url),
            store=redact_url(self.store.url),
            store_id=self.store.identity.store_id,
            engine_id=self.engine_id,
            definitions=sorted(self.registry.latest),
            took_over=took_over,
        )
        self.active = True
        self.active_since = time.time()
        self.ready.set()

    async def _still_ours(self) -> bool:
        return await self.store.owner() == self.engine_id

    def _refused(self, message: str) -> None:
        self._deposed(message)

    def _deposed(self, message: str) -> None:
        """Another engine took the vhost or claimed the store: this one must stop serving.

        Nothing more is acked (what was consumed and not committed goes back to the queues
        when the connections close), and on a shared store the daemon starts a fresh engine,
        which stands by: nothing of this engine's memory (cache, timers, schedules) is kept.
        """
        self.active = False
        if self.standby is None:
            self._fail(EXIT_REFUSED, message)
            return
        if self.exit_code == 0:  # not an exit: the daemon starts a fresh engine, standing by
            self.exit_code, self.deposed = EXIT_REFUSED, True
            log.warning(f"{message}; this engine stops, to stand by afresh")
        self._stopping.set()

    def _fail(self, code: int, message: str, **fields: Any) -> None:
        """Stop the engine with an exit code, saying why in one line."""
        if self.exit_code == 0:
            self.exit_code = code
            log.error(message, exit_code=code, **fields)
        self._stopping.set()

    def stop(self) -> None:
        self.deposed = False  # an operator's stop: the daemon exits, even if deposed meanwhile
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
        await self.intake.close()
        await self._undo_start()
        await self.store.close()
        log.info("engine stopped", **self.stats, refused=self.intake.dead_lettered)

    # -- the loop -------------------------------------------------------------------------

    async def _loop(self) -> None:
        stop = asyncio.ensure_future(self._stopping.wait())
        inbox = self.intake.inbox
        try:
            while not self._stopping.is_set():
                problem = self.health.problem
                if problem is not None and problem.kind == "taken":  # a probe was fenced
                    self._deposed(str(problem))
                    break
                if self._troubled:
                    await self._sit_out_trouble()
                    continue
                now = self.clock()
                if self.timers.needs_scan(now):
                    await self._scan_timers(now)
                if now >= self.retention.next_at or self.retention.due:
                    await self.retention.step(now)
                received: list[Received] = []
                if inbox.empty():
                    getter = asyncio.ensure_future(inbox.get())
                    done, _ = await asyncio.wait(
                        {getter, stop},
                        timeout=self._idle_timeout(now),
                        return_when=asyncio.FIRST_COMPLETED,
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
                while count < self.batch_size and not inbox.empty():
                    item = inbox.get_nowait()
                    received.append(item)
                    count += len(item.events)
                now = self.clock()
                timers = due_events(self.timers, self.schedules, now)
                if timers is not None:
                    received.append(timers)
                expired = self.answers.expired(now)
                if expired:
                    self._spawn(self.answers.send(expired))
                if received or self.relay.has_confirmed:
                    await self._process(received)
        finally:
            stop.cancel()

    @property
    def _troubled(self) -> bool:
        cut_off = self._vhost is not None and self._vhost.cut_off
        return cut_off or self.health.problem is not None or self._held is not None

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
        held, problem = self._held, self.health.problem
        cut_off = self._vhost is not None and self._vhost.cut_off
        if held is not None and not cut_off and not (problem is not None and problem.lasting):
            self._held = None
            await self._process(held)

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
        if self.answers.holding:
            timeout = min(timeout, max(0.0, self.answers.next_expiry - now))
        return min(timeout, 5.0)

    async def _scan_timers(self, now: float) -> None:
        until = now + self.timers.horizon
        rows = await self.store.due_timers(until, TIMER_SCAN_LIMIT)
        self.timers.loaded(rows, until, complete=len(rows) < TIMER_SCAN_LIMIT)

    async def _process(self, received: list[Received]) -> None:
        """Apply a batch and make it durable, then let its effects out, in this order:

        1. load what the events need, apply the pure machine, and commit the new state with
           the messages it causes (outbox) and the outbox rows confirmed since (one
           transaction);
        2. check that the store file is still the one committed to;
        3. keep what is still in flight in memory, and hand the outbox to the relay (publish,
           confirm, delete on the next commit);
        4. answer requests and wake waiters;
        5. ack what was consumed, only now: a crash before this redelivers it, and every
           event is applied at most once (stale outcomes and answered requests are ignored;
           a request answered already is answered again the same way).

        The order is the guarantee: nothing is acked or published before its commit. A batch
        that fails to commit is held and tried again; nothing is acked meanwhile.
        """
        now = self.clock()
        begun_ns = time.time_ns()  # the spans' clock: wall time, whatever self.clock is
        events = [event for r in received for event in r.events]
        work = Work()
        work.batch.sent = self.relay.take_confirmed()
        try:
            await self.loader.load(events, work, now)
            for event in events:
                self.applier.apply(event, work, now)
            await follow_up(self.loader, self.applier, work, now)  # children and parents
            await self.store.commit(work.batch)
        except Exception as exc:
            self._rolled_back(events, work)
            if isinstance(exc, StoreError):
                if exc.kind == "taken":
                    self._deposed(str(exc))
                    return
                self.health.failed(exc)
                self._held = received  # tried again once the store takes commits
                # Over a network (PostgreSQL) a failed commit may have committed; SQLite knows.
                self._outbox_unsure = self.standby is not None
                return
            log.exception("a batch failed; its messages will be redelivered")
            for item in received:
                if item.delivery is not None:
                    await settle(item.delivery.reject(requeue=True))
            await asyncio.sleep(1.0)
            return
        moved = self.store.check_file()
        if moved is not None:  # committed into a file no longer there: ack nothing
            self.health.failed(moved)
            return
        self.health.ok()
        if self._outbox_unsure:
            with contextlib.suppress(StoreError):  # still unsure: read it after the next commit
                self.relay.resubmit(await self.store.unsent())
                self._outbox_unsure = False
        self.faults.reached("after_commit")
        self._committed(events, work, now)
        if tracing.recording():
            record_spans(work.batch, begun_ns, time.time_ns())
        self.relay.submit(work.batch.outbox)
        if work.batch.outbox:
            await asyncio.sleep(0)  # let the next steps go out before the replies and acks
        try:
            for request in work.reads:
                await self.answers.read(request, work, now)
            await self.answers.wake(work.finished, work)
        except Exception:  # a read gone wrong must not stop the engine; its client asks again
            log.exception("answering a request failed")
        # Replies before acks: each ack waits for its frame to be written, and a reply needs
        # only the commit (the last batch of a lone workflow answers 0.16 ms sooner, median,
        # 1.6 ms at p90, on the busy machine).
        await self.answers.send(work.replies)
        for item in received:
            if item.delivery is None:
                continue
            if item.refused:
                self.intake.refuse_items(item)  # acks once the refused items are dead-lettered
            else:
                await settle(item.delivery.ack())
        self.faults.reached("after_ack")

    def _rolled_back(self, events: list[Any], work: Work) -> None:
        for event in events:
            self.cache.drop(event.workflow_id)
        self.relay.restore_confirmed(work.batch.sent)
        self.timers.loaded_until = float("-inf")  # timers popped for it: read them again

    def _committed(self, events: list[Any], work: Work, now: float) -> None:
        """What a committed batch changes in memory: cache, schedules, timers, logs, counts."""
        if self.on_commit is not None:
            try:
                self.on_commit(work.batch)
            except Exception:
                log.exception("the on_commit hook failed")
        for level, event, fields in work.logs:
            getattr(log, level)(event, **fields)
        self.stats["batches"] += 1
        self.stats["events"] += len(events)
        self.stats["started"] += work.started
        self.stats["finished"] += len(work.finished)
        self.stats["dead_lettered"] += work.dead_lettered
        self.cache.update(work.state, now + self.timers.horizon)
        for schedule_id, changed in work.schedules.items():
            if changed is None:
                self.schedules.pop(schedule_id, None)
            else:
                self.schedules[schedule_id] = changed
        for key, pause in work.type_pauses.items():
            if pause is None:
                self.type_pauses.pop(key, None)
            else:
                self.type_pauses[key] = pause
        for workflow_id, kind, due in work.timers:
            self.timers.add(workflow_id, kind, due)
        if work.slots is not None:
            self.applier.slots = work.slots
        if work.stalled:
            self._admit_stalled(work.stalled, now)

    async def _rebuild_slots(self) -> None:
        """The concurrency slots as the store's runs have them: never counters carried over.
        A group left with free slots and a line (a definition's limit raised) admits it."""
        limited = {
            (d.name, step.name)
            for d in self.registry.versions.values()
            for step in d.all_steps
            if step.concurrency is not None or step.rate_limit is not None
        }
        ids: list[str] = []
        for name, step in sorted(limited):
            ids += await self.store.limited_runs(name, step)
        rows: dict[str, tuple[Workflow, StepRun | None]] = {}
        for start in range(0, len(ids), 1000):
            rows.update(await self.store.load(ids[start : start + 1000]))
        slots = Slots.build(rows.values(), self._definition_of)
        now = self.clock()
        for definition in self.registry.latest.values():  # rates start afresh, one interval on
            for limited_step in definition.all_steps:
                if limited_step.rate_interval is not None:
                    slots.next_at[(definition.name, limited_step.name)] = (
                        now + limited_step.rate_interval
                    )
        self.applier.slots = slots
        self._admit_stalled(set(slots.queued), now)
        if ids:
            log.info(
                "concurrency slots rebuilt from the store",
                taken=sum(len(m) for m in self.applier.slots.active.values()),
                queued=self.applier.slots.waiting(),
            )

    def slot_counts(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(workflow, step) -> runs holding a slot of its concurrency limit, runs queued."""
        slots = self.applier.slots
        counts: dict[tuple[str, str], tuple[int, int]] = {}
        for (name, step, _), members in slots.active.items():
            out, waiting = counts.get((name, step), (0, 0))
            counts[(name, step)] = (out + len(members), waiting)
        for (name, step, _), line in slots.queued.items():
            out, waiting = counts.get((name, step), (0, 0))
            counts[(name, step)] = (out, waiting + len(line))
        return counts

    def _definition_of(self, workflow: Workflow) -> WorkflowDefinition | None:
        return self.registry.versions.get((workflow.name, workflow.version))

    def _admit_stalled(self, groups: set[Group], now: float) -> None:
        """Groups with free slots and a line whose next run a batch had not loaded: an
        admission event for each, in the next batch (in memory: rebuilt at start-up)."""
        slots = self.applier.slots
        for group in groups:
            line = slots.line(group)
            if line:
                self.timers.push(line[0], TIMER_ADMIT, now)

    async def _redeclare(self, row: OutboxRow) -> None:
        await self.registry.redeclare(row.routing_key)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)


async def follow_up(loader: Loader, applier: Applier, work: Work, now: float) -> None:
    """Apply the batch's follow-ups (child workflows started, cancelled or retried,
    parents told; see :mod:`~hms_mgmt.engine.family`), and theirs, until none are left:
    loaded and applied before the batch's one commit."""
    for _ in range(FOLLOW_UP_ROUNDS):
        if not work.follow:
            return
        pending, work.follow = work.follow, []
        await loader.load_more([f.workflow_id for f in pending], work)
        for event in pending:
            if isinstance(event, RetryChild):
                await loader.load_failed_run(event.workflow_id, work)
        for event in pending:
            applier.apply(event, work, now)
    work.log(
        "error",
        "child workflows nested deeper than the engine follows in one batch: left undone",
        rounds=FOLLOW_UP_ROUNDS,
        left=[f.workflow_id for f in work.follow[:20]],
    )
    work.follow = []
