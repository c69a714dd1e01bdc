"""Child workflows: a step starts workflows of its own, and its workflow waits for them.

A handler returns ``{"child": {"workflow": W, "data": D}, "next_step": X}`` (or a list of
such children). In the transaction that records that outcome:

- each child is started with an id derived from the parent's step run (:func:`child_id`),
  so a start applied twice finds the child there and starts nothing;
- the parent becomes ``waiting``, its ``wait`` naming the children and its ``children``
  keeping the group: which step run started it, and how each child ended.

The rules, one per event:

- a child that ends (:func:`child_finished`) is recorded in its parent in the transaction
  that ends it. When the last one succeeds, the parent resumes: step X runs with the
  child's output as its payload (a list of outputs, in order, for a list of children).
  The first one that fails or is cancelled fails the parent's step with ``ChildFailed``,
  not retried (the child had its own retries): the parent takes ``on_error`` or fails.
  Its siblings run on, and what they end with is still recorded;
- ``cancel(parent)`` cancels the children not finished (:func:`cascade`), but for those
  started with ``parent_close="abandon"``;
- ``retry(parent)`` after ``ChildFailed`` (:func:`retry_parent`) retries each failed child
  from its failed step (its succeeded steps are not run again) and waits for them again,
  keeping the outputs of those that succeeded.

Everything is in the two workflows' rows: a crash between any two transitions reloads
the same state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from typing import Any

from hms_mgmt.bounds import ID_PATTERN, child_problem
from hms_mgmt.definitions import WorkflowDefinition
from hms_mgmt.errors import InvalidStateError
from hms_mgmt.machine.moves import enter, finish, give_up
from hms_mgmt.machine.pause import while_paused
from hms_mgmt.machine.transition import (
    CancelChild,
    ChildFinished,
    RetryChild,
    StartChild,
    Transition,
)
from hms_mgmt.records import StepRun, Workflow, WorkflowStatus, evolve
from hms_mgmt.wire.codec import MAX_PAYLOAD_BYTES, dumps

CHILD_FAILED = "ChildFailed"
"""The error of a parent's step whose child workflow failed or was cancelled."""
TERMINATE, ABANDON = "terminate", "abandon"


MAX_DEPTH = 32
"""How deep child workflows nest: a child of a workflow at this depth cannot start. It keeps
a workflow type that starts a child of its own type from nesting forever, and every cascade
through a family (a cancel, a failure told to each parent) within the rounds the engine
follows in one batch (``FOLLOW_UP_ROUNDS``, 100)."""


MAX_FAMILY = 10_000
"""How many workflows one family holds at most: a root (a workflow that is no child) and all
its descendants. A step whose children would take its family over it fails with
``InvalidChild``. With ``MAX_DEPTH`` alone, a type whose step starts a thousand children of
its own type would grow a family without practical bound, and a cancel of the root cascades
through all of it."""

FAMILY_PREFIX_MAX = 79
"""A child's id is its parent's, then ``.step.visit.index``; too long for an id, its first 79
characters and a digest (:func:`child_id`). So every descendant of a root whose id has at most
78 characters starts with ``root.``, and of a longer root, with its first 79 characters."""


def root_of(workflow: Workflow) -> str:
    """The id of the root of ``workflow``'s family: its own if it is no child. A child
    started before roots were recorded counts its parent as its root."""
    if workflow.parent is None:
        return workflow.id
    root = workflow.parent.get("root")
    return root if isinstance(root, str) else str(workflow.parent["id"])


def family_prefix(root: str) -> str:
    """What the ids of ``root``'s descendants start with (:data:`FAMILY_PREFIX_MAX`). Another
    workflow whose id a client chose to start so is counted with the family too."""
    if len(root) < FAMILY_PREFIX_MAX:
        return root + "."
    return root[:FAMILY_PREFIX_MAX]


def family_size(root: str, prefixed: int) -> int:
    """The workflows in ``root``'s family, from how many ids start with its
    :func:`family_prefix`: those and the root (counted among them if its id is that long)."""
    return prefixed if root.startswith(family_prefix(root)) else prefixed + 1


