"""The store interface: the engine's only durable state.

The engine is the store's only writer. Everything one batch of events
changes (workflows, runs, history, outbox rows to publish, outbox rows
confirmed) is written by :meth:`Store.commit` in one transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from hms_mgmt.definitions import UnloadableDefinition, WorkflowDefinition
from hms_mgmt.errors import StoreError
from hms_mgmt.records import StepRun, TypePause, Workflow
from hms_mgmt.schedules import Schedule


@dataclass(frozen=True)
class OutboxRow:
    """A message a committed transition causes; deleted once the broker confirms it."""

    message_id: str
    exchange: str
    routing_key: str
    body: bytes
    headers: dict[str, Any]
    created_at: float


@dataclass
class Batch:
    """Everything one transaction writes."""

    workflows: dict[str, Workflow] = field(default_factory=dict)
    runs: dict[tuple[str, int], StepRun] = field(default_factory=dict)
    history: list[tuple[str, float, str, dict[str, Any]]] = field(default_factory=list)
    outbox: list[OutboxRow] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)
    requests: list[tuple[str, Any, float]] = field(default_factory=list)  # request id, reply, at
    schedules: dict[str, Schedule | None] = field(default_factory=dict)  # None: delete it
    attributes: dict[tuple[str, str], str] = field(default_factory=dict)  # (workflow id, key)
    # (workflow name, step or ""): a type pause to keep, or None to drop it
    type_pauses: dict[tuple[str, str], TypePause | None] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(
            self.workflows
            or self.runs
            or self.history
            or self.outbox
            or self.sent
            or self.requests
            or self.schedules
            or self.attributes
            or self.type_pauses
        )


@dataclass(frozen=True)
class StoreIdentity:
    """Who a store is: a random id made with it, and the secret its step tokens are signed with."""

    store_id: str
    secret: bytes
    fresh: bool  # this open created the store


@dataclass(frozen=True)
class BatchReads:
    """What a batch needs from the store, read in one go."""

    state: dict[str, tuple[Workflow, StepRun | None]]
    keys: dict[str, str]  # idempotency key -> workflow id
    answered: dict[str, Any]  # request id -> the reply given


@dataclass(frozen=True)
class HistoryEntry:
    at: float
    kind: str
    detail: dict[str, Any]


def prefix_range(prefix: str) -> tuple[str, str]:
    """The ids that start with ``prefix`` (of an id's characters, ASCII) are those in
    ``[low, high)`` in byte order: ``prefix`` itself, and it with its last character next."""
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)


class Store(Protocol):
    """Every method raises :class:`hms_mgmt.errors.StoreError` when the store itself fails."""

    url: str
    identity: StoreIdentity

    async def open(self) -> None:
        """Open or create the store; :class:`hms_mgmt.errors.StoreError` names what is wrong."""
        ...

    async def close(self) -> None: ...

    async def exclude_others(self, wait: float) -> None:
        """Before :meth:`open`, for an engine: keep other engines out of a store that cannot
        be shared (SQLite: an OS lock on the file until :meth:`close`; waits up to ``wait``
        seconds for one that is stopping, then raises :class:`StoreError` of kind
        ``in_use``). PostgreSQL is shared by design: nothing to do."""
        ...

    async def discard(self) -> None:
        """Close and delete a store this process has just created (a refused start)."""
        ...

    def check_file(self) -> StoreError | None:
        """A cheap check, made before every ack, that the store is still where it was opened."""
        ...

    async def watch(self, *, probe: bool) -> StoreError | None:
        """The store's health, checked every second: ``probe`` commits a tiny write to prove it can.

        It also does the store's upkeep (checkpoints, reclaiming freed space) in small steps.
        """
        ...

    async def claim(self, owner: str) -> None:
        """Make ``owner`` the store's only writer: a commit by any other then fails (fencing)."""
        ...

    async def rescue(self) -> str:
        """Copy what the store holds (its last committed state) to a new file; return its path.

        For a store whose file was deleted under the engine: what it committed lives on in
        the open file until the engine lets go of it.
        """
        ...

    async def owner(self) -> str | None:
        """The engine that last claimed the store."""
        ...

    async def prune(self, before: float, limit: int) -> int:
        """Delete up to ``limit`` workflows that finished before ``before``; return how many."""
        ...

    async def size(self) -> int:
        """Bytes the store takes on disk."""
        ...

    async def definitions(self) -> list[WorkflowDefinition | UnloadableDefinition]:
        """Every stored version of every definition, oldest first; one that no longer passes
        the checks as what keeps it from loading."""
        ...

    async def save_definition(self, definition: WorkflowDefinition, now: float) -> None: ...

    async def load(self, workflow_ids: Sequence[str]) -> dict[str, tuple[Workflow, StepRun | None]]:
        """Workflows with their current run; ids that are not stored are left out."""
        ...

    async def reads_for_batch(
        self, workflow_ids: Sequence[str], keys: Sequence[str], request_ids: Sequence[str]
    ) -> BatchReads:
        """:meth:`load`, :meth:`find_by_idempotency_key` and :meth:`request_replies` at once."""
        ...

    async def count_prefixed(self, prefixes: Sequence[str]) -> dict[str, int]:
        """For each prefix, how many workflow ids start with it: a range scan of the primary
        key (:func:`prefix_range`), how a family's size is read."""
        ...

    async def find_by_idempotency_key(self, keys: Sequence[str]) -> dict[str, str]:
        """Idempotency key -> workflow id, for the keys already used."""
        ...

    async def workflow_with_runs(self, workflow_id: str) -> tuple[Workflow, list[StepRun]] | None:
        """A workflow and all its runs, in order (for ``status``)."""
        ...

    async def attributes(self, workflow_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        """The business keys of these workflows (those with none are left out)."""
        ...

    async def run(self, workflow_id: str, seq: int) -> StepRun | None: ...

    async def history(self, workflow_id: str) -> list[HistoryEntry]: ...

    async def request_replies(self, request_ids: Sequence[str]) -> dict[str, Any]:
        """Replies already given to requests (cancel, retry, signal), by request id."""
        ...

    async def commit(self, batch: Batch) -> None: ...

    async def unsent(self) -> list[OutboxRow]:
        """Outbox rows not yet confirmed, oldest first (published again at start-up)."""
        ...

    async def due_timers(self, until: float, limit: int) -> list[tuple[str, str, float]]:
        """(workflow id, timer kind, due time) of timers due by ``until``, soonest first."""
        ...

    async def list_workflows(
        self,
        *,
        status: str | None = None,
        name: str | None = None,
        limit: int = 50,
        attributes: Mapping[str, str] | None = None,
        before: tuple[float, str] | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[Workflow]:
        """The newest workflows first (by ``created_at``, then id); with ``attributes``, only
        those with every one of these business keys (the index on (key, value) finds them);
        with ``before`` (a ``created_at`` and an id: the last one of a page), only those after
        it in that order, the next page (keyset paging, not OFFSET); with ``since`` and
        ``until``, only those created in [since, until) (seconds since the epoch)."""
        ...

    async def count_by_status(self) -> dict[str, int]: ...

    async def stuck_counts(self, before: float) -> dict[tuple[str, str], int]:
        """(workflow, step) -> current runs still waiting to start since before ``before``."""
        ...

    async def limited_runs(self, name: str, step: str) -> list[str]:
        """The workflows of type ``name`` not finished whose current run is a run of ``step``
        out (pending or running) or waiting for a slot (queued): from which an engine
        rebuilds its concurrency slots at start-up."""
        ...

    async def overdue_timers(self, now: float) -> dict[tuple[str, str], float]:
        """(workflow, timer kind) -> the earliest due time of the timers due by ``now``
        that have not fired (a wait's timeout, a deadline, a delayed or backed-off run)."""
        ...

    async def schedules(self) -> list[Schedule]: ...

    async def type_pauses(self) -> list[TypePause]:
        """The workflow types (and steps of types) paused now."""
        ...

    async def forget_requests(self, before: float, limit: int = 1000) -> int:
        """Drop up to ``limit`` answers kept for repeated requests older than ``before``."""
        ...
