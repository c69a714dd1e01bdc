"""The engine's HTTP API in-process, on the in-memory bus and a real SQLite file."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog.testing
from aiohttp.test_utils import TestClient, TestServer

from bus_adapters import open_bus
from hms_mgmt.definitions import Step, WorkflowDefinition
from hms_mgmt.engine.api import EngineApi
from hms_mgmt.engine.changes import Changes
from hms_mgmt.engine.engine import Engine
from hms_mgmt.engine.stats import _quantile
from hms_mgmt.errors import PayloadError
from hms_mgmt.httpserver import is_loopback
from hms_mgmt.loopwatch import LoopMonitor
from hms_mgmt.metrics import EngineMetrics
from hms_mgmt.records import STATUSES
from hms_mgmt.settings import Settings
from hms_mgmt.store import open_store
from hms_mgmt.store.base import Batch
from tests.conftest import hms, wait_until


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


@contextlib.asynccontextmanager
async def served(
    memory_url: str, store_url: str
) -> AsyncIterator[tuple[TestClient[Any, Any], EngineApi]]:
    """An engine, its HTTP API under a test client, and the API's own client connected."""
    engine = Engine(open_bus(memory_url), open_store(store_url))
    running = asyncio.ensure_future(engine.run())
    await asyncio.wait_for(engine.ready.wait(), 10)
    api = EngineApi(engine, EngineMetrics())
    try:
        async with TestClient(TestServer(api.app())) as client:
            await api.client.connect()
            yield client, api
    finally:
        engine.stop()
        await running


@pytest.fixture
async def loopback(memory_url: str, store_url: str) -> AsyncIterator[TestClient[Any, Any]]:
    async for client in _client(memory_url, store_url):
        yield client


@pytest.fixture
async def guarded(memory_url: str, store_url: str) -> AsyncIterator[TestClient[Any, Any]]:
    async for client in _client(memory_url, store_url, token="s3cret"):
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
    read = await exposed.get("/api/workflows")  # reads carry payloads: closed too
    assert read.status == 403
    assert "HMS_HTTP_OPEN_READS" in (await read.json())["error"]["message"]
    assert (await exposed.get("/readyz")).status in (200, 503)  # probes stay open
    assert (await exposed.get("/metrics")).status == 200


