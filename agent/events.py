"""Prefect-shaped event builders (emitter.py sends them).

The builders are pure functions of plain values and produce the JSON bodies that
`POST /api/events` takes (prefect/events/schemas/events.py `Event`). The shapes follow what
Prefect 3.8 itself emits, so automations written for Prefect's engine and runner (such as the
documented zombie-run automation on `prefect.flow-run.heartbeat`) match them unchanged.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid4

if TYPE_CHECKING:
    pass

log = logging.getLogger("agent.events")

Event = dict[str, Any]
Id = UUID | str

FLOW_RUN_HEARTBEAT = "prefect.flow-run.heartbeat"
AGENT_HEARTBEAT = "runner-agent.heartbeat"
CANCELLED_FLOW_RUN = "prefect.runner.cancelled-flow-run"


# -- builders ----------------------------------------------------------------------------


def slugify(text: str) -> str:
    """Like python-slugify's default, which Prefect's runner uses for its resource id."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")


def runner_resource(agent_name: str) -> dict[str, str]:
    return {
        "prefect.resource.id": f"prefect.runner.{slugify(agent_name)}",
        "prefect.resource.name": agent_name,
    }


def tag_resources(tags: Iterable[str]) -> list[dict[str, str]]:
    """Tags as related resources, sorted and unique (prefect.events.related)."""
    return [
        {"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"}
        for tag in sorted(set(tags))
    ]


def build_event(
    name: str,
    resource: Mapping[str, str],
    related: Iterable[Mapping[str, str]] = (),
    payload: Mapping[str, Any] | None = None,
    *,
    occurred: datetime | None = None,
    event_id: UUID | None = None,
) -> Event:
    return {
        "id": str(event_id or uuid4()),
        "occurred": (occurred or datetime.now(UTC)).isoformat(),
        "event": name,
        "resource": dict(resource),
        "related": [dict(r) for r in related],
        "payload": dict(payload or {}),
    }


def flow_run_heartbeat(
    *,
    flow_run_id: Id,
    flow_run_name: str | None,
    flow_id: Id | None,
    flow_name: str | None,
    deployment_id: Id | None,
    tags: Iterable[str] = (),
    occurred: datetime | None = None,
) -> Event:
    """`prefect.flow-run.heartbeat`, shaped like FlowRunEngine._build_heartbeat_event_template.

    As there, the deployment carries no name and the tags are the run's own.
    """
    related: list[dict[str, str]] = []
    if flow_id:
        related.append(
            {
                "prefect.resource.id": f"prefect.flow.{flow_id}",
                "prefect.resource.role": "flow",
                "prefect.resource.name": flow_name or "",
            }
        )
    if deployment_id:
        related.append(
            {
                "prefect.resource.id": f"prefect.deployment.{deployment_id}",
                "prefect.resource.role": "deployment",
            }
        )
    related += tag_resources(tags)
    resource = {
        "prefect.resource.id": f"prefect.flow-run.{flow_run_id}",
        "prefect.resource.name": flow_run_name or "",
    }
    return build_event(FLOW_RUN_HEARTBEAT, resource, related, occurred=occurred)


def agent_heartbeat(
    *,
    agent_name: str,
    host: str,
    version: str,
    limit: int | None,
    running: int,
    launcher: str,
    occurred: datetime | None = None,
) -> Event:
    """`runner-agent.heartbeat` on the resource `prefect.runner.<agent name>`."""
    payload = {
        "host": host,
        "version": version,
        "limit": limit,
        "running": running,
        "launcher": launcher,
    }
    return build_event(AGENT_HEARTBEAT, runner_resource(agent_name), (), payload, occurred=occurred)


def cancelled_flow_run(
    *,
    agent_name: str,
    flow_run_id: Id,
    flow_run_name: str | None,
    flow_id: Id | None,
    flow_name: str | None,
    deployment_id: Id | None,
    deployment_name: str | None,
    tags: Iterable[str] = (),
    deployment_tags: Iterable[str] = (),
    occurred: datetime | None = None,
) -> Event:
    """`prefect.runner.cancelled-flow-run`, shaped like prefect.runner._event_emitter.

    The runner is the resource; related are the deployment, flow, flow run (in that order),
    then the union of the deployment's and the run's tags.
    """
    related: list[dict[str, str]] = []
    if deployment_id:
        related.append(
            {
                "prefect.resource.id": f"prefect.deployment.{deployment_id}",
                "prefect.resource.role": "deployment",
                "prefect.resource.name": deployment_name or "",
            }
        )
    if flow_id:
        related.append(
            {
                "prefect.resource.id": f"prefect.flow.{flow_id}",
                "prefect.resource.role": "flow",
                "prefect.resource.name": flow_name or "",
            }
        )
    related.append(
        {
            "prefect.resource.id": f"prefect.flow-run.{flow_run_id}",
            "prefect.resource.role": "flow-run",
            "prefect.resource.name": flow_run_name or "",
        }
    )
    related += tag_resources([*deployment_tags, *tags])
    return build_event(CANCELLED_FLOW_RUN, runner_resource(agent_name), related, occurred=occurred)
