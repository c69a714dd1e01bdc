"""Retries, error paths, timeouts, dead letters, redrive and cancel, on the real RabbitMQ."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import hms_mgmt
from bus_adapters.rabbitmq import RabbitMQBus
from tests.conftest import ROOT, Processes, wait_until

pytestmark = pytest.mark.broker


async def dlq_length(vhost: str, queue: str) -> int:
    bus = RabbitMQBus(vhost, name="test-dlq-count")
    await bus.connect()
    try:
        return await bus.queue_length(queue)
    finally:
        await bus.close()


async def test_a_step_failing_twice_then_succeeding(
    client: hms_mgmt.Management, daemons: Processes
) -> None:
    started = await client.start("flaky", {"n": 1})
    state = await client.wait(started.workflow_id, timeout=30)
    assert state.status == "succeeded", state.describe()
    wobbles = [s for s in state.steps if s.step == "wobble"]
    assert [(s.attempt, s.status) for s in wobbles] == [
        (1, "failed"),
        (2, "failed"),
        (3, "succeeded"),
    ]
    assert wobbles[0].error is not None and wobbles[0].error["message"] == "attempt 1 failed"
    assert "Traceback" in wobbles[0].error["traceback"]
    assert wobbles[0].error["type"] == "RuntimeError"
    # backoff 0.5 s, then 1 s (no jitter), measured from each failure to the next attempt's start
    for before, after, wait in ((wobbles[0], wobbles[1], 0.5), (wobbles[1], wobbles[2], 1.0)):
        assert before.finished_at is not None and after.started_at is not None
        assert after.started_at - before.finished_at >= wait - 0.05
        assert after.due_at is not None and after.started_at >= after.due_at
    assert state.output == {"n": 1, "attempts": 3}


async def test_a_step_that_always_fails_ends_in_its_dlq(
    client: hms_mgmt.Management, daemons: Processes, vhost: str
) -> None:
    started = await client.start("doomed", {"application_id": "A-1"})
    state = await client.wait(started.workflow_id, timeout=30)
    assert state.status == "failed"
    assert [(s.step, s.attempt, s.status) for s in state.steps] == [
        ("explode", 1, "failed"),
        ("explode", 2, "failed"),
    ]
    assert state.error is not None
    assert state.error["step"] == "explode" and state.error["attempts"] == 2
    assert state.error["message"] == "credit bureau down"
    await wait_until(
        lambda: dlq_length(vhost, "doomed.explode.dlq"), timeout=10, what="the DLQ message"
    )
    assert await dlq_length(vhost, "doomed.explode.dlq") == 1
    bus = RabbitMQBus(vhost, name="test-dlq-read")
    await bus.connect()
    try:
        dead = await bus.get("doomed.explode.dlq")
        assert dead is not None
        assert dead.headers["hms-workflow-id"] == started.workflow_id
        assert dead.headers["x-hms-reason"] == "attempts exhausted"
        assert dead.headers["x-hms-attempts"] == 2
        assert dead.headers["x-hms-error"] == "credit bureau down"
        assert json.loads(dead.body)["steps"][0]["payload"] == {"application_id": "A-1"}
        await dead.reject(requeue=True)
    finally:
        await bus.close()


async def test_the_error_path_runs_instead_of_the_dlq(
    client: hms_mgmt.Management, daemons: Processes, vhost: str
) -> None:
    started = await client.start("doomedWithErrorPath", {"application_id": "A-2"})
    state = await client.wait(started.workflow_id, timeout=30)
    assert state.status == "failed"
    assert [(s.step, s.status) for s in state.steps] == [
        ("explode", "failed"),
        ("explode", "failed"),
        ("notifyApplicant", "succeeded"),
    ]
    notified = state.steps[-1].output
    assert notified["failure"]["step"] == "explode" and notified["failure"]["attempts"] == 2
    assert state.error is not None and state.error["message"] == "credit bureau down"
    assert await dlq_length(vhost, "doomedWithErrorPath.explode.dlq") == 0


@pytest.mark.parametrize("how", ["non-retryable", "listed-type"])
async def test_non_retryable_errors_fail_at_once(
    client: hms_mgmt.Management, daemons: Processes, how: str
) -> None:
    started = await client.start("picky", {"how": how})
    state = await client.wait(started.workflow_id, timeout=30)
    assert state.status == "failed"
    assert len(state.steps) == 1
    assert state.error is not None and state.error["reason"] == "not retryable"
    expected = "NonRetryableError" if how == "non-retryable" else "KeyError"
    assert state.error["type"] == expected


async def test_a_timeout_then_a_late_outcome_that_is_ignored(
    client: hms_mgmt.Management, daemons: Processes
) -> None:
    started = await client.start("sluggish", {})
    state = await client.wait(started.workflow_id, timeout=30)
    assert state.status == "succeeded"
    assert [(s.attempt, s.status) for s in state.steps] == [(1, "timed_out"), (2, "succeeded")]
    assert state.steps[0].error is not None and state.steps[0].error["type"] == "StepTimeout"
    assert state.output == {"finished_attempt": 2}

    async def late_outcome_arrived() -> bool:
        # attempt 1 sleeps 2.5 s; its outcome lands after the workflow has finished
        return "outcome ignored" in daemons.log("engine")

    await wait_until(late_outcome_arrived, timeout=10, what="the late outcome")
    again = await client.status(started.workflow_id)
    assert [(s.attempt, s.status) for s in again.steps] == [(1, "timed_out"), (2, "succeeded")]
    assert again.output == {"finished_attempt": 2}


async def test_a_retry_timer_due_while_the_engine_is_down_runs_after_restart(
    client: hms_mgmt.Management, processes: Processes, vhost: str, store_url: str
) -> None:
    engine = processes.engine(vhost, store_url)
    processes.worker(vhost, "tests.services:grant")
    started = await client.start("backoff", {})

    async def retry_scheduled() -> float | None:
        state = await client.status(started.workflow_id)
        return state.steps[-1].due_at if len(state.steps) == 2 else None

    due = await wait_until(retry_scheduled, timeout=20, what="the retry to be scheduled")
    engine.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(engine.wait, 10) == 0
    await wait_until(lambda: time.time() > due + 1.0, timeout=10, what="the retry to come due")
    processes.engine(vhost, store_url)
    state = await client.wait(started.workflow_id, timeout=30)
    assert state.status == "succeeded"
    assert [(s.attempt, s.status) for s in state.steps] == [(1, "failed"), (2, "succeeded")]
    assert state.steps[1].started_at is not None and state.steps[1].started_at > due + 1.0


async def test_redrive_from_the_dlq_completes_the_workflow(
    client: hms_mgmt.Management, daemons: Processes, vhost: str, tmp_path: Path
) -> None:
    unlock = tmp_path / "unlock"
    started = await client.start("gated", {"unlock": str(unlock)})
    failed = await client.wait(started.workflow_id, timeout=30)
    assert failed.status == "failed"
    await wait_until(
        lambda: dlq_length(vhost, "gated.gate.dlq"), timeout=10, what="the DLQ message"
    )

    def hms(*args: str) -> subprocess.CompletedProcess[str]:
        assert daemons.engine_url is not None
        return subprocess.run(
            [sys.executable, "-m", "hms_mgmt", "--engine-url", daemons.engine_url, *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    listed = hms("-o", "json", "dlq", "list", "gated.gate")
    assert listed.returncode == 0, listed.stderr
    [letter] = json.loads(listed.stdout)
    assert letter["workflow_id"] == started.workflow_id and letter["reason"] == "attempts exhausted"
    unlock.write_text("open")
    replayed = hms("dlq", "replay", "gated.gate", "--id", letter["message_id"])
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "resumed" in replayed.stdout
    state = await client.wait(started.workflow_id, timeout=30)
    assert state.status == "succeeded"
    assert [(s.step, s.attempt, s.status) for s in state.steps] == [
        ("gate", 1, "failed"),
        ("gate", 1, "succeeded"),
        ("after", 1, "succeeded"),
    ]
    assert await dlq_length(vhost, "gated.gate.dlq") == 0


async def test_client_retry_resumes_a_failed_workflow(
    client: hms_mgmt.Management, daemons: Processes, tmp_path: Path
) -> None:
    unlock = tmp_path / "unlock"
    started = await client.start("gated", {"unlock": str(unlock)})
    assert (await client.wait(started.workflow_id, timeout=30)).status == "failed"
    unlock.write_text("open")
    await client.retry(started.workflow_id)
    assert (await client.wait(started.workflow_id, timeout=30)).status == "succeeded"
    with pytest.raises(hms_mgmt.InvalidStateError, match="only a failed workflow can be retried"):
        await client.retry(started.workflow_id)


async def test_cancel_during_a_backoff_wait(
    client: hms_mgmt.Management, daemons: Processes
) -> None:
    first = await client.start("backoff", {"always_fail": True})

    async def second_attempt_scheduled(workflow_id: str) -> bool:
        state = await client.status(workflow_id)
        return len(state.steps) == 2 and state.steps[1].status == "scheduled"

    await wait_until(
        lambda: second_attempt_scheduled(first.workflow_id), timeout=20, what="backoff"
    )
    await client.cancel(first.workflow_id, reason="applicant withdrew")
    cancelled = await client.status(first.workflow_id)
    assert cancelled.status == "cancelled"
    assert cancelled.steps[1].status == "cancelled"
    # A sentinel started later with the same backoff: once its second attempt has run,
    # the cancelled workflow's timer would have fired too.
    sentinel = await client.start("backoff", {"always_fail": True})

    async def sentinel_retried() -> bool:
        state = await client.status(sentinel.workflow_id)
        return len(state.steps) >= 2 and state.steps[1].status == "failed"

    await wait_until(sentinel_retried, timeout=20, what="the sentinel's second attempt")
    after = await client.status(first.workflow_id)
    assert after.status == "cancelled"
    assert [(s.attempt, s.status) for s in after.steps] == [(1, "failed"), (2, "cancelled")]
    assert after.steps[1].started_at is None
    assert after.error is not None and after.error["message"] == "applicant withdrew"
    with pytest.raises(hms_mgmt.InvalidStateError, match="already cancelled"):
        await client.cancel(first.workflow_id)


async def test_a_malformed_but_authentic_outcome_fails_its_attempt(
    client: hms_mgmt.Management, processes: Processes, vhost: str, store_url: str
) -> None:
    """A step service that answers with a malformed outcome (here: succeeded, no result)
    fails its attempt with MalformedOutcome, not retried; the outcome is dead-lettered too."""
    from bus_adapters.base import Message
    from hms_mgmt.topology import RESULTS_EXCHANGE, RESULTS_QUEUE
    from hms_mgmt.wire.codec import batch_body, dumps

    processes.engine(vhost, store_url)  # and no step service: this test plays it
    started = await client.start("grantApproval", {"application_id": "A-9"})
    bus = RabbitMQBus(vhost, name="test-malformed")
    await bus.connect()
    try:
        delivery = await wait_until(
            lambda: bus.get("grantApproval.validateApp"), timeout=10, what="the step message"
        )
        step = json.loads(delivery.body)["steps"][0]
        malformed = {k: step[k] for k in ("workflow_id", "seq", "attempt", "step", "token")}
        malformed["kind"] = "succeeded"
        await bus.publish(
            Message(
                body=batch_body("outcomes", [dumps(malformed)]),
                exchange=RESULTS_EXCHANGE,
                routing_key=RESULTS_QUEUE,
            )
        )
        await delivery.ack()  # as a step service would, once its outcome is confirmed
        state = await client.wait(started.workflow_id, timeout=20)
        assert state.status == "failed", state.describe()
        [run] = state.steps
        assert run.error is not None and run.error["type"] == "MalformedOutcome"
        assert "a succeeded outcome has no 'result'" in run.error["message"]
        dlq = f"{RESULTS_QUEUE}.dlq"
        await wait_until(lambda: dlq_length(vhost, dlq), timeout=10, what="the dead letter")
        letter = await bus.get(dlq)
        assert letter is not None and json.loads(letter.body) == {"outcomes": [malformed]}
        assert "failed with MalformedOutcome" in letter.headers["x-hms-reason"]
        await letter.reject(requeue=True)
        assert await bus.queue_length(RESULTS_QUEUE) == 0
    finally:
        await bus.close()
