"""Operators' tools against real processes: the ``hms`` command, the engine's HTTP API,
health checks, Prometheus metrics and trace context, on the real RabbitMQ."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import hms_mgmt
from tests.conftest import Processes, free_port, hms, http_get, wait_until
from tests.test_metrics import check_with_promtool

pytestmark = pytest.mark.broker

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@dataclass
class Ops:
    """The engine (``hms engine``) and the test step service (``hms worker``), both serving HTTP."""

    processes: Processes
    engine_url: str
    worker_url: str
    token: str = ""

    async def hms(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        given = {"HMS_ENGINE_URL": self.engine_url, "HMS_HTTP_TOKEN": self.token}
        return await hms(*args, env={**given, **env})

    async def ok(self, *args: str) -> str:
        done = await self.hms(*args)
        assert done.returncode == 0, f"hms {' '.join(args)}: {done.stderr}"
        return done.stdout

    async def json(self, *args: str) -> Any:
        return json.loads(await self.ok(*args, "-o", "json"))

    async def finished(self, workflow_id: str, timeout: float = 30) -> dict[str, Any]:
        async def done() -> dict[str, Any] | None:
            state: dict[str, Any] = await self.json("workflow", "show", workflow_id)
            return state if state["status"] in ("succeeded", "failed", "cancelled") else None

        state: dict[str, Any] = await wait_until(done, timeout=timeout, interval=0.2)
        return state


async def start_ops(
    processes: Processes, vhost: str, store_url: str, **engine_env: str
) -> AsyncIterator[Ops]:
    engine_port, worker_port = free_port(), free_port()
    processes.spawn(
        "engine",
        ["-m", "hms_mgmt", "engine", "--store-url", store_url, "--http-port", str(engine_port)],
        {"HMS_BROKER_URL": vhost, **engine_env},
    )
    processes.spawn(
        "worker",
        ["-m", "hms_mgmt", "worker", "tests.services:grant", "--http-port", str(worker_port)],
        {"HMS_BROKER_URL": vhost},
    )
    ops = Ops(
        processes,
        f"http://127.0.0.1:{engine_port}",
        f"http://127.0.0.1:{worker_port}",
        engine_env.get("HMS_HTTP_TOKEN", ""),
    )

    async def ready() -> bool:
        status, _ = await http_get(f"{ops.engine_url}/readyz")
        if status != 200 or (await http_get(f"{ops.worker_url}/readyz"))[0] != 200:
            return False
        token = engine_env.get("HMS_HTTP_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        _, body = await http_get(f"{ops.engine_url}/api/definitions", headers=headers)
        return "traced" in body  # the step service's definitions have arrived

    await wait_until(ready, timeout=30, interval=0.2, what="engine and worker ready")
    try:
        yield ops
    finally:  # before the vhost goes: a handler still running can then report and finish
        await asyncio.to_thread(processes.stop_all)


@pytest.fixture
async def ops(processes: Processes, vhost: str, store_url: str) -> AsyncIterator[Ops]:
    async for running in start_ops(processes, vhost, store_url):
        yield running


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text as {(sample name, sorted labels): value}."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = await http_get(f"{url}/metrics")
    assert status == 200, body
    return samples(body)


def delta(before: dict[Any, float], after: dict[Any, float], name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


# -- the command line ----------------------------------------------------------------


async def test_start_follow_show_and_list_a_grant_that_retried(ops: Ops) -> None:
    definitions = await ops.ok("definitions")
    assert "grantApproval" in definitions and "validateApp > creditCheck" in definitions
    names = {d["name"]: d for d in await ops.json("definitions")}
    assert names["doomedWithErrorPath"]["on_error"] == "notifyApplicant"

    payload = '{"application_id": "A-17", "fail_once": "creditCheck"}'
    workflow_id = (await ops.ok("workflow", "start", "grantApproval", "--input", payload)).strip()
    followed = await ops.hms("workflow", "show", workflow_id, "--follow")
    assert followed.returncode == 0, followed.stderr
    # The retry waits about a second: followed live, it shows up as a change line, unless
    # the machine was slow enough for it to be in the table the follow began with.
    assert "RuntimeError: creditCheck is unavailable (attempt 1)" in followed.stdout
    assert (
        "step 3 creditCheck attempt 2: succeeded" in followed.stdout
        or "creditCheck         2        succeeded" in followed.stdout
    ), followed.stdout
    assert followed.stdout.rstrip().endswith("workflow succeeded") or (
        "status    succeeded" in followed.stdout  # it had ended before the follow began
    ), followed.stdout

    state = await ops.json("workflow", "show", workflow_id, "--history")
    assert state["status"] == "succeeded"
    assert [(s["step"], s["attempt"], s["status"]) for s in state["steps"]] == [
        ("validateApp", 1, "succeeded"),
        ("creditCheck", 1, "failed"),
        ("creditCheck", 2, "succeeded"),
        ("scheduleInspection", 1, "succeeded"),
        ("finalize", 1, "succeeded"),
    ]
    assert state["trace_id"] and len(state["trace_id"]) == 32
    assert "retry_scheduled" in [event["kind"] for event in state["history"]]

    shown = await ops.ok("workflow", "show", workflow_id, "--history")
    assert f"workflow  {workflow_id}" in shown and "status    succeeded" in shown
    assert "creditCheck         2        succeeded" in shown
    assert "retry_scheduled" in shown

    listed = await ops.json("workflow", "list", "--status", "succeeded", "--name", "grantApproval")
    assert workflow_id in [w["workflow_id"] for w in listed]
    assert await ops.json("workflow", "list", "--status", "failed", "--name", "grantApproval") == []
    table = await ops.ok("workflow", "list", "--limit", "5")
    assert table.splitlines()[0].split() == [
        "ID",
        "NAME",
        "STATUS",
        "CREATED",
        "UPDATED",
        "ATTRIBUTES",
        "ERROR",
    ]


async def test_list_by_business_key_finds_exactly_one_workflow(ops: Ops) -> None:
    ids = {}
    for app, region in (("A-16", "north"), ("A-17", "north"), ("A-18", "south")):
        started = await ops.ok(
            "workflow", "start", "grantApproval", "--input", '{"tag": "creditCheck"}',
            "--attr", f"application_id={app}", "--attr", f"region={region}",
        )  # fmt: skip
        ids[app] = started.strip()
    listed = await ops.json("workflow", "list", "--attr", "application_id=A-17")
    assert [w["workflow_id"] for w in listed] == [ids["A-17"]]  # right after the start
    table = await ops.ok("workflow", "list", "--attr", "application_id=A-17")
    assert len(table.splitlines()) == 2 and ids["A-17"] in table
    assert "application_id=A-17 " in table and "region=north" in table  # (checked_by, if done)
    both = await ops.json(
        "workflow", "list", "--attr", "region=north", "--attr", "application_id=A-16"
    )
    assert [w["workflow_id"] for w in both] == [ids["A-16"]]
    north = await ops.json("workflow", "list", "--attr", "region=north")
    assert {w["workflow_id"] for w in north} == {ids["A-16"], ids["A-17"]}
    for workflow_id in ids.values():
        assert (await ops.finished(workflow_id))["status"] == "succeeded"
    # the handler of creditCheck added a key: its workflows are found by it
    checked = await ops.json("workflow", "list", "--attr", "checked_by=creditCheck")
    assert {w["workflow_id"] for w in checked} == set(ids.values())
    state = await ops.json("workflow", "show", ids["A-17"])
    assert state["attributes"] == {
        "application_id": "A-17",
        "region": "north",
        "checked_by": "creditCheck",
    }
    shown = await ops.ok("workflow", "show", ids["A-17"])
    assert "attrs     application_id=A-17 checked_by=creditCheck region=north" in shown
    refused = await ops.hms("workflow", "list", "--attr", "no-equals-sign")
    assert refused.returncode != 0 and "'no-equals-sign' is not KEY=VALUE" in refused.stderr
    refused = await ops.hms("workflow", "list", "--attr", "a.b=x")
    assert refused.returncode != 0 and "key 'a.b' is not a valid key" in refused.stderr


async def test_cancel_retry_and_the_dead_letter_queues(
    ops: Ops, client: hms_mgmt.Management
) -> None:
    slow = (await ops.ok("workflow", "start", "slow", "--input", '{"seconds": 10}')).strip()
    kept = await ops.ok("workflow", "signal", slow, "go", "--data", '{"n": 1}')
    assert kept.strip().endswith(
        "signal 'go' kept for a later wait (the workflow is not waiting for it now)"
    )
    assert (await ops.json("workflow", "signal", slow, "go"))["resumed"] is False
    assert (await ops.ok("workflow", "cancel", slow, "--reason", "not today")).strip() == (
        f"{slow}: cancelled"
    )
    state = await ops.json("workflow", "show", slow)
    assert state["status"] == "cancelled" and state["error"]["message"] == "not today"

    doomed = await ops.ok("workflow", "start", "doomed", "--input", '{"application_id": "D"}')
    doomed = doomed.strip()
    assert (await ops.finished(doomed))["status"] == "failed"
    failed = await ops.json("workflow", "list", "--status", "failed")
    assert [w["workflow_id"] for w in failed] == [doomed]
    assert failed[0]["error"]["message"] == "credit bureau down"

    async def in_dlq(count: int) -> bool:
        queues = {q["queue"]: q["messages"] for q in await ops.json("dlq", "list")}
        return queues["doomed.explode.dlq"] == count

    await wait_until(lambda: in_dlq(1), timeout=10, what="the given-up step in its DLQ")
    letters = await ops.json("dlq", "list", "doomed.explode")
    assert [(m["workflow_id"], m["reason"]) for m in letters] == [(doomed, "attempts exhausted")]

    # hms workflow retry settles the failed run's dead letter: it leaves the queue
    retried = await ops.json("workflow", "retry", doomed)
    assert retried == {"workflow_id": doomed, "status": "running", "dead_letters_settled": 1}
    after = await ops.json("dlq", "list", "doomed.explode")  # the retry may have failed again
    assert letters[0]["message_id"] not in [m["message_id"] for m in after]
    assert (await ops.finished(doomed))["status"] == "failed"
    await wait_until(lambda: in_dlq(1), timeout=10, what="a second given-up step")
    [second] = await ops.json("dlq", "list", "doomed.explode")

    # a retry by the client leaves it there; a replay then sees it is settled and resumes
    # nothing for it, and resumes the workflow from the third failure's letter
    await client.retry(doomed)
    assert (await ops.finished(doomed))["status"] == "failed"
    await wait_until(lambda: in_dlq(2), timeout=10, what="a third given-up step")
    [stale, third] = await ops.json("dlq", "list", "doomed.explode")
    assert stale == second and third["seq"] > stale["seq"]
    replayed = await ops.json("dlq", "replay", "doomed.explode", "--all")
    assert [(r["message_id"], r["outcome"]) for r in replayed] == [
        (stale["message_id"], "settled"),
        (third["message_id"], "resumed"),
    ]
    assert replayed[0]["detail"].startswith("settled: retried since, failed again at run")
    state = await ops.finished(doomed)
    assert [s["attempt"] for s in state["steps"]] == [1, 2, 1, 2, 1, 2, 1, 2]
    await wait_until(lambda: in_dlq(1), timeout=10, what="the replay's own given-up step")

    missing = await ops.hms("dlq", "replay", "doomed.explode", "--id", "no-such-message")
    assert (missing.returncode, missing.stdout) == (1, "")  # one error, no empty table
    assert "no message with id 'no-such-message' in doomed.explode.dlq" in missing.stderr
    assert (await ops.ok("dlq", "purge", "doomed.explode.dlq", "--yes")).strip() == (
        "purged 1 message(s) from doomed.explode.dlq"
    )
    assert await in_dlq(0)


async def test_a_retry_that_succeeded_leaves_no_dead_letter_to_replay(
    ops: Ops, client: hms_mgmt.Management, tmp_path: Path
) -> None:
    async def letters() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = await ops.json("dlq", "list", "gated.gate")
        return found

    async def failed_into_the_dlq(unlock: Path) -> str:
        started = await ops.ok(
            "workflow", "start", "gated", "--input", json.dumps({"unlock": str(unlock)})
        )
        workflow_id = started.strip()
        assert (await ops.finished(workflow_id))["status"] == "failed"
        await wait_until(letters, timeout=10, what="the given-up gate in its DLQ")
        return workflow_id

    # hms workflow retry: the dead letter leaves the queue with the retry
    first = tmp_path / "first"
    workflow_id = await failed_into_the_dlq(first)
    first.touch()
    retried = (await ops.ok("workflow", "retry", workflow_id)).strip()
    assert retried == f"{workflow_id}: running (1 dead letter(s) settled)"
    assert await letters() == []
    assert (await ops.finished(workflow_id))["status"] == "succeeded"
    assert await ops.json("dlq", "replay", "gated.gate", "--all") == []

    # client.retry: the letter stays, and a replay acks it as settled, resuming nothing
    second = tmp_path / "second"
    workflow_id = await failed_into_the_dlq(second)
    second.touch()
    await client.retry(workflow_id)
    assert (await client.wait(workflow_id, timeout=30)).status == "succeeded"
    [letter] = await letters()
    replayed = await ops.hms("dlq", "replay", "gated.gate", "--all")
    assert replayed.returncode == 0, replayed.stderr
    assert "settled: retried since, now succeeded" in replayed.stdout
    assert letter["message_id"] in replayed.stdout and await letters() == []
    state = await ops.json("workflow", "show", workflow_id)
    assert [(s["step"], s["status"]) for s in state["steps"]] == [
        ("gate", "failed"),
        ("gate", "succeeded"),
        ("after", "succeeded"),
    ]


async def test_bad_input_and_refusals_have_clear_messages_and_exit_codes(
    ops: Ops, tmp_path: Path
) -> None:
    cases: list[tuple[list[str], int, str]] = [
        (["workflow", "show", "no-such-id"], 1, "no workflow with id 'no-such-id'"),
        (["workflow", "cancel", "no-such-id"], 1, "no workflow with id 'no-such-id'"),
        (["workflow", "retry", "no-such-id"], 1, "no workflow with id 'no-such-id'"),
        (["workflow", "signal", "no-such-id", "go"], 1, "no workflow with id 'no-such-id'"),
        (["workflow", "signal", "x", "go", "--data", "{oops"], 2, "Invalid value for --data"),
        (["workflow", "signal", "x", "go", "--data", "{oops"], 2, "not valid JSON"),
        (["workflow", "signal", "x", "a.b"], 2, "'a.b' is not a signal name"),
        (["workflow", "start", "loanApproval"], 1, "workflow 'loanApproval' is not defined"),
        (["workflow", "start", "grantApproval", "--input", "{oops"], 2, "not valid JSON"),
        (
            ["workflow", "start", "grantApproval", "--input", f"@{tmp_path}/nope.json"],
            2,
            "cannot read",
        ),
        (["workflow", "start", "grant.approval"], 2, "is not a workflow name"),
        (["workflow", "list", "--status", "sleeping"], 2, "'sleeping' is not one of"),
        (["workflow", "list", "--limit", "0"], 2, "--limit"),
        (["dlq", "replay", "doomed.explode"], 2, "give exactly one of --id ID or --all"),
        (
            ["dlq", "list", "grantApproval.nowhere"],
            1,
            "'grantApproval.nowhere.dlq' is not a dead-letter queue of this engine's workflows "
            "('hms dlq list' lists them)",
        ),
        (["dlq", "replay", "nosuch", "--all"], 1, "'nosuch.dlq' is not a dead-letter queue"),
        (["dlq", "purge", "nosuch", "--yes"], 1, "('hms dlq list' lists them)"),
        (["dlq", "purge", "doomed.explode"], 1, "Aborted"),  # asks first; no answer is no
        (["nonsense"], 2, "No such command"),
    ]
    for args, code, message in cases:
        done = await ops.hms(*args)
        assert (done.returncode, message in done.stderr) == (code, True), (args, done.stderr)
        assert "/api/" not in done.stderr, (args, done.stderr)  # worded for hms users

    good = tmp_path / "application.json"
    good.write_text('{"application_id": "A-from-a-file"}')
    from_file = (await ops.ok("workflow", "start", "grantApproval", "--input", f"@{good}")).strip()
    state = await ops.finished(from_file)
    assert state["input"] == {"application_id": "A-from-a-file"}
    finished = await ops.hms("workflow", "cancel", from_file)
    assert finished.returncode == 1 and "already succeeded" in finished.stderr
    too_late = await ops.hms("workflow", "signal", from_file, "go")
    assert too_late.returncode == 1 and "already succeeded; cannot signal it" in too_late.stderr
    not_failed = await ops.hms("workflow", "retry", from_file)
    assert (
        not_failed.returncode == 1 and "only a failed workflow can be retried" in not_failed.stderr
    )

    nobody = await hms(
        "workflow", "list", env={"HMS_ENGINE_URL": f"http://127.0.0.1:{free_port()}"}
    )
    assert nobody.returncode == 3 and "the engine is unreachable" in nobody.stderr
    unset = await hms("workflow", "list", env={"HMS_ENGINE_URL": "", "HMS_HTTP_PORT": ""})
    assert unset.returncode == 2 and "no engine to talk to" in unset.stderr


async def test_the_daemons_through_hms_refuse_bad_setups(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'x.db'}"
    down = "amqp://guest:guest@127.0.0.1:1/"
    engine = await hms("engine", "--broker-url", down, "--store-url", store)
    assert engine.returncode == 3 and "cannot reach the broker" in engine.stderr
    worker = await hms("worker", "tests.services:grant", "--broker-url", down)
    assert worker.returncode == 3 and "cannot reach the broker" in worker.stderr
    missing = await hms("worker", "tests.nowhere:grant")
    assert missing.returncode == 2 and "cannot load 'tests.nowhere:grant'" in missing.stderr
    port = await hms("engine", "--http-port", "70000", "--store-url", store)
    assert port.returncode == 2 and "0-65535" in port.stderr
    helped = await hms("engine", "--help")
    assert helped.returncode == 0 and "--http-port" in helped.stdout
    assert "HMS_LIVENESS_LAG" in helped.stdout


# -- HTTP: health, metrics, tokens -------------------------------------------------------------


async def test_health_and_readiness(ops: Ops) -> None:
    assert await http_get(f"{ops.engine_url}/healthz") == (200, '{"status": "alive"}')
    status, body = await http_get(f"{ops.engine_url}/readyz")
    assert status == 200
    assert json.loads(body) == {
        "ready": True,
        "checks": {"engine": True, "broker": True, "vhost_lock": True, "store": True},
    }
    assert (await http_get(f"{ops.worker_url}/healthz"))[0] == 200
    status, body = await http_get(f"{ops.worker_url}/readyz")
    assert (status, json.loads(body)["checks"]) == (200, {"serving": True, "broker": True})
    assert (await http_get(f"{ops.engine_url}/nowhere"))[0] == 404


async def test_metrics_change_as_workflows_run_and_fail(
    ops: Ops, client: hms_mgmt.Management
) -> None:
    engine_before, worker_before = await scrape(ops.engine_url), await scrape(ops.worker_url)
    grants = [
        await client.start("grantApproval", {"application_id": f"M-{n}", "fail_once": f})
        for n, f in enumerate(["creditCheck", "none", "none"])
    ]
    doomed = await client.start("doomed", {"application_id": "M-doomed"})
    for started in [*grants, doomed]:
        await client.wait(started.workflow_id, timeout=30)

    async def scraped_all() -> dict[Any, float] | None:
        after = await scrape(ops.engine_url)
        done = delta(
            engine_before, after, "hms_dead_letters_total", workflow="doomed", step="explode"
        )
        return after if done == 1 else None

    engine_after = await wait_until(scraped_all, timeout=10)
    worker_after = await scrape(ops.worker_url)

    def engine(name: str, **labels: str) -> float:
        return delta(engine_before, engine_after, name, **labels)

    assert engine("hms_workflows_started_total", workflow="grantApproval") == 3
    assert engine("hms_workflows_started_total", workflow="doomed") == 1
    assert engine("hms_workflows_finished_total", workflow="grantApproval", status="succeeded") == 3
    assert engine("hms_workflows_finished_total", workflow="doomed", status="failed") == 1
    assert engine("hms_step_retries_total", workflow="grantApproval", step="creditCheck") == 1
    assert engine("hms_step_retries_total", workflow="doomed", step="explode") == 1
    assert (
        engine(
            "hms_step_duration_seconds_count",
            workflow="grantApproval",
            step="creditCheck",
            outcome="failed",
        )
        == 1
    )
    assert (
        engine(
            "hms_step_duration_seconds_count",
            workflow="grantApproval",
            step="finalize",
            outcome="succeeded",
        )
        == 3
    )
    assert engine_after[("hms_workflows_in_progress", ())] == 0
    assert ("hms_bus_reconnects_total", ()) in engine_after

    def worker(name: str, **labels: str) -> float:
        return delta(worker_before, worker_after, name, **labels)

    failed = {"workflow": "grantApproval", "step": "creditCheck", "outcome": "failed"}
    assert worker("hms_worker_steps_total", **failed) == 1
    assert worker("hms_worker_step_duration_seconds_count", **failed) == 1
    assert (
        worker("hms_worker_steps_total", workflow="doomed", step="explode", outcome="failed") == 2
    )
    _, text = await http_get(f"{ops.engine_url}/metrics")
    assert all(g.workflow_id not in text for g in [*grants, doomed])  # never a label
    for url in (ops.engine_url, ops.worker_url):  # as scraped: no *_created, promtool clean
        _, body = await http_get(f"{url}/metrics")
        assert "_created" not in body
        check_with_promtool(body.encode())
    for scraped in (engine_after, worker_after):  # both watch their event loop
        assert ("hms_event_loop_blocks_total", ()) in scraped
        assert 0 <= scraped[("hms_event_loop_lag_seconds", ())] < 1
    assert worker_after[("hms_worker_abandoned_threads_total", ())] == 0


async def test_a_workflow_in_progress_is_counted(ops: Ops, client: hms_mgmt.Management) -> None:
    async def in_progress(count: int) -> bool:
        return (await scrape(ops.engine_url))[("hms_workflows_in_progress", ())] == count

    started = await client.start("slow", {"seconds": 3})
    await wait_until(lambda: in_progress(1), timeout=10, what="one workflow in progress")
    await client.cancel(started.workflow_id)
    await wait_until(lambda: in_progress(0), timeout=10, what="none in progress")


async def test_beyond_loopback_changes_need_the_token(
    processes: Processes, vhost: str, store_url: str
) -> None:
    async for ops in start_ops(
        processes, vhost, store_url, HMS_HTTP_HOST="0.0.0.0", HMS_HTTP_TOKEN="s3cret"
    ):
        nobody = await ops.hms("workflow", "start", "grantApproval", HMS_HTTP_TOKEN="")
        assert nobody.returncode == 1 and "no token given" in nobody.stderr
        wrong = await ops.hms("workflow", "start", "grantApproval", HMS_HTTP_TOKEN="guess")
        assert wrong.returncode == 1 and "token refused" in wrong.stderr
        # Reads carry payloads (applicants' data): beyond loopback they need the token too.
        reader = await ops.hms("workflow", "list", HMS_HTTP_TOKEN="")
        assert reader.returncode == 1 and "no token given" in reader.stderr, reader
        assert await ops.json("workflow", "list") == []
        assert (await http_get(f"{ops.engine_url}/readyz"))[0] == 200  # probes stay open
        started = await ops.hms(
            "workflow", "start", "grantApproval", "--input", "{}", HMS_HTTP_TOKEN="s3cret"
        )
        assert started.returncode == 0, started.stderr
        assert (await ops.finished(started.stdout.strip()))["status"] == "succeeded"


async def test_beyond_loopback_reads_can_be_opened_by_the_operator(
    processes: Processes, vhost: str, store_url: str
) -> None:
    async for ops in start_ops(
        processes, vhost, store_url, HMS_HTTP_HOST="0.0.0.0", HMS_HTTP_OPEN_READS="1"
    ):
        assert await ops.json("workflow", "list") == []
        refused = await ops.hms("workflow", "start", "grantApproval")
        assert refused.returncode == 1 and "changes over HTTP are disabled" in refused.stderr


# -- trace context ------------------------------------------------------------------------------


async def test_the_trace_goes_from_start_to_the_handler_and_the_logs(
    ops: Ops, client: hms_mgmt.Management
) -> None:
    started = await client.start("traced", {}, traceparent=TP)
    state = await client.wait(started.workflow_id, timeout=30)
    assert state.status == "succeeded" and state.traceparent == TP
    trace_id = TP.split("-")[1]
    # the handler saw it as ctx.traceparent and ran in an OpenTelemetry span of that trace
    assert state.output == {"traceparent": TP, "span_trace_id": trace_id}
    shown = await ops.json("workflow", "show", started.workflow_id)
    assert shown["trace_id"] == trace_id

    failing = await client.start("doomed", {}, traceparent=TP)
    await client.wait(failing.workflow_id, timeout=30)

    def logged(name: str) -> list[dict[str, Any]]:
        lines = [
            json.loads(line) for line in ops.processes.log(name).splitlines() if line[:1] == "{"
        ]
        return [line for line in lines if line.get("workflow_id") == failing.workflow_id]

    await wait_until(lambda: logged("engine"), timeout=5)
    assert {line.get("trace_id") for line in logged("worker")} == {trace_id}
    assert {line.get("trace_id") for line in logged("engine")} == {trace_id}


async def test_start_wait_shows_the_ended_workflow_or_says_it_goes_on(ops: Ops) -> None:
    """``hms workflow start --wait``: one request (``POST /api/workflows`` with ``wait``)."""
    done = await ops.hms("workflow", "start", "grantApproval", "--input", '{"n": 1}', "--wait")
    assert done.returncode == 0, done.stderr
    assert "succeeded" in done.stdout and "finalize" in done.stdout, done.stdout
    state = await ops.json("workflow", "start", "grantApproval", "--wait")
    assert state["status"] == "succeeded" and len(state["steps"]) == 4, state

    going = await ops.hms(
        "workflow", "start", "slow", "--input", '{"seconds": 3}', "--wait", "--wait-timeout", "0.5"
    )
    assert going.returncode == 1, going.stderr
    assert re.search(r"still (pending|running) after 0.5s", going.stderr), going.stderr
    workflow_id = going.stderr.split("'hms workflow show ")[1].split()[0]
    assert (await ops.finished(workflow_id))["status"] == "succeeded"

    failed = await ops.hms("workflow", "start", "doomed", "--wait")
    assert failed.returncode == 1 and "failed" in failed.stdout, failed.stdout + failed.stderr

    refused = await ops.hms("workflow", "start", "grantApproval", "--wait", "--wait-timeout", "0")
    assert refused.returncode == 2, refused.stderr
