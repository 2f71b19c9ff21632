"""What the agent sends to POST /deployments/ for a `[[deployment]]`, and whether the server's
copy already says it.

The body is the one `flow.serve` sends (prefect/deployments/runner.py, Prefect 3.8.8), with
`pull_steps` always null: the agent prepares the code itself, and the engine would run any pull
step it finds on the deployment. An adopted deployment (one of that name that this host did not
register) also gets its `job_variables` cleared; after that, the ones set in the UI or API stay.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID

from agent.deployment_settings import DeploymentSettings
from agent.flowinfo import FlowInfo, FlowInfoFailure
from agent.schedules import schedule_matches

# What the server stores for "no schema" (it turns null and {} into this).
EMPTY_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}

# Compared as they are: the body's value against the server's.
_PLAIN_KEYS = (
    "name",
    "flow_id",
    "paused",
    "parameters",
    "description",
    "version",
    "path",
    "entrypoint",
    "parameter_openapi_schema",
    "enforce_parameter_schema",
)


def schedule_body(deployment: DeploymentSettings) -> list[dict[str, Any]]:
    return [schedule.body() for schedule in deployment.all_schedules()]


def deployment_body(
    deployment: DeploymentSettings,
    flow_id: UUID,
    info: FlowInfo | FlowInfoFailure | None = None,
) -> dict[str, Any]:
    """The upsert body; `info` is the flow's (None or a failure: no schema, no docstring)."""
    known = info if isinstance(info, FlowInfo) else None
    strategy = deployment.collision_strategy
    return {
        "name": deployment.name,
        "flow_id": str(flow_id),
        "paused": deployment.paused,
        "schedules": schedule_body(deployment),
        "concurrency_limit": deployment.concurrency_limit,
        "concurrency_options": {"collision_strategy": strategy} if strategy else None,
        "parameters": dict(deployment.parameters),
        "tags": list(deployment.tags),
        "description": deployment.description or (known and known.description) or None,
        "version": deployment.version or (known and known.commit) or None,
        # A git deployment's code lives in a per-commit checkout chosen at claim time.
        "path": str(deployment.path) if deployment.path is not None else None,
        "entrypoint": deployment.entrypoint,
        "parameter_openapi_schema": known.parameter_openapi_schema if known else EMPTY_SCHEMA,
        "enforce_parameter_schema": deployment.enforce_parameter_schema,
        "pull_steps": None,
    }


def adoption_clears(existing: Mapping[str, Any]) -> dict[str, Any]:
    """What an adoption resets: the fields of `existing` the agent does not manage, with the
    value that clears them. The work pool cannot be cleared through the API (see pool_of)."""
    cleared: dict[str, Any] = {}
    if existing.get("pull_steps"):
        cleared["pull_steps"] = None
    if existing.get("job_variables"):
        cleared["job_variables"] = {}
    return cleared


def pool_of(existing: Mapping[str, Any]) -> str | None:
    """The work pool (and queue) of the server's copy, as one text, or None."""
    pool, queue = existing.get("work_pool_name"), existing.get("work_queue_name")
    if not pool and not queue:
        return None
    return f"work pool {pool!r}, queue {queue!r}" if pool else f"work queue {queue!r}"


def _limit_of(existing: Mapping[str, Any]) -> Any:
    limit = existing.get("global_concurrency_limit")
    if isinstance(limit, Mapping):
        return limit.get("limit")
    return existing.get("concurrency_limit")


def _strategy_of(existing: Mapping[str, Any]) -> Any:
    options = existing.get("concurrency_options")
    return options.get("collision_strategy") if isinstance(options, Mapping) else None


def is_up_to_date(existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """True when the server's copy already says what the config says.

    Anything odd in the server's copy (wrong types, another deployment's name) means "not up to
    date": the upsert then writes the config's version over it.
    """
    if any(existing.get(key) != wanted.get(key) for key in _PLAIN_KEYS):
        return False
    if existing.get("pull_steps"):
        return False
    if _limit_of(existing) != wanted["concurrency_limit"]:
        return False
    wanted_strategy = (wanted["concurrency_options"] or {}).get("collision_strategy")
    if wanted["concurrency_limit"] is not None and (_strategy_of(existing) or "ENQUEUE") != (
        wanted_strategy or "ENQUEUE"
    ):
        return False
    tags = existing.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        return False
    if sorted(tags) != sorted(wanted["tags"]):
        return False
    schedules = existing.get("schedules") or []
    if not isinstance(schedules, list) or len(schedules) != len(wanted["schedules"]):
        return False
    try:
        for schedule in wanted["schedules"]:
            found = next(
                (i for i, s in enumerate(schedules) if schedule_matches(s, schedule)), None
            )
            if found is None:
                return False
            schedules = schedules[:found] + schedules[found + 1 :]
    except (OverflowError, TypeError, ValueError):
        return False
    return True
