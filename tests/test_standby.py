"""Active/standby engines on one PostgreSQL store and one vhost, as real processes.

The second engine stands by (``/readyz`` 503, role standby) while the first serves; when the
first dies (kill -9) or freezes (SIGSTOP) past the lock connection's heartbeats, the broker
frees the lock, the standby claims the store (fencing the old owner) and serves. A frozen
engine thawed after that writes nothing (its commits are refused by the store) and stands by.

``postgres_url`` comes first in each test's fixtures, so the processes stop before their
database is dropped.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from typing import Any

import pytest

import hms_mgmt
from tests.conftest import Processes, free_port, hms, http_get, wait_until
from tests.services import GRANT
from tests.test_broker_flow import run_grants

pytestmark = pytest.mark.broker

TAKEOVER_BOUND = 15.0  # seconds, the default promise


class Engine:
    """An engine process with its HTTP port."""

    def __init__(self, processes: Processes, name: str, vhost: str, store: str) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = processes.spawn(
            name,
            ["-m", "hms_mgmt.engine", "--broker-url", vhost, "--store-url", store],
            {"HMS_HTTP_PORT": str(self.port)},
        )

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        status, body = await http_get(f"{self.url}/readyz", timeout=2)
        try:
            return status, json.loads(body)
        except ValueError:
            return status, {}

    async def role(self) -> str | None:
        status, body = await self.readyz()
        return body.get("role") if status else None

    async def metric(self, name: str) -> float | None:
        status, text = await http_get(f"{self.url}/metrics", timeout=2)
        for line in text.splitlines() if status == 200 else []:
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None


async def two_engines(processes: Processes, vhost: str, store: str) -> tuple[Engine, Engine]:
    first = Engine(processes, "first", vhost, store)
    assert await wait_until(lambda: _is(first, "active"), timeout=30, what="the first engine")
    second = Engine(processes, "second", vhost, store)
    assert await wait_until(lambda: _is(second, "standby"), timeout=30, what="a standby")
    return first, second


async def _is(engine: Engine, role: str) -> bool:
    return await engine.role() == role


async def start_many(client: hms_mgmt.Management, count: int, tag: str) -> list[str]:
    began = await asyncio.gather(
        *(client.start("grantApproval", {"application_id": f"{tag}-{n}"}) for n in range(count))
    )
    return [s.workflow_id for s in began]


async def some_succeeded(client: hms_mgmt.Management, ids: list[str]) -> bool:
    states = await asyncio.gather(*(client.status(w) for w in ids[:40]))
    return any(state.status == "succeeded" for state in states)


async def takeover(standby: Engine, since: float) -> float:
    """Seconds from ``since`` (monotonic) until the standby answers ready as the active one."""

    async def ready() -> bool:
        status, body = await standby.readyz()
        return status == 200 and body.get("role") == "active"

    await wait_until(ready, timeout=60, interval=0.1, what="the standby to take over")
    return time.monotonic() - since


async def store_check(postgres_url: str, ids: list[str]) -> tuple[int, int, int]:
    """(transitions applied twice, workflows whose step runs are not the four steps once each,
    history rows) in the store."""
    import asyncpg

    db = await asyncpg.connect(postgres_url)
    try:
        rows = await db.fetch(
            "SELECT workflow_id, kind, detail FROM history WHERE kind IN "
            "('step_succeeded', 'step_failed', 'step_timed_out', 'workflow_started')"
        )
        runs = await db.fetch(
            "SELECT workflow_id, step, status FROM step_runs WHERE workflow_id = ANY($1::text[]) "
            "ORDER BY workflow_id, seq",
            ids,
        )
        history = await db.fetchval("SELECT count(*) FROM history")
    finally:
        await db.close()
    seen = Counter((r["workflow_id"], r["kind"], json.loads(r["detail"]).get("seq")) for r in rows)
    doubled = sum(n - 1 for n in seen.values() if n > 1)
    by_workflow: dict[str, list[tuple[str, str]]] = {w: [] for w in ids}
    for r in runs:
        by_workflow[r["workflow_id"]].append((r["step"], r["status"]))
    wrong = sum(1 for steps in by_workflow.values() if steps != [(s, "succeeded") for s in GRANT])
    return doubled, wrong, int(history)


async def test_a_second_engine_stands_by_and_takes_over_from_one_killed_mid_run(
    postgres_url: str, client: hms_mgmt.Management, processes: Processes, vhost: str
) -> None:
    first, second = await two_engines(processes, vhost, postgres_url)
    processes.worker(vhost, "tests.services:grant")
    status, body = await second.readyz()
    assert status == 503 and body["role"] == "standby" and body["checks"]["active"] is False
    assert (await http_get(f"{second.url}/healthz"))[0] == 200
    assert await second.metric("hms_engine_active") == 0
    assert await first.metric("hms_engine_active") == 1
    said = processes.log("second")
    assert said.count("standing by: another engine serves") == 1, said
    assert f"pid {first.process.pid}" in said
    # hms engines: the active one from the record, and the standby asked.
    listed = await hms("engines", "--output", "json", env={"HMS_ENGINE_URL": second.url})
    assert listed.returncode == 0, listed.stderr
    engines = json.loads(listed.stdout)
    assert [(e["role"], e["pid"]) for e in engines] == [
        ("active", first.process.pid),
        ("standby", second.process.pid),
    ]
    assert all(s.status == "succeeded" for s in await run_grants(client, 5))  # via the first

    ids = await start_many(client, 200, "K")
    await wait_until(lambda: some_succeeded(client, ids), timeout=30, what="work under way")
    killed_at = time.monotonic()
    first.process.kill()  # kill -9
    await asyncio.to_thread(first.process.wait, 10)
    seconds = await takeover(second, killed_at)
    print(f"\ntakeover after kill -9: {seconds:.2f} s")
    assert seconds < TAKEOVER_BOUND
    done = await asyncio.gather(*(client.wait(w, timeout=60) for w in ids))
    assert all(state.status == "succeeded" for state in done)
    doubled, wrong, _ = await store_check(postgres_url, ids)
    assert (doubled, wrong) == (0, 0)
    assert await second.metric("hms_engine_takeovers_total") == 1
    assert await second.metric("hms_engine_active") == 1
    assert "taking over" in processes.log("second")
    assert "Traceback" not in processes.log("second")


async def test_a_frozen_engine_thawed_after_a_takeover_writes_nothing_and_stands_by(
    postgres_url: str, client: hms_mgmt.Management, processes: Processes, vhost: str
) -> None:
    first, second = await two_engines(processes, vhost, postgres_url)
    processes.worker(vhost, "tests.services:grant")
    await run_grants(client, 2)
    ids = await start_many(client, 200, "F")
    await wait_until(lambda: some_succeeded(client, ids), timeout=30, what="work under way")
    frozen_at = time.monotonic()
    first.process.send_signal(signal.SIGSTOP)
    try:
        seconds = await takeover(second, frozen_at)
        print(f"\ntakeover after SIGSTOP: {seconds:.2f} s")
        assert seconds < TAKEOVER_BOUND
        done = await asyncio.gather(*(client.wait(w, timeout=60) for w in ids))
        assert all(state.status == "succeeded" for state in done)
        before = await store_check(postgres_url, ids)
        assert before[:2] == (0, 0)
    finally:
        first.process.send_signal(signal.SIGCONT)
    # Thawed: its commits are refused, it acks nothing it did not commit, and it stands by.
    assert await wait_until(lambda: _is(first, "standby"), timeout=30, what="a new standby")
    assert first.process.poll() is None
    after = await store_check(postgres_url, ids)
    assert after == before  # not one row more: nothing stale written
    said = processes.log("first")
    assert "this process stands by again" in said, said
    assert "Traceback" not in said
    assert all(s.status == "succeeded" for s in await run_grants(client, 5))  # the second serves


async def test_a_second_engine_on_sqlite_is_still_refused(
    client: hms_mgmt.Management, processes: Processes, vhost: str, store_url: str
) -> None:
    first = processes.engine(vhost, store_url)
    processes.worker(vhost, "tests.services:grant")
    await run_grants(client, 2)
    second = processes.spawn(
        "second", ["-m", "hms_mgmt.engine", "--broker-url", vhost, "--store-url", store_url]
    )
    assert await asyncio.to_thread(second.wait, 30) == 5
    said = processes.log("second")
    assert "another engine already serves" in said and f"pid {first.pid}" in said, said
    assert "standing by" not in said
    assert first.poll() is None
