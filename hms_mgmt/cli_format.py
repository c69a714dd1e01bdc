"""How the CLI shows things to people: tables, one workflow, its changes while followed.

Whatever the engine stored is shown without crashing and without reaching the
terminal raw: control characters are escaped (``\\n``, ``\\x1b``), and a timestamp
that is not a date prints as the number it is.
"""

from __future__ import annotations

import json
import math
import time
from datetime import UTC, datetime
from typing import Any, TypeGuard

WIDTH = 60
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """``text`` with every character that is not printable escaped (newline, ESC, ...)."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def _escape(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _text(value: Any) -> str:
    """Any value as one line: strings as they are, the rest as JSON (or what Python makes of it)."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, default=str)
    except (ValueError, RecursionError):  # an integer of over 4300 digits, a deep structure
        return f"<{type(value).__name__}>"


def cell(value: Any, width: int = WIDTH) -> str:
    if value is None:
        return "-"
    text = printable(_text(value)[: width * 4])
    return text if len(text) <= width else text[: width - 3] + "..."


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def ago(timestamp: float | None, now: float | None = None) -> str:
    """How long ago a Unix timestamp was, for people: 42s, 7m, 3h, 2d."""
    if not _number(timestamp) or not math.isfinite(timestamp):
        return "-"
    seconds = max(0.0, (time.time() if now is None else now) - float(timestamp))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit}"
    return f"{seconds:.0f}s"


def when(timestamp: float | None, *, date: bool = True) -> str:
    """A Unix timestamp as UTC time; one that is no date (1e308, NaN) as the raw number."""
    if timestamp is None:
        return "-"
    if not _number(timestamp):
        return cell(timestamp)
    try:
        moment = datetime.fromtimestamp(timestamp, UTC)
    except (OverflowError, OSError, ValueError):
        return cell(timestamp)
    return (
        moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"
        if date
        else moment.strftime("%H:%M:%S.%f")[:-3]
    )


def relative(timestamp: Any, now: float) -> str:
    """How far ``timestamp`` is from ``now``: ``in 13d 23h``, ``in 3m 20s``, ``5s ago``;
    empty for what is no date."""
    if not _number(timestamp):
        return ""
    try:
        seconds = float(timestamp) - now
        whole = round(abs(seconds))
    except (OverflowError, ValueError):
        return ""
    if whole > 100 * 365 * 86400:
        return ""
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if whole >= size or (unit == "s" and not parts):
            parts.append(f"{whole // size}{unit}")
            whole %= size
        if len(parts) == 2:
            break
    span = " ".join(parts)
    return f"in {span}" if seconds >= 0 else f"{span} ago"


def took(start: float | None, end: float | None) -> str:
    if not _number(start) or not _number(end):
        return "-"
    assert start is not None and end is not None
    try:
        seconds = max(0.0, float(end) - float(start))
    except OverflowError:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s" if seconds < 1e9 else f"{seconds:.3g} s"


def error_text(error: dict[str, Any] | None) -> str | None:
    if not error:
        return None
    if not isinstance(error, dict):
        return _text(error)
    return f"{error.get('type')}: {error.get('message')}"


def paused_text(paused: dict[str, Any]) -> str:
    """Since when and why a workflow is paused, what it resumes as, what it holds."""
    parts = [f"since {when(paused.get('since'))}"]
    if paused.get("reason"):
        parts.append(f"({_text(paused['reason'])})")
    by_type = paused.get("type")
    if isinstance(by_type, list) and by_type:
        step = f" step {_text(by_type[1])}" if len(by_type) > 1 and by_type[1] else ""
        parts.append(f"with its type {_text(by_type[0])}{step} (hms workflow resume-type)")
    parts.append(f"; resumes as {_text(paused.get('status'))}")
    timer = paused.get("timer")
    if isinstance(timer, dict) and _number(timer.get("remaining")):
        parts.append(
            f"; its {_text(timer.get('kind'))} timer frozen with {timer['remaining']:g}s left"
        )
    if paused.get("held") is not None:
        parts.append(f"; holds run {_text(paused['held'])} until resumed")
    return " ".join(parts).replace(" ;", ";")


def steps_outline(definition: Any, names: Any = ()) -> str:
    """A definition's ordered steps as they run: ``a > [b (undo c) | d] > e``: a Parallel
    group in brackets, a compensation beside the step it undoes (it runs only to undo it).
    ``names`` (every step with a queue) when the definition's JSON is not as expected."""
    steps = definition.get("steps") if isinstance(definition, dict) else None
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        return " > ".join(str(n) for n in names) if isinstance(names, list) else ""
    parts: list[str] = []
    group: object = None
    for step in steps:
        text = str(step.get("name"))
        undo = step.get("compensate")
        if isinstance(undo, dict):
            text += f" (undo {undo.get('name')})"
        parallel = step.get("parallel")
        key = parallel.get("group") if isinstance(parallel, dict) else None
        if key is not None and key == group:
            parts[-1] = parts[-1][:-1] + f" | {text}]"
        else:
            parts.append(f"[{text}]" if key is not None else text)
        group = key
    return " > ".join(parts)


