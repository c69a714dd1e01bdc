"""What a newcomer trips on (issue 12): one port variable with three meanings, errors that do
not say what to do, and JSON logs interleaved with plain-text tracebacks."""

from __future__ import annotations

import json

import pytest

from hms_mgmt.settings import Settings
from tests.conftest import Processes, free_port, hms, http_get, wait_until


def test_the_engine_and_a_step_service_have_a_port_setting_each() -> None:
    env = {"HMS_HTTP_PORT": "8080", "HMS_WORKER_HTTP_PORT": "8081"}
    settings = Settings.from_env(env)
    assert (settings.http_port, settings.worker_http_port) == (8080, 8081)
    assert settings.resolved_engine_url == "http://127.0.0.1:8080"  # hms finds the engine
    with pytest.raises(ValueError, match="HMS_WORKER_HTTP_PORT must be a port number"):
        Settings.from_env({"HMS_WORKER_HTTP_PORT": "eighty"})
    with pytest.raises(ValueError, match="0-65535"):
        Settings.from_env({}, worker_http_port=70000)


@pytest.mark.broker
async def test_engine_and_worker_both_come_up_with_hms_http_port_exported(
    processes: Processes, vhost: str, store_url: str
) -> None:
    """``export HMS_HTTP_PORT=...`` as the README suggests for ``hms``: the engine serves on it,
    the step service does not try to (it has HMS_WORKER_HTTP_PORT), and hms finds the engine."""
    engine_port, worker_port = free_port(), free_port()
    exported = {
        "HMS_BROKER_URL": vhost,
        "HMS_STORE_URL": store_url,
        "HMS_HTTP_PORT": str(engine_port),
    }
    engine = processes.spawn("engine", ["-m", "hms_mgmt", "engine"], exported)
    plain = processes.spawn(
        "worker", ["-m", "hms_mgmt", "worker", "tests.services:grant"], exported
    )
    probed = processes.spawn(
        "probed",
        ["-m", "hms_mgmt", "worker", "tests.services:grant"],
        {**exported, "HMS_WORKER_HTTP_PORT": str(worker_port)},
    )

    async def ready(port: int) -> bool:
        return (await http_get(f"http://127.0.0.1:{port}/readyz"))[0] == 200

    await wait_until(lambda: ready(engine_port), timeout=30, interval=0.2, what="the engine")
    await wait_until(lambda: ready(worker_port), timeout=30, interval=0.2, what="the worker")
    listed = await hms("workflow", "list", "-o", "json", env=exported)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []
    for child, name in ((engine, "engine"), (plain, "worker"), (probed, "probed")):
        assert child.poll() is None, processes.log(name)
        assert "address already in use" not in processes.log(name)
