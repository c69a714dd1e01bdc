"""Records as rows and rows as records, the same for every store backend.

JSON values are stored as text (so a row can be read by hand), timestamps as seconds
since the epoch (floats), ids and names as text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from hms_mgmt.records import QUEUED_FILTER, StepRun, StepStatus, Workflow, WorkflowStatus
from hms_mgmt.wire.codec import dumps

WORKFLOW_COLUMNS = (
    "id, name, version, status, input, output, error, seq, visits, timer_at, timer_kind, "
    "wait, signals, idempotency_key, created_at, updated_at, traceparent, retries, pause, "
    "priority, parent, children, branches"
)
RUN_COLUMNS = (
    "workflow_id, seq, step, visit, attempt, status, input, output, error, context, "
    "created_at, due_at, started_at, finished_at, deadline_at"
)
WORKFLOW_AND_RUN = ", ".join(
    [f"w.{c.strip()}" for c in WORKFLOW_COLUMNS.split(",")]
    + [f"r.{c.strip()}" for c in RUN_COLUMNS.split(",")]
)
WORKFLOW_WIDTH = len(WORKFLOW_COLUMNS.split(","))
# Terminal statuses: matches the partial index (SQLite schema 8, PostgreSQL migration 6)
FINISHED = "status IN ('succeeded', 'failed', 'cancelled', 'compensated')"


def as_json(value: Any) -> str | None:
    return None if value is None else dumps(value).decode()


def unjson(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def workflow_row(w: Workflow) -> tuple[Any, ...]:
    return (
        w.id, w.name, w.version, str(w.status), as_json(w.input), as_json(w.output), as_json(w.error),
        w.seq, as_json(w.visits), w.timer_at, w.timer_kind, as_json(w.wait), as_json(w.signals),
        w.idempotency_key, w.created_at, w.updated_at, w.traceparent, w.retries, as_json(w.pause),
        w.priority, as_json(w.parent), as_json(w.children), as_json(w.branches),
    )  # fmt: skip


def workflow_of(row: Sequence[Any]) -> Workflow:
    return Workflow(
        id=row[0], name=row[1], version=row[2], status=WorkflowStatus(row[3]),
        input=unjson(row[4]), output=unjson(row[5]), error=unjson(row[6]), seq=row[7],
        visits=unjson(row[8]), timer_at=row[9], timer_kind=row[10], wait=unjson(row[11]),
        signals=unjson(row[12]), idempotency_key=row[13], created_at=row[14], updated_at=row[15],
        traceparent=row[16], retries=row[17], pause=unjson(row[18]), priority=row[19],
        parent=unjson(row[20]), children=unjson(row[21]), branches=unjson(row[22]),
    )  # fmt: skip


def run_row(r: StepRun) -> tuple[Any, ...]:
    return (
        r.workflow_id, r.seq, r.step, r.visit, r.attempt, str(r.status), as_json(r.input),
        as_json(r.output), as_json(r.error), as_json(r.context), r.created_at, r.due_at,
        r.started_at, r.finished_at, r.deadline_at,
    )  # fmt: skip


def run_of(row: Sequence[Any]) -> StepRun:
    return StepRun(
        workflow_id=row[0], seq=row[1], step=row[2], visit=row[3], attempt=row[4],
        status=StepStatus(row[5]), input=unjson(row[6]), output=unjson(row[7]),
        error=unjson(row[8]), context=unjson(row[9]), created_at=row[10], due_at=row[11],
        started_at=row[12], finished_at=row[13], deadline_at=row[14],
    )  # fmt: skip


def listing(
    *,
    status: str | None,
    name: str | None,
    attributes: Mapping[str, str] | None,
    before: tuple[float, str] | None,
    since: float | None = None,
    until: float | None = None,
) -> tuple[str, list[Any]]:
    """The ``WHERE`` clause of a workflow listing (``""`` for none), with ``{}`` where each
    parameter goes (each backend writes its own placeholder), and the parameters in order.

    Newest first, ``before`` the (created_at, id) of the last row of the page before:
    ``created_at <=`` comes first so that the index on created_at seeks to the page.
    """
    where: list[str] = []
    params: list[Any] = []
    if before is not None:
        where.append("created_at <= {} AND (created_at < {} OR id < {})")
        params.extend((before[0], before[0], before[1]))
    if since is not None:  # created in [since, until): a time range, on the same index
        where.append("created_at >= {}")
        params.append(since)
    if until is not None:
        where.append("created_at < {}")
        params.append(until)
    if status == QUEUED_FILTER:  # not finished, its current run in line for a slot
        where.append(
            f"NOT ({FINISHED}) AND EXISTS "
            "(SELECT 1 FROM step_runs r WHERE r.workflow_id = workflows.id "
            "AND r.seq = workflows.seq AND r.status = 'queued')"
        )
        status = None
    for column, value in (("status", status), ("name", name)):
        if value is not None:
            where.append(f"{column} = {{}}")
            params.append(value)
    for key, value in (attributes or {}).items():
        where.append(
            "id IN (SELECT workflow_id FROM workflow_attributes WHERE key = {} AND value = {})"
        )
        params.extend((key, value))
    return (f"WHERE {' AND '.join(where)}" if where else ""), params
