"""The virtual-clock event loop that timing tests run on (tests/unit/virtual_time.py)."""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.virtual_time import run_virtual, virtual_loop


def test_sleeps_move_the_clock_by_exactly_their_length() -> None:
    async def main() -> list[float]:
        loop = virtual_loop()
        start = loop.time()
        marks = []
        for seconds in (3600.0, 0.05, 0.0):
            await asyncio.sleep(seconds)
            marks.append(loop.time() - start)
        return marks

    assert run_virtual(main()) == pytest.approx([3600.0, 3600.05, 3600.05])


def test_timers_fire_in_order_of_their_time() -> None:
    fired: list[str] = []

    async def main() -> None:
        loop = virtual_loop()
        loop.call_later(0.3, fired.append, "c")
        loop.call_later(0.1, fired.append, "a")
        loop.call_later(0.2, fired.append, "b")
        await asyncio.sleep(0.25)
        fired.append("main")
        await asyncio.sleep(0.1)

    run_virtual(main())
    assert fired == ["a", "b", "main", "c"]


def test_advance_moves_the_clock_and_runs_nothing() -> None:
    fired: list[float] = []

    async def main() -> float:
        loop = virtual_loop()
        start = loop.time()
        loop.call_later(0.1, lambda: fired.append(loop.time() - start))
        loop.advance(1.0)  # as if the loop had been blocked for a second
        assert fired == []
        await asyncio.sleep(0)
        return loop.time() - start

    assert run_virtual(main()) == 1.0
    assert fired == [1.0]  # overdue, it runs at the first chance, late


def test_real_io_still_wakes_a_loop_without_timers() -> None:
    async def main() -> int:
        return await asyncio.to_thread(lambda: 42)

    assert run_virtual(main()) == 42
