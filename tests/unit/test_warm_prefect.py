"""The template under the REAL Prefect of the test venv (RUNNER_AGENT_TEST_PREFECT_VENV): its
imports leave the process safe to fork, and a warm `prefect.engine` ends as the cold one does,
with Prefect's settings and logging rebuilt from the run's environment. No server: the engine
fails early, the same way warm and cold."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent.launch.base import LaunchRequest, SubprocessHandle
from agent.launch.process import ProcessLauncher
from agent.warm.launcher import WarmHandle
from tests.unit.fakes.warm import Warm, make_request, warm_setup

VENV = os.environ.get("RUNNER_AGENT_TEST_PREFECT_VENV", "")
pytestmark = pytest.mark.skipif(
    not VENV, reason="RUNNER_AGENT_TEST_PREFECT_VENV is not set (the Prefect test venv)"
)
STAMP = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \| ")


@pytest.fixture
async def warm(tmp_path: Path) -> AsyncIterator[Warm]:
    async with warm_setup(tmp_path, Path(VENV) / "bin" / "python") as harness:
        yield harness


def request(warm: Warm, **env: str) -> LaunchRequest:
    req = make_request(warm.base, warm.python, "", PREFECT_CLIENT_MAX_RETRIES="0", **env)
    home = req.run_dir.parent / "home"
    (home / ".prefect").mkdir(parents=True)
    return replace(req, env={**req.env, "HOME": str(home), "PREFECT_HOME": str(home / ".prefect")})


def said(req: LaunchRequest) -> list[str]:
    """The output without timestamps and traceback frames; removed for the next run."""
    path = req.run_dir / "output.log"
    lines = path.read_text().splitlines()
    for record in req.run_dir.iterdir():
        record.unlink()
    return [STAMP.sub("", line) for line in lines if line and not line.startswith(" ")]


async def both(warm: Warm, req: LaunchRequest) -> tuple[int, list[str], int, list[str]]:
    await warm.ready(req)
    handle = await warm.launch(req)
    assert isinstance(handle, WarmHandle)
    warm_status, warm_said = await handle.wait(), said(req)
    cold = warm.runs.add(await ProcessLauncher().launch(replace(req, engine="cold")))
    assert isinstance(cold, SubprocessHandle)
    cold_status, cold_said = await cold.wait(), said(req)
    return warm_status, warm_said, cold_status, cold_said


async def test_the_engine_without_a_flow_run_fails_the_same_warm_and_cold(warm: Warm) -> None:
    req = request(warm)
    req = replace(req, env={k: v for k, v in req.env.items() if k != "PREFECT__FLOW_RUN_ID"})
    warm_status, warm_said, cold_status, cold_said = await both(warm, req)
    assert warm_status == cold_status == 1
    assert warm_said[-1] == cold_said[-1]
    assert warm_said[-1].startswith("TypeError: one of the hex, bytes, bytes_le, fields")
    # Known difference: E has configured logging before the engine's first line; a cold engine
    # configures it later (importing prefect.main), so this early message is unformatted there.
    assert cold_said[0].startswith("Invalid flow run id.")
    assert warm_said[0].startswith("ERROR   | prefect.engine - Invalid flow run id.")


async def test_the_api_url_comes_from_the_runs_environment(warm: Warm) -> None:
    template = await warm.ready(request(warm))  # not refused: Prefect's imports are fork-safe
    assert template.stamps[0][0] == str(warm.python)
    req = request(warm)  # its API URL: a closed port (the template has none: ephemeral)
    warm_status, warm_said, cold_status, cold_said = await both(warm, req)
    assert warm_status == cold_status == 1
    failed = (
        f"ERROR   | prefect.engine - Execution of flow run '{req.flow_run_id}' exited with "
        "unexpected exception"
    )
    assert failed in warm_said and failed in cold_said
    assert warm_said[-1] == cold_said[-1] == "httpx.ConnectError: [Errno 111] Connection refused"


async def test_the_logging_level_comes_from_the_runs_environment(warm: Warm) -> None:
    """The template configured logging at INFO; the run asks for CRITICAL: its engine's ERROR
    goes unsaid, warm as cold."""
    req = request(warm, PREFECT_LOGGING_LEVEL="CRITICAL")
    assert await both(warm, req) == (1, [], 1, [])
