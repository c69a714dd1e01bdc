"""The small aiohttp servers of the engine and of step services: health, readiness, metrics.

Both listen on loopback unless told otherwise (``HMS_HTTP_HOST``). The engine's
JSON API is in :mod:`hms_mgmt.engine.api`; this module has what both share.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable

from aiohttp import web

from hms_mgmt.logs import get_logger
from hms_mgmt.loopwatch import LoopMonitor
from hms_mgmt.metrics import CONTENT_TYPE

log = get_logger("http")


def is_loopback(host: str) -> bool:
    """Whether a listen address reaches only this machine (``0.0.0.0`` and names do not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def error_response(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"error": {"type": kind, "message": message}}, status=status)


DEFAULT_BODY_LIMIT = 1024 * 1024
"""aiohttp's own limit on a request body (``client_max_size``), unless an app sets another."""


def http_error(exc: web.HTTPException, *, body_limit: int = DEFAULT_BODY_LIMIT) -> web.Response:
    """aiohttp's own refusals (no route 404, wrong method 405, body too large 413) in the
    documented shape, ``{"error": {"type", "message"}}``, rather than plain text. A 413 says
    the limit, ``body_limit`` (the app's ``client_max_size``)."""
    message = exc.reason
    if exc.status == 413:
        message = f"the body is over the {size_text(body_limit)} limit"
    response = error_response(exc.status, exc.reason.replace(" ", ""), message)
    if "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
    return response


def size_text(size: int) -> str:
    """A byte count as people read it: ``1 MiB``, ``64 KiB``, ``1000 bytes``."""
    for unit, scale in (("MiB", 1024 * 1024), ("KiB", 1024)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} bytes"


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Answer aiohttp's own 4xx and 5xx errors as JSON (a step service's server)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return http_error(exc)


async def start_server(app: web.Application, host: str, port: int, *, name: str) -> web.AppRunner:
    """Listen on ``host:port`` (``0`` picks a free port); a port in use is a ValueError."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    bound = [a for a in runner.addresses if isinstance(a, tuple)]
    log.info(f"{name} http server listening", host=host, port=bound[0][1] if bound else port)
    return runner


def metrics_handler(
    render: Callable[[], bytes], refresh: Callable[[], Awaitable[None]] | None = None
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def metrics(_request: web.Request) -> web.Response:
        if refresh is not None:
            await refresh()
        return web.Response(body=render(), headers={"Content-Type": CONTENT_TYPE})

    return metrics


def healthz(monitor: LoopMonitor | None) -> web.Response:
    """Liveness. A blocked event loop cannot answer at all (the probe times out); this adds
    a 503 while, and for a while after, a stall longer than ``HMS_LIVENESS_LAG``."""
    blocked = None if monitor is None else monitor.liveness()
    if blocked is not None:
        return web.json_response(blocked, status=503)
    return web.json_response({"status": "alive"})
