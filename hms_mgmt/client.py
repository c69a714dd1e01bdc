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

from bus_adapters.base import Bus, BusError, Delivery, redact_url
from hms_mgmt.definitions import WorkflowDefinition, check_name
from hms_mgmt.errors import (
    EngineUnavailableError,
    HmsError,
    InvalidMessageError,
    PayloadError,
    error_from_reply,
)
from hms_mgmt.logs import get_logger
from hms_mgmt.messages import decode_body, encode_payload, new_id, request_message
from hms_mgmt.records import WorkflowState
from hms_mgmt.topology import declare_core

log = get_logger("client")

DEFAULT_TIMEOUT = 30.0
FIRST_RETRY_AFTER = 5.0
WAIT_HOLD = 20.0


@dataclass(frozen=True)
class StartResult:
    """What ``start`` returns; ``existing`` if the id or idempotency key was already used."""

    workflow_id: str
    existing: bool = False


def new_workflow_id() -> str:
    """Time-ordered (milliseconds) then random: sorts by start time, never collides in practice."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


class Client:
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
        self._reply_to: str | None = None
        self._connect_lock = asyncio.Lock()

    async def connect(self) -> None:
        async with self._connect_lock:
            if self._reply_to is not None:
                return
            await self.bus.connect()
            await declare_core(self.bus)
            self._reply_to = await self.bus.reply_queue(self._on_reply)

    def _on_reply(self, delivery: Delivery) -> None:
        future = self._pending.get(delivery.correlation_id or "")
        if future is None or future.done():
            return  # a reply to a request already answered or abandoned
        try:
            future.set_result(decode_body(delivery.body, delivery.content_type))
        except InvalidMessageError as exc:
            future.set_exception(HmsError(f"unreadable reply from the engine: {exc}"))

    async def request(
        self,
        kind: str,
        fields: dict[str, Any],
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        persistent: bool = True,
        bounded: bool = True,
    ) -> Any:
        """Send a request and return the engine's answer, or raise the error it names."""
        await self.connect()
        assert self._reply_to is not None
        timeout = self.request_timeout if timeout is None else timeout
        request_id = request_id or new_id()
        deadline = time.time() + timeout
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        window = self._window if bounded else contextlib.nullcontext()
        try:
            async with window:
                reply = await self._send_until_answered(
                    kind, fields, request_id, deadline, future, persistent, timeout
                )
        finally:
            self._pending.pop(request_id, None)
        if reply.get("ok"):
            return reply.get("result")
        error = reply.get("error") or {}
        raise error_from_reply(str(error.get("type", "HmsError")), str(error.get("message", "")))

    async def _send_until_answered(
        self,
        kind: str,
        fields: dict[str, Any],
        request_id: str,
        deadline: float,
        future: asyncio.Future[dict[str, Any]],
        persistent: bool,
        timeout: float,
    ) -> dict[str, Any]:
        assert self._reply_to is not None
        interval = FIRST_RETRY_AFTER
        last_error: Exception | None = None
        while True:
            remaining = deadline - time.time()
            if remaining <= 0:
                reason = f" (last error: {last_error})" if last_error else ""
                raise EngineUnavailableError(
                    f"the engine did not answer {kind!r} within {timeout:g}s{reason}; is "
                    f"'python -m hms_mgmt.engine' running against {redact_url(self.bus.url)}?"
                )
            try:
                await self.bus.publish(
                    request_message(
                        kind,
                        fields,
                        request_id=request_id,
                        reply_to=self._reply_to,
                        deadline=deadline,
                        persistent=persistent,
                        expiration=remaining,
                    )
                )
            except BusError as exc:
                last_error = exc
                await asyncio.sleep(min(1.0, max(0.0, deadline - time.time())))
                continue
            try:
                return await asyncio.wait_for(asyncio.shield(future), min(interval, remaining))
            except TimeoutError:
                interval *= 2

    # -- the calls ------------------------------------------------------------

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
    ) -> StartResult:
        check_name("workflow", workflow)
        encode_payload(payload)
        fields: dict[str, Any] = {
            "workflow_id": new_workflow_id(),
            "workflow": workflow,
            "payload": payload,
        }
        if delay is not None:
            if not isinstance(delay, int | float) or delay < 0:
                raise PayloadError(f"delay must be seconds >= 0, not {delay!r}")
            fields["delay"] = delay
        if run_at is not None:
            fields["run_at"] = run_at.timestamp() if isinstance(run_at, datetime) else float(run_at)
        if idempotency_key is not None:
            fields["idempotency_key"] = str(idempotency_key)
        result = await self.request(
            "start", fields, timeout=timeout, request_id=fields["workflow_id"]
        )
        return StartResult(str(result["workflow_id"]), bool(result.get("existing")))

    async def status(self, workflow_id: str, *, timeout: float | None = None) -> WorkflowState:
        result = await self.request(
            "status", {"workflow_id": workflow_id}, timeout=timeout, persistent=False
        )
        return WorkflowState.from_json(result)

    async def wait(self, workflow_id: str, timeout: float | None = None) -> WorkflowState:
        """The workflow's state once it is terminal; ``TimeoutError`` if it is not by ``timeout``."""
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
            )
            if "status" in result:
                state = WorkflowState.from_json(result)
                if state.terminal:
                    return state
            if deadline is not None and time.time() >= deadline:
                raise TimeoutError(f"workflow {workflow_id} did not finish within {timeout:g}s")

    async def cancel(self, workflow_id: str, reason: str | None = None) -> Any:
        return await self.request("cancel", {"workflow_id": workflow_id, "reason": reason})

    async def retry(self, workflow_id: str) -> Any:
        return await self.request("retry", {"workflow_id": workflow_id})

    async def signal(self, workflow_id: str, name: str, data: Any = None) -> Any:
        check_name("signal", name)
        encode_payload(data, what="signal data")
        return await self.request(
            "signal", {"workflow_id": workflow_id, "signal": name, "data": data}
        )

    async def list(
        self, *, status: str | None = None, name: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        result = await self.request(
            "list", {"status": status, "name": name, "limit": limit}, persistent=False
        )
        return list(result)

    async def close(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.cancel()
        self._pending.clear()
        self._reply_to = None
        await self.bus.close()
