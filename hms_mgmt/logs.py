"""Logging through structlog: readable on a terminal, JSON lines otherwise, always on stderr.

Every line about a workflow carries its ``workflow_id`` (and ``step`` and
``attempt`` where there is one): bind them with ``log.bind(...)``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
import structlog.tracebacks

_configured = False


def configure(fmt: str | None = None, level: str = "info") -> None:
    """Set up logging once per process; ``fmt`` is ``console`` or ``json`` (default: by terminal)."""
    global _configured
    if fmt is None:
        fmt = "console" if sys.stderr.isatty() else "json"
    if fmt not in ("console", "json"):
        raise ValueError(f"log format must be 'console' or 'json', not {fmt!r}")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    # Tracebacks without frame locals: a failing batch's locals are kilobytes of payloads
    # (applicants' data) on every line, and say less than the exception itself.
    renderer: Any = (
        structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    tracebacks = structlog.processors.ExceptionRenderer(
        structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            tracebacks if fmt == "json" else _keep,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    _configured = True


def _keep(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    return event


def get_logger(name: str) -> Any:
    """A structlog logger named after a component (``engine``, ``worker``, ``client``)."""
    if not _configured:
        configure()
    return structlog.get_logger(component=name)
