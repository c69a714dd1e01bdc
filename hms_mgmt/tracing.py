"""W3C trace context (``traceparent``) carried from ``start`` through every step.

The client makes one: with OpenTelemetry (the optional ``opentelemetry-api``
package, the ``otel`` extra) that is the context of its ``hms.start <workflow>``
span, a child of the current span if there is one; without it, a new trace. The
engine stores it with the workflow and puts it in every step message, and
records a span of each committed batch's work on a workflow under it; the worker
hands it to the handler as ``ctx.traceparent``, running the handler in a span
derived from it. So every span hms-mgmt records has a parent that is recorded
too (or the caller's own, given ``traceparent=``). Spans go where an SDK the
application configures sends them; without OpenTelemetry this module is a few
string functions.
"""

from __future__ import annotations

import contextlib
import functools
import re
import secrets
from collections.abc import Iterator, Mapping
from typing import Any

try:
    from opentelemetry import context as _otel_context
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


def _format(span_context: Any) -> str:
    return (
        f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}"
        f"-{int(span_context.trace_flags):02x}"
    )


def current_traceparent() -> str:
    """The current OpenTelemetry span's context if there is one, else a new trace."""
    if _otel_trace is not None:
        span_context = _otel_trace.get_current_span().get_span_context()
        if span_context.is_valid:
            return _format(span_context)
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
_EMPTY_CONTEXT = None if _otel_trace is None else _otel_context.Context()
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


@functools.lru_cache(maxsize=4096)  # a workflow's steps share it: made once, not per step
def _remote_context(traceparent: str) -> Any:
    """An OpenTelemetry context whose current span is the (remote) one ``traceparent`` names."""
    match = _TRACEPARENT.match(traceparent)
    if match is None:  # not one we carry (checked at the edge): no trace
        return _EMPTY_CONTEXT
    remote = _otel_trace.NonRecordingSpan(
        _otel_trace.SpanContext(
            trace_id=int(match[1], 16),
            span_id=int(match[2], 16),
            is_remote=True,
            trace_flags=_otel_trace.TraceFlags(int(match[3], 16)),
        )
    )
    return _otel_trace.set_span_in_context(remote, _EMPTY_CONTEXT)


@contextlib.contextmanager
def step_span(traceparent: str | None, name: str, attributes: dict[str, Any]) -> Iterator[None]:
    """Run a handler in a span that continues the workflow's trace (with OpenTelemetry).

    With no SDK to record spans, the handler runs in the workflow's trace context all the
    same (so what it calls can carry the trace on), without making a span nobody records:
    that cost a fifth of a step service's CPU.
    """
    if _otel_trace is None or traceparent is None:
        yield
        return
    if not recording():
        token = _otel_context.attach(_remote_context(traceparent))
        try:
            yield
        finally:
            _otel_context.detach(token)
        return
    parent = _PROPAGATOR.extract({"traceparent": traceparent})
    with _tracer().start_as_current_span(
        name, context=parent, kind=_otel_trace.SpanKind.CONSUMER, attributes=attributes
    ):
        yield


@contextlib.contextmanager
def start_span(workflow: str, traceparent: str | None = None) -> Iterator[str]:
    """The ``traceparent`` a start carries, made inside the client's start span.

    Given one, it is the caller's: used as it is, no span. Otherwise, with
    OpenTelemetry, a ``hms.start <workflow>`` span (a child of the current span, if
    any) whose context the workflow carries: the root of the workflow's spans when
    nothing else is. When no SDK records it, the current span's context or a new
    trace, as :func:`current_traceparent`.
    """
    if traceparent is not None or _otel_trace is None:
        yield traceparent or new_traceparent()
        return
    if not recording():  # what a span nobody records would give, without making it
        yield current_traceparent()
        return
    with _tracer().start_as_current_span(
        f"hms.start {workflow}",
        kind=_otel_trace.SpanKind.PRODUCER,
        attributes={"hms.workflow": workflow},
    ) as span:
        span_context = span.get_span_context()
        yield _format(span_context) if span_context.is_valid else new_traceparent()


def recording() -> bool:
    """Whether spans may go anywhere: a tracer provider (an SDK) has been set."""
    return _otel_trace is not None and not isinstance(
        _otel_trace.get_tracer_provider(), _otel_trace.ProxyTracerProvider
    )


def record_span(
    traceparent: str,
    name: str,
    attributes: Mapping[str, Any],
    start_ns: int,
    end_ns: int,
) -> None:
    """A finished span under ``traceparent``, from ``start_ns`` to ``end_ns`` (Unix ns)."""
    if not recording():
        return
    span = _tracer().start_span(
        name,
        context=_PROPAGATOR.extract({"traceparent": traceparent}),
        kind=_otel_trace.SpanKind.INTERNAL,
        attributes=attributes,
        start_time=start_ns,
    )
    span.end(end_time=end_ns)
