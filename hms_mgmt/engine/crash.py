"""A test-only hook that kills the engine hard at a chosen point, to prove recovery.

``HMS_TEST_CRASH_AT=<point>[:<n>]`` makes the process exit at once (``os._exit``,
no clean-up, like ``kill -9``) the n-th time (default: the first) it passes
``<point>``: ``after_commit``, ``after_publish`` (sent, confirm not yet in),
``after_confirm`` (confirmed, outbox row not yet deleted) or ``after_ack``.
Unset, it costs one string comparison per point.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

EXIT_CODE = 70


class CrashPoints:
    def __init__(self, spec: str | None = None) -> None:
        spec = os.environ.get("HMS_TEST_CRASH_AT", "") if spec is None else spec
        point, _, count = spec.partition(":")
        self.point = point
        self.at = int(count) if count else 1
        self.passed = 0

    def due(self, point: str) -> bool:
        """Count a pass of ``point``; True if this is the pass to crash on."""
        if point != self.point:
            return False
        self.passed += 1
        return self.passed == self.at

    def crash(self, point: str) -> NoReturn:
        print(f"HMS_TEST_CRASH_AT: exiting hard at {point} #{self.at}", file=sys.stderr, flush=True)
        os._exit(EXIT_CODE)

    def __call__(self, point: str) -> None:
        if self.due(point):
            self.crash(point)
