"""What a newcomer trips on (issue 12): one port variable with three meanings, errors that do
not say what to do, and JSON logs interleaved with plain-text tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hms_mgmt
from bus_adapters.base import BrokerConnectError, BusError, redact_url
from bus_adapters.rabbitmq import RabbitMQBus
from hms_mgmt.settings import Settings
from tests.conftest import ROOT, Processes, free_port, hms, http_get, rabbitmqctl, wait_until


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


# -- errors that say what to do ------------------------------------------------------


def _with_password(url: str, password: str) -> str:
    return url.replace("guest:guest@", f"guest:{password}@", 1)


async def test_the_broker_down_is_a_documented_hms_error() -> None:
    """Nothing listens: ``hms_mgmt.BrokerUnavailableError``, an ``HmsError`` (and still a
    ``BusError``, for code that catches that), naming the URL without its password."""
    url = f"amqp://guest:s3cret@127.0.0.1:{free_port()}/"
    client = hms_mgmt.init(service_name="newcomer", broker_url=url)
    with pytest.raises(hms_mgmt.BrokerUnavailableError) as caught:
        await client.start("grantApproval", {})
    await client.close()
    error = caught.value
    assert isinstance(error, hms_mgmt.HmsError) and isinstance(error, BusError)
    assert not error.refused and error.http_status == 503
    assert f"cannot connect to {redact_url(url)}" in str(error) and "s3cret" not in str(error)
    assert "BrokerUnavailableError" in hms_mgmt.__all__


@pytest.mark.broker
async def test_a_missing_vhost_is_named_and_a_wrong_password_is_called_one(vhost: str) -> None:
    missing = vhost.replace("/hms-test-", "/no-such-vhost-", 1)
    bus = RabbitMQBus(_with_password(missing, "guest"))
    with pytest.raises(BrokerConnectError) as caught:
        await bus.connect()
    name = missing.split("/")[3].split("?")[0]
    assert f"vhost '{name}' does not exist or access refused for user 'guest'" in str(caught.value)
    assert "Connection.OpenOk" not in str(caught.value) and caught.value.refused

    wrong = _with_password(vhost, "wrong-password")
    client = hms_mgmt.init(service_name="newcomer", broker_url=wrong)
    with pytest.raises(hms_mgmt.BrokerUnavailableError) as refused:
        await client.status("0" * 32)
    await client.close()
    assert refused.value.refused
    assert "refused the login of user 'guest': wrong user name or password" in str(refused.value)
    assert "wrong-password" not in str(refused.value)


@pytest.mark.broker
def test_the_example_reports_a_refused_login_instead_of_falling_back(vhost: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "examples.grant_approval", "1"],
        cwd=ROOT,
        env={**os.environ, "HMS_BROKER_URL": _with_password(vhost, "wrong-password")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert "refused the login of user 'guest'" in done.stderr
    assert "in-memory" not in done.stdout + done.stderr
    assert "wrong-password" not in done.stdout + done.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "hms_mgmt", "engine"],
        ["-m", "hms_mgmt.engine"],
        ["-m", "hms_mgmt", "store", "backup", "{tmp}/copy.db"],
    ],
    ids=["hms engine", "python -m hms_mgmt.engine", "hms store backup"],
)
@pytest.mark.parametrize(
    "store", ["{tmp}/no-such-folder/deeper", "/proc/hms/hms.db", "/proc/version"]
)
def test_a_store_that_cannot_be_opened_is_one_line_naming_it(
    command: list[str], store: str, tmp_path: Path
) -> None:
    """Before the broker is even tried: one line, the path and why, exit code 2."""
    path = store.format(tmp=tmp_path)
    if "no-such-folder" in path:  # a folder where the file should be, under a missing one
        os.makedirs(path)
    done = subprocess.run(
        [sys.executable, *(part.format(tmp=tmp_path) for part in command)],
        cwd=ROOT,
        env={
            **os.environ,
            "HMS_LOG_FORMAT": "json",
            "HMS_STORE_URL": f"sqlite:///{path}",
            "HMS_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2, lines
    assert len(lines) == 1 and path in lines[0], lines
    assert "Traceback" not in lines[0]


# -- logs: every line JSON, and the reconnect said in structured events -------------------


def _vhost_name(url: str) -> str:
    return url.split("/")[3].split("?")[0]


@pytest.mark.broker
async def test_a_dropped_connection_logs_json_lines_only_and_a_reconnected_event(
    processes: Processes, vhost: str, store_url: str
) -> None:
    engine = processes.engine(vhost, store_url)  # HMS_LOG_FORMAT=json, stdout and stderr
    worker = processes.worker(vhost, "tests.services:grant")
    await wait_until(lambda: '"engine started"' in processes.log("engine"), timeout=30)
    await wait_until(lambda: '"worker serving"' in processes.log("worker"), timeout=30)
    name = _vhost_name(vhost)
    listed = rabbitmqctl("list_connections", "pid", "vhost", "-q").splitlines()
    pids = [line.split("\t")[0] for line in listed if line.split("\t")[-1] == name]
    assert len(pids) >= 4, listed  # the engine's (consume, publish, lock), the worker's
    for pid in pids:
        rabbitmqctl("close_connection", pid, "newcomer test")

    def events(log: str, event: str) -> list[dict[str, object]]:
        return [e for e in map(json.loads, processes.log(log).splitlines()) if e["event"] == event]

    for log in ("engine", "worker"):

        def back(log: str = log) -> bool:
            return len(events(log, "broker.reconnected")) >= 2

        await wait_until(back, timeout=60, what=f"the {log} to reconnect")
    for child in (engine, worker):
        assert processes.stop(child) == 0
    for log in ("engine", "worker"):
        lines = processes.log(log).splitlines()
        for line in lines:
            json.loads(line)  # every line, the libraries' too
        assert not any("Traceback" in line for line in lines)
        lost = events(log, "broker.connection_lost")
        back = events(log, "broker.reconnected")
        assert {e["connection"] for e in lost} == {e["connection"] for e in back}, log
        for event in back:
            assert isinstance(event["downtime"], float) and event["reconnects"] >= 1
            assert "guest:guest" not in str(event["broker"])
        assert all(e["error"] for e in lost)
