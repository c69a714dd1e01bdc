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
_HANDLER_NAME = "hms-stdlib"
# Libraries whose records during a dropped connection are expected and recovered from: the
# broker adapter logs broker.connection_lost and broker.reconnected for what matters.
NOISY_LIBRARIES = ("aio_pika", "aiormq")


def configure(fmt: str | None = None, level: str = "info", *, stdlib: bool = False) -> None:
    """Set up logging once per process; ``fmt`` is ``console`` or ``json`` (default: by terminal).

    With ``stdlib`` (the daemons, ``hms engine`` and ``hms worker``), the standard library's
    logging (aio-pika, aiormq, asyncio, aiohttp, warnings) is routed through the same renderer,
    so that in json mode every line on stderr is JSON. A program that only uses the SDK keeps
    its own logging set-up.
    """
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
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            tracebacks if fmt == "json" else _keep,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    if stdlib:
        _route_stdlib(numeric, timestamper, tracebacks if fmt == "json" else _keep, renderer)
    _configured = True


def _route_stdlib(level: int, timestamper: Any, tracebacks: Any, renderer: Any) -> None:
    """One handler on the root logger that renders records as structlog renders its own."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.add_log_level,
            structlog.stdlib.ExtraAdder(),
            timestamper,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            tracebacks,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    handler.addFilter(LibraryNoise(level))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)


class LibraryNoise(logging.Filter):
    """aio-pika's and aiormq's records one level lower (error -> warning, warning -> info,
    info -> debug), and with the exception as a one-line ``error`` field instead of a
    traceback unless the level is debug.

    A dropped connection makes them log a dozen errors and tracebacks for what their robust
    connection then recovers from; ``broker.connection_lost`` and ``broker.reconnected`` from
    the adapter say what an operator needs.
    """

    def __init__(self, threshold: int) -> None:
        super().__init__()
        self.threshold = threshold

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(NOISY_LIBRARIES):
            return True
        level = max(logging.DEBUG, record.levelno - 10)
        if level < self.threshold:
            return False
        record.levelno, record.levelname = level, logging.getLevelName(level)
        if record.exc_info and self.threshold > logging.DEBUG:
            exc = record.exc_info[1]
            if exc is not None:
                record.error = f"{type(exc).__name__}: {exc}"
            record.exc_info, record.exc_text = None, None
        return True


def _keep(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    return event


def get_logger(name: str) -> Any:
    """A structlog logger named after a component (``engine``, ``worker``, ``client``)."""
    if not _configured:
        configure()
    return structlog.get_logger(component=name)