def depth_of(workflow: Workflow) -> int:
    """How deep ``workflow`` is among child workflows: 0 for one that is no child. A child
    started before depths were recorded counts as 1."""
    if workflow.parent is None:
        return 0
    depth = workflow.parent.get("depth")
    return depth if isinstance(depth, int) and not isinstance(depth, bool) else 1


def problem(
    result: dict[str, Any],
    known: Collection[str],
    handler: str,
    *,
    error_step: bool = False,
    depth: int = 0,
    family: int | None = None,
) -> str | None:
    """Why a result's children cannot start, naming the handler; None if they can.
    ``known``: the names of the workflows defined; ``error_step``: the result is of the
    workflow's ``on_error`` step, which ends the workflow and so cannot wait for children;
    ``depth``: the workflow's own (:func:`depth_of`), its children's less one; ``family``:
    how many workflows its family holds (:func:`family_size`, with the children started
    since), None if not known."""
    value = result.get("child")
    if value is None:
        return None
    shape = child_problem(value)
    if shape is not None:
        return f"{handler} returned a bad child: {shape}"
    if error_step:
        return f"{handler} returned a child, but an error step cannot start child workflows"
    if depth >= MAX_DEPTH:
        return (
            f"{handler} returned a child of a workflow {depth} deep among child workflows; "
            f"they nest at most {MAX_DEPTH} deep"
        )
    for key in ("wait_for", "complete", "delay", "run_at"):
        if result.get(key):
            return (
                f"{handler} returned both 'child' and {key!r}; a step that starts children "
                "waits for them"
            )
    specs = value if isinstance(value, list) else [value]
    if family is not None and family + len(specs) > MAX_FAMILY:
        return (
            f"{handler} returned {len(specs)} child workflow{'s' if len(specs) != 1 else ''}, "
            f"which would take its family (a root and all its descendants) from {family} to "
            f"{family + len(specs)} workflows; a family holds at most {MAX_FAMILY}"
        )
    for spec in specs:
        if spec["workflow"] not in known:
            names = ", ".join(sorted(known)) or "none"
            return (
                f"{handler} returned child workflow {spec['workflow']!r}, which is not defined "
                f"(the workflows defined: {names})"
            )
    return None


def child_id(parent_id: str, step: str, visit: int, index: int) -> str:
    """The id of a child: the same for the same parent step run (visit) and index, so a
    start applied again starts nothing. Too long for an id, it ends in a digest instead."""
    readable = f"{parent_id}.{step}.{visit}.{index}"
    if len(readable) <= 100 and ID_PATTERN.fullmatch(readable):
        return readable
    digest = hashlib.blake2b(readable.encode(), digest_size=10).hexdigest()
    return f"{readable[:79]}.{digest}"


def spawn(
    t: Transition,
    wf: Workflow,
    run: StepRun,
    definition: WorkflowDefinition,
    result: dict[str, Any],
    now: float,
) -> None:
    """The step ``run`` returned children: start them, and wait for them."""
    value = result["child"]
    many = isinstance(value, list)
    specs: list[dict[str, Any]] = value if many else [value]
    ids = [child_id(wf.id, run.step, run.visit, i) for i in range(len(specs))]
    wf.children = {
        "step": run.step,
        "seq": run.seq,
        "ids": ids,
        "workflows": [spec["workflow"] for spec in specs],
        "close": [spec.get("parent_close", TERMINATE) for spec in specs],
        "next_step": result.get("next_step") or definition.next_after(run.step),
        "many": many,
        "done": {},
    }
    wf.status = WorkflowStatus.WAITING
    wf.wait = _wait_of(wf.children, now)
    for index, spec in enumerate(specs):
        parent = {
            "id": wf.id,
            "name": wf.name,
            "step": run.step,
            "seq": run.seq,
            "index": index,
            "close": spec.get("parent_close", TERMINATE),
            "depth": depth_of(wf) + 1,
            "root": root_of(wf),
        }
        start = StartChild(
            ids[index], spec["workflow"], spec.get("data"), parent, wf.traceparent, wf.priority
        )
        t.follow.append(start)
    t.note("children_started", step=run.step, seq=run.seq, children=ids)


