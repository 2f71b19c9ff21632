"""A deployment's identity is FLOW/NAME, as Prefect's: `etl/prod` and `report/prod` are two
deployments, in the config, the storage, the registry and the runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from agent.deployments import DeploymentRegistry
from agent.flowlogs import FlowRunLogs
from agent.gitstorage import dir_name
from agent.notify import Liveness
from agent.runner import Runner
from agent.schemas import FlowRun
from agent.settings import ConfigError, DeploymentSettings, load_settings
from agent.storage import Storage
from tests.unit.fakes import FakeLauncher, FakePrefect


def etl(**extra: Any) -> DeploymentSettings:
    fields: dict[str, Any] = {"name": "etl", "entrypoint": "flow.py:count", "path": "/srv/flows"}
    return DeploymentSettings(**{**fields, **extra})


def test_the_key_is_flow_slash_name_unless_the_flow_has_the_name_too() -> None:
    assert etl().key == "etl"  # flow_name defaults to the name
    assert etl(flow_name="etl").key == "etl"
    assert etl(name="prod", flow_name="etl").key == "etl/prod"


def prod(flow: str, path: str = "/srv/flows") -> str:
    return (
        f'[[deployment]]\nname = "prod"\nflow_name = "{flow}"\n'
        f'entrypoint = "{flow}.py:main"\npath = "{path}"\n'
    )


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    return str(info.value)


def test_same_name_of_different_flows_are_two_deployments(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(prod("etl") + prod("report"))
    settings = load_settings(path, {})
    assert [d.key for d in settings.deployments] == ["etl/prod", "report/prod"]
    report = settings.deployment("report/prod")
    assert report is not None and report.entrypoint == "report.py:main"
    assert settings.deployment("prod") is None  # a bare name that two deployments share


def test_the_same_flow_and_name_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(prod("etl") + prod("etl", "/srv/other"))
    assert config_error(path) == (
        f"{path}: deployment[etl/prod]: duplicate deployment name 'prod'; names must be unique "
        "per flow (both [[deployment]]s have flow_name 'etl')"
    )


def test_a_dropin_replaces_the_deployment_of_the_same_flow_and_name(tmp_path: Path) -> None:
    main = tmp_path / "agent.toml"
    main.write_text(prod("etl") + prod("report"))
    (tmp_path / "agent.d").mkdir()
    (tmp_path / "agent.d" / "50-prod.toml").write_text(prod("report", "/srv/new") + prod("audit"))
    settings = load_settings(main, {})
    assert [(d.key, str(d.path)) for d in settings.deployments] == [
        ("etl/prod", "/srv/flows"),
        ("report/prod", "/srv/new"),
        ("audit/prod", "/srv/flows"),
    ]


async def test_the_storage_of_a_flow_slash_name_key_is_one_directory(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    sha = "a" * 40
    for name in ("etl%2Fprod", "report%2Fprod", "gone"):
        (storage.root / name / sha).mkdir(parents=True)
    assert dir_name("etl/prod") == "etl%2Fprod"
    removed = await storage.gc(deployments=["etl/prod", "report/prod"])
    assert removed == [storage.root / "gone"]
    assert sorted(p.name for p in storage.root.iterdir()) == ["etl%2Fprod", "report%2Fprod"]


async def test_the_runner_finds_a_runs_deployment_by_its_id(
    tmp_path: Path, fake_prefect: FakePrefect, fake_launcher: FakeLauncher
) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f'[agent]\nstate_dir = "{tmp_path}"\n' + prod("etl") + prod("report"))
    settings = load_settings(path, {})
    async with fake_prefect.client() as client:
        registry = DeploymentRegistry(client, tmp_path)
        runner = Runner(
            settings,
            client=client,
            launcher=fake_launcher,  # type: ignore[arg-type]
            flow_logs=FlowRunLogs(client.create_logs),
            liveness=Liveness(),
            registry=registry,
            storage=Storage(tmp_path),
        )
        runner._registered = await registry.sync(settings.deployments)
    for key in ("etl/prod", "report/prod"):
        run = FlowRun(id=uuid4(), deployment_id=runner._registered[key].id)
        assert runner._deployment_for(run) is settings.deployment(key)
    assert runner._deployment_for(FlowRun(id=uuid4(), deployment_id=uuid4())) is None
    assert runner._deployment_for(FlowRun(id=uuid4())) is None
