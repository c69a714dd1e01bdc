"""The engine daemon on a PostgreSQL store, with a step service, on the real RabbitMQ.

``postgres_url`` comes first in each test's fixtures, so the processes stop before their
database is dropped.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys

import pytest

import hms_mgmt
from tests.conftest import ROOT, Processes, wait_until
from tests.services import GRANT
from tests.test_broker_flow import run_grants

pytestmark = pytest.mark.broker


async def test_grants_run_on_postgres_and_an_engine_restart_resumes_from_it(
    postgres_url: str, client: hms_mgmt.Management, processes: Processes, vhost: str
) -> None:
    engine = processes.engine(vhost, postgres_url)
    processes.worker(vhost, "tests.services:grant")
    states = await run_grants(client, 100)
    assert len({s.workflow_id for s in states}) == 100
    for state in states:
        assert state.status == "succeeded", state.describe()
        assert [(s.step, s.attempt, s.status) for s in state.steps] == [
            (step, 1, "succeeded") for step in GRANT
        ]
    # A clean stop, then work started while no engine runs: the next engine takes it up.
    engine.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(engine.wait, 15) == 0
    pending = asyncio.ensure_future(client.start("grantApproval", {"while": "down"}))
    processes.engine(vhost, postgres_url)
    started = await pending
    for state in states[:10]:
        again = await client.status(state.workflow_id)
        assert again.status == "succeeded" and [s.step for s in again.steps] == GRANT
    assert (await client.wait(started.workflow_id, timeout=30)).status == "succeeded"
    assert "Traceback" not in processes.log("engine")


async def test_an_engine_killed_mid_run_on_postgres_is_resumed_by_the_next(
    postgres_url: str, client: hms_mgmt.Management, processes: Processes, vhost: str
) -> None:
    engine = processes.engine(vhost, postgres_url)
    processes.worker(vhost, "tests.services:grant")
    await run_grants(client, 2)  # everything connected
    began = await asyncio.gather(
        *(client.start("grantApproval", {"application_id": f"K-{n}"}) for n in range(200))
    )

    async def some_succeeded() -> bool:
        finished = await asyncio.gather(*(client.status(s.workflow_id) for s in began[:50]))
        return any(state.status == "succeeded" for state in finished)

    await wait_until(some_succeeded, timeout=30, what="the first workflows to succeed")
    engine.kill()  # kill -9: no clean stop, whatever was in flight stays in the store/queues
    await asyncio.to_thread(engine.wait, 10)
    processes.engine(vhost, postgres_url)
    done = await asyncio.gather(*(client.wait(s.workflow_id, timeout=60) for s in began))
    for state in done:
        assert state.status == "succeeded", state.describe()
        assert [s.step for s in state.steps if s.status == "succeeded"] == GRANT


def test_an_unreachable_postgres_store_is_one_line_and_exit_code_2() -> None:
    url = "postgresql://hms:s3cret@127.0.0.1:1/hms"  # nothing listens on port 1
    done = subprocess.run(
        [sys.executable, "-m", "hms_mgmt.engine", "--store-url", url],
        cwd=ROOT,
        env={"HMS_LOG_FORMAT": "json", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    errors = [line for line in lines if line["level"] == "error"]
    assert len(errors) == 1, done.stderr
    assert errors[0]["event"] == "cannot start: the store cannot be used"
    assert "cannot open the store postgresql://hms:***@127.0.0.1:1/hms" in errors[0]["cause"]
    assert "s3cret" not in done.stderr and "Traceback" not in done.stderr


async def test_the_engine_rides_out_its_postgres_connections_being_cut(
    postgres_url: str, client: hms_mgmt.Management, processes: Processes, vhost: str
) -> None:
    import asyncpg

    engine = processes.engine(vhost, postgres_url)
    processes.worker(vhost, "tests.services:grant")
    await run_grants(client, 2)
    began = await asyncio.gather(
        *(client.start("grantApproval", {"application_id": f"C-{n}"}) for n in range(200))
    )
    admin = await asyncpg.connect(postgres_url)
    try:  # what a server restart or a network cut does to the engine's pool, twice
        engines = (
            "FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'hms-mgmt'"
        )
        for _ in range(2):  # cut once the engine is connected (its pool reconnects as it likes)
            await wait_until(
                lambda: admin.fetchval(f"SELECT count(pg_terminate_backend(pid)) {engines}"),
                timeout=20,
                what="the engine's store connections to cut",
            )
    finally:
        await admin.close()
    done = await asyncio.gather(*(client.wait(s.workflow_id, timeout=60) for s in began))
    assert all(state.status == "succeeded" for state in done)
    assert engine.poll() is None  # still serving


# A second engine on the same PostgreSQL store stands by: tests/test_standby.py.
