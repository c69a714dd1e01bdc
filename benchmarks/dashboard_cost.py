"""What an open dashboard costs the engine, in the engine's own CPU time: a measurement that
does not depend on how busy the machine is, unlike a throughput A/B.

``python benchmarks/dashboard_cost.py [--n 2000] [--refreshes 40] [--json out.json]`` (from
the repository root, with the project's virtualenv). Against an engine daemon and a step
service on a vhost of their own:

1. a run of N workflows at once, for the engine's CPU per workflow at full load, and a
   store to read (the page lists the newest 50 and counts by status);
2. the engine idle for a while, for its idle CPU per second;
3. the page's refreshes as a dashboard makes them, each an ``/api/counts`` (counted afresh:
   the refreshes are spaced past its one-second cache) and an ``/api/workflows?limit=50``,
   for the engine's CPU per refresh (less its idle CPU over the same time);
4. in this process, the change notices' per-batch work (:meth:`Changes.on_batch` with a
   listener), for its cost per workflow.

A dashboard refreshes at most twice a second (one notice per half second at most, and the
counts once a second), so at full load it costs the engine at most ``2 x per refresh`` of
CPU a second, plus the notices' work per workflow; both are given as a share of the
engine's own CPU at full load.
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
from benchmarks.grant_service import service  # noqa: E402
from benchmarks.hms import (  # noqa: E402
    Daemons,
    cpu_seconds,
    free_port,
    fresh_vhost,
    lone,
    one_run,
    with_daemons,
)
from hms_mgmt.engine.changes import Changes  # noqa: E402
from hms_mgmt.records import Workflow, WorkflowStatus  # noqa: E402
from hms_mgmt.store.base import Batch  # noqa: E402

REFRESHES_A_SECOND = 2.0  # Changes' rate: one notice per half second at most
IDLE_SECONDS = 10.0


async def refresh(http: Any, url: str) -> None:
    """What the page reads after a notice."""
    for path in ("/api/counts", "/api/workflows?limit=50"):
        async with http.get(f"{url}{path}") as answer:
            answer.raise_for_status()
            await answer.read()


async def engine_cost(
    args: argparse.Namespace, url: str, api: str, daemons: Daemons
) -> dict[str, Any]:
    import aiohttp

    pid = daemons.engine.pid
    async with hms_mgmt.init(
        service_name="bench-client", broker_url=url, request_timeout=600
    ) as client:
        client.definitions.update(service.definitions)
        await lone(client, 20)  # warm up
        run = await one_run(client, daemons, args.n, offset=0)
    per_workflow_ms = run["cpu_ms_per_workflow"]["engine"]
    full_load_cpu = run["wps"] * per_workflow_ms / 1000  # engine CPU seconds per second
    await asyncio.sleep(1.0)  # the run's tail (relay, retention) done

    began, cpu = time.perf_counter(), cpu_seconds(pid)
    await asyncio.sleep(IDLE_SECONDS)
    idle_rate = (cpu_seconds(pid) - cpu) / (time.perf_counter() - began)

    async with aiohttp.ClientSession() as http:
        await refresh(http, api)  # connected
        spaced: list[float] = []
        began, cpu = time.perf_counter(), cpu_seconds(pid)
        for _ in range(args.refreshes):
            await asyncio.sleep(1.05)  # past /api/counts' one-second cache: a fresh count
            asked = time.perf_counter()
            await refresh(http, api)
            spaced.append((time.perf_counter() - asked) * 1000)
        elapsed = time.perf_counter() - began
        used = cpu_seconds(pid) - cpu - idle_rate * elapsed
    per_refresh_ms = max(0.0, used) * 1000 / args.refreshes
    return {
        "n": args.n,
        "wps": run["wps"],
        "engine_cpu_ms_per_workflow": per_workflow_ms,
        "engine_cpu_s_per_s_at_full_load": round(full_load_cpu, 3),
        "engine_idle_cpu_s_per_s": round(idle_rate, 4),
        "refreshes": args.refreshes,
        "engine_cpu_ms_per_refresh": round(per_refresh_ms, 3),
        "refresh_wall_ms_median": round(statistics.median(spaced), 2),
    }


def notices_cost(batches: int = 20_000, size: int = 50) -> float:
    """Microseconds of :meth:`Changes.on_batch` per workflow, with one listener."""

    async def measure() -> float:
        changes = Changes()
        queue = changes.listen()
        now = time.time()
        made = [
            Batch(
                workflows={
                    f"wf-{b}-{i}": Workflow(
                        id=f"wf-{b}-{i}",
                        name="grantApproval",
                        version=1,
                        status=WorkflowStatus.RUNNING,
                        input={},
                        created_at=now,
                        updated_at=now,
                    )
                    for i in range(size)
                }
            )
            for b in range(200)
        ]
        began = time.perf_counter()
        for n in range(batches):
            changes.on_batch(made[n % len(made)])
            if n % 100 == 0:  # a notice goes out now and then, as its timer would send it
                changes._send()
                while not queue.empty():
                    queue.get_nowait()
        took = time.perf_counter() - began
        changes.close()
        return took * 1e6 / (batches * size)

    return asyncio.run(measure())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--refreshes", type=int, default=40)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    with fresh_vhost("hms-dash-cost") as url:
        result = with_daemons(
            url,
            "hms-dash-cost-",
            {"HMS_HTTP_PORT": str(port)},
            lambda daemons: engine_cost(args, url, api, daemons),
        )
    result["notices_us_per_workflow"] = round(notices_cost(), 3)
    refresh_share = (
        REFRESHES_A_SECOND
        * result["engine_cpu_ms_per_refresh"]
        / 1000
        / result["engine_cpu_s_per_s_at_full_load"]
    )
    notice_share = result["notices_us_per_workflow"] / 1000 / result["engine_cpu_ms_per_workflow"]
    result["share_of_engine_cpu_at_full_load"] = {
        "refreshes": round(refresh_share, 4),
        "notices": round(notice_share, 4),
        "total": round(refresh_share + notice_share, 4),
    }
    print(json.dumps(result, indent=2))
    print(
        f"an open dashboard: {result['engine_cpu_ms_per_refresh']:.2f} ms of engine CPU per "
        f"refresh (at most {REFRESHES_A_SECOND:.0f} a second), "
        f"{result['notices_us_per_workflow']:.2f} us per workflow for the notices; at full "
        f"load ({result['wps']:.0f} workflows/s, {result['engine_cpu_ms_per_workflow']:.2f} ms "
        f"of engine CPU each) that is {100 * (refresh_share + notice_share):.1f}% of the "
        "engine's CPU"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
