"""The Handoff queue between a trio task and a worker thread: order, bounds, end, errors, abort."""

from __future__ import annotations

import threading

import pytest
import trio

from checks import busy_threads
from trio_composefs.importer._handoff import Handoff, HandoffClosed


@pytest.mark.parametrize("slots", [1, 3])
async def test_thread_to_trio_in_order_and_bounded(slots: int) -> None:
    queue = Handoff[int](slots)
    most = 0

    def produce() -> None:
        for i in range(2000):
            queue.put_blocking(i)
        queue.close_blocking()

    got = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, produce)
        while (item := await queue.get()) is not None:
            most = max(most, len(queue._items))
            got.append(item)
    assert got == list(range(2000))
    assert most <= slots


async def test_trio_to_thread_with_an_error_after_the_items() -> None:
    queue = Handoff[bytes](2)
    got: list[bytes] = []

    def consume() -> None:
        while (item := queue.get_blocking()) is not None:
            got.append(item)

    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def run() -> None:
            with pytest.raises(ValueError, match="source failed"):
                await trio.to_thread.run_sync(consume)
            done.set()

        nursery.start_soon(run)
        for i in range(50):
            await queue.put(bytes([i]))
        queue.close(ValueError("source failed"))
        await done.wait()
    assert got == [bytes([i]) for i in range(50)]


@pytest.mark.parametrize("blocked_in", ["put", "get"])
async def test_abort_wakes_a_blocked_thread(blocked_in: str) -> None:
    queue = Handoff[int](1)
    waiting = threading.Event()

    def work() -> str:
        try:
            if blocked_in == "put":
                queue.put_blocking(1)
                waiting.set()
                queue.put_blocking(2)  # full: blocks
            else:
                waiting.set()
                queue.get_blocking()  # empty: blocks
        except HandoffClosed:
            return "closed"
        return "returned"

    result: list[str] = []

    async def run() -> None:
        result.append(await trio.to_thread.run_sync(work))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await trio.to_thread.run_sync(waiting.wait)
        await trio.sleep(0.05)
        queue.abort()
    assert result == ["closed"]
    assert busy_threads() == []


async def test_trio_side_waits_are_cancellable() -> None:
    queue = Handoff[int](1)
    with trio.move_on_after(0.05) as scope:
        await queue.get()
    assert scope.cancelled_caught
    await queue.put(1)
    with trio.move_on_after(0.05) as scope:
        await queue.put(2)
    assert scope.cancelled_caught
    assert await queue.get() == 1
