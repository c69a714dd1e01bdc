"""The engine's readiness follows its broker: on the private node, stopped and started again."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import pytest

from tests.chaos.harness import Case
from tests.conftest import free_port, hms, http_get, wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.broker]


async def test_the_engine_goes_unready_without_its_broker_and_ready_when_it_returns(
    case: Case,
) -> None:
    port = free_port()
    case.start_engine(HMS_HTTP_PORT=str(port))
    url = f"http://127.0.0.1:{port}"

    async def readiness(status: int) -> dict[str, bool] | None:
        got, body = await http_get(f"{url}/readyz")
        return json.loads(body)["checks"] if got == status else None

    async def reconnects() -> float:
        _, text = await http_get(f"{url}/metrics")
        line = next(x for x in text.splitlines() if x.startswith("hms_bus_reconnects_total"))
        return float(line.split()[-1])

    await wait_until(lambda: readiness(200), timeout=30, what="ready at first")
    assert await reconnects() == 0
    case.node.stop_app()
    try:
        checks = await wait_until(lambda: readiness(503), timeout=30, what="unready")
        assert checks == {"engine": True, "broker": False, "vhost_lock": False, "store": True}
        assert (await http_get(f"{url}/healthz"))[0] == 200  # alive all the same
        env = {"HMS_ENGINE_URL": url}
        refused = await hms("workflow", "start", "grant", env=env)
        assert refused.returncode == 3, refused.stderr
        assert "the engine is not connected to amqp://guest:***@" in refused.stderr
        listed = await hms("workflow", "list", env=env)  # the store answers reads meanwhile
        assert listed.returncode == 0 and listed.stdout.strip() == "(none)"
        queues = await hms("dlq", "list", env=env)
        assert queues.returncode == 3 and "not connected" in queues.stderr
    finally:
        case.node.start_app()
    await wait_until(lambda: readiness(200), timeout=60, what="ready again")
    # aio-pika calls its reconnect callbacks once the channels are restored, which may come
    # a moment after the connection (and so readiness) is back
    await wait_until(lambda: _at_least_one(reconnects), timeout=30, what="the reconnect counted")


async def _at_least_one(read: Callable[[], Awaitable[float]]) -> bool:
    return await read() >= 1
