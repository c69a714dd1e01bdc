"""A step service's HTTP server: ``/healthz``, ``/readyz`` and ``/metrics`` beside its handlers."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from hms_mgmt.httpserver import healthz, json_errors, metrics_handler, start_server
from hms_mgmt.loopwatch import LoopCollector, LoopMonitor
from hms_mgmt.metrics import WorkerMetrics
from hms_mgmt.settings import Settings

if TYPE_CHECKING:  # the management object is the caller's; nothing here needs its module
    from hms_mgmt.management import Management


def probe_app(
    render: Callable[[], bytes],
    ready: Callable[[], dict[str, bool]],
    monitor: LoopMonitor | None = None,
) -> web.Application:
    """A step service's server: ``/healthz``, ``/readyz`` and ``/metrics``."""

    async def alive(_request: web.Request) -> web.Response:
        return healthz(monitor)

    async def readyz(_request: web.Request) -> web.Response:
        checks = ready()
        ok = all(checks.values())
        return web.json_response({"ready": ok, "checks": checks}, status=200 if ok else 503)

    app = web.Application(middlewares=[json_errors])
    app.router.add_get("/healthz", alive)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler(render))
    return app


def worker_metrics(target: Management, settings: Settings) -> WorkerMetrics:
    """A step service's metrics, hooked into it: its outcomes, its bus, its threads, its loop."""
    metrics = WorkerMetrics(
        lambda: target.reconnects,
        lambda: target.abandoned_threads,
        lambda: target.threads_running_past_timeout,
    )
    target.on_outcome = metrics.on_outcome
    if target.loop_monitor is None:
        target.loop_monitor = LoopMonitor.from_settings(settings, "step-service")
    metrics.registry.register(LoopCollector(target.loop_monitor))
    return metrics


async def serve_with_probes(target: Management, settings: Settings) -> None:
    """Run a step service (``Management.run``) with its HTTP server beside it."""
    assert settings.worker_http_port is not None
    metrics = worker_metrics(target, settings)
    app = probe_app(metrics.render, target.readiness, target.loop_monitor)
    runner = await start_server(app, settings.http_host, settings.worker_http_port, name="worker")
    try:
        await target.run()
    finally:
        await runner.cleanup()
