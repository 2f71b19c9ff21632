"""Work-pool mode: the agent as a systemd-native worker of the `[[work_pool]]`s in its config.

What Prefect's workers do (prefect/workers/base.py), over the REST API: make sure each pool
exists (creating a `runner-agent` pool when `create` says so), send worker heartbeats so the
pool is READY and this host is listed as an online worker, and poll each pool's queues for due
runs. The server orders the answer by queue priority and applies the pool's and queues'
concurrency limits. Each run found becomes a `PoolRun`: what the supervisor needs beyond what a
`[[deployment]]` of the config gives, read from the run's deployment on the server.

Everything after that is the same as for a config deployment's run: the claim, the scope and
its limits, exit reasons, cancellation, hooks, recovery. The engine runs the deployment's pull
steps itself (`git_clone`, `set_working_directory`, ...), or copies its `path`, in a fresh
directory per run. A claim over the pool's concurrency limit is given back (claims.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from agent import pool_template
from agent.api import ApiError, PrefectApiError, PrefectClient
from agent.deployment_settings import DeploymentSettings
from agent.schemas import Deployment, FlowRun, WorkPool
from agent.settings import Settings, WorkPoolSettings

log = logging.getLogger("agent.pools")

RECORD_KEY = "pool_run"
# The most runs the server lists at once (its LimitBody).
MAX_LISTED = 200


@dataclass(frozen=True)
class PoolRun:
    """A pool run's deployment as the agent runs it, and its job-variable layers."""

    pool: str
    pool_type: str
    deployment: DeploymentSettings
    pool_defaults: Mapping[str, Any] = field(default_factory=dict)
    deployment_job_variables: Mapping[str, Any] = field(default_factory=dict)
    # Whether the engine pulls the code (else it copies the deployment's path); both happen in
    # a fresh directory of the run's own (Workspaces.prepare).
    pull_steps: bool = False
    # Why the run cannot be launched (it is claimed and ends CRASHED with this), if it cannot.
    problem: str | None = None
    # The pool's concurrency limit as last read (claims.hold_pool_slot keeps to it).
    concurrency_limit: int | None = None

    @property
    def ignored(self) -> frozenset[str]:
        return pool_template.meaningless(self.pool_type)

    def to_record(self) -> dict[str, Any]:
        return {
            "pool": self.pool,
            "pool_type": self.pool_type,
            "name": self.deployment.name,
            "flow_name": self.deployment.flow_name,
            "entrypoint": self.deployment.entrypoint,
            "pool_defaults": dict(self.pool_defaults),
            "deployment_job_variables": dict(self.deployment_job_variables),
            "pull_steps": self.pull_steps,
            "problem": self.problem,
            "concurrency_limit": self.concurrency_limit,
        }

    @classmethod
    def from_record(cls, data: Any) -> PoolRun | None:
        """The pool run a record kept; None when the record holds none (or an unreadable one)."""
        if not isinstance(data, Mapping):
            return None
        try:
            return cls(
                pool=str(data["pool"]),
                pool_type=str(data["pool_type"]),
                deployment=_deployment(
                    str(data["name"]),
                    str(data["flow_name"]),
                    str(data["entrypoint"]),
                ),
                pool_defaults=dict(data.get("pool_defaults") or {}),
                deployment_job_variables=dict(data.get("deployment_job_variables") or {}),
                pull_steps=bool(data.get("pull_steps")),
                problem=str(data["problem"]) if data.get("problem") else None,
                concurrency_limit=_count(data.get("concurrency_limit")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("a run record's work-pool entry is unreadable: %s", exc)
            return None


def _count(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"not a count: {value!r}")
    return value


def _deployment(name: str, flow_name: str, entrypoint: str) -> DeploymentSettings:
    # Not validated as the config is: the server's entrypoint may be a module path, which the
    # engine loads after its pull steps. No path: the engine pulls or copies the code itself.
    return DeploymentSettings.model_construct(name=name, flow_name=flow_name, entrypoint=entrypoint)


class PoolPoller:
    """The config's work pools, as one worker of each. Owned by the runner."""

    def __init__(
        self,
        client: PrefectClient,
        settings: Callable[[], Settings],
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._settings = settings
        self._monotonic = monotonic
        self._pools: dict[str, WorkPool] = {}
        self._read_at: dict[str, float] = {}
        self._flow_names: dict[UUID, str] = {}
        self._said: set[tuple[str, str]] = set()

    @property
    def configured(self) -> tuple[WorkPoolSettings, ...]:
        return self._settings().work_pools

    def flow_names(self) -> dict[UUID, str]:
        """The flows of the pool deployments seen so far (heartbeat events name them)."""
        return dict(self._flow_names)

    def pools(self) -> dict[str, WorkPool]:
        """The configured pools as last read from the server (a reload may have dropped some)."""
        names = {pool.name for pool in self.configured}
        return {name: pool for name, pool in self._pools.items() if name in names}

    async def heartbeat(self, every: float) -> None:
        """One worker heartbeat per pool found on the server (missing ones were reported by the
        poll); a failure is logged, not fatal."""
        agent = self._settings().agent
        found = self.pools()
        for pool in self.configured:
            if pool.name not in found:
                continue
            try:
                await self._client.worker_heartbeat(pool.name, agent.name, every)
            except PrefectApiError as exc:
                log.warning("worker heartbeat to pool %r failed: %s", pool.name, exc)

    async def due_runs(self, free: int) -> list[tuple[FlowRun, WorkPool]]:
        """Due runs of every configured pool, at most `free` in all, pool by pool in config
        order. With no free slot the pools are still polled (limit 0): that is what keeps a
        pool's queues READY while this host is busy."""
        found: list[tuple[FlowRun, WorkPool]] = []
        before = datetime.now(UTC) + timedelta(seconds=self._settings().agent.prefetch)
        # One pool's trouble (an outage, a queue not created yet) holds up no other pool.
        for pool_settings in self.configured:
            name = pool_settings.name
            try:
                pool = await self._pool(pool_settings)
            except PrefectApiError as exc:
                self._pools.pop(name, None)
                self._poll_failed(name, exc)
                continue
            if pool is None:
                continue
            wanted = min(MAX_LISTED, max(0, free - len(found)))
            try:
                runs = await self._client.get_pool_scheduled_runs(
                    pool.name, pool_settings.queues, before, wanted
                )
            except PrefectApiError as exc:
                self._poll_failed(name, exc)  # the pool exists: its heartbeats go on
                continue
            found.extend((run, pool) for run in runs[:wanted])
        return found

    def _poll_failed(self, pool: str, exc: PrefectApiError) -> None:
        if isinstance(exc, ApiError):  # definite (a missing queue): said once, not every poll
            self._say_once(
                pool, str(exc), logging.WARNING, f"work pool {pool!r} poll failed: {exc}"
            )
        else:
            log.warning("work pool %r poll failed: %s", pool, exc)

    async def runnable(self, free: int, *, skip: Collection[UUID]) -> list[tuple[FlowRun, PoolRun]]:
        """The due runs this host may take now (not `skip`, no in-process retry, each once),
        each with what running it takes. A run whose deployment cannot be run is taken too: it
        is claimed and ends CRASHED naming why, as under Prefect's workers, rather than block
        its queue for ever."""
        found: dict[UUID, tuple[FlowRun, PoolRun]] = {}
        for flow_run, pool in await self.due_runs(free):
            # An in-process retry belongs to the live engine that will re-run it.
            if flow_run.id in skip or flow_run.id in found or flow_run.retrying_in_process:
                continue
            try:
                found[flow_run.id] = (flow_run, await self.pool_run(flow_run, pool))
            except PrefectApiError as exc:  # an outage: this run waits for a later poll
                log.warning(
                    "cannot read the deployment of run %s (work pool %r): %s",
                    flow_run.id,
                    pool.name,
                    exc,
                    extra={"flow_run_id": str(flow_run.id)},
                )
        return list(found.values())

    async def pool_run(self, flow_run: FlowRun, pool: WorkPool) -> PoolRun:
        """What running `flow_run` takes, from its deployment on the server (with a `problem`
        when it cannot be run); raises PrefectApiError but for a deployment that is gone."""
        try:
            if flow_run.deployment_id is None:
                raise LookupError("the run has no deployment, so nothing tells what code to run")
            deployment = await self._client.read_deployment(flow_run.deployment_id)
        except (ApiError, LookupError) as exc:
            if isinstance(exc, ApiError) and exc.status != 404:
                raise
            gone = (
                str(exc)
                if isinstance(exc, LookupError)
                else f"its deployment {flow_run.deployment_id} does not exist (deleted?)"
            )
            return self._unrunnable(pool, str(flow_run.deployment_id), gone)
        problem = (
            None
            if deployment.entrypoint
            else f"deployment {deployment.name!r} has no entrypoint, so no flow to run"
        )
        flow_name = await self._flow_name(deployment)
        defaults = pool_template.template_defaults(pool.base_job_template)
        self._say_ignored(pool, deployment, defaults)
        return PoolRun(
            pool=pool.name,
            pool_type=pool.type,
            deployment=_deployment(deployment.name, flow_name, deployment.entrypoint or ""),
            pool_defaults=defaults,
            deployment_job_variables=deployment.job_variables,
            pull_steps=bool(deployment.pull_steps),
            problem=problem,
            concurrency_limit=pool.concurrency_limit,
        )

    @staticmethod
    def _unrunnable(pool: WorkPool, name: str, problem: str) -> PoolRun:
        return PoolRun(
            pool=pool.name,
            pool_type=pool.type,
            deployment=_deployment(name, "unknown", ""),
            problem=problem,
            concurrency_limit=pool.concurrency_limit,
        )

    async def _pool(self, wanted: WorkPoolSettings) -> WorkPool | None:
        """The pool, re-read once per heartbeat interval (its template and type may change)."""
        now = self._monotonic()
        cached = self._pools.get(wanted.name)
        if cached is not None and now - self._read_at[wanted.name] < self._reread_after():
            return cached
        pool = await self._client.read_work_pool(wanted.name)
        if pool is None and wanted.create:
            allowed = self._settings().agent.job_variables
            pool = await self._client.create_work_pool(
                {
                    "name": wanted.name,
                    "type": pool_template.POOL_TYPE,
                    "description": "Runs flows in systemd scopes with cgroup limits "
                    "(runner-agent).",
                    "base_job_template": pool_template.base_job_template(allowed),
                }
            )
            log.info("created work pool %r (type %s)", pool.name, pool.type)
        if pool is None:
            self._say_once(
                wanted.name,
                "missing",
                logging.WARNING,
                f"work pool {wanted.name!r} does not exist; set create = true in its "
                "[[work_pool]] to create it, or create it with `prefect work-pool create`",
            )
            self._pools.pop(wanted.name, None)
            return None
        if pool.type not in (pool_template.POOL_TYPE, pool_template.PROCESS_TYPE):
            self._say_once(
                wanted.name,
                f"type:{pool.type}",
                logging.WARNING,
                f"work pool {wanted.name!r} is of type {pool.type!r}; this agent serves pools "
                f"of type {pool_template.POOL_TYPE!r} and {pool_template.PROCESS_TYPE!r} only",
            )
            return None
        self._pools[wanted.name] = pool
        self._read_at[wanted.name] = now
        return pool

    def _reread_after(self) -> float:
        return self._settings().agent.heartbeat_interval

    async def _flow_name(self, deployment: Deployment) -> str:
        name = self._flow_names.get(deployment.flow_id)
        if name is None:
            name = (await self._client.read_flow(deployment.flow_id)).name
            self._flow_names[deployment.flow_id] = name
        return name

    def _say_ignored(
        self, pool: WorkPool, deployment: Deployment, defaults: Mapping[str, Any]
    ) -> None:
        set_here = {*defaults, *deployment.job_variables}
        ignored = sorted(set_here & pool_template.meaningless(pool.type))
        if ignored:
            which = (
                f"job variables {', '.join(ignored)} have no meaning here and are"
                if len(ignored) > 1
                else f"job variable {ignored[0]} has no meaning here and is"
            )
            self._say_once(
                f"{pool.name}/{deployment.id}",
                "ignored",
                logging.INFO,
                f"work pool {pool.name!r} (type {pool.type}), deployment {deployment.name!r}: "
                f"{which} ignored (the agent runs the engine in a systemd scope)",
            )

    def _say_once(self, subject: str, what: str, level: int, message: str) -> None:
        if (subject, what) not in self._said:
            self._said.add((subject, what))
            log.log(level, message)
