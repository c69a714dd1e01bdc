"""A cluster case: the chaos suite's :class:`Case` on a 3-node RabbitMQ cluster and a
PostgreSQL store, with several engines and step services, every process given all three
nodes in ``HMS_BROKER_URL``. Its report is the chaos suite's, row for row."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tests.chaos.harness import REPORTS, Case, Report
from tests.cluster.node import RabbitCluster
from tests.conftest import free_port, http_get

CLUSTER_REPORTS: list[Report] = []


class ClusterCase(Case):
    def __init__(self, cluster: RabbitCluster, tmp_path: Path, name: str, store: str) -> None:
        first = cluster.nodes[0]
        self.cluster = cluster
        self.name = name
        self.tmp_path = tmp_path
        self.vhost = f"cluster-{uuid.uuid4().hex[:8]}"
        first.ctl("add_vhost", self.vhost)  # vhosts and permissions are cluster-wide
        first.ctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")
        self.url = cluster.urls(self.vhost)
        self.store = store
        self.db = tmp_path / "unused.db"  # the store is PostgreSQL
        self.exec_log = tmp_path / "executions.log"
        self.engine: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.engines: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.began = time.monotonic()
        self.worker_restarts = 0
        self.engine_starts = 0

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        return super()._spawn(name, args, {"HMS_STORE_URL": self.store, **env})

    # -- processes ------------------------------------------------------------

    def start_engine(self, name: str = "engine", **env: str) -> subprocess.Popen[bytes]:  # type: ignore[override]
        port = free_port()
        child = self._spawn(name, ["-m", "hms_mgmt.engine"], {"HMS_HTTP_PORT": str(port), **env})
        self.engines[name] = (child, port)
        self.engine_starts += 1
        return child

    def start_worker(self, name: str = "worker", **env: str) -> subprocess.Popen[bytes]:  # type: ignore[override]
        child = self._spawn(name, ["-m", "hms_mgmt.worker", "tests.chaos.service:chaos"], env)
        self.workers[name] = child
        return child

    def ensure_worker(self, **env: str) -> None:
        for name, child in list(self.workers.items()):
            if child.poll() is not None:
                self.start_worker(name, **env)
                self.worker_restarts += 1

    async def role(self, name: str) -> str | None:
        """What ``/readyz`` says engine ``name`` is: active, standby, or None (no answer)."""
        child, port = self.engines[name]
        if child.poll() is not None:
            return None
        status, body = await http_get(f"http://127.0.0.1:{port}/readyz", timeout=2)
        match = re.search(r'"role":\s*"(\w+)"', body) if status else None
        return match[1] if match else None

    async def active(self) -> list[str]:
        roles = await asyncio.gather(*(self.role(name) for name in self.engines))
        return [name for name, role in zip(self.engines, roles, strict=True) if role == "active"]

    def kill_engine(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig``; wait for the engine to die if it is SIGKILL."""
        child = self.engines[name][0]
        if sig == signal.SIGKILL:
            self.kill(child, sig)
        elif child.poll() is None:
            child.send_signal(sig)

    def stop(self) -> None:
        children = [c for c, _ in self.engines.values()] + list(self.workers.values())
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()

    # -- reading the store (read-only, beside the engines) --------------------

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        import asyncpg

        numbered = iter(range(1, 100))
        statement = re.sub(r"\?", lambda _: f"${next(numbered)}", sql)

        async def fetch() -> list[Any]:
            db = await asyncpg.connect(self.store, timeout=10)
            try:
                return [tuple(row) for row in await db.fetch(statement, *params)]
            finally:
                await db.close()

        try:
            return asyncio.run(fetch())
        except asyncpg.UndefinedTableError:
            return []  # the first engine has yet to make its tables

    def count_succeeded(self) -> int:
        rows = self.query("SELECT count(*) FROM workflows WHERE status = 'succeeded'")
        return int(rows[0][0]) if rows else 0

    async def report(
        self, ids: list[str], *, failed_by_design: Iterable[str] = (), notes: Iterable[str] = ()
    ) -> Report:
        report = await super().report(ids, failed_by_design=failed_by_design, notes=notes)
        REPORTS.remove(report)  # the cluster suite's table, not the chaos suite's
        CLUSTER_REPORTS.append(report)
        return report

    def broker_state(self) -> str:
        """The case's queues (type, leader, members, consumers) and consumers as the running
        nodes see them, for a failed case's ``broker-state.txt``."""
        said = []
        for node in self.cluster.nodes:
            if node.pid() is None:
                continue
            for args in (
                (
                    "list_queues",
                    "name",
                    "type",
                    "leader",
                    "members",
                    "online",
                    "messages",
                    "consumers",
                    "state",
                ),
                ("list_consumers", "queue_name", "channel_pid", "consumer_tag", "active"),
                ("list_connections", "name", "peer_port", "state"),
            ):
                try:
                    out = node.ctl(*args, "-p", self.vhost, "-q", timeout=30)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    out = f"failed: {exc}"
                said.append(f"== {node.name}: {' '.join(args)}\n{out}")
        return "\n".join(said)

    def close(self) -> None:
        self.stop()
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.cluster.nodes[0].ctl("delete_vhost", self.vhost)
