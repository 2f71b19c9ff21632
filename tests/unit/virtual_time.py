"""An asyncio event loop on a virtual clock: timing logic tested without the wall clock.

`loop.time()` moves only when the loop has nothing ready to run: instead of waiting for its
next timer, it jumps to it. Callbacks keep their order, a sleep takes no real time, and a
busy machine changes nothing. Only for code that does all its work inside the loop: a thread
or a subprocess would see the clock race ahead of it.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class _JumpingSelector(selectors.DefaultSelector):
    """Answers ready I/O at once; otherwise moves the loop's clock by the wait asked for."""

    def __init__(self, loop: VirtualClockLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:  # no timer at all: only real I/O (a thread's wake-up) can come
            return super().select(None)
        self._loop.advance(timeout)
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        super().__init__(selector=_JumpingSelector(self))

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock now, running nothing: what a loop blocked for `seconds` would see."""
        self._now += seconds


def run_virtual(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a fresh VirtualClockLoop."""
    with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
        return runner.run(main)


def virtual_loop() -> VirtualClockLoop:
    """The running loop, which must be a VirtualClockLoop."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, VirtualClockLoop), loop
    return loop
