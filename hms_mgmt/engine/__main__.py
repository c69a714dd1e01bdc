"""``python -m hms_mgmt.engine``: the engine daemon. SIGTERM or SIGINT stops it cleanly."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from dataclasses import replace

from bus_adapters import open_bus
from bus_adapters.base import BusError
from hms_mgmt import faults, loop
from hms_mgmt.engine.api import start_api
from hms_mgmt.engine.engine import EXIT_REFUSED, Engine
from hms_mgmt.engine.vhost import StartRefused
from hms_mgmt.errors import StoreError
from hms_mgmt.logs import configure, get_logger
from hms_mgmt.loopwatch import LoopMonitor, add_loop_flags
from hms_mgmt.settings import Settings, parse_duration
from hms_mgmt.store import open_store


def parse(argv: list[str] | None) -> tuple[Settings, bool]:
    parser = argparse.ArgumentParser(
        prog="python -m hms_mgmt.engine",
        description="Run the HMS-MGMT engine: it records workflow state and publishes steps.",
        epilog="Flags override HMS_* environment variables. " + EXIT_CODES,
    )
    parser.add_argument(
        "--broker-url", help="AMQP URL (HMS_BROKER_URL; default the local RabbitMQ)"
    )
    parser.add_argument(
        "--store-url", help="sqlite:///path.db (HMS_STORE_URL; default sqlite:///hms_mgmt.db)"
    )
    parser.add_argument("--log-format", choices=["console", "json"], help="HMS_LOG_FORMAT")
    parser.add_argument("--log-level", help="HMS_LOG_LEVEL (default info)")
    parser.add_argument(
        "--http-port",
        type=int,
        help="serve /healthz, /readyz, /metrics and the JSON API on this port (HMS_HTTP_PORT; "
        "default off)",
    )
    parser.add_argument(
        "--http-host",
        help="address to listen on (HMS_HTTP_HOST; default 127.0.0.1; beyond loopback, "
        "changes need HMS_HTTP_TOKEN)",
    )
    parser.add_argument(
        "--new-store",
        action="store_true",
        help="serve this vhost from this store although it was last served from another one "
        "(say the old store is lost for good); without it such a start is refused",
    )
    parser.add_argument(
        "--retention",
        help="keep finished workflows this long, then prune them (HMS_RETENTION: 30d, 12h, "
        "90m, or off; default 30d)",
    )
    parser.add_argument(
        "--store-grace",
        type=float,
        help="seconds the store may fail before the engine exits with code 4 (HMS_STORE_GRACE; "
        "default 30)",
    )
    add_loop_flags(parser)
    args = parser.parse_args(argv)
    retention = (
        None if args.retention is None else parse_duration(args.retention, what="--retention")
    )
    settings = Settings.from_env(
        broker_url=args.broker_url,
        store_url=args.store_url,
        log_format=args.log_format,
        log_level=args.log_level,
        http_port=args.http_port,
        http_host=args.http_host,
        loop_block_threshold=args.loop_block_threshold,
        liveness_lag=args.liveness_lag,
        store_grace=args.store_grace,
    )
    if args.retention is not None:
        settings = replace(settings, retention=retention)
    return settings, args.new_store


async def serve(settings: Settings, *, new_store: bool = False) -> int:
    engine = Engine(
        open_bus(settings.broker_url, name="hms-engine"),
        open_store(settings.store_url),
        store_grace=settings.store_grace,
        retention=settings.retention,
        new_store=new_store,
        client_users=settings.client_user_set,
        service_users=settings.service_user_set,
        stuck_after=settings.stuck_after,
        faults=faults.from_env(),
    )
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


EXIT_CODES = """exit codes: 0 stopped, 2 bad configuration or a store that cannot be opened,
3 broker unreachable, 4 the store failed for longer than the grace period,
5 refused: another engine serves the vhost, or the vhost was served from another store"""


def main(argv: list[str] | None = None) -> int:
    try:
        settings, new_store = parse(argv)
        configure(settings.log_format, settings.log_level)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
        log.error("cannot reach the broker", error=str(exc), exit_code=3)
        return 3
    except ValueError as exc:
        log.error("bad configuration", error=str(exc), exit_code=2)
        return 2


if __name__ == "__main__":
    sys.exit(main())
