"""Compensation (sagas) with the engine daemon and a step service as separate processes, on
the real RabbitMQ: the compensations run newest first, once each, counted in the worker."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

import hms_mgmt
from bus_adapters.rabbitmq import RabbitMQBus
from tests.conftest import Processes, hms, wait_until

pytestmark = pytest.mark.broker

UNDO = [
    ("cancelInspection", "bookInspection"),
    ("releaseFunds", "reserveFunds"),
    ("releaseHold", "creditHold"),
]


def notes(path: Path, workflow_id: str) -> list[list[str]]:
    """The worker's lines for one workflow (without its id)."""
    if not path.exists():
        return []
    return [
        line.split()[1:] for line in path.read_text().splitlines() if line.startswith(workflow_id)
    ]


def undone(path: Path, workflow_id: str) -> list[tuple[str, str]]:
    """(compensation, step it undid) of each compensation run the worker saw, in order."""
    return [(line[0], line[1]) for line in notes(path, workflow_id) if len(line) == 4]


async def test_a_saga_whose_fourth_step_fails_compensates_three_steps_newest_first_once(
    client: hms_mgmt.Management, daemons: Processes, tmp_path: Path, vhost: str
) -> None:
    note = tmp_path / "saga.log"
    started = await asyncio.gather(
        *(client.start("saga", {"note": str(note), "fail": "payout"}) for _ in range(5))
    )
    states = await asyncio.gather(*(client.wait(s.workflow_id, timeout=60) for s in started))
    for state in states:
        assert state.status == "compensated", state.describe()
        assert state.error is not None and state.error["step"] == "payout"  # why it compensated
        lines = notes(note, state.workflow_id)
        assert [line[0] for line in lines] == [
            "creditHold",
            "reserveFunds",
            "bookInspection",
            "payout",
            "payout",  # its retry policy: two attempts, then it gave up
            "cancelInspection",
            "releaseFunds",
            "releaseHold",
        ]
        assert undone(note, state.workflow_id) == UNDO  # once each, newest first
        compensations = [line for line in lines if len(line) == 4]
        assert [line[2] for line in compensations] == [  # each got its step's output
            "bookInspection-done",
            "reserveFunds-done",
            "creditHold-done",
        ]
        assert len({line[3] for line in compensations}) == 3  # its own idempotency key each
        runs = [(s.step, s.status) for s in state.steps]  # status() shows the compensations
        assert runs[-3:] == [(step, "succeeded") for step, _ in UNDO]
        assert [s.output for s in state.steps[-3:]] == [{"undone": step} for _, step in UNDO]
    bus = RabbitMQBus(vhost, name="saga-dlq")
    await bus.connect()
    try:  # each given-up payout run went into its .dlq, as any exhausted step does

        async def all_five() -> bool:  # quorum queues' counts lag a few seconds
            return await bus.queue_length("saga.payout.dlq") == 5

        await wait_until(all_five, timeout=15, what="five payout dead letters")
    finally:
        await bus.close()
    assert "Traceback" not in daemons.log("engine")


async def test_cancel_with_compensate_undoes_what_succeeded(
    client: hms_mgmt.Management, daemons: Processes, tmp_path: Path
) -> None:
    note = tmp_path / "saga.log"
    started = await client.start("saga", {"note": str(note), "seconds": 0.5})
    workflow_id = started.workflow_id
    await wait_until(
        lambda: (
            [line[0] for line in notes(note, workflow_id)][:3]
            == ["creditHold", "reserveFunds", "bookInspection"]
        ),
        timeout=30,
        what="three steps started",
    )
    answer = await client.cancel(workflow_id, "applicant withdrew", compensate=True)
    assert answer["status"] in ("compensating", "cancelled")
    state = await client.wait(workflow_id, timeout=30)
    assert state.status == "compensated", state.describe()
    assert state.error == {"type": "Cancelled", "message": "applicant withdrew"}
    # bookInspection was out at the cancel: let finish, and undone too
    assert undone(note, workflow_id) == UNDO
    assert "payout" not in [line[0] for line in notes(note, workflow_id)]


