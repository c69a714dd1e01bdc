"""Concurrency limits: which runs hold a step's slots, which wait as ``queued``, and how a
queued run is admitted. Pure: the engine keeps a :class:`Slots` built from the store at
start-up and changed only by committed batches.

A step with ``concurrency=N`` has N slots per *group*: the workflow type, the step, and the
value of its ``concurrency_key`` field in the run's input (runs without the field share
the group ``""``). A run holds a slot while it is its workflow's current run, published and
not finished: ``pending`` or ``running``, the workflow not finished and not holding it
unpublished while paused. Everything else (succeeded, failed, timed out, cancelled, dead
lettered, reset past, held by a pause) holds none, so a slot is freed by whatever
transition makes that so, in that transition's own commit: the slots follow the runs, they
are never counted on their own.

A run about to be published into a group whose slots are all taken (or behind others
queued there) is ``queued`` instead: nothing is published. When a slot of the group frees,
its first queued run is admitted (published) in the same batch.

A step's ``rate_limit`` spaces its publications evenly (``next_at``), one rate per step
whatever the key: a run due before then is queued too, and the run first in line gets a
durable timer (kind ``admit``) for ``next_at``, which admits it.

The order of admission (:meth:`Slots.next_turn`):

- within a group, its line is ordered by (priority, creation time of the run): a
  priority 1 run goes before every priority 2 run, however old;
- among the step's groups with a free slot (several at once only when a rate limit, shared
  by the step's keys, is what holds them back), the best priority at the head of a line
  goes first; among heads of the same priority, the key served longest ago (round-robin:
  a key with a backlog cannot starve the others), then the oldest.

Which key was served last is kept in memory only (:attr:`Slots.served`), for keys with runs
in line or out: after a restart the turns start again from the oldest. It orders the
turns, never counts a slot.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from hms_mgmt.definitions import WorkflowDefinition
from hms_mgmt.machine.moves import clear_timer, publish
from hms_mgmt.machine.transition import TIMER_ADMIT, TIMER_START, Transition
from hms_mgmt.records import StepRun, StepStatus, Workflow, WorkflowStatus, evolve

Group = tuple[str, str, str]
"""A slot group: workflow type, step, value of the concurrency key ("" without one)."""

ACTIVE = "active"
QUEUED = "queued"


def group_of(definition: WorkflowDefinition, run: StepRun) -> Group | None:
    """The slot group of a run; None if its step has neither a concurrency nor a rate limit."""
    step = definition.step(run.step)
    if step is None or (step.concurrency is None and step.rate_limit is None):
        return None
    value = ""
    if step.concurrency_key is not None and isinstance(run.input, dict):
        found = run.input.get(step.concurrency_key)
        if found is not None:
            value = found if isinstance(found, str) else json.dumps(found, sort_keys=True)
    return (definition.name, run.step, value)


def limit_of(definition: WorkflowDefinition, step: str) -> int | None:
    found = definition.step(step)
    return None if found is None else found.concurrency


def interval_of(definition: WorkflowDefinition, step: str) -> float | None:
    found = definition.step(step)
    return None if found is None else found.rate_interval


def state_of(workflow: Workflow, run: StepRun | None) -> str | None:
    """Whether a workflow's current run holds a slot (``active``), waits for one
    (``queued``), or neither (None)."""
    if run is None or workflow.terminal or run.seq != workflow.seq:
        return None
    if run.status == StepStatus.QUEUED:
        return QUEUED
    if run.status not in (StepStatus.PENDING, StepStatus.RUNNING):
        return None
    if workflow.status == WorkflowStatus.PAUSED and (workflow.pause or {}).get("held") == run.seq:
        return None  # held unpublished while paused: it goes through admission on resume
    return ACTIVE


Place = tuple[int, float]
"""A run's place in its group's line: its workflow's priority (1 first), the run's creation."""


@dataclass
class Slots:
    """Each workflow's current limited run: its group, whether it is active or queued, and
    (queued) its place in line. Built from the store's runs, never from counters."""

    of: dict[str, tuple[Group, str, Place]] = field(default_factory=dict)  # id -> group,
    # state, place in line
    active: dict[Group, set[str]] = field(default_factory=dict)
    queued: dict[Group, dict[str, Place]] = field(default_factory=dict)
    # (workflow type, step) -> when its rate limit next admits a run
    next_at: dict[tuple[str, str], float] = field(default_factory=dict)
    # The round-robin between a step's keys: group -> the turn it was last served at. Not
    # rebuilt at start-up, and not compared: slots are equal when their runs are.
    served: dict[Group, int] = field(default_factory=dict, compare=False)
    turn: int = field(default=0, compare=False)

    @classmethod
    def build(
        cls,
        rows: Iterable[tuple[Workflow, StepRun | None]],
        definition_of: Callable[[Workflow], WorkflowDefinition | None],
    ) -> Slots:
        """The slots as the store's runs have them (at start-up)."""
        slots = cls()
        for workflow, run in rows:
            definition = definition_of(workflow)
            if definition is not None:
                slots.track(workflow, run, definition)
        return slots

    def track(
        self, workflow: Workflow, run: StepRun | None, definition: WorkflowDefinition
    ) -> None:
        """Follow a workflow's new state: it leaves its old group and state, enters its new."""
        self.forget(workflow.id)
        state = state_of(workflow, run)
        if state is None or run is None:
            return
        group = group_of(definition, run)
        if group is None:
            return
        place = (workflow.priority, run.created_at)
        self.of[workflow.id] = (group, state, place)
        if state == ACTIVE:
            self.active.setdefault(group, set()).add(workflow.id)
        else:
            self.queued.setdefault(group, {})[workflow.id] = place

    def forget(self, workflow_id: str) -> tuple[Group, str] | None:
        found = self.of.pop(workflow_id, None)
        if found is None:
            return None
        group, state, _ = found
        if state == ACTIVE:
            members = self.active.get(group)
            if members is not None:
                members.discard(workflow_id)
                if not members:
                    del self.active[group]
        else:
            line = self.queued.get(group)
            if line is not None:
                line.pop(workflow_id, None)
                if not line:
                    del self.queued[group]
        if group not in self.active and group not in self.queued:
            self.served.pop(group, None)  # a key with nothing out or in line starts afresh
        return group, state

    def taken(self, group: Group) -> int:
        return len(self.active.get(group, ()))

    def free(self, group: Group, limit: int | None) -> bool:
        return limit is None or self.taken(group) < limit

    def rate_allows(self, key: tuple[str, str], now: float) -> bool:
        return self.next_at.get(key, float("-inf")) <= now

    def consume(self, key: tuple[str, str], interval: float, now: float) -> None:
        """A run published under a rate limit: the next may go ``interval`` after the time
        this one was due, so that admissions a little late (a timer fires after its time)
        do not slow the rate down; never more than one beyond the rate in any window."""
        due = self.next_at.get(key)
        base = now if due is None or due < now - interval else max(due, now - interval)
        self.next_at[key] = max(base + interval, now)

    def groups_of(self, key: tuple[str, str]) -> list[Group]:
        """The groups of a step with runs in line."""
        return [g for g in self.queued if g[:2] == key]

    def line(self, group: Group) -> list[str]:
        """The runs queued in a group in the order of admission: by priority, then oldest."""
        found = self.queued.get(group, {})
        return [i for _, i in sorted((place, i) for i, place in found.items())]

    def next_turn(self, groups: Iterable[Group]) -> Group | None:
        """Of these groups with a line (and a free slot), the one whose head goes next: the
        best priority at the head of a line; among those, the key served longest ago
        (round-robin); then the oldest head."""
        best: tuple[int, int, float, str] | None = None
        chosen = None
        for group in groups:
            line = self.queued.get(group)
            if not line:
                continue
            head = min((place, i) for i, place in line.items())
            (priority, created), workflow_id = head
            rank = (priority, self.served.get(group, -1), created, workflow_id)
            if best is None or rank < best:
                best, chosen = rank, group
        return chosen

    def serve(self, group: Group) -> None:
        """A run of this group was published: its key's turn goes to the back."""
        self.served[group] = self.turn
        self.turn += 1

    def waiting(self) -> int:
        return sum(len(line) for line in self.queued.values())

    def copy(self) -> Slots:
        return Slots(
            dict(self.of),
            {g: set(m) for g, m in self.active.items()},
            {g: dict(line) for g, line in self.queued.items()},
            dict(self.next_at),
            dict(self.served),
            self.turn,
        )


