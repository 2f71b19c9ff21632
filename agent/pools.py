"""Work-pool mode: the agent as a systemd-native worker of the `[[work_pool]]`s in its config.

What Prefect's workers do (prefect/workers/base.py), over the REST API: make sure each pool
exists (creating a `runner-agent` pool when `create` says so), send worker heartbeats so the
pool is READY and this host is listed as an online worker, and poll each pool's queues for due
runs. The server orders the answer by queue priority and applies the pool's and queues'
concurrency limits. Each run found becomes a `PoolRun`: what the supervisor needs beyond what a
`[[deployment]]` of the config gives, read from the run's deployment on the server.

Everything after that is the same as for a config deployment's run: the claim, the scope and
its limits, exit reasons, cancellation, hooks, recovery. The engine runs the deployment's pull
steps itself (`git_clone`, `set_working_directory`, ...), in a fresh directory per run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from agent import pool_template
from agent.api import ApiError, PrefectApiError, PrefectClient
from agent.deployment_settings import DeploymentSettings
from agent.schemas import Deployment, FlowRun, WorkPool
from agent.settings import Settings, WorkPoolSettings

log = logging.getLogger("agent.pools")

RECORD_KEY = "pool_run"


@dataclass(frozen=True)
class PoolRun:
    """A pool run's deployment as the agent runs it, and its job-variable layers."""

    pool: str
    pool_type: str
    deployment: DeploymentSettings
    pool_defaults: Mapping[str, Any] = field(default_factory=dict)
    deployment_job_variables: Mapping[str, Any] = field(default_factory=dict)
    # The engine runs them in a fresh directory of the run's own (Workspaces.prepare).
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
            "path": str(self.deployment.path) if self.deployment.path else None,
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
            path = data.get("path")
            return cls(
                pool=str(data["pool"]),
                pool_type=str(data["pool_type"]),
                deployment=_deployment(
                    str(data["name"]),
                    str(data["flow_name"]),
                    str(data["entrypoint"]),
                    Path(path) if path else None,
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


def _deployment(
    name: str, flow_name: str, entrypoint: str, path: Path | None
) -> DeploymentSettings:
    # Not validated as the config is: the server's entrypoint may be a module path, which the
    # engine loads after its pull steps; the path is the engine's business too.
    fields: dict[str, Any] = {"name": name, "flow_name": flow_name, "entrypoint": entrypoint}
    if path is not None:
        fields["path"] = path
    return DeploymentSettings.model_construct(**fields)


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

    def pools(self) -> dict[str, WorkPool]:
        """The configured pools as last read from the server (a reload may have dropped some)."""
        names = {pool.name for pool in self.configured}
        return {name: pool for name, pool in self._pools.items() if name in names}

    async def heartbeat(self) -> None:
        """One worker heartbeat per pool found on the server (missing ones were reported by the
        poll); a failure is logged, not fatal."""
        agent = self._settings().agent
        found = self.pools()
        for pool in self.configured:
            if pool.name not in found:
                continue
            try:
                await self._client.worker_heartbeat(pool.name, agent.name, agent.heartbeat_interval)
            except PrefectApiError as exc:
                log.warning("worker heartbeat to pool %r failed: %s", pool.name, exc)

    async def due_runs(self, free: int) -> list[tuple[FlowRun, WorkPool]]:
        """Due runs of every configured pool, at most `free` in all, pool by pool in config
        order. With no free slot the pools are still polled (limit 0): that is what keeps a
        pool's queues READY while this host is busy."""
        found: list[tuple[FlowRun, WorkPool]] = []
        before = datetime.now(UTC) + timedelta(seconds=self._settings().agent.prefetch)
        for pool_settings in self.configured:
            # One pool's trouble (an outage, a queue not created yet) holds up no other pool.
            try:
                pool = await self._pool(pool_settings)
                if pool is None:
                    continue
                wanted = max(0, free - len(found))
                runs = await self._client.get_pool_scheduled_runs(
                    pool.name, pool_settings.queues, before, wanted
                )
            except ApiError as exc:
                # Definite (a queue or the pool is missing): said once, the pool read again.
                self._pools.pop(pool_settings.name, None)
                self._say_once(
                    pool_settings.name, str(exc), logging.WARNING, f"work pool poll failed: {exc}"
                )
                continue
            except PrefectApiError as exc:
                log.warning("work pool %r poll failed: %s", pool_settings.name, exc)
                continue
            found.extend((run, pool) for run in runs[:wanted])
        return found

    async def runnable(self, free: int, *, skip: Collection[UUID]) -> list[tuple[FlowRun, PoolRun]]:
        """The due runs this host may take now (not `skip`, no in-process retry), each with
        what running it takes."""
        found: list[tuple[FlowRun, PoolRun]] = []
        for flow_run, pool in await self.due_runs(free):
            # An in-process retry belongs to the live engine that will re-run it.
            if flow_run.id in skip or flow_run.retrying_in_process:
                continue
            try:
                found.append((flow_run, await self.pool_run(flow_run, pool)))
            except ValueError as exc:
                log.warning(
                    "run %s of work pool %r cannot be run here: %s",
                    flow_run.id,
                    pool.name,
                    exc,
                    extra={"flow_run_id": str(flow_run.id)},
                )
        return found

    async def pool_run(self, flow_run: FlowRun, pool: WorkPool) -> PoolRun:
        """What running `flow_run` takes, from its deployment on the server; raises
        PrefectApiError, or ValueError for a run without a deployment."""
        if flow_run.deployment_id is None:
            raise ValueError("the run has no deployment, so nothing tells what code to run")
        deployment = await self._client.read_deployment(flow_run.deployment_id)
        problem = None
        if not deployment.entrypoint:
            problem = f"deployment {deployment.name!r} has no entrypoint, so no flow to run"
        flow_name = await self._flow_name(deployment)
        pull_steps = bool(deployment.pull_steps)
        path = code_path(deployment, pull_steps)
        self._say_ignored(pool, deployment)
        return PoolRun(
            pool=pool.name,
            pool_type=pool.type,
            deployment=_deployment(deployment.name, flow_name, deployment.entrypoint or "", path),
            pool_defaults=pool_template.template_defaults(pool.base_job_template),
            deployment_job_variables=deployment.job_variables,
            pull_steps=pull_steps,
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

    def _say_ignored(self, pool: WorkPool, deployment: Deployment) -> None:
        defaults = pool_template.template_defaults(pool.base_job_template)
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


def code_path(deployment: Deployment, pull_steps: bool) -> Path | None:
    """Where a pool run starts, before job variables: the deployment's absolute `path` unless
    it has pull steps (those run in a fresh directory of the run's own); None when nothing
    says where its code is."""
    if not pull_steps and deployment.path and Path(deployment.path).is_absolute():
        return Path(deployment.path)
    return None
