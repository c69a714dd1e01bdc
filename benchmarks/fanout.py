"""A 10-way fan-out workflow's throughput in steps/s next to the linear grant workflow's.

``python benchmarks/fanout.py --n 300 --runs 3`` (from the repository root, with the
project's virtualenv). One engine daemon and one step-service process on a fresh vhost
and a SQLite store; each run starts N linear workflows (4 steps each), waits until they
have all succeeded, then N fan-out workflows (``split``, a map of 10 ``check`` branches,
``join``: 12 steps each), the same way. Steps/s counts every step run that succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hms_mgmt  # noqa: E402
from benchmarks.grant_service import FANOUT_WIDTH, STEPS, payload, service  # noqa: E402
from benchmarks.hms import Daemons, fresh_vhost, with_daemons  # noqa: E402

SHAPES = {"grantApproval": len(STEPS), "fanned": FANOUT_WIDTH + 2}


async def one(client: hms_mgmt.Management, daemons: Daemons, workflow: str, n: int) -> float:
    """Steps/s for ``n`` workflows of ``workflow`` started at once."""
    target = await daemons.count_succeeded() + n
    began = time.perf_counter()
    await asyncio.gather(*(client.start(workflow, payload(i)) for i in range(n)))
    while await daemons.count_succeeded() < target:  # noqa: ASYNC110 - polls the store
        await asyncio.sleep(0.01)
    return n * SHAPES[workflow] / (time.perf_counter() - began)


async def measure(args: argparse.Namespace, url: str, daemons: Daemons) -> dict[str, Any]:
    try:
        async with hms_mgmt.init(
            service_name="bench-client", broker_url=url, request_timeout=600
        ) as client:
            client.definitions.update(service.definitions)
            for workflow in SHAPES:  # warm up: the store, every connection and queue in place
                for i in range(5):
                    started = await client.start(workflow, payload(i))
                    state = await client.wait(started.workflow_id, timeout=60)
                    assert state.status == "succeeded", state.describe()
            figures: dict[str, list[float]] = {workflow: [] for workflow in SHAPES}
            for number in range(args.runs):
                for workflow in SHAPES:
                    rate = await one(client, daemons, workflow, args.n)
                    figures[workflow].append(round(rate, 1))
                    print(f"run {number + 1} {workflow}: {rate:.0f} steps/s", flush=True)
    finally:
        await daemons.close()
    return {
        "n": args.n,
        "steps_per_workflow": SHAPES,
        "steps_per_s": figures,
        "steps_per_s_median": {w: statistics.median(v) for w, v in figures.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with fresh_vhost("hms-fanout-bench") as url:
        result = with_daemons(url, "hms-fanout-", {}, lambda d: measure(args, url, d))
    medians = result["steps_per_s_median"]
    print(
        f"linear: {medians['grantApproval']:.0f} steps/s median; "
        f"10-way fan-out: {medians['fanned']:.0f} steps/s median"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
