"""One engine per vhost: a lock the broker holds for the engine's life, and the vhost's record.

Two engines on one vhost split its commands and outcomes between them and each trusts its
own state, so workflows stall or are refused as unknown. Whatever the store, the serving
engine therefore holds the exclusive queue ``hms.engine.lock`` on a connection of its own:
the broker frees it the moment that connection drops (a crash, a kill -9, or missed
heartbeats), and a second engine that finds it held refuses to start, naming the first
(SQLite), or stands by and takes over once it is freed (PostgreSQL: :class:`Standby`).

The vhost also remembers which store it was run with (``hms.engine.record``, one message):
an engine that comes up on a different store, such as a new empty file because the old
one was deleted or the working directory changed, refuses to start unless told
``--new-store``, so that a lost store is never replaced by an empty one without a word.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from bus_adapters.base import Bus, BusError, BusLock, Message, ResourceLockedError, redact_url
from hms_mgmt.errors import HmsError
from hms_mgmt.logs import get_logger
from hms_mgmt.store.base import StoreIdentity
from hms_mgmt.topology import ENGINE_LOCK_QUEUE, ENGINE_RECORD_QUEUE

log = get_logger("engine")


class StartRefused(HmsError):
    """The engine must not serve this vhost: another engine does, or it belongs to another store."""


@dataclass(frozen=True)
class EngineRecord:
    """Who serves (or last served) a vhost, and with which store."""

    engine_id: str
    store_id: str
    store: str
    host: str
    pid: int
    started_at: float

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started_at))
        return f"host {self.host}, pid {self.pid}, store {self.store}, since {since}"

    @classmethod
    def of(cls, body: bytes) -> EngineRecord | None:
        try:
            data: dict[str, Any] = json.loads(body)
            return cls(
                engine_id=str(data["engine_id"]),
                store_id=str(data["store_id"]),
                store=str(data["store"]),
                host=str(data["host"]),
                pid=int(data["pid"]),
                started_at=float(data["started_at"]),
            )
        except (ValueError, KeyError, TypeError):
            return None


async def read_record(bus: Bus) -> EngineRecord | None:
    """The vhost's record, left in place (None if it has none, or none readable)."""
    delivery = await bus.get(ENGINE_RECORD_QUEUE)
    if delivery is None:
        return None
    with contextlib.suppress(BusError):
        await delivery.reject(requeue=True)
    return EngineRecord.of(delivery.body)


async def take_vhost(
    bus: Bus,
    identity: StoreIdentity,
    store_url: str,
    engine_id: str,
    *,
    new_store: bool = False,
    wait: float = 5.0,
    standby: Standby | None = None,
) -> BusLock | None:
    """Hold the vhost's lock and record this engine in it; :class:`StartRefused` says why not.

    A lock still held is tried again for ``wait`` seconds: the broker frees a dead engine's
    lock as soon as it sees its connection close, which can take a moment after a restart.
    With ``standby`` (a shared store: PostgreSQL), a lock still held after that is waited
    for as a standby, tried every :data:`STANDBY_POLL` seconds, until it is free (then this
    engine takes over) or ``standby.stopping`` is set (then None).
    """
    deadline = time.monotonic() + wait
    where = redact_url(bus.url)
    while True:
        try:
            lock = await bus.hold(ENGINE_LOCK_QUEUE)
            break
        except ResourceLockedError:
            if time.monotonic() >= deadline:
                holder = await read_record(bus)
                who = holder.describe() if holder else "one whose record cannot be read"
                if standby is not None:
                    standby.begin(where, holder, who)
                    held = await standby.wait(bus)
                    if held is None:
                        return None
                    lock = held
                    break
                raise StartRefused(
                    f"another engine already serves {where}: {who}. One engine per vhost on "
                    "SQLite: stop that one first, or give this one another vhost (on "
                    "PostgreSQL, a second engine stands by instead)"
                ) from None
            await asyncio.sleep(0.25)
    try:
        record = await read_record(bus)
        if record is not None and record.store_id != identity.store_id and not new_store:
            fresh = "a new, empty store" if identity.fresh else "a different store"
            raise StartRefused(
                f"{where} was last served from store {record.store} (id {record.store_id}; "
                f"{record.describe()}), but {store_url} is {fresh} (id {identity.store_id}). "
                "If the old store is lost for good, start with --new-store to serve this vhost "
                "from this store; its workflows in flight will be refused as unknown. If it "
                "was moved, point HMS_STORE_URL at it"
            )
        if record is not None and record.store_id != identity.store_id:
            log.warning(
                "serving this vhost from a new store, as --new-store says",
                previous_store=record.store,
                previous_store_id=record.store_id,
                store=store_url,
            )
        mine = EngineRecord(
            engine_id=engine_id,
            store_id=identity.store_id,
            store=redact_url(store_url),
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=time.time(),
        )
        await bus.publish(
            Message(
                body=json.dumps(asdict(mine)).encode(),
                routing_key=ENGINE_RECORD_QUEUE,
                message_id=engine_id,
            )
        )
    except BaseException:
        await lock.release()
        raise
    return lock


