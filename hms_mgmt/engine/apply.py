"""The apply stage: a batch's events become its pending writes, replies and timers. No I/O.

Everything it needs was loaded before (:mod:`hms_mgmt.engine.loading`) into the
:class:`~hms_mgmt.engine.work.Work`; it calls the pure state machine for each event and
folds each transition into the batch: workflows, runs, history, and the outbox rows of the
steps to publish (signed here) and of the dead letters. Log lines wait in the work until
the batch has committed. One event that fails is refused alone and never fails its batch.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Mapping
from typing import Any

from hms_mgmt import machine, schedules, tracing
from hms_mgmt.engine import family
from hms_mgmt.engine.events import (
    DeadLetterEvent,
    Event,
    OutcomeEvent,
    RequestEvent,
    TickEvent,
    TimerEvent,
)
from hms_mgmt.engine.registry import Registry
from hms_mgmt.engine.work import REDELIVERED, Work
from hms_mgmt.errors import (
    HmsError,
    InvalidMessageError,
    InvalidStateError,
    ScheduleNotFoundError,
    UnknownStepError,
    UnknownWorkflowError,
    WorkflowNotFoundError,
    error_json,
)
from hms_mgmt.records import (
    TERMINAL,
    StepRun,
    StepStatus,
    TypePause,
    Workflow,
    WorkflowStatus,
)
from hms_mgmt.schedules import Schedule
from hms_mgmt.store.base import OutboxRow
from hms_mgmt.tokens import Signer
from hms_mgmt.topology import DELIVERY_LIMIT, STEPS_EXCHANGE
from hms_mgmt.wire.outcomes import MALFORMED
from hms_mgmt.wire.requests import (
    CancelRequest,
    DefineRequest,
    ListRequest,
    PauseRequest,
    PauseTypeRequest,
    RedeliveredRequest,
    Request,
    ResetRequest,
    ResumeRequest,
    ResumeTypeRequest,
    RetryRequest,
    ScheduleRequest,
    SchedulesRequest,
    SignalRequest,
    StartRequest,
    StatusRequest,
    UnscheduleRequest,
    WaitRequest,
)
from hms_mgmt.wire.steps import dead_letter_message, step_headers

POISON_GUARD = "poison_guard"
"""The reason a run's attempt fails when the poison guard dead-letters its message."""

Change = CancelRequest | RetryRequest | SignalRequest | PauseRequest | ResumeRequest | ResetRequest
CHANGES = (CancelRequest, RetryRequest, SignalRequest, PauseRequest, ResumeRequest, ResetRequest)
"""Requests that change one workflow, answered once."""
PAUSED_OR_OVER = frozenset({WorkflowStatus.PAUSED, *TERMINAL})

LIMITED = frozenset({StepStatus.PENDING, StepStatus.RUNNING, StepStatus.QUEUED})
"""Statuses of a run that may hold or wait for a concurrency slot."""

READS = (StatusRequest, WaitRequest, ListRequest)
"""Requests answered from the store once the batch has committed, not applied."""


