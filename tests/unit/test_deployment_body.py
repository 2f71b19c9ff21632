"""The POST /deployments/ body of a `[[deployment]]`, what an adoption clears, and whether the
server's copy (as Prefect 3.8.8's DeploymentResponse echoes it) is up to date."""

from __future__ import annotations

import copy
from typing import Any
from uuid import UUID

import pytest

from agent.deployment_body import (
    EMPTY_SCHEMA,
    adoption_clears,
    deployment_body,
    is_up_to_date,
    pool_of,
)
from agent.flowinfo import FlowInfo, FlowInfoFailure
from agent.settings import DeploymentSettings
from tests.unit.fakes.schemas import SCHEMA

FLOW_ID = UUID("3c1f9a52-8a4e-4c8e-9a36-0d5f2b7e4a10")
COMMIT = "0123456789abcdef0123456789abcdef01234567"
INFO = FlowInfo("count", "Counts things.", SCHEMA, commit=COMMIT)


def settings(**extra: Any) -> DeploymentSettings:
    fields: dict[str, Any] = {"name": "etl", "entrypoint": "flow.py:count", "path": "/srv/flows"}
    return DeploymentSettings(**{**fields, **extra})


def git(**extra: Any) -> DeploymentSettings:
    fields: dict[str, Any] = {"name": "etl", "entrypoint": "flow.py:count"}
    return DeploymentSettings(**{**fields, "git": {"url": "https://example.com/f.git"}, **extra})


FULL = {
    "flow_name": "counter",
    "paused": True,
    "concurrency_limit": 2,
    "collision_strategy": "CANCEL_NEW",
    "parameters": {"n": 1},
    "tags": ["nightly", "etl"],
    "schedules": [{"cron": "0 3 * * *"}, {"interval": "10m", "slug": "often"}],
    "enforce_parameter_schema": False,
}


def test_the_body_of_a_deployment_with_everything_set() -> None:
    assert deployment_body(settings(**FULL), FLOW_ID, INFO) == {
        "name": "etl",
        "flow_id": str(FLOW_ID),
        "paused": True,
        "schedules": [
            {
                "schedule": {"cron": "0 3 * * *", "timezone": "UTC", "day_or": True},
                "active": True,
                "parameters": {},
                "slug": None,
            },
            {"schedule": {"interval": 600.0}, "active": True, "parameters": {}, "slug": "often"},
        ],
        "concurrency_limit": 2,
        "concurrency_options": {"collision_strategy": "CANCEL_NEW"},
        "parameters": {"n": 1},
        "tags": ["nightly", "etl"],
        "description": "Counts things.",
        "version": COMMIT,
        "path": "/srv/flows",
        "entrypoint": "flow.py:count",
        "parameter_openapi_schema": SCHEMA,
        "enforce_parameter_schema": False,
        "pull_steps": None,
    }


def test_the_body_of_a_bare_deployment_without_flow_info() -> None:
    assert deployment_body(git(), FLOW_ID) == {
        "name": "etl",
        "flow_id": str(FLOW_ID),
        "paused": False,
        "schedules": [],
        "concurrency_limit": None,
        "concurrency_options": None,
        "parameters": {},
        "tags": [],
        "description": None,
        "version": None,
        "path": None,  # a git deployment's code is chosen per run
        "entrypoint": "flow.py:count",
        "parameter_openapi_schema": EMPTY_SCHEMA,
        "enforce_parameter_schema": True,
        "pull_steps": None,
    }


@pytest.mark.parametrize(
    ("deployment", "info", "version", "description"),
    [
        (git(), INFO, COMMIT, "Counts things."),
        (git(version="v2", description="Mine."), INFO, "v2", "Mine."),
        (git(), FlowInfo("count", None, SCHEMA), None, None),  # info without a commit
        (git(), FlowInfoFailure("SyntaxError: x"), None, None),
        (git(version="v2"), None, "v2", None),
    ],
)
def test_version_defaults_to_the_commit_and_description_to_the_docstring(
    deployment: DeploymentSettings,
    info: FlowInfo | FlowInfoFailure | None,
    version: str | None,
    description: str | None,
) -> None:
    body = deployment_body(deployment, FLOW_ID, info)
    assert (body["version"], body["description"]) == (version, description)


