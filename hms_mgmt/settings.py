"""One small typed settings object, read from ``HMS_*`` environment variables; flags override."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

DEFAULT_BROKER_URL = "amqp://guest:guest@localhost:5672/"
DEFAULT_STORE_URL = "sqlite:///hms_mgmt.db"
DEFAULT_RETENTION = 30 * 86400.0
_PORTS = ("http_port", "worker_http_port")
_SECONDS = frozenset(
    {"loop_block_threshold", "liveness_lag", "store_grace", "stuck_after", "engine_heartbeat"}
)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, None: 1}


def parse_duration(text: str, *, what: str = "a duration") -> float | None:
    """``30d``, ``12h``, ``90m``, ``45s`` or seconds as seconds; ``off`` (or ``0``) as None."""
    if text.strip().lower() in ("off", "never", "none", "0"):
        return None
    match = _DURATION.match(text)
    if not match:
        raise ValueError(
            f"{what} must be a duration such as 30d, 12h, 90m or 45s (or off), not {text!r}"
        )
    return float(match[1]) * _UNIT[match[2]]


def _users(text: str | None) -> frozenset[str] | None:
    if text is None:
        return None
    return frozenset(user.strip() for user in text.split(",") if user.strip())


@dataclass(frozen=True)
class Settings:
    broker_url: str = DEFAULT_BROKER_URL
    store_url: str = DEFAULT_STORE_URL
    log_format: str | None = None  # console or json; by default console on a terminal
    log_level: str = "info"
    http_host: str = "127.0.0.1"
    http_port: int | None = (
        None  # the engine's HTTP server (and where the CLI finds it); off if None
    )
    worker_http_port: int | None = None  # a step service's probes (/healthz, /readyz, /metrics)
    http_token: str | None = None  # needed by mutating HTTP endpoints; required beyond loopback
    engine_url: str | None = None  # where the CLI finds the engine's HTTP server
    # A stall of the event loop longer than this (seconds) is logged and counted.
    loop_block_threshold: float = 1.0
    # /healthz fails (503) during and for a while after a stall longer than this (seconds).
    liveness_lag: float = 30.0
    store_grace: float = 30.0  # seconds the store may be in trouble before the engine exits
    retention: float | None = DEFAULT_RETENTION  # finished workflows are pruned after it
    client_users: str | None = None  # broker users whose requests the engine obeys (all kinds)
    service_users: str | None = None  # ... whose outcomes and definitions it obeys
    http_open_reads: bool = False  # beyond loopback, let reads of the API in without the token
    stuck_after: float = 300.0  # a step waiting this long to start shows as stuck
    # The heartbeat of an engine's broker connections on a shared store (PostgreSQL): a dead
    # or frozen active engine's lock is freed after about two, and a standby takes over.
    engine_heartbeat: float = 3.0
    # Step queues: classic (sooner on one node; the poison guard limits deliveries) or quorum
    # (replicated, for a cluster; the broker limits deliveries). Unset: quorum when the broker
    # URL names several nodes, else classic. An existing queue keeps its type.
    step_queue_type: str | None = None

    def __post_init__(self) -> None:
        for name in _PORTS:
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"HMS_{name.upper()} must be a port, 0-65535, not {port}")
        for name in _SECONDS:
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be a number of seconds > 0, not {value!r}")
        if self.step_queue_type not in (None, "classic", "quorum"):
            raise ValueError(
                "HMS_STEP_QUEUE_TYPE must be classic or quorum (quorum for a RabbitMQ "
                f"cluster), not {self.step_queue_type!r}"
            )

    @property
    def client_user_set(self) -> frozenset[str] | None:
        return _users(self.client_users)

    @property
    def service_user_set(self) -> frozenset[str] | None:
        return _users(self.service_users)

    @property
    def resolved_engine_url(self) -> str | None:
        """``engine_url``, else ``http://127.0.0.1:<http_port>``, else None."""
        if self.engine_url:
            return self.engine_url.rstrip("/")
        if self.http_port:
            return f"http://127.0.0.1:{self.http_port}"
        return None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``HMS_<NAME>`` variables, then ``overrides`` that are not None."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"HMS_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            if f.name in _PORTS:
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise ValueError(
                        f"HMS_{f.name.upper()} must be a port number, not {raw!r}"
                    ) from None
            elif f.name in _SECONDS:
                try:
                    values[f.name] = float(raw)
                except ValueError:
                    raise ValueError(
                        f"HMS_{f.name.upper()} must be a number of seconds, not {raw!r}"
                    ) from None
            elif f.name == "retention":
                values[f.name] = parse_duration(raw, what="HMS_RETENTION")
            elif f.name == "step_queue_type":
                values[f.name] = raw.strip().lower()
            elif f.name == "http_open_reads":
                values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
            else:
                values[f.name] = raw
        settings = cls(**values)
        chosen = {k: v for k, v in overrides.items() if v is not None}
        return replace(settings, **chosen) if chosen else settings
