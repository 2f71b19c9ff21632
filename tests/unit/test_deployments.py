"""The deployment registry: its memory file, and what it registers of the flow's own code."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest

from agent.api import PrefectClient
from agent.deployments import (
    EMPTY_SCHEMA,
    FLOW_INFO_WAIT,
    REGISTRY_FILE,
    DeploymentRegistry,
    deployment_body,
    is_up_to_date,
)
from agent.flowinfo import FlowInfo, FlowInfoFailure
from agent.settings import DeploymentSettings, load_settings
from tests.unit.fakes import FakePrefect
from tests.unit.fakes.schemas import SCHEMA


def client() -> PrefectClient:
    settings = load_settings(None, {"RUNNER_AGENT_API__URL": "http://127.0.0.1:9/api"})
    return PrefectClient(settings.api, transport=httpx.MockTransport(lambda r: httpx.Response(500)))


def test_saves_the_registrations_privately(tmp_path: Path) -> None:
    registry = DeploymentRegistry(client(), tmp_path)
    ident = uuid4()
    registry._save({"etl": ident})
    path = tmp_path / REGISTRY_FILE
    assert path.read_text() == f'{{"etl": "{ident}"}}'
    assert path.stat().st_mode & 0o777 == 0o600
    assert not path.with_suffix(".tmp").exists()


def test_a_failed_write_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A state "directory" that is a file: every write fails, as on a full or read-only disk.
    blocker = tmp_path / "state"
    blocker.write_text("")
    registry = DeploymentRegistry(client(), blocker)
    with caplog.at_level(logging.ERROR, logger="agent.deployments"):
        registry._save({"etl": uuid4()})
    [record] = caplog.records
    assert str(blocker / REGISTRY_FILE) in record.getMessage()
    assert "Not a directory" in record.getMessage()


# -- the flow's parameter schema and description --------------------------------------------

INFO = FlowInfo("count", "Counts things.", SCHEMA)


class FakeLookup:
    """Answers from a table; None = still computing."""

    def __init__(self, answers: dict[str, FlowInfo | FlowInfoFailure | None]) -> None:
        self.answers = answers
        self.waits: list[float] = []

    async def lookup(
        self, deployments: Sequence[DeploymentSettings], wait: float
    ) -> dict[str, FlowInfo | FlowInfoFailure | None]:
        self.waits.append(wait)
        return {d.name: self.answers.get(d.name) for d in deployments}


def etl(**extra: Any) -> DeploymentSettings:
    fields: dict[str, Any] = {"name": "etl", "entrypoint": "flow.py:count", "path": "/srv/flows"}
    return DeploymentSettings(**{**fields, **extra})


async def sync(
    server: FakePrefect, lookup: FakeLookup, state: Path, *deployments: DeploymentSettings
) -> dict[str, Any]:
    async with server.client() as client:
        registry = DeploymentRegistry(client, state, flow_info=lookup)
        return await registry.sync(deployments)


def test_enforce_parameter_schema_defaults_to_what_flow_serve_registers() -> None:
    assert etl().enforce_parameter_schema is True
    assert etl(enforce_parameter_schema=False).enforce_parameter_schema is False
    with pytest.raises(ValueError, match="enforce_parameter_schema"):
        etl(enforce_parameter_schema="yes")


def test_the_body_carries_the_schema_and_the_docstring() -> None:
    flow_id = uuid4()
    body = deployment_body(etl(), flow_id, INFO)
    assert body["parameter_openapi_schema"] == SCHEMA
    assert body["description"] == "Counts things."
    assert body["enforce_parameter_schema"] is True
    # The config's description wins; without info (or after a failure) there is no schema.
    assert deployment_body(etl(description="Mine."), flow_id, INFO)["description"] == "Mine."
    failed = deployment_body(etl(), flow_id, FlowInfoFailure("SyntaxError: x"))
    assert failed["parameter_openapi_schema"] == EMPTY_SCHEMA
    assert failed["description"] is None
    assert (
        deployment_body(etl(enforce_parameter_schema=False), flow_id, INFO)[
            "enforce_parameter_schema"
        ]
        is False
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("parameter_openapi_schema", {**SCHEMA, "required": []}),
        ("parameter_openapi_schema", EMPTY_SCHEMA),
        ("enforce_parameter_schema", False),
        ("description", None),
    ],
)
def test_a_server_copy_that_differs_in_schema_or_description_is_not_up_to_date(
    key: str, value: Any
) -> None:
    wanted = deployment_body(etl(), uuid4(), INFO)
    assert is_up_to_date({**wanted, "id": str(uuid4())}, wanted)
    assert not is_up_to_date({**wanted, key: value}, wanted)


async def test_an_unchanged_deployment_is_upserted_once(
    tmp_path: Path, fake_prefect: FakePrefect
) -> None:
    lookup = FakeLookup({"etl": INFO})
    first = await sync(fake_prefect, lookup, tmp_path, etl())
    again = await sync(fake_prefect, lookup, tmp_path, etl())  # a restart, same code
    assert first["etl"].id == again["etl"].id
    [body] = fake_prefect.upserts
    assert body["parameter_openapi_schema"] == SCHEMA
    assert body["description"] == "Counts things."
    assert lookup.waits == [FLOW_INFO_WAIT, FLOW_INFO_WAIT]
    lookup.answers["etl"] = FlowInfo("count", "Counts things.", {**SCHEMA, "required": []})
    await sync(fake_prefect, lookup, tmp_path, etl())  # the code changed its signature
    assert len(fake_prefect.upserts) == 2


async def test_a_flow_that_cannot_be_loaded_registers_without_a_schema_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fake_prefect: FakePrefect
) -> None:
    lookup = FakeLookup({"etl": FlowInfoFailure("ModuleNotFoundError: No module named 'x'")})
    with caplog.at_level(logging.INFO, logger="agent.deployments"):
        registered = await sync(fake_prefect, lookup, tmp_path, etl())
        await sync(fake_prefect, lookup, tmp_path, etl())
    assert "etl" in registered
    assert fake_prefect.upserts[0]["parameter_openapi_schema"] == EMPTY_SCHEMA
    assert len(fake_prefect.upserts) == 1  # the server's normalised "no schema" is up to date
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        warnings
        == [
            "deployment 'etl': registering it without a parameter schema: cannot load the flow "
            "flow.py:count: ModuleNotFoundError: No module named 'x'"
        ]
        * 2
    )  # once per registry, i.e. per agent process


async def test_the_same_failure_is_logged_once_per_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fake_prefect: FakePrefect
) -> None:
    lookup = FakeLookup({"etl": FlowInfoFailure("SyntaxError: bad")})
    async with fake_prefect.client() as client:
        registry = DeploymentRegistry(client, tmp_path, flow_info=lookup)
        with caplog.at_level(logging.WARNING, logger="agent.deployments"):
            for _ in range(3):  # the runner syncs again while anything is missing
                await registry.sync((etl(),))
    assert len(caplog.records) == 1


async def test_a_deployment_still_being_inspected_waits_for_a_later_sync(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fake_prefect: FakePrefect
) -> None:
    lookup = FakeLookup({"etl": None, "other": INFO})
    other = etl(name="other")
    async with fake_prefect.client() as client:
        registry = DeploymentRegistry(client, tmp_path, flow_info=lookup)
        with caplog.at_level(logging.INFO, logger="agent.deployments"):
            first = await registry.sync((etl(), other))
            assert set(first) == {"other"}  # the runner syncs again: fewer than configured
            lookup.answers["etl"] = INFO
            second = await registry.sync((etl(), other))
    assert set(second) == {"etl", "other"}
    assert [b["name"] for b in fake_prefect.upserts] == ["other", "etl"]
    assert "'etl': still computing its flow's parameter schema" in caplog.text


# -- identity: FLOW/NAME (more in test_identity.py) ------------------------------------------


async def test_same_named_deployments_of_two_flows_register_apart(
    tmp_path: Path, fake_prefect: FakePrefect
) -> None:
    etl_prod, report_prod = etl(name="prod", flow_name="etl"), etl(name="prod", flow_name="report")
    async with fake_prefect.client() as client:
        registered = await DeploymentRegistry(client, tmp_path).sync((etl_prod, report_prod))
    assert set(registered) == {"etl/prod", "report/prod"}
    first, second = registered["etl/prod"], registered["report/prod"]
    assert (first.name, first.flow_name, second.name, second.flow_name) == (
        "prod",
        "etl",
        "prod",
        "report",
    )
    assert first.id != second.id and first.flow_id != second.flow_id
    assert [b["flow_id"] for b in fake_prefect.upserts] == [str(first.flow_id), str(second.flow_id)]
    assert json.loads((tmp_path / REGISTRY_FILE).read_text()) == {
        "etl/prod": str(first.id),
        "report/prod": str(second.id),
    }


# -- adopting a deployment registered by other means --------------------------------------------


def foreign(fake: FakePrefect, flow_name: str, **fields: Any) -> dict[str, Any]:
    """A deployment made by `prefect deploy` or a worker setup, not by this agent."""
    flow_id = fake.flows.setdefault(flow_name, str(uuid4()))
    existing = {
        "id": str(uuid4()),
        "name": "etl",
        "flow_id": flow_id,
        "paused": False,
        "schedules": [],
        "tags": [],
        "parameters": {},
        "description": None,
        "version": None,
        "path": "/opt/old",
        "entrypoint": "old.py:flow",
        "parameter_openapi_schema": EMPTY_SCHEMA,
        "enforce_parameter_schema": True,
        "pull_steps": None,
        "job_variables": {},
        "work_pool_name": None,
        "work_queue_name": None,
        **fields,
    }
    fake.deployments[(flow_id, "etl")] = existing
    return existing


async def test_adopting_clears_pull_steps_and_job_variables_and_warns_of_the_pool(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fake_prefect: FakePrefect
) -> None:
    existing = foreign(
        fake_prefect,
        "etl",
        pull_steps=[{"prefect.deployments.steps.git_clone": {"repository": "https://x/y.git"}}],
        job_variables={"image": "python:3.11", "env": {"A": "1"}},
        work_pool_name="k8s",
        work_queue_name="default",
    )
    lookup = FakeLookup({"etl": INFO})
    with caplog.at_level(logging.WARNING, logger="agent.deployments"):
        registered = await sync(fake_prefect, lookup, tmp_path, etl())
    assert str(registered["etl"].id) == existing["id"]  # the same deployment, adopted
    flow_id = UUID(existing["flow_id"])
    assert fake_prefect.upserts == [
        {**deployment_body(etl(), flow_id, INFO), "pull_steps": None, "job_variables": {}}
    ]
    assert [r.getMessage() for r in caplog.records] == [
        "adopting deployment 'etl' registered by other means: clearing job_variables, "
        "pull_steps (the agent prepares the code and the run settings itself)",
        "deployment 'etl' stays in work pool 'k8s', queue 'default' (the API cannot clear "
        "that): a worker polling it may also run its flow runs; delete the deployment for "
        "the agent to register it anew",
    ]
    assert all(r.deployment == "etl" for r in caplog.records)  # type: ignore[attr-defined]
    # Registered here now: job variables set later in the UI stay, nothing is said again.
    caplog.clear()
    fake_prefect.deployments[(existing["flow_id"], "etl")]["job_variables"] = {"image": "new"}
    with caplog.at_level(logging.WARNING, logger="agent.deployments"):
        await sync(fake_prefect, lookup, tmp_path, etl())
    assert len(fake_prefect.upserts) == 1
    assert caplog.records == []


async def test_adopting_only_job_variables_still_upserts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fake_prefect: FakePrefect
) -> None:
    # Up to date in every other respect: the upsert is what clears the job variables.
    wanted = deployment_body(etl(), UUID(fake_prefect.flows.setdefault("etl", str(uuid4()))), INFO)
    foreign(fake_prefect, "etl", **wanted, job_variables={"cpu": 4})
    with caplog.at_level(logging.WARNING, logger="agent.deployments"):
        await sync(fake_prefect, FakeLookup({"etl": INFO}), tmp_path, etl())
    assert fake_prefect.upserts == [{**wanted, "job_variables": {}}]
    assert [r.getMessage() for r in caplog.records] == [
        "adopting deployment 'etl' registered by other means: clearing job_variables "
        "(the agent prepares the code and the run settings itself)"
    ]


async def test_adopting_an_up_to_date_copy_in_a_work_queue_only_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fake_prefect: FakePrefect
) -> None:
    wanted = deployment_body(etl(), UUID(fake_prefect.flows.setdefault("etl", str(uuid4()))), INFO)
    foreign(fake_prefect, "etl", **wanted, work_queue_name="legacy")
    with caplog.at_level(logging.WARNING, logger="agent.deployments"):
        await sync(fake_prefect, FakeLookup({"etl": INFO}), tmp_path, etl())
    assert fake_prefect.upserts == []
    [warning] = caplog.records
    assert warning.getMessage().startswith("deployment 'etl' stays in work queue 'legacy' (")


async def test_a_registry_file_of_an_earlier_version_names_deployments_by_bare_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fake_prefect: FakePrefect
) -> None:
    kept, gone = uuid4(), uuid4()
    (tmp_path / REGISTRY_FILE).write_text(json.dumps({"prod": str(kept), "old": str(gone)}))
    with caplog.at_level(logging.INFO, logger="agent.deployments"):
        async with fake_prefect.client() as client:
            registry = DeploymentRegistry(client, tmp_path)
            registered = await registry.sync((etl(name="prod", flow_name="etl"),))
    # "prod" is the configured etl/prod: not paused. "old" left the config: paused (the fake
    # server has no PATCH, so that fails and is tried again at the next sync).
    assert json.loads((tmp_path / REGISTRY_FILE).read_text()) == {
        "etl/prod": str(registered["etl/prod"].id),
        "old": str(gone),
    }
    assert [r.getMessage()[:42] for r in caplog.records if r.levelno >= logging.WARNING] == [
        "could not pause removed deployment 'old': "
    ]
