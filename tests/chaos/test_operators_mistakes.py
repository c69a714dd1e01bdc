"""Operators' mistakes and strangers, with real processes on a private RabbitMQ node.

A second engine on the same vhost; the store file deleted, truncated, made read-only or
on a full disk under a running engine; forged outcomes and commands; a handler that hangs
past its timeout; a handler that blocks its event loop. Each case reports, in the chaos
table, what was started, what succeeded and what was lost or doubled (must be none), and
notes its figures: how fast the engine refused or went unready.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bus_adapters.base import Message
from bus_adapters.rabbitmq import RabbitMQBus
from hms_mgmt.engine.engine import EXIT_REFUSED, EXIT_STORE_LOST
from hms_mgmt.machine.children import MAX_DEPTH
from hms_mgmt.topology import COMMANDS_EXCHANGE, COMMANDS_QUEUE, RESULTS_EXCHANGE, RESULTS_QUEUE
from hms_mgmt.wire.codec import batch_body, dumps
from tests.chaos.harness import Case, Report
from tests.conftest import free_port, http_get, wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.broker]


def passed(report: Report) -> None:
    assert report.lost == 0, report
    assert report.duplicate_transitions == 0, report


async def exited(child: subprocess.Popen[bytes], timeout: float = 60) -> int:
    return await asyncio.to_thread(child.wait, timeout)


# -- one engine per vhost ------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["same_file", "other_file", "same_file_other_vhost"])
async def test_a_second_engine_on_the_vhost_is_refused(case: Case, store: str) -> None:
    first = case.start_engine()
    case.start_worker()
    async with case.client() as client:
        starting = asyncio.ensure_future(case.start_many(client, 300, sleep=0.2))

        async def serving() -> bool:  # the first engine is up (else the second could be first)
            return await asyncio.to_thread(case.count_succeeded) > 0

        await wait_until(serving, timeout=60, interval=0.1, what="the first engine serving")
        other = case.tmp_path / "other.db" if store == "other_file" else case.db
        env = {"HMS_STORE_URL": f"sqlite:///{other}"}
        if store == "same_file_other_vhost":  # the file's own lock refuses it
            vhost = f"{case.vhost}-other"
            case.node.ctl("add_vhost", vhost)
            case.node.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
            env["HMS_BROKER_URL"] = case.url.replace(case.vhost, vhost)
        began = time.monotonic()
        second = case.another_engine("second-engine", **env)
        code = await exited(second)
        refused_in = time.monotonic() - began
        said = case.log("second-engine")
        assert code == EXIT_REFUSED, said
        assert "another engine already serves" in said and f"pid {first.pid}" in said, said
        assert store != "other_file" or not other.exists()  # nothing left behind
        if store == "same_file_other_vhost":
            assert f"{case.db} is in use by another engine (pid {first.pid})" in said, said
            case.node.ctl("delete_vhost", f"{case.vhost}-other")
        ids = await starting
        await case.wait_terminal(ids, timeout=120)
    assert first.poll() is None  # the first one served on, untouched
    passed(
        await case.report(
            ids,
            notes=[f"second engine ({store}) refused with exit {code} in {refused_in:.1f}s"],
        )
    )


# -- the store in trouble ------------------------------------------------------------------------


@pytest.fixture
def tmpfs(case: Case) -> Iterator[Path]:
    """A 64 MiB tmpfs of the case's own: a disk that can fill up."""
    mount = case.tmp_path / "mnt"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        case.stop()  # the engine lets go of the file first
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def unready_within(url: str, timeout: float = 15) -> float:
    """Seconds until /readyz says 503 with the store check failing."""
    began = time.monotonic()

    async def store_unready() -> bool:
        status, body = await http_get(f"{url}/readyz", timeout=2)
        return status == 503 and json.loads(body)["checks"]["store"] is False

    await wait_until(store_unready, timeout=timeout, interval=0.1, what="store unready")
    return time.monotonic() - began


