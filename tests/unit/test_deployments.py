"""The deployment registry: its memory file, and what it registers of the flow's own code."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from uuid import uuid4

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

SCHEMA = {
    "title": "Parameters",
    "type": "object",
    "properties": {"n": {"title": "n", "type": "integer", "position": 0}},
    "required": ["n"],
    "definitions": {},
}
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
