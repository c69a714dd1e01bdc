"""Pause, resume and reset with the engine daemon and a step service as processes, on the real
RabbitMQ (a vhost of the test's own)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

import hms_mgmt
from tests.conftest import Processes, http_get, wait_until
from tests.services import GRANT

pytestmark = pytest.mark.broker


async def http_post(url: str, body: Any) -> tuple[int, Any]:
    """Status and JSON answer of a POST, off the event loop."""
    import urllib.error
    import urllib.request

    def post() -> tuple[int, Any]:
        request = urllib.request.Request(
            url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    return await asyncio.to_thread(post)


async def _state(client: hms_mgmt.Management, workflow_id: str) -> hms_mgmt.WorkflowState:
    return await client.status(workflow_id)


async def test_a_paused_workflow_survives_an_engine_kill_and_completes_after_resume(
    client: hms_mgmt.Management, processes: Processes, vhost: str, store_url: str, tmp_path: Path
) -> None:
    engine = processes.engine(vhost, store_url)
    processes.worker(vhost, "tests.services:grant")
    note = str(tmp_path / "runs.txt")  # the step service notes every run it starts

    def ran() -> list[str]:
        return Path(note).read_text().splitlines() if Path(note).exists() else []

    # One paused while its step runs (its outcome is recorded, the next step held), one paused
    # while its next step waits out a delay (the timer freezes).
    napping = (await client.start("noted", {"note": note, "seconds": 3})).workflow_id
    await client.pause(napping, reason="hold the next step")
    delayed = (await client.start("noted", {"note": note, "delay": 8})).workflow_id

    async def scheduled() -> bool:
        state = await _state(client, delayed)
        return state.steps[-1].step == "second" and state.steps[-1].status == "scheduled"

    await wait_until(scheduled, timeout=30, what="the delayed step scheduled")
    await client.pause(delayed, reason="freeze the delay")

    async def nap_done() -> bool:
        state = await _state(client, napping)
        return len(state.steps) == 2 and state.steps[0].status == "succeeded"

    await wait_until(nap_done, timeout=30, what="the running step's outcome recorded")
    held = await _state(client, napping)
    assert held.status == "paused" and held.paused is not None
    assert held.paused["held"] == 2 and held.steps[1].status == "pending"

    engine.kill()  # kill -9: no chance to tidy up
    assert await asyncio.to_thread(engine.wait, 10) == -9
    processes.engine(vhost, store_url)

    # Workflows started after the restart, with the same delay and the same steps, finish:
    # the engine and the step service serve, and would have run the paused ones' steps.
    canaries = [
        (await client.start("noted", {"note": note, **payload})).workflow_id
        for payload in ({"delay": 8}, {"seconds": 0.1})
    ]
    for canary in canaries:
        assert (await client.wait(canary, timeout=60)).status == "succeeded"
    for workflow_id in (napping, delayed):
        state = await _state(client, workflow_id)
        assert state.status == "paused", state.describe()
        assert state.steps[-1].step == "second" and state.steps[-1].started_at is None
        assert f"{workflow_id} second 1" not in ran()  # never published: no worker ran it
    assert {f"{c} second 1" for c in canaries} <= set(ran())
    frozen = (await _state(client, delayed)).paused
    assert frozen is not None and frozen["timer"]["kind"] == "run"
    assert 0 < frozen["timer"]["remaining"] <= 8

    for workflow_id in (napping, delayed):
        resumed = await client.resume(workflow_id)
        assert resumed["status"] == "running"
    for workflow_id in (napping, delayed):
        state = await client.wait(workflow_id, timeout=60)
        assert state.status == "succeeded", state.describe()
        assert [(s.step, s.status) for s in state.steps] == [
            ("first", "succeeded"),
            ("second", "succeeded"),
        ]
        assert ran().count(f"{workflow_id} second 1") == 1
    log = processes.log("engine")
    assert "Traceback" not in log


async def test_a_reset_from_validate_app_reruns_the_steps_after_it_with_the_new_input(
    client: hms_mgmt.Management, daemons: Processes
) -> None:
    bad = {"application_id": "A-17", "fail_always": "creditCheck"}
    failed = (await client.start("grantApproval", bad)).workflow_id
    state = await client.wait(failed, timeout=60)
    assert state.status == "failed" and state.steps[-1].step == "creditCheck"
    before = len(state.steps)

    async def dead_lettered() -> bool:  # the engine publishes it just after the failure
        status, body = await http_get(f"{daemons.engine_url}/api/dlq")
        queues = {row["queue"]: row["messages"] for row in json.loads(body)} if status else {}
        return bool(queues.get("grantApproval.creditCheck.dlq") == 1)

    await wait_until(dead_lettered, timeout=30, what="the failed run's dead letter")
    corrected = {"application_id": "A-17", "corrected": True}
    # Through the HTTP API, as hms and the dashboard do: the failed run's dead letter is
    # settled (taken out of its .dlq), as on a retry.
    status, answer = await http_post(
        f"{daemons.engine_url}/api/workflows/{failed}/reset",
        {"to_step": "validateApp", "data": corrected, "reason": "data fixed"},
    )
    assert status == 200, answer
    assert answer["status"] == "running" and answer["dead_letters_settled"] == 1
    assert not await dead_lettered()  # out of its queue
    state = await client.wait(failed, timeout=60)
    assert state.status == "succeeded", state.describe()
    again = state.steps[before:]
    assert [(s.step, s.visit, s.attempt, s.status) for s in again] == [
        (step, 2 if step in ("validateApp", "creditCheck") else 1, 1, "succeeded") for step in GRANT
    ]
    assert again[0].input == corrected
    for run in again[1:]:  # every step after it ran with the new input, carried on
        assert run.input["corrected"] is True and "fail_always" not in run.input
    assert state.output is not None and state.output["corrected"] is True
    assert state.output["finalize"] == 1

    with pytest.raises(hms_mgmt.UnknownStepError, match="has no step 'payOut'"):
        await client.reset(failed, "payOut")


async def test_a_reset_while_a_step_runs_ignores_its_late_outcome(
    client: hms_mgmt.Management, daemons: Processes
) -> None:
    # a nap of 4 s: reported running after 1 s, then 3 s to reset it before it ends
    workflow_id = (await client.start("slow", {"seconds": 4.0, "first": True})).workflow_id

    async def napping() -> Any:
        state = await _state(client, workflow_id)
        return state.steps[0].status == "running"  # reported after a second of running

    await wait_until(napping, timeout=30, what="the nap running")
    await client.reset(workflow_id, "nap", {"seconds": 0.1}, signals="drop")
    state = await client.wait(workflow_id, timeout=60)
    assert state.status == "succeeded", state.describe()
    assert [(s.step, s.status) for s in state.steps] == [
        ("nap", "cancelled"),
        ("nap", "succeeded"),
        ("after", "succeeded"),
    ]
    assert state.steps[2].input == {"seconds": 0.1}  # not the first nap's late result

    async def late_ignored() -> bool:  # the first nap ends 4 s in: its outcome is ignored
        status, body = await http_get(f"{daemons.engine_url}/api/workflows/{workflow_id}")
        return status == 200 and '"outcome_ignored"' in body

    await wait_until(late_ignored, timeout=30, what="the first nap's outcome ignored")
    assert (await _state(client, workflow_id)).status == "succeeded"


async def test_pause_type_during_a_run_holds_every_workflow_and_survives_a_kill(
    client: hms_mgmt.Management, processes: Processes, vhost: str, store_url: str, tmp_path: Path
) -> None:
    """200 workflows, the type paused half-way through starting them: each ends paused or
    finished, nothing published for the paused ones (the step service notes every run), the
    pause survives kill -9, and the type's resume completes them all."""
    engine = processes.engine(vhost, store_url)
    processes.worker(vhost, "tests.services:grant")
    note = str(tmp_path / "runs.txt")

    def ran() -> set[str]:
        return set(Path(note).read_text().splitlines()) if Path(note).exists() else set()

    async def start(count: int) -> list[str]:
        started = await asyncio.gather(
            *(client.start("noted", {"note": note, "seconds": 0.05}) for _ in range(count))
        )
        return [s.workflow_id for s in started]

    ids = await start(100)
    paused = await client.pause_type("noted", reason="bureau down")
    assert paused["paused"] is True
    ids += await start(100)

    async def settled() -> list[dict[str, Any]] | None:
        found = await client.list(name="noted", limit=1000)
        done = all(w["status"] in ("paused", "succeeded") for w in found)
        return found if len(found) == len(ids) and done else None

    listed = await wait_until(settled, timeout=90, what="every workflow paused or finished")
    held = {w["workflow_id"] for w in listed if w["status"] == "paused"}
    assert len(held) >= 100  # at least those started after the pause
    for workflow_id in held:
        state = await _state(client, workflow_id)
        assert state.paused is not None and state.paused["type"] == ["noted", ""]
        run = state.steps[-1]
        assert run.seq == state.paused["held"] and run.started_at is None
        assert f"{workflow_id} {run.step} 1" not in ran()  # never published

    engine.kill()
    assert await asyncio.to_thread(engine.wait, 10) == -9
    processes.engine(vhost, store_url)
    later = await start(5)  # the type pause was kept in the store: these are held too
    canary = (await client.start("grantApproval", {"application_id": "C-1"})).workflow_id
    assert (await client.wait(canary, timeout=60)).status == "succeeded"
    for workflow_id in later:
        assert (await _state(client, workflow_id)).status == "paused"
        assert not any(line.startswith(workflow_id) for line in ran())

    resumed = await client.resume_type("noted")
    assert resumed["released"] == len(held) + len(later)
    for workflow_id in ids + later:
        state = await client.wait(workflow_id, timeout=90)
        assert state.status == "succeeded", state.describe()
        assert {f"{workflow_id} first 1", f"{workflow_id} second 1"} <= ran()
    assert "Traceback" not in processes.log("engine")
