"""One small typed settings object, read from ``HMS_*`` environment variables; flags override."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

DEFAULT_BROKER_URL = "amqp://guest:guest@localhost:5672/"
DEFAULT_STORE_URL = "sqlite:///hms_mgmt.db"
_SECONDS = frozenset({"loop_block_threshold", "liveness_lag"})


@dataclass(frozen=True)
class Settings:
    broker_url: str = DEFAULT_BROKER_URL
    store_url: str = DEFAULT_STORE_URL
    log_format: str | None = None  # console or json; by default console on a terminal
    log_level: str = "info"
    http_host: str = "127.0.0.1"
    http_port: int | None = None  # the engine's (or a step service's) HTTP server; off if None
    http_token: str | None = None  # needed by mutating HTTP endpoints; required beyond loopback
    engine_url: str | None = None  # where the CLI finds the engine's HTTP server
    # A stall of the event loop longer than this (seconds) is logged and counted.
    loop_block_threshold: float = 1.0
    # /healthz fails (503) during and for a while after a stall longer than this (seconds).
    liveness_lag: float = 30.0

    def __post_init__(self) -> None:
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"the HTTP port must be 0-65535, not {self.http_port}")
        for name in ("loop_block_threshold", "liveness_lag"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be a number of seconds > 0, not {value!r}")

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
            if f.name == "http_port":
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise ValueError(f"HMS_HTTP_PORT must be a port number, not {raw!r}") from None
            elif f.name in _SECONDS:
                try:
                    values[f.name] = float(raw)
                except ValueError:
                    raise ValueError(
                        f"HMS_{f.name.upper()} must be a number of seconds, not {raw!r}"
                    ) from None
            else:
                values[f.name] = raw
        settings = cls(**values)
        chosen = {k: v for k, v in overrides.items() if v is not None}
        return replace(settings, **chosen) if chosen else settings
