"""Issue 13 on a real 3-node RabbitMQ cluster and PostgreSQL: engines (one active, the others
standing by) and step services as real processes, each given the three nodes in
``HMS_BROKER_URL``; then a node or the engines die while work runs. Every case reports
started, succeeded, lost and doubled in the chaos suite's table. Pass: nothing lost, no
transition applied twice, and the work finishes.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest

from tests.chaos.harness import Report
from tests.cluster.harness import ClusterCase
from tests.cluster.node import RabbitCluster
from tests.conftest import wait_until

# The first case also boots the cluster (20-40 s here).
pytestmark = [pytest.mark.chaos, pytest.mark.broker, pytest.mark.timeout(300)]


def passed(report: Report) -> None:
    assert report.lost == 0, report
    assert report.duplicate_transitions == 0, report
    assert report.succeeded == report.started, report


async def succeeded(case: ClusterCase) -> int:
    return await asyncio.to_thread(case.count_succeeded)


async def one_active(case: ClusterCase, timeout: float = 60) -> str:
    """The one engine serving, once exactly one does."""
    names = await wait_until(
        lambda: _exactly_one(case), timeout=timeout, interval=0.2, what="one active engine"
    )
    return str(names[0])


async def _exactly_one(case: ClusterCase) -> list[str] | None:
    names = await case.active()
    return names if len(names) == 1 else None


async def running(case: ClusterCase, engines: int = 2, workers: int = 2) -> str:
    for n in range(engines):
        case.start_engine(f"engine-{n + 1}")
    for n in range(workers):
        case.start_worker(f"worker-{n + 1}")
    return await one_active(case)


async def test_a_broker_node_killed_and_restarted_while_work_runs(
    case: ClusterCase, cluster: RabbitCluster
) -> None:
    """kill -9 of the node every process connected to first (and where the queues' leaders
    are): every connection fails over to another node, the quorum queues elect new leaders,
    and the node rejoins when restarted."""
    await running(case)
    victim = cluster.nodes[0]
    listed = cluster.nodes[1].ctl("list_queues", "-p", case.vhost, "name", "type", "members", "-q")
    queues = {line.split("\t")[0]: line.split("\t")[1:] for line in listed.splitlines()}
    for name in ("hms.engine.commands", "hms.engine.results", "grant.validateApp.dlq"):
        kind, members = queues[name]
        assert kind == "quorum" and all(n.name in members for n in cluster.nodes), (name, kind)
    async with case.client() as client:
        starting = asyncio.ensure_future(case.start_many(client, 400, sleep=0.02))
        await wait_until(lambda: succeeded(case), timeout=60, what="a first workflow")
        began = time.monotonic()
        await asyncio.to_thread(victim.kill)
        before = await succeeded(case)
        await wait_until(
            lambda: _more(case, before + 50), timeout=90, interval=0.2, what="work with a node down"
        )
        resumed = time.monotonic() - began
        await asyncio.to_thread(victim.launch)
        await asyncio.to_thread(victim.await_up)
        ids = await asyncio.wait_for(starting, timeout=120)
        more = await case.start_many(client, 50)  # after the node is back
        await case.wait_terminal(ids + more, timeout=120)
    assert await case.wait_outbox_empty() == 0
    await one_active(case)
    downtimes = reconnects(case)
    assert downtimes, "no connection moved to another node"
    note = (
        f"kill -9 of {victim.name.split('@')[0]}; {len(downtimes)} connections back on another "
        f"node in {min(downtimes):.1f}-{max(downtimes):.1f}s; 50 more done {resumed:.1f}s after"
    )
    passed(await case.report(ids + more, notes=[note]))


def reconnects(case: ClusterCase) -> list[float]:
    """Each ``broker.reconnected`` downtime logged by the case's engines and step services."""
    found = []
    for log in case.tmp_path.glob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if '"broker.reconnected"' in line:
                downtime = json.loads(line).get("downtime")
                if downtime is not None:
                    found.append(float(downtime))
    return found


async def _more(case: ClusterCase, target: int) -> bool:
    return await succeeded(case) >= target


