"""The dashboard's side of the engine's HTTP server: its page and files, the live event
stream (``/api/events``), the counts and the overview's figures (``/api/counts``,
``/api/stats``). :class:`hms_mgmt.engine.api.EngineApi` mounts it, behind the same read
rules as the rest of the JSON API; every action the page takes is one of the API's own
``POST`` routes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from aiohttp import web

from hms_mgmt.engine.changes import Changes
from hms_mgmt.engine.stats import Stats
from hms_mgmt.metrics import EngineMetrics
from hms_mgmt.records import WorkflowStatus

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
STATUSES = [str(s) for s in WorkflowStatus]
KEEPALIVE = 15.0  # seconds between comments on an idle event stream
COUNTS_FOR = 1.0  # seconds /api/counts answers from its last count (a scan of the workflows)
SAMPLE_EVERY = 5.0  # seconds between looks at the counters, for the per-minute figures
FILES = Path(__file__).parent / "dashboard"
ASSETS = {
    "app.js": "text/javascript",
    "style.css": "text/css",
    "index.html": "text/html",
}
# No inline script or style, nothing from elsewhere: even a payload that reached the DOM as
# HTML could not run. The page is not framed (clickjacking), and sends no referrer.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class Counting(Protocol):
    async def status_counts(self) -> dict[str, int]: ...


class Dashboard:
    def __init__(self, engine: Counting, metrics: EngineMetrics, changes: Changes) -> None:
        self.engine = engine
        self.changes = changes
        self.stats = Stats(metrics)
        self._counted: tuple[float, dict[str, int]] | None = None
        self._sampler: asyncio.Task[None] | None = None
        # The dashboard's few small files, read once.
        self.assets = {name: (FILES / name).read_bytes() for name in ASSETS}

    def add_routes(self, app: web.Application, reading: Callable[[Handler], Handler]) -> None:
        get = app.router.add_get
        # One page for every linkable URL; its script reads the JSON API.
        for path in ("/", "/workflows", "/workflows/{id}", "/dlq", "/types"):
            get(path, self.page)
        get("/dashboard/{file}", self.asset)
        get("/api/events", reading(self.events))
        get("/api/counts", reading(self.counts))
        get("/api/stats", reading(self.overview_stats))
        app.on_startup.append(self._start_sampling)
        app.on_shutdown.append(self._close_streams)
        app.on_cleanup.append(self._stop_sampling)

    async def _start_sampling(self, _app: web.Application) -> None:
        async def sample() -> None:
            while True:
                self.stats.tick(time.time())
                await asyncio.sleep(SAMPLE_EVERY)

        self._sampler = asyncio.ensure_future(sample())

    async def _stop_sampling(self, _app: web.Application) -> None:
        if self._sampler is not None:
            self._sampler.cancel()

    async def _close_streams(self, _app: web.Application) -> None:
        self.changes.close()  # open streams end, so none holds the server's stop up

    async def page(self, _request: web.Request) -> web.Response:
        """The dashboard's one page (no data in it: its script reads the API, with the token
        the user gives it, so the page itself is served to anyone who can reach the port)."""
        return web.Response(
            body=self.assets["index.html"],
            content_type="text/html",
            charset="utf-8",
            headers=PAGE_HEADERS,
        )

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info["file"]
        if name not in ASSETS:
            raise web.HTTPNotFound()
        return web.Response(
            body=self.assets[name],
            content_type=ASSETS[name],
            charset="utf-8",
            headers=PAGE_HEADERS,
        )

    async def counts(self, _request: web.Request) -> web.Response:
        """Workflows by status (every status, 0 when none), as ``hms_workflows_by_status``.

        Counting scans the workflows' index (33 ms with 100,000 in the store) on the store's
        one thread, which the engine's commits share: the count is kept for a second, so
        any number of open dashboards count at most once a second."""
        now = time.monotonic()
        if self._counted is None or now - self._counted[0] > COUNTS_FOR:
            counts = await self.engine.status_counts()
            self._counted = (time.monotonic(), {s: counts.get(s, 0) for s in STATUSES})
        return web.json_response(self._counted[1])

    async def overview_stats(self, _request: web.Request) -> web.Response:
        """Starts and ends per minute over the last hour, and each step's p50/p95 duration
        since the engine started (from its metrics, see :mod:`hms_mgmt.engine.stats`)."""
        return web.json_response(
            {"minutes": self.stats.per_minute(time.time()), "steps": self.stats.steps()}
        )

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: ``changed`` notices (workflow ids and their new statuses, at
        most a few a second) for the dashboard to read again; a comment every 15 s."""
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        queue = self.changes.listen()
        try:
            await response.write(b"retry: 2000\nevent: hello\ndata: {}\n\n")
            while True:
                try:
                    message = await asyncio.wait_for(queue.get(), KEEPALIVE)
                except TimeoutError:
                    message = b": keepalive\n\n"
                if message is None:  # the server is stopping
                    break
                await response.write(message)
        except (ConnectionResetError, ConnectionError):
            pass  # the page went away
        finally:
            self.changes.leave(queue)
        return response
