"""The event-loop monitor, on this test's own loop: blocks caught, logged, counted and exported."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from hms_mgmt.loopwatch import LoopCollector, LoopMonitor
from hms_mgmt.settings import Settings
from hms_mgmt.worker.probes import probe_app
from tests.conftest import wait_until


@pytest.fixture
async def monitor() -> AsyncIterator[LoopMonitor]:
    m = LoopMonitor("test", interval=0.05, threshold=0.3, liveness_limit=0.6, liveness_hold=0.5)
    m.start()
    try:
        yield m
    finally:
        m.stop()


def hog_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # what a careless handler does in an async def


def sample_later(delay: float, read: Any) -> list[Any]:
    """Call ``read`` from another thread after ``delay`` seconds (the loop may be blocked)."""
    found: list[Any] = []
    timer = threading.Timer(delay, lambda: found.append(read()))
    timer.daemon = True
    timer.start()
    return found


async def test_a_block_is_logged_once_while_it_lasts_then_when_it_ends(
    monitor: LoopMonitor,
) -> None:
    await asyncio.sleep(0.2)  # a few ticks in time first
    with capture_logs() as logs:
        lag_during = sample_later(0.8, monitor.lag)
        hog_the_loop(1.2)
        await wait_until(lambda: any(e["event"] == "event loop unblocked" for e in logs), timeout=5)
    blocked = [e for e in logs if e["event"] == "event loop blocked"]
    assert len(blocked) == 1, logs
    assert blocked[0]["log_level"] == "warning"
    assert blocked[0]["blocked_by"].startswith("hog_the_loop (tests/test_loopwatch.py:")
    assert any("test_a_block_is_logged_once" in frame for frame in blocked[0]["stack"])
    assert 0.3 <= blocked[0]["blocked_for"] < 0.9
    [unblocked] = [e for e in logs if e["event"] == "event loop unblocked"]
    assert 1.0 < unblocked["blocked_for"] < 2.0
    assert unblocked["blocked_by"] == blocked[0]["blocked_by"]
    assert lag_during and 0.5 < lag_during[0] < 1.2  # computed when asked, during the block
    assert monitor.blocks == 1
    assert monitor.lag() < 0.3


async def test_short_stalls_and_a_loop_that_keeps_time_are_not_blocks(
    monitor: LoopMonitor,
) -> None:
    with capture_logs() as logs:
        for _ in range(3):
            hog_the_loop(0.15)  # under the 0.3 s threshold
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
    assert monitor.blocks == 0
    assert [e for e in logs if e["component"] == "loopwatch"] == []


async def test_a_block_the_watchdog_cannot_see_is_still_counted_when_it_ends() -> None:
    # A watchdog that never looks (a C call holding the GIL would have the same effect).
    m = LoopMonitor("blind", interval=0.05, threshold=0.2, liveness_limit=10)
    m.start()
    m._stopping.set()  # the watchdog thread ends; the ticks go on
    try:
        await asyncio.sleep(0.1)
        with capture_logs() as logs:
            hog_the_loop(0.5)
            await wait_until(lambda: m.blocks == 1, timeout=5)
        [ended] = [e for e in logs if e["component"] == "loopwatch"]
        assert ended["event"] == "event loop was blocked" and ended["log_level"] == "warning"
        assert 0.3 < ended["blocked_for"] < 1.0
    finally:
        m.stop()


async def test_liveness_fails_during_and_shortly_after_a_block_over_the_limit(
    monitor: LoopMonitor,
) -> None:
    await asyncio.sleep(0.1)
    assert monitor.liveness() is None
    during = sample_later(0.9, monitor.liveness)
    hog_the_loop(1.0)  # over the 0.6 s liveness limit
    assert during and during[0]["ongoing"] is True and during[0]["status"] == "blocked"
    assert during[0]["blocked_by"].startswith("hog_the_loop")
    await wait_until(lambda: (monitor.liveness() or {}).get("ongoing") is False)
    after = monitor.liveness()
    assert after is not None
    assert after["blocked_for"] > 0.9 and after["limit"] == 0.6
    assert after["ended_ago"] < 0.5
    await wait_until(lambda: monitor.liveness() is None, timeout=3, what="the hold to pass")
    hog_the_loop(0.4)  # over the log threshold, under the liveness limit
    await asyncio.sleep(0.1)
    assert monitor.liveness() is None
    assert monitor.blocks == 2


async def test_the_metrics_and_healthz(monitor: LoopMonitor) -> None:
    registry = CollectorRegistry()
    registry.register(LoopCollector(monitor))
    app = probe_app(lambda: generate_latest(registry), lambda: {"serving": True}, monitor)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    try:
        healthy = await client.get("/healthz")
        assert (healthy.status, await healthy.json()) == (200, {"status": "alive"})
        hog_the_loop(0.8)
        await asyncio.sleep(0.1)  # the tick comes back
        blocked = await client.get("/healthz")
        body = await blocked.json()
        assert (blocked.status, body["status"], body["ongoing"]) == (503, "blocked", False)
        scraped = {
            sample.name: sample.value
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            for sample in family.samples
        }
        assert scraped["hms_event_loop_blocks_total"] == 1
        assert 0 <= scraped["hms_event_loop_lag_seconds"] < 0.3
        await wait_until(lambda: monitor.liveness() is None, timeout=3)
        assert (await client.get("/healthz")).status == 200
    finally:
        await client.close()


async def test_a_monitor_runs_once_at_a_time_and_stops_cleanly() -> None:
    m = LoopMonitor("again", interval=0.05, threshold=0.2)
    m.start()
    with pytest.raises(RuntimeError, match="running already"):
        m.start()
    m.stop()
    assert m.lag() == 0.0 and not m.running
    m.start()  # again, after a stop
    assert m.running
    m.stop()
    await asyncio.sleep(0)
    assert not [t for t in threading.enumerate() if t.name == "hms-loopwatch-again"]


def test_settings_and_bad_values() -> None:
    settings = Settings.from_env({"HMS_LOOP_BLOCK_THRESHOLD": "0.5", "HMS_LIVENESS_LAG": "12"})
    m = LoopMonitor.from_settings(settings, "x")
    assert (m.threshold, m.liveness_limit) == (0.5, 12.0)
    assert (Settings().loop_block_threshold, Settings().liveness_lag) == (1.0, 30.0)
    with pytest.raises(ValueError, match="HMS_LIVENESS_LAG must be a number of seconds"):
        Settings.from_env({"HMS_LIVENESS_LAG": "soon"})
    with pytest.raises(ValueError, match="loop_block_threshold must be a number of seconds > 0"):
        Settings.from_env({}, loop_block_threshold=0)
    with pytest.raises(ValueError, match="threshold must be > 0"):
        LoopMonitor("x", threshold=-1)
