"""How the CLI shows things to people: tables, one workflow, its changes while followed."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

WIDTH = 60


def cell(value: Any, width: int = WIDTH) -> str:
    if value is None:
        return "-"
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def when(timestamp: float | None, *, date: bool = True) -> str:
    if timestamp is None:
        return "-"
    moment = datetime.fromtimestamp(timestamp, UTC)
    return (
        moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"
        if date
        else moment.strftime("%H:%M:%S.%f")[:-3]
    )


def took(start: float | None, end: float | None) -> str:
    if start is None or end is None:
        return "-"
    seconds = max(0.0, end - start)
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def error_text(error: dict[str, Any] | None) -> str | None:
    if not error:
        return None
    return f"{error.get('type')}: {error.get('message')}"


def summary_rows(workflows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "id": w["workflow_id"],
            "name": w["name"],
            "status": w["status"],
            "created": when(w["created_at"]),
            "updated": when(w["updated_at"]),
            "error": error_text(w.get("error")),
        }
        for w in workflows
    ]


def step_row(step: dict[str, Any]) -> dict[str, Any]:
    return {
        "seq": step["seq"],
        "step": step["step"],
        "attempt": step["attempt"],
        "status": step["status"],
        "started": when(step.get("started_at"), date=False),
        "took": took(step.get("started_at"), step.get("finished_at")),
        "error": error_text(step.get("error")),
    }


STEP_COLUMNS = ["seq", "step", "attempt", "status", "started", "took", "error"]


def show(state: dict[str, Any], *, history: bool = False) -> str:
    """One workflow for people: what it is, where it stands, each step run."""
    finished = state["status"] in ("succeeded", "failed", "cancelled")
    fields = [
        ("workflow", state["workflow_id"]),
        ("name", state["name"]),
        ("status", state["status"]),
        ("created", when(state["created_at"])),
        ("updated", when(state["updated_at"])),
        ("took", took(state["created_at"], state["updated_at"]) if finished else "-"),
    ]
    if state.get("current_step"):
        fields.append(("current", state["current_step"]))
    if state.get("scheduled_at"):
        fields.append(("scheduled", when(state["scheduled_at"])))
    if state.get("waiting_for"):
        fields.append(("waiting", f"for signal {state['waiting_for'].get('event')!r}"))
    if state.get("trace_id"):
        fields.append(("trace_id", state["trace_id"]))
    fields.append(("input", cell(state.get("input"), 100)))
    if state.get("output") is not None:
        fields.append(("output", cell(state["output"], 100)))
    error = state.get("error")
    if error:
        where = (
            f" at step {error['step']} after {error.get('attempts')} attempt(s)"
            if error.get("step")
            else ""
        )
        reason = f" ({error['reason']})" if error.get("reason") else ""
        fields.append(("error", f"{error_text(error)}{where}{reason}"))
    lines = [f"{name:<10}{value}" for name, value in fields]
    lines += ["", table([step_row(s) for s in state["steps"]], STEP_COLUMNS)]
    if history:
        events = [
            {"at": when(e["at"], date=False), "event": e["kind"], "detail": e["detail"]}
            for e in state.get("history", [])
        ]
        lines += ["", table(events, ["at", "event", "detail"])]
    return "\n".join(lines)


def changes(before: dict[str, Any] | None, after: dict[str, Any]) -> list[str]:
    """Lines for what changed between two looks at a workflow (for ``--follow``)."""
    seen = {s["seq"]: s for s in (before or {}).get("steps", [])}
    lines = []
    for step in after["steps"]:
        old = seen.get(step["seq"])
        if old is not None and old["status"] == step["status"]:
            continue
        row = step_row(step)
        at = step.get("finished_at") or step.get("started_at") or step["created_at"]
        line = f"{when(at, date=False)}  step {row['seq']} {row['step']} "
        line += f"attempt {row['attempt']}: {row['status']}"
        if step.get("finished_at"):
            line += f" in {row['took']}"
        if row["error"]:
            line += f" ({row['error']})"
        lines.append(line)
    if before is None or before["status"] != after["status"]:
        lines.append(f"{when(after['updated_at'], date=False)}  workflow {after['status']}")
    return lines
