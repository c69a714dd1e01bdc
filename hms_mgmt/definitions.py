"""Workflow definitions: ordered steps, retry policies, timeouts, the error path.

A definition is checked when it is made, so a mistake surfaces at
``define_workflow`` rather than in the middle of a run. Definitions travel to
the engine as JSON and are stored there, versioned.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from hms_mgmt.bounds import MAX_DELAY, NAME_PATTERN, check_delay, short
from hms_mgmt.errors import DefinitionError

"""Workflow, step, signal and schedule names; match with ``fullmatch``."""


def check_name(kind: str, name: object) -> str:
    """A workflow or step name: letters, digits, ``_`` and ``-`` (a dot would break routing)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise DefinitionError(
            f"invalid {kind} name {name!r}: use 1-100 letters, digits, '_' or '-'"
        )
    return name


def split_topic(topic: str) -> tuple[str, str]:
    """``"grantApproval.validateApp"`` -> ``("grantApproval", "validateApp")``."""
    workflow, dot, step = topic.partition(".")
    if not dot:
        raise DefinitionError(f"invalid step topic {topic!r}: expected '<workflow>.<step>'")
    return check_name("workflow", workflow), check_name("step", step)


def _type_name(kind: type[BaseException] | str) -> str:
    if isinstance(kind, str):
        return kind
    if isinstance(kind, type) and issubclass(kind, BaseException):
        return f"{kind.__module__}.{kind.__qualname__}"
    raise DefinitionError(f"non_retryable entries must be exception types or names, not {kind!r}")


