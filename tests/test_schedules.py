"""Cron schedules, without a broker: ticks, catch-up policies, ids."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from hms_mgmt import schedules
from hms_mgmt.errors import DefinitionError


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_next_tick_in_a_time_zone() -> None:
    friday_noon = at("2026-11-27T17:00:00")  # 12:00 in New York
    tick = schedules.next_tick("0 9 * * MON-FRI", "America/New_York", friday_noon)
    assert datetime.fromtimestamp(tick, UTC).isoformat() == "2026-11-30T14:00:00+00:00"


def test_bad_schedules_are_refused_naming_the_problem() -> None:
    with pytest.raises(DefinitionError, match="invalid cron expression 'every day'"):
        schedules.check("every day", "UTC", "latest")
    with pytest.raises(DefinitionError, match="unknown time zone 'Mars/Olympus'"):
        schedules.check("* * * * *", "Mars/Olympus", "latest")
    with pytest.raises(DefinitionError, match="catch_up must be one of"):
        schedules.check("* * * * *", "UTC", "sometimes")


@pytest.mark.parametrize(("policy", "expected"), [("latest", 1), ("all", 5), ("skip", 0)])
def test_ticks_missed_while_down_follow_the_policy(policy: str, expected: int) -> None:
    start = at("2026-11-25T10:00:30")
    schedule = schedules.new("hourly", "report", "0 * * * *", catch_up=policy, now=start)
    assert schedule.next_at == at("2026-11-25T11:00:00")
    five_hours_later = at("2026-11-25T15:30:00")
    ticks, moved = schedules.due(schedule, five_hours_later)
    assert len(ticks) == expected
    assert moved.next_at == at("2026-11-25T16:00:00")
    assert moved.last_tick == at("2026-11-25T15:00:00")
    if ticks:
        assert ticks[-1] == at("2026-11-25T15:00:00")


def test_a_tick_due_now_fires_under_every_policy_and_only_once() -> None:
    schedule = schedules.new(
        "s", "report", "* * * * * */2", catch_up="skip", now=at("2026-11-25T10:00:00")
    )
    ticks, moved = schedules.due(schedule, schedule.next_at + 0.05)
    assert ticks == [schedule.next_at]
    assert schedules.due(moved, schedule.next_at + 0.05) == ([], moved)


def test_a_tick_names_its_workflow() -> None:
    assert schedules.workflow_id("nightly", 1764100800.0) == "nightly-1764100800"


def test_expressions_that_never_fire_and_bad_zones_are_refused() -> None:
    with pytest.raises(DefinitionError, match="no next tick"):
        schedules.check("0 0 30 2 *", "UTC", "latest")  # 30 February
    with pytest.raises(DefinitionError, match="unknown time zone 'America'"):
        schedules.check("* * * * *", "America", "latest")
    with pytest.raises(DefinitionError, match="at most 80"):
        schedules.new("x" * 81, "report", "* * * * *", now=0.0)


def test_catching_up_after_a_week_down_is_quick() -> None:
    import time

    schedule = schedules.new(
        "s", "report", "* * * * * *", catch_up="all", now=at("2026-11-01T00:00:00")
    )
    began = time.perf_counter()
    ticks, moved = schedules.due(schedule, at("2026-11-08T00:00:00"))
    assert time.perf_counter() - began < 0.5
    assert len(ticks) == schedules.MAX_CATCH_UP
    assert ticks == sorted(set(ticks)) and ticks[-1] == at("2026-11-08T00:00:00")
    assert moved.next_at == at("2026-11-08T00:00:01")
