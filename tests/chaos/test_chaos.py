"""Fault injection on a private RabbitMQ node: what goes in must come out, once.

Each case starts the engine daemon and the step service as real processes, breaks
something, lets it recover, and reports workflows started, succeeded, failed by
design, in a DLQ, lost (none of those), duplicate transitions and handler executions
beyond one. Pass: nothing lost, nothing applied twice.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter

import aio_pika
import pytest

from bus_adapters.base import Message
from bus_adapters.rabbitmq import RabbitMQBus
from hms_mgmt.faults import CRASH_EXIT_CODE as EXIT_CODE
from hms_mgmt.topology import RESULTS_QUEUE, STEPS_EXCHANGE
from hms_mgmt.wire.outcomes import Outcome, outcomes_message
from tests.chaos.harness import Case, Report
from tests.chaos.service import LIMIT
from tests.conftest import wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.broker]


def passed(report: Report) -> None:
    assert report.lost == 0, report
    assert report.duplicate_transitions == 0, report


async def test_worker_killed_mid_handler_again_and_again(case: Case) -> None:
    case.start_engine()
    case.start_worker()
    async with case.client() as client:
        ids = await case.start_many(client, 300, sleep=0.05)
        for _ in range(6):
            await asyncio.sleep(random.uniform(0.4, 0.9))  # let it get into some handlers
            case.kill(case.worker)
            case.ensure_worker()
        await case.wait_terminal(ids, timeout=120)
    passed(await case.report(ids, notes=["worker kill -9 x6, restarted each time"]))


@pytest.mark.parametrize("point", ["after_commit", "after_publish", "after_confirm", "after_ack"])
async def test_engine_crash_at_each_point(case: Case, point: str) -> None:
    engine = case.start_engine(HMS_TEST_CRASH_AT=f"{point}:5")
    case.start_worker()
    async with case.client() as client:
        starting = asyncio.ensure_future(case.start_many(client, 150, sleep=0.005))
        code = await asyncio.to_thread(engine.wait, 60)
        assert code == EXIT_CODE, f"the engine did not crash at {point} (exit {code})"
        case.start_engine()
        ids = await starting
        await case.wait_terminal(ids, timeout=90)
    left = await case.wait_outbox_empty()
    assert left == 0, f"{left} outbox rows left unsent after recovery"
    passed(await case.report(ids, notes=[f"engine exited hard at {point} #5, restarted"]))


async def test_engine_killed_at_random(case: Case) -> None:
    case.start_engine()
    case.start_worker()
    async with case.client() as client:
        starting = asyncio.ensure_future(case.start_many(client, 600, sleep=0.05))
        for _ in range(4):
            await asyncio.sleep(random.uniform(0.3, 0.7))
            case.kill(case.engine)
            case.start_engine()
        ids = await starting
        await case.wait_terminal(ids, timeout=120)
    assert await case.wait_outbox_empty() == 0
    passed(await case.report(ids, notes=["engine kill -9 x4 at random, restarted each time"]))


async def test_engine_killed_while_child_workflows_finish(case: Case) -> None:
    """Parents of three grant children each; the engine killed -9 four times while the
    children run and finish: every parent resumes once, with its children's outputs in
    order, and no child starts twice."""
    case.start_engine()
    case.start_worker()
    async with case.client() as client:
        starting = asyncio.ensure_future(case.start_many(client, 60, workflow="family", sleep=0.1))
        for _ in range(4):
            await asyncio.sleep(random.uniform(0.3, 0.8))
            case.kill(case.engine)
            case.start_engine()
        parents = await starting
        children = [f"{p}.spawn.1.{i}" for p in parents for i in range(3)]
        await case.wait_terminal(parents + children, timeout=150)
    assert await case.wait_outbox_empty() == 0
    resumed = Counter(
        row[0] for row in case.query("SELECT workflow_id FROM history WHERE kind = 'resumed'")
    )
    closes = dict(
        case.query(
            "SELECT workflow_id, input FROM step_runs WHERE step = 'close' AND status = 'succeeded'"
        )
    )
    for parent in parents:
        assert resumed[parent] == 1, f"{parent} resumed {resumed[parent]} times"
        assert [c["child"] for c in json.loads(closes[parent])] == [0, 1, 2]
    report = await case.report(
        parents + children, notes=["60 parents x 3 children; engine kill -9 x4 at random"]
    )
    passed(report)


async def test_engine_killed_between_branch_outcomes_and_the_join(case: Case) -> None:
    """Maps of six branches, three out at once; the engine killed -9 four times while
    branches report: every workflow joins once, with its results in item order, and no
    branch's outcome is applied twice."""
    case.start_engine()
    case.start_worker()

    def joined_so_far() -> int:
        rows = case.query("SELECT count(*) FROM history WHERE kind = 'joined'")
        return int(rows[0][0]) if rows else 0

    kills = 0
    async with case.client() as client:
        ids = await case.start_many(client, 60, workflow="fanned")
        for _ in range(4):
            await asyncio.sleep(random.uniform(0.3, 0.8))
            if await asyncio.to_thread(joined_so_far) >= len(ids):
                break
            case.kill(case.engine)  # branches out, some reported, joins to come
            kills += 1
            case.start_engine()
        await case.wait_terminal(ids, timeout=150)
    assert kills >= 2, "the maps ended before the engine could be killed amid them"
    assert await case.wait_outbox_empty() == 0
    joined = Counter(
        row[0] for row in case.query("SELECT workflow_id FROM history WHERE kind = 'joined'")
    )
    joins = dict(
        case.query(
            "SELECT workflow_id, input FROM step_runs WHERE step = 'join' AND status = 'succeeded'"
        )
    )
    for workflow_id in ids:
        assert joined[workflow_id] == 1, f"{workflow_id} joined {joined[workflow_id]} times"
        assert json.loads(joins[workflow_id])["results"] == [i * 10 for i in range(6)]
    report = await case.report(
        ids, notes=[f"60 maps x 6 branches (3 at once); engine kill -9 x{kills} amid them"]
    )
    passed(report)