@dataclass(frozen=True)
class RetryPolicy:
    """How often a failed step is tried again, and how long to wait between attempts.

    The wait before attempt ``n + 1`` is ``initial_delay * backoff ** (n - 1)``,
    capped at ``max_delay``; with ``jitter`` it is drawn from the upper half of
    that, so retries of many workflows do not arrive together.
    """

    max_attempts: int = 3
    initial_delay: float = 1.0
    backoff: float = 2.0
    max_delay: float = 60.0
    jitter: bool = True
    non_retryable: tuple[str, ...] = field(default=())

    def __init__(
        self,
        max_attempts: int = 3,
        initial_delay: float = 1.0,
        backoff: float = 2.0,
        max_delay: float = 60.0,
        jitter: bool = True,
        non_retryable: Iterable[type[BaseException] | str] = (),
    ) -> None:
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise DefinitionError(f"max_attempts must be an integer >= 1, not {max_attempts!r}")
        check_delay(initial_delay, "initial_delay", DefinitionError)
        check_delay(max_delay, "max_delay", DefinitionError)
        if (
            not isinstance(backoff, int | float)
            or isinstance(backoff, bool)
            or not 1 <= backoff <= sys.float_info.max
        ):
            raise DefinitionError(f"backoff must be a finite number >= 1, not {short(backoff)}")
        object.__setattr__(self, "max_attempts", max_attempts)
        object.__setattr__(self, "initial_delay", float(initial_delay))
        object.__setattr__(self, "backoff", float(backoff))
        object.__setattr__(self, "max_delay", float(max_delay))
        object.__setattr__(self, "jitter", bool(jitter))
        object.__setattr__(self, "non_retryable", tuple(_type_name(k) for k in non_retryable))

    def delay_after(self, attempt: int, draw: float) -> float:
        """Seconds to wait after failed attempt ``attempt``; ``draw`` is in [0, 1)."""
        try:
            base = min(self.max_delay, self.initial_delay * self.backoff ** (attempt - 1))
        except OverflowError:  # backoff ** attempt beyond a float: long past max_delay
            base = self.max_delay if self.initial_delay else 0.0
        return base * (0.5 + 0.5 * draw) if self.jitter else base

    def retries(self, error: dict[str, Any]) -> bool:
        """Whether a failed attempt's ``error`` (as reported) may be tried again: neither
        marked final by its handler (``retryable: false``) nor of a type listed as final."""
        types = error.get("types") or [str(error.get("type", ""))]
        return bool(error.get("retryable", True)) and not self.is_non_retryable(types)

    def is_non_retryable(self, error_types: Sequence[str]) -> bool:
        """Whether an error whose class hierarchy is ``error_types`` is listed as final."""
        for listed in self.non_retryable:
            for name in error_types:
                if name == listed or name.rsplit(".", 1)[-1] == listed:
                    return True
        return False

    def to_json(self) -> dict[str, Any]:
        return {
            "max_attempts": self.max_attempts,
            "initial_delay": self.initial_delay,
            "backoff": self.backoff,
            "max_delay": self.max_delay,
            "jitter": self.jitter,
            "non_retryable": list(self.non_retryable),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RetryPolicy:
        return cls(**data)


@dataclass(frozen=True)
class Step:
    """A step with its own retry policy or deadlines; plain names are fine where none is needed.

    ``timeout``: seconds a started attempt may run (from its start; heartbeats push it out).
    ``schedule_to_start``: seconds an attempt may wait for a step service to start it; past
    that it fails (``ScheduleToStartTimeout``) and the retry policy applies, so that a run
    never waits for ever behind hung handlers or with no step service at all.
    ``concurrency``: at most this many runs of the step out at once (published and not
    finished), enforced by the engine at admission; the others wait as ``queued``.
    ``concurrency_key``: a field of the step's input payload; each of its values has its own
    ``concurrency`` slots (runs whose payload lacks it share one group).
    ``rate_limit``: ``"N/s"``, ``"N/m"`` or ``"N/h"``: runs of the step are published at
    most that often (evenly spaced, whatever their key), the others wait as ``queued``.
    ``compensate``: the step (a name or a :class:`Step`) that undoes this one when the
    workflow gives up or is cancelled with ``compensate=True``: like an error step, a step
    outside the ordered list, with its own queue and handler (see the README's
    "Compensation (sagas)").
    """

    name: str
    retry: RetryPolicy | None = None
    timeout: float | None = None
    schedule_to_start: float | None = None
    concurrency: int | None = None
    concurrency_key: str | None = None
    rate_limit: str | None = None
    compensate: str | Step | None = None
    # A member of a Parallel group: (the group's first step, tolerate, max_concurrency)
    parallel: tuple[str, int, int | None] | None = None

    def __post_init__(self) -> None:
        check_name("step", self.name)
        if isinstance(self.compensate, str):
            check_name(f"compensation step (of step {self.name!r})", self.compensate)
            object.__setattr__(self, "compensate", Step(self.compensate))
        elif self.compensate is not None and not isinstance(self.compensate, Step):
            raise DefinitionError(
                f"compensate of step {self.name!r} must be a step name or a Step, "
                f"not {self.compensate!r}"
            )
        if isinstance(self.compensate, Step) and self.compensate.compensate is not None:
            raise DefinitionError(
                f"compensation step {self.compensate.name!r} of step {self.name!r} has a "
                "compensation of its own: a compensation is not compensated"
            )
        if self.retry is not None and not isinstance(self.retry, RetryPolicy):
            raise DefinitionError(f"retry of step {self.name!r} must be a RetryPolicy")
        if self.timeout is not None and (
            check_delay(self.timeout, f"timeout of step {self.name!r}", DefinitionError) <= 0
        ):
            raise DefinitionError(
                f"timeout of step {self.name!r} must be > 0, not {self.timeout!r}"
            )
        if self.schedule_to_start is not None and (
            check_delay(
                self.schedule_to_start, f"schedule_to_start of step {self.name!r}", DefinitionError
            )
            <= 0
        ):
            raise DefinitionError(
                f"schedule_to_start of step {self.name!r} must be > 0, "
                f"not {self.schedule_to_start!r}"
            )
        self._check_concurrency()
        if self.rate_limit is not None:
            rate_interval(self.rate_limit, self.name)

    @property
    def rate_interval(self) -> float | None:
        """Seconds between two runs published under its rate limit; None without one."""
        return None if self.rate_limit is None else rate_interval(self.rate_limit, self.name)

    def _check_concurrency(self) -> None:
        limit, key = self.concurrency, self.concurrency_key
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise DefinitionError(
                f"concurrency of step {self.name!r} must be a whole number >= 1, not {limit!r}"
            )
        if key is not None:
            if limit is None:
                raise DefinitionError(
                    f"concurrency_key of step {self.name!r} needs a concurrency (the number "
                    "of runs each of its values may have out at once)"
                )
            if not isinstance(key, str) or not key:
                raise DefinitionError(
                    f"concurrency_key of step {self.name!r} must be the name of a field of "
                    f"the step's input payload, not {key!r}"
                )

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": self.name,
            "retry": None if self.retry is None else self.retry.to_json(),
            "timeout": self.timeout,
        }
        if self.schedule_to_start is not None:  # left out when unset: older definitions match
            body["schedule_to_start"] = self.schedule_to_start
        if self.concurrency is not None:  # the same: left out when unset
            body["concurrency"] = self.concurrency
        if self.concurrency_key is not None:
            body["concurrency_key"] = self.concurrency_key
        if self.rate_limit is not None:
            body["rate_limit"] = self.rate_limit
        if isinstance(self.compensate, Step):
            body["compensate"] = self.compensate.to_json()
        if self.parallel is not None:
            group, tolerate, limit = self.parallel
            body["parallel"] = {"group": group, "tolerate": tolerate, "max_concurrency": limit}
        return body

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Step:
        retry = data.get("retry")
        compensate = data.get("compensate")
        parallel = data.get("parallel")
        return cls(
            name=data["name"],
            retry=None if retry is None else RetryPolicy.from_json(retry),
            timeout=data.get("timeout"),
            schedule_to_start=data.get("schedule_to_start"),
            concurrency=data.get("concurrency"),
            concurrency_key=data.get("concurrency_key"),
            rate_limit=data.get("rate_limit"),
            compensate=None if compensate is None else Step.from_json(compensate),
            parallel=None
            if parallel is None
            else (parallel["group"], parallel["tolerate"], parallel["max_concurrency"]),
        )

    @property
    def compensation(self) -> Step | None:
        """The step that undoes this one, if it has one."""
        return self.compensate if isinstance(self.compensate, Step) else None


