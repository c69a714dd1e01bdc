"""HMS-MGMT on the grant-shaped workload: the engine daemon and one step-service process.

``python benchmarks/hms.py --n 2000 --runs 3 --lone 200 [--json out.json]`` (from the
repository root, with the project's virtualenv). Each run starts N workflows at once
through the client and stops the clock when the engine has recorded the last one as
succeeded (read from its store, so watching costs the engine nothing). The store is a
SQLite file in a temporary folder; ``--postgres postgresql://postgres@127.0.0.1:5432``
puts it in a fresh PostgreSQL database on that server instead (dropped afterwards), and
``--env HMS_STORE_URL=postgresql://...`` in a database of your own. Lone
latency is ``start`` then ``wait`` for one workflow at a time: the time until the
engine has recorded it succeeded and told the client.

``--dashboard`` gives the engine an HTTP port and alternates runs without and with a
dashboard open: a reader of ``/api/events`` that, like the page, reads ``/api/counts``
and ``/api/workflows?limit=50`` again after each notice (the A/B of issue 16).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hms_mgmt  # noqa: E402
from benchmarks.grant_service import STEPS, payload, service  # noqa: E402

T = TypeVar("T")

CLK_TCK = os.sysconf("SC_CLK_TCK")


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, text=True).stdout


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its reaped children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / CLK_TCK


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def broker_pid() -> int:
    return int(rabbitmqctl("eval", "os:getpid().").strip().strip('"'))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


@contextlib.contextmanager
def fresh_vhost(prefix: str) -> Iterator[str]:
    """A vhost of its own for one benchmark (guest may use it), deleted after: its URL."""
    vhost = f"{prefix}-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True)


def with_daemons(
    url: str,
    prefix: str,
    env: dict[str, str],
    measure: Callable[[Daemons], Coroutine[Any, Any, T]],
) -> T:
    """``measure`` run against an engine daemon and a step service on ``url``, in a folder of
    their own; their logs' tail printed if it fails; both stopped after."""
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        daemons = Daemons(url, Path(folder), env)
        try:
            return asyncio.run(measure(daemons))
        except BaseException:
            print(daemons.logs.read_text()[-4000:], file=sys.stderr)
            raise
        finally:
            daemons.stop()


class Daemons:
    def __init__(self, url: str, folder: Path, extra_env: dict[str, str]) -> None:
        self.db = folder / "bench.db"
        self.store_url = extra_env.get("HMS_STORE_URL", f"sqlite:///{self.db}")
        self._postgres: Any = None  # a connection that counts, when the store is PostgreSQL
        env = {
            **os.environ,
            "HMS_BROKER_URL": url,
            "HMS_STORE_URL": f"sqlite:///{self.db}",
            "HMS_LOG_FORMAT": "json",
            "HMS_LOG_LEVEL": "warning",
            "PYTHONPATH": str(ROOT),
            **extra_env,
        }
        logs = folder / "daemons.log"
        with logs.open("ab") as log:
            self.engine = subprocess.Popen(
                [sys.executable, "-m", "hms_mgmt.engine"], cwd=ROOT, env=env, stdout=log, stderr=log
            )
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "hms_mgmt.worker", "benchmarks.grant_service:service"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=log,
            )
        self.logs = logs

    def succeeded(self) -> int:
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5) as db:
            return int(
                db.execute("SELECT count(*) FROM workflows WHERE status = 'succeeded'").fetchone()[
                    0
                ]
            )

    @property
    def on_postgres(self) -> bool:
        return self.store_url.startswith(("postgresql://", "postgres://"))

    async def count_succeeded(self) -> int:
        """Workflows the engine has recorded as succeeded, from whichever store it uses."""
        if not self.on_postgres:
            return await asyncio.to_thread(self.succeeded)
        if self._postgres is None:
            import asyncpg

            self._postgres = await asyncpg.connect(self.store_url)
        sql = "SELECT count(*) FROM workflows WHERE status = 'succeeded'"
        return int(await self._postgres.fetchval(sql))

    async def store_pids(self) -> list[int]:
        """The PostgreSQL server processes serving the engine (its pool's connections)."""
        if not self.on_postgres:
            return []
        await self.count_succeeded()  # connected
        rows = await self._postgres.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'hms-mgmt' "
            "AND datname = current_database()"
        )
        return [int(row[0]) for row in rows]

    async def close(self) -> None:
        if self._postgres is not None:
            await self._postgres.close()
            self._postgres = None

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5) as db:
            return list(db.execute(sql, params))

    def stop(self) -> None:
        for child in (self.worker, self.engine):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in (self.worker, self.engine):
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()