async def test_broker_restarts_and_dropped_connections(case: Case) -> None:
    case.start_engine()
    case.start_worker()
    began = time.monotonic()
    async with case.client() as client:
        starting = asyncio.ensure_future(case.start_many(client, 600, sleep=0.1))
        # The chaos starts once the engine and the step service are up (a workflow finished):
        # under load they may take longer than the first half second to connect, and a daemon
        # that finds no broker at start-up exits with code 3 by design.
        await wait_until(lambda: case.count_succeeded() > 0, timeout=60, what="a first workflow")
        for round_number in range(2):
            await asyncio.sleep(0.5)
            await asyncio.to_thread(case.node.stop_app)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(case.node.start_app)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(case.node.close_all_connections)
            assert case.engine is not None and case.engine.poll() is None, (
                f"engine died, round {round_number}"
            )
        ids = await asyncio.wait_for(starting, timeout=150)  # no start hangs past its deadline
        more = await case.start_many(client, 50)  # every consumer came back
        await case.wait_terminal(ids + more, timeout=120)
    assert case.worker is not None and case.worker.poll() is None
    note = f"stop_app/start_app + close_all_connections x2 in {time.monotonic() - began:.0f}s"
    passed(await case.report(ids + more, notes=[note]))


async def test_duplicate_and_stale_outcomes(case: Case) -> None:
    case.start_engine()
    case.start_worker(HMS_TEST_DUPLICATE_OUTCOMES="3")  # every outcome message sent three times
    async with case.client() as client:
        ids = await case.start_many(client, 200)
        await case.wait_terminal(ids, timeout=90)
        # Stale and repeated outcomes of finished runs, forged after the fact.
        bus = RabbitMQBus(case.url, name="chaos-forger")
        await bus.connect()
        try:
            forged = [
                Outcome(
                    workflow_id,
                    seq,
                    kind,
                    step="validateApp",
                    attempt=1,
                    result={"data": 1},
                    error={"type": "X", "message": "stale"},
                )
                for workflow_id in ids[:100]
                for seq, kind in ((1, "succeeded"), (1, "failed"), (2, "started"), (4, "succeeded"))
            ]
            for start in range(0, len(forged), 100):
                await bus.publish(
                    outcomes_message([o.encoded for o in forged[start : start + 100]])
                )
        finally:
            await bus.close()

        async def all_ignored() -> bool:
            rows = await asyncio.to_thread(
                case.query, "SELECT count(*) FROM history WHERE kind = 'outcome_ignored'"
            )
            return bool(rows[0][0] >= len(forged))

        await wait_until(all_ignored, timeout=30, what="the forged outcomes to be ignored")
    report = await case.report(ids, notes=["each outcome delivered 3x; 400 stale outcomes forged"])
    passed(report)
    assert report.succeeded == len(ids)


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_poison_message_ends_in_the_dlq(case: Case, queue_type: str) -> None:
    """Classic step queues: the poison guard; quorum ones: the broker's delivery limit."""
    env = {"HMS_STEP_QUEUE_TYPE": queue_type}
    case.start_engine(**env)
    case.start_worker(**env)
    async with case.client() as client:
        poison = await case.start_many(client, 2, workflow="poison", poison=True)
        innocent = await case.start_many(client, 5, workflow="poison", poison=False)
        grants = await case.start_many(client, 50)
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            case.ensure_worker(**env)
            statuses = await asyncio.to_thread(case.statuses)
            if all(statuses.get(i) in ("succeeded", "failed") for i in poison + innocent + grants):
                break
            await asyncio.sleep(0.1)
    counts = await case.dlq_counts()
    assert counts["poison.swallow.dlq"] == len(poison)
    statuses = case.statuses()
    assert all(statuses[i] == "failed" for i in poison)
    report = await case.report(
        poison + innocent + grants,
        failed_by_design=poison,
        notes=[f"{queue_type} step queues; {case.worker_restarts} worker restarts"],
    )
    passed(report)
    assert report.succeeded == len(innocent) + len(grants)


