"""Workload pieces shared by the driver and the peer modules.

Importable with the standard library alone (``run_peer.py`` uses the helpers too); the Redis client
is imported lazily, only inside the peer virtualenvs.

Completion signal: the 4th step (``finalize``) runs ``n = INCR payload["counter"]`` and, only when
``n == payload["expect"]``, ``RPUSH payload["done"] payload["wf"]``. The driver BLPOPs ``done``.
So a workflow costs one Redis round trip (one INCR) and the driver is woken once per throughput run
(expect = N) or once per workflow in the lone-latency test (expect = i + 1 on a sequential counter).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis
    import redis.asyncio

STEPS = ("validateApp", "creditCheck", "scheduleInspection", "finalize")

AMQP_URL_ENV = "HMS_BENCH_AMQP_URL"
REDIS_URL_ENV = "HMS_BENCH_REDIS_URL"
CONFIRMS_ENV = "HMS_BENCH_CONFIRMS"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

Payload = dict[str, Any]


def make_payload(wf: str, counter: str, expect: int, done: str) -> Payload:
    """A ~200-byte JSON document, including the completion-signal fields."""
    return {
        "wf": wf,
        "applicant": {"name": "Jane Q. Example", "id": "APP-0042-7731"},
        "program": "home-repair-grant",
        "amount": 12500,
        "currency": "EUR",
        "counter": counter,
        "expect": expect,
        "done": done,
    }


def payload_size(payload: Payload) -> int:
    return len(json.dumps(payload, separators=(",", ":")))


def apply_step(payload: Payload, step: str) -> Payload:
    """The trivial handler body: copy the document and add one key."""
    out = dict(payload)
    out[step] = "ok"
    return out


def redis_url() -> str:
    return os.environ.get(REDIS_URL_ENV, DEFAULT_REDIS_URL)


def confirms_enabled() -> bool:
    return os.environ.get(CONFIRMS_ENV, "0") == "1"


# --- completion signal ----------------------------------------------------------------------------

_sync_client: tuple[int, redis.Redis] | None = None
_async_client: tuple[int, redis.asyncio.Redis] | None = None


def _sync_redis() -> redis.Redis:
    """One client per process (prefork children must not share the parent's sockets)."""
    global _sync_client
    if _sync_client is None or _sync_client[0] != os.getpid():
        import redis

        _sync_client = (os.getpid(), redis.Redis.from_url(redis_url()))
    return _sync_client[1]


def _async_redis() -> redis.asyncio.Redis:
    global _async_client
    if _async_client is None or _async_client[0] != os.getpid():
        import redis.asyncio

        _async_client = (os.getpid(), redis.asyncio.Redis.from_url(redis_url()))
    return _async_client[1]


def signal_done(payload: Payload) -> None:
    client = _sync_redis()
    if client.incr(payload["counter"]) == payload["expect"]:
        client.rpush(payload["done"], payload["wf"])


async def signal_done_async(payload: Payload) -> None:
    client = _async_redis()
    if await client.incr(payload["counter"]) == payload["expect"]:
        await client.rpush(payload["done"], payload["wf"])


# --- measurement helpers --------------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _read_stat(pid: str) -> tuple[int, float] | None:
    """(ppid, utime + stime + cutime + cstime in seconds) from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)
    ticks = sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
    return int(fields[1]), ticks / _CLK_TCK


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used by a process and all its live descendants (reaped ones count in cutime)."""
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read_stat(entry)
        if stat is None:
            continue
        pid = int(entry)
        children.setdefault(stat[0], []).append(pid)
        cpu[pid] = stat[1]
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo.extend(children.get(pid, []))
    return total


def find_broker_pid() -> int | None:
    """PID of the local RabbitMQ (Erlang VM) process, if it can be seen in /proc."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() == "beam.smp":
                    return int(entry)
        except OSError:
            continue
    return None


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: list[float]) -> float:
    return statistics.median(values)
