"""One flow run's life on this host: wait for its start time, claim, launch, follow, stop.

A supervisor owns exactly one run. It writes a durable record (records.py) before every step
that changes the outside world, so that an agent that died at any point can finish the run's
story exactly once after a restart (recovery.py). How the story ends (states, hooks, the
cancelled event) is the base class's, in outcomes.py.

Cancellation follows Prefect's Runner: the cancel intent goes over the engine's control channel
first (control.py); once the engine acknowledged it, SIGTERM makes the engine end as a
cancellation, with no Crashed state. An engine that never connected, or does not answer, gets
the fallback: SIGTERM, `agent.cancel_grace`, then SIGKILL to every process of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from datetime import UTC, datetime

from agent import claims, states
from agent.claims import Verdict
from agent.control import SignalResult
from agent.jobvars import JobVariablesError
from agent.launch.base import LaunchError, LaunchRequest, RunHandle
from agent.outcomes import Phase, RunContext, RunOutcomes
from agent.processes import process_create_time
from agent.records import RecordError
from agent.settings import DeploymentSettings, FlowRunSettings
from agent.storage import StorageError
from agent.values import format_duration
from agent.warm.keys import same_startup
from agent.workspace import Workspace, engine_environment, limits_text

__all__ = ["CRITICAL_PHASES", "Phase", "RunContext", "Supervisor"]

CRITICAL_PHASES = frozenset({Phase.CLAIMING, Phase.LAUNCHING})


class Supervisor(RunOutcomes):
    # -- a fresh run from the poller ----------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._wait_for_start()
            if await self.claim():
                await self.launch_claimed()
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

    async def claim(self) -> bool:
        """Propose PENDING; True when this agent won the run."""
        self.phase = Phase.CLAIMING
        current = await self.ctx.reporter.read_run(self.id, retry=False)
        if current is None:
            return False
        verdict = claims.verdict(current)
        if verdict is Verdict.CANCELLING:
            await self.ctx.reporter.propose(self.id, states.cancelled_state(), force=True)
        if verdict is not Verdict.CLAIMABLE:
            self.log.info(
                "not claiming the run: %s (%s)", verdict.value, states.describe(current.state)
            )
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
        agent_name = self.ctx.settings.agent.name
        won = await claims.propose_claim(
            self.ctx.client, self.ctx.reporter, self.id, agent_name=agent_name, log=self.log
        )
        pool = self.pool_run
        if won and pool is not None and pool.concurrency_limit is not None:
            won = await claims.hold_pool_slot(
                self.ctx.client,
                self.ctx.reporter,
                self.id,
                pool=pool.pool,
                limit=pool.concurrency_limit,
                agent_name=agent_name,
                log=self.log,
            )
        if won:
            self.note(f"{claims.claim_message(agent_name)} on host {os.uname().nodename!r}")
            await self.ctx.failpoints.hit("after-claim")
        return won

    # -- launch and follow -------------------------------------------------------------------

    async def launch_claimed(self) -> None:
        """A run this agent has just claimed: launch it, unless it was cancelled meanwhile."""
        if self.cancel_requested:
            await self.finish_cancellation(launched=False)  # never launched
        else:
            await self.launch_and_follow()

    async def launch_and_follow(self) -> None:
        status, result = await self._launch_and_wait()
        await self.report_exit(status, result)

    def _code_source(self) -> tuple[DeploymentSettings, bool]:
        """The deployment with the directory the run starts in, and whether that is a fresh
        directory of the run's own: a work pool's run starts there (the engine runs its pull
        steps or copies its `path` in, as under Prefect's process worker) unless an allowed
        `working_dir` job variable says otherwise."""
        deployment = self.deployment
        assert deployment is not None
        pool = self.pool_run
        if pool is not None and pool.problem is not None:
            raise LaunchError(pool.problem)
        if self.working_dir is None:
            return deployment, pool is not None
        if pool is None:
            raise LaunchError(
                "the job variable 'working_dir' applies to work-pool runs only; a "
                "[[deployment]]'s code is its path or git source"
            )
        agent = self.ctx.settings.agent
        if any(self.working_dir.is_relative_to(d) for d in (agent.state_dir, agent.runtime_dir)):
            raise LaunchError(
                f"the job variable 'working_dir' ({self.working_dir}) is inside the agent's own "
                "state or runtime directory"
            )
        return deployment.model_copy(update={"path": self.working_dir}), False

    def build_request(self, ws: Workspace, control_env: dict[str, str]) -> LaunchRequest:
        settings, flow_run = self.ctx.settings, self.flow_run_settings
        env = engine_environment(
            settings,
            flow_run,
            flow_run_id=self.id,
            deployment_name=self.deployment_name,
            tmpdir=ws.tmpdir,
        )
        return LaunchRequest(
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
            env={**env, **control_env},
            run_dir=ws.run_dir,
            slice=settings.agent.slice,
            engine=self._engine(flow_run),
        )

    def _engine(self, flow_run: FlowRunSettings) -> str:
        """A warm template runs as the agent's user: the interpreter start-up variables it is
        started with (PYTHONPATH, ...) are the host's to choose, never a job variable's."""
        if flow_run.engine == "warm" and not same_startup(flow_run.env, self.base_settings.env):
            self.note(
                "Starting cold: the job variables change the interpreter's start-up variables"
            )
            return "cold"
        return flow_run.engine

    def rebuild_request(self) -> LaunchRequest | None:
        if self.deployment is None or self.workspace is None:
            return None
        return self.build_request(self.workspace, {})

    async def _launch_and_wait(self) -> tuple[int | None, str | None]:
        """Launch and wait; (None, reason) when the launch itself failed."""
        self.phase = Phase.LAUNCHING
        control = self.ctx.control
        try:
            if self.deployment is None:
                raise LaunchError(f"deployment {self.deployment_name!r} is no longer configured")
            flow_run = self.apply_job_variables()
            deployment, fresh_code = self._code_source()
            self.workspace = await self.ctx.workspaces.prepare(
                self.id, deployment, flow_run, self.note, fresh_code=fresh_code
            )
            ws = self.workspace
            self.save(
                "launching",
                run_dir=str(ws.run_dir),
                launcher=self.ctx.launcher.name,
                extra={**self.record.extra, "working_dir": str(ws.working_dir)},
            )
            self.engine = await self.ctx.engines.info(flow_run.python, flow_run.env)
            endpoint = (
                control.register(self.id)
                if control is not None and self.engine.control_channel
                else None
            )
            self.request = self.build_request(ws, endpoint.environment() if endpoint else {})
            handle = await self.ctx.launcher.launch(self.request)
        except (JobVariablesError, LaunchError, StorageError, RecordError, OSError) as exc:
            if control is not None:
                control.unregister(self.id)
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
        how = ", forked from a warm engine template" if getattr(handle, "warm", False) else ""
        self.note(
            f"Launched in {where} via the {self.ctx.launcher.name} launcher{how} "
            f"({limits_text(flow_run)}; {self.engine.describe()})"
        )
        await self.ctx.failpoints.hit("while-running")
        return await self.follow(handle)

    async def follow(self, handle: RunHandle) -> tuple[int | None, str | None]:
        """Wait for the run's process; stop the whole run when a cancellation arrives."""
        self.handle = handle
        exited = asyncio.ensure_future(handle.wait())
        cancelled = asyncio.ensure_future(self._cancel_requested.wait())
        stopped = None
        try:
            await asyncio.wait({exited, cancelled}, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                stopped = await self._stop(handle, exited)
            status = await exited
        finally:
            for task in (exited, cancelled):
                task.cancel()
        if stopped is SignalResult.ACKNOWLEDGED:
            # The engine ended as a cancellation and proposes nothing more: CANCELLED now,
            # before the hooks. Not before its process is gone: it sends its own heartbeats
            # until its flow has unwound (a slow `finally`, a call that holds off SIGTERM), and
            # no heartbeat may follow the final state.
            await self.settle_cancelled(launched=True)
        result = await self.ctx.launcher.unit_result(handle)
        if self.ctx.control is not None:
            self.conclusion = self.ctx.control.unregister(self.id)
        self.save_after_the_fact("exited", exit_status=status, unit_result=result)
        await self.ctx.failpoints.hit("after-exit")
        return status, result

    async def _stop(self, handle: RunHandle, exited: asyncio.Future[int]) -> SignalResult:
        """Deliver the cancel intent, then SIGTERM; SIGKILL what is left after the grace.
        Returns the engine's answer to the intent."""
        grace = self.ctx.settings.agent.cancel_grace
        signal = SignalResult.NOT_ACKNOWLEDGED
        if self.ctx.control is not None:
            signal = await self.ctx.control.signal(self.id, "cancel")
        if signal is SignalResult.ALREADY_CONCLUDED:
            self.note("The engine had already finished the run when the cancellation arrived")
        else:
            how = (
                "the engine acknowledged the cancellation"
                if signal is SignalResult.ACKNOWLEDGED
                else "no control channel answer from the engine"
            )
            self.note(
                f"Cancelling ({how}): SIGTERM to every process of the run, SIGKILL after "
                f"{format_duration(grace)}"
            )
            await self.ctx.launcher.terminate(handle)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(exited), timeout=grace)
        # Always: the main process may be gone while its children linger.
        await self.ctx.launcher.kill(handle)
        return signal
