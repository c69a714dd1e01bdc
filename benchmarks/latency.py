"""Where a lone workflow's time goes, hop by hop, from the engine's own records.

``python benchmarks/latency.py --count 200 [--json out.json]`` (from the repository root,
with the project's virtualenv). Runs lone grant workflows one at a time through the engine
daemon and one step service (``execute``: start and wait in one request; ``--start-wait``
for two requests), then reads the
store: a step run's ``created_at`` is the engine's clock when it decided the run (its batch
then commits and publishes), ``started_at``/``finished_at`` are the worker's clock around
the handler, and the workflow's ``updated_at`` is the batch that finished it. All clocks
are this machine's, so the differences are the hops:

- request: the client's call until the engine's batch that starts the workflow;
- to worker: the engine's decision until the handler starts (commit, outbox publish with
  confirm, the step queue, the worker's intake);
- handler: the handler itself (trivial here);
- to engine: the handler's end until the engine's batch that applies the outcome (the
  worker's outcome publish, the results queue, the engine's intake);
- reply: the finishing batch until ``execute`` returns (commit, reply, the client's intake).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hms_mgmt  # noqa: E402
from benchmarks.grant_service import payload, service  # noqa: E402
from benchmarks.hms import Daemons, fresh_vhost, percentile, with_daemons  # noqa: E402

HOPS = ("request", "to worker", "handler", "to engine", "reply", "total")


def hops_of(daemons: Daemons, workflow_id: str, called: float, returned: float) -> dict[str, Any]:
    (created, finished), *_ = daemons.query(
        "SELECT created_at, updated_at FROM workflows WHERE id = ?", (workflow_id,)
    )
    runs = daemons.query(
        "SELECT created_at, started_at, finished_at FROM step_runs WHERE workflow_id = ? "
        "ORDER BY seq",
        (workflow_id,),
    )
    to_worker, handler, to_engine = [], [], []
    for index, (decided, started, ended) in enumerate(runs):
        applied = runs[index + 1][0] if index + 1 < len(runs) else finished
        to_worker.append(started - decided)
        handler.append(ended - started)
        to_engine.append(applied - ended)
    return {
        "request": created - called,
        "to worker": to_worker,
        "handler": handler,
        "to engine": to_engine,
        "reply": returned - finished,
        "total": returned - called,
    }


async def measure(url: str, daemons: Daemons, count: int, by_execute: bool) -> list[dict[str, Any]]:
    samples = []
    async with hms_mgmt.init("bench-latency", url, request_timeout=60) as client:
        client.definitions.update(service.definitions)
        for i in range(count + 20):  # the first 20 warm up every connection and queue
            called = time.time()
            if by_execute:
                state = await client.execute("grantApproval", payload(i), timeout=30)
            else:
                started = await client.start("grantApproval", payload(i))
                state = await client.wait(started.workflow_id, timeout=30)
            returned = time.time()
            assert state.status == "succeeded", state.describe()
            if i >= 20:
                samples.append(hops_of(daemons, state.workflow_id, called, returned))
    return samples


def summarise(samples: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median and p99 per hop, in ms; the per-step hops also summed over the 4 steps."""
    table = {}
    for hop in HOPS:
        values = [s[hop] for s in samples]
        per_workflow = [sum(v) if isinstance(v, list) else v for v in values]
        row = {
            "median_ms": round(statistics.median(per_workflow) * 1000, 2),
            "p99_ms": round(percentile(per_workflow, 0.99) * 1000, 2),
        }
        if isinstance(values[0], list):
            each = [x for v in values for x in v]
            row["per_step_median_ms"] = round(statistics.median(each) * 1000, 2)
        table[hop] = row
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--start-wait", action="store_true", help="start, then wait (two requests), not execute"
    )
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the daemons")
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    with fresh_vhost("hms-latency") as url:
        samples = with_daemons(
            url,
            "hms-latency-",
            env,
            lambda daemons: measure(url, daemons, args.count, not args.start_wait),
        )
    table = summarise(samples)
    how = "start + wait" if args.start_wait else "execute()"
    print(f"lone 4-step workflow, {args.count} by {how}, ms:")
    print("| hop | per workflow, median | p99 | per step, median |")
    print("| --- | --- | --- | --- |")
    for hop, row in table.items():
        step = row.get("per_step_median_ms")
        print(f"| {hop} | {row['median_ms']} | {row['p99_ms']} | {'' if step is None else step} |")
    if args.json:
        args.json.write_text(json.dumps({"count": args.count, "by": how, "hops": table}, indent=2))


if __name__ == "__main__":
    main()
