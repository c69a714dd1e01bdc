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

from croniter import CroniterError, croniter

from hms_mgmt.definitions import check_name
from hms_mgmt.errors import DefinitionError

CATCH_UP = ("latest", "all", "skip")
MAX_CATCH_UP = 100
MAX_ID = 80  # "<id>-<tick>" must stay within a workflow id's 100 characters
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
    if catch_up not in CATCH_UP:
        raise DefinitionError(f"catch_up must be one of {', '.join(CATCH_UP)}, not {catch_up!r}")
    next_tick(cron, timezone, 0.0)  # an expression that never fires (30 February) fails here


def _zone(timezone: str) -> ZoneInfo:
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise DefinitionError(f"unknown time zone {timezone!r}") from exc


def next_tick(cron: str, timezone: str, after: float) -> float:
    """The first tick strictly after ``after`` (a timestamp), in the schedule's time zone."""
    start = datetime.fromtimestamp(after, UTC).astimezone(_zone(timezone))
    try:
        tick: datetime = croniter(cron, start).get_next(datetime)
    except (CroniterError, ValueError, KeyError) as exc:
        raise DefinitionError(f"cron expression {cron!r} has no next tick: {exc}") from exc
    return tick.timestamp()


def previous_tick(cron: str, timezone: str, before: float) -> float:
    """The last tick at or before ``before``."""
    start = datetime.fromtimestamp(before + 0.001, UTC).astimezone(_zone(timezone))
    tick: datetime = croniter(cron, start).get_prev(datetime)
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
    if len(schedule_id) > MAX_ID:
        raise DefinitionError(
            f"schedule id {schedule_id[:20]!r}... is {len(schedule_id)} characters; at most "
            f"{MAX_ID}, so that its workflows' ids fit (give schedule_id= for a long workflow name)"
        )
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
    """The ticks to start now (per the catch-up policy) and the schedule moved past them.

    Found from the latest tick backwards, so a long downtime costs at most
    MAX_CATCH_UP steps, not one per missed tick.
    """
    if schedule.next_at > now:
        return [], schedule
    cron, zone = schedule.cron, schedule.timezone
    latest = max(schedule.next_at, previous_tick(cron, zone, now))
    following = next_tick(cron, zone, latest)
    if schedule.catch_up == "all":
        ticks = [latest]
        while len(ticks) < MAX_CATCH_UP and ticks[0] > schedule.next_at:
            ticks.insert(0, max(schedule.next_at, previous_tick(cron, zone, ticks[0] - 0.002)))
    elif schedule.catch_up == "latest":
        ticks = [latest]
    else:  # skip: only a tick that is due right now, not one missed while down
        ticks = [latest] if now - latest < SKIP_GRACE else []
    return ticks, replace(schedule, next_at=following, last_tick=latest)


def workflow_id(schedule_id: str, tick: float) -> str:
    """The id of the workflow a tick starts: the same however often the tick is looked at."""
    return f"{schedule_id}-{int(tick)}"


def same(current: Schedule, wanted: Schedule) -> bool:
    """Whether scheduling ``wanted`` again would change ``current`` (its timing aside)."""
    settings = ("workflow", "cron", "timezone", "payload", "catch_up")
    return all(getattr(current, name) == getattr(wanted, name) for name in settings)
