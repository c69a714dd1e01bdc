"""The ``hms`` command (also ``python -m hms_mgmt``): see and steer what runs.

Exit codes: 0 done, 1 refused (unknown id, wrong state), 2 usage error,
3 broker or engine unreachable.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from bus_adapters.base import Bus, BusError, open_bus
from hms_mgmt import dlq
from hms_mgmt.client import Client
from hms_mgmt.errors import EngineUnavailableError, HmsError
from hms_mgmt.settings import Settings

EXIT_REFUSED, EXIT_UNREACHABLE = 1, 3

T = TypeVar("T")


class Context:
    def __init__(self, broker_url: str, output: str) -> None:
        self.broker_url = broker_url
        self.output = output

    def run(self, work: Callable[[Bus], Awaitable[T]]) -> T:
        """Connect, do the work, disconnect; broker trouble exits with code 3."""

        async def go() -> T:
            bus = open_bus(self.broker_url, name="hms-cli")
            try:
                await bus.connect()
                return await work(bus)
            finally:
                await bus.close()

        try:
            return asyncio.run(go())
        except BusError as exc:
            click.echo(f"error: broker unreachable: {exc}", err=True)
            sys.exit(EXIT_UNREACHABLE)
        except EngineUnavailableError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_UNREACHABLE)
        except HmsError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_REFUSED)

    def emit(self, rows: list[dict[str, Any]], columns: list[str]) -> None:
        if self.output == "json":
            click.echo(json.dumps(rows, indent=2, default=str))
            return
        if not rows:
            click.echo("(none)")
            return
        widths = {c: max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in columns}
        click.echo("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
        for row in rows:
            click.echo("  ".join(_cell(row.get(c)).ljust(widths[c]) for c in columns).rstrip())


def _cell(value: Any) -> str:
    text = "-" if value is None else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--broker-url", envvar="HMS_BROKER_URL", help="AMQP URL (HMS_BROKER_URL).")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
@click.pass_context
def main(ctx: click.Context, broker_url: str | None, output: str) -> None:
    """HMS-MGMT: durable workflows over RabbitMQ."""
    ctx.obj = Context(broker_url or Settings.from_env().broker_url, output)


@main.group("dlq")
def dlq_group() -> None:
    """Dead-letter queues (<workflow>.<step>.dlq)."""


@dlq_group.command("list")
@click.argument("queue")
@click.option("--limit", default=100, show_default=True, help="Messages to show at most.")
@click.pass_obj
def dlq_list(obj: Context, queue: str, limit: int) -> None:
    """Show the messages in QUEUE (they stay there)."""
    letters = obj.run(lambda bus: dlq.peek(bus, _dlq_name(queue), limit))
    obj.emit(
        [letter.to_json() for letter in letters],
        ["message_id", "workflow_id", "step", "attempts", "reason", "error_type", "error"],
    )


@dlq_group.command("replay")
@click.argument("queue")
@click.option("--id", "message_id", help="Replay the message with this id.")
@click.option("--all", "replay_all", is_flag=True, help="Replay every message.")
@click.pass_obj
def dlq_replay(obj: Context, queue: str, message_id: str | None, replay_all: bool) -> None:
    """Resume the workflows of QUEUE's messages from their failed step."""
    if bool(message_id) == replay_all:
        raise click.UsageError("give exactly one of --id ID or --all")

    async def work(bus: Bus) -> list[dlq.Replayed]:
        client = Client(bus, service_name="hms-cli")
        await client.connect()
        return await dlq.replay(bus, client, _dlq_name(queue), message_id=message_id)

    results = obj.run(work)
    obj.emit([r.to_json() for r in results], ["message_id", "workflow_id", "outcome", "detail"])
    if message_id and not results:
        click.echo(f"error: no message {message_id!r} in {_dlq_name(queue)}", err=True)
        sys.exit(EXIT_REFUSED)
    if any(r.outcome == "kept" for r in results):
        sys.exit(EXIT_REFUSED)


def _dlq_name(queue: str) -> str:
    return queue if queue.endswith(".dlq") else f"{queue}.dlq"


def run() -> None:
    main(prog_name="hms")


__all__ = ["main", "run"]
