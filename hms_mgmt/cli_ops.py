"""``hms dlq`` and ``hms store``: dead letters, and the store's backup and pruning."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from hms_mgmt.cli_api import (
    CliError,
    StoreUnusable,
    Unreachable,
    quote,
)
from hms_mgmt.cli_context import Context, output_option
from hms_mgmt.cli_format import ago, printable, table


@click.group("dlq")
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
            [{**letter, "age": ago(letter.get("dead_at"))} for letter in letters],
            [
                "message_id",
                "workflow_id",
                "step",
                "attempts",
                "age",
                "reason",
                "error_type",
                "error",
            ],
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


@click.group("store")
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