async def one_run(
    client: hms_mgmt.Management, daemons: Daemons, n: int, offset: int
) -> dict[str, Any]:
    pids = {"engine": daemons.engine.pid, "worker": daemons.worker.pid, "broker": broker_pid()}
    cpu_before = {k: cpu_seconds(p) for k, p in pids.items()}
    store_before = {p: cpu_seconds(p) for p in await daemons.store_pids()}
    target = await daemons.count_succeeded() + n
    began = time.perf_counter()
    await asyncio.gather(*(client.start("grantApproval", payload(offset + i)) for i in range(n)))
    start_s = time.perf_counter() - began
    while await daemons.count_succeeded() < target:  # noqa: ASYNC110 - polls the store
        await asyncio.sleep(0.01)
    wall = time.perf_counter() - began
    cpu = {k: (cpu_seconds(p) - cpu_before[k]) * 1000 / n for k, p in pids.items()}
    if daemons.on_postgres:  # the store's own CPU, which SQLite spends inside the engine
        used = [cpu_seconds(p) - store_before.get(p, 0.0) for p in await daemons.store_pids()]
        cpu["postgres"] = sum(used) * 1000 / n
    return {
        "n": n,
        "wall_s": round(wall, 3),
        "start_s": round(start_s, 3),
        "wps": round(n / wall, 1),
        "cpu_ms_per_workflow": {k: round(v, 3) for k, v in cpu.items()},
    }


async def dashboard(url: str, reads: list[int]) -> None:
    """A dashboard left open: the event stream, and the page's reads after each notice."""
    import aiohttp

    async with aiohttp.ClientSession() as http, http.get(f"{url}/api/events") as stream:
        async for line in stream.content:
            if line.startswith(b"event: changed"):
                for path in ("/api/counts", "/api/workflows?limit=50"):
                    async with http.get(f"{url}{path}") as answer:
                        await answer.read()
                reads[0] += 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def lone(client: hms_mgmt.Management, count: int, *, execute: bool = False) -> list[float]:
    """Milliseconds for one workflow at a time, by start + wait or by execute (one round trip)."""
    times = []
    for i in range(count):
        began = time.perf_counter()
        if execute:
            state = await client.execute("grantApproval", payload(i), timeout=30)
        else:
            started = await client.start("grantApproval", payload(i))
            state = await client.wait(started.workflow_id, timeout=30)
        times.append((time.perf_counter() - began) * 1000)
        assert state.status == "succeeded", state.describe()
    return times


async def measure(args: argparse.Namespace, url: str, daemons: Daemons) -> dict[str, Any]:
    try:
        return await _measure(args, url, daemons)
    finally:
        await daemons.close()


