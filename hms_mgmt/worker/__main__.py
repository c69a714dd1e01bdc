"""``python -m hms_mgmt.worker module:attribute`` (or ``hms worker``): a step service.

It serves the handlers registered on that management object; SIGTERM or SIGINT stops it
taking work and lets running handlers finish. Exit codes: 0 stopped, 2 bad configuration
(or nothing to serve), 3 broker unreachable.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import click

from bus_adapters.base import BusError
from hms_mgmt import faults, loop
from hms_mgmt.daemons import WORKER_HTTP_PORT, common_options, settings_from
from hms_mgmt.logs import configure, get_logger
from hms_mgmt.loopwatch import LoopMonitor
from hms_mgmt.worker.threads import handler_threads_running

log = get_logger("worker")


@click.command(
    "worker",
    help="Serve the step handlers registered on TARGET, a module:attribute naming an "
    "hms_mgmt.init(...) object, or a module holding just one (imported relative to the current "
    "directory, as python -m does). "
    "Flags override HMS_* environment variables.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.argument("target")
@click.option("--concurrency", type=click.IntRange(min=1), help="Handlers run at once.")
@common_options
@WORKER_HTTP_PORT
def worker(target: str, concurrency: int | None, **flags: Any) -> None:
    settings = settings_from(**flags)
    try:
        configure(settings.log_format, settings.log_level, stdlib=True)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    service = load_target(target)
    if flags.get("broker_url"):
        service.broker_url = flags["broker_url"]
    if concurrency:
        service.concurrency = concurrency
    service.loop_monitor = LoopMonitor.from_settings(settings, "step-service")
    service.faults = faults.from_env()
    run = service.run
    if settings.worker_http_port is not None:
        from hms_mgmt.worker.probes import serve_with_probes

        run = functools.partial(serve_with_probes, service, settings)
    try:
        _run_until_signalled(run)
    except BusError as exc:
        refused = getattr(exc, "refused", False)
        log.error(
            "the broker refused the connection" if refused else "cannot reach the broker",
            error=str(exc),
            exit_code=3,
        )
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


def load_target(target: str) -> Any:
    """The management object ``module:attribute`` names; with ``module`` alone, the one
    ``hms_mgmt.init(...)`` object of that module. The module is imported from the current
    directory, as ``python -m`` does; a module that is not found is named, with where it was
    looked for."""
    module_name, _, attribute = target.partition(":")
    if not module_name or (":" in target and not attribute):
        raise click.BadParameter(
            f"expected module:attribute (or module), got {target!r}", param_hint="TARGET"
        )
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)  # as python -m does
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if "." not in missing and module_name.startswith(missing):
            where = (
                f"no module named {missing!r}: modules are imported relative to the current "
                f"directory, {here} (and the installed packages); run this from the folder "
                f"that holds {missing!r}"
            )
        elif module_name == missing or module_name.startswith(f"{missing}."):
            package, _, name = missing.rpartition(".")
            where = f"no module named {missing!r}: package {package!r} has no {name!r}"
        else:  # the target's own imports failed
            where = f"it imports {missing!r}, which is not installed or not found: {exc}"
        raise click.BadParameter(f"cannot load {target!r}: {where}", param_hint="TARGET") from None
    except ImportError as exc:
        raise click.BadParameter(f"cannot load {target!r}: {exc}", param_hint="TARGET") from None
    if attribute:
        try:
            return getattr(module, attribute)
        except AttributeError:
            raise click.BadParameter(
                f"cannot load {target!r}: module {module_name!r} has no attribute {attribute!r}",
                param_hint="TARGET",
            ) from None
    found = [name for name, value in vars(module).items() if _serves(value)]
    if len(found) != 1:
        which = f"several hms_mgmt.init(...) objects ({', '.join(sorted(found))})"
        raise click.BadParameter(
            f"module {module_name!r} has "
            + (which if found else "no hms_mgmt.init(...) object")
            + f"; name the one to serve as {module_name}:NAME",
            param_hint="TARGET",
        )
    return getattr(module, found[0])


def _serves(value: Any) -> bool:
    """Whether ``value`` is a management object (this layer does not import its class)."""
    return not isinstance(value, type) and all(
        callable(getattr(value, name, None)) for name in ("on_step", "define_workflow", "run")
    )


def _run_until_signalled(run: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a serve coroutine; ``Management.run`` ends cleanly on SIGTERM or SIGINT."""
    with contextlib.suppress(KeyboardInterrupt):
        loop.run(run())


def main(argv: list[str] | None = None) -> None:
    worker.main(args=argv, prog_name="python -m hms_mgmt.worker")


if __name__ == "__main__":
    main()
