"""The deployment registry's memory file: a failed write costs nothing but a log line."""

from __future__ import annotations

import logging
from pathlib import Path
from uuid import uuid4

import httpx
import pytest

from agent.api import PrefectClient
from agent.deployments import REGISTRY_FILE, DeploymentRegistry
from agent.settings import load_settings


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
