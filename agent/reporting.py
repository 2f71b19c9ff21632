"""Delivering a run's outcome to the API, through outages.

An outcome is never dropped because the API was down: reads and final-state proposals are
retried with capped, jittered backoff until the API answers. Only a definite refusal from the
server (a 4xx other than auth) ends the attempt, and it is logged with the run's id.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

from agent import states
from agent.api import ApiUnavailable, PrefectApiError, PrefectClient
from agent.schemas import FlowRun, StateType

log = logging.getLogger("agent.reporting")

MAX_BACKOFF = 30.0


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
        self._max_backoff = max_backoff

    async def _backoff(self, delay: float) -> float:
        await self._sleep(delay * random.uniform(0.7, 1.3))
        return min(delay * 2, self._max_backoff)

    async def read_run(self, flow_run_id: UUID, *, retry: bool) -> FlowRun | None:
        delay = 1.0
        while True:
            try:
                return await self._client.read_flow_run(flow_run_id)
            except ApiUnavailable as exc:
                if not retry:
                    log.warning(
                        "could not read run %s: %s",
                        flow_run_id,
                        exc,
                        extra={"flow_run_id": str(flow_run_id)},
                    )
                    return None
                log.warning(
                    "API unreachable, retrying the read of run %s in ~%.0fs",
                    flow_run_id,
                    delay,
                    extra={"flow_run_id": str(flow_run_id)},
                )
            except PrefectApiError as exc:
                # A definite answer (gone, refused): retrying would not change it.
                log.warning(
                    "could not read run %s: %s",
                    flow_run_id,
                    exc,
                    extra={"flow_run_id": str(flow_run_id)},
                )
                return None
            delay = await self._backoff(delay)

    async def propose(self, flow_run_id: UUID, state: dict[str, Any], *, force: bool) -> str | None:
        """Propose a state until the server decides; returns the decision (ACCEPT, ...)."""
        delay = 1.0
        context = {"flow_run_id": str(flow_run_id)}
        while True:
            try:
                result = await self._client.set_flow_run_state(flow_run_id, state, force=force)
            except ApiUnavailable as exc:
                log.warning(
                    "API unreachable, will retry setting %s: %s", state["type"], exc, extra=context
                )
            except PrefectApiError as exc:
                log.error(
                    "could not set %s on run %s: %s", state["type"], flow_run_id, exc, extra=context
                )
                return None
            else:
                if result.status == "WAIT":
                    await self._sleep(float(result.details.delay_seconds or 1.0))
                    continue
                reason = f" ({result.details.reason})" if result.details.reason else ""
                log.info("proposed %s: %s%s", state["type"], result.status, reason, extra=context)
                return str(result.status)
            delay = await self._backoff(delay)

    async def crash_unless_final(
        self, flow_run_id: UUID, message: str, *, replace_crashed: bool = False
    ) -> None:
        """Mark the run Crashed with `message` unless the engine already reported a final state.

        With `replace_crashed`, an engine-reported Crashed ("aborted by a termination signal")
        is replaced by ours, which names the limit that killed the run.
        """
        current = await self.read_run(flow_run_id, retry=True)
        if current is None:
            return
        state = current.state
        replace = replace_crashed and state is not None and state.type is StateType.CRASHED
        if state is not None and state.type.is_final and not replace:
            log.info(
                "run %s is %s; nothing to add",
                flow_run_id,
                state.type.value,
                extra={"flow_run_id": str(flow_run_id)},
            )
            return
        await self.propose(flow_run_id, states.crashed_state(message), force=replace)
