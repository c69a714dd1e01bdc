"""Cron schedules: start a workflow at each tick, exactly once per tick.

Pure functions over :class:`Schedule` records; the engine stores them and fires
due ones. A tick's workflow id is derived from the schedule and the tick, and a
schedule's next tick is committed in the same transaction as the workflows it
starts, so a restart can neither skip a committed tick nor start it twice.

Ticks missed while the engine was down follow the schedule's ``catch_up``
policy: ``latest`` (the default) starts one workflow for the most recent missed
tick, ``all`` starts one per missed tick (at most :data:`MAX_CATCH_UP`), and
``skip`` starts none and waits for the next tick.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from hms_mgmt.definitions import check_name
from hms_mgmt.errors import DefinitionError

CATCH_UP = ("latest", "all", "skip")
MAX_CATCH_UP = 100
SKIP_GRACE = 5.0  # a tick this late is still "now" under the skip policy, not missed


@dataclass(frozen=True)
class Schedule:
    id: str
    workflow: str
    cron: str
    timezone: str
    payload: Any
    catch_up: str
    next_at: float
    created_at: float
    last_tick: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check(cron: str, timezone: str, catch_up: str) -> None:
    """Refuse a bad expression, time zone or policy, naming it."""
    if not isinstance(cron, str) or not croniter.is_valid(cron):
        raise DefinitionError(
            f"invalid cron expression {cron!r}: expected five fields (minute hour day month "
            "weekday), or six with seconds last"
        )
    _zone(timezone)
    if catch_up not in CATCH_UP:
        raise DefinitionError(f"catch_up must be one of {', '.join(CATCH_UP)}, not {catch_up!r}")


def _zone(timezone: str) -> ZoneInfo:
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise DefinitionError(f"unknown time zone {timezone!r}") from exc


def next_tick(cron: str, timezone: str, after: float) -> float:
    """The first tick strictly after ``after`` (a timestamp), in the schedule's time zone."""
    start = datetime.fromtimestamp(after, UTC).astimezone(_zone(timezone))
    tick: datetime = croniter(cron, start).get_next(datetime)
    return tick.timestamp()


def new(
    schedule_id: str,
    workflow: str,
    cron: str,
    *,
    timezone: str = "UTC",
    payload: Any = None,
    catch_up: str = "latest",
    now: float,
) -> Schedule:
    check_name("schedule", schedule_id)
    check_name("workflow", workflow)
    check(cron, timezone, catch_up)
    return Schedule(
        id=schedule_id,
        workflow=workflow,
        cron=cron,
        timezone=timezone,
        payload=payload,
        catch_up=catch_up,
        next_at=next_tick(cron, timezone, now),
        created_at=now,
    )


def due(schedule: Schedule, now: float) -> tuple[list[float], Schedule]:
    """The ticks to start now (per the catch-up policy) and the schedule moved past them."""
    if schedule.next_at > now:
        return [], schedule
    missed = [schedule.next_at]
    following = next_tick(schedule.cron, schedule.timezone, schedule.next_at)
    while following <= now:
        missed.append(following)
        if len(missed) > MAX_CATCH_UP:
            missed.pop(0)
        following = next_tick(schedule.cron, schedule.timezone, following)
    if schedule.catch_up == "all":
        ticks = missed
    elif schedule.catch_up == "latest":
        ticks = missed[-1:]
    else:  # skip: only a tick that is due right now, not one missed while down
        ticks = [t for t in missed[-1:] if now - t < SKIP_GRACE]
    return ticks, replace(schedule, next_at=following, last_tick=missed[-1])


def workflow_id(schedule_id: str, tick: float) -> str:
    """The id of the workflow a tick starts: the same however often the tick is looked at."""
    return f"{schedule_id}-{int(tick)}"
