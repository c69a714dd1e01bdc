"""The errors HMS-MGMT raises; every one names what it refused."""

from __future__ import annotations

from bus_adapters.base import BrokerConnectError
from hms_mgmt.bounds import check_delay


class HmsError(Exception):
    """Base of every HMS-MGMT error.

    ``http_status`` is what the engine's HTTP API answers it with: each error says its own.
    """

    http_status = 400


class DefinitionError(HmsError, ValueError):
    """A workflow definition or a step name is invalid."""


class PayloadError(HmsError, ValueError):
    """A payload is not JSON-serialisable, too large or too deeply nested."""


class UnknownWorkflowError(HmsError, LookupError):
    """No workflow of that name is defined."""

    http_status = 404


class WorkflowNotFoundError(HmsError, LookupError):
    """No workflow has that id."""

    http_status = 404


class UnknownStepError(HmsError, LookupError):
    """The workflow has no step of that name (a reset to a step, say)."""


class ScheduleNotFoundError(HmsError, LookupError):
    """No schedule has that id."""

    http_status = 404


class InvalidStateError(HmsError):
    """The workflow is not in a state that allows the request (cancel a finished one, say)."""

    http_status = 409


class WorkflowTimeoutError(HmsError, TimeoutError):
    """``wait`` or ``execute`` reached its deadline before the workflow ended; the workflow
    goes on. ``workflow_id`` names it, to wait again or look at it."""

    http_status = 504

    def __init__(self, message: str, workflow_id: str) -> None:
        super().__init__(message)
        self.workflow_id = workflow_id


class EngineUnavailableError(HmsError, TimeoutError):
    """The engine did not answer a request before its deadline."""

    http_status = 503


class BrokerUnavailableError(HmsError, BrokerConnectError):
    """The broker cannot be reached, or it refused us; the message names the URL without its
    password and what to do.

    ``refused`` is True when the broker answered and said no (a wrong user name or password, a
    vhost that does not exist or that the user may not use): trying again will not help. False
    when nothing listens there or the network failed. Also a ``bus_adapters.BusError`` (and
    ``BrokerConnectError``), which code written before it catches.
    """

    http_status = 503


class StoreError(HmsError):
    """The store cannot be used: missing, unreadable, read-only, corrupt or full; names the path.

    ``kind`` says what is wrong (deleted, replaced, truncated, corrupt, read_only, full,
    unopenable, taken, io) and ``lasting`` whether waiting can fix it.
    """

    http_status = 503

    def __init__(self, message: str, *, kind: str = "io", lasting: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.lasting = lasting


class InvalidMessageError(HmsError, ValueError):
    """A message on the bus cannot be decoded or validated."""


class NonRetryableError(HmsError):
    """Raise from a handler to fail the step at once, without retries."""


class StepTimeout(HmsError):
    """A step's attempt did not finish within its ``timeout``: the worker stopped waiting for it.

    Retryable. The engine records the same type when its own deadline for the attempt passes.
    """


class Retry(HmsError):
    """Raise from a handler to ask for another attempt, after ``delay`` seconds if given."""

    def __init__(self, message: str = "retry requested", *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay

    @property
    def delay(self) -> float | None:
        return self._delay

    @delay.setter
    def delay(self, value: float | None) -> None:
        """Seconds from 0 to 10 years (``MAX_DELAY``); anything else is a ``ValueError`` at once."""
        if value is not None:
            check_delay(value, "Retry delay")
        self._delay = value


_BY_NAME: dict[str, type[HmsError]] = {
    cls.__name__: cls
    for cls in (
        HmsError,
        DefinitionError,
        PayloadError,
        UnknownWorkflowError,
        WorkflowNotFoundError,
        UnknownStepError,
        ScheduleNotFoundError,
        InvalidStateError,
        EngineUnavailableError,
        BrokerUnavailableError,
        InvalidMessageError,
        StoreError,
    )
}


def error_from_reply(kind: str, message: str) -> HmsError:
    """Rebuild an engine-side error on the client side."""
    return _BY_NAME.get(kind, HmsError)(message)


def error_json(exc: BaseException) -> dict[str, str]:
    """An error as a reply carries it: its type's name and its message."""
    return {"type": type(exc).__name__, "message": str(exc)}
