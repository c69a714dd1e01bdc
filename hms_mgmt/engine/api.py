"""The engine's HTTP server: health, readiness, Prometheus metrics and the JSON API the CLI uses.

Handlers only read the store (its one thread runs reads and the engine's write
transactions one at a time on its one connection). Whatever changes state
(start, cancel, retry, signal, DLQ replay) goes through the engine's normal request
path: an in-process :class:`hms_mgmt.client.Client` on the engine's bus sends
it to ``hms.engine.commands``, where the engine loop, the only writer, applies
it like any other request.

Mutating endpoints need ``Authorization: Bearer <HMS_HTTP_TOKEN>`` when a token
is set; beyond loopback they are refused until one is.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from bus_adapters.base import JSON_CONTENT_TYPE, BusError, redact_url
from hms_mgmt import dlq, tracing
from hms_mgmt.bounds import (
    ID_RULE,
    MAX_DELAY,
    NAME_PATTERN,
    check_attributes,
    check_priority,
    parse_time,
    short,
    valid_id,
)
from hms_mgmt.client import Client
from hms_mgmt.engine.changes import Changes
from hms_mgmt.engine.engine import Engine
from hms_mgmt.engine.pages import Dashboard
from hms_mgmt.engine.reads import EngineView
from hms_mgmt.errors import (
    HmsError,
    InvalidMessageError,
    WorkflowNotFoundError,
    WorkflowTimeoutError,
)
from hms_mgmt.httpserver import (
    error_response,
    healthz,
    http_error,
    is_loopback,
    metrics_handler,
    start_server,
)
from hms_mgmt.logs import get_logger
from hms_mgmt.loopwatch import LoopCollector, LoopMonitor
from hms_mgmt.metrics import EngineMetrics
from hms_mgmt.records import LIST_FILTERS, WorkflowState, WorkflowStatus
from hms_mgmt.settings import Settings
from hms_mgmt.store.base import Batch
from hms_mgmt.wire.codec import MAX_MESSAGE_BYTES, decode_body

log = get_logger("api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_LIST = 1000
MAX_WAIT = 3600  # seconds a start with "wait" may hold its HTTP request (longer: GET it later)
PROBE_TIMEOUT = 2.0


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


class EngineApi:
    def __init__(
        self,
        engine: EngineView,
        metrics: EngineMetrics,
        *,
        host: str = "127.0.0.1",
        token: str | None = None,
        request_timeout: float = 10.0,
        loop_monitor: LoopMonitor | None = None,
        open_reads: bool = False,
        changes: Changes | None = None,
    ) -> None:
        self.engine = engine
        self.changes = changes or Changes()
        self.dashboard = Dashboard(engine, metrics, self.changes)
        self.open_reads = open_reads
        self.loop_monitor = loop_monitor
        self.metrics = metrics
        self.token = token
        self.loopback = is_loopback(host)
        self.host = host
        # Requests go to the engine over its own bus, like any client's.
        self.client = Client(
            engine.bus, service_name="hms-engine-api", request_timeout=request_timeout
        )

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=MAX_MESSAGE_BYTES)
        get, post = app.router.add_get, app.router.add_post
        get("/healthz", self.healthz)
        get("/readyz", self.readyz)
        get("/metrics", metrics_handler(self.metrics.render, self._refresh_counts))
        self.dashboard.add_routes(app, self._reading)
        get("/api/workflows", self._reading(self.list_workflows))
        post("/api/workflows", self._mutating(self.start))
        get("/api/workflows/{id}", self._reading(self.show))
        post("/api/workflows/{id}/cancel", self._mutating(self.cancel))
        post("/api/workflows/{id}/retry", self._mutating(self.retry))
        post("/api/workflows/{id}/signal", self._mutating(self.signal))
        post("/api/workflows/{id}/pause", self._mutating(self.pause))
        post("/api/workflows/{id}/resume", self._mutating(self.resume))
        post("/api/workflows/{id}/reset", self._mutating(self.reset))
        get("/api/definitions", self._reading(self.definitions))
        post("/api/definitions/{name}/pause", self._mutating(self.pause_type))
        post("/api/definitions/{name}/resume", self._mutating(self.resume_type))
        get("/api/engines", self._reading(self.engines))
        get("/api/dlq", self._reading(self.dlq_queues))
        get("/api/dlq/{queue}", self._reading(self.dlq_messages))
        post("/api/dlq/{queue}/replay", self._mutating(self.dlq_replay))
        post("/api/dlq/{queue}/purge", self._mutating(self.dlq_purge))
        post("/api/store/prune", self._mutating(self.prune, broker=False))
        return app

    # -- plumbing ---------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return error_response(exc.status, exc.kind, str(exc))
        except HmsError as exc:
            return error_response(exc.http_status, type(exc).__name__, str(exc))
        except BusError as exc:
            return error_response(503, "BrokerUnavailableError", f"broker trouble: {exc}")
        except web.HTTPException as exc:  # aiohttp's own: no route (404), method (405), size (413)
            if exc.status < 400:
                raise
            return http_error(exc, body_limit=MAX_MESSAGE_BYTES)
        except Exception:  # a bug: logged, and answered in the documented shape
            log.exception("an http request failed", method=request.method, path=request.path)
            return error_response(
                500, "InternalError", "the engine failed to answer this request; its log says why"
            )

    def _mutating(self, handler: Handler, *, broker: bool = True) -> Handler:
        async def checked(request: web.Request) -> web.StreamResponse:
            self._authorise(request)
            if broker:
                self._need_broker()
                await self.client.connect()
            return await handler(request)

        return checked

    def _reading(self, handler: Handler) -> Handler:
        """Reads carry applicants' data: beyond loopback they need the token too, unless the
        operator opened them (HMS_HTTP_OPEN_READS)."""

        async def checked(request: web.Request) -> web.StreamResponse:
            if not (self.loopback or self.open_reads):
                self._authorise(request, reading=True)
            return await handler(request)

        return checked

    def _need_broker(self) -> None:
        """Fail fast, rather than wait for a reconnect, while the broker is away."""
        if not self.engine.bus.connected:
            raise ApiError(
                503,
                "BrokerUnavailableError",
                f"the engine is not connected to {redact_url(self.engine.bus.url)}; "
                "try again once /readyz says ready",
            )

    def _authorise(self, request: web.Request, *, reading: bool = False) -> None:
        if self.token is None:
            if self.loopback:
                return
            what = (
                "reads over HTTP are closed (set HMS_HTTP_TOKEN, or HMS_HTTP_OPEN_READS=1 to "
                "open them to anyone who can reach the port)"
                if reading
                else "changes over HTTP are disabled"
            )
            raise ApiError(
                403,
                "Forbidden",
                f"{what}: the server listens on {self.host}, beyond loopback, and "
                "HMS_HTTP_TOKEN is not set",
            )
        header = request.headers.get("Authorization")
        if header is None:
            raise ApiError(
                401, "Unauthorized", "this needs 'Authorization: Bearer <HMS_HTTP_TOKEN>'"
            )
        # As bytes: a header aiohttp could not read as UTF-8 holds surrogates, which encode back.
        given = header.encode("utf-8", "surrogateescape")
        expected = f"Bearer {self.token}".encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected):
            raise ApiError(
                401,
                "Unauthorized",
                "the token given does not match the engine's HMS_HTTP_TOKEN "
                "(send 'Authorization: Bearer <HMS_HTTP_TOKEN>')",
            )

    async def _body(self, request: web.Request) -> dict[str, Any]:
        """The body as a JSON object, checked like a message from the bus (size, UTF-8, depth,
        64-bit integers); aiohttp's ``json()`` would recurse into any depth."""
        if not request.body_exists:
            return {}
        raw = await request.read()  # over client_max_size (1 MiB): 413
        try:
            return decode_body(raw, JSON_CONTENT_TYPE, limit=MAX_MESSAGE_BYTES)
        except InvalidMessageError as exc:
            raise ApiError(400, "BadRequest", f"the request {exc}") from exc

    async def _refresh_counts(self) -> None:
        try:
            (counts, stuck, size), overdue = await asyncio.wait_for(
                asyncio.gather(self.engine.counts(), self.engine.overdue_timers()), PROBE_TIMEOUT
            )
        except Exception as exc:  # a scrape still shows the counters
            log.warning("cannot count workflows for /metrics", error=repr(exc))
            return
        self.metrics.set_counts(counts, stuck, size, overdue)

    # -- probes -----------------------------------------------------------------

    async def healthz(self, _request: web.Request) -> web.Response:
        return healthz(self.loop_monitor)

    async def readyz(self, _request: web.Request) -> web.Response:
        checks = self.engine.checks()
        ok = all(checks.values())
        body: dict[str, Any] = {"ready": ok, "checks": checks}
        if "active" in checks:  # engines that can stand by say which they are
            body["role"] = self.engine.role
        return web.json_response(body, status=200 if ok else 503)

    async def engines(self, _request: web.Request) -> web.Response:
        """The engines known: the active one (from the vhost's record) and this one."""
        return web.json_response(await self.engine.engines())

    # -- workflows --------------------------------------------------------------

    async def list_workflows(self, request: web.Request) -> web.Response:
        status = request.query.get("status") or None
        if status is not None and status not in LIST_FILTERS:
            raise ApiError(
                400,
                "BadRequest",
                f"unknown status {short(status)}; one of {', '.join(LIST_FILTERS)}",
            )
        name = request.query.get("name") or None
        if name is not None and not NAME_PATTERN.fullmatch(name):
            raise ApiError(
                400,
                "BadRequest",
                f"name {short(name)} is not a workflow name (1-100 letters, digits, '_' or '-')",
            )
        limit = _int(request.query.get("limit", "50"), "limit", 1, MAX_LIST)
        attributes: dict[str, str] = {}
        for key, value in request.query.items():  # attr.<key>=<value>, all ANDed
            if key.startswith("attr."):
                if key[5:] in attributes:
                    raise ApiError(400, "BadRequest", f"{short(key)} is given more than once")
                attributes[key[5:]] = value
        try:
            check_attributes(attributes, "attr")
        except ValueError as exc:
            raise ApiError(400, "BadRequest", str(exc)) from None
        before = _cursor(request.query.get("before") or None)
        since, until = (_time(request.query.get(key) or None, key) for key in ("since", "until"))
        found = await self.engine.workflows(
            status=status,
            name=name,
            limit=limit,
            attributes=attributes,
            before=before,
            since=since,
            until=until,
        )
        return web.json_response(found)

    async def show(self, request: web.Request) -> web.Response:
        workflow_id = _workflow_id(request)
        found = await self.engine.state(workflow_id)
        if found is None:
            raise WorkflowNotFoundError(f"no workflow with id {workflow_id!r}")
        state = found.to_json()
        state["trace_id"] = tracing.trace_id(state.get("traceparent"))
        state["history"] = [
            {"at": entry.at, "kind": entry.kind, "detail": entry.detail}
            for entry in await self.engine.history(workflow_id)
        ]
        return web.json_response(state)

    async def start(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        name = body.get("workflow")
        if not isinstance(name, str):
            raise ApiError(400, "BadRequest", "give the workflow's name as 'workflow'")
        key = body.get("idempotency_key")
        if key is not None and not isinstance(key, str):
            raise ApiError(400, "BadRequest", f"idempotency_key must be a string, not {short(key)}")
        priority = body.get("priority")
        if priority is not None:
            try:
                check_priority(priority, "priority")
            except ValueError as exc:
                raise ApiError(400, "BadRequest", str(exc)) from None
        traceparent = tracing.checked(request.headers.get("traceparent"))
        if "wait" in body:
            return await self._execute(name, body, key, traceparent)
        started = await self.client.start(
            name,
            body.get("input"),
            idempotency_key=key,
            traceparent=traceparent,
            attributes=body.get("attributes"),
            priority=priority,
        )
        return web.json_response(
            {"workflow_id": started.workflow_id, "existing": started.existing},
            status=200 if started.existing else 201,
        )

    async def _execute(
        self, name: str, body: dict[str, Any], key: str | None, traceparent: str | None
    ) -> web.Response:
        """Start and wait (``"wait": seconds``) in one request to the engine: the workflow's
        state, 200 once it has ended, or 202 if it is still going at the deadline."""
        wait = body["wait"]
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 < wait <= MAX_WAIT:
            raise ApiError(
                400,
                "BadRequest",
                f"wait is seconds, more than 0 and at most {MAX_WAIT}, not {short(wait)}",
            )
        try:
            state = await self.client.execute(
                name,
                body.get("input"),
                timeout=wait,
                idempotency_key=key,
                traceparent=traceparent,
                attributes=body.get("attributes"),
                priority=body.get("priority"),
            )
        except WorkflowTimeoutError as exc:
            going = await self.engine.state(exc.workflow_id)
            if going is None:  # not yet recorded: the start is still on its way
                return web.json_response({"workflow_id": exc.workflow_id}, status=202)
            return web.json_response(going.to_json(), status=202)
        return web.json_response(state.to_json())

    async def cancel(self, request: web.Request) -> web.Response:
        workflow_id = _workflow_id(request)
        body = await self._body(request)
        reason, compensate = _reason(body), body.get("compensate", False)
        if not isinstance(compensate, bool):
            raise ApiError(
                400, "BadRequest", f"compensate must be true or false, not {short(compensate)}"
            )
        result = await self.client.cancel(workflow_id, reason, compensate=compensate)
        return web.json_response(result)

    async def retry(self, request: web.Request) -> web.Response:
        """Retry a failed workflow, and take its failed run's dead letters out of their
        ``.dlq``: they are settled (a replay would find nothing to do)."""
        workflow_id = _workflow_id(request)
        await self._body(request)  # none is needed, but a malformed one is refused
        before = await self.engine.state(workflow_id)
        result = dict(await self.client.retry(workflow_id))
        result["dead_letters_settled"] = await self._settle(before)
        return web.json_response(result)

    async def _settle(self, before: WorkflowState | None) -> int:
        """The retried run's dead letters out of their queue; 0 if there are none, or if the
        broker will not let us (a replay recognises them as settled later)."""
        error = (before.error if before is not None else None) or {}
        seq, step = error.get("seq"), error.get("step")
        if before is None or not isinstance(seq, int) or not isinstance(step, str):
            return 0
        queue = f"{before.name}.{step}.dlq"
        if queue not in self._known_dlqs():
            return 0
        try:
            return await dlq.settle(self.engine.bus, queue, before.workflow_id, seq)
        except (BusError, HmsError) as exc:
            log.warning(
                "retried, but its dead letters stay in their queue until a replay settles them",
                workflow_id=before.workflow_id,
                queue=queue,
                error=str(exc),
            )
            return 0

    async def signal(self, request: web.Request) -> web.Response:
        """Deliver a signal: it resumes the workflow if it waits for it, else it is kept for a
        wait to come (``"resumed": false``); a finished workflow is a 409."""
        workflow_id = _workflow_id(request)
        body = await self._body(request)
        name = body.get("name")
        if not isinstance(name, str):
            raise ApiError(400, "BadRequest", "give the signal's name as 'name'")
        if not NAME_PATTERN.fullmatch(name):
            raise ApiError(
                400,
                "BadRequest",
                f"signal name {short(name)} is not valid (1-100 letters, digits, '_' or '-')",
            )
        result = await self.client.signal(workflow_id, name, body.get("data"))
        return web.json_response({**result, "signal": name})

    async def pause(self, request: web.Request) -> web.Response:
        """Pause a workflow that has not finished; 409 if it has, or is paused already."""
        workflow_id = _workflow_id(request)
        reason = _reason(await self._body(request))
        result = await self.client.pause(workflow_id, reason)
        return web.json_response(result)

    async def resume(self, request: web.Request) -> web.Response:
        """Resume a paused workflow; 409 if it is not paused."""
        workflow_id = _workflow_id(request)
        await self._body(request)  # none is needed, but a malformed one is refused
        result = await self.client.resume(workflow_id)
        return web.json_response(result)

    async def reset(self, request: web.Request) -> web.Response:
        """Back to a step: ``{"to_step": S, "data": ..., "signals": "keep"|"drop",
        "reason": R}``; without ``data``, the step's last input (``"data": null`` is a null
        input). 400 names an unknown step.
        A failed workflow's dead letters leave their ``.dlq``, as on a retry."""
        workflow_id = _workflow_id(request)
        body = await self._body(request)
        to_step = body.get("to_step")
        if not isinstance(to_step, str) or not NAME_PATTERN.fullmatch(to_step):
            raise ApiError(
                400,
                "BadRequest",
                f"give the step to reset to as 'to_step' (a step name), not {short(to_step)}",
            )
        signals = body.get("signals", "keep")
        if signals not in ("keep", "drop"):
            raise ApiError(
                400, "BadRequest", f"signals must be 'keep' or 'drop', not {short(signals)}"
            )
        reason = _reason(body)
        before = await self.engine.state(workflow_id)
        result = dict(
            await self.client.reset(
                workflow_id,
                to_step,
                body.get("data"),
                signals=signals,
                reason=reason,
                has_data="data" in body,
            )
        )
        # A failed workflow's dead letters are settled by the reset, as by a retry.
        failed = before is not None and before.status == WorkflowStatus.FAILED
        result["dead_letters_settled"] = await self._settle(before) if failed else 0
        return web.json_response({**result, "to_step": to_step})

    async def definitions(self, _request: web.Request) -> web.Response:
        paused: dict[str, list[dict[str, Any]]] = {}
        for pause in self.engine.paused_types():
            paused.setdefault(pause.workflow, []).append(pause.to_json())
        return web.json_response(
            [
                {
                    "name": d.name,
                    "version": d.version,
                    "steps": d.step_names,
                    "on_error": None if d.on_error is None else d.on_error.name,
                    "definition": d.to_json(),
                    "paused": paused.get(d.name, []),
                }
                for d in self.engine.definitions()
            ]
        )

    def _type_and_step(self, request: web.Request, body: dict[str, Any]) -> tuple[str, Any]:
        name = request.match_info["name"]
        if not NAME_PATTERN.fullmatch(name):
            raise ApiError(400, "BadRequest", f"{short(name)} is not a workflow name")
        step = body.get("step")
        if step is not None and (not isinstance(step, str) or not NAME_PATTERN.fullmatch(step)):
            raise ApiError(400, "BadRequest", f"step {short(step)} is not a step name")
        return name, step

    async def pause_type(self, request: web.Request) -> web.Response:
        """Pause a workflow type, or a step of it (``{"step": S, "reason": R}``); 409 if it is
        paused already, 404 for an unknown workflow, 400 for an unknown step."""
        body = await self._body(request)
        name, step = self._type_and_step(request, body)
        result = await self.client.pause_type(name, step, reason=_reason(body))
        return web.json_response(result)

    async def resume_type(self, request: web.Request) -> web.Response:
        """Resume a paused workflow type (or step of it): ``{"released": n}`` workflows."""
        body = await self._body(request)
        name, step = self._type_and_step(request, body)
        return web.json_response(await self.client.resume_type(name, step))

    # -- dead letters -----------------------------------------------------------

    def _known_dlqs(self) -> list[str]:
        return self.engine.dead_letter_queues()

    def _dlq(self, request: web.Request) -> str:
        queue = request.match_info["queue"]
        if queue not in self._known_dlqs():
            raise ApiError(
                404,
                "NotFound",
                f"{short(queue)} is not a dead-letter queue of this engine's workflows "
                "(GET /api/dlq lists them)",
            )
        return queue

    async def dlq_queues(self, _request: web.Request) -> web.Response:
        self._need_broker()
        bus = self.engine.bus
        rows = [{"queue": q, "messages": await bus.queue_length(q)} for q in self._known_dlqs()]
        return web.json_response(rows)

    async def dlq_messages(self, request: web.Request) -> web.Response:
        queue = self._dlq(request)
        self._need_broker()
        limit = _int(request.query.get("limit", "100"), "limit", 1, MAX_LIST)
        letters = await dlq.peek(self.engine.bus, queue, limit)
        return web.json_response([letter.to_json() for letter in letters])

    async def dlq_replay(self, request: web.Request) -> web.StreamResponse:
        """Streams JSON lines: the count first, then one line per message as it is replayed."""
        queue = self._dlq(request)
        body = await self._body(request)
        message_id, replay_all = body.get("id"), body.get("all") is True
        if (message_id is None) == (not replay_all):
            raise ApiError(400, "BadRequest", 'give exactly one of {"id": ...} or {"all": true}')
        total = 1 if message_id is not None else await self.engine.bus.queue_length(queue)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)

        async def line(value: dict[str, Any]) -> None:
            await response.write(json.dumps(value).encode() + b"\n")

        await line({"total": total})
        try:
            results = await dlq.replay(
                self.engine.bus,
                self.client,
                queue,
                message_id=None if message_id is None else str(message_id),
                progress=lambda result: line(result.to_json()),
            )
        except (HmsError, BusError) as exc:
            await line({"error": {"type": type(exc).__name__, "message": str(exc)}})
        else:
            await line({"done": True, "count": len(results)})
        await response.write_eof()
        return response

    async def prune(self, request: web.Request) -> web.Response:
        older_than = (await self._body(request)).get("older_than")
        if (
            not isinstance(older_than, int | float)
            or isinstance(older_than, bool)
            or not 0 <= older_than <= MAX_DELAY
        ):
            raise ApiError(400, "BadRequest", "give 'older_than' as seconds, from 0 to 10 years")
        pruned = await self.engine.prune(time.time() - older_than)
        log.warning("finished workflows pruned over http", count=pruned, older_than=older_than)
        return web.json_response({"pruned": pruned, "older_than": older_than})

    async def dlq_purge(self, request: web.Request) -> web.Response:
        queue = self._dlq(request)
        purged = await dlq.purge(self.engine.bus, queue)
        log.warning("dead-letter queue purged over http", queue=queue, messages=purged)
        return web.json_response({"queue": queue, "purged": purged})