def _wait_of(group: dict[str, Any], now: float) -> dict[str, Any]:
    """A parent's ``wait`` while its children run: the text its status shows, and the ids."""
    ids = group["ids"]
    event = f"child workflow {ids[0]}" if len(ids) == 1 else f"{len(ids)} child workflows"
    # ``event`` is no signal name (it has spaces), so no signal ever ends this wait.
    return {
        "event": event,
        "children": list(ids),
        "next_step": group["next_step"],
        "data": None,
        "until": None,
        "since": now,
    }


def started(definition: WorkflowDefinition, follow: StartChild, now: float) -> Transition:
    """The child's start, with its parent: a workflow like any other."""
    from hms_mgmt.machine.events import start  # events imports moves, which imports this

    t = start(
        definition,
        follow.workflow_id,
        follow.data,
        now,
        traceparent=follow.traceparent,
        priority=follow.priority,
    )
    assert t.workflow is not None
    t.workflow.parent = dict(follow.parent)
    t.history[0][1]["parent"] = follow.parent["id"]
    return t


def finished(wf: Workflow) -> ChildFinished | None:
    """What a child that has just ended tells its parent."""
    if wf.parent is None:
        return None
    return ChildFinished(
        wf.parent["id"], wf.id, int(wf.parent["seq"]), str(wf.status), wf.output, wf.error
    )


def waits_for(workflow: Workflow, group: dict[str, Any] | None) -> bool:
    return (
        group is not None
        and workflow.status == WorkflowStatus.WAITING
        and workflow.wait is not None
        and workflow.wait.get("children") == group["ids"]
    )


def child_finished(
    workflow: Workflow,
    run: StepRun | None,
    definition: WorkflowDefinition,
    event: ChildFinished,
    now: float,
) -> Transition:
    """A child ended: recorded in its parent's group; the parent resumes when it was the
    last, or its step fails when it did not succeed."""
    if workflow.status == WorkflowStatus.PAUSED:  # recorded; the step it leads to is held
        return while_paused(
            workflow, now, lambda view: child_finished(view, run, definition, event, now)
        )
    t = Transition()
    group = workflow.children
    if group is None or group["seq"] != event.seq or event.child_id not in group["ids"]:
        t.note("child_finished_ignored", child=event.child_id, reason="not a current child")
        return t
    wf = evolve(workflow, updated_at=now)
    t.workflow = wf
    waiting = waits_for(workflow, group)
    record: dict[str, Any] = {"status": event.status}
    if event.status == WorkflowStatus.SUCCEEDED:
        record["output"] = event.output
    else:
        record["error"] = event.error
    group = wf.children = {**group, "done": {**group["done"], event.child_id: record}}
    t.note("child_finished", child=event.child_id, status=event.status, waiting=waiting)
    if not waiting or run is None:
        return t
    if event.status != WorkflowStatus.SUCCEEDED:
        _fail_step(t, wf, run, definition, event, now)
        return t
    if all(group["done"].get(i, {}).get("status") == "succeeded" for i in group["ids"]):
        _resume(t, wf, definition, group, now)
    return t


def _fail_step(
    t: Transition,
    wf: Workflow,
    run: StepRun,
    definition: WorkflowDefinition,
    event: ChildFinished,
    now: float,
) -> None:
    error = event.error or {}
    what = "was cancelled" if event.status == WorkflowStatus.CANCELLED else "failed"
    failure = {
        "type": CHILD_FAILED,
        "message": f"child workflow {event.child_id} {what}: "
        f"{error.get('type')}: {error.get('message')}",
        "child": event.child_id,
        "child_status": event.status,
        "child_error": event.error,
        "step": run.step,
        "seq": run.seq,
        "attempts": run.attempt,
        "reason": f"child {event.status}",
    }
    wf.wait = None
    wf.status = WorkflowStatus.RUNNING
    t.note(
        "child_failed",
        seq=run.seq,
        step=run.step,
        attempt=run.attempt,
        error_type=CHILD_FAILED,
        message=failure["message"],
    )
    # Not retried, and not dead-lettered: the child had its own retries, and its own
    # message is in its step's .dlq.
    give_up(t, wf, run, definition, failure, now, dead_letter=False)


