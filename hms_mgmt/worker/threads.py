"""Plain-function handlers run in threads: the worker's pool, and what becomes of a thread
whose step timed out (it cannot be stopped: it is abandoned, counted, and replaced)."""

from __future__ import annotations

import concurrent.futures
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from hms_mgmt.context import Handler, StepContext

THREAD_PREFIX = "hms-handler"  # the names of the threads that run plain-function handlers


class HandlerThreads(ThreadPoolExecutor):
    """The threads that run plain-function handlers: ``size`` of them for handlers in time.

    A thread cannot be stopped. A handler still running in one when its step's deadline
    passes is abandoned (:meth:`abandon`): it runs on until the function returns, counted
    in :attr:`running_past_timeout`, and meanwhile the pool may start one more thread in
    its place, so that handlers in time always have ``size`` threads. (This raises
    ``ThreadPoolExecutor._max_workers``, which the executor reads at each ``submit``.)
    """

    def __init__(self, size: int) -> None:
        super().__init__(max_workers=size, thread_name_prefix=THREAD_PREFIX)
        self.size = size
        self.abandoned = 0  # ever
        self.running_past_timeout = 0  # abandoned and not returned yet
        self._counts = threading.Lock()

    def abandon(self, future: concurrent.futures.Future[Any]) -> bool:
        """Give up on a call; False if it has finished (or had not started) after all."""
        with self._counts:
            if future.done() or future.cancel():
                return False
            self.abandoned += 1
            self.running_past_timeout += 1
            self._max_workers += 1
        future.add_done_callback(self._returned)  # in its thread, or here if it just returned
        return True

    def _returned(self, _future: concurrent.futures.Future[Any]) -> None:
        with self._counts:
            self.running_past_timeout -= 1
            self._max_workers -= 1


class ThreadRun:
    """One call of a plain-function handler in a pool thread, and the thread it runs in."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.thread_id: int | None = None
        self.future: concurrent.futures.Future[Any] | None = None

    def __call__(self, ctx: StepContext) -> Any:
        self.thread_id = threading.get_ident()
        return self.handler(ctx)


@dataclass
class Deadline:
    """When a step with a timeout must have finished, on the loop's clock."""

    timeout: float
    at: float
    heartbeats: int = 0

    def heartbeat(self, now: float) -> None:
        self.at = now + self.timeout
        self.heartbeats += 1


def thread_stack(thread_id: int | None) -> str:
    """Where a handler thread is: its stack from the handler in, innermost last."""
    frame = sys._current_frames().get(thread_id or -1)
    if frame is None:
        return ""
    stack = traceback.extract_stack(frame)
    for index, entry in enumerate(stack):
        if entry.name == "__call__" and entry.filename == __file__:
            stack = traceback.StackSummary.from_list(stack[index + 1 :])
            break
    return "".join(stack.format())


def handler_threads_running(grace: float) -> list[threading.Thread]:
    """The handler threads still running after up to ``grace`` seconds (idle ones end)."""
    until = time.monotonic() + grace
    threads = [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]
    for thread in threads:
        thread.join(max(0.0, until - time.monotonic()))
    return [thread for thread in threads if thread.is_alive()]