def _workflow_id(request: web.Request) -> str:
    """The ``{id}`` of the path, if it can be a workflow's id (``ID_PATTERN``); else 400."""
    workflow_id = request.match_info["id"]
    if not valid_id(workflow_id):
        raise ApiError(
            400, "BadRequest", f"workflow id {short(workflow_id)} is not valid: ids are {ID_RULE}"
        )
    return workflow_id


def _reason(body: dict[str, Any]) -> str | None:
    """The body's ``reason``: text or absent; anything else is a 400 naming it."""
    reason = body.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise ApiError(400, "BadRequest", f"reason must be a string, not {short(reason)}")
    return reason


def _cursor(raw: str | None) -> tuple[float, str] | None:
    """``before=<created_at>,<id>``, the last workflow of a page: the next page's start."""
    if raw is None:
        return None
    at, _, workflow_id = raw.partition(",")
    try:
        created_at = float(at) if len(at) <= 40 else math.nan
    except ValueError:
        created_at = math.nan
    if not math.isfinite(created_at) or not valid_id(workflow_id):
        raise ApiError(
            400,
            "BadRequest",
            f"before {short(raw)} is not a cursor: give '<created_at>,<workflow_id>' of the "
            "last workflow of a page",
        )
    return created_at, workflow_id


def _time(raw: str | None, name: str) -> float | None:
    """``since`` or ``until`` of a list: see :data:`hms_mgmt.bounds.TIME_RULE`."""
    if raw is None:
        return None
    try:
        return parse_time(raw)
    except ValueError as exc:
        raise ApiError(400, "BadRequest", f"{name}: {exc}") from None


