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
from agent.deployment_settings import CronSchedule, DeploymentSettings
from agent.flowinfo import FlowInfo, FlowInfoFailure, FlowInfoLookup

log = logging.getLogger("agent.deployments")

REGISTRY_FILE = "deployments.json"
# What the server stores for "no schema" (it turns null and {} into this).
EMPTY_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}
# The runner bounds a whole poll by 2 * api.timeout + 5 s; leave most of it to the API calls.
FLOW_INFO_WAIT = 10.0


@dataclass(frozen=True)
class RegisteredDeployment:
    name: str
    id: UUID
    flow_id: UUID
    flow_name: str


def schedule_body(deployment: DeploymentSettings) -> list[dict[str, Any]]:
    schedule = deployment.schedule
    if schedule is None:
        return []
    if isinstance(schedule, CronSchedule):
        spec: dict[str, Any] = {"cron": schedule.cron, "timezone": schedule.timezone}
    else:
        spec = {"interval": float(schedule.interval)}
    return [{"schedule": spec, "active": True}]


def deployment_body(
    deployment: DeploymentSettings,
    flow_id: UUID,
    info: FlowInfo | FlowInfoFailure | None = None,
) -> dict[str, Any]:
    """The upsert body; `info` is the flow's (None or a failure: no schema, no docstring)."""
    known = info if isinstance(info, FlowInfo) else None
    return {
        "name": deployment.name,
        "flow_id": str(flow_id),
        "paused": False,
        "schedules": schedule_body(deployment),
        "parameters": dict(deployment.parameters),
        "tags": list(deployment.tags),
        "description": deployment.description or (known and known.description) or None,
        # A git deployment's code lives in a per-commit checkout chosen at claim time.
        "path": str(deployment.path) if deployment.path is not None else None,
        "entrypoint": deployment.entrypoint,
        "parameter_openapi_schema": known.parameter_openapi_schema if known else EMPTY_SCHEMA,
        "enforce_parameter_schema": deployment.enforce_parameter_schema,
    }


class _Unlike(Exception):
    """The server's copy has a shape the config could not have produced."""


def _schedules_of(existing: Mapping[str, Any]) -> list[dict[str, Any]]:
    result = []
    items = existing.get("schedules") or []
    if not isinstance(items, list):
        raise _Unlike
    for item in items:
        schedule = item.get("schedule") if isinstance(item, dict) else None
        if not isinstance(schedule, dict):
            raise _Unlike
        if "cron" in schedule:
            spec: dict[str, Any] = {"cron": schedule["cron"], "timezone": schedule.get("timezone")}
        else:
            interval = schedule.get("interval") or 0
            if isinstance(interval, bool) or not isinstance(interval, int | float):
                raise _Unlike
            spec = {"interval": float(interval)}
        result.append({"schedule": spec, "active": item.get("active") is True})
    return result


def is_up_to_date(existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """True when the server's copy already says what the config says.

    Anything odd in the server's copy (wrong types, another deployment's name) means "not up to
    date": the upsert then writes the config's version over it.
    """
    for key in (
        "name",
        "flow_id",
        "paused",
        "parameters",
        "description",
        "path",
        "entrypoint",
        "parameter_openapi_schema",
        "enforce_parameter_schema",
    ):
        if existing.get(key) != wanted.get(key):
            return False
    tags = existing.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        return False
    if sorted(tags) != sorted(wanted["tags"]):
        return False
    try:
        return bool(_schedules_of(existing) == wanted["schedules"])
    except (_Unlike, OverflowError):
        return False


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
        """Upsert every deployment, pause the removed ones; return name -> registration.

        A deployment that fails to register, or whose flow info is not ready yet, is left out
        (and logged); the others still run.
        """
        infos: dict[str, FlowInfo | FlowInfoFailure | None] = {}
        if self._flow_info is not None:
            infos = await self._flow_info.lookup(deployments, FLOW_INFO_WAIT)
        registered: dict[str, RegisteredDeployment] = {}
        for deployment in deployments:
            info = infos.get(deployment.name)
            if self._flow_info is not None and not self._ready(deployment, info):
                continue
            try:
                registered[deployment.name] = await self._upsert(deployment, info)
            except PrefectApiError as exc:
                log.error(
                    "could not register deployment %r: %s",
                    deployment.name,
                    exc,
                    extra={"deployment": deployment.name},
                )
        remembered = {name: reg.id for name, reg in registered.items()}
        configured = {d.name for d in deployments}
        for name, deployment_id in self._load().items():
            if name in configured:
                # Configured but failed to register this time: keep it on the books.
                remembered.setdefault(name, deployment_id)
                continue
            try:
                await self._client.update_deployment(deployment_id, {"paused": True})
                log.info(
                    "paused deployment %r: it was removed from the config",
                    name,
                    extra={"deployment": name},
                )
            except PrefectApiError as exc:
                log.warning("could not pause removed deployment %r: %s", name, exc)
                remembered[name] = deployment_id  # the next start or reload tries again
        self._save(remembered)
        return registered

    def _ready(
        self, deployment: DeploymentSettings, info: FlowInfo | FlowInfoFailure | None
    ) -> bool:
        """False while the info is being computed; logs each change of what is known, once."""
        name = deployment.name
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
        self, deployment: DeploymentSettings, info: FlowInfo | FlowInfoFailure | None
    ) -> RegisteredDeployment:
        flow_id = await self._client.upsert_flow(deployment.flow_name)
        wanted = deployment_body(deployment, flow_id, info)
        existing = await self._client.read_deployment_by_name(deployment.flow_name, deployment.name)
        if existing is not None and is_up_to_date(existing, wanted):
            deployment_id = UUID(str(existing["id"]))
            log.info(
                "deployment %r is up to date (%s)",
                deployment.name,
                deployment_id,
                extra={"deployment": deployment.name},
            )
        else:
            deployment_id = await self._client.upsert_deployment(wanted)
            log.info(
                "registered deployment %r (%s)",
                deployment.name,
                deployment_id,
                extra={"deployment": deployment.name},
            )
        return RegisteredDeployment(deployment.name, deployment_id, flow_id, deployment.flow_name)

    def _load(self) -> dict[str, UUID]:
        try:
            raw = json.loads(self._registry_path.read_text())
            return {str(name): UUID(str(value)) for name, value in dict(raw).items()}
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
