"""Fault injection for the chaos suite: an object the daemons are given, doing nothing by default.

The engine passes points of its ``_process`` and its relay (``after_commit``,
``after_publish``, ``after_confirm``, ``after_ack``) to :meth:`Faults.reached`; the step
service asks :attr:`Faults.outcome_copies` how many times to send each outcome message. In
production these are the no-op :class:`Faults`; only the daemons' ``__main__`` build the
test ones, from ``HMS_TEST_CRASH_AT=<point>[:<n>]`` and ``HMS_TEST_DUPLICATE_OUTCOMES=<n>``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

CRASH_EXIT_CODE = 70


class Faults:
    """No faults: every hook does nothing."""

    outcome_copies = 1

    def due(self, point: str) -> bool:
        """Whether to fail at ``point`` now (counted); never, here."""
        return False

    def reached(self, point: str) -> None:
        """Fail here if this is the point and pass to fail at."""

    def crash(self, point: str) -> None:
        """Fail now: only the test faults do anything."""


class InjectedFaults(Faults):
    """Exit at once (``os._exit``, no clean-up, like ``kill -9``) the n-th time a point is passed."""

    def __init__(self, crash_at: str = "", outcome_copies: int = 1) -> None:
        point, _, count = crash_at.partition(":")
        self.point = point
        self.at = int(count) if count else 1
        self.passed = 0
        self.outcome_copies = outcome_copies

    def due(self, point: str) -> bool:
        if point != self.point:
            return False
        self.passed += 1
        return self.passed == self.at

    def reached(self, point: str) -> None:
        if self.due(point):
            self.crash(point)

    def crash(self, point: str) -> None:
        print(f"HMS_TEST_CRASH_AT: exiting hard at {point} #{self.at}", file=sys.stderr, flush=True)
        os._exit(CRASH_EXIT_CODE)


def from_env(env: Mapping[str, str] | None = None) -> Faults:
    """The faults the environment asks for (the chaos suite's), else none."""
    env = os.environ if env is None else env
    crash_at = env.get("HMS_TEST_CRASH_AT", "")
    copies = int(env.get("HMS_TEST_DUPLICATE_OUTCOMES", "1") or "1")
    if not crash_at and copies == 1:
        return Faults()
    return InjectedFaults(crash_at, copies)
