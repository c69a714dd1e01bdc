"""100,000 pending timers: what they cost the engine's memory, and how late timers fire.

``.venv/bin/python benchmarks/timers.py [--pending 100000] [--due 2000] [--json out.json]``

Starts ``--pending`` workflows scheduled a month ahead (durable timers in the store,
not in memory), then ``--due`` workflows whose start is spread over the next 5 to 20
seconds, and measures for those how long after its due time each first step started
(engine timer, publish, delivery). Reports the engine's resident memory before and
after the pending timers, and the lateness median and p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hms_mgmt  # noqa: E402
from benchmarks.grant_service import payload, service  # noqa: E402
from benchmarks.hms import Daemons, fresh_vhost, percentile, rss_mb, with_daemons  # noqa: E402


async def start_all(client: hms_mgmt.Management, count: int, run_at: list[float]) -> list[str]:
    ids: list[str] = []
    for chunk in range(0, count, 5000):
        started = await asyncio.gather(
            *(
                client.start("grantApproval", payload(n), run_at=run_at[n])
                for n in range(chunk, min(count, chunk + 5000))
            )
        )
        ids += [s.workflow_id for s in started]
    return ids


async def measure(args: argparse.Namespace, url: str, daemons: Daemons) -> dict[str, Any]:
    async with hms_mgmt.init(
        service_name="bench-timers", broker_url=url, request_timeout=600
    ) as client:
        client.definitions.update(service.definitions)
        warm = await client.start("grantApproval", payload(0))
        await client.wait(warm.workflow_id, timeout=30)
        rss_before = rss_mb(daemons.engine.pid)
        month = time.time() + 30 * 24 * 3600
        began = time.perf_counter()
        await start_all(client, args.pending, [month + n for n in range(args.pending)])
        pending_s = time.perf_counter() - began
        await asyncio.sleep(2)  # let the engine settle before reading its memory
        rss_pending = rss_mb(daemons.engine.pid)
        print(
            f"{args.pending} pending timers: engine RSS {rss_before:.1f} -> {rss_pending:.1f} MB "
            f"(started in {pending_s:.1f}s)",
            flush=True,
        )
        soon = time.time() + 5
        due_at = [soon + random.uniform(0, 15) for _ in range(args.due)]
        ids = await start_all(client, args.due, due_at)
        states = await asyncio.gather(*(client.wait(i, timeout=120) for i in ids))
        lateness = [
            (s.steps[0].started_at - s.steps[0].due_at) * 1000
            for s in states
            if s.steps[0].started_at is not None and s.steps[0].due_at is not None
        ]
        rss_after = rss_mb(daemons.engine.pid)
    # The engine's own part: from due to the step message's commit (the history's time).
    rows = await asyncio.to_thread(
        daemons.query,
        "SELECT h.at - r.due_at FROM step_runs r JOIN history h ON h.workflow_id = r.workflow_id "
        "AND h.kind = 'step_published' AND json_extract(h.detail, '$.seq') = r.seq "
        "WHERE r.seq = 1 AND r.due_at IS NOT NULL AND r.due_at < ?",
        (month,),
    )
    engine_late = [row[0] * 1000 for row in rows]
    result = {
        "pending_timers": args.pending,
        "engine_rss_mb_before": round(rss_before, 1),
        "engine_rss_mb_with_pending": round(rss_pending, 1),
        "engine_rss_mb_after_due_run": round(rss_after, 1),
        "due_timers": len(lateness),
        "late_ms_median": round(statistics.median(lateness), 2),
        "late_ms_p99": round(percentile(lateness, 0.99), 2),
        "late_ms_max": round(max(lateness), 2),
        "early": sum(1 for x in lateness if x < 0),
        "engine_late_ms_median": round(statistics.median(engine_late), 2),
        "engine_late_ms_p99": round(percentile(engine_late, 0.99), 2),
    }
    print(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pending", type=int, default=100_000)
    parser.add_argument("--due", type=int, default=1_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with fresh_vhost("hms-bench-timers") as url:
        result = with_daemons(
            url, "hms-bench-timers-", {}, lambda daemons: measure(args, url, daemons)
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
