"""The loading stage: before a batch is applied, read everything it needs, in a few queries.

The workflows its events are about (from the in-flight cache, else the store), the
workflows a start's idempotency key already named, the answers given before to requests
that may be repeated, the failed run a retry resumes, each due schedule's ticks, and the
size of each family a step's outcome starts children in.
Definitions are stored here too, before anything is applied, since storing one declares
its queues on the broker.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from hms_mgmt import schedules
from hms_mgmt.engine.cache import InFlight
from hms_mgmt.engine.events import Event, OutcomeEvent, RequestEvent, TickEvent, TimerEvent
from hms_mgmt.engine.registry import Registry
from hms_mgmt.engine.work import REDELIVERED, Work
from hms_mgmt.errors import DefinitionError, HmsError, StoreError, error_json
from hms_mgmt.machine import TIMER_ADMIT, TIMER_COMPENSATE, Slots, children, paused_by
from hms_mgmt.machine.limits import ACTIVE, Group
from hms_mgmt.records import Workflow
from hms_mgmt.schedules import Schedule
from hms_mgmt.store.base import Store
from hms_mgmt.wire.requests import (
    CancelRequest,
    DefineRequest,
    PauseRequest,
    PauseTypeRequest,
    RedeliveredRequest,
    ResetRequest,
    ResumeRequest,
    ResumeTypeRequest,
    RetryRequest,
    SignalRequest,
    StartRequest,
)

TYPE_PAGE = 1000  # workflows read at a time when a type's resume releases them

ANSWERED_ONCE = (
    StartRequest,
    CancelRequest,
    RetryRequest,
    SignalRequest,
    PauseRequest,
    ResumeRequest,
    ResetRequest,
    PauseTypeRequest,
    ResumeTypeRequest,
)
"""Requests whose answer is kept, so that a repeated one (a client's retry) gets the same."""


class Loader:
    def __init__(
        self,
        store: Store,
        cache: InFlight,
        registry: Registry,
        schedules: Mapping[str, Schedule],
        slots: Callable[[], Slots] | None = None,
    ) -> None:
        self._store = store
        self._cache = cache
        self._registry = registry
        self._schedules = schedules
        self._slots = slots

    async def load(self, events: list[Event], work: Work, now: float) -> None:
        wanted: set[str] = set()
        keys: list[str] = []
        request_ids: list[str] = []
        for event in events:
            if isinstance(event, RequestEvent):
                request = event.request
                if isinstance(request, DefineRequest):
                    await self._define(request, work, now)
                    continue
                if isinstance(request, ANSWERED_ONCE):
                    request_ids.append(request.request_id)
                if isinstance(request, StartRequest) and request.idempotency_key is not None:
                    keys.append(request.idempotency_key)
            if isinstance(event, TickEvent):
                schedule = self._schedules.get(event.schedule_id)
                if schedule is not None:
                    ticks, moved = schedules.due(schedule, now)
                    work.ticks[event.schedule_id] = (ticks, moved)
                    wanted.update(schedules.workflow_id(schedule.id, tick) for tick in ticks)
                continue
            if not event.workflow_id:
                continue
            if isinstance(event, TimerEvent) and event.kind == TIMER_ADMIT:
                wanted.update(self._line_heads([event.workflow_id], every_key=True))
            cached = self._cache.get(event.workflow_id)
            if cached is None:
                wanted.add(event.workflow_id)
            else:
                work.state[event.workflow_id] = cached
        # The runs next in line for the slots this batch's events may free.
        for workflow_id in self._line_heads([e.workflow_id for e in events if e.workflow_id]):
            cached = self._cache.get(workflow_id)
            if cached is None:
                wanted.add(workflow_id)
            elif workflow_id not in work.state:
                work.state[workflow_id] = cached
        if wanted or keys or request_ids:  # one trip to the store for all three
            reads = await self._store.reads_for_batch(list(wanted), keys, request_ids)
            work.state.update(reads.state)
            work.keys, work.answered = reads.keys, reads.answered
        for event in events:
            if isinstance(event, RequestEvent) and isinstance(event.request, RetryRequest):
                await self._load_failed_run(event.workflow_id, work)
            if isinstance(event, RequestEvent) and isinstance(event.request, RedeliveredRequest):
                await self._load_redeliveries(event.request, work)
            if isinstance(event, RequestEvent) and isinstance(event.request, ResetRequest):
                await self._load_last_run(event.workflow_id, event.request.to_step, work)
            if isinstance(event, RequestEvent) and isinstance(event.request, ResumeTypeRequest):
                await self._load_type_held(event.request.workflow, event.request.step, work)
            if isinstance(event, TimerEvent) and event.kind == TIMER_COMPENSATE:
                await self._load_runs(event.workflow_id, work)
        await self._load_families(events, work)

    async def load_more(self, workflow_ids: list[str], work: Work) -> None:
        """Workflows a batch's follow-ups need (children, parents) that it has not loaded:
        from the cache, else the store. What the batch has loaded (and changed) stays."""
        wanted = []
        for workflow_id in dict.fromkeys(workflow_ids):
            if workflow_id in work.state:
                continue
            cached = self._cache.get(workflow_id)
            if cached is None:
                wanted.append(workflow_id)
            else:
                work.state[workflow_id] = cached
        for start in range(0, len(wanted), TYPE_PAGE):
            work.state.update(await self._store.load(wanted[start : start + TYPE_PAGE]))

    async def load_failed_run(self, workflow_id: str, work: Work) -> None:
        """The failed run a retry of ``workflow_id`` resumes (a child retried with its parent)."""
        await self._load_failed_run(workflow_id, work)

    def _line_heads(self, workflow_ids: list[str], *, every_key: bool = False) -> list[str]:
        """For each slot group these workflows are in, its first queued runs: as many as
        these workflows may free (and one more, for a paused one). The rest, if a batch
        needs them, it admits in the next (``work.stalled``)."""
        if self._slots is None:
            return []
        slots = self._slots()
        if not slots.queued:
            return []
        counts: dict[Group, int] = {}
        for workflow_id in workflow_ids:
            found = slots.of.get(workflow_id)
            if found is not None:
                group = found[0]
                counts[group] = counts.get(group, 0) + (1 if found[1] == ACTIVE else 0)
        if every_key:  # an admission picks among the heads of all the step's keys
            for group in list(counts):
                for sibling in slots.groups_of(group[:2]):
                    counts.setdefault(sibling, 0)
        heads: list[str] = []
        for group, count in counts.items():
            if group in slots.queued:
                heads += slots.line(group)[: count + 1]
        return heads

    async def _define(self, request: DefineRequest, work: Work, now: float) -> None:
        if request.definition is None:
            work.reply(request, False, error_json(DefinitionError(str(request.problem))))
            return
        try:
            answer = await self._registry.define(request.definition, now)
        except StoreError:
            raise  # the store's trouble: the batch is held and tried again
        except HmsError as exc:
            work.reply(request, False, error_json(exc))
            return
        work.reply(request, True, answer)

    async def _load_families(self, events: list[Event], work: Work) -> None:
        """The size of the family of each workflow whose step's outcome starts children, read
        by its root's id (a range of the primary key), once per root: the machine refuses
        children that would take a family over ``MAX_FAMILY``. Only such outcomes cost a
        read; what this batch starts is added as it is applied (``Applier.record``)."""
        roots: set[str] = set()
        for event in events:
            if not isinstance(event, OutcomeEvent):
                continue
            outcome = event.outcome
            found = work.state.get(outcome.workflow_id)
            if (
                found is not None
                and outcome.kind == "succeeded"
                and (outcome.result or {}).get("child") is not None
            ):
                roots.add(children.root_of(found[0]))
        roots -= work.families.keys()
        if not roots:
            return
        prefixes = {root: children.family_prefix(root) for root in sorted(roots)}
        counts = await self._store.count_prefixed(list(prefixes.values()))
        for root, prefix in prefixes.items():
            work.families[root] = children.family_size(root, counts.get(prefix, 0))

    async def _load_redeliveries(self, request: RedeliveredRequest, work: Work) -> None:
        """The redeliveries of a run's step message counted before (the poison guard): read
        from its workflow's history, only when a step service asks, which it does only for a
        message delivered again."""
        key = (request.workflow_id, request.seq)
        if key in work.redeliveries or request.workflow_id not in work.state:
            return
        work.redeliveries[key] = {
            str(entry.detail.get("delivery"))
            for entry in await self._store.history(request.workflow_id)
            if entry.kind == REDELIVERED and entry.detail.get("seq") == request.seq
        }

    async def _load_failed_run(self, workflow_id: str, work: Work) -> None:
        """A retry resumes the run that failed, which may be earlier than the current one."""
        found = work.state.get(workflow_id)
        if found is None or found[0].error is None:
            return
        seq = found[0].error.get("seq")
        if isinstance(seq, int) and (found[1] is None or seq != found[1].seq):
            run = await self._store.run(workflow_id, seq)
            if run is not None:
                work.failed_runs[(workflow_id, seq)] = run

    async def _load_runs(self, workflow_id: str, work: Work) -> None:
        """A compensating workflow's runs, when its ``compensate`` timer fires: its next
        compensation is derived from them (one read per compensation)."""
        if workflow_id not in work.state or workflow_id in work.runs_of:
            return
        found = await self._store.workflow_with_runs(workflow_id)
        work.runs_of[workflow_id] = found[1] if found is not None else []

    async def _load_last_run(self, workflow_id: str, step: str, work: Work) -> None:
        """A reset runs a step again with the input of its latest run (a rare request: all
        the workflow's runs are read)."""
        if workflow_id not in work.state or (workflow_id, step) in work.last_runs:
            return
        found = await self._store.workflow_with_runs(workflow_id)
        for run in reversed(found[1] if found is not None else []):
            if run.step == step:
                work.last_runs[(workflow_id, step)] = run
                return

    async def _load_type_held(self, name: str, step: str | None, work: Work) -> None:
        """The workflows a type pause holds, oldest first (its resume releases them by priority).
        Read page by page (keyset), then loaded with their current runs."""
        key = (name, step or "")
        if key in work.type_held:
            return
        found: list[Workflow] = []
        before: tuple[float, str] | None = None
        while True:
            page = await self._store.list_workflows(
                status="paused", name=name, limit=TYPE_PAGE, before=before
            )
            found += [w for w in page if paused_by(w, key)]
            if len(page) < TYPE_PAGE:
                break
            before = (page[-1].created_at, page[-1].id)
        ids = [w.id for w in reversed(found)]  # the listing is newest first
        wanted = []
        for workflow_id in ids:
            cached = self._cache.get(workflow_id)
            if workflow_id in work.state:
                continue
            if cached is not None:
                work.state[workflow_id] = cached
            else:
                wanted.append(workflow_id)
        for start in range(0, len(wanted), TYPE_PAGE):
            work.state.update(await self._store.load(wanted[start : start + TYPE_PAGE]))
        work.type_held[key] = ids
