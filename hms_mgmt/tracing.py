"""W3C trace context (``traceparent``) carried from ``start`` through every step.

The client makes one (or takes the current OpenTelemetry span's, when the
optional ``opentelemetry-api`` package is installed: the ``otel`` extra), the
engine stores it with the workflow and puts it in every step message, and the
worker hands it to the handler as ``ctx.traceparent``, running the handler in a
span derived from it when OpenTelemetry is there. Without OpenTelemetry this
module is a few string functions.
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import Iterator
from typing import Any

try:
    from opentelemetry import trace as _otel_trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # pragma: no cover - depends on the environment
    _otel_trace = None  # type: ignore[assignment]

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def otel_available() -> bool:
    return _otel_trace is not None


def valid(traceparent: object) -> bool:
    """Whether a value is a ``traceparent`` we carry: version 00, ids not all zeros."""
    if not isinstance(traceparent, str):
        return False
    match = _TRACEPARENT.match(traceparent)
    return bool(match) and set(match[1]) != {"0"} and set(match[2]) != {"0"}  # type: ignore[index]


def checked(traceparent: object) -> str | None:
    """The value if it is a valid ``traceparent``, else None (W3C: ignore an invalid one)."""
    return traceparent if valid(traceparent) else None  # type: ignore[return-value]


def new_traceparent(trace_id: str | None = None) -> str:
    """A fresh ``traceparent`` (sampled); a new trace unless ``trace_id`` is given."""
    return f"00-{trace_id or secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def current_traceparent() -> str:
    """The current OpenTelemetry span's context if there is one, else a new trace."""
    if _otel_trace is not None:
        span_context = _otel_trace.get_current_span().get_span_context()
        if span_context.is_valid:
            return (
                f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}"
                f"-{int(span_context.trace_flags):02x}"
            )
    return new_traceparent()


def trace_id(traceparent: str | None) -> str | None:
    """The trace id of a ``traceparent`` (what log lines carry), or None."""
    if traceparent is None:
        return None
    match = _TRACEPARENT.match(traceparent)
    return match[1] if match else None


def log_fields(traceparent: str | None) -> dict[str, str]:
    """``{"trace_id": ...}`` to add to a log line, or nothing when there is no trace."""
    found = trace_id(traceparent)
    return {"trace_id": found} if found else {}


_PROPAGATOR = None if _otel_trace is None else TraceContextTextMapPropagator()
_TRACER: Any = None


def _tracer() -> Any:
    """One tracer for the process: a proxy until an SDK sets a provider, then it follows it.

    (``get_tracer`` on every step read the environment each time: a tenth of a step
    service's CPU.)
    """
    global _TRACER
    if _TRACER is None:
        _TRACER = _otel_trace.get_tracer("hms_mgmt")
    return _TRACER


@contextlib.contextmanager
def step_span(traceparent: str | None, name: str, attributes: dict[str, Any]) -> Iterator[None]:
    """Run a handler in a span that continues the workflow's trace (with OpenTelemetry)."""
    if _otel_trace is None or traceparent is None:
        yield
        return
    parent = _PROPAGATOR.extract({"traceparent": traceparent})
    with _tracer().start_as_current_span(
        name, context=parent, kind=_otel_trace.SpanKind.CONSUMER, attributes=attributes
    ):
        yield