class Applier:
    def __init__(
        self,
        registry: Registry,
        schedules: Mapping[str, Schedule],
        signer: Signer,
        type_pauses: Mapping[tuple[str, str], TypePause] | None = None,
        slots: machine.Slots | None = None,
    ) -> None:
        self.registry = registry
        self.schedules = schedules  # as committed; this batch's changes are in work.schedules
        self.signer = signer
        # Paused workflow types, as committed; this batch's changes are in work.type_pauses.
        self.type_pauses: Mapping[tuple[str, str], TypePause] = (
            {} if type_pauses is None else type_pauses
        )
        # Concurrency slots, as committed; a batch changes its own copy (work.slots).
        self.slots = machine.Slots() if slots is None else slots

    def apply(self, event: Event | machine.FollowUp, work: Work, now: float) -> None:
        try:
            if isinstance(event, family.FOLLOW_UPS):
                family.apply(self, event, work, now)
            elif isinstance(event, RequestEvent):
                self._request(event.request, work, now)
            elif isinstance(event, OutcomeEvent):
                self._outcome(event, work, now)
            elif isinstance(event, DeadLetterEvent):
                self._dead_letter(event, work, now)
            elif isinstance(event, TimerEvent):
                self._timer(event, work, now)
            else:
                self._tick(event, work, now)
        except Exception as exc:
            self._refused(event, exc, work, now)

    def _refused(
        self, event: Event | machine.FollowUp, exc: Exception, work: Work, now: float
    ) -> None:
        """One bad event is refused alone: answered, dead-lettered or logged."""
        if not isinstance(exc, HmsError):
            work.log(
                "error",
                "event refused",
                kind=type(event).__name__,
                workflow_id=event.workflow_id,
                error=repr(exc),
                traceback="".join(traceback.format_exception(exc))[-4000:],
            )
        if isinstance(event, RequestEvent):
            request = event.request
            work.reply(request, False, error_json(exc))
            if isinstance(request, StartRequest):  # a retry of this request gets the same answer
                work.batch.requests.append((request.request_id, [False, error_json(exc)], now))
                work.answered[request.request_id] = (False, error_json(exc))
        elif isinstance(event, OutcomeEvent | DeadLetterEvent):
            _refuse_item(event, f"{type(exc).__name__}: {exc}")
        elif isinstance(exc, HmsError):
            work.log("error", "event refused", workflow_id=event.workflow_id, error=str(exc))

    # -- folding a transition into the batch --------------------------------------------

    def _slots(self, work: Work) -> machine.Slots:
        """This batch's slots: a copy of the committed ones, made when first needed."""
        if work.slots is None:
            work.slots = self.slots.copy()
        return work.slots

    def record(
        self,
        work: Work,
        t: machine.Transition,
        workflow_id: str,
        now: float,
        *,
        admitting: bool = False,
    ) -> None:
        batch = work.batch
        held = t.workflow  # a step of a paused type is held, its workflow paused
        if held is not None and t.steps and held.status not in PAUSED_OR_OVER:
            by = self._type_pause(work, held.name, t.steps[-1].step)
            if by is not None:
                machine.hold_for_type(t, held, by, now)
            elif machine.must_queue(
                t, self._slots(work), self.registry.of(held), now, admitting=admitting
            ):
                machine.queue(t, now)  # over its step's limits: waits to be admitted
        for kind, detail in t.history:
            batch.history.append((workflow_id, now, kind, detail))
        work.follow.extend(t.follow)
        for follow in t.follow:  # the family's size (machine.children.MAX_FAMILY)
            if isinstance(follow, machine.StartChild):
                work.count_child(follow.parent, 1)
        wf = t.workflow
        if wf is None:
            return
        batch.workflows[wf.id] = wf
        for key, value in t.attributes.items():
            batch.attributes[(wf.id, key)] = value
        current = work.state.get(wf.id, (wf, None))[1]
        for run in t.runs:
            batch.runs[(run.workflow_id, run.seq)] = run
            if run.seq == wf.seq:
                current = run
        work.state[wf.id] = (wf, current)
        work.publishing = t.steps
        self._follow_slots(work, wf, current, now)
        for step in t.steps:
            token = self.signer.token(step.workflow_id, step.seq, step.attempt)
            batch.outbox.append(
                OutboxRow(
                    message_id=step.message_id,
                    exchange=STEPS_EXCHANGE,
                    routing_key=step.topic,
                    body=step.encode(token),
                    headers=step_headers(
                        step.workflow_id, step.step, step.attempt, step.seq, step.traceparent
                    ),
                    created_at=now,
                )
            )
        for dead in t.dead_letters:
            original = machine.step_message(wf, dead.run, self.registry.of(wf)).to_message()
            message = dead_letter_message(
                original,
                reason=dead.reason,
                attempts=dead.attempts,
                last_error=dead.error,
                at=now,
            )
            batch.outbox.append(
                OutboxRow(
                    message_id=message.message_id or "",
                    exchange=message.exchange,
                    routing_key=message.routing_key,
                    body=message.body,
                    headers=message.headers,
                    created_at=now,
                )
            )
            work.dead_lettered += 1
        if wf.timer_at is not None and wf.timer_kind is not None:
            work.timers.append((wf.id, wf.timer_kind, wf.timer_at))
        if t.finished:
            work.finished.append(wf.id)
            _log_finished(work, wf)

    # -- concurrency slots ------------------------------------------------------------------

    def _follow_slots(self, work: Work, wf: Workflow, run: StepRun | None, now: float) -> None:
        """Keep the batch's slots on the workflow's new state. A run published under a rate
        limit spaces the next; a workflow that leaves its place (a slot freed, its turn in
        line given up) lets the next in line be admitted, in this same batch."""
        slots = work.slots if work.slots is not None else self.slots
        before = slots.of.get(wf.id)
        if before is None and (run is None or run.status not in LIMITED):
            return  # neither held nor wants a slot: nothing to follow
        definition = self.registry.of(wf)
        slots = self._slots(work)
        slots.track(wf, run, definition)
        after = slots.of.get(wf.id)
        if (
            run is not None
            and after is not None
            and after[1] == machine.limits.ACTIVE
            and run.status == StepStatus.PENDING
            and any(step.seq == run.seq for step in work.publishing)
        ):
            slots.serve(after[0])  # its key's turn goes to the back
            interval = machine.limits.interval_of(definition, run.step)
            if interval is not None:
                slots.consume(after[0][:2], interval, now)
        if before is not None and (after is None or after[:2] != before[:2]):
            self._admit(work, before[0][:2], now)
        elif (
            after is not None
            and after[1] == machine.limits.QUEUED
            and before is None
            and machine.limits.interval_of(definition, after[0][1]) is not None
        ):
            self._admit(work, after[0][:2], now)  # held back by the rate: the first in line
            # gets the timer of the next admission

    def _admit(self, work: Work, key: tuple[str, str], now: float) -> None:
        """Admit the runs in line for a step (``key``: workflow type, step), in the order of
        :meth:`~hms_mgmt.machine.limits.Slots.next_turn` among its groups with a free slot,
        while its rate limit allows; past that, the next to go gets a durable timer for the
        next admission. A run not loaded for this batch stops its group: the engine admits
        it in the next (``work.stalled``)."""
        if key in work.admitting:
            return  # admitting already, further up the stack
        work.admitting.add(key)
        try:
            self._admit_loop(work, key, now)
        finally:
            work.admitting.discard(key)

    def _admit_loop(self, work: Work, key: tuple[str, str], now: float) -> None:
        """Each group has its own slots, so without a rate limit the groups admit each its
        own line, and one whose first run was not loaded waits for the next batch. Under a
        rate limit, which the step's keys share, the order across them matters: if the run
        whose turn it is was not loaded, nobody else goes first; the next batch loads the
        first of every key's line and admits it."""
        slots = self._slots(work)
        latest = self.registry.latest.get(key[0])
        rated = latest is not None and machine.limits.interval_of(latest, key[1]) is not None
        for _ in range(10_000):  # bounded: each turn admits or drops one, or stops
            open_groups, unloaded = [], set()
            for group in slots.groups_of(key):
                head = slots.line(group)[0]
                definition = self.registry.of(work.state[head][0]) if head in work.state else latest
                if definition is None or not slots.free(
                    group, machine.limits.limit_of(definition, key[1])
                ):
                    continue
                if head not in work.state:
                    unloaded.add(group)
                    if not rated:
                        work.stalled.add(group)
                        continue
                open_groups.append(group)
            chosen = slots.next_turn(open_groups)
            if chosen is None:
                return
            if chosen in unloaded:  # its turn, but not loaded: admitted by the next batch
                work.stalled.add(chosen)
                return
            group, head = chosen, slots.line(chosen)[0]
            workflow, run = work.state[head]
            definition = self.registry.of(workflow)
            interval = machine.limits.interval_of(definition, key[1])
            if interval is not None and not slots.rate_allows(key, now):
                due = slots.next_at[key]
                self.record(work, machine.limits.arm(workflow, due, now), head, now)
                return
            t = machine.admit(workflow, run, definition, now) if run is not None else None
            if t is None or not t.changed:
                slots.forget(head)  # no longer queued (never so after a commit)
                continue
            self.record(work, t, head, now, admitting=True)
            if head in slots.queued.get(group, {}):
                return  # still waiting: never loop

    # -- events ---------------------------------------------------------------------------

    def _outcome(self, event: OutcomeEvent, work: Work, now: float) -> None:
        outcome = event.outcome
        if outcome.workflow_id not in work.state:
            _refuse_item(event, f"outcome for unknown workflow {outcome.workflow_id!r}")
            return
        workflow, run = _loaded(work, outcome.workflow_id)
        if outcome.step and outcome.step != run.step and outcome.seq == run.seq:
            detail = {"seq": outcome.seq, "reason": "step mismatch"}
            work.batch.history.append((workflow.id, now, "outcome_ignored", detail))
            self._malformed(event, work, run, "step mismatch")
            return
        definition = self.registry.of(workflow)
        if outcome.kind == "succeeded" and (outcome.result or {}).get("child") is not None:
            outcome = family.checked(
                outcome, definition, self.registry.latest, run, workflow, work.families
            )
        t = machine.apply_outcome(workflow, run, definition, outcome, now)
        ignored = None
        if t.history and t.history[0][0] == "outcome_ignored":
            ignored = str(t.history[0][1]["reason"])
            work.log(
                "info",
                "outcome ignored",
                workflow_id=workflow.id,
                step=outcome.step,
                attempt=outcome.attempt,
                seq=outcome.seq,
                kind=outcome.kind,
                reason=ignored,
                **tracing.log_fields(workflow.traceparent),
            )
        self._malformed(event, work, run, ignored)
        self.record(work, t, workflow.id, now)

    @staticmethod
    def _malformed(event: OutcomeEvent, work: Work, run: StepRun, ignored: str | None) -> None:
        """A malformed outcome, applied as a failed attempt (or ignored, if not for the
        current run), goes to the dead-letter queue all the same, as it came, for forensics."""
        outcome = event.outcome
        if outcome.malformed is None:
            return
        effect = (
            f"ignored: {ignored}"
            if ignored is not None
            else f"run {outcome.seq} ({run.step}, attempt {run.attempt}) failed with "
            f"{MALFORMED}, not retried"
        )
        _refuse_item(event, f"malformed outcome: {outcome.malformed}; {effect}")
        work.log(
            "warning",
            "malformed outcome",
            workflow_id=outcome.workflow_id,
            step=run.step,
            seq=outcome.seq,
            reason=outcome.malformed[:500],
            applied=ignored is None,
        )

    def _dead_letter(self, event: DeadLetterEvent, work: Work, now: float) -> None:
        step, reason = event.step, event.reason
        if step.workflow_id not in work.state:
            _refuse_item(
                event, f"dead-lettered ({reason}) step of unknown workflow {step.workflow_id!r}"
            )
            return
        workflow, run = _loaded(work, step.workflow_id)
        work.log(
            "warning",
            "step message dead-lettered by the broker",
            workflow_id=workflow.id,
            step=step.step,
            attempt=step.attempt,
            reason=reason,
            **tracing.log_fields(workflow.traceparent),
        )
        t = machine.dead_lettered(workflow, run, self.registry.of(workflow), step.seq, reason, now)
        self.record(work, t, workflow.id, now)

    def _timer(self, event: TimerEvent, work: Work, now: float) -> None:
        if event.workflow_id not in work.state:
            return
        if event.kind == machine.TIMER_ADMIT:  # a rate limit's next admission, or a line
            found = self._slots(work).of.get(event.workflow_id)  # left with free slots
            if found is not None and found[1] == machine.limits.QUEUED:
                self._admit(work, found[0][:2], now)
            workflow = work.state[event.workflow_id][0]  # not admitted, not armed again:
            t = machine.limits.disarm(workflow, now)  # its timer is spent
            if t.changed:
                self.record(work, t, workflow.id, now)
            return
        workflow, run = _loaded(work, event.workflow_id)
        definition = self.registry.of(workflow)
        if event.kind == machine.TIMER_COMPENSATE:
            runs = {r.seq: r for r in work.runs_of.get(workflow.id, [])}  # as stored
            runs.update(  # ... with this batch's changes
                (seq, r) for (wid, seq), r in work.batch.runs.items() if wid == workflow.id
            )
            t = machine.compensate(workflow, run, definition, runs.values(), now)
        else:
            t = machine.fire_timer(workflow, run, definition, event.kind, now)
        self.record(work, t, workflow.id, now)

    def _tick(self, event: TickEvent, work: Work, now: float) -> None:
        """Start the workflows of a schedule's due ticks and move it on, in one transaction."""
        schedule_id = event.schedule_id
        schedule = self._schedule(schedule_id, work)
        if schedule is None:
            return
        ticks, moved = work.ticks.get(schedule_id) or schedules.due(schedule, now)
        work.schedules[schedule_id] = moved
        work.batch.schedules[schedule_id] = moved
        definition = self.registry.latest.get(schedule.workflow)
        for tick in ticks:
            workflow_id = schedules.workflow_id(schedule_id, tick)
            if definition is None:
                work.log(
                    "error",
                    "scheduled workflow is not defined",
                    schedule=schedule_id,
                    workflow=schedule.workflow,
                )
                continue
            if workflow_id in work.state:
                continue  # this tick has started its workflow already
            t = machine.start(definition, workflow_id, schedule.payload, now)
            t.note("scheduled_start", schedule=schedule_id, tick=tick)
            self.record(work, t, workflow_id, now)
            work.started += 1

    def _schedule(self, schedule_id: str, work: Work) -> Schedule | None:
        """A schedule as this batch leaves it so far."""
        if schedule_id in work.schedules:
            return work.schedules[schedule_id]
        return self.schedules.get(schedule_id)

    # -- requests -------------------------------------------------------------------------

    def _request(self, request: Request, work: Work, now: float) -> None:
        if isinstance(request, DefineRequest):
            return  # stored and answered while loading
        if request.deadline is not None and request.deadline < now:
            work.log(
                "info",
                "request expired before it was served",
                type=request.kind,
                request_id=request.request_id,
            )
            return
        if isinstance(request, READS):
            work.reads.append(request)
        elif isinstance(request, SchedulesRequest):
            current = {**self.schedules, **work.schedules}
            work.reply(request, True, [s.to_json() for s in current.values() if s is not None])
        elif isinstance(request, ScheduleRequest):
            self._schedule_request(request, work, now)
        elif isinstance(request, UnscheduleRequest):
            if self._schedule(request.schedule_id, work) is None:
                raise ScheduleNotFoundError(f"no schedule with id {request.schedule_id!r}")
            work.schedules[request.schedule_id] = None
            work.batch.schedules[request.schedule_id] = None
            work.reply(request, True, {"schedule_id": request.schedule_id, "removed": True})
        elif isinstance(request, StartRequest):
            self._start(request, work, now)
        elif isinstance(request, CHANGES):
            self._change(request, work, now)
        elif isinstance(request, RedeliveredRequest):
            self._redelivered(request, work, now)
        elif isinstance(request, PauseTypeRequest | ResumeTypeRequest):
            self._type_change(request, work, now)

    def _redelivered(self, request: RedeliveredRequest, work: Work, now: float) -> None:
        """The poison guard (classic step queues): a step message delivered again is counted,
        durably, in its workflow's history, once per delivery. Past :data:`DELIVERY_LIMIT`
        deliveries its attempt fails with ``DeliveryLimitExceeded`` here, as when a quorum
        queue dead-letters it, and the step service is told to dead-letter the message; a
        message whose run is no longer current (its outcome is in) need not run again."""
        if not self.signer.valid(request.workflow_id, request.seq, request.attempt, request.token):
            raise InvalidMessageError(
                f"redelivered step of {request.workflow_id!r}: its token does not match its run"
            )
        workflow, run = _loaded(work, request.workflow_id)
        counted = work.redeliveries.setdefault((workflow.id, request.seq), set())
        if request.delivery not in counted:
            counted.add(request.delivery)
            detail = {
                "seq": request.seq,
                "attempt": request.attempt,
                "delivery": request.delivery,
                "deliveries": len(counted) + 1,
            }
            work.batch.history.append((workflow.id, now, REDELIVERED, detail))
        deliveries = len(counted) + 1  # the first delivery was not counted: it was not asked about
        answer = {"deliveries": deliveries, "limit": DELIVERY_LIMIT}
        stale = machine.stale_reason(workflow, run, request.seq)
        if deliveries > DELIVERY_LIMIT:
            reason = (
                f"delivered {deliveries} times, over the limit of {DELIVERY_LIMIT}, without an "
                "outcome: its worker crashed on every delivery (poison guard)"
            )
            if stale is None:
                work.log(
                    "warning",
                    "step message over its delivery limit: dead-lettered",
                    workflow_id=workflow.id,
                    step=run.step,
                    attempt=run.attempt,
                    deliveries=deliveries,
                    **tracing.log_fields(workflow.traceparent),
                )
                t = machine.dead_lettered(
                    workflow, run, self.registry.of(workflow), request.seq, POISON_GUARD, now
                )
                self.record(work, t, workflow.id, now)
            work.reply(request, True, {**answer, "verdict": "dead_letter", "reason": reason})
        elif stale is not None:
            work.reply(request, True, {**answer, "verdict": "skip", "reason": stale})
        else:
            work.reply(request, True, {**answer, "verdict": "run"})

    def _change(self, request: Change, work: Work, now: float) -> None:
        """Cancel, retry, signal, pause, resume or reset: answered once, and the same answer
        to a repeat."""
        if request.request_id in work.answered:
            ok, value = work.answered[request.request_id]
            work.reply(request, ok, value)
            return
        workflow_id = request.workflow_id
        try:
            workflow, run = _loaded(work, workflow_id)
            plain_cancel = isinstance(request, CancelRequest) and not request.compensate
            if not plain_cancel:  # its version must be loaded: refused before anything is
                self.registry.of(workflow)  # recorded (a pause needs none, but its slots do)
            if isinstance(request, CancelRequest):  # a plain cancel needs no definition: a
                # workflow whose version was left out at start-up can still be ended
                t = machine.cancel(
                    workflow,
                    run,
                    request.reason,
                    now,
                    compensate=request.compensate,
                    definition=self.registry.find(workflow),  # loaded, if it compensates
                )
            elif isinstance(request, RetryRequest):
                failed = work.failed_run(workflow, run)
                t = machine.retry(workflow, failed, self.registry.of(workflow), now)
            elif isinstance(request, SignalRequest):
                t = machine.signal(
                    workflow, run, self.registry.of(workflow), request.signal, request.data, now
                )
            elif isinstance(request, PauseRequest):
                t = machine.pause(workflow, run, request.reason, now)
            elif isinstance(request, ResumeRequest):
                t = machine.resume(workflow, run, self.registry.of(workflow), now)
            else:
                t = machine.reset(
                    workflow,
                    run,
                    self.registry.of(workflow),
                    request.to_step,
                    _last_run(work, workflow_id, request.to_step),
                    now,
                    data=request.data,
                    has_data=request.has_data,
                    signals=request.signals,
                    reason=request.reason,
                )
        except HmsError as exc:
            reply: tuple[bool, Any] = (False, error_json(exc))
        else:
            self.record(work, t, workflow_id, now)
            status = str(work.state[workflow_id][0].status)
            answer: dict[str, Any] = {"workflow_id": workflow_id, "status": status}
            if isinstance(request, SignalRequest):  # resumed a wait, or kept for one to come
                answer["resumed"] = any(kind == "resumed" for kind, _ in t.history)
            reply = (True, answer)
        work.answered[request.request_id] = reply
        work.batch.requests.append((request.request_id, list(reply), now))
        work.reply(request, *reply)

    # -- paused workflow types ------------------------------------------------------------

    def _type_pause(self, work: Work, name: str, step: str) -> TypePause | None:
        """The pause of this workflow type's step, or of the whole type; None if neither."""
        for key in ((name, step), (name, "")):
            pause = work.type_pauses[key] if key in work.type_pauses else self.type_pauses.get(key)
            if pause is not None:
                return pause
        return None

    def _type_change(
        self, request: PauseTypeRequest | ResumeTypeRequest, work: Work, now: float
    ) -> None:
        """Pause or resume a workflow type (or a step of it): answered once."""
        if request.request_id in work.answered:
            ok, value = work.answered[request.request_id]
            work.reply(request, ok, value)
            return
        try:
            if isinstance(request, PauseTypeRequest):
                answer = self._pause_type(request, work, now)
            else:
                answer = self._resume_type(request, work, now)
        except HmsError as exc:
            reply: tuple[bool, Any] = (False, error_json(exc))
        else:
            reply = (True, answer)
        work.answered[request.request_id] = reply
        work.batch.requests.append((request.request_id, list(reply), now))
        work.reply(request, *reply)

    def _pause_type(self, request: PauseTypeRequest, work: Work, now: float) -> dict[str, Any]:
        definition = self.registry.named(request.workflow)
        what = request.workflow if request.step is None else f"{request.workflow}.{request.step}"
        if request.step is not None and definition.step(request.step) is None:
            raise UnknownStepError(
                f"cannot pause {what}: {request.workflow} has no step {request.step!r}; its "
                f"steps are {', '.join(definition.step_names)}"
            )
        key = (request.workflow, request.step or "")
        current = work.type_pauses[key] if key in work.type_pauses else self.type_pauses.get(key)
        if current is not None:
            raise InvalidStateError(f"{what} is already paused")
        pause = TypePause(request.workflow, request.step, now, request.reason)
        work.type_pauses[key] = work.batch.type_pauses[key] = pause
        work.log("info", "workflow type paused", workflow=request.workflow, step=request.step)
        return {**pause.to_json(), "paused": True}

    def _resume_type(self, request: ResumeTypeRequest, work: Work, now: float) -> dict[str, Any]:
        key = (request.workflow, request.step or "")
        what = request.workflow if request.step is None else f"{request.workflow}.{request.step}"
        current = work.type_pauses[key] if key in work.type_pauses else self.type_pauses.get(key)
        if current is None:
            raise InvalidStateError(f"{what} is not paused; cannot resume it")
        work.type_pauses[key] = None
        work.batch.type_pauses[key] = None
        # What it held (loaded, and any held by this batch so far): released by priority.
        held = set(work.type_held.get(key, []))
        held.update(i for i, (wf, _) in work.state.items() if machine.paused_by(wf, key))
        order = sorted(  # by priority, then oldest first
            (work.state[i][0].priority, work.state[i][0].created_at, i)
            for i in held
            if i in work.state
        )
        released = 0
        for _, _, workflow_id in order:
            workflow, run = work.state[workflow_id]
            if not machine.paused_by(workflow, key):
                continue
            t = machine.resume(workflow, run, self.registry.of(workflow), now)
            self.record(work, t, workflow_id, now)  # held again if another type pause holds it
            released += 1
        work.log(
            "info",
            "workflow type resumed",
            workflow=request.workflow,
            step=request.step,
            released=released,
        )
        return {
            "workflow": request.workflow,
            "step": request.step,
            "paused": False,
            "released": released,
        }

    def _start(self, request: StartRequest, work: Work, now: float) -> None:
        workflow_id = request.workflow_id
        if request.request_id in work.answered:  # refused before: the same answer again
            ok, value = work.answered[request.request_id]
            work.reply(request, ok, value)
            return
        if workflow_id in work.state:
            work.reply(request, True, {"workflow_id": workflow_id, "existing": True})
            return
        key = request.idempotency_key
        if key is not None and key in work.keys:
            work.reply(request, True, {"workflow_id": work.keys[key], "existing": True})
            return
        definition = self.registry.named(request.workflow)
        run_at = request.run_at if request.delay is None else now + request.delay
        t = machine.start(
            definition,
            workflow_id,
            request.payload,
            now,
            run_at=run_at,
            idempotency_key=key,
            traceparent=request.traceparent,
            attributes=request.attributes,
            priority=request.priority,
        )
        if key is not None:
            work.keys[key] = workflow_id
        self.record(work, t, workflow_id, now)
        work.started += 1
        work.reply(request, True, {"workflow_id": workflow_id, "existing": False})

    def _schedule_request(self, request: ScheduleRequest, work: Work, now: float) -> None:
        if request.workflow not in self.registry.latest:
            raise UnknownWorkflowError(
                f"cannot schedule {request.workflow!r}: no such workflow is defined"
            )
        schedule = schedules.new(
            request.schedule_id,
            request.workflow,
            request.cron,
            timezone=request.timezone,
            payload=request.payload,
            catch_up=request.catch_up,
            now=now,
        )
        current = self._schedule(schedule.id, work)
        if current is not None and schedules.same(current, schedule):
            schedule = current  # scheduling again changes nothing (every service start does it)
        else:
            work.schedules[schedule.id] = schedule
            work.batch.schedules[schedule.id] = schedule
        work.reply(request, True, schedule.to_json())


