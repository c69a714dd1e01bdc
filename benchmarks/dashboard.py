"""The dashboard's reads with many workflows in the store (issue 16's scale target).

``python benchmarks/dashboard.py --workflows 100000 --requests 200 [--json out.json]``
(from the repository root, with the project's virtualenv). Seeds a SQLite store with N
grant workflows (each with a business key ``application_id``, a step run and its history;
95% succeeded, 4% failed, 1% running), starts the engine on it (on the in-memory bus: no
broker needed, the reads are the store's) with its HTTP API, and times, over HTTP from the
same process, each request the dashboard's pages make: the list page (newest 50), a status
filter, a page deep in the table by keyset, a search by business key, one workflow, the
counts and the page itself. Prints p50/p95/max in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bus_adapters import open_bus  # noqa: E402
from hms_mgmt import machine  # noqa: E402
from hms_mgmt.definitions import WorkflowDefinition  # noqa: E402
from hms_mgmt.engine.api import EngineApi  # noqa: E402
from hms_mgmt.engine.engine import Engine  # noqa: E402
from hms_mgmt.httpserver import start_server  # noqa: E402
from hms_mgmt.metrics import EngineMetrics  # noqa: E402
from hms_mgmt.records import StepStatus, WorkflowStatus  # noqa: E402
from hms_mgmt.store import open_store  # noqa: E402
from hms_mgmt.store.base import Batch  # noqa: E402

DEFINITION = WorkflowDefinition.build(
    "grantApproval", ["validateApp", "creditCheck", "scheduleInspection", "finalize"]
).with_version(1)


def one(i: int, now: float) -> Batch:
    workflow_id = f"{int(now * 1000):012x}{i:08x}"
    t = machine.start(
        DEFINITION,
        workflow_id,
        {"application_id": f"A-{i}", "applicant": f"Applicant {i}", "amount": 1000 + i},
        now,
        attributes={"application_id": f"A-{i}"},
    )
    assert t.workflow is not None
    workflow, runs = t.workflow, list(t.runs)
    fate = i % 100
    if fate < 99:
        status = WorkflowStatus.SUCCEEDED if fate < 95 else WorkflowStatus.FAILED
        step = StepStatus.SUCCEEDED if fate < 95 else StepStatus.FAILED
        error = None if fate < 95 else {"type": "RuntimeError", "message": "credit bureau down"}
        runs = [
            dataclasses.replace(r, status=step, started_at=now, finished_at=now + 0.01, error=error)
            for r in runs
        ]
        workflow = dataclasses.replace(workflow, status=status, updated_at=now + 0.01, error=error)
    return Batch(
        workflows={workflow_id: workflow},
        attributes={(workflow_id, k): v for k, v in t.attributes.items()},
        runs={(r.workflow_id, r.seq): r for r in runs},
        history=[(workflow_id, now, kind, detail) for kind, detail in t.history],
    )


async def seed(store_url: str, count: int) -> list[str]:
    store = open_store(store_url)
    await store.open()
    ids: list[str] = []
    began, now = time.perf_counter(), time.time() - count * 0.01
    try:
        for start in range(0, count, 1000):
            batch = Batch()
            for i in range(start, min(count, start + 1000)):
                part = one(i, now + i * 0.01)
                batch.workflows.update(part.workflows)
                batch.attributes.update(part.attributes)
                batch.runs.update(part.runs)
                batch.history.extend(part.history)
            ids.extend(batch.workflows)
            await store.commit(batch)
    finally:
        await store.close()
    print(f"seeded {count} workflows in {time.perf_counter() - began:.1f} s", flush=True)
    return ids


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "p50_ms": round(statistics.median(ordered), 2),
        "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))], 2),
        "max_ms": round(ordered[-1], 2),
    }


async def measure(store_url: str, ids: list[str], requests: int) -> dict[str, Any]:
    engine = Engine(open_bus(f"memory://bench-{uuid.uuid4().hex[:8]}"), open_store(store_url))
    running = asyncio.ensure_future(engine.run())
    await asyncio.wait_for(engine.ready.wait(), 60)
    runner = await start_server(EngineApi(engine, EngineMetrics()).app(), "127.0.0.1", 0, name="b")
    port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
    url = f"http://127.0.0.1:{port}"
    results: dict[str, Any] = {}
    try:
        async with aiohttp.ClientSession() as http:

            async def get(path: str) -> Any:
                async with http.get(f"{url}{path}") as answer:
                    assert answer.status == 200, (path, answer.status, await answer.text())
                    body = await answer.read()
                    return json.loads(body) if path.startswith("/api") else body

            middle = (await get(f"/api/workflows/{ids[len(ids) // 2]}"))["created_at"]
            cursor = f"{middle!r},{ids[len(ids) // 2]}"
            cases = {
                "list page (newest 50)": lambda n: "/api/workflows?limit=50",
                "status filter (failed, 50)": lambda n: "/api/workflows?status=failed&limit=50",
                "keyset page half-way down": lambda n: f"/api/workflows?limit=50&before={cursor}",
                "search by business key": lambda n: (
                    f"/api/workflows?attr.application_id=A-{(n * 7919) % len(ids)}"
                ),
                "one workflow": lambda n: f"/api/workflows/{ids[(n * 7919) % len(ids)]}",
                "counts by status": lambda n: "/api/counts",
                "the page (HTML)": lambda n: "/workflows",
            }
            for name, path in cases.items():
                for n in range(5):  # warm
                    await get(path(n))
                times = []
                for n in range(requests):
                    began = time.perf_counter()
                    found = await get(path(n))
                    times.append((time.perf_counter() - began) * 1000)
                    if name == "search by business key":
                        assert len(found) == 1, found
                results[name] = summary(times)
                print(f"{name:30} {results[name]}", flush=True)
    finally:
        await runner.cleanup()
        engine.stop()
        await running
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workflows", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hms-dashboard-bench-") as folder:
        store_url = f"sqlite:///{Path(folder) / 'bench.db'}"
        ids = asyncio.run(seed(store_url, args.workflows))
        results = asyncio.run(measure(store_url, ids, args.requests))
    if args.json:
        args.json.write_text(
            json.dumps(
                {"workflows": args.workflows, "requests": args.requests, **results}, indent=2
            )
        )


if __name__ == "__main__":
    main()
