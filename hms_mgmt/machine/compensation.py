"""Compensation (sagas): the rule of a workflow's compensation chain.

These are the chain's pure rules; the moves that use them are
:func:`~hms_mgmt.machine.moves.give_up_workflow` (begin), :func:`~hms_mgmt.machine.events.compensate`
(the next one, or the end), and :func:`~hms_mgmt.machine.events.retry`.

A workflow that gives up (after its error step, if it has one) or is cancelled with
``compensate=True`` becomes ``compensating`` when a step with a compensation has been
entered. Its compensations then run one at a time, newest first: one per succeeded run of
a step with a compensation, each a step run of the compensation step with the compensated
run's input as payload and ``{"step", "seq", "output"}`` of that run as ``ctx.compensating``.

The chain's progress is never kept beside the runs: it is derived from them
(:func:`to_compensate`), so a crash between any two transitions, a duplicated outcome or
an operator's retry all find the same next compensation. Between two compensations the
workflow holds a ``compensate`` timer due at once; firing it (``compensate``, given
the workflow's runs) starts the next compensation or ends the chain:

- every compensation succeeded: ``compensated``, the error kept (why it compensated);
- nothing was to be compensated (no step with a compensation succeeded): the workflow
  ends as it would have without compensations, ``failed`` or ``cancelled``;
- a compensation gave up (:func:`failure`): ``failed``, with ``reason``
  ``compensation_failed``, the compensation's failure and the original error
  (``original``); ``retry`` resumes the chain at that compensation.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hms_mgmt.definitions import WorkflowDefinition
from hms_mgmt.records import StepRun, StepStatus, Workflow
from hms_mgmt.wire.codec import MAX_PAYLOAD_BYTES, dumps

COMPENSATION_FAILED = "compensation_failed"
"""The ``reason`` in the error of a workflow whose compensation gave up."""


def compensated_seq(run: StepRun) -> int | None:
    """The seq of the run that ``run`` compensates; None if it is not a compensation run."""
    about = (run.context or {}).get("compensating")
    seq = about.get("seq") if isinstance(about, dict) else None
    return seq if isinstance(seq, int) else None


def to_compensate(runs: Iterable[StepRun], definition: WorkflowDefinition) -> list[StepRun]:
    """The succeeded runs still to be compensated, newest first: every succeeded run of a
    step with a compensation, but those whose compensation has succeeded."""
    runs = list(runs)
    done = {
        compensated_seq(run)
        for run in runs
        if run.status == StepStatus.SUCCEEDED and compensated_seq(run) is not None
    }
    pending = [
        run
        for run in runs
        if run.status == StepStatus.SUCCEEDED
        and compensated_seq(run) is None
        and definition.compensation_of(run.step) is not None
        and run.seq not in done
    ]
    return sorted(pending, key=lambda run: run.seq, reverse=True)


def may_compensate(wf: Workflow, definition: WorkflowDefinition) -> bool:
    """Whether a step with a compensation has been entered (and so may have succeeded)."""
    return any(
        wf.visits.get(step.name) and step.compensation is not None for step in definition.steps
    )


def next_compensation(
    wf: Workflow, definition: WorkflowDefinition, runs: Iterable[StepRun]
) -> tuple[str, StepRun, int, dict[str, Any]] | None:
    """The next compensation to run: its step, the run it compensates, its visit (that of
    an earlier attempt series for the same run, so its idempotency key stays the same
    across an operator's retry) and its context; None when none is left."""
    runs = list(runs)
    pending = to_compensate(runs, definition)
    if not pending:
        return None
    target = pending[0]
    step = definition.compensation_of(target.step)
    assert step is not None
    earlier = [run for run in runs if compensated_seq(run) == target.seq]
    visit = earlier[-1].visit if earlier else wf.visits.get(step, 0) + 1
    context = {"compensating": {"step": target.step, "seq": target.seq, "output": target.output}}
    return step, target, visit, context


def too_large(step: str, target: StepRun) -> str | None:
    """Why compensation ``step`` of ``target`` cannot be sent: the run's input and output
    together past what a step message carries. None if it can."""
    size = len(dumps(target.input)) + len(dumps(target.output))
    if size <= MAX_PAYLOAD_BYTES:
        return None
    return (
        f"compensation {step!r} of step {target.step!r} (run {target.seq}) would carry its "
        f"input and output, {size} bytes of JSON; a step message carries at most "
        f"{MAX_PAYLOAD_BYTES}: make the step's output smaller (a reference to the data)"
    )


def unsent(wf: Workflow, step: str, target: StepRun, why: str) -> dict[str, Any]:
    """The error of a workflow whose next compensation cannot be sent (:func:`too_large`)."""
    return {
        "type": "PayloadError",
        "message": why,
        "step": step,
        "reason": COMPENSATION_FAILED,
        "compensation": {
            "step": step,
            "compensated_step": target.step,
            "compensated_seq": target.seq,
            "error_type": "PayloadError",
            "why": "payload too large",
        },
        "original": wf.error,
    }


def failure(wf: Workflow, run: StepRun, failed: dict[str, Any]) -> dict[str, Any]:
    """The error of a workflow whose compensation ``run`` gave up with ``failed``: which
    compensation, why, and the error it was compensating for (``original``). Its ``seq``
    names the failed compensation run, which ``retry`` resumes from."""
    about = (run.context or {}).get("compensating") or {}
    return {
        **failed,
        "type": "CompensationFailed",
        "message": f"compensation {run.step!r} of step {about.get('step')!r} (run "
        f"{about.get('seq')}) gave up after {run.attempt} attempt(s): "
        f"{failed.get('type')}: {failed.get('message')}",
        "reason": COMPENSATION_FAILED,
        "compensation": {
            "step": run.step,
            "compensated_step": about.get("step"),
            "compensated_seq": about.get("seq"),
            "error_type": failed.get("type"),
            "why": failed.get("reason"),
        },
        "original": wf.error,
    }
