"""What every chaos case needs: its own vhost on the private node, the engine and step
service as real processes, a client, and the report that checks nothing was lost or doubled.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hms_mgmt
from bus_adapters.rabbitmq import RabbitMQBus
from tests.chaos.node import RabbitNode
from tests.chaos.service import GRANT, SAGA, SAGA_UNDO, chaos

ROOT = Path(__file__).resolve().parents[2]
TRANSITIONS = ("step_succeeded", "step_failed", "step_timed_out")
TERMINAL = ("succeeded", "failed", "cancelled", "compensated")


@dataclass
class Report:
    case: str
    started: int = 0
    succeeded: int = 0
    compensated: int = 0  # sagas that gave up and undid what they had done, by design
    failed_by_design: int = 0
    in_dlq: int = 0
    lost: int = 0
    duplicate_transitions: int = 0
    extra_executions: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


REPORTS: list[Report] = []


class Case:
    """One chaos case: a vhost, processes, a store, an execution log."""

    def __init__(self, node: RabbitNode, tmp_path: Path, name: str) -> None:
        self.node = node
        self.name = name
        self.tmp_path = tmp_path
        self.vhost = f"chaos-{uuid.uuid4().hex[:8]}"
        node.ctl("add_vhost", self.vhost)
        node.ctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")
        self.url = f"amqp://guest:guest@127.0.0.1:{node.port}/{self.vhost}"
        self.db = tmp_path / "chaos.db"
        self.exec_log = tmp_path / "executions.log"
        self.engine: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.began = time.monotonic()
        self.worker_restarts = 0
        self.engine_starts = 0

    # -- processes ------------------------------------------------------------

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.tmp_path / f"{name}.log", "ab") as log:
            return subprocess.Popen(
                [sys.executable, *args],
                cwd=ROOT,
                env={
                    **os.environ,
                    "HMS_BROKER_URL": self.url,
                    "HMS_STORE_URL": f"sqlite:///{self.db}",
                    "HMS_LOG_FORMAT": "json",
                    "HMS_LOG_LEVEL": "info",
                    "HMS_CHAOS_EXEC_LOG": str(self.exec_log),
                    **env,
                },
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def start_engine(self, **env: str) -> subprocess.Popen[bytes]:
        self.engine = self._spawn("engine", ["-m", "hms_mgmt.engine"], env)
        self.engine_starts += 1
        return self.engine

    def another_engine(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        """One more engine process (one the case expects to be refused); its log is ``name``."""
        return self._spawn(name, ["-m", "hms_mgmt.engine"], env)

    def start_worker(self, **env: str) -> subprocess.Popen[bytes]:
        self.worker = self._spawn(
            "worker", ["-m", "hms_mgmt.worker", "tests.chaos.service:chaos"], env
        )
        return self.worker

    def ensure_worker(self, **env: str) -> None:
        """Restart the step service if it died (a supervisor's job)."""
        if self.worker is None or self.worker.poll() is not None:
            self.start_worker(**env)
            self.worker_restarts += 1

    @staticmethod
    def kill(child: subprocess.Popen[bytes] | None, sig: int = signal.SIGKILL) -> None:
        if child is not None and child.poll() is None:
            child.send_signal(sig)
            child.wait(30)

    def stop(self) -> None:
        for child in (self.worker, self.engine):
            if child is not None and child.poll() is None:
                child.terminate()
                try:
                    child.wait(20)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()

    def log(self, name: str) -> str:
        path = self.tmp_path / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- the client -------------------------------------------------------------

    @asynccontextmanager
    async def client(self) -> AsyncIterator[hms_mgmt.Management]:
        mgmt = hms_mgmt.init(service_name="chaos-client", broker_url=self.url, request_timeout=180)
        mgmt.definitions.update(chaos.definitions)
        async with mgmt:
            yield mgmt

    async def start_many(
        self, client: hms_mgmt.Management, count: int, workflow: str = "grant", **payload: Any
    ) -> list[str]:
        started = await asyncio.gather(
            *(client.start(workflow, {"n": n, **payload}) for n in range(count))
        )
        return [s.workflow_id for s in started]

    # -- reading the store (read-only, beside the engine) ---------------------

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        if not self.db.exists():
            return []
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10) as db:
            return list(db.execute(sql, tuple(params)))

    def count_succeeded(self) -> int:
        """Workflows succeeded so far; 0 while the engine has yet to create its store."""
        try:
            rows = self.query("SELECT count(*) FROM workflows WHERE status = 'succeeded'")
        except sqlite3.OperationalError:
            return 0
        return int(rows[0][0]) if rows else 0

    def statuses(self) -> dict[str, str]:
        return dict(self.query("SELECT id, status FROM workflows"))

    async def wait_terminal(self, ids: Iterable[str], timeout: float = 90.0) -> None:
        wanted = set(ids)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            statuses = await asyncio.to_thread(self.statuses)
            if all(statuses.get(i) in TERMINAL for i in wanted):
                return
            self.ensure_worker()
            await asyncio.sleep(0.2)

    async def wait_outbox_empty(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        left = -1
        while time.monotonic() < deadline:
            left = (await asyncio.to_thread(self.query, "SELECT count(*) FROM outbox"))[0][0]
            if left == 0:
                return 0
            await asyncio.sleep(0.2)
        return int(left)

    async def dlq_counts(self) -> dict[str, int]:
        bus = RabbitMQBus(self.url, name="chaos-dlq-count")
        await bus.connect()
        try:
            names = [f"grant.{s}.dlq" for s in GRANT] + ["poison.swallow.dlq", "poison.after.dlq"]
            names += ["hms.engine.results.dlq", "hms.engine.commands.dlq"]
            return {name: await bus.queue_length(name) for name in names}
        finally:
            await bus.close()

    # -- the verdict ------------------------------------------------------------

    async def report(
        self, ids: list[str], *, failed_by_design: Iterable[str] = (), notes: Iterable[str] = ()
    ) -> Report:
        designed = set(failed_by_design)
        statuses = await asyncio.to_thread(self.statuses)
        dlq = await self.dlq_counts()
        report = Report(self.name, started=len(ids), notes=list(notes))
        report.seconds = round(time.monotonic() - self.began, 1)
        dead_workflows = await asyncio.to_thread(self._dead_lettered_workflows)
        for workflow_id in ids:
            status = statuses.get(workflow_id)
            if status == "succeeded":
                report.succeeded += 1
            elif status == "compensated":
                report.compensated += 1
            elif status == "failed" and workflow_id in designed:
                report.failed_by_design += 1
            elif status == "failed" and workflow_id in dead_workflows:
                report.in_dlq += 1
            else:
                report.lost += 1
                report.notes.append(f"lost {workflow_id}: status {status}")
        report.in_dlq = max(report.in_dlq, sum(v for k, v in dlq.items() if k.startswith("poison")))
        report.duplicate_transitions = await asyncio.to_thread(self._duplicates, ids, statuses)
        wrong, checked = await asyncio.to_thread(self._compensations, ids)
        report.duplicate_transitions += wrong
        if checked:
            report.notes.append(f"{checked} compensations checked: each once, newest first")
        report.extra_executions = self._extra_executions()
        if self.worker_restarts:
            report.notes.append(f"step service restarted {self.worker_restarts} times")
        REPORTS.append(report)
        return report

    def _dead_lettered_workflows(self) -> set[str]:
        rows = self.query("SELECT workflow_id FROM history WHERE kind = 'workflow_failed'")
        return {row[0] for row in rows}

    def _duplicates(self, ids: list[str], statuses: dict[str, str]) -> int:
        """Transitions applied twice, and grants that did not run their four steps exactly once."""
        duplicates = 0
        counts: Counter[tuple[str, int]] = Counter()
        for workflow_id, detail in self.query(
            "SELECT workflow_id, detail FROM history WHERE kind IN (?, ?, ?)", TRANSITIONS
        ):
            counts[(workflow_id, json.loads(detail)["seq"])] += 1
        duplicates += sum(n - 1 for n in counts.values() if n > 1)
        starts = Counter(
            row[0]
            for row in self.query("SELECT workflow_id FROM history WHERE kind = 'workflow_started'")
        )
        duplicates += sum(n - 1 for n in starts.values() if n > 1)
        runs: dict[str, list[tuple[str, str]]] = {}
        for workflow_id, step, status in self.query(
            "SELECT r.workflow_id, r.step, r.status FROM step_runs r JOIN workflows w "
            "ON w.id = r.workflow_id WHERE w.name = 'grant' ORDER BY r.workflow_id, r.seq"
        ):
            runs.setdefault(workflow_id, []).append((step, status))
        for workflow_id in ids:
            if statuses.get(workflow_id) != "succeeded" or workflow_id not in runs:
                continue
            succeeded = [step for step, status in runs[workflow_id] if status == "succeeded"]
            if runs[workflow_id] and succeeded and succeeded != GRANT[: len(succeeded)]:
                duplicates += 1
            if succeeded and len(succeeded) != len(GRANT) and statuses[workflow_id] == "succeeded":
                duplicates += 1
        return duplicates

    def _compensations(self, ids: list[str]) -> tuple[int, int]:
        """Sagas whose compensations did not each run once, newest first: one for each succeeded
        forward run of a step with a compensation (counted as duplicate transitions); and how
        many compensations were checked."""
        runs: dict[str, list[tuple[str, str, str | None]]] = {}
        for workflow_id, step, status, context in self.query(
            "SELECT r.workflow_id, r.step, r.status, r.context FROM step_runs r JOIN workflows w "
            "ON w.id = r.workflow_id WHERE w.name = 'saga' ORDER BY r.workflow_id, r.seq"
        ):
            runs.setdefault(workflow_id, []).append((step, status, context))
        wrong = checked = 0
        for workflow_id in ids:
            if workflow_id not in runs:
                continue
            done = [s for s, status, _ in runs[workflow_id] if status == "succeeded"]
            forward = [s for s in done if s in SAGA_UNDO]
            undone = [
                json.loads(context)["compensating"]["step"]
                for step, status, context in runs[workflow_id]
                if status == "succeeded" and step not in SAGA
            ]
            checked += len(undone)
            if undone != list(reversed(forward)):
                wrong += 1
        return wrong, checked

    def _extra_executions(self) -> int:
        if not self.exec_log.exists():
            return 0
        counts = Counter(
            tuple(line.split()[:2]) for line in self.exec_log.read_text().splitlines() if line
        )
        return sum(n - 1 for n in counts.values() if n > 1)

    def close(self) -> None:
        self.stop()
        with suppress(RuntimeError):
            self.node.ctl("delete_vhost", self.vhost)
