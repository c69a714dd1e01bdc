"""What the HTTP API reads of the engine (its ``EngineView``), and nothing else.

A mixin of :class:`hms_mgmt.engine.engine.Engine`: the readiness checks, the engines known,
and reads of the store and of the stages' state. None of it changes anything, so
``engine.py`` keeps only the wiring and the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from bus_adapters.base import Bus, BusError, redact_url
from hms_mgmt.definitions import WorkflowDefinition
from hms_mgmt.engine.vhost import EngineRecord, Standby, VhostLock, read_record
from hms_mgmt.records import TypePause, WorkflowState
from hms_mgmt.store.base import HistoryEntry, Store

if TYPE_CHECKING:
    from hms_mgmt.engine.answers import Answers
    from hms_mgmt.engine.health import StoreHealth
    from hms_mgmt.engine.registry import Registry
    from hms_mgmt.engine.relay import OutboxRelay
    from hms_mgmt.engine.retention import Retention


class EngineView(Protocol):
    """All the HTTP API knows of the engine: its checks, reads of its store, and its bus (the
    API's changes go over it, as requests, like any client's)."""

    bus: Bus

    @property
    def stuck_after(self) -> float: ...

    def checks(self) -> dict[str, bool]: ...

    @property
    def role(self) -> str: ...

    async def engines(self) -> list[dict[str, Any]]: ...

    def definitions(self) -> list[WorkflowDefinition]: ...

    def paused_types(self) -> list[TypePause]: ...

    def dead_letter_queues(self) -> list[str]: ...

    async def state(self, workflow_id: str) -> WorkflowState | None: ...

    async def history(self, workflow_id: str) -> list[HistoryEntry]: ...

    async def workflows(
        self,
        *,
        status: str | None = None,
        name: str | None = None,
        limit: int = 50,
        attributes: Mapping[str, str] | None = None,
        before: tuple[float, str] | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[dict[str, Any]]: ...

    async def counts(self) -> tuple[dict[str, int], dict[tuple[str, str], int], int]: ...

    async def status_counts(self) -> dict[str, int]: ...

    async def overdue_timers(self) -> dict[tuple[str, str], float]: ...

    async def prune(self, before: float) -> int: ...


class EngineReads:
    """The engine's reads; the attributes are the engine's own (set in its ``__init__``)."""

    bus: Bus
    store: Store
    registry: Registry
    type_pauses: dict[tuple[str, str], TypePause]
    answers: Answers
    relay: OutboxRelay
    retention: Retention
    health: StoreHealth
    standby: Standby | None
    engine_id: str
    exit_code: int
    ready: asyncio.Event
    active: bool
    clock: Callable[[], float]
    _stopping: asyncio.Event
    _vhost: VhostLock | None

    @property
    def stuck_after(self) -> float:
        return self.answers.stuck_after

    def checks(self) -> dict[str, bool]:
        """Readiness, check by check: started, connected, holding the vhost, store committing.

        A standby has ``active`` false (and is not ready: it serves nothing until it takes over).
        """
        checks = {
            "engine": self.ready.is_set() and self.exit_code == 0,
            "broker": self.bus.connected,
            "vhost_lock": self._vhost is not None and not self._vhost.cut_off,
            "store": self.health.ready,
        }
        if self.standby is not None:
            checks["active"] = self.active
        return checks

    @property
    def role(self) -> str:
        """``active``, ``standby``, ``starting`` or ``stopped``."""
        if self.active:
            return "active"
        if self.standby is not None and self.standby.waiting:
            return "standby"
        return "stopped" if self.exit_code or self._stopping.is_set() else "starting"

    async def engines(self) -> list[dict[str, Any]]:
        """The engines known: the active one from the vhost's record, and this one if it is
        standing by (other standbys are not recorded anywhere: each answers for itself)."""
        found: list[dict[str, Any]] = []
        record: EngineRecord | None = None
        if self.bus.connected:
            with contextlib.suppress(BusError):
                record = await read_record(self.bus)
        if record is not None:
            found.append(
                {
                    "role": "active",
                    "engine_id": record.engine_id,
                    "host": record.host,
                    "pid": record.pid,
                    "since": record.started_at,
                    "store": record.store,
                    "this": record.engine_id == self.engine_id,
                }
            )
        if self.role != "active" and self.standby is not None and self.standby.since is not None:
            found.append(
                {
                    "role": self.role,
                    "engine_id": self.engine_id,
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "since": self.standby.since,
                    "store": redact_url(self.store.url),
                    "this": True,
                }
            )
        return found

    def definitions(self) -> list[WorkflowDefinition]:
        """The latest version of each definition, by name."""
        return sorted(self.registry.latest.values(), key=lambda d: d.name)

    def paused_types(self) -> list[TypePause]:
        """The paused workflow types (and steps of types), as committed."""
        return sorted(self.type_pauses.values(), key=lambda p: p.key)

    def dead_letter_queues(self) -> list[str]:
        return self.registry.dead_letter_queues()

    async def state(self, workflow_id: str) -> WorkflowState | None:
        return await self.answers.state(workflow_id)

    async def history(self, workflow_id: str) -> list[HistoryEntry]:
        return await self.store.history(workflow_id)

    async def workflows(
        self,
        *,
        status: str | None = None,
        name: str | None = None,
        limit: int = 50,
        attributes: Mapping[str, str] | None = None,
        before: tuple[float, str] | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[dict[str, Any]]:
        """The newest workflows matching, as list entries (with their business keys); with
        ``before``, those after that (created_at, id) in that order: the next page."""
        return await self.answers.summaries(
            status=status,
            name=name,
            limit=limit,
            attributes=attributes,
            before=before,
            since=since,
            until=until,
        )

    async def status_counts(self) -> dict[str, int]:
        """Workflows by status (the statuses that have some)."""
        return await self.store.count_by_status()

    async def counts(self) -> tuple[dict[str, int], dict[tuple[str, str], int], int]:
        """Workflows by status, stuck steps by workflow and step, and the store's bytes."""
        counts, stuck, size = await asyncio.gather(
            self.store.count_by_status(),
            self.store.stuck_counts(self.clock() - self.stuck_after),
            self.store.size(),
        )
        return counts, stuck, size

    async def overdue_timers(self) -> dict[tuple[str, str], float]:
        """(workflow, timer kind) -> seconds its most overdue timer is past due, for the
        timers due and not fired: a wait's timeout, a deadline, a delayed or backed-off run."""
        now = self.clock()
        due = await self.store.overdue_timers(now)
        return {key: max(0.0, now - at) for key, at in due.items()}

    def outbox_backlog(self) -> tuple[int, float]:
        """Outbox rows committed and not yet confirmed by the broker, and the oldest's age
        in seconds: the relay's own bookkeeping, no store read."""
        return self.relay.backlog(self.clock())

    @property
    def is_ready(self) -> bool:
        """What ``/readyz`` answers: every check passes."""
        return all(self.checks().values())

    async def prune(self, before: float) -> int:
        """Delete the workflows that finished before ``before``, between batches; how many."""
        return await self.retention.prune(before)