def _check_compensations(workflow: str, steps: Sequence[Step], error_step: Step | None) -> None:
    """A compensation step is neither an ordinary step nor the error step, and one name
    means one step (the same settings wherever it compensates)."""
    ordinary = {step.name for step in steps}
    seen: dict[str, Step] = {}
    for step in steps:
        compensation = step.compensation
        if compensation is None:
            continue
        where = f"compensation step {compensation.name!r} of step {step.name!r} in workflow "
        if compensation.name in ordinary:
            raise DefinitionError(f"{where}{workflow!r} is also an ordinary step")
        if error_step is not None and compensation.name == error_step.name:
            raise DefinitionError(f"{where}{workflow!r} is also its on_error step")
        earlier = seen.setdefault(compensation.name, compensation)
        if earlier != compensation:
            raise DefinitionError(f"{where}{workflow!r} is declared twice with different settings")


RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def rate_interval(rate: Any, step: str) -> float:
    """The seconds between two admissions under ``rate`` (``"10/s"``: 0.1)."""
    problem = (
        f"rate_limit of step {step!r} must be 'N/s', 'N/m' or 'N/h' with N > 0 "
        f"(say '10/s'), not {rate!r}"
    )
    if not isinstance(rate, str) or rate.count("/") != 1:
        raise DefinitionError(problem)
    count, unit = rate.replace(" ", "").split("/")
    try:
        number = float(count)
    except ValueError:
        raise DefinitionError(problem) from None
    if unit not in RATE_UNITS or not number > 0 or number == float("inf"):
        raise DefinitionError(problem)
    interval = RATE_UNITS[unit] / number
    if interval > MAX_DELAY:  # its admission timer would be due past every timer's bound
        raise DefinitionError(
            f"rate_limit of step {step!r} is {rate!r}, one run every {interval:.3g} s: "
            "it must allow one run in 10 years at least"
        )
    return interval


class Parallel:
    """Static branches in a workflow's step list: ``Parallel("creditCheck",
    "backgroundCheck")`` runs these steps at once, each with the payload the workflow
    enters the group with, and the next step in order joins them (its payload
    ``{"results": [...], "errors": [...]}``), as a handler's ``fan_out`` would (see the
    README's "Fan-out and join"). ``tolerate`` and ``max_concurrency`` as there."""

    def __init__(
        self, *steps: str | Step, tolerate: int = 0, max_concurrency: int | None = None
    ) -> None:
        if not steps:
            raise DefinitionError("Parallel() needs at least one step")
        if any(isinstance(step, Parallel) for step in steps):
            raise DefinitionError(
                "Parallel("
                + ", ".join(
                    repr(s) if isinstance(s, Parallel) else repr(_name_of(s)) for s in steps
                )
                + ") holds a Parallel group: groups do not nest "
                "(a branch's handler may return a fan_out of its own)"
            )
        bad = _bad_group_setting(tolerate, max_concurrency, tolerate_optional=True)
        if bad is not None:
            key, value, least = bad
            raise DefinitionError(
                f"{key} of Parallel{tuple(_name_of(s) for s in steps)} must be a whole "
                f"number >= {least}, not {value!r}"
            )
        built = [s if isinstance(s, Step) else Step(check_name("step", s)) for s in steps]
        group = (built[0].name, tolerate, max_concurrency)
        self.steps = tuple(replace(step, parallel=group) for step in built)

    def __repr__(self) -> str:
        steps = getattr(self, "steps", ())
        return "Parallel(" + ", ".join(repr(step.name) for step in steps) + ")"


