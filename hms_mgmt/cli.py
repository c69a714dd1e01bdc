"""The ``hms`` command (also ``python -m hms_mgmt``): run, see and steer what runs.

``hms engine`` and ``hms worker`` run the daemons; every other command talks to
the engine's HTTP API (``HMS_ENGINE_URL``, default ``http://127.0.0.1:$HMS_HTTP_PORT``).
Tables for people, ``-o json`` for scripts. Exit codes: 0 done, 1 refused
(unknown id, wrong state, a workflow that ended failed under ``--follow``),
2 usage error, 3 engine or broker unreachable.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from hms_mgmt.cli_api import (
    EXIT_REFUSED,
    CliError,
    EngineHttp,
    StoreUnusable,
    Unreachable,
    quote,
)
from hms_mgmt.cli_format import changes, printable, show, summary_rows, table
from hms_mgmt.records import STATUSES, TERMINAL

FOLLOW_INTERVAL = 0.5


class Context:
    def __init__(self, api: EngineHttp, output: str) -> None:
        self.api = api
        self.output = output

    @property
    def json(self) -> bool:
        return self.output == "json"

    def emit(self, value: Any, text: str) -> None:
        click.echo(json.dumps(value, indent=2, default=str) if self.json else text)


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


def output_option(command: Any) -> Any:
    """``-o`` after the command too (``hms workflow list -o json``), besides before it."""

    def chosen(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value is not None:
            ctx.find_object(Context).output = value  # type: ignore[union-attr]

    return click.option(
        "-o",
        "--output",
        type=click.Choice(["table", "json"]),
        expose_value=False,
        callback=chosen,
        help="Tables for people, json for scripts.",
    )(command)


# -- workflows --------------------------------------------------------------------


@main.group("workflow")
def workflow_group() -> None:
    """List, show, start, signal, cancel and retry workflows."""


@workflow_group.command("list")
@click.option("--status", type=click.Choice(STATUSES), help="Only workflows in this status.")
@click.option("--name", help="Only workflows of this definition.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option(
    "--attr",
    "attrs",
    multiple=True,
    metavar="KEY=VALUE",
    help="Only workflows with this business key (repeatable: all must match).",
)
@output_option
@click.pass_obj
def workflow_list(
    obj: Context, status: str | None, name: str | None, limit: int, attrs: tuple[str, ...]
) -> None:
    """The latest workflows, newest first."""
    query = {f"attr.{key}": value for key, value in _attributes(attrs).items()}
    workflows = obj.api.get("/api/workflows", status=status, name=name, limit=limit, **query)
    obj.emit(
        workflows,
        table(
            summary_rows(workflows),
            ["id", "name", "status", "created", "updated", "attributes", "error"],
        ),
    )


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
@output_option
@click.pass_obj
def workflow_cancel(obj: Context, workflow_id: str, reason: str | None) -> None:
    """Cancel a workflow that has not finished."""
    result = obj.api.post(f"/api/workflows/{quote(workflow_id)}/cancel", {"reason": reason})
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
            "steps": " > ".join(d["steps"]),
            "on_error": d["on_error"],
        }
        for d in found
    ]
    obj.emit(found, table(rows, ["name", "version", "steps", "on_error"]))


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


@main.group("dlq")
def dlq_group() -> None:
    """Dead-letter queues (<workflow>.<step>.dlq): list, replay, purge."""


def _dlq_name(queue: str) -> str:
    return queue if queue.endswith(".dlq") else f"{queue}.dlq"


@contextlib.contextmanager
def _known_dlq(name: str) -> Iterator[None]:
    """The engine's 'not a dead-letter queue' (worded for HTTP) worded for hms users."""
    try:
        yield
    except CliError as exc:
        if exc.status == 404 and exc.kind == "NotFound":
            raise CliError(
                printable(
                    f"{name!r} is not a dead-letter queue of this engine's workflows "
                    "('hms dlq list' lists them)"
                ),
                status=exc.status,
                kind=exc.kind,
            ) from None
        raise


@dlq_group.command("list")
@click.argument("queue", required=False)
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@output_option
@click.pass_obj
def dlq_list(obj: Context, queue: str | None, limit: int) -> None:
    """Every .dlq queue with its message count; or the messages in QUEUE (they stay there)."""
    if queue is None:
        queues = obj.api.get("/api/dlq")
        obj.emit(queues, table(queues, ["queue", "messages"]))
        return
    name = _dlq_name(queue)
    with _known_dlq(name):
        letters = obj.api.get(f"/api/dlq/{quote(name)}", limit=limit)
    obj.emit(
        letters,
        table(
            letters,
            ["message_id", "workflow_id", "step", "attempts", "reason", "error_type", "error"],
        ),
    )


