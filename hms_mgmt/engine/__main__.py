"""``python -m hms_mgmt.engine``: the engine daemon. SIGTERM or SIGINT stops it cleanly."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from bus_adapters.base import BusError, open_bus
from hms_mgmt import loop
from hms_mgmt.engine.api import start_api
from hms_mgmt.engine.engine import Engine
from hms_mgmt.logs import configure, get_logger
from hms_mgmt.loopwatch import LoopMonitor, add_loop_flags
from hms_mgmt.settings import Settings
from hms_mgmt.store.base import open_store


def parse(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m hms_mgmt.engine",
        description="Run the HMS-MGMT engine: it records workflow state and publishes steps.",
        epilog="Flags override HMS_* environment variables.",
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
    add_loop_flags(parser)
    args = parser.parse_args(argv)
    return Settings.from_env(
        broker_url=args.broker_url,
        store_url=args.store_url,
        log_format=args.log_format,
        log_level=args.log_level,
        http_port=args.http_port,
        http_host=args.http_host,
        loop_block_threshold=args.loop_block_threshold,
        liveness_lag=args.liveness_lag,
    )


async def serve(settings: Settings) -> None:
    engine = Engine(
        open_bus(settings.broker_url, name="hms-engine"), open_store(settings.store_url)
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
    finally:
        monitor.stop()
        if http is not None:
            await http.cleanup()
        # Closed already unless start-up failed (say, no broker): its thread would keep us alive.
        await engine.store.close()


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse(argv)
        configure(settings.log_format, settings.log_level)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log = get_logger("engine")
    try:
        loop.run(serve(settings))
    except BusError as exc:
        log.error("cannot reach the broker", error=str(exc))
        return 3
    except ValueError as exc:
        log.error("bad configuration", error=str(exc))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
