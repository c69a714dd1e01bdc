"""The README's ``hms`` walk-through, run as written: its lines are read out of README.md and
run against a real engine and the grant step service on a vhost of the test's own."""

from __future__ import annotations

import json
import re
import shlex

import pytest

from tests.conftest import ROOT, Processes, free_port, hms, http_get, wait_until

pytestmark = pytest.mark.broker

INTRO = "point `hms` at the engine, and walk one grant through"


def walkthrough() -> list[str]:
    """The shell lines of the README's walk-through block, comments dropped."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(re.escape(INTRO) + r".*?```sh\n(.*?)```", readme, re.S)
    assert block, "the README's walk-through block is gone"
    return [line.split("  #")[0].strip() for line in block[1].splitlines() if line.strip()]


async def waiting(workflow_id: str, env: dict[str, str]) -> bool:
    """The grant waits for its site inspection, which waits for the report."""
    inspection = f"{workflow_id}.scheduleInspection.1.0"
    shown = await hms("workflow", "show", workflow_id, env=env)
    if f"waiting   for child workflow {inspection}" not in shown.stdout:
        return False
    shown = await hms("workflow", "show", inspection, env=env)
    return "waiting   for signal 'inspectionReport'" in shown.stdout


def test_the_walkthrough_is_what_the_test_expects() -> None:
    lines = walkthrough()
    assert lines[0].startswith("hms engine --http-port 8080") and lines[0].endswith("&")
    signal = "hms workflow signal $ID.scheduleInspection.1.0 inspectionReport"
    assert any(line.startswith(signal) for line in lines)
    assert lines[-1] == "hms workflow show $ID --follow"


async def test_the_readme_walkthrough_runs_as_written(
    processes: Processes, vhost: str, store_url: str
) -> None:
    engine_port, worker_port = free_port(), free_port()
    ports = {"8080": str(engine_port), "8081": str(worker_port)}
    env = {"HMS_BROKER_URL": vhost, "HMS_STORE_URL": store_url}
    variables: dict[str, str] = {}

    def words(line: str) -> list[str]:
        for name, value in variables.items():
            line = line.replace(f"${name}", value)
        args = shlex.split(line)
        assert args[0] == "hms", line
        return [ports.get(arg, arg) for arg in args[1:]]

    async def engine_ready() -> bool:
        status, _ = await http_get(f"http://127.0.0.1:{engine_port}/readyz")
        _, body = await http_get(f"http://127.0.0.1:{engine_port}/api/definitions")
        return status == 200 and "grantApproval" in body  # the step service has said hello

    outputs: list[str] = []
    for line in walkthrough():
        if line.endswith("&"):  # a daemon, in the background
            command = words(line.rstrip("&"))
            processes.spawn(command[0], ["-m", "hms_mgmt", *command], env)
            continue
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            env[name] = ports.get(value, value)
            continue
        await wait_until(engine_ready, timeout=30, interval=0.2, what="engine and step service")
        assigned = re.fullmatch(r"(\w+)=\$\((.*)\)", line)
        done = await hms(*words(assigned[2] if assigned else line), env=env)
        assert done.returncode == 0, (line, done.stdout, done.stderr, processes.log("engine"))
        outputs.append(done.stdout)
        if assigned:
            variables[assigned[1]] = done.stdout.strip()
        if line == "hms workflow show $ID":  # the README says it waits for the report
            await wait_until(
                lambda: waiting(variables["ID"], env),
                timeout=30,
                interval=0.2,
                what="the wait for the report",
            )

    assert "resumed by 'inspectionReport'" in outputs[-2]
    assert "status    succeeded" in outputs[-1] or "workflow succeeded" in outputs[-1]
    shown = await hms("workflow", "show", variables["ID"], "-o", "json", env=env)
    state = json.loads(shown.stdout)
    assert state["status"] == "succeeded"
    assert state["output"]["inspection_report"] == {"passed": True, "inspector": "R. Diaz"}
    assert state["output"]["approved"] is True
