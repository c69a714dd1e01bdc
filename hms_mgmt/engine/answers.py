"""The engine's answers: reads (status, wait, list) from the store, held waits, and replies.

Reads are answered once the batch they came in has committed, so they see its effects.
A ``wait`` for a workflow that has not finished is held (up to its ``hold``) and answered
when the workflow finishes, or with ``{"terminal": false}`` when the hold runs out; the
client then asks again. Replies to one client go out in one message, unconfirmed: a
client that misses one asks again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from bus_adapters.base import Bus, BusError
from hms_mgmt.engine.cache import InFlight
from hms_mgmt.engine.work import Reply, Work
from hms_mgmt.errors import WorkflowNotFoundError, error_json
from hms_mgmt.logs import get_logger
from hms_mgmt.records import WorkflowState, summary
from hms_mgmt.store.base import Store
from hms_mgmt.wire.codec import MAX_REPLY_BYTES, batches
from hms_mgmt.wire.requests import ListRequest, Request, WaitRequest, replies_message, reply_item

log = get_logger("engine")

WAIT_HOLD_MAX = 30.0


@dataclass
class _Waiter:
    reply_to: str
    request_id: str
    expires_at: float


class Answers:
    def __init__(
        self,
        bus: Bus,
        store: Store,
        cache: InFlight,
        *,
        stuck_after: float,
        clock: Callable[[], float],
    ) -> None:
        self._bus = bus
        self._store = store
        self._cache = cache
        self.stuck_after = stuck_after
        self._clock = clock
        self._waiters: dict[str, list[_Waiter]] = {}
        self.next_expiry = float("inf")  # the soonest a waiter's hold runs out

    @property
    def holding(self) -> bool:
        return bool(self._waiters)

    async def state(self, workflow_id: str) -> WorkflowState | None:
        """A workflow and its runs as the store has them, with why it seems stuck if it does."""
        found = await self._store.workflow_with_runs(workflow_id)
        if found is None:
            return None
        attributes = (await self._store.attributes([workflow_id])).get(workflow_id)
        state = WorkflowState.of(
            *found, now=self._clock(), stuck_after=self.stuck_after, attributes=attributes
        )
        running = [c["workflow_id"] for c in state.children if c["status"] is None]
        if running:  # children not finished: their own status, read from the store
            loaded = await self._store.load(running)
            for child in state.children:
                if child["workflow_id"] in loaded:
                    child["status"] = str(loaded[child["workflow_id"]][0].status)
        return state

    async def summaries(
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
        """The newest workflows matching, as list entries with their business keys: the one
        search behind ``client.list``, ``GET /api/workflows`` and ``hms workflow list``."""
        workflows = await self._store.list_workflows(
            status=status,
            name=name,
            limit=limit,
            attributes=attributes,
            before=before,
            since=since,
            until=until,
        )
        keys = await self._store.attributes([w.id for w in workflows]) if workflows else {}
        return [summary(w, keys.get(w.id)) for w in workflows]

    async def read(self, request: Request, work: Work, now: float) -> None:
        if isinstance(request, ListRequest):
            found = await self.summaries(
                status=request.status,
                name=request.name,
                limit=request.limit,
                attributes=request.attributes,
                since=request.since,
                until=request.until,
            )
            work.reply(request, True, found)
            return
        workflow_id = request.workflow_id
        in_flight = workflow_id in self._cache  # cached workflows are not finished
        waiting = isinstance(request, WaitRequest)
        state = None if waiting and in_flight else await self.state(workflow_id)
        if state is None and not in_flight:
            missing = WorkflowNotFoundError(f"no workflow with id {workflow_id!r}")
            work.reply(request, False, error_json(missing))
            return
        if isinstance(request, WaitRequest) and (state is None or not state.terminal):
            if request.reply_to:
                hold = WAIT_HOLD_MAX if request.hold is None else min(request.hold, WAIT_HOLD_MAX)
                self._waiters.setdefault(workflow_id, []).append(
                    _Waiter(request.reply_to, request.request_id, now + hold)
                )
                self.next_expiry = min(self.next_expiry, now + hold)
            return
        if state is not None:
            work.reply(request, True, state.to_json())

    async def wake(self, finished: Iterable[str], work: Work) -> None:
        """Answer the waits held for workflows that have just finished."""
        for workflow_id in finished:
            waiters = self._waiters.pop(workflow_id, None)
            if not waiters:
                continue
            state = await self.state(workflow_id)
            if state is None:
                continue
            value = state.to_json()
            work.replies.extend((w.reply_to, w.request_id, True, value) for w in waiters)

    def expired(self, now: float) -> list[Reply]:
        """The held waits whose hold has run out, answered "not finished yet"."""
        if now < self.next_expiry:
            return []
        self.next_expiry = min(
            (w.expires_at for ws in self._waiters.values() for w in ws if w.expires_at > now),
            default=float("inf"),
        )
        expired: list[Reply] = []
        for workflow_id, waiters in list(self._waiters.items()):
            keep = [w for w in waiters if w.expires_at > now]
            expired.extend(
                (w.reply_to, w.request_id, True, {"workflow_id": workflow_id, "terminal": False})
                for w in waiters
                if w.expires_at <= now
            )
            if keep:
                self._waiters[workflow_id] = keep
            else:
                del self._waiters[workflow_id]
        return expired

    async def send(self, replies: list[Reply]) -> None:
        """One message per client for all its replies; best effort (clients ask again)."""
        grouped: dict[str, list[bytes]] = {}
        for reply_to, request_id, ok, value in replies:
            grouped.setdefault(reply_to, []).append(_within_limit(request_id, ok, value))
        for reply_to, items in grouped.items():
            for batch in batches(items, len):
                try:
                    await self._bus.publish(replies_message(reply_to, batch), confirm=False)
                except BusError as exc:
                    log.warning("could not send replies; the client will ask again", error=str(exc))


def _within_limit(request_id: str, ok: bool, value: Any) -> bytes:
    """A reply, or an error saying it is too large to send (a client reads up to a limit)."""
    item = reply_item(request_id, ok, value)
    if len(item) <= MAX_REPLY_BYTES:
        return item
    error = {
        "type": "PayloadError",
        "message": f"the answer is {len(item)} bytes, over the {MAX_REPLY_BYTES} a reply may carry",
    }
    return reply_item(request_id, False, error)
