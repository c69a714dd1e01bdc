"""The step runtime: consume step queues, run handlers, report outcomes.

A worker never touches the store. For each step message it runs the handler
and publishes the outcome (confirmed) before it acks the message, so a crash
at any point leads to a redelivery, never a lost step; the engine ignores a
repeated outcome. A handler's exception is an outcome (``failed``), never a
reject; only a message that cannot be decoded is rejected, which dead-letters
it. Run one with ``python -m hms_mgmt.worker module:attribute``.

A step with a ``timeout`` has a deadline here too: its start plus the timeout,
pushed out by ``ctx.heartbeat()``. When it passes, an ``async def`` handler is
cancelled and the attempt fails with ``StepTimeout``, freeing its concurrency
slot. A plain-function handler runs in a thread (:mod:`hms_mgmt.worker.threads`),
and a thread cannot be stopped: at its deadline the attempt fails all the same and
the slot is freed, but the thread runs on, abandoned, until the function returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import time
import traceback
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

from bus_adapters.base import Bus, BusError, Delivery, Subscription, settle
from hms_mgmt import tracing
from hms_mgmt.context import Handler, StepContext
from hms_mgmt.definitions import WorkflowDefinition
from hms_mgmt.errors import (
    EngineUnavailableError,
    HmsError,
    InvalidMessageError,
    NonRetryableError,
    PayloadError,
    Retry,
    StepTimeout,
)
from hms_mgmt.faults import Faults
from hms_mgmt.logs import get_logger
from hms_mgmt.records import branch_of
from hms_mgmt.results import normalise_result
from hms_mgmt.topology import DEFAULT_STEP_QUEUE_TYPE, declare_core, declare_step
from hms_mgmt.wire.codec import MAX_PAYLOAD_BYTES, check_finite, new_id, why_not_json
from hms_mgmt.wire.outcomes import Outcome
from hms_mgmt.wire.steps import StepMessage
from hms_mgmt.worker.reporter import OutcomeReporter
from hms_mgmt.worker.threads import Deadline, HandlerThreads, ThreadRun, thread_stack

log = get_logger("worker")

CANCEL_GRACE = 1.0  # seconds a timed-out handler has to wind up after its cancellation
GUARD_TIMEOUT = 300.0  # seconds the poison guard waits for the engine's verdict
REMEMBERED = 10_000  # runs reported lately whose copies are not run again (about 2 MB)

Ask = Callable[..., Awaitable[Any]]
"""A request to the engine: ``ask(kind, fields, timeout=...)``, its answer (Client.request)."""


def _describe(handler: Handler, topic: str) -> str:
    name = getattr(handler, "__qualname__", None) or repr(handler)
    module = getattr(handler, "__module__", None)
    return f"handler {module + '.' if module else ''}{name} of {topic}"


def _error_of(exc: BaseException, *, retryable: bool = True) -> dict[str, Any]:
    types = [
        f"{cls.__module__}.{cls.__qualname__}"
        for cls in type(exc).__mro__
        if cls not in (object, BaseException, Exception)
    ]
    error: dict[str, Any] = {
        "type": type(exc).__name__,
        "types": types,
        "message": str(exc)[:4000],
        "traceback": "".join(traceback.format_exception(exc))[-8000:],
        "retryable": retryable,
    }
    if isinstance(exc, Retry) and exc.delay is not None:
        error["retry_delay"] = exc.delay
    return error


class Worker:
    def __init__(
        self,
        bus: Bus,
        handlers: dict[str, Handler],
        definitions: dict[str, WorkflowDefinition] | None = None,
        *,
        concurrency: int = 100,
        started_report_after: float = 1.0,
        shutdown_timeout: float = 30.0,
        on_outcome: Callable[[StepMessage, Outcome], None] | None = None,
        faults: Faults | None = None,
        step_queue_type: str | None = DEFAULT_STEP_QUEUE_TYPE,
        ask: Ask | None = None,
    ) -> None:
        """``step_queue_type``: for step queues not declared yet (an existing one keeps its
        type). ``ask``: the engine's request path, for the poison guard of classic step
        queues; without it, a message redelivered from a classic queue runs unasked."""
        self.bus = bus
        self.step_queue_type = step_queue_type
        self._ask = ask
        self._guarded: set[str] = set()  # topics on classic queues: the poison guard's
        self.on_outcome = on_outcome  # called with each finished step's outcome (metrics)
        self.handlers = dict(handlers)
        self.definitions = dict(definitions or {})
        self.concurrency = concurrency
        self.started_report_after = started_report_after
        self.shutdown_timeout = shutdown_timeout
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self.threads = HandlerThreads(concurrency)
        self._orphans: set[asyncio.Task[Any]] = set()  # timed out, ignoring their cancellation
        self._subscriptions: list[Subscription] = []
        self._stopping = asyncio.Event()
        self.stats = {"succeeded": 0, "failed": 0, "invalid": 0, "guarded": 0, "copies": 0}
        # The runs this service is running, by (workflow id, seq, attempt), and the last
        # ones it ran and reported: a copy of one's step message is not run again.
        self._inside: dict[tuple[str, int, int], asyncio.Future[bool]] = {}
        self._reported: OrderedDict[tuple[str, int, int], None] = OrderedDict()
        self._reporter = OutcomeReporter(bus, faults)
        self._probation = True

    async def start(self) -> None:
        await self.bus.connect()
        await declare_core(self.bus)
        for topic in self.handlers:
            workflow, step = topic.split(".", 1)
            kind = await declare_step(
                self.bus, workflow, step, engine=False, queue_type=self.step_queue_type
            )
            if kind == "classic":
                self._guarded.add(topic)
        # On probation: one delivery at a time per queue until one has been handled. A worker
        # that starts after a crash thus meets the message that crashed it alone, and a
        # message that kills its worker cannot take prefetched neighbours past the delivery
        # limit with it, crash after crash.
        for topic in self.handlers:
            self._subscriptions.append(await self.bus.consume(topic, self._on_delivery, prefetch=1))
        log.info("worker serving", topics=sorted(self.handlers), concurrency=self.concurrency)

    async def shutdown(self) -> None:
        """Stop taking work, let running handlers finish (bounded), then let go."""
        self._stopping.set()
        for subscription in self._subscriptions:
            with contextlib.suppress(BusError, OSError):
                await subscription.cancel()
        self._subscriptions.clear()
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=self.shutdown_timeout)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("handlers still running at shutdown were cancelled", count=len(pending))
                await asyncio.gather(*pending, return_exceptions=True)
        for orphan in self._orphans:
            orphan.cancel()
        # Threads cannot be stopped: do not wait for those still running a handler.
        self.threads.shutdown(wait=False, cancel_futures=True)
        log.info("worker stopped", **self.stats)

    async def _end_probation(self) -> None:
        self._probation = False
        for subscription in self._subscriptions:
            with contextlib.suppress(BusError, OSError, RuntimeError):
                await subscription.set_prefetch(self.concurrency)

    def _on_delivery(self, delivery: Delivery) -> None:
        task = asyncio.get_running_loop().create_task(self._handle(delivery))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, delivery: Delivery) -> None:
        try:
            steps = StepMessage.decode(delivery)
        except InvalidMessageError as exc:
            self.stats["invalid"] += 1
            log.warning(
                "invalid step message dead-lettered",
                queue=delivery.queue,
                reason=str(exc),
                message_id=delivery.message_id,
            )
            await settle(delivery.reject(requeue=False))
            return
        handler = self.handlers.get(steps[0].topic)
        if handler is None:
            await settle(delivery.reject(requeue=True))
            return
        if delivery.redelivered and self._ask is not None and steps[0].topic in self._guarded:
            try:
                steps = await self._guard(delivery, steps)
            except asyncio.CancelledError:
                return  # shutting down: unacked, so the broker redelivers the step
            if not steps:
                return  # settled by the guard
        try:
            if len(steps) == 1:
                done = await self._run_one(handler, steps[0])
            else:
                done = all(await asyncio.gather(*(self._run_one(handler, s) for s in steps)))
        except asyncio.CancelledError:
            return  # shutting down: unacked, so the broker redelivers the step
        if done:
            await settle(delivery.ack())
            if self._probation:
                await self._end_probation()
        else:  # stopping before every run in it started: let another worker have it
            await settle(delivery.reject(requeue=True))

    async def _guard(self, delivery: Delivery, steps: list[StepMessage]) -> list[StepMessage]:
        """The poison guard of a classic step queue (a quorum queue limits deliveries itself).

        A message delivered again (its worker crashed, or lost its connection, before the
        ack) is run only if the engine says so: it counts the run's deliveries durably, and
        past the delivery limit fails the attempt and says to dead-letter the message, which
        is then rejected (its queue dead-letters it to ``hms.dlx``). The steps to run; none if
        the message was settled here.
        """
        assert self._ask is not None
        me = new_id()  # this delivery: a repeated question about it is counted once
        try:
            answers = await asyncio.gather(
                *(
                    self._ask(
                        "redelivered",
                        {
                            "workflow_id": s.workflow_id,
                            "seq": s.seq,
                            "attempt": s.attempt,
                            "token": s.token,
                            "delivery": f"{me}-{i}",
                        },
                        timeout=GUARD_TIMEOUT,
                    )
                    for i, s in enumerate(steps)
                )
            )
        except EngineUnavailableError as exc:  # no verdict: let it come back later
            log.warning("the poison guard got no verdict; the step goes back", error=str(exc))
            await settle(delivery.reject(requeue=True))
            return []
        except HmsError as exc:  # refused (not a run the engine knows): run it, as unguarded
            log.warning("the poison guard's question was refused", error=str(exc))
            return steps
        self.stats["guarded"] += 1
        verdicts = [str((answer or {}).get("verdict", "run")) for answer in answers]
        if "dead_letter" in verdicts:
            reason = next(
                str(a.get("reason"))
                for a, v in zip(answers, verdicts, strict=True)
                if v == "dead_letter"
            )
            log.warning(
                "step message dead-lettered by the poison guard",
                queue=delivery.queue,
                workflow_id=steps[0].workflow_id,
                step=steps[0].step,
                attempt=steps[0].attempt,
                reason=reason,
            )
            await settle(delivery.reject(requeue=False))
            return []
        running = [s for s, v in zip(steps, verdicts, strict=True) if v == "run"]
        if not running:  # every run's outcome is in: nothing to do again
            await settle(delivery.ack())
        return running

    async def _run_one(self, handler: Handler, message: StepMessage) -> bool:
        """Run one step and have its outcome confirmed; False if stopping before it started.

        A copy of a step message (the engine sends again what it had sent but not marked sent
        when it crashed: at least once) whose run this service is running, or has run and
        reported lately, is not run again: it waits for the run and is acked with it (or goes
        back with it); the outcome is the run's own, already on its way to the engine. So a
        copy does not run beside the runs a concurrency limit admits next. (A copy delivered
        to another step service still runs, and its outcome is ignored.)
        """
        key = (message.workflow_id, message.seq, message.attempt)
        running = self._inside.get(key)
        if running is not None or key in self._reported:
            self.stats["copies"] += 1
            log.info(
                "a copy of a step message run here: not run again",
                workflow_id=message.workflow_id,
                step=message.step,
                attempt=message.attempt,
                running=running is not None,
            )
            return True if running is None else await asyncio.shield(running)
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._inside[key] = done
        ran = False
        try:
            ran = await self._run_reported(handler, message)
        finally:
            del self._inside[key]
            done.set_result(ran)
        if ran:
            self._reported[key] = None
            if len(self._reported) > REMEMBERED:
                self._reported.popitem(last=False)
        return ran

    async def _run_reported(self, handler: Handler, message: StepMessage) -> bool:
        async with self._slots:
            if self._stopping.is_set():
                return False
            outcome = await self._run(handler, message)
        if self.on_outcome is not None:
            try:
                self.on_outcome(message, outcome)
            except Exception:  # metrics never hold a step back
                log.exception("the on_outcome hook failed")
        await self._reporter.report(outcome)
        return True

    async def _run(self, handler: Handler, message: StepMessage) -> Outcome:
        topic = message.topic
        bound = log.bind(
            workflow_id=message.workflow_id,
            step=message.step,
            attempt=message.attempt,
            **tracing.log_fields(message.traceparent),
        )
        context = message.context or {}
        started_at = time.time()
        loop = asyncio.get_running_loop()
        deadline = None
        if message.timeout is not None:
            deadline = Deadline(message.timeout, loop.time() + message.timeout)

        async def heartbeat() -> None:
            if deadline is not None:
                deadline.heartbeat(loop.time())
            await self._reporter.report(self._outcome(message, "heartbeat"))

        ctx = StepContext(
            payload=message.payload,
            workflow_id=message.workflow_id,
            workflow=message.workflow,
            step=message.step,
            attempt=message.attempt,
            seq=message.seq,
            visit=message.visit,
            error=context.get("error"),
            signal=context.get("signal"),
            compensating=context.get("compensating"),
            traceparent=message.traceparent,
            branch=branch_of(context),
            _heartbeat=heartbeat,
        )
        report_started: asyncio.TimerHandle | None = None
        if message.timeout is not None or message.schedule_to_start is not None:
            # The engine's deadline runs from the start, and its schedule-to-start deadline
            # stops there, so it needs to know now.
            self._reporter.report(self._outcome(message, "started", started_at=started_at))
        else:
            report_started = loop.call_later(
                self.started_report_after, self._report_started_later, message, started_at
            )
        describe = functools.partial(_describe, handler, topic)
        try:
            with tracing.step_span(
                message.traceparent,
                topic,
                {"hms.workflow_id": message.workflow_id, "hms.attempt": message.attempt},
            ):
                thread = None if inspect.iscoroutinefunction(handler) else ThreadRun(handler)
                if deadline is None:
                    value = await self._call(handler, ctx, thread)
                else:
                    value = await self._call_by(deadline, handler, ctx, thread, message)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if self._stopping.is_set() or (task is not None and task.cancelling()):
                raise  # we are being cancelled: shutting down
            # The handler's own code was cancelled (a library cancelling a sub-task).
            return self._failed(
                message, RuntimeError(f"cancelled: {exc!r}"), started_at, bound, retryable=True
            )
        except Retry as exc:
            return self._failed(message, exc, started_at, bound, retryable=True)
        except NonRetryableError as exc:
            return self._failed(message, exc, started_at, bound, retryable=False)
        except Exception as exc:
            return self._failed(message, exc, started_at, bound, retryable=True)
        finally:
            if report_started is not None:
                report_started.cancel()
        try:
            result = normalise_result(value, payload=message.payload, describe=describe)
            self._check_next_step(message, result, describe)
        except ValueError as exc:
            # A handler that returns the wrong shape would do so again: no retries.
            return self._failed(message, exc, started_at, bound, retryable=False)
        outcome = self._outcome(
            message,
            "succeeded",
            result=result,
            started_at=started_at,
            finished_at=time.time(),
            handler=describe(),
        )
        try:
            size = len(outcome.encoded)
            if b"null" in outcome.encoded:
                check_finite(result)
        except (TypeError, ValueError) as exc:
            error = PayloadError(
                f"{describe()} returned data that is not JSON-serialisable: "
                f"{why_not_json(result, exc, 'result')}"
            )
            return self._failed(message, error, started_at, bound, retryable=False)
        if size > MAX_PAYLOAD_BYTES:
            error = PayloadError(
                f"{describe()} returned {size} bytes of JSON; the limit is {MAX_PAYLOAD_BYTES}"
            )
            return self._failed(message, error, started_at, bound, retryable=False)
        self.stats["succeeded"] += 1
        return outcome

    async def _call(self, handler: Handler, ctx: StepContext, thread: ThreadRun | None) -> Any:
        if thread is None:
            return await handler(ctx)
        # In the worker's pool, not asyncio's default executor (min(32, CPUs + 4) threads,
        # shared with DNS lookups and to_thread): one thread per unit of concurrency.
        thread.future = self.threads.submit(contextvars.copy_context().run, thread, ctx)
        value = await asyncio.wrap_future(thread.future)
        if inspect.isawaitable(value):
            value = await value
        return value

    async def _call_by(
        self,
        deadline: Deadline,
        handler: Handler,
        ctx: StepContext,
        thread: ThreadRun | None,
        message: StepMessage,
    ) -> Any:
        """Run a handler in its own task until it finishes or its deadline passes.

        Its value or exception is ours; at the deadline it is cancelled (a thread is
        abandoned) and we raise :class:`StepTimeout`. Cancelling us cancels it too.
        """
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._call(handler, ctx, thread))
        try:
            while not task.done():
                remaining = deadline.at - loop.time()
                if remaining <= 0:
                    break
                await asyncio.wait({task}, timeout=remaining)
        except asyncio.CancelledError:  # shutting down: the handler goes with us
            task.cancel()
            await self._wind_up(task)
            raise
        if task.done():
            return task.result()  # the handler's own CancelledError included
        raise await self._time_out(task, thread, deadline, message)

    async def _time_out(
        self,
        task: asyncio.Task[Any],
        thread: ThreadRun | None,
        deadline: Deadline,
        message: StepMessage,
    ) -> StepTimeout:
        """Stop a handler whose deadline has passed; the error its attempt fails with."""
        since = " of its last heartbeat" if deadline.heartbeats else ""
        text = (
            f"step {message.step!r} attempt {message.attempt} did not finish within "
            f"{deadline.timeout:g}s{since}"
        )
        bound = log.bind(
            workflow_id=message.workflow_id,
            step=message.step,
            attempt=message.attempt,
            **tracing.log_fields(message.traceparent),
        )
        if thread is not None and thread.future is not None and self.threads.abandon(thread.future):
            where = thread_stack(thread.thread_id)
            task.cancel()  # stops the wait for the thread; the thread itself runs on
            task.add_done_callback(_retrieve)
            error = StepTimeout(f"{text}; its thread cannot be stopped and runs on")
            bound.warning(
                "step timed out; its handler thread cannot be stopped and runs on",
                timeout=deadline.timeout,
                threads_running_past_timeout=self.threads.running_past_timeout,
            )
        else:
            where = _suspended_at(task)
            task.cancel()
            await self._wind_up(task)
            error = StepTimeout(f"{text}: its handler was cancelled")
            bound.warning("step timed out; its handler was cancelled", timeout=deadline.timeout)
        if where:
            error.add_note(f"The handler was here when its time ran out:\n{where}")
        return error

    async def _wind_up(self, task: asyncio.Task[Any]) -> None:
        """Give a cancelled handler a moment to finish; one that ignores it is left running."""
        task.add_done_callback(_retrieve)
        await asyncio.wait({task}, timeout=CANCEL_GRACE)
        if not task.done():
            log.warning(
                "a cancelled handler is still running; it is left to run on",
                grace=CANCEL_GRACE,
                where=_suspended_at(task).strip().rsplit("\n", 2)[0],
            )
            self._orphans.add(task)
            task.add_done_callback(self._orphans.discard)

    def _check_next_step(
        self, message: StepMessage, result: dict[str, Any], describe: Callable[[], str]
    ) -> None:
        definition = self.definitions.get(message.workflow)
        bad = (
            None
            if definition is None or "compensating" in (message.context or {})
            else definition.bad_next_step(result.get("next_step"), describe())
        )  # a compensation's next_step is ignored by the engine, whatever it names
        if bad is not None:
            raise ValueError(bad)

    def _failed(
        self,
        message: StepMessage,
        exc: Exception,
        started_at: float,
        bound: Any,
        *,
        retryable: bool,
    ) -> Outcome:
        self.stats["failed"] += 1
        bound.warning("step failed", error_type=type(exc).__name__, error=str(exc)[:500])
        return self._outcome(
            message,
            "failed",
            error=_error_of(exc, retryable=retryable),
            started_at=started_at,
            finished_at=time.time(),
        )

    def _report_started_later(self, message: StepMessage, started_at: float) -> None:
        self._reporter.report(self._outcome(message, "started", started_at=started_at))

    @staticmethod
    def _outcome(message: StepMessage, kind: str, **values: Any) -> Outcome:
        return Outcome(
            workflow_id=message.workflow_id,
            seq=message.seq,
            kind=kind,
            step=message.step,
            attempt=message.attempt,
            token=message.token,
            **values,
        )


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Take a given-up handler's result, so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


def _suspended_at(task: asyncio.Task[Any]) -> str:
    """Where a suspended handler task waits: its chain of awaits, innermost last."""
    frames: list[tuple[FrameType, int]] = []
    awaiting: Any = task.get_coro()
    while awaiting is not None and len(frames) < 64:
        frame = getattr(awaiting, "cr_frame", None) or getattr(awaiting, "gi_frame", None)
        if frame is None:
            break
        if frame.f_code is not Worker._call.__code__:
            frames.append((frame, frame.f_lineno))
        awaiting = getattr(awaiting, "cr_await", None) or getattr(awaiting, "gi_yieldfrom", None)
    return "".join(traceback.StackSummary.extract(frames).format())
