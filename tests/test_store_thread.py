"""The store's thread: small work runs on the loop's thread only while the store's is idle."""

from __future__ import annotations

import asyncio
import threading

import pytest

from hms_mgmt.store.thread import StoreThread


async def test_inline_work_runs_on_the_loop_thread_when_the_store_thread_is_idle() -> None:
    thread = StoreThread()
    try:
        here = threading.get_ident()
        assert await thread.run(threading.get_ident) != here
        assert await thread.run(threading.get_ident, inline=True) == here
    finally:
        thread.stop()


async def test_inline_work_waits_its_turn_behind_work_on_the_store_thread() -> None:
    thread = StoreThread()
    release = threading.Event()
    order: list[str] = []

    def slow() -> int:
        assert release.wait(10)
        order.append("slow")
        return threading.get_ident()

    def small() -> int:
        order.append("small")
        return threading.get_ident()

    try:
        first = asyncio.ensure_future(thread.run(slow))
        await asyncio.sleep(0)  # submitted: the store's thread is busy with it
        assert not thread.idle
        second = asyncio.ensure_future(thread.run(small, inline=True))
        await asyncio.sleep(0.05)
        assert order == []  # not run beside the slow piece, on the loop's thread
        release.set()
        ran_on = await asyncio.wait_for(second, 10)
        assert order == ["slow", "small"]
        assert ran_on == await first  # both on the store's thread, in order
        assert ran_on != threading.get_ident()
        assert thread.idle
    finally:
        release.set()
        thread.stop()


async def test_an_inline_error_is_raised_to_the_caller() -> None:
    thread = StoreThread()

    def fails() -> None:
        raise ValueError("no")

    try:
        with pytest.raises(ValueError, match="no"):
            await thread.run(fails, inline=True)
        assert thread.idle
        assert await thread.run(lambda: 1) == 1  # the thread still serves
    finally:
        thread.stop()