def must_queue(
    t: Transition,
    slots: Slots,
    definition: WorkflowDefinition,
    now: float,
    *,
    admitting: bool = False,
) -> bool:
    """Whether the step this transition would publish has to wait: its rate limit not yet
    due, its group's slots all taken, or (unless this is the admission of the oldest)
    others already waiting. A fan-out's branches never wait here: its ``max_concurrency``
    bounds them, not their step's limits."""
    wf = t.workflow
    if wf is None or not t.steps or any(s.context and "branch" in s.context for s in t.steps):
        return False
    run = next((r for r in t.runs if r.seq == t.steps[-1].seq), None)
    if run is None:
        return False
    group = group_of(definition, run)
    if group is None:
        return False
    if interval_of(definition, run.step) is not None and not slots.rate_allows(group[:2], now):
        return True
    limit = limit_of(definition, run.step)
    if limit is not None and slots.of.get(wf.id, (None, None, (0, 0.0)))[:2] == (group, ACTIVE):
        return False  # published again (a retry at once), still in its slot
    others = [i for i in slots.queued.get(group, {}) if i != wf.id]
    return not slots.free(group, limit) or (bool(others) and not admitting)


def queue(t: Transition, now: float) -> None:
    """Queue the run a transition would publish: it waits for a slot, nothing published."""
    wf = t.workflow
    assert wf is not None and t.steps
    step = t.steps.pop()
    for i, run in enumerate(t.runs):
        if run.seq == step.seq:
            t.runs[i] = evolve(run, status=StepStatus.QUEUED)
    if wf.timer_kind == TIMER_START:  # its limit starts when it is published
        clear_timer(wf)
    t.history = [
        ("step_queued", detail)
        if kind == "step_published" and detail.get("seq") == step.seq
        else (kind, detail)
        for kind, detail in t.history
    ]