def _resume(
    t: Transition, wf: Workflow, definition: WorkflowDefinition, group: dict[str, Any], now: float
) -> None:
    outputs = [group["done"][i].get("output") for i in group["ids"]]
    payload = outputs if group["many"] else outputs[0]
    wf.wait = None
    wf.status = WorkflowStatus.RUNNING
    t.note("resumed", event=f"children of {group['step']}", children=len(outputs))
    next_step = group["next_step"]
    if next_step is None:
        finish(t, wf, WorkflowStatus.SUCCEEDED, output=payload)
        return
    size = len(dumps(payload))
    if size > MAX_PAYLOAD_BYTES:  # the next step's message could not carry them
        failure = {
            "type": "PayloadError",
            "message": f"the outputs of the child workflows of {group['step']!r} come to "
            f"{size} bytes of JSON; a step message carries at most {MAX_PAYLOAD_BYTES}",
            "step": next_step,
            "reason": "payload too large",
        }
        finish(t, wf, WorkflowStatus.FAILED, error=failure)
        return
    enter(t, definition, next_step, payload, now, workflow=wf)


def cascade(
    t: Transition, workflow: Workflow, reason: str | None, *, how: str = "cancelled"
) -> None:
    """A cancelled parent (or one reset while it waits for them) cancels its children that
    have not finished, but for those started with ``parent_close="abandon"``."""
    group = workflow.children
    if group is None:
        return
    why = f"parent {workflow.id} {how}" + (f": {reason}" if reason else "")
    cancelled = [
        child
        for child, close in zip(group["ids"], group["close"], strict=True)
        if child not in group["done"] and close == TERMINATE
    ]
    t.follow += [CancelChild(child, why) for child in cancelled]
    if cancelled:
        t.note("children_cancelled", children=cancelled)


def failed_by_child(workflow: Workflow) -> bool:
    return (workflow.error or {}).get("type") == CHILD_FAILED and workflow.children is not None


def retry_parent(workflow: Workflow, definition: WorkflowDefinition, now: float) -> Transition:
    """Retry a parent whose step failed with ``ChildFailed``: each failed child is retried
    from its failed step, and the parent waits for its children again."""
    group = workflow.children
    assert group is not None
    failed = [
        i for i in group["ids"] if group["done"].get(i, {}).get("status") not in (None, "succeeded")
    ]
    cancelled = [i for i in failed if group["done"][i]["status"] == WorkflowStatus.CANCELLED]
    if cancelled:
        raise InvalidStateError(
            f"cannot retry workflow {workflow.id}: its child workflow {cancelled[0]} was "
            f"cancelled, and only a failed workflow can be retried (reset {workflow.id} to "
            f"step {group['step']!r} to start new children)"
        )
    t = Transition()
    wf = evolve(
        workflow,
        updated_at=now,
        status=WorkflowStatus.WAITING,
        error=None,
        output=None,
        retries=workflow.retries + 1,
    )
    t.workflow = wf
    done = {k: v for k, v in group["done"].items() if k not in failed}
    group = wf.children = {**group, "done": done}
    wf.wait = _wait_of(group, now)
    t.note("workflow_retried", step=group["step"], from_seq=group["seq"], children=failed)
    for child in failed:
        t.follow.append(RetryChild(child))
    if all(done.get(i, {}).get("status") == "succeeded" for i in group["ids"]):
        _resume(t, wf, definition, group, now)  # they all succeeded since (retried alone)
    return t
