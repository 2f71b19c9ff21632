"""Failpoints: named places in a run's life where a test can make the agent die or stall.

The idea is etcd's gofail. `RUNNER_AGENT_FAILPOINTS=after-claim=kill,while-running=sleep:2`
in the agent's environment arms points; each `hit(name)` then does what its point was armed
with. Unset, every `hit` is a dictionary miss: nothing happens and nothing is logged. This is a
test-only mechanism (tests/integration/test_agent_kill.py); see docs/runs.md for the points.

`kill` sends SIGKILL to the agent's own process, which is exactly the crash recovery has to
survive: no finally blocks, no flushing, records left as they were.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

log = logging.getLogger("agent.failpoints")

VARIABLE = "RUNNER_AGENT_FAILPOINTS"

FailpointName = Literal[
    "after-claim",  # the claim (PENDING) was accepted; nothing launched yet
    "during-launch",  # the run's process was spawned; the record still says `launching`
    "while-running",  # the record says `running`
    "after-exit",  # the record says `exited`; the final state is not reported yet
]
NAMES: tuple[str, ...] = get_args(FailpointName)


class FailpointError(ValueError):
    """RUNNER_AGENT_FAILPOINTS does not parse; str() is one line naming the variable."""


@dataclass(frozen=True)
class Action:
    kind: Literal["kill", "sleep"]
    seconds: float = 0.0


def parse_action(text: str) -> Action:
    if text == "kill":
        return Action("kill")
    kind, sep, value = text.partition(":")
    if kind == "sleep" and sep:
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if math.isfinite(seconds) and seconds >= 0:
            return Action("sleep", seconds)
        raise ValueError(f"sleep needs a number of seconds >= 0, got {value!r}")
    raise ValueError(f"unknown action {text!r} (use kill or sleep:<seconds>)")


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Failpoints:
    """The armed points. `Failpoints()` arms none (the normal case)."""

    actions: Mapping[str, Action] = field(default_factory=dict)
    kill: Callable[[], None] = _kill_self
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Failpoints:
        """Raises FailpointError for an unknown point, an unknown action or a bad entry."""
        text = environ.get(VARIABLE, "").strip()
        actions: dict[str, Action] = {}
        for entry in filter(None, (part.strip() for part in text.split(","))):
            name, sep, action = (part.strip() for part in entry.partition("="))
            try:
                if not sep or not name or not action:
                    raise ValueError(f"entry {entry!r} is not <point>=<action>")
                if name not in NAMES:
                    raise ValueError(f"unknown point {name!r} (known: {', '.join(NAMES)})")
                if name in actions:
                    raise ValueError(f"point {name!r} is given twice")
                actions[name] = parse_action(action)
            except ValueError as exc:
                raise FailpointError(f"environment ({VARIABLE}): {exc}") from None
        return cls(actions)

    def __bool__(self) -> bool:
        return bool(self.actions)

    async def hit(self, name: FailpointName) -> None:
        action = self.actions.get(name)
        if action is None:
            return
        if action.kind == "kill":
            log.warning("failpoint %s: SIGKILL to the agent itself", name)
            self.kill()
            return
        log.warning("failpoint %s: sleeping %gs", name, action.seconds)
        await self.sleep(action.seconds)