def summary_rows(workflows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "id": w["workflow_id"],
            "name": w["name"],
            "status": w["status"],
            "created": when(w["created_at"]),
            "updated": when(w["updated_at"]),
            "attributes": attributes_text(w.get("attributes")),
            "error": error_text(w.get("error")),
        }
        for w in workflows
    ]


def attributes_text(attributes: Any) -> str:
    """Business keys as ``key=value`` pairs, sorted by key."""
    if not isinstance(attributes, dict) or not attributes:
        return "-"
    return " ".join(f"{k}={v}" for k, v in sorted(attributes.items()))


def step_row(step: dict[str, Any]) -> dict[str, Any]:
    return {
        "seq": step["seq"],
        "step": step["step"]
        + (
            f" (undoes {step['undoes']['step']} #{step['undoes']['seq']})"
            if step.get("undoes")
            else ""
        ),
        "attempt": step["attempt"],
        "status": step["status"],
        "started": when(step.get("started_at"), date=False),
        "took": took(step.get("started_at"), step.get("finished_at")),
        "error": error_text(step.get("error")),
    }


STEP_COLUMNS = ["seq", "step", "attempt", "status", "started", "took", "error"]


def show(state: dict[str, Any], *, history: bool = False, now: float | None = None) -> str:
    """One workflow for people: what it is, where it stands, each step run."""
    finished = state["status"] in ("succeeded", "failed", "cancelled", "compensated")
    fields = [
        ("workflow", state["workflow_id"]),
        ("name", state["name"]),
        ("status", state["status"]),
        ("created", when(state["created_at"])),
        ("updated", when(state["updated_at"])),
        ("took", took(state["created_at"], state["updated_at"]) if finished else "-"),
    ]
    if state.get("priority") is not None:
        fields.append(("priority", _text(state["priority"])))
    if state.get("current_step"):
        fields.append(("current", state["current_step"]))
    if state.get("scheduled_at"):
        fields.append(("scheduled", when(state["scheduled_at"])))
    waiting = state.get("waiting_for")
    if waiting:
        event = waiting.get("event") if isinstance(waiting, dict) else waiting
        until = waiting.get("until") if isinstance(waiting, dict) else None
        deadline = ""
        if until is not None:
            soon = relative(until, time.time() if now is None else now)
            deadline = f" until {when(until)}" + (f" ({soon})" if soon else "")
        children = waiting.get("children") if isinstance(waiting, dict) else None
        fields.append(
            ("waiting", f"for {event}" if children else f"for signal {event!r}{deadline}")
        )
    parent = state.get("parent")
    if isinstance(parent, dict):
        fields.append(("parent", f"{parent.get('id')} (step {parent.get('step')})"))
    if state.get("children"):
        listed = [f"{c['workflow_id']} {c.get('status') or '-'}" for c in state["children"]]
        fields.append(("children", ", ".join(listed)))
    group = state.get("branches")
    if isinstance(group, dict):
        entries = group.get("branches") or []
        done = sum(
            b.get("status") in ("succeeded", "failed", "timed_out", "cancelled") for b in entries
        )
        fields.append(
            (
                "branches",
                f"{done}/{len(entries)} done, {group.get('state')} "
                f"(of {group.get('step')}, join {group.get('join')})",
            )
        )
    paused = state.get("paused")
    if isinstance(paused, dict):
        fields.append(("paused", paused_text(paused)))
    if state.get("stuck"):
        fields.append(("stuck", state["stuck"]))
    if state.get("trace_id"):
        fields.append(("trace_id", state["trace_id"]))
    if state.get("attributes"):
        fields.append(("attrs", attributes_text(state["attributes"])))
    fields.append(("input", cell(state.get("input"), 100)))
    if state.get("output") is not None:
        fields.append(("output", cell(state["output"], 100)))
    error = state.get("error")
    if error and isinstance(error, dict):
        where = (
            f" at step {error['step']} after {error.get('attempts')} attempt(s)"
            if error.get("step")
            else ""
        )
        reason = f" ({error['reason']})" if error.get("reason") else ""
        fields.append(("error", f"{error_text(error)}{where}{reason}"))
    elif error:
        fields.append(("error", error_text(error)))
    lines = [f"{name:<10}{printable(_text(value))}" for name, value in fields]
    lines += ["", table([step_row(s) for s in state["steps"]], STEP_COLUMNS)]
    if history:
        events = [
            {"at": when(e["at"], date=False), "event": e["kind"], "detail": _dated(e["detail"])}
            for e in state.get("history", [])
        ]
        lines += ["", table(events, ["at", "event", "detail"])]
    return "\n".join(lines)


def _dated(detail: Any) -> Any:
    """A history entry's detail with its moments (``until``, ``*_at``) as UTC times."""
    if not isinstance(detail, dict):
        return detail
    return {
        key: when(value) if (key == "until" or key.endswith("_at")) and _number(value) else value
        for key, value in detail.items()
    }


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
    return [printable(line) for line in lines]