def _int(raw: str, name: str, low: int, high: int) -> int:
    try:
        if len(raw) > 20:  # out of range anyway, and int() refuses over 4300 digits
            raise ValueError(raw)
        value = int(raw)
    except ValueError:
        raise ApiError(
            400, "BadRequest", f"{name} must be a whole number, not {short(raw)}"
        ) from None
    if not low <= value <= high:
        raise ApiError(400, "BadRequest", f"{name} must be between {low} and {high}")
    return value


def engine_metrics(engine: Engine, loop_monitor: LoopMonitor | None = None) -> EngineMetrics:
    """The engine's metrics, hooked into it: its commits, its bus, readiness, the outbox."""
    metrics = EngineMetrics(
        lambda: engine.bus.reconnects,
        lambda: engine.is_ready,
        engine.outbox_backlog,
        active=lambda: engine.active,
        takeovers=lambda: engine.takeovers,
        standby=lambda: engine.role == "standby",
        slots=engine.slot_counts,
        type_pauses=engine.paused_types,
    )
    engine.on_commit = metrics.on_batch
    if loop_monitor is not None:
        metrics.registry.register(LoopCollector(loop_monitor))
    return metrics


async def start_api(
    engine: Engine, settings: Settings, loop_monitor: LoopMonitor | None = None
) -> web.AppRunner | None:
    """The engine's HTTP server when ``settings.http_port`` is set; its metrics hooked in."""
    if settings.http_port is None:
        return None
    metrics = engine_metrics(engine, loop_monitor)
    changes = Changes()

    def on_commit(batch: Batch) -> None:
        metrics.on_batch(batch)
        changes.on_batch(batch)

    engine.on_commit = on_commit
    api = EngineApi(
        engine,
        metrics,
        host=settings.http_host,
        token=settings.http_token,
        loop_monitor=loop_monitor,
        open_reads=settings.http_open_reads,
        changes=changes,
    )
    if not api.loopback and settings.http_token is None:
        log.warning(
            "the http server listens beyond loopback without HMS_HTTP_TOKEN: its endpoints "
            "that change state are disabled"
            + ("" if settings.http_open_reads else ", and so are its reads of /api"),
            host=settings.http_host,
        )
    return await start_server(api.app(), settings.http_host, settings.http_port, name="engine")
