"""One contract for every Store backend: SQLite and PostgreSQL must behave the same.

Each test runs against both (``store`` is parametrised): a fresh SQLite file, or a fresh
PostgreSQL database (created and dropped around the test; see ``postgres_url`` in
conftest, which fails rather than skips when CI=true).
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hms_mgmt import machine
from hms_mgmt.definitions import WorkflowDefinition
from hms_mgmt.errors import StoreError
from hms_mgmt.records import StepStatus, TypePause, Workflow, WorkflowStatus, evolve
from hms_mgmt.schedules import Schedule
from hms_mgmt.store import open_store
from hms_mgmt.store.base import Batch, OutboxRow, Store
from hms_mgmt.wire.outcomes import Outcome

DEFINITION = WorkflowDefinition.build("w", ["a", "b"]).with_version(1)
BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'contract.db'}"
    postgres: str = request.getfixturevalue("postgres_url")
    return postgres


@pytest.fixture
async def store(url: str) -> AsyncIterator[Store]:
    opened = open_store(url)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def reopened(url: str) -> Store:
    again = open_store(url)
    await again.open()
    return again


def started(workflow_id: str, now: float = 10.0, **kwargs: Any) -> Batch:
    """The batch that starts a workflow of DEFINITION (its first run, history, one message)."""
    t = machine.start(DEFINITION, workflow_id, {"p": workflow_id}, now, **kwargs)
    assert t.workflow is not None
    return Batch(
        workflows={workflow_id: t.workflow},
        attributes={(workflow_id, key): value for key, value in t.attributes.items()},
        runs={(r.workflow_id, r.seq): r for r in t.runs},
        history=[(workflow_id, now, kind, detail) for kind, detail in t.history],
        outbox=[OutboxRow(f"m-{workflow_id}", "hms.steps", "w.a", b"\x00{}", {"h": 1}, now)],
    )


def finished(workflow: Workflow, at: float) -> Workflow:
    return evolve(workflow, status=WorkflowStatus.SUCCEEDED, updated_at=at, output={"ok": 1})


async def migrations(url: str) -> list[int]:
    """The schema versions the database records as applied."""
    if url.startswith("sqlite:"):
        with sqlite3.connect(url[len("sqlite:///") :]) as db:
            return [v for (v,) in db.execute("SELECT version FROM schema_migrations ORDER BY 1")]
    import asyncpg

    db = await asyncpg.connect(url)
    try:
        return [r[0] for r in await db.fetch("SELECT version FROM schema_migrations ORDER BY 1")]
    finally:
        await db.close()


async def test_open_makes_an_identity_kept_across_opens(url: str) -> None:
    first = await reopened(url)
    assert first.identity.fresh and len(first.identity.store_id) == 32
    assert len(first.identity.secret) == 32
    await first.open()  # a second open of an open store does nothing
    await first.close()
    second = await reopened(url)
    assert not second.identity.fresh
    assert second.identity.store_id == first.identity.store_id
    assert second.identity.secret == first.identity.secret
    await second.close()
    await second.close()  # closing twice is harmless
    recorded = await migrations(url)
    assert recorded and recorded == sorted(set(recorded))  # each version once, in order


async def test_a_batch_commits_and_reads_back(store: Store, url: str) -> None:
    batch = started("wf1", run_at=20.0, idempotency_key="key-1")
    await store.commit(batch)
    await store.commit(Batch())  # an empty batch is nothing
    loaded = await store.load(["wf1", "missing", "wf1"])
    assert set(loaded) == {"wf1"}
    workflow, run = loaded["wf1"]
    assert workflow == batch.workflows["wf1"]
    assert run is not None and run == batch.runs[("wf1", 1)] and run.due_at == 20.0
    assert await store.load([]) == {}
    reads = await store.reads_for_batch(["wf1"], ["key-1", "key-2"], ["r-none"])
    assert reads.state == loaded and reads.keys == {"key-1": "wf1"} and reads.answered == {}
    assert await store.find_by_idempotency_key(["key-1", "nope"]) == {"key-1": "wf1"}
    found = await store.workflow_with_runs("wf1")
    assert found is not None and found[0] == workflow and found[1] == [run]
    assert await store.workflow_with_runs("missing") is None
    assert await store.run("wf1", 1) == run and await store.run("wf1", 2) is None
    assert [h.kind for h in await store.history("wf1")] == ["workflow_started", "step_scheduled"]
    assert await store.history("missing") == []
    assert await store.unsent() == batch.outbox  # bytes, headers and times as written
    assert await store.due_timers(15.0, 10) == []
    assert await store.due_timers(25.0, 10) == [("wf1", "run", 20.0)]
    assert await store.overdue_timers(15.0) == {}
    assert await store.overdue_timers(25.0) == {(batch.workflows["wf1"].name, "run"): 20.0}
    assert await store.count_by_status() == {"scheduled": 1}
    await store.close()
    again = await reopened(url)  # durable
    assert (await again.load(["wf1"]))["wf1"] == (workflow, run)
    await again.close()


async def test_a_later_batch_updates_rows_and_confirms_messages(store: Store) -> None:
    batch = started("wf1")
    await store.commit(batch)
    workflow, run = batch.workflows["wf1"], batch.runs[("wf1", 1)]
    done_run = evolve(run, status=StepStatus.SUCCEEDED, output={"x": [1, "two", None]})
    second = evolve(run, seq=2, step="b", status=StepStatus.PENDING, created_at=11.0)
    moved = evolve(workflow, status=WorkflowStatus.RUNNING, seq=2, updated_at=11.0, retries=3)
    await store.commit(
        Batch(
            workflows={"wf1": moved},
            runs={("wf1", 1): done_run, ("wf1", 2): second},
            history=[("wf1", 11.0, "step_succeeded", {"seq": 1}), ("wf1", 11.0, "z", {})],
            sent=["m-wf1"],
        )
    )
    assert (await store.load(["wf1"]))["wf1"] == (moved, second)
    found = await store.workflow_with_runs("wf1")
    assert found is not None and found[1] == [done_run, second]
    kinds = [h.kind for h in await store.history("wf1")]
    assert kinds[2:] == ["step_succeeded", "z"] and len(kinds) == 4  # in order
    assert await store.unsent() == []
    assert await store.count_by_status() == {"running": 1}


async def test_a_pause_is_kept_with_its_workflow_and_has_no_timer(store: Store, url: str) -> None:
    batch = started("wf1")
    await store.commit(batch)
    workflow, run = batch.workflows["wf1"], batch.runs[("wf1", 1)]
    failed = machine.apply_outcome(
        workflow, run, DEFINITION, Outcome("wf1", 1, "failed", error={"type": "X"}), 11.0
    )
    assert failed.workflow is not None and failed.workflow.timer_kind == "run"  # a backoff
    paused = machine.pause(failed.workflow, failed.runs[-1], "audit", 12.0)
    assert paused.workflow is not None
    await store.commit(
        Batch(
            workflows={"wf1": paused.workflow},
            runs={("wf1", 2): paused.runs[-1]} if paused.runs else {},
        )
    )
    assert await store.due_timers(10_000.0, 10) == []  # frozen: no timer in the store
    assert await store.count_by_status() == {"paused": 1}
    assert [w.id for w in await store.list_workflows(status="paused")] == ["wf1"]
    await store.close()
    again = await reopened(url)
    loaded, _ = (await again.load(["wf1"]))["wf1"]
    assert loaded.status == "paused" and loaded.pause == paused.workflow.pause
    assert loaded.pause is not None and loaded.pause["timer"]["kind"] == "run"
    await again.close()


async def test_type_pauses_are_written_replaced_and_dropped(store: Store, url: str) -> None:
    whole = TypePause("grant", None, 10.0, "bureau down")
    step = TypePause("grant", "check", 11.0, None)
    await store.commit(Batch(type_pauses={whole.key: whole, step.key: step}))
    assert await store.type_pauses() == [whole, step]
    later = TypePause("grant", None, 12.0, "again")
    await store.commit(Batch(type_pauses={whole.key: later, step.key: None}))
    await store.close()
    again = await reopened(url)
    assert await again.type_pauses() == [later]
    await again.close()


async def test_a_failed_batch_leaves_nothing_behind(store: Store) -> None:
    bad = started("wf1")
    bad.history.append(("wf1", 1.0, "x", {"bad": object()}))
    with pytest.raises(TypeError):
        await store.commit(bad)
    assert await store.load(["wf1"]) == {}
    assert await store.unsent() == []
    await store.commit(started("wf2"))  # and the store carries on
    assert set(await store.load(["wf1", "wf2"])) == {"wf2"}


async def test_a_duplicate_idempotency_key_fails_the_whole_batch(store: Store) -> None:
    await store.commit(started("wf1", idempotency_key="k"))
    clash = started("wf2", idempotency_key="k")
    with pytest.raises(StoreError):
        await store.commit(clash)
    assert set(await store.load(["wf1", "wf2"])) == {"wf1"}
    assert [r.message_id for r in await store.unsent()] == ["m-wf1"]


async def test_definitions_are_versioned_and_saved_once(store: Store) -> None:
    two = WorkflowDefinition.build("w", ["a", "b", "c"]).with_version(2)
    other = WorkflowDefinition.build("v", ["x"]).with_version(1)
    for definition in (two, DEFINITION, other, DEFINITION):
        await store.save_definition(definition, 1.0)
    stored = await store.definitions()
    assert [(d.name, d.version) for d in stored] == [("v", 1), ("w", 1), ("w", 2)]
    assert stored[2].steps == two.steps


async def test_requests_replies_are_kept_and_forgotten(store: Store) -> None:
    await store.commit(
        Batch(requests=[("r1", {"ok": True}, 1.0), ("r2", [None], 2.0), ("r1", {"ok": 2}, 1.5)])
    )
    assert await store.request_replies(["r1", "r2", "r3"]) == {"r1": {"ok": 2}, "r2": [None]}
    assert await store.request_replies([]) == {}
    await store.commit(Batch(requests=[(f"old{i}", i, 0.5) for i in range(5)]))
    assert await store.forget_requests(1.6, limit=3) == 3
    assert await store.forget_requests(1.6, limit=100) == 3  # the rest before 1.6
    assert await store.forget_requests(1.6) == 0
    assert await store.request_replies(["r1", "r2"]) == {"r2": [None]}


async def test_schedules_are_written_replaced_and_deleted(store: Store) -> None:
    daily = Schedule("s1", "w", "0 9 * * *", "UTC", {"p": 1}, "one", 100.0, 1.0)
    hourly = Schedule("s2", "w", "0 * * * *", "Europe/Paris", None, "skip", 50.0, 1.0, 40.0)
    await store.commit(Batch(schedules={"s1": daily, "s2": hourly}))
    assert await store.schedules() == [daily, hourly]
    ticked = Schedule("s1", "w", "0 9 * * *", "UTC", {"p": 1}, "one", 200.0, 1.0, 100.0)
    await store.commit(Batch(schedules={"s1": ticked, "s2": None}))
    assert await store.schedules() == [ticked]


async def test_listing_counting_and_stuck_steps(store: Store) -> None:
    for i in range(5):
        await store.commit(started(f"wf{i}", now=10.0 + i))
    first = (await store.load(["wf0"]))["wf0"][0]
    await store.commit(Batch(workflows={"wf0": finished(first, 20.0)}))
    listed = await store.list_workflows()
    assert [w.id for w in listed] == ["wf4", "wf3", "wf2", "wf1", "wf0"]  # newest first
    assert [w.id for w in await store.list_workflows(limit=2)] == ["wf4", "wf3"]
    assert [w.id for w in await store.list_workflows(status="succeeded")] == ["wf0"]
    assert [w.id for w in await store.list_workflows(name="w", status="pending", limit=1)] == [
        "wf4"
    ]
    assert await store.list_workflows(name="nope") == []
    assert await store.count_by_status() == {"pending": 4, "succeeded": 1}
    # wf1..wf4 wait for step a, created at 11..14: those before 12.5 are stuck
    assert await store.stuck_counts(12.5) == {("w", "a"): 2}
    assert await store.stuck_counts(0.0) == {}
    # Keyset pages: after the last (created_at, id) of a page, ties on created_at by id.
    await store.commit(started("wf9", now=14.0))  # created with wf4
    page = await store.list_workflows(limit=2)
    assert [w.id for w in page] == ["wf9", "wf4"]
    after = (page[-1].created_at, page[-1].id)
    assert [w.id for w in await store.list_workflows(limit=2, before=after)] == ["wf3", "wf2"]
    assert [w.id for w in await store.list_workflows(before=(14.0, "wf9"))] == [
        "wf4",
        "wf3",
        "wf2",
        "wf1",
        "wf0",
    ]
    assert [w.id for w in await store.list_workflows(status="pending", before=(12.0, "wf2"))] == [
        "wf1"
    ]
    # A time range on created_at, [since, until), with the other filters and pages.
    assert [w.id for w in await store.list_workflows(since=12.0, until=14.0)] == ["wf3", "wf2"]
    assert [w.id for w in await store.list_workflows(since=13.5)] == ["wf9", "wf4"]
    assert [w.id for w in await store.list_workflows(until=11.0)] == ["wf0"]
    assert [w.id for w in await store.list_workflows(since=10.0, status="succeeded")] == ["wf0"]
    assert [
        w.id for w in await store.list_workflows(since=11.0, before=(13.0, "wf3"), limit=1)
    ] == ["wf2"]
    assert await store.list_workflows(since=14.5) == []
    # status "queued": not finished, its current run queued for a slot (a step run's status)
    loaded = await store.load(["wf1", "wf2", "wf3"])
    line = {i: evolve(loaded[i][1], status=StepStatus.QUEUED) for i in ("wf1", "wf2", "wf3")}
    again = evolve(loaded["wf3"][0], seq=2)  # wf3 went on: its queued run 1 is not current
    await store.commit(Batch(workflows={"wf3": again}, runs={(i, 1): r for i, r in line.items()}))
    assert [w.id for w in await store.list_workflows(status="queued")] == ["wf2", "wf1"]
    assert [w.id for w in await store.list_workflows(status="queued", limit=1)] == ["wf2"]
    assert [w.id for w in await store.list_workflows(status="queued", until=12.0)] == ["wf1"]
    assert await store.list_workflows(status="queued", name="nope") == []


async def test_prune_deletes_finished_workflows_with_their_rows(store: Store) -> None:
    for i in range(4):
        await store.commit(started(f"wf{i}"))
    loaded = await store.load(["wf0", "wf1", "wf2"])
    await store.commit(
        Batch(
            workflows={
                "wf0": finished(loaded["wf0"][0], 20.0),
                "wf1": finished(loaded["wf1"][0], 21.0),
                "wf2": finished(loaded["wf2"][0], 30.0),
            }
        )
    )
    assert await store.prune(25.0, limit=1) == 1
    assert await store.prune(25.0, limit=10) == 1
    assert await store.prune(25.0, limit=10) == 0
    assert set(await store.load(["wf0", "wf1", "wf2", "wf3"])) == {"wf2", "wf3"}
    assert await store.history("wf0") == [] and await store.run("wf1", 1) is None
    assert await store.workflow_with_runs("wf0") is None
    assert len(await store.history("wf3")) == 2


async def test_prune_deletes_compensated_workflows_and_keeps_compensating_ones(
    store: Store,
) -> None:
    for i in range(2):
        await store.commit(started(f"wf{i}"))
    loaded = await store.load(["wf0", "wf1"])
    at = {"updated_at": 20.0}
    await store.commit(
        Batch(
            workflows={
                "wf0": evolve(loaded["wf0"][0], status=WorkflowStatus.COMPENSATED, **at),
                "wf1": evolve(loaded["wf1"][0], status=WorkflowStatus.COMPENSATING, **at),
            }
        )
    )
    assert await store.count_by_status() == {"compensated": 1, "compensating": 1}
    assert await store.prune(25.0, limit=10) == 1
    assert set(await store.load(["wf0", "wf1"])) == {"wf1"}


async def test_business_keys_are_written_with_the_batch_and_searched(
    store: Store, url: str
) -> None:
    await store.commit(started("wf1", now=10.0, attributes={"application_id": "A-17"}))
    await store.commit(started("wf2", now=11.0, attributes={"application_id": "A-18"}))
    await store.commit(started("wf3", now=12.0))
    assert [w.id for w in await store.list_workflows(attributes={"application_id": "A-17"})] == [
        "wf1"
    ]
    # a later batch adds a key and replaces a value, as a handler's result does
    await store.commit(
        Batch(attributes={("wf1", "region"): "north", ("wf2", "application_id"): "A-17"})
    )
    found = await store.list_workflows(attributes={"application_id": "A-17"})
    assert [w.id for w in found] == ["wf2", "wf1"]  # newest first
    both = {"application_id": "A-17", "region": "north"}  # every key must match
    assert [w.id for w in await store.list_workflows(attributes=both)] == ["wf1"]
    assert [w.id for w in await store.list_workflows(attributes=both, status="succeeded")] == []
    assert await store.list_workflows(attributes={"application_id": "A-99"}) == []
    assert await store.attributes(["wf1", "wf2", "wf3", "missing"]) == {
        "wf1": both,
        "wf2": {"application_id": "A-17"},
    }
    assert await store.attributes([]) == {}
    await store.close()
    again = await reopened(url)  # durable
    try:
        assert (await again.attributes(["wf1"]))["wf1"] == both
    finally:
        await again.close()


async def test_a_failed_batch_writes_no_business_keys(store: Store) -> None:
    await store.commit(started("wf1", idempotency_key="k"))
    clash = started("wf2", idempotency_key="k", attributes={"application_id": "A-17"})
    with pytest.raises(StoreError):
        await store.commit(clash)
    assert await store.list_workflows(attributes={"application_id": "A-17"}) == []
    assert await store.attributes(["wf2"]) == {}


async def test_prune_deletes_business_keys_with_their_workflow(store: Store) -> None:
    for i in range(2):
        await store.commit(started(f"wf{i}", attributes={"application_id": f"A-{i}"}))
    loaded = await store.load(["wf0"])
    await store.commit(Batch(workflows={"wf0": finished(loaded["wf0"][0], 20.0)}))
    assert await store.prune(25.0, limit=10) == 1
    assert await store.attributes(["wf0", "wf1"]) == {"wf1": {"application_id": "A-1"}}
    assert await store.list_workflows(attributes={"application_id": "A-0"}) == []


async def test_a_claim_fences_off_the_previous_owner(store: Store, url: str) -> None:
    assert await store.owner() is None
    await store.claim("engine-a")
    assert await store.owner() == "engine-a"
    await store.commit(started("wf1"))
    done = started("wf0")
    done.workflows["wf0"] = finished(done.workflows["wf0"], 20.0)
    await store.commit(done)
    usurper = await reopened(url)
    try:
        await usurper.claim("engine-b")
        assert await store.owner() == "engine-b"
        with pytest.raises(StoreError) as refused:
            await store.commit(started("wf2"))
        assert refused.value.kind == "taken" and refused.value.lasting
        assert "engine-b" in str(refused.value)
        with pytest.raises(StoreError, match="taken over"):
            await store.save_definition(DEFINITION, 1.0)
        with pytest.raises(StoreError, match="taken over"):
            await store.prune(1e12, 10)
        with pytest.raises(StoreError, match="taken over"):
            await store.forget_requests(1e12)
        problem = await store.watch(probe=True)
        assert problem is not None and problem.kind == "taken"
        assert set(await store.load(["wf0", "wf1", "wf2"])) == {"wf0", "wf1"}  # reads work
        await usurper.commit(started("wf3"))
        assert set(await usurper.load(["wf1", "wf2", "wf3"])) == {"wf1", "wf3"}
        assert await usurper.prune(1e12, 10) == 1
    finally:
        await usurper.close()


async def test_watch_probes_and_size_counts(store: Store) -> None:
    await store.claim("engine-a")
    assert store.check_file() is None
    assert await store.watch(probe=False) is None
    assert await store.watch(probe=True) is None
    before = await store.size()
    assert before > 0
    for i in range(50):
        batch = started(f"wf{i}")
        batch.history.append((f"wf{i}", 10.0, "pad", {"pad": "x" * 2000}))
        await store.commit(batch)
    assert await store.watch(probe=True) is None
    assert await store.size() >= before


async def test_discard_removes_a_store_just_made(url: str) -> None:
    made = await reopened(url)
    first_id = made.identity.store_id
    await made.discard()
    if url.startswith("postgres"):  # nothing of it is left in the database
        import asyncpg

        db = await asyncpg.connect(url)
        try:
            left = await db.fetchval(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public'"
            )
            functions = await db.fetchval(
                "SELECT count(*) FROM pg_proc WHERE proname = 'hms_commit'"
            )
        finally:
            await db.close()
        assert left == 0 and functions == 0
    again = await reopened(url)
    assert again.identity.fresh and again.identity.store_id != first_id
    await again.close()
    kept = await reopened(url)  # not fresh: discard leaves it
    await kept.discard()
    last = await reopened(url)
    assert not last.identity.fresh and last.identity.store_id == again.identity.store_id
    await last.close()


async def test_a_closed_store_says_so(url: str) -> None:
    closed = await reopened(url)
    await closed.close()
    with pytest.raises(StoreError, match="not open"):
        await closed.load(["wf1"])
    with pytest.raises(StoreError, match="not open"):
        await closed.commit(started("wf1"))


async def test_rescue_copies_a_file_or_says_there_is_none(store: Store, url: str) -> None:
    await store.commit(started("wf1"))
    if url.startswith("sqlite:"):
        copy = await store.rescue()
        with sqlite3.connect(copy) as db:
            assert db.execute("SELECT id FROM workflows").fetchall() == [("wf1",)]
    else:
        with pytest.raises(StoreError, match="nothing to rescue"):
            await store.rescue()


@pytest.mark.parametrize(
    "bad",
    [
        "sqlite:////proc/no/such/folder/hms.db",
        "postgresql://hms:s3cret@127.0.0.1:1/hms",  # nothing listens on port 1
    ],
)
async def test_a_store_that_cannot_be_opened_is_one_clear_error(bad: str) -> None:
    store = open_store(bad)
    with pytest.raises(StoreError) as failed:
        await store.open()
    assert failed.value.kind == "unopenable"
    assert "cannot open the store" in str(failed.value) and "s3cret" not in str(failed.value)
    await store.close()


async def test_a_missing_postgres_database_is_named(postgres_url: str) -> None:
    missing = postgres_url.rsplit("/", 1)[0] + "/hms_no_such_database"
    store = open_store(missing)
    with pytest.raises(StoreError, match='"hms_no_such_database" does not exist') as failed:
        await store.open()
    assert failed.value.kind == "unopenable"


def test_store_urls_choose_the_backend() -> None:
    from hms_mgmt.store.postgres import PostgresStore
    from hms_mgmt.store.sqlite import SQLiteStore

    assert isinstance(open_store("sqlite:///x.db"), SQLiteStore)
    assert isinstance(open_store("postgresql://u@h/db"), PostgresStore)
    assert isinstance(open_store("postgres://u:p@h:5432/db"), PostgresStore)
    with pytest.raises(ValueError, match="unsupported store URL"):
        open_store("mysql://h/db")


async def test_store_backup_sends_postgres_to_pg_dump(tmp_path: Path) -> None:
    from tests.conftest import hms

    url = "postgresql://hms:s3cret@127.0.0.1:1/hms"
    done = await hms("store", "backup", str(tmp_path / "copy.db"), "--store-url", url)
    assert done.returncode == 2 and "pg_dump" in done.stderr, done.stderr


@pytest.mark.parametrize("version", [1, 2, 3, 4, 5, 6, 7])
async def test_a_postgres_store_of_an_older_schema_is_migrated_in_order(
    postgres_url: str, version: int
) -> None:
    import asyncpg

    from hms_mgmt.store import postgres_schema as postgres

    db = await asyncpg.connect(postgres_url)
    try:  # a store as an earlier release left it: migrations up to ``version`` only
        async with db.transaction():
            await db.execute(
                "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, "
                "applied_at DOUBLE PRECISION NOT NULL)"
            )
            for applied in range(1, version + 1):
                for sql in postgres.MIGRATIONS[applied]:
                    await db.execute(sql)
                await db.execute("INSERT INTO schema_migrations VALUES ($1, 1.0)", applied)
            await db.execute("INSERT INTO meta VALUES ('store_id', 'old'), ('secret', '00')")
    finally:
        await db.close()
    store = open_store(postgres_url)
    await store.open()
    try:
        assert store.identity.store_id == "old" and not store.identity.fresh
        await store.claim("engine-a")
        await store.commit(started("wf1", attributes={"application_id": "A-17"}, priority=1))
        assert (await store.load(["wf1"]))["wf1"][0].priority == 1  # schema 5
        child = started("wf2").workflows["wf2"]
        child.parent = {"id": "wf1", "step": "a", "seq": 1, "index": 0, "close": "abandon"}
        child.children = {"ids": [], "done": {}}
        child.branches = {"step": "a", "seq": 1, "state": "open", "branches": []}
        await store.commit(Batch(workflows={"wf2": child}))
        loaded = (await store.load(["wf2"]))["wf2"][0]  # schema 7: parent and children
        assert loaded.parent == child.parent and loaded.children == child.children
        assert loaded.branches == child.branches  # schema 8: a fan-out's branches
        found = await store.list_workflows(attributes={"application_id": "A-17"})
        assert [w.id for w in found] == ["wf1"]
    finally:
        await store.close()
    assert await migrations(postgres_url) == list(range(1, postgres.SCHEMA_VERSION + 1))
    db = await asyncpg.connect(postgres_url)
    try:  # migration 6: compensated workflows are finished ones too (retention finds them)
        index = await db.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'workflows_finished'"
        )
    finally:
        await db.close()
    assert "compensated" in index


async def test_a_postgres_store_comes_back_after_its_connections_are_cut(
    postgres_url: str,
) -> None:
    import asyncpg

    store = open_store(postgres_url)
    await store.open()
    try:
        await store.claim("engine-a")
        await store.commit(started("wf1"))
        admin = await asyncpg.connect(postgres_url)
        try:  # what a server restart or a network cut does to the pool's connections
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await admin.close()
        failures = 0
        for _ in range(5):  # the engine holds a failed batch and tries it again
            try:
                await store.commit(started("wf2"))
                break
            except StoreError as exc:
                assert exc.kind == "io" and not exc.lasting, exc
                failures += 1
        assert failures <= 1
        assert set(await store.load(["wf1", "wf2"])) == {"wf1", "wf2"}
        assert await store.watch(probe=True) is None
    finally:
        await store.close()


async def test_limited_runs_are_the_current_runs_out_or_queued_of_a_step(store: Store) -> None:
    for workflow_id in ("wf1", "wf2", "wf3", "wf4"):
        await store.commit(started(workflow_id))
    _wf2, run2 = (await store.load(["wf2"]))["wf2"]
    wf3, run3 = (await store.load(["wf3"]))["wf3"]
    _wf4, run4 = (await store.load(["wf4"]))["wf4"]
    assert run2 is not None and run3 is not None and run4 is not None
    await store.commit(
        Batch(
            workflows={"wf3": evolve(wf3, status=WorkflowStatus.CANCELLED)},
            runs={
                ("wf2", 1): evolve(run2, status=StepStatus.QUEUED),
                ("wf3", 1): evolve(run3, status=StepStatus.CANCELLED),
                ("wf4", 1): evolve(run4, status=StepStatus.SUCCEEDED),
            },
        )
    )
    assert sorted(await store.limited_runs("w", "a")) == ["wf1", "wf2"]  # out, queued
    (_, queued) = (await store.load(["wf2"]))["wf2"]
    assert queued is not None and queued.status == "queued"
    assert await store.limited_runs("w", "b") == []
    assert await store.limited_runs("other", "a") == []


async def test_ids_are_counted_by_prefix_over_the_keys_range(store: Store, url: str) -> None:
    """How a family's size is read (machine.children.MAX_FAMILY): the ids that start with
    ``root.`` are the root's descendants; its neighbours in the key's order are not counted
    (``r`` itself, ``r-x``, ``r/``-like ids, ``ra.1``), whatever the database's collation."""
    ids = ["r", "r.a.1.0", "r.a.1.1", "r.a.1.0.b.1.0", "r-x", "r:1", "ra.1", "q.r.1", "r_"]
    for workflow_id in ids:
        await store.commit(started(workflow_id))
    counts = await store.count_prefixed(["r.", "r.a.1.0", "ra", "x.", "r"])
    assert counts == {"r.": 3, "r.a.1.0": 2, "ra": 1, "x.": 0, "r": 8}
    assert await store.count_prefixed([]) == {}
    if url.startswith("postgres"):  # under a C collation, a range scan of the primary key
        import asyncpg

        db = await asyncpg.connect(url)
        try:
            collation = await db.fetchval(
                "SELECT datcollate FROM pg_database WHERE datname = current_database()"
            )
            if collation.split(".")[0] not in ("C", "POSIX"):
                pytest.fail(f"the test database's collation is {collation}, not C")
            await db.execute("SET enable_seqscan = off")  # a few rows: ask for the index
            plan = "\n".join(
                row[0]
                for row in await db.fetch(
                    "EXPLAIN SELECT count(*) FROM workflows WHERE id >= $1 AND id < $2", "r.", "r/"
                )
            )
        finally:
            await db.close()
        assert "Index Cond" in plan and "workflows_pkey" in plan, plan
