"""Shared fixtures: a private vhost per broker test, in-memory brokers, helpers to run processes."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import hms_mgmt
from bus_adapters.memory import reset_brokers

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def broker_reachable(host: str = "127.0.0.1", port: int = 5672) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def rabbitmqctl(*args: str, node: str | None = None) -> str:
    command = ["rabbitmqctl", *(["-n", node] if node else []), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr or done.stdout}")
    return done.stdout


@pytest.fixture
def vhost(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh RabbitMQ vhost for one test; yields its AMQP URL. Fails (not skips) in CI."""
    if not broker_reachable():
        message = "RabbitMQ is not reachable on 127.0.0.1:5672"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    name = f"hms-test-{uuid.uuid4().hex[:10]}"
    rabbitmqctl(
        "eval",
        f'rabbit_vhost:add(<<"{name}">>, <<"tests">>), '
        f'rabbit_auth_backend_internal:set_permissions(<<"guest">>, <<"{name}">>, '
        f'<<".*">>, <<".*">>, <<".*">>, <<"tests">>).',
    )
    try:
        yield f"amqp://guest:guest@127.0.0.1:5672/{name}?name={request.node.name[:60]}"
    finally:
        rabbitmqctl("eval", f'rabbit_vhost:delete(<<"{name}">>, <<"tests">>).')


@pytest.fixture
def memory_url() -> Iterator[str]:
    yield f"memory://test-{uuid.uuid4().hex[:8]}"
    reset_brokers()


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'hms.db'}"


POSTGRES = os.environ.get("HMS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test (dropped after it); yields its URL.

    The server is ``HMS_TEST_POSTGRES`` (default ``postgresql://postgres@127.0.0.1:5432``,
    trust auth). Fails (not skips) in CI when the server or asyncpg is missing.
    """
    try:
        import asyncpg
    except ImportError:
        if IN_CI:
            pytest.fail("asyncpg is not installed (the dev extra brings it)")
        pytest.skip("asyncpg is not installed")

    async def admin(sql: str) -> None:
        db = await asyncpg.connect(f"{POSTGRES}/postgres", timeout=5)
        try:
            await db.execute(sql)
        finally:
            await db.close()

    name = f"hms_test_{uuid.uuid4().hex[:12]}"
    try:  # a loop of its own: sync fixtures run outside the test's loop
        asyncio.run(admin(f"CREATE DATABASE {name}"))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        message = f"PostgreSQL is not usable at {POSTGRES}: {exc}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield f"{POSTGRES}/{name}"
    finally:
        asyncio.run(admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


async def wait_until(
    predicate: Callable[[], Any], *, timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(interval)


class Processes:
    """Child processes of one test (engine daemon, step services), stopped at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.children: list[subprocess.Popen[bytes]] = []
        self.engine_url: str | None = None  # the engine's HTTP API, when it serves one

    def spawn(
        self, name: str, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with open(self.tmp_path / f"{name}.log", "ab") as log:  # the child keeps its own copy
            child = subprocess.Popen(
                [sys.executable, *args],
                cwd=ROOT,
                env={**os.environ, "HMS_LOG_FORMAT": "json", **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.children.append(child)
        return child

    def engine(self, broker_url: str, store_url: str, **env: str) -> subprocess.Popen[bytes]:
        return self.spawn(
            "engine",
            ["-m", "hms_mgmt.engine", "--broker-url", broker_url, "--store-url", store_url],
            env,
        )

    def worker(self, broker_url: str, target: str, **env: str) -> subprocess.Popen[bytes]:
        return self.spawn(
            "worker", ["-m", "hms_mgmt.worker", target], {"HMS_BROKER_URL": broker_url, **env}
        )

    def log(self, name: str) -> str:
        path = self.tmp_path / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @staticmethod
    def stop(child: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        return child.returncode

    def stop_all(self) -> None:
        for child in self.children:
            self.stop(child)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture
async def client(vhost: str) -> AsyncIterator[hms_mgmt.Management]:
    """A client on the test's vhost that knows the test services' workflows."""
    from tests.services import grant

    mgmt = hms_mgmt.init(service_name="test-client", broker_url=vhost, request_timeout=20)
    mgmt.definitions.update(grant.definitions)
    async with mgmt:
        yield mgmt


@pytest.fixture
def daemons(processes: Processes, vhost: str, store_url: str) -> Processes:
    """The engine daemon (serving HTTP) and the test step service, as processes on the test's vhost."""
    port = free_port()
    processes.engine(vhost, store_url, HMS_HTTP_PORT=str(port))
    processes.engine_url = f"http://127.0.0.1:{port}"
    processes.worker(vhost, "tests.services:grant")
    return processes


def free_port() -> int:
    """A port nothing listens on right now (for a child's HTTP server)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def http_get(
    url: str, timeout: float = 5.0, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    """Status and body of a GET, off the event loop; (0, reason) when nothing answers."""
    import urllib.error
    import urllib.request

    def get() -> tuple[int, str]:
        try:
            request = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:
            return 0, str(exc)

    return await asyncio.to_thread(get)


async def hms(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``hms`` command (``python -m hms_mgmt``) as a process and capture what it says."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "hms_mgmt", *args],
        cwd=ROOT,
        env={**os.environ, "HMS_LOG_FORMAT": "json", **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
