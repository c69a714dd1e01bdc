"""Requests to the engine over the bus, each with a deadline, retried until answered.

A request keeps its id across retries, so the engine answers a repeated start
with the workflow it already made; a request survives an engine restart or a
dropped connection as long as its deadline allows. Requests the engine has not
answered are bounded (``max_in_flight``), so starting a hundred thousand
workflows at once queues them here rather than flooding the broker with copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bus_adapters.base import BrokerConnectError, Bus, BusError, Delivery, redact_url
from hms_mgmt import tracing
from hms_mgmt.bounds import (
    check_attributes,
    check_delay,
    check_id,
    check_key,
    check_priority,
    check_run_at,
    check_schedule_id,
    check_time,
)
from hms_mgmt.definitions import WorkflowDefinition, check_name
from hms_mgmt.errors import (
    BrokerUnavailableError,
    EngineUnavailableError,
    InvalidMessageError,
    PayloadError,
    WorkflowNotFoundError,
    WorkflowTimeoutError,
    error_from_reply,
)
from hms_mgmt.logs import get_logger
from hms_mgmt.records import WorkflowState
from hms_mgmt.schedules import check as check_schedule
from hms_mgmt.sending import Coalescer
from hms_mgmt.topology import declare_core
from hms_mgmt.wire.codec import MAX_REPLY_BYTES, decode_body, encode_payload, new_id
from hms_mgmt.wire.requests import request_item, requests_message

log = get_logger("client")

DEFAULT_TIMEOUT = 30.0
FIRST_RETRY_AFTER = 5.0
WAIT_HOLD = 20.0


@dataclass(frozen=True)
class StartResult:
    """What ``start`` returns; ``existing`` if the id or idempotency key was already used."""

    workflow_id: str
    existing: bool = False


@dataclass(frozen=True)
class _Request:
    request_id: str
    body: bytes
    persistent: bool
    deadline: float


def _check_workflow_id(workflow_id: str) -> None:
    """A workflow id the engine could have made: :data:`hms_mgmt.bounds.ID_PATTERN`."""
    check_id(workflow_id, "workflow id", PayloadError)


def new_workflow_id() -> str:
    """Time-ordered (milliseconds) then random: sorts by start time, never collides in practice."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


def _start_fields(
    workflow: str,
    payload: Any,
    delay: float | None,
    run_at: datetime | float | None,
    idempotency_key: str | None,
    traceparent: str | None,
    attributes: dict[str, str] | None = None,
    priority: int | None = None,
) -> dict[str, Any]:
    """A start request's fields, each checked here, before anything is sent."""
    check_name("workflow", workflow)
    encode_payload(payload)
    if traceparent is not None and not tracing.valid(traceparent):
        raise PayloadError(f"traceparent {traceparent!r} is not a W3C traceparent")
    fields: dict[str, Any] = {
        "workflow_id": new_workflow_id(),
        "workflow": workflow,
        "payload": payload,
    }
    if delay is not None:
        fields["delay"] = check_delay(delay, "delay", PayloadError)
    if run_at is not None:
        if isinstance(run_at, datetime):
            try:
                run_at = run_at.timestamp()
            except (OverflowError, ValueError, OSError) as exc:
                raise PayloadError(f"run_at {run_at!r} has no timestamp: {exc}") from None
        fields["run_at"] = check_run_at(run_at, "run_at", PayloadError)
    if idempotency_key is not None:
        fields["idempotency_key"] = check_key(str(idempotency_key), error=PayloadError)
    if attributes:
        fields["attributes"] = check_attributes(attributes, error=PayloadError)
    if priority is not None:
        fields["priority"] = check_priority(priority, "priority", PayloadError)
    return fields


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.time())


