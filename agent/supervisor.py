"""One flow run's life on this host: wait for its start time, claim, launch, wait, report.

A supervisor owns exactly one run. It writes a durable record (records.py) before every step
that changes the outside world, so that an agent that died at any point can finish the run's
story exactly once after a restart (`resume`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from uuid import UUID

from agent import states
from agent.api import PrefectApiError, PrefectClient
from agent.failpoints import Failpoints
from agent.flowlogs import FlowRunLogs
from agent.launch.base import Launcher, LaunchError, LaunchRequest, RunHandle
from agent.launch.systemd import unit_name
from agent.processes import process_create_time
from agent.records import RecordError, RunRecord, RunRecords
from agent.reporting import Reporter
from agent.schemas import FlowRun, StateType
from agent.settings import DeploymentSettings, Settings
from agent.storage import StorageError
from agent.values import format_duration
from agent.workspace import Workspace, Workspaces, engine_environment, limits_text

log = logging.getLogger("agent.supervisor")



class Phase(enum.Enum):
    WAITING = "waiting"  # before the scheduled start; nothing claimed yet
    CLAIMING = "claiming"
    LAUNCHING = "launching"
    RUNNING = "running"
    REPORTING = "reporting"
    DONE = "done"


CRITICAL_PHASES = frozenset({Phase.CLAIMING, Phase.LAUNCHING})


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
    on_cancelled: Callable[[Supervisor], None] | None = None
    clock: Callable[[], float] = time.time
    # Test-only crash points (failpoints.py); none armed unless the daemon was told to.
    failpoints: Failpoints = field(default_factory=Failpoints)


def claim_message(agent_name: str) -> str:
    return f"Claimed by runner-agent {agent_name!r}"


class Supervisor:
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
        self.deployment_name = deployment.name if deployment is not None else deployment_name
        self.flow_run_settings = (
            deployment.flow_run_settings(ctx.settings.flow_run)
            if deployment is not None
            else ctx.settings.flow_run
        )
        self.phase = Phase.WAITING
        self.started_at: float | None = None
        self.handle: RunHandle | None = None
        self.workspace: Workspace | None = None
        self._cancel_requested = asyncio.Event()
        self._cancel_started: float | None = None
        self.unit = unit_name(flow_run_id)
        self.record = RunRecord(
            flow_run_id=str(flow_run_id), deployment=self.deployment_name, phase="new"
        )
        self.log = logging.LoggerAdapter(
            log,
            {
                "flow_run_id": str(flow_run_id),
                "deployment": self.deployment_name,
                "unit": self.unit,
            },
        )

    @property
    def name(self) -> str:
        return self.flow_run.name if self.flow_run is not None else str(self.id)

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

    # -- a fresh run from the poller ----------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._wait_for_start()
            if await self._claim():
                if self._cancel_requested.is_set():
                    # Cancelled while we were claiming: never launch it.
                    await self._report_cancelled(launched=False)
                    return
                await self.launch_and_follow()
            else:
                self.ctx.records.remove(self.id)
        finally:
            self.phase = Phase.DONE

    async def _wait_for_start(self) -> None:
        assert self.flow_run is not None
        start = self.flow_run.next_scheduled_start_time or self.flow_run.expected_start_time
        if start is None:
            return
        delay = (start - datetime.now(UTC)).total_seconds()
        if delay > 0:
            # Prefetch is for getting ready; a run starts at its scheduled time, not before.
            self.log.debug("waiting %.1fs for the scheduled start", delay)
            # A cancellation wakes us early; the claim then sees CANCELLING and stops there.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._cancel_requested.wait(), timeout=delay)

    async def _claim(self) -> bool:
        """Propose PENDING; True when this agent won the run."""
        self.phase = Phase.CLAIMING
        current = await self.ctx.reporter.read_run(self.id, retry=False)
        if current is None:
            return False
        state_type = current.state.type if current.state else None
        if state_type in (StateType.CANCELLING, StateType.CANCELLED):
            if state_type is StateType.CANCELLING:
                await self.ctx.reporter.propose(self.id, states.cancelled_state(), force=True)
            self.log.info("run was cancelled before launch; not launching it")
            return False
        if state_type is not StateType.SCHEDULED:
            self.log.info("skipping run: it is %s, not SCHEDULED", state_type)
            return False
        if current.retrying_in_process:
            self.log.info("skipping run: its engine retries it in its own process")
            return False
        # Durable before the claim: a claim that outlives a crash must be found again. No
        # record, no claim: the run stays SCHEDULED for a later poll or another agent.
        try:
            self.save("claiming", claimed_at=self.ctx.clock())
        except RecordError as exc:
            self.log.error("not claiming the run: %s", exc)
            # Hold the slot for a poll interval: a freed slot wakes the poller, which would
            # find the same run again at once and spin. Shutdown need not wait for this.
            self.phase = Phase.WAITING
            await asyncio.sleep(self.ctx.settings.agent.poll_interval)
            return False
        while True:
            # A fresh transition id per proposal; a WAIT makes the next one a new proposal.
            pending = states.pending_state()
            pending["message"] = claim_message(self.ctx.settings.agent.name)
            try:
                result = await self.ctx.client.set_flow_run_state(self.id, pending, force=False)
            except PrefectApiError as exc:
                # Outcome unknown; recovery (or the next poll, if still SCHEDULED) sorts it out.
                self.log.warning("could not claim the run: %s", exc)
                if not await self._claimed_by_us_after_error():
                    return False
                break
            if result.status == "ACCEPT":
                break
            if result.status == "WAIT":
                delay = float(result.details.delay_seconds or 1.0)
                self.log.info("server asked to wait %.1fs before claiming", delay)
                await asyncio.sleep(delay)
                continue
            self.log.info(
                "not claimed (%s): %s", result.status, result.details.reason or "no reason given"
            )
            return False
        self.note(f"{claim_message(self.ctx.settings.agent.name)} on host {os.uname().nodename!r}")
        await self.ctx.failpoints.hit("after-claim")
        return True

    async def _claimed_by_us_after_error(self) -> bool:
        current = await self.ctx.reporter.read_run(self.id, retry=True)
        return current is not None and self.is_our_claim(current)

    def is_our_claim(self, flow_run: FlowRun) -> bool:
        state = flow_run.state
        return (
            state is not None
            and state.type is StateType.PENDING
            and (state.message or "") == claim_message(self.ctx.settings.agent.name)
        )

    # -- launch, wait, report ------------------------------------------------------------------

    async def launch_and_follow(self) -> None:
        status, result = await self._launch_and_wait()
        await self.report_exit(status, result)

    async def _launch_and_wait(self) -> tuple[int | None, str | None]:
        """Launch and wait; (None, reason) when the launch itself failed."""
        self.phase = Phase.LAUNCHING
        settings = self.ctx.settings
        flow_run = self.flow_run_settings
        try:
            if self.deployment is None:
                raise LaunchError(f"deployment {self.deployment_name!r} is no longer configured")
            self.workspace = await self.ctx.workspaces.prepare(
                self.id, self.deployment, flow_run, self.note
            )
            ws = self.workspace
            self.save(
                "launching",
                run_dir=str(ws.run_dir),
                launcher=self.ctx.launcher.name,
                extra={"working_dir": str(ws.working_dir)},
            )
            request = LaunchRequest(
                flow_run_id=self.id,
                flow_run_name=self.name,
                deployment_name=self.deployment_name,
                working_dir=ws.working_dir,
                python=flow_run.python,
                memory_max=flow_run.memory_max,
                cpu_quota=flow_run.cpu_quota,
                tasks_max=flow_run.tasks_max,
                runtime_max=flow_run.runtime_max,
                user=flow_run.user,
                env=engine_environment(
                    settings,
                    flow_run,
                    flow_run_id=self.id,
                    deployment_name=self.deployment_name,
                    tmpdir=ws.tmpdir,
                ),
                run_dir=ws.run_dir,
                slice=settings.agent.slice,
            )
            handle = await self.ctx.launcher.launch(request)
        except (LaunchError, StorageError, RecordError, OSError) as exc:
            reason = str(exc)
            self.note(f"Could not launch the flow run: {reason}", logging.ERROR)
            return None, reason
        await self.ctx.failpoints.hit("during-launch")
        self.save_after_the_fact(
            "running",
            pid=handle.pid,
            unit=handle.unit,
            extra={**self.record.extra, "create_time": process_create_time(handle.pid)},
        )
        self.mark_running()
        where = handle.unit or f"process {handle.pid}"
        self.note(
            f"Launched in {where} via the {self.ctx.launcher.name} launcher "
            f"({limits_text(flow_run)})"
        )
        await self.ctx.failpoints.hit("while-running")
        return await self.follow(handle)

    def mark_running(self) -> None:
        self.phase = Phase.RUNNING
        self.started_at = self.ctx.clock()

    async def follow(self, handle: RunHandle) -> tuple[int | None, str | None]:
        """Wait for the run's process; kill the whole run when a cancellation arrives."""
        self.handle = handle
        exited = asyncio.ensure_future(handle.wait())
        cancelled = asyncio.ensure_future(self._cancel_requested.wait())
        try:
            await asyncio.wait({exited, cancelled}, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                await self._kill(handle, exited)
            status = await exited
        finally:
            for task in (exited, cancelled):
                task.cancel()
        result = await self.ctx.launcher.unit_result(handle)
        self.save_after_the_fact("exited", exit_status=status, unit_result=result)
        await self.ctx.failpoints.hit("after-exit")
        return status, result

    async def _kill(self, handle: RunHandle, exited: asyncio.Future[int]) -> None:
        grace = self.ctx.settings.agent.cancel_grace
        self.note(
            f"Cancelling: SIGTERM to every process of the run, SIGKILL after "
            f"{format_duration(grace)}"
        )
        await self.ctx.launcher.terminate(handle)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(exited), timeout=grace)
        # Always: the main process may be gone while its children linger.
        await self.ctx.launcher.kill(handle)

    async def report_exit(self, status: int | None, result: str | None) -> None:
        self.phase = Phase.REPORTING
        if self._cancel_requested.is_set() and status is not None:
            await self._report_cancelled(launched=True)
            return
        if status is None:
            await self.ctx.reporter.propose(
                self.id, states.crashed_state(result or "the launch failed"), force=False
            )
            await self.finish()
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
        # The engine reports a killed run as "aborted by a termination signal"; when one of our
        # limits did it, our message (which names the limit) replaces that.
        limit_hit = cause.limit_hit
        await self.ctx.reporter.crash_if_running(self.id, message, replace_crashed=limit_hit)
        await self.finish()

    async def finish(self) -> None:
        """The outcome is delivered: release the workspace, then forget the run."""
        if self.workspace is not None:
            await self.ctx.workspaces.finish(self.workspace)
        self.ctx.records.remove(self.id)

    # -- cancellation ------------------------------------------------------------------------------

    def request_cancel(self) -> None:
        """The run is CANCELLING on the server; stop it wherever it is in its life."""
        if not self._cancel_requested.is_set():
            self._cancel_started = self.ctx.clock()
            self.log.info("cancellation requested (phase %s)", self.phase.value)
            self._cancel_requested.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested.is_set()

    async def _report_cancelled(self, *, launched: bool) -> None:
        self.phase = Phase.REPORTING
        current = await self.ctx.reporter.read_run(self.id, retry=True)
        state = current.state if current is not None else None
        # The engine answers our SIGTERM with Crashed; that is ours to replace. A run that
        # completed, failed or was cancelled before the kill landed keeps its state.
        if state is not None and state.type.is_final and state.type is not StateType.CRASHED:
            self.note(f"Run was already {state.type.value} when the cancellation finished")
        else:
            await self.ctx.reporter.propose(self.id, states.cancelled_state(), force=True)
            took = self.ctx.clock() - (self._cancel_started or self.ctx.clock())
            self.note(
                f"Cancelled the flow run ({'killed' if launched else 'never launched'}; "
                f"{took:.2f}s after the request)"
            )
            if self.ctx.on_cancelled is not None:
                self.ctx.on_cancelled(self)
        await self.finish()