async def test_unroutable_publish_is_an_error_not_a_loss(case: Case) -> None:
    case.start_engine()
    case.start_worker()
    async with case.client() as client:
        await case.start_many(client, 5)  # queues declared and bound
        connection = await aio_pika.connect(case.url)
        try:
            channel = await connection.channel()
            queue = await channel.get_queue("grant.creditCheck", ensure=False)
            ids = await case.start_many(client, 300, sleep=0.1)
            await queue.unbind(STEPS_EXCHANGE, "grant.creditCheck")  # the step has no queue now
        finally:
            await connection.close()
        await case.wait_terminal(ids, timeout=90)
    assert "unroutable publish" in case.log("engine")
    passed(
        await case.report(ids, notes=["grant.creditCheck unbound mid-run; the engine re-bound it"])
    )


async def test_memory_alarm_makes_publishers_wait(case: Case) -> None:
    case.start_engine()
    case.start_worker()
    async with case.client() as client:
        await case.start_many(client, 5)
        # 400 x 4 steps of 0.5 s on 100 handler slots: 8 s of work at the least, so the
        # alarm (its rabbitmqctl call takes about a second) lands while most of it is to do
        ids = await case.start_many(client, 400, sleep=0.5)
        await asyncio.to_thread(case.node.memory_alarm, True)
        try:
            await asyncio.sleep(4.0)
            done_during_alarm = sum(s == "succeeded" for s in case.statuses().values()) - 5
        finally:
            await asyncio.to_thread(case.node.memory_alarm, False)
        assert done_during_alarm < len(ids), "the alarm came too late to block anything"
        await case.wait_terminal(ids, timeout=90)
    note = (
        f"vm_memory_high_watermark 0 for 4 s; {done_during_alarm}/{len(ids)} done when it cleared"
    )
    passed(await case.report(ids, notes=[note]))


BAD_BODIES: list[tuple[str, bytes, str | None, str]] = [
    ("malformed JSON", b'{"steps": [', "application/json", "not JSON"),
    ("not UTF-8", b'{"steps": ["\xff\xfe"]}', "application/json", "not UTF-8"),
    ("wrong content type", b'{"steps": []}', "text/plain", "content type"),
    ("no content type", b'{"steps": []}', None, "content type"),
    (
        "oversize",
        b'{"steps": ["' + b"x" * (1024 * 1024 + 10) + b'"]}',
        "application/json",
        "exceeds",
    ),
    (
        "deeply nested",
        b'{"steps": [' + b"[" * 200 + b"]" * 200 + b"]}",
        "application/json",
        "deeper",
    ),
    ("fields missing", b'{"steps": [{"workflow": "grant"}]}', "application/json", "missing"),
    ("fields mistyped", b'{"steps": [{"workflow_id": 7}]}', "application/json", "wrong type"),
]