class Calls:
    """The calls to the engine, written once: :class:`Client` sends them itself, and
    ``Management`` through the client it connects on first use."""

    request_timeout: float

    async def request(
        self,
        kind: str,
        fields: dict[str, Any],
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        persistent: bool = True,
        bounded: bool = True,
        first_retry: float = FIRST_RETRY_AFTER,
    ) -> Any:
        raise NotImplementedError

    async def define(self, definition: WorkflowDefinition, *, timeout: float = 3600.0) -> Any:
        """Register a definition with the engine (durable: it waits in the queue for the engine)."""
        return await self.request(
            "define", {"definition": definition.to_json()}, timeout=timeout, bounded=False
        )

    async def start(
        self,
        workflow: str,
        payload: Any = None,
        *,
        delay: float | None = None,
        run_at: datetime | float | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
        traceparent: str | None = None,
        attributes: dict[str, str] | None = None,
        priority: int | None = None,
    ) -> StartResult:
        """Start a workflow; ``traceparent`` defaults to the context of this call's
        ``hms.start <workflow>`` span (with OpenTelemetry), else to a new trace.

        ``attributes`` are business keys (``{"application_id": "A-17"}``), recorded with
        the start, so ``list(attributes=...)`` finds the workflow as soon as this returns.
        ``priority``: 1 (first) to 5 (last), 3 by default: the order in which its runs
        waiting for a concurrency or rate limit, and its start held by a type pause, go."""
        fields = _start_fields(
            workflow, payload, delay, run_at, idempotency_key, traceparent, attributes, priority
        )
        with tracing.start_span(workflow, traceparent) as carried:
            fields["traceparent"] = carried
            result = await self.request(
                "start", fields, timeout=timeout, request_id=fields["workflow_id"]
            )
        return StartResult(str(result["workflow_id"]), bool(result.get("existing")))

    async def execute(
        self,
        workflow: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        traceparent: str | None = None,
        attributes: dict[str, str] | None = None,
        priority: int | None = None,
    ) -> WorkflowState:
        """Start a workflow and return its state once it ends, in one round trip.

        The wait goes out with the start, in the same message, and the engine holds it
        until the workflow is terminal: a lone workflow saves the start's own round trip.
        :class:`WorkflowTimeoutError` (a ``TimeoutError``, naming the workflow) if it has
        not ended by ``timeout``; it goes on running. The start itself has the client's
        ``request_timeout`` (an engine that does not answer is ``EngineUnavailableError``).
        """
        fields = _start_fields(
            workflow, payload, None, None, idempotency_key, traceparent, attributes, priority
        )
        workflow_id = fields["workflow_id"]
        deadline = None if timeout is None else time.time() + timeout
        with tracing.start_span(workflow, traceparent) as carried:
            fields["traceparent"] = carried
            starting = asyncio.ensure_future(self.request("start", fields, request_id=workflow_id))
            waiting = asyncio.ensure_future(self.wait(workflow_id, timeout))  # after the start
            try:
                started = str((await starting)["workflow_id"])
            except BaseException:
                waiting.cancel()
                raise
        if started != workflow_id:  # its idempotency key named an earlier workflow
            waiting.cancel()
            return await self.wait(started, _left(deadline))
        try:
            return await waiting
        except WorkflowNotFoundError:  # the wait overtook the start (a full request window)
            return await self.wait(workflow_id, _left(deadline))

    async def status(self, workflow_id: str, *, timeout: float | None = None) -> WorkflowState:
        _check_workflow_id(workflow_id)
        result = await self.request(
            "status", {"workflow_id": workflow_id}, timeout=timeout, persistent=False
        )
        return WorkflowState.from_json(result)

    async def wait(self, workflow_id: str, timeout: float | None = None) -> WorkflowState:
        """The workflow's state once it is terminal; :class:`WorkflowTimeoutError` (a
        ``TimeoutError``) if it is not by ``timeout``."""
        _check_workflow_id(workflow_id)
        deadline = None if timeout is None else time.time() + timeout
        while True:
            hold = (
                WAIT_HOLD if deadline is None else max(0.0, min(WAIT_HOLD, deadline - time.time()))
            )
            result = await self.request(
                "wait",
                {"workflow_id": workflow_id, "hold": hold},
                timeout=hold + self.request_timeout,
                persistent=False,
                bounded=False,
                first_retry=hold + FIRST_RETRY_AFTER,  # the engine holds it that long
            )
            if "status" in result:
                state = WorkflowState.from_json(result)
                if state.terminal:
                    return state
            if deadline is not None and time.time() >= deadline:
                raise WorkflowTimeoutError(
                    f"workflow {workflow_id} did not finish within {timeout:g}s", workflow_id
                )

    async def cancel(
        self, workflow_id: str, reason: str | None = None, *, compensate: bool = False
    ) -> Any:
        """Cancel a workflow that has not finished. With ``compensate``, the compensations of
        its steps that succeeded run first (newest first), and it ends ``compensated``."""
        _check_workflow_id(workflow_id)
        if not isinstance(compensate, bool):  # "no" would be truthy: it would compensate
            raise PayloadError(f"compensate must be True or False, not {compensate!r}")
        body: dict[str, Any] = {"workflow_id": workflow_id, "reason": reason}
        if compensate:  # left out otherwise: an older engine reads the request as before
            body["compensate"] = True
        return await self.request("cancel", body)

    async def retry(self, workflow_id: str) -> Any:
        _check_workflow_id(workflow_id)
        return await self.request("retry", {"workflow_id": workflow_id})

    async def pause(self, workflow_id: str, reason: str | None = None) -> Any:
        """Pause a workflow that has not finished: a step already out runs on (its deadline
        too) and its outcome is recorded, but nothing more is published, and its delays,
        backoffs and waits freeze, until :meth:`resume`."""
        _check_workflow_id(workflow_id)
        return await self.request("pause", {"workflow_id": workflow_id, "reason": reason})

    async def resume(self, workflow_id: str) -> Any:
        """Resume a paused workflow: its held step is published, its frozen timer re-armed
        with the time it had left."""
        _check_workflow_id(workflow_id)
        return await self.request("resume", {"workflow_id": workflow_id})

    async def reset(
        self,
        workflow_id: str,
        to_step: str,
        data: Any = None,
        *,
        signals: str = "keep",
        reason: str | None = None,
        has_data: bool | None = None,
    ) -> Any:
        """Run the workflow again from ``to_step`` (a new visit of it, with a new idempotency
        key), with ``data``, or, when ``data`` is None, the input of that step's last run
        (``has_data=True`` with ``data=None``: with a JSON null as its input). Whatever it was
        doing is left: a running step's late outcome is ignored. Kept signals are kept, or
        dropped with ``signals="drop"``."""
        _check_workflow_id(workflow_id)
        check_name("step", to_step)
        if signals not in ("keep", "drop"):
            raise PayloadError(f"signals must be 'keep' or 'drop', not {signals!r}")
        fields: dict[str, Any] = {
            "workflow_id": workflow_id,
            "to_step": to_step,
            "signals": signals,
            "reason": reason,
        }
        if data is not None or has_data:
            encode_payload(data, what="reset data")
            fields["data"] = data
        return await self.request("reset", fields)

    async def pause_type(
        self, workflow: str, step: str | None = None, *, reason: str | None = None
    ) -> Any:
        """Pause a workflow type, or one step of it: its new starts, its cron ticks and the
        next steps of its workflows (of that step) are held, each workflow ``paused``, until
        :meth:`resume_type`. Steps already out run on."""
        check_name("workflow", workflow)
        if step is not None:
            check_name("step", step)
        return await self.request(
            "pause_type", {"workflow": workflow, "step": step, "reason": reason}
        )

    async def resume_type(self, workflow: str, step: str | None = None) -> Any:
        """Resume a paused workflow type (or step of it): the workflows it held are resumed,
        oldest first, and what they held published in that order."""
        check_name("workflow", workflow)
        if step is not None:
            check_name("step", step)
        return await self.request("resume_type", {"workflow": workflow, "step": step})

    async def signal(self, workflow_id: str, name: str, data: Any = None) -> Any:
        _check_workflow_id(workflow_id)
        check_name("signal", name)
        encode_payload(data, what="signal data")
        return await self.request(
            "signal", {"workflow_id": workflow_id, "signal": name, "data": data}
        )

    async def schedule(
        self,
        workflow: str,
        *,
        cron: str,
        payload: Any = None,
        timezone: str = "UTC",
        schedule_id: str | None = None,
        catch_up: str = "latest",
    ) -> dict[str, Any]:
        """Start ``workflow`` at every tick of ``cron``; returns the schedule with its next tick."""
        check_name("workflow", workflow)
        check_schedule(cron, timezone, catch_up)
        encode_payload(payload)
        result = await self.request(
            "schedule",
            {
                "workflow": workflow,
                "cron": cron,
                "payload": payload,
                "timezone": timezone,
                "schedule_id": check_schedule_id(
                    check_name("schedule", schedule_id or workflow), PayloadError
                ),
                "catch_up": catch_up,
            },
        )
        return dict(result)

    async def unschedule(self, schedule_id: str) -> Any:
        return await self.request("unschedule", {"schedule_id": schedule_id})

    async def schedules(self) -> list[dict[str, Any]]:
        return list(await self.request("schedules", {}, persistent=False))

    async def list(
        self,
        *,
        status: str | None = None,
        name: str | None = None,
        limit: int = 50,
        attributes: dict[str, str] | None = None,
        since: float | datetime | None = None,
        until: float | datetime | None = None,
    ) -> list[dict[str, Any]]:
        """The newest workflows first; ``status`` a workflow status, or ``"queued"``: those
        whose current run waits for a slot (a step's concurrency or rate limit). With
        ``attributes``, only those having every one of these business keys
        (``{"application_id": "A-17"}``); with ``since`` and ``until`` (seconds since the
        epoch, or aware datetimes), only those created in that range."""
        fields: dict[str, Any] = {"status": status, "name": name, "limit": limit}
        if attributes:
            fields["attributes"] = check_attributes(attributes, error=PayloadError)
        for key, at in (("since", since), ("until", until)):
            if at is not None:
                fields[key] = check_time(at, key, PayloadError)
        result = await self.request("list", fields, persistent=False)
        return list(result)


