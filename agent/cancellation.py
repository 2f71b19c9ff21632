"""Noticing that one of this host's runs is CANCELLING, fast and without fail.

Two paths lead to `Supervisor.request_cancel()` (the supervisor does the killing):
- the events websocket: `prefect.flow-run.Cancelling` for a run we hold, within ~100 ms;
- polling `POST /flow_runs/filter` for our in-flight runs in CANCELLING: every
  `poll_interval` while the websocket is down, and every few intervals while it is up, as a
  safety net for events missed across a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any
from uuid import UUID

from agent.api import PrefectApiError, PrefectClient
from agent.notify import Liveness
from agent.schemas import StateType
from agent.supervisor import Phase, Supervisor

log = logging.getLogger("agent.cancellation")

CANCELLING_EVENT = "prefect.flow-run.Cancelling"
FLOW_RUN_PREFIX = "prefect.flow-run."
# While the websocket is healthy, the safety-net poll runs this many times less often.
CONNECTED_POLL_FACTOR = 6


def flow_run_id_of(event: Mapping[str, Any]) -> UUID | None:
    resource = event.get("resource")
    if not isinstance(resource, Mapping):
        return None
    resource_id = resource.get("prefect.resource.id")
    if not isinstance(resource_id, str) or not resource_id.startswith(FLOW_RUN_PREFIX):
        return None
    try:
        return UUID(resource_id.removeprefix(FLOW_RUN_PREFIX))
    except ValueError:
        return None


class CancellationWatcher:
    def __init__(
        self,
        *,
        client: PrefectClient,
        supervisors: Callable[[], Mapping[UUID, Supervisor]],
        poll_interval: Callable[[], float],
        websocket_connected: Callable[[], bool],
        liveness: Liveness,
    ) -> None:
        self._client = client
        self._supervisors = supervisors
        self._poll_interval = poll_interval
        self._websocket_connected = websocket_connected
        self._liveness = liveness
        self._wakeup = asyncio.Event()

    def on_event(self, event: Mapping[str, Any]) -> None:
        """Handler for `prefect.flow-run.Cancelling` from the events subscription."""
        flow_run_id = flow_run_id_of(event)
        if flow_run_id is None:
            return
        supervisor = self._supervisors().get(flow_run_id)
        if supervisor is not None:
            log.info(
                "cancellation event for run %s",
                flow_run_id,
                extra={"flow_run_id": str(flow_run_id)},
            )
            supervisor.request_cancel()

    def connection_changed(self) -> None:
        """The websocket went up or down: re-plan the polling cadence at once."""
        self._wakeup.set()

    async def run(self) -> None:
        stale_after = self._poll_interval() * CONNECTED_POLL_FACTOR * 2 + 60
        self._liveness.register("cancellation", stale_after)
        try:
            while True:
                try:
                    await self.poll_once()
                except Exception:
                    # A bug here must not end cancellations for good: log it, poll again.
                    log.exception("the cancellation poll failed")
                self._liveness.progress("cancellation")
                interval = self._poll_interval()
                if self._websocket_connected():
                    interval *= CONNECTED_POLL_FACTOR
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=interval)
                self._wakeup.clear()
        finally:
            self._liveness.unregister("cancellation")

    async def poll_once(self) -> None:
        in_flight = [
            flow_run_id
            for flow_run_id, supervisor in self._supervisors().items()
            if supervisor.phase is not Phase.WAITING and not supervisor.cancel_requested
        ]
        if not in_flight:
            return
        body = {
            "flow_runs": {
                "id": {"any_": [str(i) for i in in_flight]},
                "state": {"type": {"any_": ["CANCELLING"]}},
            },
            "limit": len(in_flight),
        }
        try:
            runs = await self._client.filter_flow_runs(body)
        except PrefectApiError as exc:
            log.warning("could not poll for cancellations: %s", exc)
            return
        supervisors = self._supervisors()
        for flow_run in runs:
            supervisor = supervisors.get(flow_run.id)
            if supervisor is not None and flow_run.state_type is not StateType.CANCELLING:
                # The filter asked for CANCELLING runs only; killing on a wrong answer is worse
                # than a missed poll (the next one, or the event, sees a real cancellation).
                log.warning(
                    "ignoring run %s in the cancellation poll's answer: it is %s, not CANCELLING",
                    flow_run.id,
                    flow_run.state_type.value if flow_run.state_type else "without a state",
                    extra={"flow_run_id": str(flow_run.id)},
                )
            elif supervisor is not None:
                log.info(
                    "run %s is CANCELLING (seen by polling)",
                    flow_run.id,
                    extra={"flow_run_id": str(flow_run.id)},
                )
                supervisor.request_cancel()