@dlq_group.command("replay")
@click.argument("queue")
@click.option("--id", "message_id", help="Replay the message with this id.")
@click.option("--all", "replay_all", is_flag=True, help="Replay every message.")
@output_option
@click.pass_obj
def dlq_replay(obj: Context, queue: str, message_id: str | None, replay_all: bool) -> None:
    """Resume the workflows of QUEUE's messages from their failed step."""
    if bool(message_id) == replay_all:
        raise click.UsageError("give exactly one of --id ID or --all")
    name = _dlq_name(queue)
    body = {"id": message_id} if message_id else {"all": True}
    results: list[dict[str, Any]] = []
    lines = obj.api.stream(f"/api/dlq/{quote(name)}/replay", body)
    with _known_dlq(name):
        total = int(next(lines, {}).get("total", 0))
    with click.progressbar(
        length=max(total, 1), label=f"replaying {name}", file=sys.stderr, hidden=total < 2
    ) as bar:
        for line in lines:
            if "error" in line:
                raise Unreachable(printable(f"replay stopped: {line['error']['message']}"))
            if "done" in line:
                break
            results.append(line)
            bar.update(1)
    if message_id and not results:  # one error, and no empty table before it
        raise CliError(
            printable(
                f"no message with id {message_id!r} in {name} ('hms dlq list {name}' lists them)"
            )
        )
    obj.emit(results, table(results, ["message_id", "workflow_id", "outcome", "detail"]))
    if any(r["outcome"] == "kept" for r in results):
        raise CliError("some messages were kept in the queue (see 'detail')")


@dlq_group.command("purge")
@click.argument("queue")
@click.option("--yes", "-y", is_flag=True, help="Do not ask first.")
@output_option
@click.pass_obj
def dlq_purge(obj: Context, queue: str, yes: bool) -> None:
    """Delete every message in QUEUE, for good."""
    name = _dlq_name(queue)
    if not yes:
        click.confirm(f"Delete every message in {name} for good?", abort=True, err=True)
    with _known_dlq(name):
        result = obj.api.post(f"/api/dlq/{quote(name)}/purge")
    obj.emit(result, printable(f"purged {result['purged']} message(s) from {result['queue']}"))


# -- the store --------------------------------------------------------------------------


@main.group("store")
def store_group() -> None:
    """The engine's store: take an online backup, prune finished workflows."""


@store_group.command("backup")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option(
    "--store-url",
    envvar="HMS_STORE_URL",
    default="sqlite:///hms_mgmt.db",
    show_default=True,
    help="The store to back up (HMS_STORE_URL).",
)
@click.option("--force", is_flag=True, help="Overwrite PATH if it exists.")
@output_option
@click.pass_obj
def store_backup(obj: Context, path: str, store_url: str, force: bool) -> None:
    """Copy the store, consistent, to PATH while the engine runs (SQLite's backup API).

    To restore: stop the engine, copy the backup over the store's file, delete the
    store's -wal and -shm files, start the engine (see the README).
    """
    from hms_mgmt.errors import StoreError
    from hms_mgmt.store.sqlite_backup import backup
    from hms_mgmt.store.sqlite_schema import path_of

    if store_url.startswith(("postgresql://", "postgres://")):
        raise click.UsageError(
            "hms store backup copies a SQLite store: back up a PostgreSQL store with pg_dump"
        )
    try:
        source = path_of(store_url)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if Path(path).exists() and not force:
        raise CliError(f"{path} exists: choose another path, or pass --force to overwrite it")
    try:
        result = backup(source, path)
    except StoreError as exc:
        raise StoreUnusable(str(exc)) from None
    obj.emit(
        result,
        f"backed up {source} ({result['workflows']} workflows, {result['bytes']} bytes) to "
        f"{path} in {result['seconds']:.2f} s",
    )


@store_group.command("prune")
@click.option(
    "--older-than",
    required=True,
    help="Delete workflows that finished longer ago than this: 30d, 12h, 90m, 45s.",
)
@output_option
@click.pass_obj
def store_prune(obj: Context, older_than: str) -> None:
    """Delete finished workflows (with their runs and history) older than --older-than, now.

    The engine does it in small steps between batches, as retention (HMS_RETENTION) does.
    """
    from hms_mgmt.settings import parse_duration

    try:
        seconds = parse_duration(older_than, what="--older-than")
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if seconds is None:
        raise click.BadParameter("--older-than must be a duration such as 7d")
    result = obj.api.post("/api/store/prune", {"older_than": seconds})
    obj.emit(result, f"pruned {result['pruned']} finished workflow(s)")


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
