"""Heartbeats mirrored to Prefect's event API.

- Per run: `prefect.flow-run.heartbeat` every `heartbeat_interval` for each running run, shaped
  like the engine's own, so Prefect's documented zombie-run automation works unchanged.
- Per agent: `runner-agent.heartbeat`, sent from the same liveness tick that pings the systemd
  watchdog (`on_tick`), so one heartbeat is mirrored to both.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Mapping
from uuid import UUID

from agent import __version__, events
from agent.emitter import EventEmitter
from agent.notify import Liveness
from agent.settings import Settings
from agent.supervisor import Phase, Supervisor

log = logging.getLogger("agent.heartbeats")


class Heartbeats:
    def __init__(
        self,
        *,
        emitter: EventEmitter,
        settings: Callable[[], Settings],
        supervisors: Callable[[], Mapping[UUID, Supervisor]],
        flow_names: Callable[[], Mapping[UUID, str]],
        launcher_name: str,
        liveness: Liveness,
    ) -> None:
        self._emitter = emitter
        self._settings = settings
        self._supervisors = supervisors
        self._flow_names = flow_names
        self._launcher_name = launcher_name
        self._liveness = liveness
        self._host = socket.gethostname()

    def running(self) -> list[Supervisor]:
        return [s for s in self._supervisors().values() if s.phase is Phase.RUNNING]

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

    def emit_run_heartbeats(self) -> int:
        flow_names = self._flow_names()
        count = 0
        for supervisor in self.running():
            flow_run = supervisor.flow_run
            self._emitter.emit(
                events.flow_run_heartbeat(
                    flow_run_id=supervisor.id,
                    flow_run_name=flow_run.name if flow_run else None,
                    flow_id=flow_run.flow_id if flow_run else None,
                    flow_name=flow_names.get(flow_run.flow_id)
                    if flow_run and flow_run.flow_id
                    else None,
                    deployment_id=flow_run.deployment_id if flow_run else None,
                    tags=flow_run.tags if flow_run else (),
                )
            )
            count += 1
        return count

    def emit_cancelled(self, supervisor: Supervisor) -> None:
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
                self.emit_run_heartbeats()
                self._liveness.progress("heartbeats")
                interval = self._settings().agent.heartbeat_interval
                await asyncio.sleep(interval)
        finally:
            self._liveness.unregister("heartbeats")
