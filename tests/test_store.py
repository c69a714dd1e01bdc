"""The SQLite store: one transaction per batch, the outbox, timers."""

from __future__ import annotations

from pathlib import Path

import pytest

from hms_mgmt import machine
from hms_mgmt.definitions import WorkflowDefinition
from hms_mgmt.store.base import Batch, OutboxRow
from hms_mgmt.store.sqlite import SQLiteStore, path_of

DEFINITION = WorkflowDefinition.build("w", ["a", "b"]).with_version(1)


def test_store_urls() -> None:
    assert path_of("sqlite:///hms.db") == "hms.db"
    assert path_of("sqlite:////var/lib/hms.db") == "/var/lib/hms.db"
    assert path_of("sqlite:///:memory:") == ":memory:"


async def test_batches_commit_together_and_survive_reopening(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    store = SQLiteStore(url)
    await store.open()
    await store.save_definition(DEFINITION, 1.0)
    t = machine.start(DEFINITION, "wf1", {"p": 1}, 10.0, run_at=20.0)
    assert t.workflow is not None
    batch = Batch(
        workflows={"wf1": t.workflow},
        runs={(r.workflow_id, r.seq): r for r in t.runs},
        history=[("wf1", 10.0, kind, detail) for kind, detail in t.history],
        outbox=[OutboxRow("m1", "hms.steps", "w.a", b"{}", {"h": 1}, 10.0)],
    )
    await store.commit(batch)
    await store.close()

    again = SQLiteStore(url)
    await again.open()
    assert [d.name for d in await again.definitions()] == ["w"]
    loaded = await again.load(["wf1", "missing"])
    workflow, run = loaded["wf1"]
    assert "missing" not in loaded
    assert workflow.status == "scheduled" and workflow.input == {"p": 1}
    assert run is not None and run.step == "a" and run.due_at == 20.0
    assert [k.kind for k in await again.history("wf1")] == ["workflow_started", "step_scheduled"]
    assert [r.message_id for r in await again.unsent()] == ["m1"]
    assert await again.due_timers(15.0, 10) == []
    assert await again.due_timers(25.0, 10) == [("wf1", "run", 20.0)]
    await again.commit(Batch(sent=["m1"]))
    assert await again.unsent() == []
    assert await again.count_by_status() == {"scheduled": 1}
    await again.close()


async def test_a_failed_batch_leaves_nothing_behind(tmp_path: Path) -> None:
    store = SQLiteStore(f"sqlite:///{tmp_path / 'y.db'}")
    await store.open()
    t = machine.start(DEFINITION, "wf1", None, 10.0)
    assert t.workflow is not None
    row = OutboxRow("m1", "hms.steps", "w.a", b"{}", {}, 10.0)
    bad = Batch(
        workflows={"wf1": t.workflow}, outbox=[row], history=[("wf1", 1.0, "x", {"bad": object()})]
    )
    with pytest.raises(TypeError):
        await store.commit(bad)
    assert await store.load(["wf1"]) == {}
    assert await store.unsent() == []
    await store.close()


V1_WORKFLOWS = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema', '1');
CREATE TABLE workflows (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, version INTEGER NOT NULL, status TEXT NOT NULL,
    input TEXT, output TEXT, error TEXT, seq INTEGER NOT NULL, visits TEXT NOT NULL,
    timer_at REAL, timer_kind TEXT, wait TEXT, signals TEXT NOT NULL, idempotency_key TEXT UNIQUE,
    created_at REAL NOT NULL, updated_at REAL NOT NULL);
INSERT INTO workflows VALUES ('old', 'w', 1, 'succeeded', '{"p":1}', '1', NULL, 2, '{"a":1,"b":1}',
    NULL, NULL, NULL, '{}', NULL, 1.0, 2.0);
"""


async def test_a_schema_1_file_is_upgraded_in_place(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "v1.db"
    with sqlite3.connect(path) as db:
        db.executescript(V1_WORKFLOWS)
    store = SQLiteStore(f"sqlite:///{path}")
    await store.open()
    workflow, _ = (await store.load(["old"]))["old"]
    assert workflow.status == "succeeded" and workflow.traceparent is None
    assert workflow.priority == 3  # schema 7: a workflow from before has the default priority
    assert workflow.parent is None and workflow.children is None  # schema 9: no family
    assert workflow.branches is None  # schema 10: no fan-out
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    t = machine.start(DEFINITION, "new", None, 10.0, traceparent=tp, priority=1)
    assert t.workflow is not None
    t.workflow.retries = 2
    t.workflow.parent = {"id": "old", "step": "a", "seq": 1, "index": 0, "close": "terminate"}
    t.workflow.branches = {"step": "a", "seq": 1, "state": "open", "branches": []}
    await store.commit(
        Batch(workflows={"new": t.workflow}, attributes={("new", "application_id"): "A-17"})
    )
    assert await store.watch(probe=True) is None
    found = await store.list_workflows(attributes={"application_id": "A-17"})
    assert [w.id for w in found] == ["new"]
    new = (await store.load(["new"]))["new"][0]
    assert new.priority == 1 and new.parent is not None and new.parent["id"] == "old"
    assert new.branches == t.workflow.branches  # schema 10: a fan-out's branches
    await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("10",)
        applied = db.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
        assert applied == [(v,) for v in range(2, 11)]  # each, recorded
        finished = db.execute(  # schema 8: compensated workflows are finished ones too
            "SELECT sql FROM sqlite_master WHERE name = 'workflows_finished'"
        ).fetchone()[0]
        assert "'compensated'" in finished
        indexes = {
            row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
        }
    assert "workflows_created" in indexes
    assert "workflow_attributes_value" in indexes
    again = SQLiteStore(f"sqlite:///{path}")
    await again.open()  # a second open finds nothing to upgrade
    new = (await again.load(["new"]))["new"][0]
    assert new.traceparent == tp and new.retries == 2
    assert (await again.load(["old"]))["old"][0].retries == 0
    await again.close()


async def test_a_stored_definition_that_no_longer_passes_the_checks_is_left_out(
    tmp_path: Path,
) -> None:
    """A definition stored before a check was added (a rate of one run in 1e300 s) loads as
    what keeps it from loading, and the others load: the engine starts without it, saying
    why, rather than refusing to start on the whole store."""
    import json
    import sqlite3

    from hms_mgmt.definitions import Step, UnloadableDefinition

    url = f"sqlite:///{tmp_path / 'x.db'}"
    store = SQLiteStore(url)
    await store.open()
    for name in ("ok", "slow"):
        definition = WorkflowDefinition.build(name, [Step("a", rate_limit="1/s")])
        await store.save_definition(definition.with_version(1), 1.0)
    await store.close()
    with sqlite3.connect(path_of(url)) as db:
        (body,) = db.execute("SELECT body FROM definitions WHERE name = 'slow'").fetchone()
        forged = json.loads(body)
        forged["steps"][0]["rate_limit"] = "1e-300/s"
        db.execute("UPDATE definitions SET body = ? WHERE name = 'slow'", (json.dumps(forged),))
    again = SQLiteStore(url)
    await again.open()
    ok, slow = await again.definitions()
    await again.close()
    assert isinstance(ok, WorkflowDefinition) and ok.name == "ok"
    assert isinstance(slow, UnloadableDefinition)
    assert (slow.name, slow.version) == ("slow", 1)
    assert "one run in 10 years at least" in slow.problem