class Client(Calls):
    def __init__(
        self,
        bus: Bus,
        *,
        service_name: str = "client",
        request_timeout: float = DEFAULT_TIMEOUT,
        max_in_flight: int = 1000,
    ) -> None:
        self.bus = bus
        self.service_name = service_name
        self.request_timeout = request_timeout
        self._window = asyncio.Semaphore(max_in_flight)
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._outgoing: Coalescer[_Request] = Coalescer(self._send, lambda item: len(item.body))
        self._last_error: Exception | None = None
        self._reply_to: str | None = None
        self._connect_lock = asyncio.Lock()

    async def connect(self) -> None:
        async with self._connect_lock:
            if self._reply_to is not None:
                return
            try:
                await self.bus.connect()
            except BrokerConnectError as exc:
                raise BrokerUnavailableError(str(exc), refused=exc.refused) from exc
            await declare_core(self.bus)
            self._reply_to = await self.bus.reply_queue(self._on_reply)

    def _on_reply(self, delivery: Delivery) -> None:
        try:
            body = decode_body(delivery.body, delivery.content_type, limit=MAX_REPLY_BYTES)
            replies = body["replies"]
            if not isinstance(replies, list):
                raise InvalidMessageError("field 'replies' is not a list")
        except (InvalidMessageError, KeyError) as exc:
            log.warning("unreadable reply from the engine", error=str(exc))
            return
        for reply in replies:
            if not isinstance(reply, dict):
                continue
            future = self._pending.get(str(reply.get("request_id")))
            if future is not None and not future.done():
                future.set_result(reply)  # a reply to an abandoned request is dropped

    async def request(
        self,
        kind: str,
        fields: dict[str, Any],
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        persistent: bool = True,
        bounded: bool = True,
        first_retry: float = FIRST_RETRY_AFTER,
    ) -> Any:
        """Send a request and return the engine's answer, or raise the error it names.

        Unanswered, it is sent again after ``first_retry`` seconds, then twice as long
        each time, with the same id, until ``timeout``.
        """
        await self.connect()
        timeout = self.request_timeout if timeout is None else timeout
        request_id = request_id or new_id()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        window = self._window if bounded else contextlib.nullcontext()
        try:
            async with (
                window
            ):  # the deadline runs from here: waiting for a slot is not the engine's fault
                deadline = time.time() + timeout
                item = _Request(
                    request_id,
                    request_item(kind, fields, request_id=request_id, deadline=deadline),
                    persistent,
                    deadline,
                )
                self._pending[request_id] = future
                reply = await self._send_until_answered(kind, item, future, timeout, first_retry)
        finally:
            self._pending.pop(request_id, None)
        if reply.get("ok"):
            return reply.get("result")
        error = reply.get("error") or {}
        raise error_from_reply(str(error.get("type", "HmsError")), str(error.get("message", "")))

    async def _send_until_answered(
        self,
        kind: str,
        item: _Request,
        future: asyncio.Future[dict[str, Any]],
        timeout: float,
        first_retry: float,
    ) -> dict[str, Any]:
        interval = first_retry
        while True:
            remaining = item.deadline - time.time()
            if remaining <= 0:
                reason = f" (last error: {self._last_error})" if self._last_error else ""
                raise EngineUnavailableError(
                    f"the engine did not answer {kind!r} within {timeout:g}s{reason}; is "
                    f"'python -m hms_mgmt.engine' running against {redact_url(self.bus.url)}?"
                )
            self._outgoing.add(item)
            try:
                return await asyncio.wait_for(asyncio.shield(future), min(interval, remaining))
            except TimeoutError:
                interval *= 2

    async def _send(self, batch: list[_Request]) -> None:
        assert self._reply_to is not None
        message = requests_message(
            [item.body for item in batch],
            reply_to=self._reply_to,
            persistent=any(item.persistent for item in batch),
            expiration=max(0.001, max(item.deadline for item in batch) - time.time()),
        )
        try:
            await self.bus.publish(message)
        except BusError as exc:
            self._last_error = exc
            await asyncio.sleep(1.0)
            for item in batch:  # try again soon, unless answered or given up meanwhile
                future = self._pending.get(item.request_id)
                if future is not None and not future.done() and item.deadline > time.time():
                    self._outgoing.add(item)

    async def close(self) -> None:
        self._outgoing.cancel()
        for future in self._pending.values():
            if not future.done():
                future.cancel()
        self._pending.clear()
        self._reply_to = None
        await self.bus.close()
