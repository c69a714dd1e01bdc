"""Fan-out and join on the real RabbitMQ: the engine daemon and a step service as processes.

The branches note their idempotency keys, and ``score`` how many scores run at once, in
files under the test's directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import hms_mgmt
from tests.conftest import Processes

pytestmark = pytest.mark.broker


async def test_a_four_way_fan_out_joins_once_with_results_in_order(
    client: hms_mgmt.Management, daemons: Processes, tmp_path: Path
) -> None:
    started = await client.start("fanned", {"dir": str(tmp_path)})
    done = await client.wait(started.workflow_id, timeout=30)
    assert done.status == "succeeded", done.describe()
    assert done.output == {
        "results": [
            {"check": "creditCheck", "i": 0, "branch": 0},
            {"check": "backgroundCheck", "i": 1, "branch": 1},
            {"score": 4, "branch": 2},
            {"score": 6, "branch": 3},
        ],
        "errors": [],
    }
    steps = [s.step for s in done.steps]
    assert steps[0] == "split" and steps[-1] == "join" and steps.count("join") == 1
    assert sorted(steps[1:-1]) == ["backgroundCheck", "creditCheck", "score", "score"]
    assert done.branches is not None and done.branches["state"] == "joined"
    assert {b["status"] for b in done.branches["branches"]} == {"succeeded"}
    keys = (tmp_path / "keys").read_text().split()
    assert len(keys) == len(set(keys)) == 4  # each branch its own idempotency key


async def test_a_hundred_item_map_joins_once_never_more_than_max_concurrency_at_once(
    client: hms_mgmt.Management, daemons: Processes, tmp_path: Path
) -> None:
    started = await client.start(
        "fanned", {"dir": str(tmp_path), "items": 100, "max_concurrency": 5}
    )
    done = await client.wait(started.workflow_id, timeout=90)
    assert done.status == "succeeded", done.describe()
    assert done.output["results"] == [{"score": i * 2, "branch": i} for i in range(100)]
    assert done.output["errors"] == []
    assert [s.step for s in done.steps].count("join") == 1
    assert [s.step for s in done.steps].count("score") == 100
    counts = [int(n) for n in (tmp_path / "counts").read_text().split()]
    assert len(counts) == 100 and max(counts) <= 5
    assert max(counts) >= 2  # they did run at once
