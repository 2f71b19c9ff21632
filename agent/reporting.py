"""Delivering a run's outcome to the API, through outages.

An outcome is never dropped because the API was down: reads and final-state proposals are
retried with capped, jittered backoff until the API answers. Only a definite answer from the
server about the request itself (`ApiError`: a 4xx such as 404 for a deleted run) ends the
attempt, and it is logged with the run's id. Refused credentials and malformed bodies (a proxy's
error page while the server restarts) are retried like an outage: giving up would leave a run
whose process has exited RUNNING for good.

When one delivery gets through, the others waiting in backoff retry at once (the API is back);
`api_answered()` lets a caller who learned that elsewhere (a successful poll) say so too.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from uuid import UUID

from agent import states
from agent.api import ApiError, CredentialsRefused, PrefectApiError, PrefectClient
from agent.backoff import Backoff
from agent.schemas import FlowRun, StateType

log = logging.getLogger("agent.reporting")

FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0

T = TypeVar("T")


class Reporter:
    def __init__(
        self,
        client: PrefectClient,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        max_backoff: float = MAX_BACKOFF,
    ) -> None:
        self._client = client
        self._sleep = sleep
        self._backoff = Backoff(FIRST_BACKOFF, max_backoff)
        self._answered = asyncio.Event()

    def api_answered(self) -> None:
        """The API answered: wake every delivery waiting in backoff to retry now."""
        self._answered.set()
        # A fresh event for the next outage; the woken waiters hold the old one.
        self._answered = asyncio.Event()

    async def _wait(self, attempt: int) -> None:
        """The backoff after failed `attempt`, cut short when the API answers elsewhere."""
        answered = asyncio.ensure_future(self._answered.wait())
        slept = asyncio.ensure_future(self._sleep(self._backoff.delay(attempt)))
        try:
            await asyncio.wait({answered, slept}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (answered, slept):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _until_answered(
        self, call: Callable[[], Awaitable[T]], what: str, flow_run_id: UUID, *, retry: bool
    ) -> T | None:
        """`call()` until the API answers; None on a definite 4xx (or any failure without
        `retry`)."""
        context = {"flow_run_id": str(flow_run_id)}
        attempt = 0
        while True:
            attempt += 1
            try:
                result = await call()
            except ApiError as exc:
                # A definite answer (gone, refused): retrying would not change it.
                log.warning("could not %s: %s", what, exc, extra=context)
                return None
            except PrefectApiError as exc:
                if not retry:
                    log.warning("could not %s: %s", what, exc, extra=context)
                    return None
                log.log(
                    logging.ERROR if isinstance(exc, CredentialsRefused) else logging.WARNING,
                    "could not %s, retrying in ~%.0fs: %s",
                    what,
                    self._backoff.step(attempt),
                    exc,
                    extra=context,
                )
            else:
                self.api_answered()
                return result
            await self._wait(attempt)

    async def read_run(self, flow_run_id: UUID, *, retry: bool) -> FlowRun | None:
        """The run as the server has it; None when it cannot be read (or, without `retry`,
        not at once)."""
        return await self._until_answered(
            lambda: self._client.read_flow_run(flow_run_id),
            f"read run {flow_run_id}",
            flow_run_id,
            retry=retry,
        )

    async def propose(self, flow_run_id: UUID, state: dict[str, Any], *, force: bool) -> str | None:
        """Propose a state until the server decides; returns the decision (ACCEPT, ...).

        The state's transition id stays the same across retries, so a proposal that reached
        the server before its answer was lost is not applied twice.
        """
        context = {"flow_run_id": str(flow_run_id)}
        while True:
            result = await self._until_answered(
                lambda: self._client.set_flow_run_state(flow_run_id, state, force=force),
                f"set {state['type']} on run {flow_run_id}",
                flow_run_id,
                retry=True,
            )
            if result is None:
                return None
            if result.status == "WAIT":
                await self._sleep(float(result.details.delay_seconds or 1.0))
                continue
            reason = f" ({result.details.reason})" if result.details.reason else ""
            log.info("proposed %s: %s%s", state["type"], result.status, reason, extra=context)
            return str(result.status)

    async def crash_if_running(
        self, flow_run_id: UUID, message: str, *, replace_crashed: bool = False
    ) -> CrashReport:
        """Mark the run Crashed with `message` if its process ended while it was still in
        flight (states.left_in_flight); a final, suspended or rescheduled run is left alone.

        With `replace_crashed`, an engine-reported Crashed ("aborted by a termination signal")
        is replaced by ours, which names the limit that killed the run.
        """
        context = {"flow_run_id": str(flow_run_id)}
        current = await self.read_run(flow_run_id, retry=True)
        if current is None:
            return CrashReport(CrashOutcome.UNKNOWN, None)
        state = current.state
        replace = replace_crashed and state is not None and state.type is StateType.CRASHED
        if not replace and not states.left_in_flight(current):
            log.info(
                "run %s is %s; nothing to add",
                flow_run_id,
                states.describe(state),
                extra=context,
            )
            return CrashReport(CrashOutcome.LEFT_ALONE, current.state_type)
        decision = await self.propose(flow_run_id, states.crashed_state(message), force=replace)
        if decision != "ACCEPT":
            return CrashReport(CrashOutcome.UNKNOWN, current.state_type)
        outcome = CrashOutcome.REPLACED if replace else CrashOutcome.CRASHED
        return CrashReport(outcome, StateType.CRASHED)


class CrashOutcome(enum.Enum):
    """What `crash_if_running` did; only CRASHED means the agent put the run into CRASHED (and
    so owns its on_crashed hooks)."""

    CRASHED = "crashed"
    REPLACED = "replaced"  # the engine's own Crashed, with our message that names a limit
    LEFT_ALONE = "left-alone"  # final, suspended or rescheduled: not ours to change
    UNKNOWN = "unknown"  # the run could not be read or the proposal was refused


@dataclass(frozen=True)
class CrashReport:
    outcome: CrashOutcome
    state_type: StateType | None  # the run's state type as last seen
