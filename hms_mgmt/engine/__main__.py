"""``python -m hms_mgmt.engine`` (or ``hms engine``): the engine daemon.

SIGTERM or SIGINT stops it cleanly. Exit codes: 0 stopped, 2 bad configuration or a store
that cannot be opened, 3 broker unreachable, 4 the store failed for longer than the grace
period, 5 refused (another engine serves the vhost, or it was served from another store).
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import replace
from typing import Any

import click

from bus_adapters import open_bus
from bus_adapters.base import BusError, QueueMismatchError
from bus_adapters.nodes import with_query
from hms_mgmt import faults, loop
from hms_mgmt.daemons import ENGINE_HTTP_PORT, common_options, settings_from
from hms_mgmt.engine.api import start_api
from hms_mgmt.engine.engine import EXIT_REFUSED, Engine
from hms_mgmt.engine.vhost import StartRefused
from hms_mgmt.errors import StoreError
from hms_mgmt.logs import configure, get_logger
from hms_mgmt.loopwatch import LoopMonitor
from hms_mgmt.settings import Settings, parse_duration
from hms_mgmt.store import open_store, shared

EXIT_CODES = (
    "Exit codes: 0 stopped, 2 bad configuration or a store that cannot be opened, 3 broker "
    "unreachable, 4 the store failed for longer than the grace period, 5 refused: another "
    "engine serves the vhost, or the vhost was served from another store."
)


async def serve(settings: Settings, *, new_store: bool = False) -> int:
    """Serve until stopped. On a shared store (PostgreSQL), an engine another one took over
    from (it froze, or lost its broker connection) is replaced by a fresh one, which stands
    by: the process lives on as a standby, with nothing of the deposed engine's memory."""
    takeovers = 0
    while True:
        engine = _engine(settings, new_store=new_store)
        engine.takeovers = takeovers
        code = await _serve_once(engine, settings)
        if not engine.deposed:
            return code
        takeovers = engine.takeovers
        get_logger("engine").warning("another engine serves now: this process stands by again")


def _engine(settings: Settings, *, new_store: bool) -> Engine:
    broker_url = settings.broker_url
    standby = shared(settings.store_url)
    if standby and broker_url.startswith("amqp"):
        # Short heartbeats: a frozen engine's lock (and its unacked deliveries) are freed
        # after about two, so a standby takes over within about 2 * HMS_ENGINE_HEARTBEAT + 1 s.
        # Each node's URL of a cluster gets it, unless that URL sets its own.
        beat = max(1, round(settings.engine_heartbeat))
        broker_url = with_query(broker_url, f"heartbeat={beat}")
    return Engine(
        open_bus(broker_url, name="hms-engine"),
        open_store(settings.store_url),
        store_grace=settings.store_grace,
        retention=settings.retention,
        new_store=new_store,
        client_users=settings.client_user_set,
        service_users=settings.service_user_set,
        stuck_after=settings.stuck_after,
        faults=faults.from_env(),
        standby=standby,
        step_queue_type=settings.step_queue_type,
    )


async def _serve_once(engine: Engine, settings: Settings) -> int:
    monitor = LoopMonitor.from_settings(settings, "engine")
    http = await start_api(engine, settings, monitor)  # up first: /healthz answers in start-up
    monitor.start()
    try:
        task = asyncio.ensure_future(engine.run())
        running = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            running.add_signal_handler(signum, engine.stop)
        await task
        return engine.exit_code
    finally:
        monitor.stop()
        if http is not None:
            await http.cleanup()
        # Closed already unless start-up failed (say, no broker): its thread would keep us alive.
        await engine.store.close()


@click.command(
    "engine",
    help="Run the HMS-MGMT engine: it records workflow state and publishes steps. "
    "Flags override HMS_* environment variables.",
    epilog=EXIT_CODES,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option(
    "--store-url",
    help="sqlite:///path.db or postgresql://user:password@host:5432/db (HMS_STORE_URL; default "
    "sqlite:///hms_mgmt.db).",
)
@common_options
@ENGINE_HTTP_PORT
@click.option(
    "--new-store",
    is_flag=True,
    help="Serve this vhost from this store although it was last served from another one (the "
    "old store is lost for good); without it such a start is refused.",
)
@click.option(
    "--retention",
    help="Keep finished workflows this long, then prune them (HMS_RETENTION: 30d, 12h, 90m, or "
    "off; default 30d).",
)
@click.option(
    "--store-grace",
    type=float,
    help="Seconds the store may fail before the engine exits with code 4 (HMS_STORE_GRACE; "
    "default 30).",
)
@click.pass_context
def engine(ctx: click.Context, /, new_store: bool, retention: str | None, **flags: Any) -> None:
    settings = settings_from(**flags)
    if retention is not None:
        try:
            settings = replace(settings, retention=parse_duration(retention, what="--retention"))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--retention") from None
    try:
        configure(settings.log_format, settings.log_level, stdlib=True)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    ctx.exit(run(settings, new_store=new_store))


def run(settings: Settings, *, new_store: bool = False) -> int:
    """Serve until stopped; the exit code."""
    log = get_logger("engine")
    try:
        return loop.run(serve(settings, new_store=new_store))
    except StoreError as exc:
        log.error("cannot start: the store cannot be used", cause=str(exc), exit_code=2)
        return 2
    except StartRefused as exc:
        log.error("refusing to start", cause=str(exc), exit_code=EXIT_REFUSED)
        return EXIT_REFUSED
    except BusError as exc:
        log.error(_broker_trouble(exc), error=str(exc), exit_code=3)
        return 3
    except ValueError as exc:
        log.error("bad configuration", error=str(exc), exit_code=2)
        return 2


def _broker_trouble(exc: BusError) -> str:
    if isinstance(exc, QueueMismatchError):
        return "a queue of the engine exists with other arguments"
    if getattr(exc, "refused", False):
        return "the broker refused the connection"
    return "cannot reach the broker"


def main(argv: list[str] | None = None) -> None:
    engine.main(args=argv, prog_name="python -m hms_mgmt.engine")


if __name__ == "__main__":
    main()
