"""Suspended and paused runs are resumed, not crashed (issue 13; docs/runs.md): the real agent,
real engines, a real server, and Prefect's own `resume_flow_run`.

What the flows below do under Prefect's own Runner (`serve(...)`, Prefect 3.8.8, tried with the
same flows on 2026-12-03) is what these tests demand of the agent:
- suspend, then resume: the engine exits with the run Suspended; after the resume a new engine
  runs the flow again from the top, so the code before the suspend point runs twice (in two
  processes), a task with a persisted result once (the second time its cached result is used),
  and the code after the suspend point once. History: ... Running > Suspended > Resuming >
  Pending > Running > Completed.
- pause (in-process), then resume: one process; each line of the flow runs once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.agent_process import AgentProcess, Api, running_agent, wait_for
from tests.integration.engines import launches
from tests.integration.prefect_server import PrefectServer
from tests.integration.run_story import MARKERS, agent_says, marks, prefect_python, wait_story_done

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

FLOWS = (
    MARKERS
    + """
from prefect import flow, task
from prefect.flow_runs import pause_flow_run, suspend_flow_run

@task(persist_result=True)
def prepare():
    mark("task")
    return 41

@flow(persist_result=True)
def suspender():
    mark("before")
    value = prepare()
    suspend_flow_run(timeout=300)
    mark("after", str(value))

@flow
def pauser():
    mark("before")
    pause_flow_run(timeout=300)
    mark("after")

@flow(retries=1, retry_delay_seconds=1)
def retry_then_suspend():
    attempt = count("attempt") + 1
    mark("attempt", str(attempt))
    if attempt == 1:
        raise RuntimeError("the first attempt fails on purpose")
    suspend_flow_run(timeout=300)
    mark("after")
"""
)

RESUME = """
import sys, uuid
from prefect.flow_runs import resume_flow_run
resume_flow_run(uuid.UUID(sys.argv[1]))
"""
ENGINE_START = 180.0


class Setup:
    def __init__(self, agent: AgentProcess, markers: Path, api: Api, server: PrefectServer):
        self.agent, self.markers, self.api, self.server = agent, markers, api, server

    def start(self, name: str) -> str:
        deployment_id = self.api.wait_deployment(f"resume-{name}", name)
        return self.api.create_run(deployment_id)

    def marks(self, run_id: str, name: str) -> list[list[str]]:
        return marks(self.markers, run_id, name)

    def wait_paused(self, run_id: str) -> dict[str, Any]:
        return dict(
            wait_for(
                lambda: (s := self.api.state(run_id)).get("type") == "PAUSED" and s,
                ENGINE_START,
                what=f"run {run_id} to pause",
            )
        )

    def resume(self, run_id: str) -> None:
        """Prefect's own `resume_flow_run`, as a user's script would call it."""
        prefect_python(self.server.venv, self.server.api_url, RESUME, run_id)

    def types(self, run_id: str) -> list[str]:
        return [f"{s['type']}({s['name']})" for s in self.api.history(run_id)]


@pytest.fixture
def setup(
    prefect_server: PrefectServer,
    api: Api,
    tmp_path: Path,
    flow_dir_factory: Callable[[str], Path],
    engine: str,
) -> Iterator[Setup]:
    flow_dir = flow_dir_factory(FLOWS)
    markers = tmp_path / "markers"
    markers.mkdir()
    env = {"MARKER_DIR": str(markers), "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "results")}
    deployments = [
        {
            "name": name,
            "flow_name": f"resume-{name}",
            "entrypoint": f"flow.py:{func}",
            "path": str(flow_dir),
            "env": env,
        }
        for name, func in (
            ("suspender", "suspender"),
            ("pauser", "pauser"),
            ("retry-suspend", "retry_then_suspend"),
        )
    ]
    with running_agent(
        tmp_path / "agent",
        api_url=prefect_server.api_url,
        python=prefect_server.python,
        deployments=deployments,
        name="resume",
        flow_run={"engine": engine},
    ) as agent:
        yield Setup(agent, markers, api, prefect_server)


def test_suspended_run_resumes_and_completes(setup: Setup) -> None:
    run_id = setup.start("suspender")
    assert setup.wait_paused(run_id)["name"] == "Suspended"
    # The engine exits 0 with the run Suspended: the agent's story of this attempt ends
    # without touching the state.
    wait_story_done(setup.agent, run_id)
    assert agent_says(setup.agent, run_id, "Process exited with status 0")
    assert setup.api.state(run_id)["name"] == "Suspended", setup.types(run_id)
    [first] = setup.marks(run_id, "before")
    assert setup.marks(run_id, "after") == []

    setup.resume(run_id)
    state = setup.api.wait_final(run_id, timeout=ENGINE_START)
    types = setup.types(run_id)
    assert state["type"] == "COMPLETED", (types, setup.agent.log_text()[-3000:])
    assert types == [
        "SCHEDULED(Scheduled)",
        "PENDING(Pending)",
        "RUNNING(Running)",
        "PAUSED(Suspended)",
        "SCHEDULED(Resuming)",
        "PENDING(Pending)",
        "RUNNING(Running)",
        "COMPLETED(Completed)",
    ], types
    # As under Prefect's Runner: the flow ran again from the top in a new process, the task's
    # persisted result was reused, and the code after the suspend point ran once, there.
    before = setup.marks(run_id, "before")
    assert len(before) == 2 and before[0] == first and before[1][0] != first[0], before
    assert setup.marks(run_id, "task") == [[first[0]]]
    assert setup.marks(run_id, "after") == [[before[1][0], "41"]]
    # Both processes were started by the configured engine.
    assert launches(setup.api, run_id, 2) == [setup.agent.engine] * 2


def test_paused_run_resumes_in_its_process(setup: Setup) -> None:
    run_id = setup.start("pauser")
    assert setup.wait_paused(run_id)["name"] == "Paused"
    setup.resume(run_id)
    state = setup.api.wait_final(run_id, timeout=ENGINE_START)
    types = setup.types(run_id)
    assert state["type"] == "COMPLETED", (types, setup.agent.log_text()[-3000:])
    assert types == [
        "SCHEDULED(Scheduled)",
        "PENDING(Pending)",
        "RUNNING(Running)",
        "PAUSED(Paused)",
        "RUNNING(Running)",
        "COMPLETED(Completed)",
    ], types
    [before] = setup.marks(run_id, "before")
    assert setup.marks(run_id, "after") == [[before[0]]]
    assert launches(setup.api, run_id) == [setup.agent.engine]


def test_run_suspended_after_an_in_process_retry_resumes(setup: Setup) -> None:
    """Prefect keeps the run's `retry_type: in_process` from the retry through the suspension
    and the resume; the resumed run is nobody's in-process retry and must be claimed."""
    run_id = setup.start("retry-suspend")
    assert setup.wait_paused(run_id)["name"] == "Suspended"
    wait_story_done(setup.agent, run_id)
    setup.resume(run_id)
    state = setup.api.wait_final(run_id, timeout=ENGINE_START)
    types = setup.types(run_id)
    assert state["type"] == "COMPLETED", (types, setup.agent.log_text()[-3000:])
    attempts = setup.marks(run_id, "attempt")
    assert [a[1] for a in attempts] == ["1", "2", "3"], attempts
    # The retry ran in the first process; the resume in a second one.
    assert attempts[0][0] == attempts[1][0] != attempts[2][0], attempts
    assert setup.marks(run_id, "after") == [[attempts[2][0]]]
    assert "CRASHED" not in " ".join(types), types
    assert launches(setup.api, run_id, 2) == [setup.agent.engine] * 2
