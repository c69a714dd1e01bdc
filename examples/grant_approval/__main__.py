"""The grant example end to end: ``python -m examples.grant_approval [count]``.

With a RabbitMQ reachable (``HMS_BROKER_URL``, default the local one) it starts
the engine daemon and the grant step service as separate processes, submits
applications through the broker and prints each workflow's record. When nothing
listens there it says so and runs the one-process demo on the in-memory bus; when
the broker refuses the login or the vhost it says so and exits with code 3.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bus_adapters.base import BrokerConnectError, redact_url
from bus_adapters.nodes import connect_plain
from bus_adapters.rabbitmq import connect_error
from examples.grant_approval import demo, submit
from hms_mgmt.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


async def broker_problem(url: str) -> BrokerConnectError | None:
    """None if the broker takes our login, else what went wrong (``refused``: it said no)."""
    try:
        connection = await asyncio.wait_for(
            connect_plain(url, name="grant-demo", explain=connect_error), timeout=5
        )
    except TimeoutError:
        return BrokerConnectError(f"no answer from {redact_url(url)} within 5 s")
    except BrokerConnectError as exc:  # each node of a list named, with why
        return exc
    except ValueError as exc:  # not an AMQP URL (or list of them)
        return BrokerConnectError(str(exc))
    await connection.close()
    return None


def spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=out, stderr=out)


def example_store_url() -> str:
    """``HMS_STORE_URL`` if set, else one file per user, whatever the folder.

    The vhost remembers the store it was served from and refuses another, so every run of
    the example, from any clone, must use the same one (a relative ``hms_mgmt.db`` would be
    a new store in each folder).
    """
    if os.environ.get("HMS_STORE_URL"):
        return Settings.from_env().store_url
    data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    folder = data / "hms-mgmt"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'grant-example.db'}"


async def through_the_broker(url: str, count: int) -> int:
    store_url = example_store_url()
    with tempfile.TemporaryDirectory(prefix="hms-grant-") as folder:
        env = {
            **os.environ,
            "HMS_BROKER_URL": url,
            "HMS_STORE_URL": store_url,
            "HMS_LOG_FORMAT": "json",
        }
        logs = {name: Path(folder) / f"{name}.log" for name in ("engine", "service")}
        engine = spawn(["-m", "hms_mgmt.engine"], logs["engine"], env)
        service = spawn(
            ["-m", "hms_mgmt.worker", "examples.grant_approval.service:mgmt"], logs["service"], env
        )
        children = [service, engine]
        state = await engine_state(engine, logs["engine"])
        if state == "elsewhere":
            print(f"An engine already serves {redact_url(url)}: submitting through it.")
        elif state == "started":
            print(
                f"Started the engine daemon (pid {engine.pid}, store {store_url}) and the grant "
                f"step service (pid {service.pid}) on {redact_url(url)}"
            )
        try:
            os.environ["HMS_BROKER_URL"] = url
            code = 1 if state == "failed" else await submit.main(count)
        finally:
            for child in children:
                child.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 15
            for child in children:
                try:
                    child.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.kill()
        if code != 0:
            for name, path in logs.items():
                print(
                    f"--- {name} log ---\n{path.read_text(errors='replace')[-3000:]}",
                    file=sys.stderr,
                )
        return code


async def engine_state(engine: subprocess.Popen[bytes], log: Path) -> str:
    """``started``, ``elsewhere`` (another engine serves the vhost) or ``failed``."""
    for _ in range(100):  # an engine that is up within 10 s is up
        said = await asyncio.to_thread(log.read_text, errors="replace")
        code = engine.poll()
        if code is not None:
            return (
                "elsewhere" if code == 5 and "another engine already serves" in said else "failed"
            )
        if '"engine started"' in said:
            return "started"
        await asyncio.sleep(0.1)
    return "started"


async def main(count: int) -> int:
    url = Settings.from_env().broker_url
    problem = await broker_problem(url)
    if problem is None:
        return await through_the_broker(url, count)
    if problem.refused:
        # A broker listens but refuses us: the in-memory demo would hide a wrong password.
        print(f"RabbitMQ refused the connection: {problem}", file=sys.stderr)
        return 3
    print(
        f"No RabbitMQ reachable at {redact_url(url)} ({problem}; set HMS_BROKER_URL to use "
        "another): running the one-process demo on the in-memory bus instead."
    )
    return await demo.main(count)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)))