async def test_bad_requests_are_named(loopback: TestClient[Any, Any]) -> None:
    cases = [
        ("GET", "/api/workflows?limit=lots", None, "limit must be a whole number"),
        ("GET", "/api/workflows?limit=0", None, "limit must be between 1 and 1000"),
        ("GET", "/api/workflows?status=sleeping", None, "unknown status 'sleeping'"),
        ("POST", "/api/workflows", b"{nope", "the request body is not JSON"),
        ("POST", "/api/workflows", b"[1]", "the request body is a JSON list, not an object"),
        ("POST", "/api/workflows", b"{}", "give the workflow's name as 'workflow'"),
        ("POST", "/api/workflows", b'{"workflow": "a.b"}', "invalid workflow name"),
        ("POST", "/api/workflows", b'{"workflow": "w", "wait": 0}', "wait is seconds"),
        ("POST", "/api/workflows", b'{"workflow": "w", "wait": "1"}', "not '1'"),
        ("POST", "/api/workflows", b'{"workflow": "w", "wait": true}', "at most 3600"),
        ("POST", "/api/workflows", b'{"workflow": "w", "wait": 3601}', "not 3601"),
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


async def raw_http(client: TestClient[Any, Any], request: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (aiohttp's client would clean them up); the status and body."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def post(path: str, body: bytes, *headers: bytes) -> bytes:
    lines = [f"POST {path} HTTP/1.1".encode(), b"Host: t", b"Connection: close", *headers]
    lines.append(f"Content-Length: {len(body)}".encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def test_request_bodies_are_checked_like_messages_and_never_give_a_500(
    loopback: TestClient[Any, Any],
) -> None:
    cases = [
        (b"[" * 10_000 + b"]" * 10_000, "nested deeper than 64 levels"),
        (b'{"a":' * 10_000 + b"1" + b"}" * 10_000, "nested deeper than 64 levels"),
        (b'{"workflow": "w", "input": {"n": 18446744073709551616}}', "18446744073709551616"),
        (b'{"workflow": "w", "input": ' + b"9" * 5000 + b"}", "outside 64 bits"),
        (b'{"workflow": "\xff\xfe"}', "not UTF-8"),
        (b'{"workflow": "w", "idempotency_key": 7}', "idempotency_key must be a string, not 7"),
        (b'{"workflow": "w", "idempotency_key": "a\\nb"}', "'a\\nb' must be 1-200 printable"),
        (b'{"workflow": "w", "priority": 0}', "priority must be a whole number from 1 (first)"),
        (b'{"workflow": "w", "priority": "1"}', "priority must be a whole number from 1"),
        (b'{"workflow": "w", "priority": 1.5, "wait": 1}', "priority must be a whole number"),
    ]
    for body, message in cases:
        response = await loopback.post("/api/workflows", data=body)
        answer = await response.json()
        assert response.status == 400, (body[:40], answer)
        assert message in answer["error"]["message"], (body[:40], answer)
    too_big = await loopback.post("/api/workflows", data=io.BytesIO(b" " * (1024 * 1024 + 1)))
    assert too_big.status == 413
    refused = (await too_big.json())["error"]
    assert refused["type"] == "RequestEntityTooLarge"
    assert refused["message"] == "the body is over the 1 MiB limit"


async def test_bad_ids_and_query_parameters_are_refused_naming_them(
    loopback: TestClient[Any, Any],
) -> None:
    cases = [
        ("GET", "/api/workflows/line%0Abreak%1B%5B31m", r"'line\nbreak\x1b[31m' is not valid"),
        ("GET", "/api/workflows/..%2F..%2Fetc%2Fpasswd", "'../../etc/passwd' is not valid"),
        ("POST", "/api/workflows/a%20b/cancel", "'a b' is not valid: ids are 1-100 letters"),
        ("POST", "/api/workflows/-x/retry", "^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,99}$"),
        ("GET", "/api/workflows?name=a%00b", "name 'a\\x00b' is not a workflow name"),
        ("GET", "/api/workflows?name=" + "n" * 101, "is not a workflow name"),
        ("GET", "/api/workflows?limit=" + "9" * 5000, "limit must be a whole number"),
        ("GET", "/api/dlq/hms.engine.commands.dlq?limit=-1", "limit must be between 1 and 1000"),
    ]
    for method, path, message in cases:
        response = await loopback.request(method, path)
        answer = await response.json()
        assert response.status == 400, (path, answer)
        assert message in answer["error"]["message"], (path, answer)
        assert len(answer["error"]["message"]) < 400  # a huge value is not echoed whole
    nowhere = await loopback.get("/api/nowhere")
    assert nowhere.status == 404 and (await nowhere.json())["error"]["type"] == "NotFound"
    wrong = await loopback.delete("/api/workflows")
    assert wrong.status == 405 and "GET" in wrong.headers["Allow"]
    assert (await wrong.json())["error"]["type"] == "MethodNotAllowed"
    for path in ("/nowhere", "/api", "/api/workflows/x/y/z", "/api/workflows/x/signal"):
        answer = await loopback.get(path)
        assert answer.status in (404, 405) and answer.content_type == "application/json", path
        assert set((await answer.json())["error"]) == {"type", "message"}, path


async def test_tokens_are_compared_as_bytes(guarded: TestClient[Any, Any]) -> None:
    body = b'{"workflow": "nope"}'
    for header in (
        b"Authorization: Bearer s3cr\xc3\xa9t",  # UTF-8, not ASCII
        b"Authorization: Bearer \xff\xfe",  # not even UTF-8
        b"Authorization: Bearer s3cret\xff",
        b"Authorization: s3cret",
    ):
        status, answer = await raw_http(guarded, post("/api/workflows", body, header))
        assert status == 401, (header, answer)
        assert b"HMS_HTTP_TOKEN" in answer
    status, answer = await raw_http(
        guarded, post("/api/workflows", body, b"Authorization: Bearer s3cret")
    )
    assert status == 404 and b"'nope' is not defined" in answer  # let in, then refused


async def test_a_bug_is_answered_in_the_documented_shape_and_logged(
    memory_url: str, store_url: str
) -> None:
    engine = Engine(open_bus(memory_url), open_store(store_url))
    running = asyncio.ensure_future(engine.run())
    await asyncio.wait_for(engine.ready.wait(), 10)

    async def broken(**_: Any) -> Any:
        raise RuntimeError("a bug in the store")

    engine.store.list_workflows = broken  # type: ignore[method-assign]
    try:
        async with TestClient(TestServer(EngineApi(engine, EngineMetrics()).app())) as client:
            with structlog.testing.capture_logs() as logs:
                response = await client.get("/api/workflows")
                answer = await response.json()
    finally:
        engine.stop()
        await running
    assert response.status == 500
    assert answer["error"]["type"] == "InternalError"
    assert "its log says why" in answer["error"]["message"]
    [logged] = [entry for entry in logs if entry["event"] == "an http request failed"]
    assert logged["log_level"] == "error" and logged["path"] == "/api/workflows"


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


async def test_signals_over_http(memory_url: str, store_url: str) -> None:
    """``POST /api/workflows/{id}/signal``: kept while not waiting, refused once finished,
    and clear errors for an unknown workflow, a bad body or a bad name."""
    async with served(memory_url, store_url) as (client, api):
        await api.client.define(WorkflowDefinition.build("inspected", ["visit"]))
        started = await client.post("/api/workflows", json={"workflow": "inspected"})
        workflow_id = (await started.json())["workflow_id"]
        path = f"/api/workflows/{workflow_id}/signal"

        kept = await client.post(path, json={"name": "report", "data": {"passed": True}})
        assert kept.status == 200
        answer = await kept.json()
        assert answer["resumed"] is False and answer["signal"] == "report"
        assert answer["workflow_id"] == workflow_id

        cases = [
            (path, b"{nope", 400, "the request body is not JSON"),
            (path, b"{}", 400, "give the signal's name as 'name'"),
            (path, b'{"name": "a.b"}', 400, "signal name 'a.b' is not valid"),
            (path, b'{"name": "r", "data": 18446744073709551616}', 400, "outside 64 bits"),
            ("/api/workflows/nope/signal", b'{"name": "r"}', 404, "no workflow with id"),
            ("/api/workflows/-x/signal", b'{"name": "r"}', 400, "is not valid: ids are"),
        ]
        for where, body, status, message in cases:
            response = await client.post(where, data=body)
            error = (await response.json())["error"]
            assert (response.status, message in error["message"]) == (status, True), error

        await client.post(f"/api/workflows/{workflow_id}/cancel", json={})
        finished = await client.post(path, json={"name": "report"})
        error = (await finished.json())["error"]
        assert (
            finished.status == 409 and "already cancelled; cannot signal it" in (error["message"])
        )


async def test_pause_resume_and_reset_over_http(memory_url: str, store_url: str) -> None:
    """``POST /api/workflows/{id}/pause``, ``/resume`` and ``/reset``: the status they leave,
    409 in the wrong state, 400 naming a bad body or an unknown step; paused is counted."""
    async with served(memory_url, store_url) as (client, api):
        await api.client.define(WorkflowDefinition.build("inspected", ["visit", "report"]))
        started = await client.post("/api/workflows", json={"workflow": "inspected"})
        workflow_id = (await started.json())["workflow_id"]
        path = f"/api/workflows/{workflow_id}"
        # A body is checked on every route, the bodyless ones included; a reason is text.
        for route, body, message in (
            ("resume", b"{bad", "the request body is not JSON"),
            ("retry", b"{bad", "the request body is not JSON"),
            ("pause", b'{"reason": 5}', "reason must be a string, not 5"),
            ("cancel", b'{"reason": ["x"]}', "reason must be a string, not ['x']"),
            ("reset", b'{"to_step": "visit", "reason": {}}', "reason must be a string"),
        ):
            response = await client.post(f"{path}/{route}", data=body)
            error = (await response.json())["error"]
            assert (response.status, message in error["message"]) == (400, True), error
        typed = await client.post("/api/definitions/inspected/pause", data=b'{"reason": 1}')
        assert typed.status == 400, await typed.text()
        assert (await (await client.get(path)).json())["status"] == "pending"

        paused = await client.post(f"{path}/pause", json={"reason": "inspectors on strike"})
        assert (paused.status, (await paused.json())["status"]) == (200, "paused")
        shown = await (await client.get(path)).json()
        assert shown["status"] == "paused"
        assert shown["paused"]["reason"] == "inspectors on strike"
        assert shown["paused"]["status"] == "pending"

        async def paused_counted() -> bool:
            counts = await (await client.get("/api/counts")).json()
            return bool(counts.get("paused") == 1)

        await wait_until(paused_counted, timeout=5)
        metrics = await (await client.get("/metrics")).text()
        assert 'hms_workflows_by_status{status="paused"} 1.0' in metrics
        listed = await (await client.get("/api/workflows?status=paused")).json()
        assert [w["workflow_id"] for w in listed] == [workflow_id]

        again = await client.post(f"{path}/pause", json={})
        error = (await again.json())["error"]
        assert (again.status, "already paused" in error["message"]) == (409, True)
        resumed = await client.post(f"{path}/resume")
        assert (resumed.status, (await resumed.json())["status"]) == (200, "pending")
        again = await client.post(f"{path}/resume")
        error = (await again.json())["error"]
        assert again.status == 409 and "not paused; cannot resume it" in error["message"]

        cases = [
            (b"{}", 400, "give the step to reset to as 'to_step'"),
            (b'{"to_step": "a.b"}', 400, "not 'a.b'"),
            (b'{"to_step": "visit", "signals": "lose"}', 400, "not 'lose'"),
            (b'{"to_step": "nope"}', 400, "has no step 'nope'; its steps are visit, report"),
            (b'{"to_step": "report"}', 409, "'report' has not run"),
        ]
        for body, status, message in cases:
            response = await client.post(f"{path}/reset", data=body)
            error = (await response.json())["error"]
            assert (response.status, message in error["message"]) == (status, True), error
        reset = await client.post(
            f"{path}/reset", json={"to_step": "visit", "data": {"again": 1}, "reason": "r"}
        )
        answer = await reset.json()
        assert reset.status == 200, answer
        assert (answer["status"], answer["to_step"]) == ("running", "visit")
        shown = await (await client.get(path)).json()
        assert [(s["step"], s["status"], s["input"]) for s in shown["steps"]] == [
            ("visit", "cancelled", None),
            ("visit", "pending", {"again": 1}),
        ]
        assert any(entry["kind"] == "workflow_reset" for entry in shown["history"])
        # No data: the step's last input; "data": null: a null input, not "no data".
        for body, expected in (({}, {"again": 1}), ({"data": None}, None)):
            reset = await client.post(f"{path}/reset", json={"to_step": "visit", **body})
            assert reset.status == 200, await reset.text()
            shown = await (await client.get(path)).json()
            assert shown["steps"][-1]["input"] == expected, (body, shown["steps"])
        gone = await client.post("/api/workflows/nope/pause", json={})
        assert gone.status == 404


async def test_workflows_whose_current_run_is_queued_are_listed_by_status_queued(
    memory_url: str, store_url: str
) -> None:
    """``queued`` is a step run's status, not a workflow's: ``status=queued`` lists the
    workflows waiting for a slot (it was a 400, and ``hms workflow list --status queued``
    a usage error)."""
    async with served(memory_url, store_url) as (client, api):
        await api.client.define(WorkflowDefinition.build("grant", [Step("check", concurrency=1)]))
        ids = []
        for _ in range(3):
            started = await client.post("/api/workflows", json={"workflow": "grant"})
            assert started.status == 201
            ids.append((await started.json())["workflow_id"])

        async def listed(query: str) -> list[str]:
            response = await client.get(f"/api/workflows?{query}")
            assert response.status == 200, await response.text()
            return [w["workflow_id"] for w in await response.json()]

        async def queued_are(expected: list[str]) -> bool:
            return await listed("status=queued") == expected

        # the first holds the one slot; the two after it wait in line, still pending
        await wait_until(lambda: queued_are([ids[2], ids[1]]), what="two queued")
        assert await listed("status=queued&name=grant&limit=1") == [ids[2]]
        assert await listed("status=queued&name=other") == []
        assert await listed("status=pending") == [ids[2], ids[1], ids[0]]
        assert [w["workflow_id"] for w in await api.client.list(status="queued")] == [
            ids[2],
            ids[1],
        ]
        url = str(client.make_url("")).rstrip("/")
        cli = await hms(
            "workflow", "list", "--status", "queued", "-o", "json", env={"HMS_ENGINE_URL": url}
        )
        assert cli.returncode == 0, cli.stderr
        assert [w["workflow_id"] for w in json.loads(cli.stdout)] == [ids[2], ids[1]]
        await api.client.cancel(ids[1])
        await wait_until(lambda: queued_are([ids[2]]), what="one queued after a cancel")


async def test_business_keys_over_http(memory_url: str, store_url: str) -> None:
    """``POST /api/workflows`` with ``attributes``, ``GET /api/workflows?attr.<key>=<value>``
    (several ANDed) and the workflow's state with its attributes; bad ones are a 400."""
    async with served(memory_url, store_url) as (client, api):
        await api.client.define(WorkflowDefinition.build("grant", ["check"]))
        ids = {}
        for app, region in (("A-17", "north"), ("A-18", "north"), ("A-19", "south")):
            started = await client.post(
                "/api/workflows",
                json={
                    "workflow": "grant",
                    "attributes": {"application_id": app, "region": region},
                },
            )
            assert started.status == 201
            ids[app] = (await started.json())["workflow_id"]

        async def listed(query: str) -> list[str]:
            response = await client.get(f"/api/workflows?{query}")
            assert response.status == 200, await response.text()
            return [w["workflow_id"] for w in await response.json()]

        assert await listed("attr.application_id=A-17") == [ids["A-17"]]
        assert await listed("attr.region=north") == [ids["A-18"], ids["A-17"]]
        assert await listed("attr.region=north&attr.application_id=A-18") == [ids["A-18"]]
        assert await listed("attr.region=south&attr.application_id=A-18") == []
        assert await listed("attr.region=north&status=succeeded") == []
        assert await listed("attr.region=north&limit=1") == [ids["A-18"]]
        [entry] = await (await client.get("/api/workflows?attr.application_id=A-19")).json()
        assert entry["attributes"] == {"application_id": "A-19", "region": "south"}
        shown = await (await client.get(f"/api/workflows/{ids['A-17']}")).json()
        assert shown["attributes"] == {"application_id": "A-17", "region": "north"}

        cases = [
            ("/api/workflows?attr.a.b=x", "attr key 'a.b' is not a valid key"),
            ("/api/workflows?attr.k=", "value '' of key 'k'"),
            ("/api/workflows?attr.k=x&attr.k=y", "'attr.k' is given more than once"),
            (f"/api/workflows?attr.k={'x' * 201}", "must be a string of 1-200"),
        ]
        for path, message in cases:
            response = await client.get(path)
            error = (await response.json())["error"]
            assert (response.status, message in error["message"]) == (400, True), error
        bad = await client.post(
            "/api/workflows", json={"workflow": "grant", "attributes": {"a b": "x"}}
        )
        error = (await bad.json())["error"]
        assert bad.status == 400 and "key 'a b' is not a valid key" in error["message"]
        assert len(await listed("limit=1000")) == 3  # nothing more was started

        # A time range on created_at: epoch seconds, ISO 8601, or a time ago.
        every = await (await client.get("/api/workflows")).json()
        middle = every[1]["created_at"]
        assert await listed(f"since={middle}") == [ids["A-19"], ids["A-18"]]
        assert await listed(f"until={middle}") == [ids["A-17"]]
        assert await listed(f"since={middle}&attr.region=north") == [ids["A-18"]]
        assert len(await listed("since=1h")) == 3 and await listed("until=1h") == []
        assert await listed("since=2999-01-01T00:00:00Z") == []
        assert len(await listed("until=2999-01-01")) == 3
        for query in ("since=yesterday", "until=-4", "since=" + "9" * 50):
            response = await client.get(f"/api/workflows?{query}")
            error = (await response.json())["error"]
            assert response.status == 400 and "is not a time: give" in error["message"]
            assert error["message"].startswith(query.split("=")[0]), error
        # client.list: the same search over the bus, with numbers or aware datetimes
        found = await api.client.list(since=middle)
        assert [w["workflow_id"] for w in found] == [ids["A-19"], ids["A-18"]]
        halfway = (every[2]["created_at"] + middle) / 2  # a datetime keeps microseconds only
        found = await api.client.list(until=datetime.fromtimestamp(halfway, UTC))
        assert [w["workflow_id"] for w in found] == [ids["A-17"]]
        with pytest.raises(PayloadError, match=r"until .* has no time zone"):
            await api.client.list(until=datetime(2026, 1, 1))
        with pytest.raises(PayloadError, match="since must be seconds since the epoch"):
            await api.client.list(since=float("nan"))


async def test_a_start_s_priority_over_http_and_the_command_line(
    memory_url: str, store_url: str
) -> None:
    """``POST /api/workflows`` and ``hms workflow start --priority``: the workflow's state
    (``GET``, ``hms workflow show``, ``status()``) and the list show it; a bad one is refused
    naming ``priority``."""
    engine = Engine(open_bus(memory_url), open_store(store_url))
    running = asyncio.ensure_future(engine.run())
    await asyncio.wait_for(engine.ready.wait(), 10)
    api = EngineApi(engine, EngineMetrics())
    server = TestServer(api.app(), host="127.0.0.1")
    try:
        async with TestClient(server) as client:
            await api.client.connect()
            await api.client.define(WorkflowDefinition.build("grant", ["check"]))
            started = await client.post("/api/workflows", json={"workflow": "grant", "priority": 1})
            assert started.status == 201
            urgent = (await started.json())["workflow_id"]
            plain = (
                await (await client.post("/api/workflows", json={"workflow": "grant"})).json()
            )["workflow_id"]
            shown = await (await client.get(f"/api/workflows/{urgent}")).json()
            assert shown["priority"] == 1
            assert (await api.client.status(plain)).priority == 3  # the default
            listed = {
                w["workflow_id"]: w["priority"]
                for w in await (await client.get("/api/workflows")).json()
            }
            assert listed == {urgent: 1, plain: 3}

            env = {"HMS_ENGINE_URL": str(server.make_url("")).rstrip("/")}
            cli = await hms("workflow", "start", "grant", "--priority", "5", env=env)
            assert cli.returncode == 0, cli.stderr
            assert (await api.client.status(cli.stdout.strip())).priority == 5
            show = await hms("workflow", "show", cli.stdout.strip(), env=env)
            assert show.returncode == 0, show.stderr
            assert [
                line.split() for line in show.stdout.splitlines() if line.startswith("priority")
            ] == [["priority", "5"]]
            bad = await hms("workflow", "start", "grant", "--priority", "0", env=env)
            assert bad.returncode == 2 and "--priority" in bad.stderr, bad.stderr
    finally:
        engine.stop()
        await running


async def test_the_dashboard_pages_counts_and_the_event_stream(
    memory_url: str, store_url: str
) -> None:
    """The dashboard's URLs serve its page, with a CSP that allows no inline script;
    ``/api/counts`` has every status; ``/api/events`` sends a ``changed`` notice naming a
    started workflow, and the stream ends when the server stops."""
    engine = Engine(open_bus(memory_url), open_store(store_url))
    running = asyncio.ensure_future(engine.run())
    await asyncio.wait_for(engine.ready.wait(), 10)
    changes, metrics = Changes(rate=20), EngineMetrics()

    def on_commit(batch: Batch) -> None:
        metrics.on_batch(batch)
        changes.on_batch(batch)

    engine.on_commit = on_commit
    api = EngineApi(engine, metrics, changes=changes)
    try:
        async with TestClient(TestServer(api.app())) as client:
            for path in ("/", "/workflows", "/workflows/abc", "/dlq", "/workflows?status=failed"):
                page = await client.get(path)
                assert page.status == 200 and page.content_type == "text/html", path
                assert "script-src 'self';" in page.headers["Content-Security-Policy"]
                assert '<script src="/dashboard/app.js"' in await page.text()
            script = await client.get("/dashboard/app.js")
            assert script.status == 200 and script.content_type == "text/javascript"
            assert "innerHTML" not in await script.text()
            assert (await client.get("/dashboard/../api.py")).status == 404
            assert (await client.get("/dashboard/nothing.js")).status == 404
            counts = await (await client.get("/api/counts")).json()
            assert counts == dict.fromkeys(STATUSES, 0)

            await api.client.connect()
            await api.client.define(WorkflowDefinition.build("grant", ["check"]))
            stream = await client.get("/api/events")
            assert stream.headers["Content-Type"] == "text/event-stream"
            assert (
                await stream.content.readuntil(b"\n\n")
                == b"retry: 2000\nevent: hello\ndata: {}\n\n"
            )
            assert changes.listeners == 1
            started = await client.post("/api/workflows", json={"workflow": "grant"})
            workflow_id = (await started.json())["workflow_id"]

            async def named() -> dict[str, Any] | None:
                message = await stream.content.readuntil(b"\n\n")
                event, data = message.decode().strip().splitlines()
                assert event == "event: changed"
                notice: dict[str, Any] = json.loads(data.removeprefix("data: "))
                return notice if workflow_id in notice["workflows"] else None

            notice = await asyncio.wait_for(wait_until(named, timeout=2), 2)
            assert notice["workflows"][workflow_id] == "pending" and notice["more"] is False

            async def pending() -> bool:  # counted again after a second at most
                return bool((await (await client.get("/api/counts")).json())["pending"] == 1)

            await wait_until(pending, timeout=3, interval=0.1, what="a second's count")
            # The table's pages, by keyset: after the last one's (created_at, id).
            for _ in range(2):
                assert (
                    await client.post("/api/workflows", json={"workflow": "grant"})
                ).status == 201
            first = await (await client.get("/api/workflows?limit=2")).json()
            last = first[-1]
            cursor = f"{last['created_at']!r},{last['workflow_id']}"
            second = await (
                await client.get("/api/workflows", params={"limit": 2, "before": cursor})
            ).json()
            everything = await (await client.get("/api/workflows")).json()
            assert [w["workflow_id"] for w in first + second] == [
                w["workflow_id"] for w in everything
            ]
            assert len(everything) == 3 and everything[-1]["workflow_id"] == workflow_id
            for bad in ("x", "1.5", "nan,abc", "1.5,a b", "inf,abc"):
                refused = await client.get("/api/workflows", params={"before": bad})
                assert refused.status == 400
                assert "is not a cursor" in (await refused.json())["error"]["message"]
            stats = await (await client.get("/api/stats")).json()
            # Over the minutes: a minute may have begun since the starts (they are then the
            # last full minute's, and the current one has none so far).
            assert sum(m["started"] for m in stats["minutes"]) == 3 and stats["steps"] == []
            assert set(stats["minutes"][-1]) == {
                "at",
                "started",
                "succeeded",
                "failed",
                "cancelled",
                "compensated",
            }
            changes.close()  # as at shutdown: the stream ends
            assert await asyncio.wait_for(stream.content.read(), 2) == b""
            await wait_until(lambda: changes.listeners == 0, timeout=2)
    finally:
        engine.stop()
        await running


def test_step_quantiles_are_read_from_the_histogram_as_prometheus_does() -> None:
    buckets = [(0.001, 0.0), (0.01, 50.0), (0.1, 90.0), (1.0, 100.0), (math.inf, 100.0)]
    assert _quantile(0.5, buckets) == pytest.approx(0.01)
    assert _quantile(0.95, buckets) == pytest.approx(0.1 + 0.9 * 0.5)
    assert _quantile(0.25, buckets) == pytest.approx(0.001 + 0.009 * 0.5)
    assert _quantile(0.99, [(0.1, 1.0), (math.inf, 10.0)]) == 0.1  # beyond: the last bound
