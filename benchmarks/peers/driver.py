"""Benchmark driver: runs inside a peer's virtualenv, started by ``run_peer.py``.

It imports the peer module (``peer_celery``, ``peer_dramatiq`` or ``peer_taskiq``), starts workflows
through its ``Client`` and waits for the completion signal in Redis (see ``common.py``):

1. warm-up: a few sequential workflows (the first one also waits for the worker to come up);
2. throughput: ``--runs`` times, N workflows started back to back, wall time from just before the
   first start until the N-th completion; worker-tree and broker CPU measured over the same span;
3. lone latency: ``--lone`` sequential workflows after a few warm-up ones, each timed from just
   before its start call until the driver sees its completion.

Writes a JSON result to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import json
import time
import uuid
from typing import Any, Protocol

import redis.asyncio
from common import (
    STEPS,
    Payload,
    find_broker_pid,
    make_payload,
    median,
    payload_size,
    percentile,
    redis_url,
    tree_cpu_seconds,
)

KEY_TTL_S = 3600


class Client(Protocol):
    async def open(self) -> None: ...
    async def start(self, payload: Payload) -> None: ...
    async def close(self) -> None: ...


class Driver:
    def __init__(self, client: Client, rds: redis.asyncio.Redis, args: argparse.Namespace) -> None:
        self.client = client
        self.rds = rds
        self.args = args
        self.prefix = f"hb:{uuid.uuid4().hex[:8]}"
        self.keys: list[str] = []
        self.broker_pid = find_broker_pid()

    async def keys_for(self, label: str) -> tuple[str, str]:
        """(counter, done-list) keys for one run; the counter expires even if we are killed."""
        counter, done = f"{self.prefix}:{label}:n", f"{self.prefix}:{label}:d"
        self.keys += [counter, done]
        await self.rds.set(counter, 0, ex=KEY_TTL_S)
        return counter, done

    async def wait_done(self, done: str, wait_s: float, what: str, counter: str) -> None:
        if await self.rds.blpop([done], timeout=wait_s) is None:
            seen = await self.rds.get(counter)
            raise TimeoutError(f"{what}: no completion within {wait_s:.0f}s (counter={seen!r})")

    async def sequential(self, count: int, label: str, first_timeout: float) -> list[float]:
        """Run ``count`` workflows one after another; return each one's latency in ms."""
        counter, done = await self.keys_for(label)
        latencies: list[float] = []
        for i in range(count):
            payload = make_payload(f"{label}-{i}", counter, i + 1, done)
            t0 = time.perf_counter()
            await self.client.start(payload)
            wait_s = first_timeout if i == 0 else self.args.timeout
            await self.wait_done(done, wait_s, f"{label} workflow {i}", counter)
            latencies.append((time.perf_counter() - t0) * 1000)
        return latencies

    def cpu(self) -> tuple[float, float | None]:
        broker = tree_cpu_seconds(self.broker_pid) if self.broker_pid else None
        return tree_cpu_seconds(self.args.worker_pid), broker

    async def throughput_run(self, run: int) -> dict[str, Any]:
        n = self.args.n
        counter, done = await self.keys_for(f"t{run}")
        payloads = [make_payload(f"t{run}-{i}", counter, n, done) for i in range(n)]
        await asyncio.sleep(0.5)  # let the previous run's trailing acks settle
        worker_cpu0, broker_cpu0 = self.cpu()
        driver_cpu0 = time.process_time()
        t0 = time.perf_counter()
        for payload in payloads:
            await self.client.start(payload)
        t_started = time.perf_counter()
        await self.wait_done(done, self.args.timeout, f"throughput run {run}", counter)
        wall = time.perf_counter() - t0
        driver_cpu = time.process_time() - driver_cpu0
        worker_cpu1, broker_cpu1 = self.cpu()
        result: dict[str, Any] = {
            "wall_s": round(wall, 4),
            "wps": round(n / wall, 1),
            "steps_per_s": round(len(STEPS) * n / wall, 1),
            "start_s": round(t_started - t0, 4),
            "worker_cpu_ms_per_workflow": round((worker_cpu1 - worker_cpu0) * 1000 / n, 3),
            "broker_cpu_ms_per_workflow": (
                round((broker_cpu1 - broker_cpu0) * 1000 / n, 3)
                if broker_cpu0 is not None and broker_cpu1 is not None
                else None
            ),
            "driver_cpu_ms_per_workflow": round(driver_cpu * 1000 / n, 3),
        }
        print(
            f"  run {run}: {n} workflows in {wall:.2f}s"
            f" (all started after {result['start_s']:.2f}s)"
            f" -> {result['wps']:.0f} wf/s, {result['steps_per_s']:.0f} steps/s;"
            f" worker CPU {result['worker_cpu_ms_per_workflow']:.2f} ms/wf,"
            f" broker CPU {result['broker_cpu_ms_per_workflow']} ms/wf",
            flush=True,
        )
        return result

    async def cleanup(self) -> None:
        if self.keys:
            await self.rds.delete(*self.keys)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    module = importlib.import_module(args.peer)
    client: Client = module.Client()
    rds = redis.asyncio.Redis.from_url(redis_url())
    driver = Driver(client, rds, args)
    await client.open()
    try:
        # The first warm-up workflow also waits for the worker to come up.
        await driver.sequential(args.warmup, "warm", first_timeout=args.startup_timeout)
        runs = [await driver.throughput_run(run) for run in range(1, args.runs + 1)]
        lone: list[float] = []
        if args.lone:
            await driver.sequential(args.warmup, "lonewarm", first_timeout=args.timeout)
            lone = await driver.sequential(args.lone, "lone", first_timeout=args.timeout)
            print(
                f"  lone: {len(lone)} workflows, median {median(lone):.2f} ms,"
                f" p99 {percentile(lone, 99):.2f} ms",
                flush=True,
            )
    finally:
        await driver.cleanup()
        await client.close()
        await rds.aclose()
    wps = [r["wps"] for r in runs]
    cpu = [r["worker_cpu_ms_per_workflow"] for r in runs]
    broker_cpu = [r["broker_cpu_ms_per_workflow"] for r in runs]
    versions = {}
    for package in args.packages:
        versions[package] = importlib.metadata.version(package)
    return {
        "n": args.n,
        "runs": runs,
        "runs_wps": wps,
        "wps_median": round(median(wps), 1),
        "steps_per_s_median": round(len(STEPS) * median(wps), 1),
        "lone_n": len(lone),
        "lone_ms_median": round(median(lone), 3) if lone else None,
        "lone_ms_p99": round(percentile(lone, 99), 3) if lone else None,
        "cpu_ms_per_workflow": round(median(cpu), 3),
        "broker_cpu_ms_per_workflow": (
            round(median([c for c in broker_cpu if c is not None]), 3)
            if all(c is not None for c in broker_cpu)
            else None
        ),
        "payload_bytes": payload_size(
            make_payload(
                f"t1-{args.n - 1}", f"{driver.prefix}:t1:n", args.n, f"{driver.prefix}:t1:d"
            )
        ),
        "versions": versions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("peer", help="peer module, e.g. peer_celery")
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--runs", type=int, required=True)
    parser.add_argument("--lone", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--worker-pid", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    parser.add_argument("--packages", nargs="*", default=[])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
