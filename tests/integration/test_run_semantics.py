"""Cancellations and crashes end as under Prefect's own Runner (issue 13; docs/runs.md,
"Compared with Prefect's Runner"): the real agent (process launcher), real engines, a real
server, and flows whose hooks leave a marker line each time they run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.integration.agent_process import AgentProcess, Api, running_agent, wait_for
from tests.integration.engines import engine_of, launches
from tests.integration.prefect_server import PrefectServer
from tests.integration.run_story import (
    MARKERS,
    agent_says,
    assert_no_event,
    cancel_via_api,
    cancel_via_cli,
    marks,
    related_events,
    since_now,
    state_time,
    wait_event,
    wait_gone,
    wait_story_done,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

FLOWS = (
    MARKERS
    + """
import subprocess, time
from prefect import flow

@flow(**HOOKS)
def sleeper():
    # A grandchild in the engine's own process group, as most flows start them.
    child = subprocess.Popen(["sleep", "300"], start_new_session=False)
    mark("started", str(child.pid))
    time.sleep(300)

@flow(**HOOKS)
def hard_exit():
    mark("started")
    os._exit(3)

def hang(flow, flow_run, state):
    mark("hang")
    time.sleep(3600)

@flow(on_crashed=[hang])
def hard_exit_hanging_hook():
    mark("started")
    os._exit(3)
"""
)

# A hook process first imports Prefect and loads the flow: about 6 s on a busy two-core host.
# The limit must leave it time to reach the hook that hangs, or this test would prove nothing.
HANG_HOOK_TIMEOUT = "30s"
ENGINE_START = 180.0  # the engine's start-up beside other tests and busy loops
ACKNOWLEDGED = "the engine acknowledged the cancellation"


def deployment(name: str, func: str, flow_dir: Path, markers: Path, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "flow_name": f"semantics-{name}",
        "entrypoint": f"flow.py:{func}",
        "path": str(flow_dir),
        "env": {"MARKER_DIR": str(markers)},
        **extra,
    }


class Setup:
    def __init__(self, agent: AgentProcess, markers: Path, api: Api) -> None:
        self.agent, self.markers, self.api = agent, markers, api

    def start(self, name: str) -> str:
        deployment_id = self.api.wait_deployment(f"semantics-{name}", name)
        return self.api.create_run(deployment_id)

    def wait_started(self, run_id: str) -> list[str]:
        """The flow body's "started" mark: the engine's pid first. The engine is the agent's
        configured one (its parent is the sh wrapper, or a warm supervisor)."""
        line = wait_for(
            lambda: marks(self.markers, run_id, "started"),
            ENGINE_START,
            what=f"the flow body of {run_id}",
        )
        assert engine_of(int(line[0][0])) == self.agent.engine, (line, self.agent.engine)
        return list(line[0])

    def marks(self, run_id: str, name: str) -> list[list[str]]:
        return marks(self.markers, run_id, name)


@pytest.fixture
def setup(
    prefect_server: PrefectServer,
    prefect_old_venv: Path,
    api: Api,
    tmp_path: Path,
    flow_dir_factory: Callable[[str], Path],
    engine: str,
) -> Iterator[Setup]:
    flow_dir = flow_dir_factory(FLOWS)
    markers = tmp_path / "markers"
    markers.mkdir()
    deployments = [
        deployment("sleeper", "sleeper", flow_dir, markers),
        deployment(
            "old-sleeper",
            "sleeper",
            flow_dir,
            markers,
            python=str(prefect_old_venv / "bin" / "python"),
        ),
        deployment("hard-exit", "hard_exit", flow_dir, markers),
    ]
    with running_agent(
        tmp_path / "agent",
        api_url=prefect_server.api_url,
        python=prefect_server.python,
        deployments=deployments,
        name="semantics",
        agent={"cancel_grace": "5s"},
        flow_run={"engine": engine},
    ) as agent:
        yield Setup(agent, markers, api)


def cancelling_to_cancelled(history: list[dict[str, Any]]) -> float:
    cancelling = next(s for s in history if s["type"] == "CANCELLING")
    cancelled = next(s for s in history if s["type"] == "CANCELLED")
    return (state_time(cancelled) - state_time(cancelling)).total_seconds()


def check_cancelled(setup: Setup, run_id: str, since: datetime, pids: list[int]) -> list[str]:
    """What every cancellation must show, whichever engine ran it; the state types."""
    api = setup.api
    state = wait_for(
        lambda: (s := api.state(run_id)).get("type") == "CANCELLED" and s,
        120,
        what=f"run {run_id} to be CANCELLED",
    )
    assert state["message"] == "Flow run was cancelled successfully.", state
    wait_story_done(setup.agent, run_id)
    history = api.history(run_id)
    types = [s["type"] for s in history]
    print(
        f"{run_id}: {' > '.join(types)}; CANCELLING -> CANCELLED "
        f"{cancelling_to_cancelled(history):.2f}s"
    )
    assert types[-1] == "CANCELLED", types
    assert launches(api, run_id) == [setup.agent.engine]
    # The agent ran the flow's on_cancellation hooks exactly once, in a hook process of its
    # own, with the state Prefect's Runner gives them; the engine ran none of them.
    hooks = setup.marks(run_id, "on_cancellation")
    assert len(hooks) == 1, hooks
    assert hooks[0][1] == "Cancelling" and int(hooks[0][0]) not in pids, hooks
    assert setup.marks(run_id, "on_crashed") == [], setup.agent.log_text()[-3000:]
    # Nothing of the run survives: the engine, and the grandchild it started.
    wait_gone(pids)
    # The agent's event comes once CANCELLED is durable.
    wait_for(
        lambda: related_events(api, run_id, "prefect.runner.cancelled-flow-run", since),
        60,
        interval=1.0,
        what="the agent's cancelled-flow-run event",
    )
    return types


@pytest.mark.parametrize("how", ["api", "prefect-cli"])
def test_cancellation_is_no_crash(how: str, setup: Setup, prefect_server: PrefectServer) -> None:
    since = since_now()
    run_id = setup.start("sleeper")
    engine_pid, grandchild_pid = (int(p) for p in setup.wait_started(run_id))
    # The engine connects to the control channel as it arms its SIGTERM bridge, before the
    # flow body runs; waiting for the agent to have seen it keeps this test on that path.
    wait_for(
        lambda: agent_says(setup.agent, run_id, "engine connected to the control channel"),
        60,
        what="the engine's control session",
    )
    if how == "api":
        cancel_via_api(setup.api, run_id)
    else:
        cancel_via_cli(prefect_server.venv, prefect_server.api_url, run_id)

    types = check_cancelled(setup, run_id, since, [engine_pid, grandchild_pid])
    assert "CRASHED" not in types, types
    assert types.count("CANCELLED") == 1, types
    assert agent_says(setup.agent, run_id, ACKNOWLEDGED), setup.agent.log_text()[-3000:]
    wait_event(setup.api, run_id, "prefect.flow-run.Cancelled", since)
    assert_no_event(setup.api, run_id, "prefect.flow-run.Crashed", since)


def test_cancellation_of_an_older_engine(setup: Setup) -> None:
    """Prefect 3.6.26 has no control channel: the agent's fallback (SIGTERM, grace, SIGKILL)."""
    since = since_now()
    run_id = setup.start("old-sleeper")
    engine_pid, grandchild_pid = (int(p) for p in setup.wait_started(run_id))
    cancel_via_api(setup.api, run_id)
    types = check_cancelled(setup, run_id, since, [engine_pid, grandchild_pid])
    assert agent_says(setup.agent, run_id, "no control channel answer from the engine")
    # docs/runs.md: 3.6.26 reports nothing on SIGTERM; the agent's Cancelled is the only end.
    assert "CRASHED" not in types, types
    wait_event(setup.api, run_id, "prefect.flow-run.Cancelled", since)
    assert_no_event(setup.api, run_id, "prefect.flow-run.Crashed", since)