async def _measure(args: argparse.Namespace, url: str, daemons: Daemons) -> dict[str, Any]:
    async with hms_mgmt.init(
        service_name="bench-client", broker_url=url, request_timeout=600
    ) as client:
        client.definitions.update(service.definitions)
        await lone(client, 20)  # warm up: every connection and queue in place
        runs = []
        for number in range(args.runs):
            watched = args.dashboard is not None and number % 2 == 1
            reads = [0]
            watcher = asyncio.ensure_future(dashboard(args.dashboard, reads)) if watched else None
            if watcher is not None:
                await asyncio.sleep(0.5)  # connected
            try:
                run = await one_run(client, daemons, args.n, offset=number * args.n)
            finally:
                if watcher is not None:
                    watcher.cancel()
            run["dashboard_open"] = watched
            run["dashboard_refreshes"] = reads[0]
            print(
                f"hms n={args.n} run {number + 1}: {run['wps']:.0f} workflows/s "
                f"(starts took {run['start_s']:.2f}s) cpu ms/wf {run['cpu_ms_per_workflow']}"
                + (f" dashboard open, {reads[0]} refreshes" if watched else ""),
                flush=True,
            )
            runs.append(run)
        await lone(client, 10)
        lone_ms = await lone(client, args.lone)
        execute_ms = await lone(client, args.lone, execute=True)
    wps = [r["wps"] for r in runs]
    if args.dashboard is not None:
        closed = [r["wps"] for r in runs if not r["dashboard_open"]]
        opened = [r["wps"] for r in runs if r["dashboard_open"]]
        print(
            f"dashboard closed: {statistics.median(closed):.0f} workflows/s median {closed}; "
            f"open: {statistics.median(opened):.0f} median {opened}",
            flush=True,
        )
    return {
        "system": "hms-mgmt",
        "settings": "engine daemon + 1 step-service process; "
        + ("PostgreSQL" if daemons.on_postgres else "SQLite WAL")
        + f"; {_step_queue_type(args)} step queues; confirms",
        "store": "postgresql" if daemons.on_postgres else "sqlite",
        "engine_queues": "quorum" if args.quorum else "classic",
        "n": args.n,
        "runs": runs,
        "runs_wps": wps,
        "wps_median": statistics.median(wps),
        "steps_per_s_median": statistics.median(wps) * len(STEPS),
        "lone_ms_median": round(statistics.median(lone_ms), 2),
        "lone_ms_p99": round(percentile(lone_ms, 0.99), 2),
        "execute_ms_median": round(statistics.median(execute_ms), 2),
        "execute_ms_p99": round(percentile(execute_ms, 0.99), 2),
        "engine_peak_rss_mb": round(peak_rss_mb(daemons.engine.pid), 1),
        "engine_rss_mb": round(rss_mb(daemons.engine.pid), 1),
        "cpu_ms_per_workflow": statistics.median(
            r["cpu_ms_per_workflow"]["worker"] + r["cpu_ms_per_workflow"]["engine"] for r in runs
        ),
    }


def _step_queue_type(args: argparse.Namespace) -> str:
    env = {**os.environ, **dict(item.split("=", 1) for item in args.env)}
    return env.get("HMS_STEP_QUEUE_TYPE") or ("quorum" if args.quorum else "classic")


async def postgres_admin(server: str, sql: str) -> None:
    import asyncpg

    db = await asyncpg.connect(f"{server.rstrip('/')}/postgres")
    try:
        await db.execute(sql)
    finally:
        await db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--lone", type=int, default=200)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the daemons")
    parser.add_argument(
        "--postgres",
        metavar="SERVER_URL",
        help="store in a fresh database on this PostgreSQL server (postgresql://user@host:port)",
    )
    parser.add_argument(
        "--quorum",
        action="store_true",
        help="the engine's queues as quorum queues, as on a cluster (the one broker named "
        "twice in HMS_BROKER_URL, as 127.0.0.1 and localhost, reads as two nodes)",
    )
    parser.add_argument(
        "--dashboard",
        action="store_true",
        help="alternate runs without and with a dashboard open (an /api/events reader)",
    )
    args = parser.parse_args()
    extra_env = dict(item.split("=", 1) for item in args.env)
    if args.dashboard:
        port = free_port()
        extra_env["HMS_HTTP_PORT"] = str(port)
        args.dashboard = f"http://127.0.0.1:{port}"
    else:
        args.dashboard = None
    database = None
    if args.postgres:
        database = f"hms_bench_{uuid.uuid4().hex[:8]}"
        asyncio.run(postgres_admin(args.postgres, f"CREATE DATABASE {database}"))
        extra_env["HMS_STORE_URL"] = f"{args.postgres.rstrip('/')}/{database}"
    try:
        with fresh_vhost("hms-bench") as url:
            if args.quorum:
                url = f"{url},{url.replace('127.0.0.1', 'localhost', 1)}"
            result = with_daemons(
                url, "hms-bench-", extra_env, lambda daemons: measure(args, url, daemons)
            )
    finally:
        if database is not None:
            asyncio.run(postgres_admin(args.postgres, f"DROP DATABASE {database} WITH (FORCE)"))
    print(
        f"hms ({result['store']}, {result['engine_queues']} engine queues): "
        f"{result['wps_median']:.0f} workflows/s median; "
        f"lone {result['lone_ms_median']} ms median, {result['lone_ms_p99']} ms p99; "
        f"execute {result['execute_ms_median']} ms median, "
        f"{result['execute_ms_p99']} ms p99; engine peak RSS {result['engine_peak_rss_mb']} MB"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
