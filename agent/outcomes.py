"""How one run's story ends: the state the agent reports after the run's process ended, the
hooks it runs, and the records and workspace it lets go. The base of `Supervisor`.

The rules (docs/runs.md has the full table):
- the engine reported the attempt's outcome itself (an outcome receipt on the control channel,
  or a final/suspended/rescheduled state on the server): the agent adds nothing;
- the process ended with the run still in flight (PENDING, RUNNING, or an in-process retry
  whose engine is gone): CRASHED with a message that names the cause, and the flow's
  `on_crashed` hooks, which the engine could not run;
- a cancellation: the flow's `on_cancellation` hooks, then CANCELLED, then the
  `prefect.runner.cancelled-flow-run` event once CANCELLED is durable.
Each hook kind runs at most once per run, also across agent restarts (the record notes it).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from uuid import UUID

from agent import states
from agent.api import PrefectClient
from agent.control import ControlChannel, EngineReceipt
from agent.engines import EngineInfo, Engines
from agent.failpoints import Failpoints
from agent.flowlogs import FlowRunLogs
from agent.hooks import HookKind, HookResult, HookRunner
from agent.jobvars import (
    POOL_ORIGIN,
    JobVariablesError,
    Layer,
    apply_job_variables,
    recorded_layers,
    take_working_dir,
)
from agent.launch.base import Launcher, LaunchRequest, RunHandle
from agent.launch.systemd import unit_name
from agent.pools import PoolRun
from agent.records import RecordError, RunRecord, RunRecords
from agent.reporting import CrashOutcome, Reporter
from agent.schemas import FlowRun, StateType
from agent.settings import DeploymentSettings, FlowRunSettings, Settings
from agent.workspace import Workspace, Workspaces

if TYPE_CHECKING:
    from agent.control import Conclusion

log = logging.getLogger("agent.supervisor")


class Phase(enum.Enum):
    WAITING = "waiting"  # before the scheduled start; nothing claimed yet
    CLAIMING = "claiming"
    LAUNCHING = "launching"
    RUNNING = "running"
    REPORTING = "reporting"
    DONE = "done"


@dataclass
class RunContext:
    """What every supervisor needs; built by the runner and passed in."""

    settings: Settings
    client: PrefectClient
    launcher: Launcher
    flow_logs: FlowRunLogs
    records: RunRecords
    reporter: Reporter
    workspaces: Workspaces
    engines: Engines
    hooks: HookRunner
    control: ControlChannel | None = None
    on_cancelled: Callable[[RunOutcomes], None] | None = None
    clock: Callable[[], float] = time.time
    # Test-only crash points (failpoints.py); none armed unless the daemon was told to.
    failpoints: Failpoints = field(default_factory=Failpoints)


class RunOutcomes:
    """One run's shared state, and the end of its story."""

    def __init__(
        self,
        ctx: RunContext,
        flow_run_id: UUID,
        deployment: DeploymentSettings | None,
        *,
        deployment_name: str = "",
        flow_run: FlowRun | None = None,
    ) -> None:
        self.ctx = ctx
        self.id = flow_run_id
        self.flow_run = flow_run
        # None only for a recovered run whose deployment has left the config.
        self.deployment = deployment
        # `deployment_key` (FLOW/NAME, or a bare name in records of older versions) identifies
        # the deployment in records and logs; `deployment_name` is Prefect's bare name.
        self.deployment_key = deployment.key if deployment is not None else deployment_name
        self.deployment_name = self.deployment_key.rpartition("/")[2]
        # The host's settings for this deployment; job variables are applied over them at launch.
        self.base_settings: FlowRunSettings = (
            deployment.flow_run_settings(ctx.settings.flow_run)
            if deployment is not None
            else ctx.settings.flow_run
        )
        self.flow_run_settings = self.base_settings
        # A work pool's run: its deployment as the server has it, and the job-variable layers.
        self.pool_run: PoolRun | None = None
        # The directory the run starts in, when a job variable sets it (work pools).
        self.working_dir: Path | None = None
        self.phase = Phase.WAITING
        self.started_at: float | None = None
        self.handle: RunHandle | None = None
        self.workspace: Workspace | None = None
        self.engine: EngineInfo | None = None
        self.request: LaunchRequest | None = None  # as launched; hooks start from it
        self.conclusion: Conclusion | None = None  # what the engine said on the control channel
        self._cancel_requested = asyncio.Event()
        self._cancel_started: float | None = None
        self._cancel_settled = False
        self.unit = unit_name(flow_run_id)
        self.record = RunRecord(
            flow_run_id=str(flow_run_id), deployment=self.deployment_key, phase="new"
        )
        self.log = logging.LoggerAdapter(
            log,
            {
                "flow_run_id": str(flow_run_id),
                "deployment": self.deployment_key,
                "unit": self.unit,
            },
        )

    @property
    def name(self) -> str:
        return self.flow_run.name if self.flow_run is not None else str(self.id)

    @property
    def engine_sends_heartbeats(self) -> bool:
        return self.engine is not None and self.engine.engine_heartbeats

    def apply_job_variables(self) -> FlowRunSettings:
        """The run's settings with the deployment's and the run's job variables, as far as the
        host allows them; raises JobVariablesError. The layers go into the record so that an
        agent restart rebuilds the same settings without the API."""
        pool = self.pool_run
        layers = {POOL_ORIGIN: dict(pool.pool_defaults)} if pool is not None else {}
        layers["deployment"] = dict(pool.deployment_job_variables) if pool is not None else {}
        layers["flow run"] = dict(self.flow_run.job_variables) if self.flow_run else {}
        self.flow_run_settings = self._merged(
            [Layer(origin, values) for origin, values in layers.items() if values], warn=True
        )
        ignored = pool.ignored if pool is not None else frozenset()
        applied = sorted({key for values in layers.values() for key in values} - ignored)
        if applied:
            self.record.extra = {**self.record.extra, "job_variables": layers}
            self.note(f"Job variables applied: {', '.join(applied)}")
        return self.flow_run_settings

    def restore_job_variables(self) -> None:
        """After a restart: the settings the run was launched with, from its record."""
        layers = recorded_layers(self.record.extra)
        if not layers:
            return
        try:
            self.flow_run_settings = self._merged(layers, warn=False)
        except JobVariablesError as exc:
            # The host's config changed since the launch; the run keeps going as it was.
            self.log.warning("cannot rebuild the run's job variables after a restart: %s", exc)

    def _merged(self, layers: list[Layer], *, warn: bool) -> FlowRunSettings:
        allowed = self.ctx.settings.agent.job_variables
        layers, self.working_dir, warnings = take_working_dir(layers, allowed=allowed)
        for warning in warnings if warn else ():
            self.note(warning, logging.WARNING)
        ignored = self.pool_run.ignored if self.pool_run is not None else frozenset()
        return apply_job_variables(self.base_settings, layers, allowed=allowed, ignored=ignored)

    def note(self, message: str, level: int = logging.INFO) -> None:
        """Log locally and mirror to the run's log view in the Prefect UI."""
        self.log.log(level, message)
        self.ctx.flow_logs.emit(self.id, message, level)

    def save(self, phase: str, **changes: object) -> None:
        """Make the record durable; raises RecordError (the disk is full, read-only, ...)."""
        self.record.phase = phase
        for key, value in changes.items():
            setattr(self.record, key, value)
        self.ctx.records.save(self.record)

    def save_after_the_fact(self, phase: str, **changes: object) -> None:
        """Record a step that has already happened. A failure is logged, not raised: the
        run's own records in its run directory (pid, exit status) let recovery tell the rest."""
        try:
            self.save(phase, **changes)
        except RecordError as exc:
            self.log.error("%s; carrying on with the run", exc)

    def mark_running(self) -> None:
        self.phase = Phase.RUNNING
        self.started_at = self.ctx.clock()

    # -- cancellation requests ------------------------------------------------------------------

    def request_cancel(self) -> None:
        """The run is CANCELLING on the server; stop it wherever it is in its life."""
        if self._cancel_requested.is_set():
            return
        self._cancel_started = self.ctx.clock()
        self.log.info("cancellation requested (phase %s)", self.phase.value)
        self._cancel_requested.set()
        if self.record.phase not in ("new", "claiming"):
            # A restarted agent must finish a cancellation, not report a crash.
            extra = {**self.record.extra, "cancel_requested": True}
            self.save_after_the_fact(self.record.phase, extra=extra)

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested.is_set()

    # -- the end ------------------------------------------------------------------------------

    async def report_exit(self, status: int | None, result: str | None) -> None:
        """The run's process has ended with `status` (None: it never started)."""
        self.phase = Phase.REPORTING
        if status is None:
            await self.ctx.reporter.propose(
                self.id, states.crashed_state(result or "the launch failed"), force=False
            )
            await self.finish()
            return
        if self.cancel_requested:
            await self.finish_cancellation(launched=True)
            return
        cause = states.explain_exit(
            status,
            result,
            memory_max=self.flow_run_settings.memory_max,
            runtime_max=self.flow_run_settings.runtime_max,
            command=self.flow_run_settings.python,
            # Scopes are collected at once, so their Result may be gone; the runtime tells.
            elapsed=self.ctx.clock() - self.started_at if self.started_at else None,
        )
        message = cause.message()
        code = self.workspace.working_dir if self.workspace is not None else None
        if status != 0 and code is not None and not code.is_dir():
            message += f"; the deployment's code directory {code} no longer exists"
        self.note(message, logging.INFO if status == 0 else logging.WARNING)
        if isinstance(self.conclusion, EngineReceipt) and not cause.limit_hit:
            # The engine reported the attempt's outcome itself: nothing to add.
            await self.finish()
            return
        # The engine reports a killed run as "aborted by a termination signal"; when one of our
        # limits did it, our message (which names the limit) replaces that.
        report = await self.ctx.reporter.crash_if_running(
            self.id, message, replace_crashed=cause.limit_hit
        )
        if report.outcome is CrashOutcome.CRASHED:
            await self.run_hooks(HookKind.CRASHED)
        elif report.state_type is StateType.CANCELLING:
            # Cancelled just as the process ended on its own: finish the cancellation.
            await self.finish_cancellation(launched=True)
            return
        await self.finish()

    async def finish_cancellation(self, *, launched: bool) -> None:
        """The run's process is gone (or never started): hooks, then CANCELLED and the event
        unless `settle_cancelled` did that already."""
        self.phase = Phase.REPORTING
        if launched:
            await self.run_hooks(HookKind.CANCELLATION)
        if not self._cancel_settled:
            await self.settle_cancelled(launched=launched)
        await self.finish()

    async def settle_cancelled(self, *, launched: bool) -> None:
        """CANCELLED, then the cancelled-run event once that is durable."""
        self._cancel_settled = True
        current = await self.ctx.reporter.read_run(self.id, retry=True)
        state = current.state if current is not None else None
        # A fallback kill makes the engine report Crashed; that is ours to replace. A run that
        # completed, failed or was cancelled before the kill landed keeps its state.
        if state is not None and state.type.is_final and state.type is not StateType.CRASHED:
            self.note(f"Run was already {state.type.value} when the cancellation finished")
            return
        decision = await self.ctx.reporter.propose(self.id, states.cancelled_state(), force=True)
        if decision != "ACCEPT":
            self.note(f"Could not mark the run CANCELLED (the server answered {decision})")
            return
        took = self.ctx.clock() - (self._cancel_started or self.ctx.clock())
        self.note(
            f"Cancelled the flow run ({'stopped' if launched else 'never launched'}; "
            f"{took:.2f}s after the request)"
        )
        # Only once CANCELLED is durable: automations act on this event.
        if self.ctx.on_cancelled is not None:
            self.ctx.on_cancelled(self)

    async def run_hooks(self, kind: HookKind) -> None:
        """The flow's hooks of `kind`, at most once per run (the record says if they started)."""
        started = list(self.record.extra.get("hooks_started") or [])
        if kind.value in started:
            self.log.info("on_%s hooks already started before a restart; not again", kind.value)
            return
        request = self.request or self.rebuild_request()
        if request is None:
            self.note(f"Cannot run the flow's on_{kind.value} hooks: the deployment is gone")
            return
        if self.engine is not None and self.engine.version is None:
            # Without Prefect in the flow's venv there is no flow to load and no hook to run.
            self.log.info("no on_%s hooks: %s", kind.value, self.engine.describe())
            return
        self.save_after_the_fact(
            self.record.phase, extra={**self.record.extra, "hooks_started": [*started, kind.value]}
        )
        # A pool run's flow is loaded as its engine loads it: from the deployment, through its
        # pull steps (Prefect's Runner does the same for its hooks).
        entrypoint = (
            self.deployment.entrypoint
            if self.deployment is not None and self.pool_run is None
            else None
        )
        outcome = await self.ctx.hooks.run(kind, request, entrypoint=entrypoint)
        if outcome.result is not HookResult.RAN:
            self.note(
                f"The flow's on_{kind.value} hooks did not complete: {outcome.detail}",
                logging.WARNING,
            )

    def rebuild_request(self) -> LaunchRequest | None:
        """The launch request of a run started by a previous agent process (for hooks)."""
        return None

    async def finish(self) -> None:
        """The outcome is delivered: release the workspace, then forget the run."""
        if self.workspace is not None:
            await self.ctx.workspaces.finish(self.workspace)
        self.ctx.records.remove(self.id)
        self.phase = Phase.DONE
