"""Child workflows on the real RabbitMQ: the engine daemon and a step service as processes.

The step service notes each run of a child's step in a file, so a test counts what ran.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import hms_mgmt
from tests.conftest import Processes, hms, http_get, wait_until

pytestmark = pytest.mark.broker


def runs(note: Path, workflow_id: str, step: str) -> int:
    """How many times the step service ran ``step`` of ``workflow_id``."""
    if not note.exists():
        return 0
    return sum(
        1 for line in note.read_text().splitlines() if line.split()[:2] == [workflow_id, step]
    )


async def test_a_failed_child_is_retried_through_its_parent_without_rerunning_its_steps(
    client: hms_mgmt.Management, daemons: Processes, tmp_path: Path
) -> None:
    note, unlock = tmp_path / "runs.txt", tmp_path / "unlock"
    started = await client.start(
        "withChildren", {"note": str(note), "unlock": str(unlock), "children": 2}
    )
    parent = started.workflow_id
    failed = await client.wait(parent, timeout=30)
    assert failed.status == "failed", failed.describe()
    assert failed.error is not None and failed.error["type"] == "ChildFailed"
    child = failed.error["child"]
    assert child in (f"{parent}.review.1.0", f"{parent}.review.1.1")
    assert "the inspector's report was rejected" in failed.error["message"]
    assert [s.step for s in failed.steps] == ["open", "review"]  # its step was not retried
    sibling = await client.wait(
        next(c["workflow_id"] for c in failed.children if c["workflow_id"] != child), timeout=30
    )
    assert sibling.status == "failed"  # both report steps fail until unlocked
    for child_id in (child, sibling.workflow_id):
        assert runs(note, child_id, "visit") == 1 and runs(note, child_id, "report") == 2

    unlock.touch()
    await client.retry(parent)
    done = await client.wait(parent, timeout=30)
    assert done.status == "succeeded", done.describe()
    ids = [f"{parent}.review.1.{i}" for i in range(2)]
    assert done.output == {"reports": [{"site": i, "passed": True} for i in range(2)]}
    assert [c["workflow_id"] for c in done.children] == ids
    assert {c["status"] for c in done.children} == {"succeeded"}
    for child_id in ids:
        assert runs(note, child_id, "visit") == 1  # not run again: the child was resumed
        assert runs(note, child_id, "report") == 3  # two failed attempts, then the retry's
        resumed = await client.status(child_id)
        assert resumed.parent is not None and resumed.parent["id"] == parent
        assert [(s.step, s.status) for s in resumed.steps] == [
            ("visit", "succeeded"),
            ("report", "failed"),
            ("report", "failed"),
            ("report", "succeeded"),
        ]
    assert [s.step for s in done.steps] == ["open", "review", "close"]
    status, body = await http_get(f"{daemons.engine_url}/api/workflows/{parent}")
    assert status == 200, body
    shown = json.loads(body)
    assert [(c["workflow_id"], c["status"]) for c in shown["children"]] == [
        (child_id, "succeeded") for child_id in ids
    ]
    status, body = await http_get(f"{daemons.engine_url}/api/workflows/{ids[0]}")
    assert json.loads(body)["parent"]["id"] == parent
    shown_by_cli = await hms("workflow", "show", parent, env={"HMS_ENGINE_URL": daemons.engine_url})
    assert f"{ids[0]} succeeded, {ids[1]} succeeded" in shown_by_cli.stdout


async def test_cancelling_a_parent_cancels_its_children_but_not_the_abandoned(
    client: hms_mgmt.Management, daemons: Processes, tmp_path: Path
) -> None:
    note, release, unlock = tmp_path / "runs.txt", tmp_path / "release", tmp_path / "unlock"
    payload = {
        "note": str(note),
        "hold": str(release),
        "unlock": str(unlock),
        "children": 3,
        "abandon": [2],
    }
    started = await client.start("withChildren", payload)
    parent = started.workflow_id
    ids = [f"{parent}.review.1.{i}" for i in range(3)]

    async def visiting() -> bool:
        return all(runs(note, child, "visit") == 1 for child in ids)

    await wait_until(visiting, timeout=30, what="the three children to be visiting")
    waiting = await client.status(parent)
    assert waiting.status == "waiting" and waiting.waiting_for is not None
    assert waiting.waiting_for["children"] == ids
    assert {c["status"] for c in waiting.children} <= {"pending", "running"}
    await client.cancel(parent, reason="application withdrawn")
    cancelled = await client.wait(parent, timeout=10)
    assert cancelled.status == "cancelled"
    for child in ids[:2]:
        state = await client.wait(child, timeout=10)
        assert state.status == "cancelled"
        assert state.error is not None and f"parent {parent} cancelled" in state.error["message"]
    assert not (await client.status(ids[2])).terminal  # abandoned: it runs on
    release.touch()
    unlock.touch()
    left = await client.wait(ids[2], timeout=30)
    assert left.status == "succeeded" and left.output == {"site": 2, "passed": True}
    after = await client.status(parent)
    assert after.status == "cancelled" and [s.step for s in after.steps] == ["open", "review"]
    for child in ids[:2]:  # a cancelled child's late outcome changed nothing
        assert [s.step for s in (await client.status(child)).steps] == ["visit"]
        assert runs(note, child, "report") == 0