async def test_bad_input_is_dead_lettered_on_first_delivery(case: Case) -> None:
    case.start_engine()
    case.start_worker()
    async with case.client() as client:
        ids = await case.start_many(client, 5)
        await case.wait_terminal(ids)
    before = {
        table: case.query(f"SELECT count(*) FROM {table}")[0][0]
        for table in ("workflows", "step_runs", "history", "outbox")
    }
    bus = RabbitMQBus(case.url, name="chaos-bad-input")
    await bus.connect()
    try:
        for _label, body, content_type, _reason in BAD_BODIES:
            for exchange, key in (
                (STEPS_EXCHANGE, "grant.creditCheck"),
                ("", RESULTS_QUEUE),
                ("", "hms.engine.commands"),
            ):
                await bus.publish(
                    Message(
                        body, exchange=exchange, routing_key=key, content_type=content_type or ""
                    )
                )
        unknown = Outcome("no-such-workflow", 1, "succeeded", result={"data": 1})
        await bus.publish(outcomes_message([unknown.encoded]))
        expected = {
            "grant.creditCheck.dlq": len(BAD_BODIES),
            "hms.engine.results.dlq": len(BAD_BODIES) + 1,
            "hms.engine.commands.dlq": len(BAD_BODIES),
        }

        async def all_dead_lettered() -> bool:
            counts = await case.dlq_counts()
            return all(counts[name] == n for name, n in expected.items())

        await wait_until(all_dead_lettered, timeout=30, what="every bad message in its DLQ")
        reasons = []
        for _ in range(len(BAD_BODIES)):
            dead = await bus.get("grant.creditCheck.dlq")
            assert dead is not None
            assert "x-death" not in dead.headers or dead.headers["x-death"][0].get("count", 1) == 1
            reasons.append(str(dead.headers["x-hms-reason"]))
            await dead.ack()
    finally:
        await bus.close()
    for (label, _body, _type, reason), seen in zip(BAD_BODIES, reasons, strict=True):
        assert reason in seen, f"{label}: {seen}"
    after = {
        table: case.query(f"SELECT count(*) FROM {table}")[0][0]
        for table in ("workflows", "step_runs", "history", "outbox")
    }
    assert after == before, "bad input changed the store"
    assert case.engine is not None and case.engine.poll() is None
    assert case.worker is not None and case.worker.poll() is None
    report = await case.report(
        ids, notes=[f"{3 * len(BAD_BODIES) + 1} bad messages, all dead-lettered"]
    )
    passed(report)


async def test_engine_killed_in_the_middle_of_compensation_chains(case: Case) -> None:
    """Sagas whose payout always fails, the engine killed (-9) while their compensation
    chains run: each compensation runs once (as a transition), newest first, and every saga
    ends compensated."""
    case.start_engine()
    case.start_worker()

    def compensating() -> int:
        rows = case.query("SELECT count(*) FROM workflows WHERE status = 'compensating'")
        return int(rows[0][0]) if rows else 0

    kills = 0
    async with case.client() as client:
        ids = await case.start_many(client, 150, workflow="saga", sleep=0.02)
        for _ in range(4):
            try:
                await wait_until(
                    lambda: asyncio.to_thread(compensating), timeout=30, what="chains under way"
                )
            except AssertionError:
                break  # every chain has ended
            await asyncio.sleep(random.uniform(0.05, 0.4))
            case.kill(case.engine)
            kills += 1
            case.start_engine()
        await case.wait_terminal(ids, timeout=120)
    assert await case.wait_outbox_empty() == 0
    report = await case.report(
        ids, notes=[f"engine kill -9 x{kills} while compensation chains ran, restarted"]
    )
    passed(report)
    assert report.compensated == len(ids), report
    assert kills >= 1


async def test_engine_killed_while_every_slot_of_a_limit_is_taken(case: Case) -> None:
    """The engine killed -9 (twice) while every slot of a ``concurrency=3`` step is taken
    and more runs wait as ``queued``: after each restart it rebuilds the slots from the
    store; the step service never has more than 3 of the step's runs inside at once, and
    every workflow finishes."""
    case.start_engine()
    case.start_worker()
    inside = case.tmp_path / "inside"

    def slots() -> tuple[int, int]:  # the step's runs out (pending or running), and queued
        rows = case.query(
            "SELECT r.status, count(*) FROM step_runs r JOIN workflows w ON w.id = r.workflow_id"
            " WHERE w.name = 'limited' AND r.step = 'inspect' AND w.status = 'running'"
            " GROUP BY r.status"
        )
        counts = dict(rows)
        return counts.get("pending", 0) + counts.get("running", 0), counts.get("queued", 0)

    lines: list[int] = []
    async with case.client() as client:
        ids = await case.start_many(client, 40, workflow="limited", sleep=0.4, inside=str(inside))
        for kill in range(2):  # once before any has finished, once midway

            def full(finished: int = 9 * kill) -> bool:
                out, waiting = slots()
                return out == LIMIT and waiting >= 5 and case.count_succeeded() >= finished

            await wait_until(full, timeout=60, what="every slot taken and a line")
            lines.append(slots()[1])
            case.kill(case.engine)  # kill -9 with every slot taken
            case.start_engine()
        await case.wait_terminal(ids, timeout=120)
    seen = [int(line) for line in inside.read_text().split()]
    assert max(seen) <= LIMIT, f"{max(seen)} runs of limited.inspect inside at once"
    assert "concurrency slots rebuilt from the store" in case.log("engine")
    note = (
        f"engine kill -9 x2 with {LIMIT}/{LIMIT} slots taken and {lines} queued; at most "
        f"{max(seen)} inside at once over {len(seen)} runs"
    )
    report = await case.report(ids, notes=[note])
    passed(report)
    assert report.succeeded == len(ids)
