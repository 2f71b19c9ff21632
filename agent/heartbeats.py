"""Heartbeats mirrored to Prefect's event API.

- Per run: `prefect.flow-run.heartbeat`, which Prefect's documented zombie-run automation
  watches. An engine that can (Prefect 3.6.14+: engines.EngineInfo.engine_heartbeats) sends
  them itself, given `PREFECT_FLOWS_HEARTBEAT_FREQUENCY`: they go on while the agent is stopped
  or restarting, and stop at the run's final state. For older engines the agent sends them,
  shaped like the engine's, every `heartbeat_interval`, and never for a run it has seen final.
- Per agent: `runner-agent.heartbeat`, sent from the same liveness tick that pings the systemd
  watchdog (`on_tick`), so one heartbeat is mirrored to both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Mapping
from uuid import UUID

from agent import __version__, events
from agent.emitter import EventEmitter
from agent.notify import Liveness
from agent.outcomes import Phase, RunOutcomes
from agent.reporting import Reporter
from agent.settings import Settings

log = logging.getLogger("agent.heartbeats")


class Heartbeats:
    def __init__(
        self,
        *,
        emitter: EventEmitter,
        settings: Callable[[], Settings],
        supervisors: Callable[[], Mapping[UUID, RunOutcomes]],
        flow_names: Callable[[], Mapping[UUID, str]],
        launcher_name: str,
        liveness: Liveness,
        reporter: Reporter,
    ) -> None:
        self._emitter = emitter
        self._settings = settings
        self._supervisors = supervisors
        self._flow_names = flow_names
        self._launcher_name = launcher_name
        self._liveness = liveness
        self._reporter = reporter
        self._host = socket.gethostname()

    def running(self) -> list[RunOutcomes]:
        return [s for s in self._supervisors().values() if s.phase is Phase.RUNNING]

    def beating_for(self) -> list[RunOutcomes]:
        """The running runs whose engine does not send its own heartbeats."""
        return [s for s in self.running() if not s.engine_sends_heartbeats]

    async def agent_tick(self) -> None:
        """Called by the watchdog loop after each ping."""
        settings = self._settings()
        self._emitter.emit(
            events.agent_heartbeat(
                agent_name=settings.agent.name,
                host=self._host,
                version=__version__,
                limit=settings.agent.limit,
                running=len(self.running()),
                launcher=self._launcher_name,
            )
        )

    async def emit_run_heartbeats(self) -> int:
        flow_names = self._flow_names()
        count = 0
        for supervisor in self.beating_for():
            # The run's state first: a run that is final gets no more heartbeats, even while
            # its process is still on its way out.
            current = await self._reporter.read_run(supervisor.id, retry=False)
            if current is None or (current.state_type and current.state_type.is_final):
                continue
            if supervisor.phase is not Phase.RUNNING:
                continue
            flow_run = current
            self._emitter.emit(
                events.flow_run_heartbeat(
                    flow_run_id=supervisor.id,
                    flow_run_name=flow_run.name,
                    flow_id=flow_run.flow_id,
                    flow_name=flow_names.get(flow_run.flow_id) if flow_run.flow_id else None,
                    deployment_id=flow_run.deployment_id,
                    tags=flow_run.tags,
                )
            )
            count += 1
        return count

    def emit_cancelled(self, supervisor: RunOutcomes) -> None:
        flow_run = supervisor.flow_run
        deployment = supervisor.deployment
        self._emitter.emit(
            events.cancelled_flow_run(
                agent_name=self._settings().agent.name,
                flow_run_id=supervisor.id,
                flow_run_name=flow_run.name if flow_run else None,
                flow_id=flow_run.flow_id if flow_run else None,
                flow_name=self._flow_names().get(flow_run.flow_id)
                if flow_run and flow_run.flow_id
                else None,
                deployment_id=flow_run.deployment_id if flow_run else None,
                deployment_name=supervisor.deployment_name,
                tags=flow_run.tags if flow_run else (),
                deployment_tags=deployment.tags if deployment else (),
            )
        )

    async def run(self) -> None:
        interval = self._settings().agent.heartbeat_interval
        self._liveness.register("heartbeats", interval * 3 + 10)
        try:
            while True:
                interval = self._settings().agent.heartbeat_interval
                # Reads for old engines' runs must not stall the loop through an outage.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await self.emit_run_heartbeats()
                self._liveness.progress("heartbeats")
                interval = self._settings().agent.heartbeat_interval
                await asyncio.sleep(interval)
        finally:
            self._liveness.unregister("heartbeats")