def test_crash_the_engine_cannot_report_runs_on_crashed_once(setup: Setup) -> None:
    run_id = setup.start("hard-exit")
    state = setup.api.wait_final(run_id, timeout=ENGINE_START)
    assert state["type"] == "CRASHED", state
    assert state["message"].startswith("Process exited with status 3"), state
    wait_story_done(setup.agent, run_id)
    hooks = setup.marks(run_id, "on_crashed")
    assert len(hooks) == 1 and hooks[0][1] == "Crashed", hooks
    [[engine_pid]] = setup.marks(run_id, "started")
    assert hooks[0][0] != engine_pid, "the engine cannot run hooks after os._exit"
    assert setup.marks(run_id, "on_cancellation") == []
    types = [s["type"] for s in setup.api.history(run_id)]
    assert types.count("CRASHED") == 1, types
    assert launches(setup.api, run_id) == [setup.agent.engine]


def test_hook_that_hangs_is_killed_at_its_time_limit(
    prefect_server: PrefectServer,
    api: Api,
    tmp_path: Path,
    flow_dir_factory: Callable[[str], Path],
    engine: str,
) -> None:
    flow_dir = flow_dir_factory(FLOWS)
    markers = tmp_path / "markers"
    markers.mkdir()
    with running_agent(
        tmp_path / "agent",
        api_url=prefect_server.api_url,
        python=prefect_server.python,
        deployments=[deployment("hang-hook", "hard_exit_hanging_hook", flow_dir, markers)],
        name="semantics-hang",
        agent={"hook_timeout": HANG_HOOK_TIMEOUT},
        flow_run={"engine": engine},
    ) as agent:
        setup = Setup(agent, markers, api)
        run_id = setup.start("hang-hook")
        state = api.wait_final(run_id, timeout=ENGINE_START)
        assert state["type"] == "CRASHED", state
        assert state["message"].startswith("Process exited with status 3"), state
        wait_story_done(agent, run_id)
        assert agent_says(
            agent,
            run_id,
            f"hooks did not complete: did not finish within {HANG_HOOK_TIMEOUT[:-1]}s",
        ), agent.log_text()[-3000:]
        hung = setup.marks(run_id, "hang")
        # The hook did start (else this test proves nothing), and its process is gone.
        assert len(hung) == 1, (hung, agent.log_text()[-3000:])
        wait_gone([int(hung[0][0])])
        # The run keeps its final state.
        assert api.state(run_id)["type"] == "CRASHED"
        assert launches(api, run_id) == [engine]
