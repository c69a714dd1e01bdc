"""One small typed settings object, read from ``HMS_*`` environment variables; flags override."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

DEFAULT_BROKER_URL = "amqp://guest:guest@localhost:5672/"
DEFAULT_STORE_URL = "sqlite:///hms_mgmt.db"


@dataclass(frozen=True)
class Settings:
    broker_url: str = DEFAULT_BROKER_URL
    store_url: str = DEFAULT_STORE_URL
    log_format: str | None = None  # console or json; by default console on a terminal
    log_level: str = "info"
    http_host: str = "127.0.0.1"
    http_port: int | None = None
    engine_url: str | None = None

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
            else:
                values[f.name] = raw
        settings = cls(**values)
        chosen = {k: v for k, v in overrides.items() if v is not None}
        return replace(settings, **chosen) if chosen else settings
