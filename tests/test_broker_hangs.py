"""Handlers that hang past their timeout and handlers that block the event loop, in a real
step-service process with one slot (``--concurrency 1``) and its HTTP probes, on RabbitMQ."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

import hms_mgmt
from tests.conftest import Processes, free_port, http_get, wait_until
from tests.test_operators import samples

pytestmark = pytest.mark.broker


async def one_slot_worker(
    processes: Processes, vhost: str, store_url: str, **env: str
) -> tuple[str, Any]:
    """The engine, and the test step service with one slot; the service's URL and process."""
    processes.engine(vhost, store_url)
    port = free_port()
    worker = processes.spawn(
        "worker",
        ["-m", "hms_mgmt", "worker", "tests.services:grant", "--concurrency", "1"],
        {"HMS_BROKER_URL": vhost, "HMS_WORKER_HTTP_PORT": str(port), **env},
    )
    url = f"http://127.0.0.1:{port}"

    async def ready() -> bool:
        return (await http_get(f"{url}/readyz"))[0] == 200

    await wait_until(ready, timeout=30, interval=0.2, what="the step service to be ready")
    return url, worker


async def worker_metrics(url: str) -> dict[str, float]:
    status, body = await http_get(f"{url}/metrics")
    assert status == 200, body
    return {name: value for (name, labels), value in samples(body).items() if not labels}


def logged(processes: Processes, event: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in processes.log("worker").splitlines() if line[:1] == "{"]
    return [line for line in lines if line.get("event") == event]


async def test_a_hung_async_handler_is_cancelled_and_its_slot_runs_the_retry(
    client: hms_mgmt.Management, processes: Processes, vhost: str, store_url: str, tmp_path: Path
) -> None:
    await one_slot_worker(processes, vhost, store_url)
    note = tmp_path / "hang.txt"
    started = await client.start("hung", {"note": str(note)})
    state = await client.wait(started.workflow_id, timeout=30)
    # Attempt 1 would hold the only slot for an hour: attempt 2 ran because it was cancelled.
    assert state.status == "succeeded", state.describe()
    assert state.output == {"attempt": 2}
    first = state.steps[0]
    assert (first.attempt, first.status in ("failed", "timed_out")) == (1, True)
    # The engine's timer and the worker's cancellation race; both say StepTimeout.
    assert first.error is not None and first.error["type"] == "StepTimeout"
    assert note.read_text().split() == ["started", "cancelled"]  # the handler saw it
    [timed_out] = logged(processes, "step timed out; its handler was cancelled")
    assert (timed_out["workflow_id"], timed_out["attempt"]) == (started.workflow_id, 1)
    [failed] = logged(processes, "step failed")
    assert failed["error_type"] == "StepTimeout"
    assert (
        failed["error"]
        == "step 'hang' attempt 1 did not finish within 1s: its handler was cancelled"
    )


async def test_a_hung_thread_handler_is_abandoned_counted_and_does_not_hold_the_exit(
    client: hms_mgmt.Management, processes: Processes, vhost: str, store_url: str, tmp_path: Path
) -> None:
    url, worker = await one_slot_worker(processes, vhost, store_url)
    before = await worker_metrics(url)
    assert before["hms_worker_abandoned_threads_total"] == 0
    assert before["hms_worker_threads_running_past_timeout"] == 0

    release = tmp_path / "release"
    started = await client.start("hungThread", {"release": str(release)})
    state = await client.wait(started.workflow_id, timeout=30)
    assert state.status == "succeeded", state.describe()
    assert [s.attempt for s in state.steps] == [1, 2] and state.output == {"attempt": 2}
    assert state.steps[0].error is not None and state.steps[0].error["type"] == "StepTimeout"
    during = await worker_metrics(url)
    assert during["hms_worker_abandoned_threads_total"] == 1
    assert during["hms_worker_threads_running_past_timeout"] == 1

    release.touch()  # the thread returns at last

    async def returned() -> bool:
        return (await worker_metrics(url))["hms_worker_threads_running_past_timeout"] == 0

    await wait_until(returned, timeout=10, what="the abandoned thread to return")
    assert (await worker_metrics(url))["hms_worker_abandoned_threads_total"] == 1

    # One that never returns: the service still stops on SIGTERM, and says why it did not wait.
    stuck = await client.start("hungThread", {"release": str(tmp_path / "never")})
    assert (await client.wait(stuck.workflow_id, timeout=30)).status == "succeeded"
    assert (await worker_metrics(url))["hms_worker_threads_running_past_timeout"] == 1
    worker.send_signal(signal.SIGTERM)
    began = time.monotonic()
    assert await asyncio.to_thread(worker.wait, 15) == 0
    assert time.monotonic() - began < 10
    [exiting] = logged(
        processes, "exiting with handler threads still running: threads cannot be stopped"
    )
    assert len(exiting["threads"]) == 1


async def test_a_handler_blocking_the_event_loop_is_named_counted_and_fails_liveness(
    client: hms_mgmt.Management, processes: Processes, vhost: str, store_url: str
) -> None:
    url, _worker = await one_slot_worker(processes, vhost, store_url, HMS_LIVENESS_LAG="2")
    assert await http_get(f"{url}/healthz") == (200, '{"status": "alive"}')
    assert (await worker_metrics(url))["hms_event_loop_blocks_total"] == 0

    started = await client.start("loopHog", {"seconds": 3})
    await wait_until(
        lambda: logged(processes, "event loop blocked"), timeout=15, what="the block warning"
    )
    # The loop is blocked for about two more seconds: nothing answers.
    began = time.monotonic()
    status, reason = await http_get(f"{url}/healthz", timeout=1.0)
    assert status == 0, (status, reason)
    assert time.monotonic() - began < 1.5
    state = await client.wait(started.workflow_id, timeout=30)
    assert state.status == "succeeded"

    [blocked] = logged(processes, "event loop blocked")
    assert blocked["level"] == "warning"
    assert blocked["blocked_by"].startswith("hog_the_loop (tests/services.py:")
    await wait_until(lambda: logged(processes, "event loop unblocked"), timeout=5)
    [unblocked] = logged(processes, "event loop unblocked")
    assert 2.5 < unblocked["blocked_for"] < 10
    assert (await worker_metrics(url))["hms_event_loop_blocks_total"] >= 1
    # Over HMS_LIVENESS_LAG (2 s): /healthz fails for a while after the loop is back.
    status, body = await http_get(f"{url}/healthz")
    assert status == 503, body
    answer = json.loads(body)
    assert answer["status"] == "blocked" and answer["blocked_for"] > 2.5
    assert answer["blocked_by"].startswith("hog_the_loop")
