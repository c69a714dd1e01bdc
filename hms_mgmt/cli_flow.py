"""The hms command's flow-control verbs: ``hms workflow pause``, ``resume`` and ``reset``, and
``pause-type`` and ``resume-type``."""

from __future__ import annotations

import sys
from typing import Any

import click

from hms_mgmt.cli_api import EXIT_REFUSED, CliError, quote
from hms_mgmt.cli_context import Context, output_option
from hms_mgmt.cli_format import printable
from hms_mgmt.records import STATUSES

PAGE = 1000  # workflows read per page by a bulk reset


@click.command("pause")
@click.argument("workflow_id")
@click.option("--reason", help="Recorded with the pause.")
@output_option
@click.pass_obj
def workflow_pause(obj: Context, workflow_id: str, reason: str | None) -> None:
    """Pause a workflow that has not finished: a step already out runs on and its outcome is
    recorded, but nothing more is published, and its delays, backoffs and waits freeze,
    until 'hms workflow resume'."""
    result = obj.api.post(f"/api/workflows/{quote(workflow_id)}/pause", {"reason": reason})
    obj.emit(result, printable(f"{result['workflow_id']}: {result['status']}"))


@click.command("resume")
@click.argument("workflow_id")
@output_option
@click.pass_obj
def workflow_resume(obj: Context, workflow_id: str) -> None:
    """Resume a paused workflow: the step it held is published, its frozen timer re-armed
    with the time it had left."""
    result = obj.api.post(f"/api/workflows/{quote(workflow_id)}/resume")
    obj.emit(result, printable(f"{result['workflow_id']}: {result['status']}"))


@click.command("pause-type")
@click.argument("name")
@click.option("--step", help="Only this step of it.")
@click.option("--reason", help="Recorded with the pause.")
@output_option
@click.pass_obj
def workflow_pause_type(obj: Context, name: str, step: str | None, reason: str | None) -> None:
    """Pause workflow type NAME (or one --step of it): its new starts, cron ticks and the next
    steps of its workflows are held, each workflow paused, until 'hms workflow resume-type'."""
    result = obj.api.post(f"/api/definitions/{quote(name)}/pause", {"step": step, "reason": reason})
    what = name if step is None else f"{name}.{step}"
    obj.emit(result, printable(f"{what}: paused"))


@click.command("resume-type")
@click.argument("name")
@click.option("--step", help="Only this step of it (as paused).")
@output_option
@click.pass_obj
def workflow_resume_type(obj: Context, name: str, step: str | None) -> None:
    """Resume workflow type NAME (or one --step of it): the workflows it held go on, oldest
    first."""
    result = obj.api.post(f"/api/definitions/{quote(name)}/resume", {"step": step})
    what = name if step is None else f"{name}.{step}"
    obj.emit(result, printable(f"{what}: resumed, {result['released']} workflow(s) released"))


@click.command("reset")
@click.argument("workflow_id", required=False)
@click.option("--to-step", "to_step", required=True, help="The step to run again.")
@click.option(
    "--data",
    help="Its input: JSON (null included), or @file (@- for stdin). Default: the input of "
    "its last run.",
)
@click.option(
    "--signals",
    type=click.Choice(["keep", "drop"]),
    default="keep",
    show_default=True,
    help="Keep or drop the signals kept for waits to come.",
)
@click.option("--reason", help="Recorded with the reset.")
@click.option(
    "--status",
    type=click.Choice(STATUSES),
    help="Without WORKFLOW_ID: reset every workflow in this status...",
)
@click.option("--name", help="Without WORKFLOW_ID: ...of this definition.")
@output_option
@click.pass_obj
def workflow_reset(
    obj: Context,
    workflow_id: str | None,
    to_step: str,
    data: str | None,
    signals: str,
    reason: str | None,
    status: str | None,
    name: str | None,
) -> None:
    """Run a workflow again from a step (a new visit of it), whatever its status; a step
    still running is left, its late outcome ignored. With --status and/or --name instead of
    WORKFLOW_ID, every workflow that matches (exit code 1 if any was refused)."""
    from hms_mgmt.bounds import NAME_PATTERN
    from hms_mgmt.cli import _input

    if not NAME_PATTERN.fullmatch(to_step):
        raise click.BadParameter(f"{to_step!r} is not a step name", param_hint="--to-step")
    body: dict[str, Any] = {"to_step": to_step, "signals": signals, "reason": reason}
    if data is not None:
        body["data"] = _input(data, "--data")
    if workflow_id is not None:
        if status is not None or name is not None:
            raise click.UsageError("give WORKFLOW_ID, or --status/--name for many, not both")
        result = obj.api.post(f"/api/workflows/{quote(workflow_id)}/reset", body)
        obj.emit(result, printable(f"{result['workflow_id']}: {result['status']} at {to_step}"))
        return
    if status is None and name is None:
        raise click.UsageError("give WORKFLOW_ID, or --status and/or --name to reset many")
    ids = _matching(obj, status, name)
    done: list[dict[str, Any]] = []
    refused = 0
    for one in ids:
        try:
            result = obj.api.post(f"/api/workflows/{quote(one)}/reset", body)
        except CliError as exc:
            refused += 1
            done.append({"workflow_id": one, "refused": str(exc)})
            click.echo(printable(f"{one}: refused: {exc}"), err=True)
            continue
        done.append(result)
        if not obj.json:
            click.echo(printable(f"{result['workflow_id']}: {result['status']} at {to_step}"))
    if obj.json:
        obj.emit(done, "")
    else:
        click.echo(f"{len(ids) - refused} of {len(ids)} reset to {to_step}", err=True)
    if refused:
        sys.exit(EXIT_REFUSED)


def _matching(obj: Context, status: str | None, name: str | None) -> list[str]:
    """The ids of every workflow with this status and name, read page by page first (a reset
    changes the status, so the listing is not read while resetting)."""
    ids: list[str] = []
    before: str | None = None
    while True:
        query: dict[str, Any] = {"status": status, "name": name, "limit": PAGE}
        if before is not None:
            query["before"] = before
        page = obj.api.get("/api/workflows", **query)
        ids += [str(w["workflow_id"]) for w in page]
        if len(page) < PAGE:
            return ids
        last = page[-1]
        before = f"{last['created_at']!r},{last['workflow_id']}"
