"""The runner facade: polls for scheduled runs and hands each to a supervisor.

New behaviour goes into the component that owns it (supervisor, launch, deployments, states,
slots), not here. The runner owns the poll loop and the set of supervisors, and it decides the
shutdown order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from agent import pools, recovery
from agent.api import PrefectApiError, PrefectClient
from agent.control import ControlChannel
from agent.deployments import DeploymentRegistry, RegisteredDeployment
from agent.engines import Engines
from agent.failpoints import Failpoints
from agent.flowlogs import FlowRunLogs
from agent.hooks import HookRunner
from agent.launch.base import Launcher
from agent.notify import Liveness
from agent.outcomes import RunContext, RunOutcomes
from agent.pools import PoolPoller, PoolRun
from agent.records import RunRecords
from agent.reporting import Reporter
from agent.schemas import FlowRun
from agent.settings import DeploymentSettings, Settings
from agent.slots import Slots
from agent.storage import Storage
from agent.supervisor import CRITICAL_PHASES, Supervisor
from agent.workspace import Workspaces

log = logging.getLogger("agent.runner")

POLL_JITTER = 0.3
# Wake-ups (Scheduled events, freed slots) poll at once, but no more often than this: a storm
# of events (a schedule creating 100 runs) costs a few polls, not one each.
MIN_WAKE_GAP = 0.1
# How long a stop waits for claims and launches in flight, so no run is left half-started.
CRITICAL_SECTION_GRACE = 15.0


class Runner:
    def __init__(
        self,
        settings: Settings,
        *,
        client: PrefectClient,
        launcher: Launcher,
        flow_logs: FlowRunLogs,
        liveness: Liveness,
        registry: DeploymentRegistry,
        storage: Storage,
        monotonic: Callable[[], float] = time.monotonic,
        failpoints: Failpoints | None = None,
        reporter: Reporter | None = None,
        control: ControlChannel | None = None,
        engines: Engines | None = None,
        hooks: HookRunner | None = None,
    ) -> None:
        self._settings = settings
        self._failpoints = failpoints if failpoints is not None else Failpoints()
        self._client = client
        self._launcher = launcher
        self._flow_logs = flow_logs
        self._liveness = liveness
        self._registry = registry
        self._monotonic = monotonic
        self._records = RunRecords(settings.agent.state_dir)
        self._workspaces = Workspaces(lambda: self._settings, storage)
        self._reporter = reporter if reporter is not None else Reporter(client)
        self._control = control
        self._engines = engines if engines is not None else Engines()
        self._hooks = hooks or HookRunner(
            launcher, timeout=lambda: self._settings.agent.hook_timeout
        )
        self._pools = PoolPoller(client, lambda: self._settings, monotonic=monotonic)
        self._pool_heartbeat_at: float | None = None
        self._registered: dict[str, RegisteredDeployment] = {}
        self._needs_sync = True
        self._slots = Slots(settings.agent.limit)
        self._supervisors: dict[UUID, Supervisor] = {}
        self._tasks: dict[UUID, asyncio.Task[None]] = {}
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self.last_poll: float | None = None
        self._api_ok: bool | None = None
        # Since when the API has not answered a poll: the last success, or the start.
        self._api_reached_at = monotonic()
        # Hooks set by the daemon: the events subscription and heartbeats hang off these.
        self.on_cancelled: Callable[[RunOutcomes], None] | None = None
        # The resources whose Scheduled events should wake the poller: the registered
        # deployments and the served work pools (`prefect.deployment.<id>`, ...).
        self.on_watched_changed: Callable[[list[str]], None] | None = None
        self._watched: list[str] | None = None
        self.on_api_back: Callable[[], None] | None = None

    # -- public surface -------------------------------------------------------------------

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def supervisors(self) -> dict[UUID, Supervisor]:
        return self._supervisors

    def flow_names(self) -> dict[UUID, str]:
        registered = {reg.flow_id: reg.flow_name for reg in self._registered.values()}
        return {**self._pools.flow_names(), **registered}

    def wake(self) -> None:
        """Poll now instead of at the next interval (an event announced a due run)."""
        self._wakeup.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wakeup.set()

    def apply(self, settings: Settings) -> None:
        """Take a reloaded config; deployments are synced on the next loop turn."""
        self._settings = settings
        self._slots.resize(settings.agent.limit)
        self._needs_sync = True
        self._wakeup.set()

    @property
    def api_ok(self) -> bool | None:
        """Whether the last poll reached the API (None before the first one)."""
        return self._api_ok

    @api_ok.setter
    def api_ok(self, ok: bool | None) -> None:
        if ok:
            self._api_reached_at = self._monotonic()
            if self._api_ok is False:
                # Back after an outage: deliveries waiting out their backoff go now.
                self._reporter.api_answered()
                if self.on_api_back is not None:
                    self.on_api_back()
        self._api_ok = ok

    def status_text(self) -> str:
        """`3/4 runs; last poll 2s ago; API unreachable for 42s` (the STATUS line's start)."""
        now = self._monotonic()
        poll = "no poll yet"
        if self.last_poll is not None:
            poll = f"last poll {now - self.last_poll:.0f}s ago"
        if self._api_ok is None:
            api = "API not checked yet"
        elif self._api_ok:
            api = "API ok"
        else:
            api = f"API unreachable for {now - self._api_reached_at:.0f}s"
        return f"{self._slots.used}/{self._slots.limit} runs; {poll}; {api}"

    # -- the loop --------------------------------------------------------------------------

    def _stale_after(self) -> float:
        agent = self._settings.agent
        # One poll may take a full API timeout plus a jittered interval; allow twice that.
        return 2 * (agent.poll_interval * (1 + POLL_JITTER) + self._settings.api.timeout) + 5

    async def run(self) -> None:
        self._liveness.register("poll", self._stale_after())
        try:
            async with asyncio.TaskGroup() as group:
                self._recover(group)
                while not self._stopping.is_set():
                    await self._poll_once(group)
                    self.last_poll = self._monotonic()
                    self._liveness.register("poll", self._stale_after())
                    self._liveness.progress("poll")
                    await self._sleep_until_next_poll()
                await self._shutdown_supervisors()
        finally:
            self._liveness.unregister("poll")

    async def _sleep_until_next_poll(self) -> None:
        interval = self._settings.agent.poll_interval
        delay = interval * random.uniform(1 - POLL_JITTER, 1 + POLL_JITTER)
        polled_at = asyncio.get_running_loop().time()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout=delay)
        gap = MIN_WAKE_GAP - (asyncio.get_running_loop().time() - polled_at)
        if gap > 0 and not self._stopping.is_set():
            await asyncio.sleep(gap)  # wake-ups arriving meanwhile join this poll
        self._wakeup.clear()

    async def _poll_once(self, group: asyncio.TaskGroup) -> None:
        try:
            async with asyncio.timeout(2 * self._settings.api.timeout + 5):
                if self._needs_sync:
                    self._registered = await self._registry.sync(self._settings.deployments)
                    self._needs_sync = len(self._registered) < len(self._settings.deployments)
                    self._announce_watched()
                runs = await self._fetch_due_runs()
            self.api_ok = True
        except TimeoutError:
            log.warning("poll timed out")
            self.api_ok = False
            return
        except PrefectApiError as exc:
            log.warning("poll failed: %s", exc)
            self.api_ok = False
            return
        except OSError as exc:
            # The state directory (deployments.json) is full or read-only: nothing new can be
            # recorded, so nothing new is taken on; running runs carry on. Tried again next poll.
            log.error(
                "poll skipped, no new runs taken on: %s (is %s full or read-only?)",
                exc,
                self._settings.agent.state_dir,
            )
            return
        except Exception:
            # An answer nobody foresaw met a bug: the loop must live on; the next poll retries.
            log.exception("poll failed unexpectedly")
            return
        for flow_run in runs:
            self._start_supervisor(group, flow_run)
        if self._settings.work_pools:
            # After the config's runs, and apart: a pool's trouble never holds those up.
            await self._guarded("work pool poll", self._poll_pools(group))

    async def _guarded(self, what: str, work: Coroutine[Any, Any, None]) -> None:
        try:
            async with asyncio.timeout(2 * self._settings.api.timeout + 5):
                await work
        except TimeoutError:
            log.warning("%s timed out", what)
        except PrefectApiError as exc:
            log.warning("%s failed: %s", what, exc)
        except Exception:
            log.exception("%s failed unexpectedly", what)

    async def _poll_pools(self, group: asyncio.TaskGroup) -> None:
        try:
            due = await self._pools.runnable(self._slots.free, skip=set(self._supervisors))
        finally:
            self._announce_watched()
            now = self._monotonic()
            # After the poll, which reads (or creates) the pools the heartbeats go to.
            if self._pool_heartbeat_at is None or (
                now - self._pool_heartbeat_at >= self._settings.agent.heartbeat_interval
            ):
                self._pool_heartbeat_at = now
                await self._pools.heartbeat(every=self._pool_heartbeat_every())
        for flow_run, pool_run in due:
            self._start_pool_supervisor(group, flow_run, pool_run)

    def _pool_heartbeat_every(self) -> float:
        """The heartbeat interval the pools are told: heartbeats ride on the poll loop, so
        they come no more often than the slowest jittered poll (Prefect marks a worker
        OFFLINE after three missed ones)."""
        agent = self._settings.agent
        return max(agent.heartbeat_interval, agent.poll_interval * (1 + POLL_JITTER))

    def _announce_watched(self) -> None:
        watched = sorted(
            [f"prefect.deployment.{r.id}" for r in self._registered.values()]
            + [f"prefect.work-pool.{pool.id}" for pool in self._pools.pools().values()]
        )
        if watched != self._watched and self.on_watched_changed is not None:
            self._watched = watched
            self.on_watched_changed(watched)

    async def _fetch_due_runs(self) -> list[FlowRun]:
        free = self._slots.free
        deployment_ids = [reg.id for reg in self._registered.values()]
        if free <= 0 or not deployment_ids:
            return []
        before = datetime.now(UTC) + timedelta(seconds=self._settings.agent.prefetch)
        runs = await self._client.get_scheduled_flow_runs(
            deployment_ids, scheduled_before=before, limit=free
        )
        # An answer may list a run twice: one supervisor per run, or it is claimed twice.
        unique: dict[UUID, FlowRun] = {}
        for flow_run in runs:
            # An in-process retry belongs to the live engine that will re-run it.
            if flow_run.id not in self._supervisors and not flow_run.retrying_in_process:
                unique.setdefault(flow_run.id, flow_run)
        return list(unique.values())[:free]

    def _deployment_for(self, flow_run: FlowRun) -> DeploymentSettings | None:
        # By the run's deployment id: etl/prod and report/prod share the name "prod".
        for key, reg in self._registered.items():
            if reg.id == flow_run.deployment_id:
                return self._settings.deployment(key)
        return None

    def _start_supervisor(self, group: asyncio.TaskGroup, flow_run: FlowRun) -> None:
        deployment = self._deployment_for(flow_run)
        if deployment is None:
            log.warning("run %s belongs to no configured deployment; skipping", flow_run.id)
            return
        if not self._slots.take(flow_run.id):
            return  # the answer held more runs than free slots; they stay for a later poll
        supervisor = Supervisor(self._context(), flow_run.id, deployment, flow_run=flow_run)
        self._track(group, supervisor, supervisor.run())

    def _start_pool_supervisor(
        self, group: asyncio.TaskGroup, flow_run: FlowRun, pool_run: PoolRun
    ) -> None:
        if not self._slots.take(flow_run.id):
            return
        supervisor = Supervisor(
            self._context(), flow_run.id, pool_run.deployment, flow_run=flow_run
        )
        supervisor.pool_run = pool_run
        # In the record from the claim on: a restarted agent needs no API to rebuild the run.
        supervisor.record.extra = {pools.RECORD_KEY: pool_run.to_record()}
        self._track(group, supervisor, supervisor.run())

    def _context(self) -> RunContext:
        return RunContext(
            settings=self._settings,
            client=self._client,
            launcher=self._launcher,
            flow_logs=self._flow_logs,
            records=self._records,
            reporter=self._reporter,
            workspaces=self._workspaces,
            engines=self._engines,
            hooks=self._hooks,
            control=self._control,
            on_cancelled=self.on_cancelled,
            failpoints=self._failpoints,
        )

    def _track(
        self, group: asyncio.TaskGroup, supervisor: Supervisor, work: Coroutine[Any, Any, None]
    ) -> None:
        self._supervisors[supervisor.id] = supervisor
        task = group.create_task(self._supervise(supervisor, work), name=f"run-{supervisor.id}")
        self._tasks[supervisor.id] = task

    def _recover(self, group: asyncio.TaskGroup) -> None:
        """Pick up the runs a previous agent process left behind; they count against `limit`."""
        for record in self._records.all():
            pool_run = PoolRun.from_record(record.extra.get(pools.RECORD_KEY))
            deployment = (
                pool_run.deployment
                if pool_run is not None
                else self._settings.deployment(record.deployment)
            )
            supervisor = Supervisor(
                self._context(), record.id, deployment, deployment_name=record.deployment
            )
            supervisor.pool_run = pool_run
            self._slots.take(record.id, force=True)
            log.info(
                "recovering run %s (left in phase %s)",
                record.id,
                record.phase,
                extra={"flow_run_id": str(record.id), "deployment": record.deployment},
            )
            self._track(group, supervisor, recovery.resume(supervisor, record))

    async def _supervise(self, supervisor: Supervisor, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception:
            # One run's bug must not take the agent down; the run is left for recovery.
            log.exception(
                "supervisor of run %s failed",
                supervisor.id,
                extra={"flow_run_id": str(supervisor.id)},
            )
        finally:
            self._supervisors.pop(supervisor.id, None)
            self._tasks.pop(supervisor.id, None)
            self._slots.release(supervisor.id)
            self._wakeup.set()  # a slot is free

    async def _shutdown_supervisors(self) -> None:
        """Let claims and launches in flight finish, then stop watching the runs.

        The runs themselves keep running in their own units; a restarted agent adopts them.
        """
        in_flight = [
            self._tasks[run_id]
            for run_id, s in self._supervisors.items()
            if s.phase in CRITICAL_PHASES and run_id in self._tasks
        ]
        if in_flight:
            # A claim or launch runs on to its end (or the grace) before we stop watching.
            await asyncio.wait(in_flight, timeout=CRITICAL_SECTION_GRACE)
        for task in list(self._tasks.values()):
            task.cancel()
