"""Guarantees against operators' mistakes and strangers, on the in-memory bus and a real SQLite file.

One engine per vhost, a store that cannot vanish silently, signed step runs, broker users
that may only do their part, retention, stuck steps. The same cases run with real
processes on a private RabbitMQ node in ``tests/chaos/test_operators_mistakes.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

import hms_mgmt
from bus_adapters.base import Message
from bus_adapters.memory import MemoryBus
from hms_mgmt import machine
from hms_mgmt.definitions import Step, WorkflowDefinition
from hms_mgmt.engine.engine import EXIT_STORE_LOST, Engine
from hms_mgmt.engine.vhost import StartRefused
from hms_mgmt.errors import StoreError
from hms_mgmt.records import StepStatus, WorkflowState
from hms_mgmt.store.base import Batch
from hms_mgmt.store.sqlite import SQLiteStore
from hms_mgmt.store.sqlite_backup import backup
from hms_mgmt.topology import COMMANDS_EXCHANGE, COMMANDS_QUEUE, RESULTS_EXCHANGE, RESULTS_QUEUE
from hms_mgmt.wire.codec import batch_body, dumps
from hms_mgmt.wire.outcomes import Outcome
from tests.conftest import wait_until

GRANT = ["validateApp", "creditCheck", "scheduleInspection", "finalize"]
DEFINITION = WorkflowDefinition.build("grantApproval", GRANT).with_version(1)


def run_engine(engine: Engine) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(engine.run())


async def started(engine: Engine, task: asyncio.Task[None]) -> None:
    ready = asyncio.ensure_future(engine.ready.wait())
    await asyncio.wait({ready, task}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()
    assert engine.ready.is_set()


async def stopped(engine: Engine, task: asyncio.Task[None]) -> None:
    engine.stop()
    await asyncio.wait_for(task, 15)


# -- the store: errors that name the path, its identity, the file watched ------------------------


async def test_a_store_that_cannot_be_opened_is_one_clear_error_naming_the_path(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "a-folder"
    folder.mkdir()
    with pytest.raises(StoreError, match=f"cannot open the store {folder}") as caught:
        await SQLiteStore(f"sqlite:///{folder}").open()
    assert caught.value.kind == "unopenable"
    text = tmp_path / "notes.txt"
    text.write_text("these are not the droids" * 100)
    with pytest.raises(StoreError, match=f"the store {text} is corrupt") as caught:
        await SQLiteStore(f"sqlite:///{text}").open()
    assert "restore it from a backup" in str(caught.value)


async def test_a_truncated_store_is_refused_at_start_up(tmp_path: Path) -> None:
    path = tmp_path / "hms.db"
    store = SQLiteStore(f"sqlite:///{path}")
    await store.open()
    batch = Batch()
    for n in range(300):
        t = machine.start(DEFINITION, f"wf-{n}", {"pad": "x" * 500}, 1.0)
        assert t.workflow is not None
        batch.workflows[t.workflow.id] = t.workflow
        batch.runs.update({(r.workflow_id, r.seq): r for r in t.runs})
    await store.commit(batch)
    await store.close()
    size = path.stat().st_size
    with path.open("r+b") as file:
        file.truncate(size // 2)
    with pytest.raises(StoreError, match="is corrupt") as caught:
        await SQLiteStore(f"sqlite:///{path}").open()
    assert caught.value.kind == "corrupt"


async def test_the_store_keeps_its_identity_and_secret(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hms.db'}"
    first = SQLiteStore(url)
    await first.open()
    assert first.identity.fresh and len(first.identity.store_id) == 32
    assert len(first.identity.secret) == 32
    await first.close()
    again = SQLiteStore(url)
    await again.open()
    assert not again.identity.fresh
    assert (again.identity.store_id, again.identity.secret) == (
        first.identity.store_id,
        first.identity.secret,
    )
    await again.close()


async def test_the_file_is_watched_deleted_replaced_and_truncated(tmp_path: Path) -> None:
    path = tmp_path / "hms.db"
    store = SQLiteStore(f"sqlite:///{path}")
    await store.open()
    assert store.check_file() is None
    assert await store.watch(probe=True) is None
    os.rename(path, tmp_path / "moved.db")
    shutil.copy(tmp_path / "moved.db", path)  # another file at the same path
    problem = store.check_file()
    assert problem is not None and problem.kind == "replaced" and str(path) in str(problem)
    os.remove(path)
    problem = await store.watch(probe=True)
    assert problem is not None and problem.kind == "deleted" and problem.lasting
    copy = await store.rescue()
    with closing(sqlite3.connect(copy)) as rescued:
        assert rescued.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone() == (
            store.identity.store_id,
        )
    await store.close()

    other = SQLiteStore(f"sqlite:///{tmp_path / 'other.db'}")
    await other.open()
    batch = Batch()
    for n in range(200):
        t = machine.start(DEFINITION, f"wf-{n}", {"pad": "x" * 2000}, 1.0)
        assert t.workflow is not None
        batch.workflows[t.workflow.id] = t.workflow
    await other.commit(batch)
    assert await other.watch(probe=False) is None  # checkpointed: the file's size is known
    with (tmp_path / "other.db").open("r+b") as file:
        file.truncate(4096)
    problem = await other.watch(probe=False)
    assert problem is not None and problem.kind == "truncated", problem
    await other.close()


async def test_a_second_claim_fences_off_the_first_writer(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hms.db'}"
    first, second = SQLiteStore(url), SQLiteStore(url)
    await first.open()
    await first.claim("engine-a")
    await first.commit(Batch(history=[("w", 1.0, "note", {})]))
    await second.open()
    await second.claim("engine-b")  # a frozen first engine wakes after the second took over
    with pytest.raises(StoreError, match="another engine") as caught:
        await first.commit(Batch(history=[("w", 2.0, "stale", {})]))
    assert caught.value.kind == "taken"
    assert await first.owner() == "engine-b"
    await first.close()
    await second.close()


async def test_an_online_backup_is_a_consistent_checked_copy(tmp_path: Path) -> None:
    path = tmp_path / "hms.db"
    store = SQLiteStore(f"sqlite:///{path}")
    await store.open()
    t = machine.start(DEFINITION, "wf-1", {"n": 1}, 1.0)
    assert t.workflow is not None
    await store.commit(Batch(workflows={"wf-1": t.workflow}))
    result = backup(str(path), str(tmp_path / "copy.db"))  # the store stays open, as in use
    assert result["workflows"] == 1 and result["bytes"] > 0
    restored = SQLiteStore(f"sqlite:///{tmp_path / 'copy.db'}")
    await restored.open()
    assert restored.identity.store_id == store.identity.store_id
    assert "wf-1" in await restored.load(["wf-1"])
    await restored.close()
    await store.close()
    with pytest.raises(StoreError, match="there is no store at"):
        backup(str(tmp_path / "missing.db"), str(tmp_path / "x.db"))


async def test_prune_deletes_only_finished_workflows_older_than_the_cutoff(tmp_path: Path) -> None:
    store = SQLiteStore(f"sqlite:///{tmp_path / 'hms.db'}")
    await store.open()
    batch = Batch()
    for n, (status, updated) in enumerate(
        [
            ("succeeded", 10.0),
            ("failed", 20.0),
            ("cancelled", 30.0),
            ("running", 5.0),
            ("succeeded", 500.0),
        ]
    ):
        t = machine.start(DEFINITION, f"wf-{n}", {"n": n}, 1.0)
        assert t.workflow is not None
        t.workflow.status = hms_mgmt.WorkflowStatus(status)
        t.workflow.updated_at = updated
        batch.workflows[t.workflow.id] = t.workflow
        batch.runs.update({(r.workflow_id, r.seq): r for r in t.runs})
        batch.history.append((t.workflow.id, 1.0, "workflow_started", {}))
    batch.requests.append(("old-request", [True, {}], 1.0))
    batch.requests.append(("new-request", [True, {}], 900.0))
    await store.commit(batch)
    assert await store.prune(100.0, 2) == 2  # in steps of the size asked for
    assert await store.prune(100.0, 2) == 1
    assert await store.prune(100.0, 2) == 0
    left = await store.load([f"wf-{n}" for n in range(5)])
    assert sorted(left) == ["wf-3", "wf-4"]  # running, and finished after the cutoff
    assert await store.history("wf-0") == []
    assert await store.workflow_with_runs("wf-0") is None
    assert await store.forget_requests(100.0) == 1
    assert await store.request_replies(["old-request", "new-request"]) == {
        "new-request": [True, {}]
    }
    await store.close()


# -- the engine: one per vhost, the vhost's store, the store in trouble ---------------------------


async def test_a_second_engine_on_the_vhost_is_refused_naming_the_first(
    memory_url: str, tmp_path: Path
) -> None:
    first = Engine(MemoryBus(memory_url), SQLiteStore(f"sqlite:///{tmp_path / 'a.db'}"))
    running = run_engine(first)
    await started(first, running)
    for name in ("a.db", "b.db"):  # the same file, and another
        second = Engine(
            MemoryBus(memory_url), SQLiteStore(f"sqlite:///{tmp_path / name}"), lock_wait=0.2
        )
        with pytest.raises(StartRefused, match="another engine already serves") as caught:
            await second.run()
        assert f"pid {os.getpid()}" in str(caught.value) and "a.db" in str(caught.value)
    assert not (tmp_path / "b.db").exists()  # a refused start leaves no store behind
    # The same file for another vhost: refused by the file's lock, before any write to it.
    other = Engine(
        MemoryBus(f"{memory_url}-other"),
        SQLiteStore(f"sqlite:///{tmp_path / 'a.db'}"),
        lock_wait=0.2,
    )
    since = time.monotonic()
    with pytest.raises(StartRefused, match="another engine already serves this store") as caught:
        await other.run()
    assert time.monotonic() - since < 2.0
    assert f"a.db is in use by another engine (pid {os.getpid()})" in str(caught.value)
    assert first.checks() == {"engine": True, "broker": True, "vhost_lock": True, "store": True}
    await stopped(first, running)
    again = Engine(MemoryBus(f"{memory_url}-other"), SQLiteStore(f"sqlite:///{tmp_path / 'a.db'}"))
    running = run_engine(again)  # the lock goes with its engine
    await started(again, running)
    await stopped(again, running)


async def test_a_vhost_refuses_a_store_other_than_its_own_unless_told(
    memory_url: str, tmp_path: Path
) -> None:
    first = Engine(MemoryBus(memory_url), SQLiteStore(f"sqlite:///{tmp_path / 'a.db'}"))
    running = run_engine(first)
    await started(first, running)
    await stopped(first, running)
    (tmp_path / "a.db").unlink()  # the store is lost; a restart would make a new empty one
    again = Engine(MemoryBus(memory_url), SQLiteStore(f"sqlite:///{tmp_path / 'a.db'}"))
    with pytest.raises(StartRefused, match="is a new, empty store") as caught:
        await again.run()
    assert "--new-store" in str(caught.value)
    assert not (tmp_path / "a.db").exists()
    told = Engine(
        MemoryBus(memory_url), SQLiteStore(f"sqlite:///{tmp_path / 'a.db'}"), new_store=True
    )
    running = run_engine(told)
    await started(told, running)
    await stopped(told, running)
    after = Engine(MemoryBus(memory_url), SQLiteStore(f"sqlite:///{tmp_path / 'a.db'}"))
    running = run_engine(after)  # the vhost now knows the new store
    await started(after, running)
    await stopped(after, running)


@pytest.fixture
async def served(memory_url: str, tmp_path: Path) -> AsyncIterator[tuple[Engine, Any]]:
    """An engine whose store is a real file, and a step service and client on the same bus."""
    engine = Engine(
        MemoryBus(memory_url), SQLiteStore(f"sqlite:///{tmp_path / 'hms.db'}"), store_grace=3.0
    )
    running = run_engine(engine)
    await started(engine, running)
    mgmt = hms_mgmt.init(service_name="t", broker_url=memory_url, request_timeout=5)
    mgmt.define_workflow("grantApproval", GRANT)
    for step in GRANT:
        mgmt.on_step(f"grantApproval.{step}", lambda ctx: {"data": ctx.payload})
    async with mgmt:
        await mgmt.serve()
        yield engine, mgmt
        if not running.done():
            await stopped(engine, running)
        else:
            await running


async def test_a_deleted_store_makes_the_engine_unready_copy_it_and_exit(
    served: tuple[Engine, Any], tmp_path: Path
) -> None:
    engine, mgmt = served
    done = await mgmt.start("grantApproval", {"n": 1})
    assert (await mgmt.wait(done.workflow_id, timeout=10)).status == "succeeded"
    (tmp_path / "hms.db").unlink()
    await wait_until(lambda: not engine.checks()["store"], timeout=5, what="unready")
    rescued = await wait_until(
        lambda: list(tmp_path.glob("hms.db.rescued-*")), timeout=5, what="a rescue copy"
    )
    with closing(sqlite3.connect(rescued[0])) as copy:
        assert copy.execute(
            "SELECT status FROM workflows WHERE id = ?", (done.workflow_id,)
        ).fetchone() == ("succeeded",)
    await wait_until(lambda: engine.exit_code == EXIT_STORE_LOST, timeout=10, what="exit 4")


async def test_forged_outcomes_and_dead_letters_change_nothing(served: tuple[Engine, Any]) -> None:
    engine, mgmt = served
    waiting = await mgmt.start("grantApproval", {"n": 1}, delay=3600)
    bus: MemoryBus = MemoryBus(engine.bus.url)
    forged = [
        {"workflow_id": waiting.workflow_id, "seq": 1, "kind": "succeeded", "attempt": 1,
         "result": {"complete": True, "data": {"approved": True}}},
        {"workflow_id": waiting.workflow_id, "seq": 1, "kind": "succeeded", "attempt": 1,
         "token": "0" * 32, "result": {"complete": True, "data": {"approved": True}}},
    ]  # fmt: skip
    await bus.publish(
        Message(
            body=batch_body("outcomes", [dumps(f) for f in forged]),
            exchange=RESULTS_EXCHANGE,
            routing_key=RESULTS_QUEUE,
        )
    )
    dlq = f"{RESULTS_QUEUE}.dlq"
    letter = await wait_until(lambda: bus.get(dlq), timeout=5, what="the forgeries dead-lettered")
    assert "its token does not match its step run" in letter.headers["x-hms-reason"]
    assert len(json.loads(letter.body)["outcomes"]) == 2
    state = await mgmt.status(waiting.workflow_id)
    assert state.status == "scheduled" and state.output is None


async def test_broker_users_may_only_do_their_part(memory_url: str, tmp_path: Path) -> None:
    engine = Engine(
        MemoryBus(memory_url),
        SQLiteStore(f"sqlite:///{tmp_path / 'hms.db'}"),
        client_users=frozenset({"clerk"}),
        service_users=frozenset({"grant-service"}),
    )
    running = run_engine(engine)
    await started(engine, running)
    bus = MemoryBus(memory_url)
    replies: list[dict[str, Any]] = []
    reply_to = await bus.reply_queue(lambda d: replies.extend(json.loads(d.body)["replies"]))

    async def ask(user: str | None, request: dict[str, Any]) -> dict[str, Any]:
        await bus.publish(
            Message(
                body=batch_body("requests", [dumps(request)]),
                exchange=COMMANDS_EXCHANGE,
                routing_key=COMMANDS_QUEUE,
                reply_to=reply_to,
                user_id=user,
            )
        )
        found: dict[str, Any] = await wait_until(
            lambda: next((r for r in replies if r["request_id"] == request["request_id"]), None),
            timeout=5,
        )
        return found

    definition = {"type": "define", "definition": DEFINITION.to_json()}
    assert (await ask("grant-service", {**definition, "request_id": "d1"}))["ok"]
    start = {"type": "start", "workflow": "grantApproval", "payload": {}}
    for user, request_id in (("grant-service", "s1"), (None, "s2"), ("mallory", "s3")):
        answer = await ask(user, {**start, "request_id": request_id, "workflow_id": request_id})
        assert not answer["ok"], answer
        assert (
            "may not send 'start'" in answer["error"]["message"]
            or "without a user_id" in (answer["error"]["message"])
        )
    assert (await ask("clerk", {**start, "request_id": "s4", "workflow_id": "s4"}))["ok"]
    cancel = {"type": "cancel", "workflow_id": "s4", "request_id": "c1"}
    assert not (await ask("grant-service", cancel))["ok"]
    assert (await ask("clerk", {**cancel, "request_id": "c2"}))["ok"]
    await bus.close()
    await stopped(engine, running)


async def test_retention_prunes_finished_workflows_and_prune_by_hand(
    memory_url: str, tmp_path: Path
) -> None:
    engine = Engine(
        MemoryBus(memory_url), SQLiteStore(f"sqlite:///{tmp_path / 'hms.db'}"), retention=None
    )
    running = run_engine(engine)
    await started(engine, running)
    mgmt = hms_mgmt.init(service_name="t", broker_url=memory_url)
    mgmt.define_workflow("grantApproval", GRANT)
    for step in GRANT:
        mgmt.on_step(f"grantApproval.{step}", lambda ctx: {"data": ctx.payload})
    async with mgmt:
        await mgmt.serve()
        ids = [(await mgmt.start("grantApproval", {"n": n})).workflow_id for n in range(450)]
        for workflow_id in ids:
            await mgmt.wait(workflow_id, timeout=30)
        kept = await mgmt.start("grantApproval", {"n": "kept"}, delay=3600)
        assert await engine.prune(float("inf")) == 450  # in steps, between batches
        with pytest.raises(hms_mgmt.WorkflowNotFoundError):
            await mgmt.status(ids[0])
        assert (await mgmt.status(kept.workflow_id)).status == "scheduled"
    await stopped(engine, running)


# -- stuck steps ------------------------------------------------------------------------------


def test_a_step_no_service_starts_is_reported_stuck() -> None:
    t = machine.start(DEFINITION, "wf", {}, 100.0)
    assert t.workflow is not None
    state = WorkflowState.of(t.workflow, t.runs, now=150.0, stuck_after=60.0)
    assert state.stuck is None
    state = WorkflowState.of(t.workflow, t.runs, now=500.0, stuck_after=60.0)
    assert state.stuck is not None
    assert "'validateApp' (attempt 1) has waited 400s" in state.stuck
    assert "'grantApproval.validateApp'" in state.stuck


def test_schedule_to_start_fails_a_run_no_service_starts_into_its_retry_policy() -> None:
    definition = WorkflowDefinition.build(
        "w", [Step("only", schedule_to_start=30.0)], retry=hms_mgmt.RetryPolicy(jitter=False)
    ).with_version(1)
    t = machine.start(definition, "wf", {}, 100.0)
    assert t.workflow is not None
    workflow, run = t.workflow, t.runs[-1]
    assert (workflow.timer_kind, workflow.timer_at) == (machine.TIMER_START, 130.0)
    assert t.steps[0].schedule_to_start == 30.0
    fired = machine.fire_timer(workflow, run, definition, machine.TIMER_START, 131.0)
    assert fired.workflow is not None
    timed_out = next(r for r in fired.runs if r.seq == 1)
    assert timed_out.status == StepStatus.TIMED_OUT
    assert timed_out.error is not None and timed_out.error["type"] == "ScheduleToStartTimeout"
    assert fired.runs[-1].attempt == 2  # the retry policy applies
    # A run a service started is no longer subject to it.
    started_outcome = Outcome(workflow_id="wf", seq=1, kind="started")
    went = machine.apply_outcome(workflow, run, definition, started_outcome, 110.0)
    assert went.workflow is not None and went.workflow.timer_kind is None


def test_the_engine_refuses_a_bad_store_in_one_line_with_exit_code_2(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"SQLite format 3\0" + b"\xff" * 8192)
    for store, says in ((tmp_path, "cannot open the store"), (corrupt, "is corrupt")):
        done = subprocess.run(
            [sys.executable, "-m", "hms_mgmt.engine", "--store-url", f"sqlite:///{store}",
             "--broker-url", "amqp://guest:guest@127.0.0.1:1/"],
            capture_output=True, text=True, timeout=60, env={**os.environ, "HMS_LOG_FORMAT": "json"},
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        [line] = done.stderr.strip().splitlines()  # one line, no traceback
        entry = json.loads(line)
        assert says in entry["cause"] and str(store) in entry["cause"], entry


# -- malformed but authentic outcomes --------------------------------------------------------


async def _step_message(bus: MemoryBus, queue: str) -> dict[str, Any]:
    """Take the step message waiting in ``queue`` (no step service serves it) and ack it."""
    delivery = await wait_until(lambda: bus.get(queue), timeout=5, what=f"a step in {queue}")
    await delivery.ack()
    step: dict[str, Any] = json.loads(delivery.body)["steps"][0]
    return step


async def _send_outcomes(bus: MemoryBus, items: list[dict[str, Any]]) -> None:
    await bus.publish(
        Message(
            body=batch_body("outcomes", [dumps(i) for i in items]),
            exchange=RESULTS_EXCHANGE,
            routing_key=RESULTS_QUEUE,
        )
    )


async def test_a_malformed_but_authentic_outcome_fails_its_attempt_once(
    memory_url: str, tmp_path: Path
) -> None:
    engine = Engine(MemoryBus(memory_url), SQLiteStore(f"sqlite:///{tmp_path / 'hms.db'}"))
    running = run_engine(engine)
    await started(engine, running)
    bus = MemoryBus(memory_url)
    mgmt = hms_mgmt.init(service_name="c", broker_url=memory_url, request_timeout=5)
    mgmt.define_workflow("grantApproval", GRANT)  # retried up to 3 times, but not this
    mgmt.define_workflow("guarded", ["check"], on_error="notify")
    async with mgmt:
        doomed = await mgmt.start("grantApproval", {"n": 1})
        step = await _step_message(bus, "grantApproval.validateApp")
        run = {k: step[k] for k in ("workflow_id", "seq", "attempt", "step", "token")}
        malformed = {**run, "kind": "succeeded", "started_at": 1.5e9, "finished_at": 1.5e9 + 1}
        await _send_outcomes(bus, [malformed])  # no "result"
        state = await mgmt.wait(doomed.workflow_id, timeout=10)
        assert state.status == "failed"
        [only] = state.steps
        assert only.status == "failed" and only.attempt == 1
        assert only.error is not None and only.error["type"] == "MalformedOutcome"
        assert "a succeeded outcome has no 'result'" in only.error["message"]
        assert only.error["retryable"] is False
        assert state.error is not None and state.error["reason"] == "not retryable"
        # The item as it came is dead-lettered too, saying what became of it...
        dlq = f"{RESULTS_QUEUE}.dlq"
        letter = await wait_until(lambda: bus.get(dlq), timeout=5, what="the dead letter")
        assert json.loads(letter.body) == {"outcomes": [malformed]}
        reason = letter.headers["x-hms-reason"]
        assert "malformed outcome: a succeeded outcome has no 'result'" in reason
        assert "failed with MalformedOutcome, not retried" in reason
        # ...the failed step's message goes to its .dlq, as for any step given up...
        given_up = await wait_until(lambda: bus.get("grantApproval.validateApp.dlq"), timeout=5)
        assert given_up.headers["x-hms-error-type"] == "MalformedOutcome"
        # ...and the same outcome again (a redelivery, a replay) changes nothing.
        await _send_outcomes(bus, [malformed])
        again = await wait_until(lambda: bus.get(dlq), timeout=5, what="the second dead letter")
        assert "ignored: workflow is failed" in again.headers["x-hms-reason"]
        assert await mgmt.status(doomed.workflow_id) == state
        assert engine.bus.statistics()[RESULTS_QUEUE] == {"ready": 0, "unacked": 0}

        # With an error path, the workflow takes it, as for any failure.
        guarded = await mgmt.start("guarded", {"n": 2})
        step = await _step_message(bus, "guarded.check")
        bad_result = {k: step[k] for k in ("workflow_id", "seq", "attempt", "token")}
        bad_result.update(kind="succeeded", result={"next_step": 7})
        await _send_outcomes(bus, [bad_result])
        notify = await _step_message(bus, "guarded.notify")
        letter = await wait_until(lambda: bus.get(dlq), timeout=5, what="its dead letter")
        assert "field 'next_step' has the wrong type" in letter.headers["x-hms-reason"]
        error = notify["context"]["error"]
        assert error["type"] == "MalformedOutcome" and "'next_step'" in error["message"]
        state = await mgmt.status(guarded.workflow_id)
        assert state.status == "running"
        assert [(s.step, s.status) for s in state.steps] == [
            ("check", "failed"),
            ("notify", "pending"),
        ]

        # A malformed outcome with a wrong token changes nothing at all.
        waiting = await mgmt.start("grantApproval", {"n": 3})
        step = await _step_message(bus, "grantApproval.validateApp")
        forged = {k: step[k] for k in ("workflow_id", "seq", "attempt")}
        forged.update(kind="exploded", token="0" * 32)
        await _send_outcomes(bus, [forged])
        letter = await wait_until(lambda: bus.get(dlq), timeout=5, what="the forgery")
        assert "its token does not match" in letter.headers["x-hms-reason"]
        assert "and malformed: field 'kind' is 'exploded'" in letter.headers["x-hms-reason"]
        assert (await mgmt.status(waiting.workflow_id)).status == "pending"
    await bus.close()
    await stopped(engine, running)