def admit(
    workflow: Workflow, run: StepRun, definition: WorkflowDefinition, now: float
) -> Transition:
    """A slot is free for a queued run: publish it (held instead, if its workflow is
    paused: its resume goes through admission again)."""
    t = Transition()
    if run.status != StepStatus.QUEUED or run.seq != workflow.seq or workflow.terminal:
        return t
    wf = evolve(workflow, updated_at=now)
    current = evolve(run, status=StepStatus.PENDING)
    if wf.timer_kind == TIMER_ADMIT:
        clear_timer(wf)
    t.workflow = wf
    t.runs.append(current)
    if wf.status == WorkflowStatus.PAUSED:
        wf.pause = {**(wf.pause or {}), "held": current.seq}
        t.note("step_admitted", seq=current.seq, step=current.step, held=True)
        return t
    t.note("step_admitted", seq=current.seq, step=current.step, held=False)
    publish(t, wf, current, definition, now)
    return t


def disarm(workflow: Workflow, now: float) -> Transition:
    """An admission timer that fired and did not admit its run (another's turn came first,
    or the rate was not yet due): cleared, so that no stale timer stays armed in the
    store. The run next in line holds the timer of the next admission."""
    t = Transition()
    if workflow.timer_kind != TIMER_ADMIT or workflow.timer_at is None or workflow.timer_at > now:
        return t
    wf = evolve(workflow, updated_at=now)
    clear_timer(wf)
    t.workflow = wf
    return t


def arm(workflow: Workflow, due: float, now: float) -> Transition:
    """The next admission of a rate-limited step: a durable timer on the run first in line."""
    t = Transition()
    if workflow.timer_kind == TIMER_ADMIT and workflow.timer_at == due:
        return t
    wf = evolve(workflow, updated_at=now, timer_at=due, timer_kind=TIMER_ADMIT)
    t.workflow = wf
    return t