def _name_of(step: str | Step) -> str:
    return step.name if isinstance(step, Step) else str(step)


def _bad_group_setting(
    tolerate: Any, max_concurrency: Any, *, tolerate_optional: bool = False
) -> tuple[str, Any, int] | None:
    """The first of a Parallel group's settings that is not a whole number at least its
    least (tolerate 0, max_concurrency 1; max_concurrency may be None): its key, value and
    least; None if both are good."""
    for key, value, least, optional in (
        ("tolerate", tolerate, 0, tolerate_optional),
        ("max_concurrency", max_concurrency, 1, True),
    ):
        if (value is not None or not optional) and (
            isinstance(value, bool) or not isinstance(value, int) or value < least
        ):
            return key, value, least
    return None


def _check_parallel(workflow: str, steps: Sequence[Step]) -> None:
    """A Parallel group's steps come together, and a step follows them to join them; the
    group is named after its first step and its settings are whole numbers, the same on each
    of its steps (a definition's JSON from the bus is checked as ``Parallel(...)`` is)."""
    seen: set[str] = set()
    previous: str | None = None
    settings: tuple[Any, ...] | None = None
    for step in steps:
        parallel = step.parallel
        group = None if parallel is None else parallel[0]
        if group is not None and group != previous and group in seen:
            raise DefinitionError(f"Parallel group {group!r} of workflow {workflow!r} is split")
        if parallel is not None and group != previous:
            if group != step.name:
                raise DefinitionError(
                    f"Parallel group {group!r} of workflow {workflow!r} starts with step "
                    f"{step.name!r}: a group is named after its first step"
                )
            settings = parallel
            bad = _bad_group_setting(parallel[1], parallel[2])
            if bad is not None:
                key, value, least = bad
                raise DefinitionError(
                    f"{key} of Parallel group {group!r} of workflow {workflow!r} must be "
                    f"a whole number >= {least}, not {value!r}"
                )
        elif parallel is not None and parallel != settings:
            raise DefinitionError(
                f"step {step.name!r} of Parallel group {group!r} of workflow {workflow!r} "
                "has settings of its own: a group's steps share its tolerate and max_concurrency"
            )
        if group is not None:
            seen.add(group)
        previous = group
    if previous is not None:
        raise DefinitionError(
            f"a Parallel group ({previous!r}) is the last element of workflow {workflow!r}: "
            "a step must follow it to join its branches"
        )


@dataclass(frozen=True)
class UnloadableDefinition:
    """A stored definition that no longer passes the checks (stored by an earlier version
    of HMS-MGMT, before a check was added): the engine leaves it out and says why."""

    name: str
    version: int
    problem: str


def load_stored(body: Any, version: int) -> WorkflowDefinition | UnloadableDefinition:
    """A definition as stored, or what keeps it from loading."""
    try:
        return WorkflowDefinition.from_json(body, version)
    except DefinitionError as exc:
        name = body.get("name") if isinstance(body, dict) else None
        return UnloadableDefinition(str(name), version, str(exc))