def test_concurrency_limit_without_a_strategy_sends_no_options() -> None:
    body = deployment_body(settings(concurrency_limit=1), FLOW_ID, INFO)
    assert (body["concurrency_limit"], body["concurrency_options"]) == (1, None)
    enqueue = settings(concurrency_limit=1, collision_strategy="ENQUEUE")
    assert deployment_body(enqueue, FLOW_ID, INFO)["concurrency_options"] == {
        "collision_strategy": "ENQUEUE"
    }


# -- adoption ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("existing", "clears"),
    [
        ({}, {}),
        ({"pull_steps": None, "job_variables": {}}, {}),
        ({"pull_steps": [], "job_variables": {}}, {}),
        (
            {"pull_steps": [{"prefect.deployments.steps.git_clone": {"repository": "x"}}]},
            {"pull_steps": None},
        ),
        ({"job_variables": {"image": "python:3.11"}}, {"job_variables": {}}),
        (
            {"pull_steps": [{"a": {}}], "job_variables": {"env": {"A": "1"}}},
            {"pull_steps": None, "job_variables": {}},
        ),
    ],
)
def test_adoption_clears_only_what_the_agent_does_not_manage(
    existing: dict[str, Any], clears: dict[str, Any]
) -> None:
    assert adoption_clears(existing) == clears


@pytest.mark.parametrize(
    ("existing", "pool"),
    [
        ({}, None),
        ({"work_pool_name": None, "work_queue_name": None}, None),
        (
            {"work_pool_name": "k8s", "work_queue_name": "default"},
            "work pool 'k8s', queue 'default'",
        ),
        ({"work_pool_name": "k8s"}, "work pool 'k8s', queue None"),
        ({"work_queue_name": "legacy"}, "work queue 'legacy'"),
    ],
)
def test_pool_of_names_the_pool_and_queue(existing: dict[str, Any], pool: str | None) -> None:
    assert pool_of(existing) == pool


# -- the server's echo -------------------------------------------------------------------------

DEPLOYMENT_ID = "9e7c2a1b-5d4f-4e3a-8b2c-1a0f9e8d7c6b"


def echo_schedule(item: dict[str, Any]) -> dict[str, Any]:
    schedule = dict(item["schedule"])
    if "interval" in schedule:  # the server anchors it and names a zone
        schedule.setdefault("anchor_date", "2026-12-04T16:00:00.123456Z")
        schedule.setdefault("timezone", "UTC")
    return {
        "id": "0b9d6a8e-4c33-4d8f-9a43-2f2d7c0f8a11",
        "created": "2026-12-04T16:00:00.123456Z",
        "updated": "2026-12-04T16:00:00.123456Z",
        "deployment_id": DEPLOYMENT_ID,
        "schedule": schedule,
        "active": item["active"],
        "max_scheduled_runs": None,
        "parameters": item["parameters"],
        "slug": item["slug"],
    }


def echo(body: dict[str, Any]) -> dict[str, Any]:
    """GET /deployments/name/FLOW/NAME after POST /deployments/ with `body` (Prefect 3.8.8)."""
    sent = copy.deepcopy(body)
    limit = sent.pop("concurrency_limit")
    gcl = None
    if limit is not None:
        gcl = {
            "id": "5a4b3c2d-1e0f-4a9b-8c7d-6e5f4a3b2c1d",
            "created": "2026-12-04T16:00:00.123456Z",
            "updated": "2026-12-04T16:00:00.123456Z",
            "active": True,
            "name": f"deployment:{DEPLOYMENT_ID}",
            "limit": limit,
            "active_slots": 0,
            "slot_decay_per_second": 0.0,
        }
    options = sent.pop("concurrency_options")
    return {
        **sent,
        "id": DEPLOYMENT_ID,
        "created": "2026-12-04T16:00:00.123456Z",
        "updated": "2026-12-04T16:00:00.123456Z",
        "schedules": [echo_schedule(item) for item in sent["schedules"]],
        "concurrency_limit": None,  # deprecated: always None
        "global_concurrency_limit": gcl,
        "concurrency_options": {**options, "grace_period_seconds": None} if options else None,
        "job_variables": {},
        "labels": {"prefect.flow.id": sent["flow_id"]},
        "work_queue_name": None,
        "work_queue_id": None,
        "last_polled": None,
        "storage_document_id": None,
        "infrastructure_document_id": None,
        "created_by": None,
        "updated_by": None,
        "work_pool_name": None,
        "status": "NOT_READY",
    }