async def test_a_compensation_that_gives_up_fails_and_retry_resumes_the_chain_there(
    client: hms_mgmt.Management, daemons: Processes, tmp_path: Path
) -> None:
    note, block = tmp_path / "saga.log", tmp_path / "bank-down"
    block.touch()
    payload = {"note": str(note), "fail": "payout", "block": str(block)}
    workflow_id = (await client.start("saga", payload)).workflow_id
    state = await client.wait(workflow_id, timeout=60)
    assert state.status == "failed", state.describe()
    error = state.error or {}
    assert error["reason"] == "compensation_failed"
    assert error["step"] == "releaseFunds"
    assert error["compensation"]["compensated_step"] == "reserveFunds"
    assert error["original"]["step"] == "payout"
    block.unlink()
    await client.retry(workflow_id)
    state = await client.wait(workflow_id, timeout=60)
    assert state.status == "compensated", state.describe()
    assert undone(note, workflow_id) == [
        UNDO[0],
        UNDO[1],  # two attempts, gave up
        UNDO[1],
        UNDO[1],  # retried: it succeeds
        UNDO[2],
    ]
    keys = {line[3] for line in notes(note, workflow_id) if line[:1] == ["releaseFunds"]}
    assert len(keys) == 1  # the same idempotency key before and after the retry


async def test_the_cli_and_the_api_cancel_with_compensate_and_show_the_chain(
    client: hms_mgmt.Management, daemons: Processes, tmp_path: Path
) -> None:
    env = {"HMS_ENGINE_URL": str(daemons.engine_url)}
    note = tmp_path / "saga.log"
    workflow_id = (await client.start("saga", {"note": str(note), "seconds": 2})).workflow_id
    await wait_until(
        lambda: len(notes(note, workflow_id)) >= 2, timeout=30, what="two steps started"
    )
    refused = await post(
        f"{daemons.engine_url}/api/workflows/{workflow_id}/cancel", {"compensate": "yes"}
    )
    assert refused[0] == 400 and "compensate must be true or false" in refused[1]
    done = await hms("workflow", "cancel", workflow_id, "--compensate", "-o", "json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] in ("compensating", "cancelled")
    state = await client.wait(workflow_id, timeout=30)
    assert state.status == "compensated", state.describe()
    assert state.steps[-1].undoes == {"step": "creditHold", "seq": 1}
    assert "releaseHold (undoes creditHold #1)" in state.describe()
    shown = await hms("workflow", "show", workflow_id, env=env)
    assert shown.returncode == 0, shown.stderr
    assert "compensated" in shown.stdout and "releaseHold (undoes creditHold #1)" in shown.stdout
    listed = await hms("workflow", "list", "--status", "compensated", "-o", "json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert workflow_id in listed.stdout


async def post(url: str, body: dict[str, object]) -> tuple[int, str]:
    """Status and body of a JSON POST, off the event loop."""
    import urllib.error
    import urllib.request

    def send() -> tuple[int, str]:
        request = urllib.request.Request(
            url, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    return await asyncio.to_thread(send)


async def test_replaying_a_failed_compensations_dead_letter_resumes_the_chain(
    client: hms_mgmt.Management, daemons: Processes, tmp_path: Path
) -> None:
    env = {"HMS_ENGINE_URL": str(daemons.engine_url)}
    note, block = tmp_path / "saga.log", tmp_path / "bank-down"
    block.touch()
    payload = {"note": str(note), "fail": "payout", "block": str(block)}
    workflow_id = (await client.start("saga", payload)).workflow_id
    state = await client.wait(workflow_id, timeout=60)
    assert (state.error or {}).get("reason") == "compensation_failed", state.describe()
    listed = await hms("dlq", "list", "saga.releaseFunds", "-o", "json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "compensation_failed: attempts exhausted" in listed.stdout
    block.unlink()
    replayed = await hms("dlq", "replay", "saga.releaseFunds", "--all", env=env)
    assert replayed.returncode == 0, replayed.stderr
    assert "resumed" in replayed.stdout
    state = await client.wait(workflow_id, timeout=60)
    assert state.status == "compensated", state.describe()
    assert undone(note, workflow_id)[-2:] == [UNDO[1], UNDO[2]]  # from releaseFunds on
