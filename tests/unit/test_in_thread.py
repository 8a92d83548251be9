"""The asyncio coordinator's worker-thread calls: a result that arrives after the
awaiting task was cancelled is given back, never lost (a producer slot's ticket
taken by a thread while its task was being cancelled)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from coordinator._acoordinator import in_thread


def test_a_result_arriving_after_the_cancellation_is_undone() -> None:
    started, release = threading.Event(), threading.Event()
    undone: list[str] = []

    def take_a_slot() -> str:
        started.set()
        release.wait(10)
        return "ticket"

    async def main() -> None:
        with ThreadPoolExecutor(1) as threads:
            task = asyncio.create_task(in_thread(threads, take_a_slot, undone.append))
            await asyncio.to_thread(started.wait, 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert undone == []  # still running: nothing to give back yet
            release.set()
        assert undone == ["ticket"]  # the executor waited for the call to end

    asyncio.run(main())


def test_a_call_not_started_is_cancelled_and_never_runs() -> None:
    busy, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def block() -> None:
        busy.set()
        release.wait(10)

    async def main() -> None:
        with ThreadPoolExecutor(1) as threads:
            first = asyncio.create_task(in_thread(threads, block))
            await asyncio.to_thread(busy.wait, 10)
            queued = asyncio.create_task(in_thread(threads, lambda: ran.append("x"),
                                                   ran.append))
            await asyncio.sleep(0)
            queued.cancel()
            with pytest.raises(asyncio.CancelledError):
                await queued
            release.set()
            await first
        assert ran == []

    asyncio.run(main())


def test_an_awaited_result_is_not_undone() -> None:
    undone: list[int] = []

    async def main() -> int:
        with ThreadPoolExecutor(1) as threads:
            return await in_thread(threads, lambda: 42, undone.append)

    assert asyncio.run(main()) == 42
    assert undone == []
