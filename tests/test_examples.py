"""The grant example, run as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, Processes


def run_example(module: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_one_process_demo_runs() -> None:
    done = run_example("examples.grant_approval.demo", {})
    assert done.returncode == 0, done.stderr
    assert "3/3 grant workflows succeeded (in-memory bus, one process)" in done.stdout


def test_the_quick_start_falls_back_to_the_memory_bus_without_a_broker() -> None:
    done = run_example(
        "examples.grant_approval", {"HMS_BROKER_URL": "amqp://guest:guest@127.0.0.1:1/"}
    )
    assert done.returncode == 0, done.stderr
    assert "No RabbitMQ reachable" in done.stdout
    assert "3/3 grant workflows succeeded (in-memory bus" in done.stdout


@pytest.mark.broker
def test_the_quick_start_runs_through_the_daemon_and_the_broker(vhost: str, tmp_path: Path) -> None:
    env = {"HMS_BROKER_URL": vhost, "HMS_STORE_URL": f"sqlite:///{tmp_path / 'grant.db'}"}
    for _ in range(2):  # and again: the vhost knows its store from the first run
        done = run_example("examples.grant_approval", env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Started the engine daemon" in done.stdout
        assert "3/3 grant workflows succeeded in" in done.stdout


@pytest.mark.broker
def test_the_quick_start_uses_an_engine_that_already_serves_the_vhost(
    vhost: str, tmp_path: Path, processes: Processes
) -> None:
    processes.engine(vhost, f"sqlite:///{tmp_path / 'running.db'}")
    deadline = time.monotonic() + 60  # serving before the example's own engine tries
    while '"engine started"' not in processes.log("engine"):
        assert time.monotonic() < deadline, processes.log("engine")
        time.sleep(0.1)
    env = {"HMS_BROKER_URL": vhost, "HMS_STORE_URL": f"sqlite:///{tmp_path / 'grant.db'}"}
    done = run_example("examples.grant_approval", env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "An engine already serves" in done.stdout
    assert "3/3 grant workflows succeeded in" in done.stdout


@pytest.mark.broker
def test_the_quick_start_runs_again_from_another_clone(vhost: str, tmp_path: Path) -> None:
    """Without HMS_STORE_URL the example keeps one store per user, so a second clone (another
    working directory) is not refused as a new store for the vhost."""
    env = {"HMS_BROKER_URL": vhost, "HMS_STORE_URL": "", "XDG_DATA_HOME": str(tmp_path / "data")}
    for folder in ("clone-1", "clone-2"):
        (tmp_path / folder).mkdir()
        done = subprocess.run(
            [sys.executable, "-m", "examples.grant_approval", "1"],
            cwd=tmp_path / folder,
            env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "1/1 grant workflows succeeded in" in done.stdout
    assert (tmp_path / "data" / "hms-mgmt" / "grant-example.db").exists()