@dataclass(frozen=True)
class WorkflowDefinition:
    """A named workflow: its ordered steps, default retry policy and error step."""

    name: str
    steps: tuple[Step, ...]
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    on_error: Step | None = None
    version: int = 0

    @classmethod
    def build(
        cls,
        name: str,
        steps: Sequence[str | Step | Parallel],
        *,
        retry: RetryPolicy | None = None,
        on_error: str | Step | None = None,
    ) -> WorkflowDefinition:
        check_name("workflow", name)
        if isinstance(steps, str) or not isinstance(steps, Sequence):
            raise DefinitionError(f"steps of workflow {name!r} must be a list of step names")
        if not steps:
            raise DefinitionError(f"workflow {name!r} has no steps")
        built = tuple(
            member
            for s in steps
            for member in (
                s.steps
                if isinstance(s, Parallel)
                else (s if isinstance(s, Step) else Step(check_name("step", s)),)
            )
        )
        _check_parallel(name, built)
        seen: set[str] = set()
        for step in built:
            if step.name in seen:
                raise DefinitionError(f"workflow {name!r} names step {step.name!r} twice")
            seen.add(step.name)
        error_step = Step(on_error) if isinstance(on_error, str) else on_error
        if error_step is not None and error_step.name in seen:
            raise DefinitionError(
                f"on_error step {error_step.name!r} of workflow {name!r} is also an ordinary step"
            )
        if error_step is not None and error_step.compensation is not None:
            raise DefinitionError(
                f"on_error step {error_step.name!r} of workflow {name!r} has a compensation: "
                "only ordinary steps are compensated"
            )
        _check_compensations(name, built, error_step)
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise DefinitionError(f"retry of workflow {name!r} must be a RetryPolicy")
        return cls(name, built, retry or RetryPolicy(), error_step)

    @property
    def step_names(self) -> list[str]:
        return [s.name for s in self.all_steps]

    @property
    def all_steps(self) -> tuple[Step, ...]:
        """Every step with a queue: the ordinary ones, the error step, the compensations."""
        extra = () if self.on_error is None else (self.on_error,)
        return (*self.steps, *extra, *self.compensations)

    @property
    def compensations(self) -> tuple[Step, ...]:
        """The compensation steps, each once, in the order of the steps they undo."""
        found: dict[str, Step] = {}
        for step in self.steps:
            if step.compensation is not None:
                found.setdefault(step.compensation.name, step.compensation)
        return tuple(found.values())

    def compensation_of(self, step: str) -> str | None:
        """The name of the step that undoes ordinary step ``step``; None if it has none."""
        for ordinary in self.steps:
            if ordinary.name == step:
                return None if ordinary.compensation is None else ordinary.compensation.name
        return None

    def is_compensation(self, step: str) -> bool:
        return any(s.name == step for s in self.compensations)

    def step(self, name: str) -> Step | None:
        for step in self.all_steps:
            if step.name == name:
                return step
        return None

    def parallel_at(self, name: str) -> list[Step] | None:
        """The steps of the Parallel group that starts with step ``name``; None if none does."""
        members = [s for s in self.steps if s.parallel is not None and s.parallel[0] == name]
        return members or None

    def next_after(self, name: str) -> str | None:
        """The step after ``name`` in order; None after the last (and after the error step)."""
        names = [s.name for s in self.steps]
        if name not in names:
            return None
        index = names.index(name)
        return names[index + 1] if index + 1 < len(names) else None

    def bad_next_step(self, next_step: object, handler: str) -> str | None:
        """Why a handler's ``next_step`` cannot follow, naming the handler; None if it can.

        The step service checks it before reporting, and the engine again on receipt (a
        step service may run with an older definition, or be written in another language).
        """
        if next_step is None or (
            isinstance(next_step, str)
            and self.step(next_step) is not None
            and not self.is_compensation(next_step)
        ):
            return None
        if isinstance(next_step, str) and self.is_compensation(next_step):
            return (
                f"{handler} returned next_step {next_step!r}, which is a compensation step of "
                f"workflow {self.name!r}: compensations run only when the workflow compensates"
            )
        return (
            f"{handler} returned next_step {next_step!r}, which is not a step of workflow "
            f"{self.name!r} (steps: {', '.join(self.step_names)})"
        )

    def policy_for(self, step: str) -> RetryPolicy:
        found = self.step(step)
        return found.retry if found is not None and found.retry is not None else self.retry

    def timeout_for(self, step: str) -> float | None:
        found = self.step(step)
        return None if found is None else found.timeout

    def schedule_to_start_for(self, step: str) -> float | None:
        found = self.step(step)
        return None if found is None else found.schedule_to_start

    def with_version(self, version: int) -> WorkflowDefinition:
        return replace(self, version=version)

    def to_json(self) -> dict[str, Any]:
        """The definition's content (without its version, which the engine assigns)."""
        return {
            "name": self.name,
            "steps": [s.to_json() for s in self.steps],
            "retry": self.retry.to_json(),
            "on_error": None if self.on_error is None else self.on_error.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], version: int = 0) -> WorkflowDefinition:
        try:
            on_error = data.get("on_error")
            return cls.build(
                data["name"],
                [Step.from_json(s) for s in data["steps"]],
                retry=RetryPolicy.from_json(data["retry"]),
                on_error=None if on_error is None else Step.from_json(on_error),
            ).with_version(version)
        except (KeyError, TypeError) as exc:
            raise DefinitionError(f"malformed workflow definition: {exc!r}") from exc
