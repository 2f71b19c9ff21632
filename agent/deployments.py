"""Registering the config's `[[deployment]]`s with the Prefect server.

The config is the source of truth: at start and on reload every deployment is upserted, and the
deployments this host registered before but that left the config are paused (never deleted, so
their history stays). Stopping the agent pauses nothing: restarts must not lose schedules.

An upsert makes the server delete the deployment's future auto-scheduled runs and schedule them
again, so a deployment whose server copy already matches the config is left untouched. Without
that, every agent restart in a fleet would churn every schedule.

Like `flow.serve`, a deployment carries its flow's parameter schema and, unless the config sets
one, the flow's docstring as description; flowinfo.py computes both from the code. A deployment
whose info is still being computed after FLOW_INFO_WAIT is left out of this sync (the runner
syncs again at its next poll); one whose flow cannot be loaded is registered without a schema.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from agent.api import PrefectApiError, PrefectClient
from agent.deployment_body import (
    EMPTY_SCHEMA,
    adoption_clears,
    deployment_body,
    is_up_to_date,
    pool_of,
)
from agent.deployment_settings import DeploymentSettings
from agent.flowinfo import FlowInfo, FlowInfoFailure, FlowInfoLookup

log = logging.getLogger("agent.deployments")

__all__ = [
    "EMPTY_SCHEMA",
    "FLOW_INFO_WAIT",
    "REGISTRY_FILE",
    "DeploymentRegistry",
    "RegisteredDeployment",
    "deployment_body",
    "is_up_to_date",
]

REGISTRY_FILE = "deployments.json"
# The runner bounds a whole poll by 2 * api.timeout + 5 s; leave most of it to the API calls.
FLOW_INFO_WAIT = 10.0


@dataclass(frozen=True)
class RegisteredDeployment:
    name: str
    id: UUID
    flow_id: UUID
    flow_name: str


class DeploymentRegistry:
    """Keeps the server's deployments in line with the config.

    The names this host registered are remembered in `<state_dir>/deployments.json` so that a
    deployment removed from the config can be paused after a restart too.
    """

    def __init__(
        self,
        client: PrefectClient,
        state_dir: Path,
        *,
        flow_info: FlowInfoLookup | None = None,
    ) -> None:
        """Without `flow_info`, deployments are registered without schema or docstring."""
        self._client = client
        self._registry_path = state_dir / REGISTRY_FILE
        self._flow_info = flow_info
        self._told: dict[str, str] = {}  # what was last logged about each deployment's info

    async def sync(
        self, deployments: tuple[DeploymentSettings, ...]
    ) -> dict[str, RegisteredDeployment]:
        """Upsert every deployment, pause the removed ones; return FLOW/NAME -> registration.

        A deployment that fails to register, or whose flow info is not ready yet, is left out
        (and logged); the others still run.
        """
        infos: dict[str, FlowInfo | FlowInfoFailure | None] = {}
        if self._flow_info is not None:
            infos = await self._flow_info.lookup(deployments, FLOW_INFO_WAIT)
        known = self._load()
        registered: dict[str, RegisteredDeployment] = {}
        for deployment in deployments:
            info = infos.get(deployment.key)
            if self._flow_info is not None and not self._ready(deployment, info):
                continue
            try:
                registered[deployment.key] = await self._upsert(deployment, info, known)
            except PrefectApiError as exc:
                log.error(
                    "could not register deployment %r: %s",
                    deployment.key,
                    exc,
                    extra={"deployment": deployment.key},
                )
        remembered = {key: reg.id for key, reg in registered.items()}
        configured = {d.key for d in deployments}
        # Files of earlier versions name a deployment by its bare name.
        bare = {d.name: d.key for d in deployments}
        for key, deployment_id in known.items():
            if "/" not in key and key in bare:
                key = bare[key]
            if key in configured:
                # Configured but failed to register this time: keep it on the books.
                remembered.setdefault(key, deployment_id)
                continue
            try:
                await self._client.update_deployment(deployment_id, {"paused": True})
                log.info(
                    "paused deployment %r: it was removed from the config",
                    key,
                    extra={"deployment": key},
                )
            except PrefectApiError as exc:
                log.warning("could not pause removed deployment %r: %s", key, exc)
                remembered[key] = deployment_id  # the next start or reload tries again
        self._save(remembered)
        return registered

    def _ready(
        self, deployment: DeploymentSettings, info: FlowInfo | FlowInfoFailure | None
    ) -> bool:
        """False while the info is being computed; logs each change of what is known, once."""
        name = deployment.key
        if info is None:
            note = "pending"
        elif isinstance(info, FlowInfoFailure):
            note = f"failed: {info.reason}"
        else:
            note = "ok"
        if self._told.get(name) == note:
            return info is not None
        self._told[name] = note
        extra = {"deployment": name}
        if info is None:
            log.info(
                "deployment %r: still computing its flow's parameter schema; "
                "registering it when that is done",
                name,
                extra=extra,
            )
        elif isinstance(info, FlowInfoFailure):
            log.warning(
                "deployment %r: registering it without a parameter schema: cannot load the "
                "flow %s: %s",
                name,
                deployment.entrypoint,
                info.reason,
                extra=extra,
            )
        return info is not None

    async def _upsert(
        self,
        deployment: DeploymentSettings,
        info: FlowInfo | FlowInfoFailure | None,
        known: Mapping[str, UUID],
    ) -> RegisteredDeployment:
        key, extra = deployment.key, {"deployment": deployment.key}
        flow_id = await self._client.upsert_flow(deployment.flow_name)
        wanted = deployment_body(deployment, flow_id, info)
        existing = await self._client.read_deployment_by_name(deployment.flow_name, deployment.name)
        adopted = existing is not None and not self._registered_here(existing, known)
        if existing is not None and adopted:
            clears = adoption_clears(existing)
            wanted.update(clears)
            self._tell_adoption(key, existing, clears)
        if (
            existing is not None
            and is_up_to_date(existing, wanted)
            and "job_variables" not in wanted
        ):
            deployment_id = UUID(str(existing["id"]))
            log.info("deployment %r is up to date (%s)", key, deployment_id, extra=extra)
        else:
            deployment_id = await self._client.upsert_deployment(wanted)
            log.info("registered deployment %r (%s)", key, deployment_id, extra=extra)
        return RegisteredDeployment(deployment.name, deployment_id, flow_id, deployment.flow_name)

    @staticmethod
    def _registered_here(existing: Mapping[str, Any], known: Mapping[str, UUID]) -> bool:
        return str(existing.get("id")) in {str(value) for value in known.values()}

    @staticmethod
    def _tell_adoption(key: str, existing: Mapping[str, Any], clears: Mapping[str, Any]) -> None:
        extra = {"deployment": key}
        if clears:
            log.warning(
                "adopting deployment %r registered by other means: clearing %s "
                "(the agent prepares the code and the run settings itself)",
                key,
                ", ".join(sorted(clears)),
                extra=extra,
            )
        pool = pool_of(existing)
        if pool is not None:
            log.warning(
                "deployment %r stays in %s (the API cannot clear that): a worker polling it "
                "may also run its flow runs; delete the deployment for the agent to "
                "register it anew",
                key,
                pool,
                extra=extra,
            )

    def _load(self) -> dict[str, UUID]:
        """FLOW/NAME (or the bare name, in files of earlier versions) -> deployment id."""
        try:
            raw = json.loads(self._registry_path.read_text())
            return {str(key): UUID(str(value)) for key, value in dict(raw).items()}
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable %s: %s", self._registry_path, exc)
            return {}

    def _save(self, registered: Mapping[str, UUID]) -> None:
        # The file only remembers names for pausing removed deployments: a failed write (a full
        # disk) must not cost the registrations; the next sync writes it again.
        tmp = self._registry_path.with_suffix(".tmp")
        data = json.dumps({name: str(value) for name, value in sorted(registered.items())})
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            tmp.replace(self._registry_path)
        except OSError as exc:
            log.error(
                "could not remember the registered deployments in %s: %s",
                self._registry_path,
                exc.strerror or exc,
            )
            with contextlib.suppress(OSError):
                tmp.unlink()
