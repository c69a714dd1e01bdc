"""The ``hms`` command (also ``python -m hms_mgmt``): run, see and steer what runs.

``hms engine`` and ``hms worker`` run the daemons; every other command talks to
the engine's HTTP API (``HMS_ENGINE_URL``, default ``http://127.0.0.1:$HMS_HTTP_PORT``).
Tables for people, ``-o json`` for scripts. Exit codes: 0 done, 1 refused
(unknown id, wrong state, a workflow that ended failed under ``--follow``),
2 usage error, 3 engine or broker unreachable.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from hms_mgmt.cli_api import (
    EXIT_REFUSED,
    EngineHttp,
    quote,
)
from hms_mgmt.cli_context import Context, output_option
from hms_mgmt.cli_format import changes, printable, show, steps_outline, summary_rows, table
from hms_mgmt.cli_ops import dlq_group, store_group
from hms_mgmt.records import LIST_FILTERS, TERMINAL

FOLLOW_INTERVAL = 0.5


class _Commands(click.Group):
    """``hms``: the daemons' own commands (``engine``, ``worker``) are imported only when used,
    so that ``hms workflow list`` does not load the engine."""

    DAEMONS = {"engine": "hms_mgmt.engine.__main__", "worker": "hms_mgmt.worker.__main__"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.DAEMONS])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.DAEMONS:
            command: click.Command = getattr(importlib.import_module(self.DAEMONS[name]), name)
            return command
        return super().get_command(ctx, name)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--engine-url",
    envvar="HMS_ENGINE_URL",
    help="The engine's HTTP API (HMS_ENGINE_URL; default http://127.0.0.1:$HMS_HTTP_PORT).",
)
@click.option(
    "--token",
    envvar="HMS_HTTP_TOKEN",
    help="Bearer token for changes (HMS_HTTP_TOKEN).",
    show_envvar=False,
)
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True)
@click.pass_context
def main(
    ctx: click.Context, engine_url: str | None, token: str | None, output: str, timeout: float
) -> None:
    """HMS-MGMT: durable workflows over RabbitMQ."""
    from hms_mgmt.settings import Settings

    try:
        url = Settings.from_env(engine_url=engine_url).resolved_engine_url
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    ctx.obj = Context(EngineHttp(url, token or None, timeout), output)


# -- the daemons ------------------------------------------------------------------


# -- workflows --------------------------------------------------------------------


@main.group("workflow")
def workflow_group() -> None:
    """List, show, start, signal, cancel, retry, pause, resume and reset workflows."""


@workflow_group.command("list")
@click.option(
    "--status",
    type=click.Choice(LIST_FILTERS),
    help="Only workflows in this status; queued: those whose current run waits for a slot.",
)
@click.option("--name", help="Only workflows of this definition.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option(
    "--attr",
    "attrs",
    multiple=True,
    metavar="KEY=VALUE",
    help="Only workflows with this business key (repeatable: all must match).",
)
@click.option("--since", help="Only workflows created at or after: 15m, 2h, 7d ago or a time.")
@click.option("--until", help="Only workflows created before: 15m, 2h, 7d ago or a time.")
@output_option
@click.pass_obj
def workflow_list(
    obj: Context,
    status: str | None,
    name: str | None,
    limit: int,
    attrs: tuple[str, ...],
    since: str | None,
    until: str | None,
) -> None:
    """The latest workflows, newest first.

    Times are seconds since the epoch, ISO 8601 (UTC without an offset) or a time ago."""
    query: dict[str, Any] = {f"attr.{key}": value for key, value in _attributes(attrs).items()}
    for option, text in (("since", since), ("until", until)):
        if text is not None:
            query[option] = _time(text, f"--{option}")
    workflows = obj.api.get("/api/workflows", status=status, name=name, limit=limit, **query)
    obj.emit(
        workflows,
        table(
            summary_rows(workflows),
            ["id", "name", "status", "created", "updated", "attributes", "error"],
        ),
    )


def _time(text: str, option: str) -> float:
    from hms_mgmt.bounds import parse_time

    try:
        return parse_time(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


def _attributes(attrs: tuple[str, ...]) -> dict[str, str]:
    """``--attr KEY=VALUE`` options as business keys, checked here."""
    from hms_mgmt.bounds import check_attributes

    found: dict[str, str] = {}
    for item in attrs:
        key, equals, value = item.partition("=")
        if not equals:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--attr")
        if key in found:
            raise click.BadParameter(f"key {key!r} is given more than once", param_hint="--attr")
        found[key] = value
    try:
        return check_attributes(found, "--attr")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--attr") from None


@workflow_group.command("show")
@click.argument("workflow_id")
@click.option("--follow", "-f", is_flag=True, help="Show changes live until the workflow ends.")
@click.option("--history", is_flag=True, help="Also list every recorded event.")
@output_option
@click.pass_obj
def workflow_show(obj: Context, workflow_id: str, follow: bool, history: bool) -> None:
    """One workflow: its steps, attempts, errors and timings."""
    path = f"/api/workflows/{quote(workflow_id)}"
    state = obj.api.get(path)
    if obj.json and follow:
        click.echo(json.dumps(state, default=str))  # one line per change: JSON lines
    else:
        obj.emit(state, show(state, history=history))
    if not follow:
        return
    while state["status"] not in TERMINAL:
        time.sleep(FOLLOW_INTERVAL)
        latest = obj.api.get(path)
        if latest["updated_at"] == state["updated_at"] and latest["status"] == state["status"]:
            continue
        if obj.json:
            click.echo(json.dumps(latest, default=str))
        else:
            for line in changes(state, latest):
                click.echo(line)
        state = latest
    if state["status"] != "succeeded":
        sys.exit(EXIT_REFUSED)


def _input(value: str, option: str = "--input") -> Any:
    text = value
    if value.startswith("@"):
        source = value[1:]
        try:
            text = sys.stdin.read() if source == "-" else Path(source).read_text()
        except OSError as exc:
            raise click.BadParameter(
                f"cannot read {source!r}: {exc.strerror}", param_hint=option
            ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint=option) from None


@workflow_group.command("start")
@click.argument("name")
@click.option(
    "--input",
    "payload",
    default="{}",
    show_default=True,
    help="The payload: JSON, or @file to read it from a file (@- for stdin).",
)
@click.option("--idempotency-key", help="Start at most one workflow for this key.")
@click.option(
    "--priority",
    type=click.IntRange(1, 5),
    help="1 (first) to 5 (last), 3 by default: the order in which its runs waiting for a "
    "concurrency or rate limit are admitted, and its start released by a type resume.",
)
@click.option(
    "--attr",
    "attrs",
    multiple=True,
    metavar="KEY=VALUE",
    help="A business key to record with it, searchable with 'list --attr' (repeatable).",
)
@click.option(
    "--wait",
    is_flag=True,
    help="Wait until it ends (start and wait in one request) and show it; exit code 1 if it "
    "did not succeed or is still running at --wait-timeout.",
)
@click.option(
    "--wait-timeout",
    type=click.FloatRange(min=0.1, max=3600),
    default=300.0,
    show_default=True,
    help="Seconds --wait waits; the workflow goes on after.",
)
@output_option
@click.pass_obj
def workflow_start(
    obj: Context,
    name: str,
    payload: str,
    idempotency_key: str | None,
    priority: int | None,
    attrs: tuple[str, ...],
    wait: bool,
    wait_timeout: float,
) -> None:
    """Start workflow NAME; prints its id (with --wait, the workflow once it has ended)."""
    from hms_mgmt.bounds import NAME_PATTERN

    if not NAME_PATTERN.fullmatch(name):
        raise click.BadParameter(
            f"{name!r} is not a workflow name (letters, digits, '_' and '-')", param_hint="NAME"
        )
    value = _input(payload)
    body: dict[str, Any] = {"workflow": name, "input": value}
    if idempotency_key is not None:
        body["idempotency_key"] = idempotency_key
    if priority is not None:
        body["priority"] = priority
    if attrs:
        body["attributes"] = _attributes(attrs)
    if not wait:
        started = obj.api.post("/api/workflows", body)
        obj.emit(started, printable(str(started["workflow_id"])))
        return
    body["wait"] = wait_timeout
    state = obj.api.post("/api/workflows", body, timeout=wait_timeout + obj.api.timeout)
    if "status" not in state:  # not even recorded by the deadline
        state = obj.api.get(f"/api/workflows/{quote(str(state['workflow_id']))}")
    obj.emit(state, show(state, history=False))
    if state["status"] not in TERMINAL:
        click.echo(
            f"still {state['status']} after {wait_timeout:g}s: 'hms workflow show "
            f"{printable(str(state['workflow_id']))} --follow' follows it",
            err=True,
        )
    if state["status"] != "succeeded":
        sys.exit(EXIT_REFUSED)


@workflow_group.command("cancel")
@click.argument("workflow_id")
@click.option("--reason", help="Recorded with the cancellation.")
@click.option(
    "--compensate",
    is_flag=True,
    help="Run the compensations of the steps that succeeded first (it ends compensated).",
)
@output_option
@click.pass_obj
def workflow_cancel(obj: Context, workflow_id: str, reason: str | None, compensate: bool) -> None:
    """Cancel a workflow that has not finished."""
    body: dict[str, object] = {"reason": reason}
    if compensate:
        body["compensate"] = True
    result = obj.api.post(f"/api/workflows/{quote(workflow_id)}/cancel", body)
    obj.emit(result, printable(f"{result['workflow_id']}: {result['status']}"))


@workflow_group.command("retry")
@click.argument("workflow_id")
@output_option
@click.pass_obj
def workflow_retry(obj: Context, workflow_id: str) -> None:
    """Resume a failed workflow from its failed step, with fresh attempts; the failed step's
    dead letter leaves its .dlq."""
    result = obj.api.post(f"/api/workflows/{quote(workflow_id)}/retry")
    settled = result.get("dead_letters_settled") or 0
    note = f" ({settled} dead letter(s) settled)" if settled else ""
    obj.emit(result, printable(f"{result['workflow_id']}: {result['status']}{note}"))


@workflow_group.command("signal")
@click.argument("workflow_id")
@click.argument("name")
@click.option(
    "--data",
    default="null",
    show_default=True,
    help="The signal's data (the next step's ctx.signal): JSON, or @file (@- for stdin).",
)
@output_option
@click.pass_obj
def workflow_signal(obj: Context, workflow_id: str, name: str, data: str) -> None:
    """Send signal NAME to a workflow: it resumes if it waits for NAME; else the signal is
    kept until it does."""
    from hms_mgmt.bounds import NAME_PATTERN

    if not NAME_PATTERN.fullmatch(name):
        raise click.BadParameter(
            f"{name!r} is not a signal name (letters, digits, '_' and '-')", param_hint="NAME"
        )
    value = _input(data, "--data")
    result = obj.api.post(
        f"/api/workflows/{quote(workflow_id)}/signal", {"name": name, "data": value}
    )
    if result.get("resumed", True):
        text = f"{result['workflow_id']}: {result['status']} (resumed by {name!r})"
    else:
        text = (
            f"{result['workflow_id']}: {result['status']}; signal {name!r} kept for a later wait "
            "(the workflow is not waiting for it now)"
        )
    obj.emit(result, printable(text))


def _flow_control() -> None:
    from hms_mgmt.cli_flow import (
        workflow_pause,
        workflow_pause_type,
        workflow_reset,
        workflow_resume,
        workflow_resume_type,
    )

    for command in (
        workflow_pause,
        workflow_resume,
        workflow_reset,
        workflow_pause_type,
        workflow_resume_type,
    ):
        workflow_group.add_command(command)


_flow_control()


@main.command("definitions")
@output_option
@click.pass_obj
def definitions(obj: Context) -> None:
    """The workflow definitions the engine knows (their latest versions)."""
    found = obj.api.get("/api/definitions")
    rows = [
        {
            "name": d["name"],
            "version": d["version"],
            "steps": steps_outline(d.get("definition"), d.get("steps")),
            "on_error": d["on_error"],
            "paused": ", ".join(
                (p["step"] or "all") + (f" ({p['reason']})" if p.get("reason") else "")
                for p in d.get("paused") or []
            ),
        }
        for d in found
    ]
    obj.emit(found, table(rows, ["name", "version", "steps", "on_error", "paused"]))


@main.command("engines")
@output_option
@click.pass_obj
def engines(obj: Context) -> None:
    """The engines of the vhost: the active one (from the vhost's record; host, pid, since,
    store) and the engine asked, if it stands by."""
    found = obj.api.get("/api/engines")
    rows = [
        {
            "role": e["role"],
            "host": e["host"],
            "pid": e["pid"],
            "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(e["since"])),
            "store": e["store"],
            "asked": "yes" if e.get("this") else "",
        }
        for e in found
    ]
    obj.emit(found, table(rows, ["role", "host", "pid", "since", "store", "asked"]))


# -- dead letters -------------------------------------------------------------------


main.add_command(dlq_group)
main.add_command(store_group)


def prog_name(argv0: str) -> str:
    """How ``hms`` was invoked, for its usage lines: ``hms`` (or another name for the script),
    or ``python -m hms_mgmt``."""
    name = os.path.basename(argv0)
    if name in ("__main__.py", "-m", "") or name.startswith("python"):
        return "python -m hms_mgmt"
    return name


def run() -> None:
    main(prog_name=prog_name(sys.argv[0] if sys.argv else ""))


__all__ = ["main", "run"]
