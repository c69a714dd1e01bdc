"""What the two daemons (``hms engine``, ``hms worker``) share: their common flags, as click
options, and the settings they make with the ``HMS_*`` environment (flags win).

Each has its own ``--http-port``: the engine's is ``HMS_HTTP_PORT``, a step service's
``HMS_WORKER_HTTP_PORT``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from hms_mgmt.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])

COMMON = [
    click.option("--broker-url", help="AMQP URL (HMS_BROKER_URL; default the local RabbitMQ)."),
    click.option("--log-format", type=click.Choice(["console", "json"]), help="HMS_LOG_FORMAT."),
    click.option("--log-level", help="HMS_LOG_LEVEL (default info)."),
    click.option(
        "--http-host",
        help="Address to listen on (HMS_HTTP_HOST; default 127.0.0.1; beyond loopback, the API "
        "needs HMS_HTTP_TOKEN).",
    ),
    click.option(
        "--loop-block-threshold",
        type=float,
        help="Log and count event-loop stalls longer than this, in seconds "
        "(HMS_LOOP_BLOCK_THRESHOLD; default 1).",
    ),
    click.option(
        "--liveness-lag",
        type=float,
        help="/healthz fails during, and for 10 s after, an event-loop stall longer than this, "
        "in seconds (HMS_LIVENESS_LAG; default 30).",
    ),
]


ENGINE_HTTP_PORT = click.option(
    "--http-port",
    type=int,
    help="Serve /healthz, /readyz, /metrics and the JSON API hms uses on this port "
    "(HMS_HTTP_PORT; default off).",
)

# A step service's port is a setting of its own: HMS_HTTP_PORT exported for the engine (and
# for hms, which finds the engine by it) would make a worker on the same machine bind the
# engine's port and fail with "address already in use".
WORKER_HTTP_PORT = click.option(
    "--http-port",
    "worker_http_port",
    type=int,
    help="Serve /healthz, /readyz and /metrics on this port (HMS_WORKER_HTTP_PORT; default off; "
    "HMS_HTTP_PORT is the engine's).",
)


def common_options(command: F) -> F:
    for option in reversed(COMMON):
        command = option(command)
    return command


def settings_from(**flags: Any) -> Settings:
    """Settings from the environment, with the flags given; a bad value is a usage error."""
    try:
        return Settings.from_env(**flags)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