async def ready_again(url: str, timeout: float = 30) -> None:
    async def ready() -> bool:
        return (await http_get(f"{url}/readyz", timeout=2))[0] == 200

    await wait_until(ready, timeout=timeout, interval=0.2, what="ready again")


async def chattr(flag: str, files: list[str]) -> None:
    await asyncio.to_thread(subprocess.run, ["chattr", flag, *files], check=True)


def fill(path: Path) -> None:
    """Write zeros to ``path`` until the disk is full."""
    with contextlib.suppress(OSError), path.open("wb", buffering=0) as file:
        while True:
            file.write(b"\0" * 65536)


def remove_wal(db: Path) -> None:
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


async def test_the_store_deleted_under_the_engine(case: Case) -> None:
    port = free_port()
    engine = case.start_engine(HMS_HTTP_PORT=str(port), HMS_STORE_GRACE="4")
    case.start_worker()
    async with case.client() as client:
        ids = await case.start_many(client, 300, sleep=0.2)
        await asyncio.sleep(1.0)  # well into the run
        case.db.unlink()
        unready = await unready_within(f"http://127.0.0.1:{port}")
        code = await exited(engine)
        assert code == EXIT_STORE_LOST, case.log("engine")[-2000:]
        [copy] = case.tmp_path.glob("chaos.db.rescued-*")
        assert "copied what the deleted store held" in case.log("engine")
        remove_wal(case.db)  # what the operator does: the copy back in place
        copy.rename(case.db)
        case.start_engine()
        await case.wait_terminal(ids, timeout=120)
    assert unready <= 5.0
    passed(
        await case.report(
            ids,
            notes=[
                f"store file deleted mid-run: unready in {unready:.1f}s, exit {code} after the "
                "grace period, its copy moved back, restarted"
            ],
        )
    )


