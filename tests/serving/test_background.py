"""Shutdown stops background tasks even when a cancellation is lost (Python 3.11 wait_for)."""

from __future__ import annotations

import asyncio
import time

import pytest

from dlpipe.serving.background import cancel_and_wait


def test_a_task_that_swallows_its_first_cancellation_is_cancelled_again() -> None:
    swallowed = 0

    async def follower() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                # What 3.11's wait_for does when its inner future finished at the same moment.
                swallowed += 1
                if swallowed > 1:
                    raise

    async def main() -> float:
        task = asyncio.get_running_loop().create_task(follower())
        await asyncio.sleep(0)
        started = time.perf_counter()
        await asyncio.wait_for(cancel_and_wait([task, None]), 5)
        assert task.cancelled()
        return time.perf_counter() - started

    assert asyncio.run(main()) < 1.0
    assert swallowed == 2


def test_followers_racing_wait_for_against_a_thread_always_stop() -> None:
    # The pattern of the model manager's follower: a plan read on a thread, under wait_for.
    async def follow() -> None:
        while True:
            read = asyncio.ensure_future(asyncio.to_thread(time.sleep, 0.001))
            await asyncio.wait_for(asyncio.shield(read), 5)
            await asyncio.sleep(0.002)

    async def main() -> None:
        for i in range(60):
            task = asyncio.get_running_loop().create_task(follow())
            await asyncio.sleep(0.0003 * (i % 11))
            await asyncio.wait_for(cancel_and_wait([task]), 5)
            assert task.done()

    asyncio.run(main())


def test_an_error_a_task_ended_with_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    async def broken() -> None:
        raise RuntimeError("store gone")

    async def main() -> None:
        task = asyncio.get_running_loop().create_task(broken(), name="heartbeat")
        await asyncio.sleep(0)
        await cancel_and_wait([task])

    asyncio.run(main())
    assert "heartbeat ended with RuntimeError('store gone')" in caplog.text