async def test_the_active_engine_killed_mid_run(case: ClusterCase) -> None:
    """kill -9 of the serving engine of three: a standby takes the lock, claims the store and
    serves on, with nothing lost and no transition applied twice."""
    first = await running(case, engines=3)
    async with case.client() as client:
        starting = asyncio.ensure_future(case.start_many(client, 300, sleep=0.02))
        await wait_until(lambda: succeeded(case), timeout=60, what="a first workflow")
        began = time.monotonic()
        case.kill_engine(first)
        second = await one_active(case, timeout=30)
        takeover = time.monotonic() - began
        ids = await asyncio.wait_for(starting, timeout=120)
        await case.wait_terminal(ids, timeout=120)
    assert second != first
    assert await case.wait_outbox_empty() == 0
    note = f"kill -9 of the active engine ({first}); {second} active {takeover:.1f}s after"
    passed(await case.report(ids, notes=[note]))


async def test_the_active_engine_frozen_past_its_lease_then_thawed(case: ClusterCase) -> None:
    """SIGSTOP of the serving engine: its lock connection misses its heartbeats, the broker
    frees the lock, the standby takes over; thawed, the old engine's commits are refused by
    the store's fencing (no transition doubled) and it stands by again."""
    first = await running(case)
    async with case.client() as client:
        starting = asyncio.ensure_future(case.start_many(client, 300, sleep=0.02))
        await wait_until(lambda: succeeded(case), timeout=60, what="a first workflow")
        began = time.monotonic()
        case.kill_engine(first, signal.SIGSTOP)
        try:
            second = await wait_until(
                lambda: _other_active(case, first), timeout=30, interval=0.2, what="a takeover"
            )
            takeover = time.monotonic() - began
        finally:
            case.kill_engine(first, signal.SIGCONT)
        await wait_until(
            lambda: _role_is(case, first, "standby"), timeout=30, what="the thawed one standing by"
        )
        ids = await asyncio.wait_for(starting, timeout=120)
        await case.wait_terminal(ids, timeout=120)
    assert await case.wait_outbox_empty() == 0
    assert "this process stands by again" in case.log(first)
    note = f"SIGSTOP of the active engine ({first}); {second} active {takeover:.1f}s after; thawed"
    passed(await case.report(ids, notes=[note]))


async def _other_active(case: ClusterCase, frozen: str) -> str | None:
    others = [name for name in case.engines if name != frozen]
    roles = await asyncio.gather(*(case.role(name) for name in others))
    return next((n for n, r in zip(others, roles, strict=True) if r == "active"), None)


async def _role_is(case: ClusterCase, name: str, role: str) -> bool:
    return await case.role(name) == role


async def test_all_engines_killed_at_once_and_restarted(case: ClusterCase) -> None:
    """kill -9 of all three engines together, then all three started again: one of them
    serves, publishes what the outbox still held, and the work finishes."""
    await running(case, engines=3)
    async with case.client() as client:
        starting = asyncio.ensure_future(case.start_many(client, 300, sleep=0.02))
        await wait_until(lambda: succeeded(case), timeout=60, what="a first workflow")
        children = [child for child, _ in case.engines.values()]
        for child in children:
            child.kill()
        for child in children:
            await asyncio.to_thread(child.wait, 30)
        names = list(case.engines)
        began = time.monotonic()
        for name in names:
            case.start_engine(name)
        serving = await one_active(case, timeout=60)
        back = time.monotonic() - began
        ids = await asyncio.wait_for(starting, timeout=120)
        await case.wait_terminal(ids, timeout=120)
    assert await case.wait_outbox_empty() == 0
    note = f"kill -9 of all 3 engines at once, restarted; {serving} active {back:.1f}s after"
    passed(await case.report(ids, notes=[note]))


async def test_a_second_engine_on_sqlite_is_refused_from_another_node(
    case: ClusterCase, cluster: RabbitCluster
) -> None:
    """One engine per vhost on SQLite holds on a cluster too: the lock queue's name is the
    cluster's, so a second engine connected to another node is refused, naming the first."""
    first = case.start_engine("sqlite-1", HMS_STORE_URL=f"sqlite:///{case.tmp_path / 'one.db'}")
    await wait_until(
        lambda: '"engine started"' in case.log("sqlite-1"), timeout=60, what="the first engine"
    )

    # The first holds the lock through node 1; the second connects to node 3 (first in its list).
    listed = cluster.nodes[0].ctl("list_connections", "-q", "vhost", "name")  # cluster-wide
    ports = {line.rsplit(":", 1)[1] for line in listed.splitlines() if case.vhost in line}
    assert ports == {str(cluster.nodes[0].port)}, listed
    last_first = ",".join(node.url(case.vhost) for node in reversed(cluster.nodes))
    second = case.start_engine(
        "sqlite-2",
        HMS_STORE_URL=f"sqlite:///{case.tmp_path / 'two.db'}",
        HMS_BROKER_URL=last_first,
    )
    code = await asyncio.to_thread(second.wait, 60)
    said = case.log("sqlite-2")
    assert code == 5, said  # EXIT_REFUSED
    assert "another engine already serves" in said and f"pid {first.pid}" in said, said
    assert first.poll() is None