def _loaded(work: Work, workflow_id: str) -> tuple[Workflow, StepRun]:
    found = work.state.get(workflow_id)
    if found is None:
        raise WorkflowNotFoundError(f"no workflow with id {workflow_id!r}")
    workflow, run = found
    if run is None:
        raise WorkflowNotFoundError(f"workflow {workflow_id!r} has no step run")
    return workflow, run


def _last_run(work: Work, workflow_id: str, step: str) -> StepRun | None:
    """The latest run of ``step``: made by this batch so far, or the one loaded."""
    made = [
        run for (wid, _), run in work.batch.runs.items() if wid == workflow_id and run.step == step
    ]
    if made:
        return max(made, key=lambda run: run.seq)
    return work.last_runs.get((workflow_id, step))


def _refuse_item(event: OutcomeEvent | DeadLetterEvent, reason: str) -> None:
    """An item naming no workflow we know: dead-lettered with the reason, the store unchanged."""
    if event.source is None or event.source.delivery is None:
        return
    item = (
        event.outcome.as_sent
        if isinstance(event, OutcomeEvent)
        else json.loads(event.step.encode())
    )
    if (item, reason) not in event.source.refused:  # a batch tried again refuses it once
        event.source.refused.append((item, reason))


def _log_finished(work: Work, workflow: Workflow) -> None:
    if workflow.status == "failed":
        error = workflow.error or {}
        work.log(
            "warning",
            "workflow failed",
            workflow_id=workflow.id,
            workflow=workflow.name,
            step=error.get("step"),
            attempt=error.get("attempts"),
            error=error.get("message"),
            **tracing.log_fields(workflow.traceparent),
        )
    else:
        work.log(
            "debug",
            "workflow finished",
            workflow_id=workflow.id,
            status=str(workflow.status),
            **tracing.log_fields(workflow.traceparent),
        )
