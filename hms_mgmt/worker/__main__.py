"""``python -m hms_mgmt.worker module:attribute``: serve that management object's handlers."""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from bus_adapters.base import BusError
from hms_mgmt import faults
from hms_mgmt.logs import get_logger
from hms_mgmt.worker.threads import handler_threads_running

log = get_logger("worker")


def main(argv: list[str] | None = None) -> None:
    """``python -m hms_mgmt.worker module:attribute``: serve that management object's handlers."""
    import argparse

    from hms_mgmt.logs import configure
    from hms_mgmt.loopwatch import LoopMonitor, add_loop_flags
    from hms_mgmt.settings import Settings

    parser = argparse.ArgumentParser(
        prog="python -m hms_mgmt.worker",
        description="Serve the step handlers registered on a management object.",
    )
    parser.add_argument("target", help="module:attribute of an hms_mgmt.init(...) object")
    parser.add_argument("--broker-url", help="overrides HMS_BROKER_URL")
    parser.add_argument("--concurrency", type=int, default=None, help="handlers run at once")
    parser.add_argument("--log-format", choices=["console", "json"], default=None)
    parser.add_argument("--log-level", default=None)
    parser.add_argument(
        "--http-port", type=int, help="serve /healthz, /readyz and /metrics (HMS_HTTP_PORT)"
    )
    parser.add_argument("--http-host", help="address to listen on (HMS_HTTP_HOST; 127.0.0.1)")
    add_loop_flags(parser)
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(
            broker_url=args.broker_url,
            log_format=args.log_format,
            log_level=args.log_level,
            http_port=args.http_port,
            http_host=args.http_host,
            loop_block_threshold=args.loop_block_threshold,
            liveness_lag=args.liveness_lag,
        )
        configure(settings.log_format, settings.log_level)
    except ValueError as exc:
        parser.error(str(exc))
    module_name, _, attribute = args.target.partition(":")
    if not attribute:
        parser.error(f"expected module:attribute, got {args.target!r}")
    sys.path.insert(0, os.getcwd())
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        parser.error(f"cannot load {args.target!r}: {exc}")
    if args.broker_url:
        target.broker_url = args.broker_url
    if args.concurrency:
        target.concurrency = args.concurrency
    target.loop_monitor = LoopMonitor.from_settings(settings, "step-service")
    target.faults = faults.from_env()
    run = target.run
    if settings.http_port is not None:
        from hms_mgmt.worker.probes import serve_with_probes

        run = functools.partial(serve_with_probes, target, settings)
    try:
        _run_until_signalled(run)
    except BusError as exc:
        log.error("cannot reach the broker", error=str(exc))
        sys.exit(3)
    except ValueError as exc:  # a port in use, a service without handlers
        log.error("cannot serve", error=str(exc))
        sys.exit(2)
    stuck = handler_threads_running(grace=1.0)
    if stuck:
        # Python waits for every thread at exit, and these may never return.
        log.warning(
            "exiting with handler threads still running: threads cannot be stopped",
            threads=[thread.name for thread in stuck],
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _run_until_signalled(run: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a serve coroutine; ``Management.run`` ends cleanly on SIGTERM or SIGINT."""
    from hms_mgmt import loop

    with contextlib.suppress(KeyboardInterrupt):
        loop.run(run())


if __name__ == "__main__":
    main()
