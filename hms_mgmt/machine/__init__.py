"""The workflow state machine: pure functions from a state and an event to a transition.

Nothing here does I/O or reads the clock: the engine passes ``now`` in, loads
the workflow and its current run, applies the returned :class:`Transition`
to the store in one transaction together with the messages it causes, and
only then acks what it consumed. The same code runs on every bus and store.

Every function takes the workflow and its current (latest) run and leaves
them untouched; the transition carries changed copies.
"""

from hms_mgmt.machine import branches, children, compensation, limits
from hms_mgmt.machine.events import (
    apply_outcome,
    cancel,
    compensate,
    dead_lettered,
    fire_timer,
    reset,
    retry,
    signal,
    start,
)
from hms_mgmt.machine.limits import Slots, admit, must_queue, queue
from hms_mgmt.machine.moves import stale_reason, step_message
from hms_mgmt.machine.pause import hold_for_type, pause, paused_by, resume
from hms_mgmt.machine.transition import (
    TIMER_ADMIT,
    TIMER_BRANCH,
    TIMER_COMPENSATE,
    TIMER_DEADLINE,
    TIMER_RUN,
    TIMER_START,
    TIMER_WAIT,
    CancelChild,
    ChildFinished,
    DeadLetter,
    FollowUp,
    RetryChild,
    StartChild,
    Transition,
)

__all__ = (
    "TIMER_ADMIT",
    "TIMER_BRANCH",
    "TIMER_COMPENSATE",
    "TIMER_DEADLINE",
    "TIMER_RUN",
    "TIMER_START",
    "TIMER_WAIT",
    "CancelChild",
    "ChildFinished",
    "DeadLetter",
    "FollowUp",
    "RetryChild",
    "Slots",
    "StartChild",
    "Transition",
    "admit",
    "apply_outcome",
    "branches",
    "cancel",
    "children",
    "compensate",
    "compensation",
    "dead_lettered",
    "fire_timer",
    "hold_for_type",
    "limits",
    "must_queue",
    "pause",
    "paused_by",
    "queue",
    "reset",
    "resume",
    "retry",
    "signal",
    "stale_reason",
    "start",
    "step_message",
)
