"""The engine's HTTP API in-process, on the in-memory bus and a real SQLite file."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bus_adapters.base import open_bus
from hms_mgmt.engine.api import EngineApi
from hms_mgmt.engine.engine import Engine
from hms_mgmt.httpserver import is_loopback
from hms_mgmt.loopwatch import LoopMonitor
from hms_mgmt.metrics import EngineMetrics
from hms_mgmt.settings import Settings
from hms_mgmt.store.base import open_store
from tests.conftest import wait_until


async def _client(
    memory_url: str, store_url: str, **api: Any
) -> AsyncIterator[TestClient[Any, Any]]:
    engine = Engine(open_bus(memory_url), open_store(store_url))
    running = asyncio.ensure_future(engine.run())
    await asyncio.wait_for(engine.ready.wait(), 10)
    client: TestClient[Any, Any] = TestClient(
        TestServer(EngineApi(engine, EngineMetrics(), **api).app())
    )
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()
        engine.stop()
        await running


@pytest.fixture
async def loopback(memory_url: str, store_url: str) -> AsyncIterator[TestClient[Any, Any]]:
    async for client in _client(memory_url, store_url):
        yield client


@pytest.fixture
async def exposed(memory_url: str, store_url: str) -> AsyncIterator[TestClient[Any, Any]]:
    async for client in _client(memory_url, store_url, host="0.0.0.0"):
        yield client


async def test_beyond_loopback_without_a_token_changes_are_refused(
    exposed: TestClient[Any, Any],
) -> None:
    response = await exposed.post("/api/workflows", json={"workflow": "w"})
    assert response.status == 403
    assert "HMS_HTTP_TOKEN is not set" in (await response.json())["error"]["message"]
    for path in ("/api/workflows/x/cancel", "/api/workflows/x/retry", "/api/dlq/w.a.dlq/purge"):
        assert (await exposed.post(path)).status == 403
    assert (await exposed.get("/api/workflows")).status == 200  # reads stay open


async def test_bad_requests_are_named(loopback: TestClient[Any, Any]) -> None:
    cases = [
        ("GET", "/api/workflows?limit=lots", None, "limit must be a whole number"),
        ("GET", "/api/workflows?limit=0", None, "limit must be between 1 and 1000"),
        ("GET", "/api/workflows?status=sleeping", None, "unknown status 'sleeping'"),
        ("POST", "/api/workflows", b"{nope", "the request body is not JSON"),
        ("POST", "/api/workflows", b"[1]", "must be a JSON object"),
        ("POST", "/api/workflows", b"{}", "give the workflow's name as 'workflow'"),
        ("POST", "/api/workflows", b'{"workflow": "a.b"}', "invalid workflow name"),
    ]
    for method, path, body, message in cases:
        response = await loopback.request(method, path, data=body)
        assert response.status == 400, (path, body)
        assert message in (await response.json())["error"]["message"], (path, body)
    missing = await loopback.get("/api/workflows/nope")
    assert (missing.status, (await missing.json())["error"]["type"]) == (
        404,
        "WorkflowNotFoundError",
    )
    unknown = await loopback.post("/api/workflows", json={"workflow": "loanApproval"})
    assert unknown.status == 404 and "'loanApproval' is not defined" in await unknown.text()
    not_a_dlq = await loopback.get("/api/dlq/hms.engine.commands")
    assert not_a_dlq.status == 404


def test_what_counts_as_loopback() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.1.2.3", "engine.example"]))


def test_settings_for_the_http_server_and_the_cli() -> None:
    assert Settings.from_env({}).resolved_engine_url is None
    assert Settings.from_env({"HMS_HTTP_PORT": "8080"}).resolved_engine_url == (
        "http://127.0.0.1:8080"
    )
    chosen = Settings.from_env({"HMS_HTTP_PORT": "8080", "HMS_ENGINE_URL": "http://e:9/"})
    assert chosen.resolved_engine_url == "http://e:9"
    assert Settings.from_env({"HMS_HTTP_TOKEN": "t"}).http_token == "t"
    with pytest.raises(ValueError, match="must be a port number"):
        Settings.from_env({"HMS_HTTP_PORT": "eighty"})
    with pytest.raises(ValueError, match="0-65535"):
        Settings.from_env({}, http_port=70000)


async def test_healthz_fails_for_a_while_after_a_long_event_loop_stall(
    memory_url: str, store_url: str
) -> None:
    monitor = LoopMonitor("engine", interval=0.05, threshold=0.2, liveness_limit=0.3)
    monitor.start()
    try:
        async for client in _client(memory_url, store_url, loop_monitor=monitor):
            healthy = await client.get("/healthz")
            assert (healthy.status, await healthy.json()) == (200, {"status": "alive"})
            time.sleep(0.6)  # noqa: ASYNC251 - the engine's loop stalls past the liveness limit
            await wait_until(lambda: monitor.liveness() is not None and monitor.lag() < 0.2)
            blocked = await client.get("/healthz")
            body = await blocked.json()
            assert (blocked.status, body["status"], body["ongoing"]) == (503, "blocked", False)
            assert body["blocked_for"] >= 0.5 and body["limit"] == 0.3
            assert body["blocked_by"].startswith("test_healthz_fails_for_a_while")
    finally:
        monitor.stop()