STANDBY_POLL = 1.0  # seconds between a standby's tries of the vhost's lock


class Standby:
    """A standby's wait for the vhost's lock: who is active, since when, and the tries."""

    def __init__(self, stopping: asyncio.Event) -> None:
        self.stopping = stopping
        self.waiting = False  # standing by now
        self.since: float | None = None  # when this engine began to stand by (wall clock)
        self.active: EngineRecord | None = None  # the active engine's record, as read

    def begin(self, where: str, holder: EngineRecord | None, who: str) -> None:
        self.waiting = True
        self.since = time.time()
        self.active = holder
        log.warning(
            f"standing by: another engine serves {where}: {who}. This one takes over when "
            "that one's lock is freed (it died, or lost its broker connection)",
            active_pid=holder.pid if holder else None,
            active_host=holder.host if holder else None,
        )

    async def wait(self, bus: Bus) -> BusLock | None:
        """The lock once it is free, tried every :data:`STANDBY_POLL` s; None when stopping."""
        while not self.stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), STANDBY_POLL)
            if self.stopping.is_set():
                break
            try:
                lock = await bus.hold(ENGINE_LOCK_QUEUE)
            except ResourceLockedError:
                continue
            except BusError as exc:  # the broker away: keep standing by
                log.warning("standing by: cannot reach the broker to try the lock", error=str(exc))
                continue
            self.waiting = False
            return lock
        self.waiting = False
        return None


class VhostLock:
    """The vhost's lock while the engine serves; re-taken after a dropped connection.

    Cut off (the lock's connection gone), the engine takes no new work. When the lock is
    back, the engine carries on only if no other engine committed to the store meanwhile
    (its claim on the store is still the engine's); otherwise it must stop.
    """

    def __init__(self, bus: Bus, lock: BusLock) -> None:
        self._bus = bus
        self.lock = lock
        self.cut_off = False

    async def watch(
        self,
        stopping: asyncio.Event,
        still_ours: Callable[[], Awaitable[bool]],
        refused: Callable[[str], None],
    ) -> None:
        while not stopping.is_set():
            await self.lock.lost.wait()
            if stopping.is_set():
                return
            self.cut_off = True
            log.warning("lost the vhost lock with its connection: pausing until it is back")
            while not stopping.is_set():
                try:
                    self.lock = await self._bus.hold(ENGINE_LOCK_QUEUE)
                except ResourceLockedError:
                    refused("another engine took this vhost while this one was cut off")
                    return
                except BusError:
                    await asyncio.sleep(1.0)
                    continue
                if not await still_ours():
                    refused(
                        "another engine committed to this store while this one was cut off; "
                        "restart this engine to carry on from the store"
                    )
                    return
                self.cut_off = False
                log.info("holding the vhost lock again")
                break

    async def release(self) -> None:
        await self.lock.release()
