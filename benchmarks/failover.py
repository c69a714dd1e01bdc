"""Failover time of active/standby engines on PostgreSQL: from the active engine's death to
the standby serving (``/readyz`` 200 as the active engine).

``python benchmarks/failover.py --kills 5 [--freeze] [--json out.json]`` (from the repository
root, with the project's virtualenv, RabbitMQ on 127.0.0.1:5672 and PostgreSQL at
``--postgres``, default ``postgresql://postgres@127.0.0.1:5432``). It makes a vhost and a
database of its own (both dropped afterwards), starts two engines and one step service, and
then, ``--kills`` times: starts ``--n`` workflows, kills the active engine with -9 once the
first has succeeded (``--freeze``: SIGSTOP instead, SIGCONT after the takeover), times the
takeover, waits for every workflow to succeed, and starts a new standby (a frozen one thawed
stands by again by itself). It prints each takeover, their median and maximum, and checks
that no workflow was lost and none ran a step twice.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hms_mgmt  # noqa: E402
from benchmarks.grant_service import STEPS, payload, service  # noqa: E402


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, text=True).stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def readyz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except (OSError, ValueError):
        return 0, {}


class Engines:
    def __init__(self, broker: str, store: str, logs: Path) -> None:
        self.broker, self.store, self.logs = broker, store, logs
        self.children: dict[int, tuple[subprocess.Popen[bytes], int]] = {}  # pid -> (proc, port)
        self.count = 0

    def start(self) -> int:
        self.count += 1
        port = free_port()
        with open(self.logs / f"engine-{self.count}.log", "ab") as log:
            child = subprocess.Popen(
                [sys.executable, "-m", "hms_mgmt.engine"],
                cwd=ROOT,
                env={
                    **os.environ,
                    "HMS_BROKER_URL": self.broker,
                    "HMS_STORE_URL": self.store,
                    "HMS_HTTP_PORT": str(port),
                    "HMS_LOG_FORMAT": "json",
                },
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.children[child.pid] = (child, port)
        return child.pid

    def role(self, pid: int) -> str | None:
        status, body = readyz(self.children[pid][1])
        if status == 200 and body.get("role") == "active":
            return "active"
        return body.get("role") if status else None

    async def wait_role(self, pid: int, role: str, timeout: float = 60.0) -> float:
        began = time.monotonic()
        while self.role(pid) != role:
            if time.monotonic() - began > timeout:
                raise SystemExit(f"engine {pid} did not become {role} within {timeout} s")
            await asyncio.sleep(0.05)
        return time.monotonic()

    def stop_all(self) -> None:
        for child, _port in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGCONT)
                child.terminate()
        for child, _port in self.children.values():
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()


async def admin(server: str, sql: str) -> None:
    import asyncpg

    db = await asyncpg.connect(f"{server}/postgres")
    try:
        await db.execute(sql)
    finally:
        await db.close()


async def step_runs(store: str, ids: list[str]) -> dict[str, list[tuple[str, str]]]:
    import asyncpg

    db = await asyncpg.connect(store)
    try:
        rows = await db.fetch(
            "SELECT workflow_id, step, status FROM step_runs WHERE workflow_id = ANY($1::text[]) "
            "ORDER BY workflow_id, seq",
            ids,
        )
    finally:
        await db.close()
    runs: dict[str, list[tuple[str, str]]] = {w: [] for w in ids}
    for row in rows:
        runs[row["workflow_id"]].append((row["step"], row["status"]))
    return runs


def start_worker(broker: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "hms_mgmt.worker", "benchmarks.grant_service:service"],
        cwd=ROOT,
        env={**os.environ, "HMS_BROKER_URL": broker, "HMS_LOG_FORMAT": "json"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def first_succeeded(client: hms_mgmt.Management, ids: list[str]) -> None:
    """Wait until one of the first workflows has succeeded: work is under way."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = await asyncio.gather(*(client.status(w) for w in ids[:20]))
        if any(state.status == "succeeded" for state in states):
            return
        await asyncio.sleep(0.02)
    raise SystemExit("no workflow succeeded within 60 s")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--n", type=int, default=200, help="workflows started per kill")
    parser.add_argument("--freeze", action="store_true", help="SIGSTOP, not kill -9")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    vhost = f"bench-failover-{uuid.uuid4().hex[:8]}"
    database = f"hms_failover_{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    await admin(args.postgres, f"CREATE DATABASE {database}")
    broker = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    store = f"{args.postgres}/{database}"
    logs = Path(tempfile.mkdtemp(prefix="hms-failover-"))
    engines = Engines(broker, store, logs)
    worker = start_worker(broker)
    takeovers: list[float] = []
    lost = doubled = started = 0
    try:
        active = engines.start()
        await engines.wait_role(active, "active")
        standby = engines.start()
        await engines.wait_role(standby, "standby")
        client = hms_mgmt.init(service_name="bench-failover", broker_url=broker)
        client.definitions.update(service.definitions)
        async with client:
            for kill in range(args.kills):
                began = await asyncio.gather(
                    *(client.start("grantApproval", payload(n)) for n in range(args.n))
                )
                ids = [s.workflow_id for s in began]
                started += len(ids)
                await first_succeeded(client, ids)
                child = engines.children[active][0]
                died_at = time.monotonic()
                child.send_signal(signal.SIGSTOP if args.freeze else signal.SIGKILL)
                serving_at = await engines.wait_role(standby, "active")
                takeovers.append(serving_at - died_at)
                print(f"kill {kill + 1}: takeover in {takeovers[-1]:.2f} s", flush=True)
                if args.freeze:
                    child.send_signal(signal.SIGCONT)  # it stands by again by itself
                    await engines.wait_role(active, "standby")
                    active, standby = standby, active
                else:
                    child.wait(10)
                    active, standby = standby, engines.start()
                    await engines.wait_role(standby, "standby")
                done = await asyncio.gather(*(client.wait(w, timeout=120) for w in ids))
                lost += sum(1 for s in done if s.status != "succeeded")
                runs = await step_runs(store, ids)
                once = [(step, "succeeded") for step in STEPS]
                doubled += sum(1 for r in runs.values() if r != once)
    finally:
        engines.stop_all()
        worker.terminate()
        worker.wait(20)
        await admin(args.postgres, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        rabbitmqctl("delete_vhost", vhost)
    how = "SIGSTOP" if args.freeze else "kill -9"
    summary = {
        "how": how,
        "kills": len(takeovers),
        "takeover_seconds": [round(t, 2) for t in takeovers],
        "median": round(statistics.median(takeovers), 2),
        "max": round(max(takeovers), 2),
        "workflows": started,
        "lost": lost,
        "doubled": doubled,
        "engine_heartbeat": os.environ.get("HMS_ENGINE_HEARTBEAT", "3 (default)"),
    }
    print(
        f"takeover after {how}, over {len(takeovers)}: median {summary['median']} s, "
        f"max {summary['max']} s; {started} workflows, {lost} lost, {doubled} doubled"
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