async def test_the_store_truncated_under_the_engine(case: Case) -> None:
    port = free_port()
    engine = case.start_engine(HMS_HTTP_PORT=str(port), HMS_STORE_GRACE="4")
    case.start_worker()
    saved = case.tmp_path / "saved"
    saved.mkdir()
    async with case.client() as client:
        ids = await case.start_many(client, 300, sleep=0.2)
        await asyncio.sleep(1.0)
        # The operator's last good copy: the engine frozen, its file and WAL as they are.
        engine.send_signal(signal.SIGSTOP)
        for suffix in ("", "-wal"):
            shutil.copy(f"{case.db}{suffix}", saved / f"chaos.db{suffix}")
        with case.db.open("r+b") as file:
            file.truncate(case.db.stat().st_size // 2)
        engine.send_signal(signal.SIGCONT)
        unready = await unready_within(f"http://127.0.0.1:{port}")
        code = await exited(engine)
        assert code == EXIT_STORE_LOST, case.log("engine")[-2000:]
        remove_wal(case.db)
        for suffix in ("", "-wal"):
            shutil.copy(saved / f"chaos.db{suffix}", f"{case.db}{suffix}")
        case.start_engine()
        await case.wait_terminal(ids, timeout=120)
    assert unready <= 5.0
    passed(
        await case.report(
            ids,
            notes=[
                f"store file truncated by half: unready in {unready:.1f}s, nothing acked after, "
                f"exit {code}; the copy from before restored, restarted"
            ],
        )
    )


async def test_the_store_made_read_only_under_the_engine(case: Case) -> None:
    port = free_port()
    case.start_engine(HMS_HTTP_PORT=str(port), HMS_STORE_GRACE="120")
    case.start_worker()
    files = [str(case.db), f"{case.db}-wal"]
    async with case.client() as client:
        ids = await case.start_many(client, 300, sleep=0.2)
        await asyncio.sleep(1.0)
        await chattr("+i", files)  # immutable: even root cannot write it
        try:
            unready = await unready_within(f"http://127.0.0.1:{port}")
            await asyncio.sleep(2.0)  # a while read-only: nothing is acked meanwhile
        finally:
            await chattr("-i", files)
        await ready_again(f"http://127.0.0.1:{port}")
        await case.wait_terminal(ids, timeout=120)
    assert "cannot be written" in case.log("engine")
    assert unready <= 5.0
    passed(
        await case.report(
            ids,
            notes=[f"store made immutable for 2s+: unready in {unready:.1f}s, ready again after"],
        )
    )


async def test_the_store_on_a_full_disk(case: Case, tmpfs: Path) -> None:
    case.db = tmpfs / "chaos.db"
    port = free_port()
    case.start_engine(HMS_HTTP_PORT=str(port), HMS_STORE_GRACE="120")
    case.start_worker()
    filler = tmpfs / "filler"
    async with case.client() as client:
        ids = await case.start_many(client, 300, sleep=0.2)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(fill, filler)
        unready = await unready_within(f"http://127.0.0.1:{port}")
        await asyncio.sleep(2.0)
        filler.unlink()
        await ready_again(f"http://127.0.0.1:{port}")
        await case.wait_terminal(ids, timeout=120)
    said = case.log("engine")
    assert "is full" in said and "cannot rollback" not in said
    passed(
        await case.report(
            ids, notes=[f"tmpfs filled for 2s+: unready in {unready:.1f}s, ready when freed"]
        )
    )


# -- strangers -------------------------------------------------------------------------------


async def test_forged_outcomes_and_commands_change_nothing(case: Case) -> None:
    case.node.ctl("add_user", "stranger", "stranger")
    try:
        case.node.ctl("set_permissions", "-p", case.vhost, "stranger", ".*", ".*", ".*")
        case.start_engine(HMS_CLIENT_USERS="guest")
        case.start_worker()
        async with case.client() as client:
            # The first step takes 3 s: each workflow has a run in flight to forge outcomes for.
            ids = await case.start_many(client, 50, sleep=3.0)
            await asyncio.sleep(0.5)
            stranger = RabbitMQBus(
                case.url.replace("guest:guest", "stranger:stranger"), name="stranger"
            )
            await stranger.connect()
            try:
                rng = random.Random(3)
                forged = []
                for n in range(1000):
                    item = {
                        "workflow_id": rng.choice(ids),
                        "seq": 1,
                        "attempt": 1,
                        "kind": rng.choice(["succeeded", "failed"]),
                        "result": {"complete": True, "data": {"approved": True, "n": n}},
                        "error": {"type": "Forged", "message": "forged", "retryable": False},
                    }
                    if n % 2:
                        item["token"] = f"{rng.getrandbits(128):032x}"
                    forged.append(dumps(item))
                for chunk in range(0, 1000, 100):
                    await stranger.publish(
                        Message(
                            batch_body("outcomes", forged[chunk : chunk + 100]),
                            exchange=RESULTS_EXCHANGE,
                            routing_key=RESULTS_QUEUE,
                        )
                    )
                commands = [
                    dumps(
                        {"type": "cancel", "request_id": f"c{n}", "workflow_id": ids[n % 50]}
                        if n < 50
                        else {
                            "type": "start",
                            "request_id": f"s{n}",
                            "workflow_id": f"forged-{n}",
                            "workflow": "grant",
                            "payload": {"forged": True},
                        }
                    )
                    for n in range(100)
                ]
                await stranger.publish(
                    Message(
                        batch_body("requests", commands),
                        exchange=COMMANDS_EXCHANGE,
                        routing_key=COMMANDS_QUEUE,
                    )
                )
            finally:
                await stranger.close()
            await case.wait_terminal(ids, timeout=120)
    finally:
        case.node.ctl("delete_user", "stranger")
    dlq = await case.dlq_counts()
    forged_started = case.query("SELECT count(*) FROM workflows WHERE id LIKE 'forged-%'")[0][0]
    cancelled = case.query("SELECT count(*) FROM workflows WHERE status = 'cancelled'")[0][0]
    accepted = forged_started + cancelled
    report = await case.report(
        ids,
        notes=[
            f"1,000 forged outcomes and 100 forged commands: {accepted} accepted; "
            f"{dlq['hms.engine.results.dlq']} + {dlq['hms.engine.commands.dlq']} messages "
            "dead-lettered with the reason"
        ],
    )
    passed(report)
    assert accepted == 0
    assert report.succeeded == 50  # none completed early by a forged "complete"
    assert dlq["hms.engine.results.dlq"] >= 1 and dlq["hms.engine.commands.dlq"] >= 1
    statuses = case.statuses()
    assert all(statuses[i] == "succeeded" for i in ids)
    runs = case.query(
        "SELECT count(*) FROM step_runs r JOIN workflows w ON w.id = r.workflow_id "
        "WHERE w.name = 'grant' AND r.status = 'succeeded'"
    )[0][0]
    assert runs == 50 * 4  # every grant ran its four steps: no forged result skipped one


# -- handlers that hang or block -------------------------------------------------------------


async def test_a_hung_handler_is_cancelled_at_its_timeout(case: Case) -> None:
    case.start_engine()
    case.start_worker()
    async with case.client() as client:
        ids = await case.start_many(client, 100, workflow="hang")
        await case.wait_terminal(ids, timeout=90)
    retried = case.query(
        "SELECT count(*) FROM step_runs WHERE step = 'stall' AND attempt = 2 AND status = "
        "'succeeded'"
    )[0][0]
    report = await case.report(
        ids,
        notes=[
            f"100 first attempts hung for ever with a 1 s timeout and 50 slots: cancelled, "
            f"{retried} retries succeeded"
        ],
    )
    passed(report)
    assert report.succeeded == 100 and retried == 100


async def test_a_blocked_event_loop_is_reported(case: Case) -> None:
    case.start_engine()
    case.start_worker()
    async with case.client() as client:
        ids = await case.start_many(client, 3, workflow="hog", block=2.0)
        await case.wait_terminal(ids, timeout=60)
    said = [
        json.loads(line)
        for line in case.log("worker").splitlines()
        if line.startswith("{") and "blocked" in line
    ]
    warned = [entry for entry in said if entry.get("level") == "warning"]
    assert warned, case.log("worker")[-3000:]
    assert any("block" in json.dumps(entry) for entry in warned)
    report = await case.report(
        ids, notes=[f"3 handlers blocked the loop 2 s each: {len(warned)} warnings naming them"]
    )
    passed(report)
    assert report.succeeded == 3


async def test_a_type_that_starts_itself_as_a_child_for_ever_is_bounded(case: Case) -> None:
    """A step that starts a child of its own type: the one at the depth bound is refused
    (InvalidChild), every level above fails in turn, and work beside it goes on."""
    case.start_engine()
    case.start_worker()
    async with case.client() as client:
        grants = asyncio.ensure_future(case.start_many(client, 100, sleep=0.05))
        roots = await case.start_many(client, 3, workflow="runaway")
        ids = roots + await grants
        await case.wait_terminal(ids, timeout=90)
    family = case.query("SELECT status, count(*) FROM workflows WHERE name = 'runaway' GROUP BY 1")
    levels = MAX_DEPTH + 1  # a root (depth 0) to the one refused (depth MAX_DEPTH)
    assert family == [("failed", 3 * levels)], family
    refused = case.query("SELECT error FROM step_runs WHERE error LIKE '%InvalidChild%'")
    assert len(refused) == 3 and all(f"{MAX_DEPTH} deep" in e for (e,) in refused), refused
    report = await case.report(
        ids,
        failed_by_design=roots,
        notes=[
            f"3 roots of a type that starts itself: {3 * levels} workflows, {levels} deep each, the "
            f"deepest refused with InvalidChild and every level failed; 100 grants beside"
        ],
    )
    passed(report)
    assert report.succeeded == 100 and report.failed_by_design == 3