BODIES = [
    deployment_body(settings(**FULL), FLOW_ID, INFO),
    deployment_body(settings(concurrency_limit=3), FLOW_ID, INFO),
    deployment_body(git(), FLOW_ID),
    deployment_body(git(), FLOW_ID, FlowInfoFailure("SyntaxError: x")),
]


@pytest.mark.parametrize("body", BODIES)
def test_the_servers_echo_of_what_was_sent_is_up_to_date(body: dict[str, Any]) -> None:
    assert is_up_to_date(echo(body), body)


def test_order_of_tags_and_schedules_does_not_matter() -> None:
    body = BODIES[0]
    server = echo(body)
    server["tags"].reverse()
    server["schedules"].reverse()
    assert is_up_to_date(server, body)


def test_an_older_servers_plain_concurrency_limit_is_read_too() -> None:
    body = BODIES[1]
    server = {**echo(body), "global_concurrency_limit": None, "concurrency_limit": 3}
    assert is_up_to_date(server, body)
    assert not is_up_to_date({**server, "concurrency_limit": 4}, body)


def _set(path: str, value: Any) -> Any:
    def change(server: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = server
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        target[last] = value

    return change


DIFFERENCES = [
    ("name", "other"),
    ("flow_id", "6f0c7f3e-3f0b-4b8e-8a59-5b2c1c8f0d22"),
    ("paused", False),
    ("parameters", {"n": 2}),
    ("description", "Old docstring."),
    ("version", "0" * 40),
    ("path", "/srv/old"),
    ("entrypoint", "flow.py:other"),
    ("parameter_openapi_schema", EMPTY_SCHEMA),
    ("enforce_parameter_schema", True),
    ("pull_steps", [{"prefect.deployments.steps.set_working_directory": {"directory": "/x"}}]),
    ("global_concurrency_limit.limit", 5),
    ("global_concurrency_limit", None),
    ("concurrency_options", None),  # the server's default strategy: ENQUEUE
    ("concurrency_options.collision_strategy", "ENQUEUE"),
    ("tags", ["nightly"]),
    ("tags", ["nightly", "etl", "extra"]),
    ("tags", "nightly,etl"),
    ("tags", [1, 2]),
    ("schedules", []),
    ("schedules", None),
    ("schedules", "0 3 * * *"),
    ("schedules.0.active", False),
    ("schedules.0.schedule.cron", "0 4 * * *"),
    ("schedules.1.slug", None),
    ("schedules.1.schedule.interval", "PT600S"),
]


@pytest.mark.parametrize(("path", "value"), DIFFERENCES)
def test_each_single_difference_is_not_up_to_date(path: str, value: Any) -> None:
    body = BODIES[0]
    server = echo(body)
    _set(path, value)(server)
    assert not is_up_to_date(server, body)


def test_an_extra_schedule_on_the_server_is_not_up_to_date() -> None:
    body = BODIES[0]
    server = echo(body)
    server["schedules"].append(copy.deepcopy(server["schedules"][0]))
    assert not is_up_to_date(server, body)
    # Two equal schedules wanted, one on the server: each wanted one needs its own.
    twice = {**body, "schedules": [body["schedules"][0]] * 2}
    server["schedules"] = [echo_schedule(body["schedules"][0]), echo_schedule(body["schedules"][1])]
    assert not is_up_to_date(server, twice)


def test_a_strategy_without_a_limit_is_not_compared() -> None:
    body = BODIES[2]  # no concurrency limit
    server = {**echo(body), "concurrency_options": {"collision_strategy": "CANCEL_NEW"}}
    assert is_up_to_date(server, body)
    assert not is_up_to_date({**server, "concurrency_limit": 1}, body)