async def test_engines_added_and_removed_while_work_runs(case: ClusterCase) -> None:
    """An operator's rolling change: engines started beside the serving one, the serving one
    stopped (SIGTERM, as a deploy does), another added, a standby stopped, and the new serving
    one stopped too, all while workflows start and run. Each stop hands over to a standby."""
    first = await running(case, engines=1)
    async with case.client() as client:
        starting = asyncio.ensure_future(case.start_many(client, 400, sleep=0.02))
        await wait_until(lambda: succeeded(case), timeout=60, what="a first workflow")
        case.start_engine("engine-2")
        case.start_engine("engine-3")
        await wait_until(lambda: _standing_by(case, 2), timeout=60, what="two engines standing by")
        handovers = []
        began = time.monotonic()
        case.kill_engine(first, signal.SIGTERM)
        second = await wait_until(
            lambda: _other_active(case, first), timeout=30, interval=0.2, what="a handover"
        )
        handovers.append(time.monotonic() - began)
        case.start_engine("engine-4")
        await wait_until(lambda: _standing_by(case, 2), timeout=60, what="engine-4 standing by")
        standby = next(n for n in ("engine-3", "engine-2", "engine-4") if n != second)
        case.kill_engine(standby, signal.SIGTERM)
        began = time.monotonic()
        case.kill_engine(second, signal.SIGTERM)
        third = await wait_until(
            lambda: _active_among(case, {first, second, standby}),
            timeout=30,
            interval=0.2,
            what="a second handover",
        )
        handovers.append(time.monotonic() - began)
        ids = await asyncio.wait_for(starting, timeout=120)
        await case.wait_terminal(ids, timeout=120)
    for name in (first, second, standby):
        assert await asyncio.to_thread(case.engines[name][0].wait, 30) == 0, case.log(name)
    assert await case.wait_outbox_empty() == 0
    note = (
        f"4 engines came and 3 went (SIGTERM); serving: {first}, then {second}, then {third}; "
        f"handed over in {min(handovers):.1f}-{max(handovers):.1f}s"
    )
    passed(await case.report(ids, notes=[note]))


async def _standing_by(case: ClusterCase, count: int) -> bool:
    roles = await asyncio.gather(*(case.role(name) for name in case.engines))
    return roles.count("standby") >= count and roles.count("active") == 1


async def _active_among(case: ClusterCase, gone: set[str]) -> str | None:
    others = [name for name in case.engines if name not in gone]
    roles = await asyncio.gather(*(case.role(name) for name in others))
    return next((n for n, r in zip(others, roles, strict=True) if r == "active"), None)


async def test_a_broker_node_stopped_gracefully_then_started(
    case: ClusterCase, cluster: RabbitCluster
) -> None:
    """``rabbitmqctl stop_app`` on the node every process connected to first (a node taken out
    for maintenance) while work runs: the broker closes its connections, they move to the other
    nodes, work goes on with the node out, and the node rejoins on ``start_app``."""
    await running(case)
    node = cluster.nodes[0]
    async with case.client() as client:
        starting = asyncio.ensure_future(case.start_many(client, 300, sleep=0.02))
        await wait_until(lambda: succeeded(case), timeout=60, what="a first workflow")
        began = time.monotonic()
        await asyncio.to_thread(node.ctl, "stop_app")  # graceful: it takes seconds
        stopped = time.monotonic() - began
        out = await case.start_many(client, 50)  # with the node out
        await case.wait_terminal(out, timeout=90)
        resumed = time.monotonic() - began
        await asyncio.to_thread(node.ctl, "start_app")
        await asyncio.to_thread(node.await_up)
        ids = await asyncio.wait_for(starting, timeout=120)
        back = await case.start_many(client, 50)  # after the node is back
        await case.wait_terminal(ids + out + back, timeout=120)
    assert await case.wait_outbox_empty() == 0
    await one_active(case)
    note = (
        f"stop_app of {node.name.split('@')[0]} ({stopped:.1f}s) mid-run, then start_app; "
        f"50 started with it out done {resumed:.1f}s after the stop began"
    )
    passed(await case.report(ids + out + back, notes=[note]))
