"""The real schema helper, run by the Prefect venv's python on real flow files (no server).

What the unit tests fake: Prefect's own answers and errors, and a timeout that kills what the
flow's module started too.
"""

from __future__ import annotations

import asyncio
import os
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.flowinfo import FlowInfo, FlowInfoFailure, FlowInspector
from agent.settings import DeploymentSettings, FlowRunSettings
from agent.storage import Storage
from tests.integration.prefect_server import prefect_venv

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def python() -> str:
    return str(prefect_venv(os.environ) / "bin" / "python")


async def inspect(
    tmp_path: Path,
    python: str,
    source: str,
    entrypoint: str = "flow.py:main",
    helper_time_limit: float = 120.0,
) -> FlowInfo | FlowInfoFailure:
    code = tmp_path / "code"
    code.mkdir(exist_ok=True)
    (code / "flow.py").write_text(textwrap.dedent(source))
    state = tmp_path / "state"
    state.mkdir(exist_ok=True, mode=0o700)
    flow_run = FlowRunSettings(python=python)
    inspector = FlowInspector(state, Storage(state), lambda: flow_run, timeout=helper_time_limit)
    fields: dict[str, Any] = {"name": "d", "entrypoint": entrypoint, "path": str(code)}
    target = DeploymentSettings(**fields)
    result = (await inspector.lookup((target,), wait=120))["d"]
    assert result is not None
    return result


async def test_what_a_flow_module_prints_does_not_spoil_the_answer(
    tmp_path: Path, python: str
) -> None:
    info = await inspect(
        tmp_path,
        python,
        """
        import sys
        print("hello from the module")
        sys.stdout.write("{not json")
        from prefect import flow

        @flow
        def main(x: int = 3):
            "Doc."
        """,
    )
    assert isinstance(info, FlowInfo), info
    assert info.flow_name == "main" and info.description == "Doc."
    assert info.parameter_openapi_schema["properties"]["x"]["default"] == 3


async def test_the_agents_own_modules_do_not_shadow_the_flows(tmp_path: Path, python: str) -> None:
    # `events` and `logs` are modules of the agent package, next to the helper file.
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "events.py").write_text("MINE = True\n")
    info = await inspect(
        tmp_path,
        python,
        """
        import events
        assert events.MINE
        from prefect import flow

        @flow
        def main():
            pass
        """,
    )
    assert isinstance(info, FlowInfo), info


@pytest.mark.parametrize(
    ("source", "entrypoint", "reason"),
    [
        ("def main(:\n", "flow.py:main", "SyntaxError: "),
        ("import not_installed_here\n", "flow.py:main", "ModuleNotFoundError: No module named"),
        ("from prefect import flow\n", "flow.py:main", "MissingFlowError: Flow function with name"),
        ("def main():\n    pass\n", "flow.py:main", "MissingFlowError: Function with name 'main'"),
        ("raise RuntimeError('at import')\n", "flow.py:main", "RuntimeError: at import"),
        ("", "other.py:main", "FileNotFoundError"),
    ],
)
async def test_a_flow_that_cannot_be_loaded_says_why(
    tmp_path: Path, python: str, source: str, entrypoint: str, reason: str
) -> None:
    info = await inspect(tmp_path, python, source, entrypoint)
    assert isinstance(info, FlowInfoFailure)
    assert reason in info.reason, info.reason


async def test_a_python_without_prefect_says_so(tmp_path: Path) -> None:
    info = await inspect(tmp_path, "/usr/bin/python3", "from prefect import flow\n")
    assert info == FlowInfoFailure(
        "cannot import prefect with /usr/bin/python3: "
        "ModuleNotFoundError: No module named 'prefect'"
    )


async def test_what_a_flow_module_leaves_running_is_killed(tmp_path: Path, python: str) -> None:
    marker = tmp_path / "child-pid"
    info = await inspect(
        tmp_path,
        python,
        f"""
        import pathlib, subprocess
        from prefect import flow
        child = subprocess.Popen(["sleep", "300"])
        pathlib.Path({str(marker)!r}).write_text(str(child.pid))

        @flow
        def main():
            pass
        """,
    )
    assert isinstance(info, FlowInfo), info
    await gone(int(marker.read_text()))


async def gone(pid: int) -> None:
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"{pid} is still running"
        await asyncio.sleep(0.1)


async def test_a_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    # An "interpreter" that starts a child and hangs: what a flow module doing so looks like.
    marker = tmp_path / "child-pid"
    hanging = tmp_path / "hanging-python"
    hanging.write_text(f"#!/bin/sh\nsleep 300 &\necho $! >{marker}\nexec sleep 300\n")
    hanging.chmod(0o755)
    info = await inspect(tmp_path, str(hanging), "", helper_time_limit=5.0)
    assert info == FlowInfoFailure("timed out after 5s")
    await gone(int(marker.read_text()))
