"""End to end: the real agent process runs real flows against a real Prefect server."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.agent_process import AgentProcess, Api, running_agent, wait_for
from tests.integration.engines import launches

pytestmark = pytest.mark.integration

FLOWS = textwrap.dedent(
    """
    import json, os, pathlib, time
    from prefect import flow

    @flow(log_prints=True)
    def hello(name: str = "world"):
        print(f"hello {name}")
        return f"hello {name}"

    @flow
    def boom():
        raise ValueError("boom on purpose")

    @flow
    def hard_exit():
        os._exit(3)

    @flow
    def record(marker_dir: str, seconds: float = 2.0, meet_dir: str = "", meet: int = 0):
        start = time.time()
        run_id = os.environ["PREFECT__FLOW_RUN_ID"]
        if meet_dir:
            # Wait (at most a minute) until `meet` runs have started, this one included.
            pathlib.Path(meet_dir, run_id).touch()
            while len(os.listdir(meet_dir)) < meet and time.time() < start + 60:
                time.sleep(0.05)
        time.sleep(seconds)
        pathlib.Path(marker_dir, run_id).write_text(
            json.dumps([start, time.time(), os.environ.get("RUNNER_AGENT_TEST_NAME", "")])
        )
    """
)


@pytest.fixture(scope="module")
def flow_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("flows")
    (directory / "flows.py").write_text(FLOWS)
    return directory


def deployment(name: str, flow_dir: Path, func: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "flow_name": f"e2e-{name}",
        "entrypoint": f"flows.py:{func}",
        "path": str(flow_dir),
        **extra,
    }


@pytest.fixture(scope="module")
def basic_agent(
    prefect_server: Any, flow_dir: Path, tmp_path_factory: pytest.TempPathFactory, engine: str
) -> Iterator[AgentProcess]:
    """One agent per engine for the tests of a single run (so they run once per engine)."""
    deployments = [
        deployment("hello", flow_dir, "hello"),
        deployment("boom", flow_dir, "boom"),
        deployment("hard-exit", flow_dir, "hard_exit"),
        deployment("bad-python", flow_dir, "hello", python="/nonexistent/venv/bin/python"),
    ]
    with running_agent(
        tmp_path_factory.mktemp("agent-basic"),
        api_url=prefect_server.api_url,
        python=prefect_server.python,
        deployments=deployments,
        name="e2e-basic",
        flow_run={"engine": engine},
    ) as agent:
        yield agent


def test_scheduled_run_completes(basic_agent: AgentProcess, api: Api) -> None:
    deployment_id = api.wait_deployment("e2e-hello", "hello")
    run_id = api.create_run(deployment_id, parameters={"name": "agent"})
    state = api.wait_final(run_id)
    assert state["type"] == "COMPLETED", (state, basic_agent.log_text()[-3000:])
    api.wait_logs(run_id, "Claimed by runner-agent 'e2e-basic'", "Launched in process")
    assert launches(api, run_id) == [basic_agent.engine]
    types = [s["type"] for s in api.history(run_id)]
    assert types.count("PENDING") == 1 and types.count("RUNNING") == 1, types


def test_failing_flow_stays_failed(basic_agent: AgentProcess, api: Api) -> None:
    deployment_id = api.wait_deployment("e2e-boom", "boom")
    run_id = api.create_run(deployment_id)
    state = api.wait_final(run_id)
    assert state["type"] == "FAILED", state
    # The agent saw the exit (the engine exits 0 after reporting FAILED itself) and must not
    # overwrite the engine's own final state.
    wait_for(
        lambda: any("Process exited with status" in m for m in api.logs(run_id)),
        20,
        what="the agent's exit note",
    )
    assert api.state(run_id)["type"] == "FAILED"
    assert "CRASHED" not in [s["type"] for s in api.history(run_id)]
    assert launches(api, run_id) == [basic_agent.engine]


def test_hard_exit_is_crashed_with_status(basic_agent: AgentProcess, api: Api) -> None:
    deployment_id = api.wait_deployment("e2e-hard-exit", "hard-exit")
    run_id = api.create_run(deployment_id)
    state = api.wait_final(run_id)
    assert state["type"] == "CRASHED", state
    assert "status 3" in state["message"], state
    assert launches(api, run_id) == [basic_agent.engine]


def test_bad_interpreter_is_crashed_with_reason(basic_agent: AgentProcess, api: Api) -> None:
    # With engine "warm" too: a python that does not exist has no template, so the run is
    # started cold, and crashes with the same reason.
    deployment_id = api.wait_deployment("e2e-bad-python", "bad-python")
    run_id = api.create_run(deployment_id)
    state = api.wait_final(run_id)
    assert state["type"] == "CRASHED", state
    assert "/nonexistent/venv/bin/python" in state["message"], state
    assert "not found" in state["message"], state


def overlaps(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def test_limit_is_never_exceeded(
    prefect_server: Any, flow_dir: Path, api: Api, tmp_path: Path, engine: str
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    # The first two runs wait for each other, so that the limit is used however long each
    # engine takes to start on a busy machine; a third at the same time would still show.
    parameters = {"marker_dir": str(markers), "seconds": 0.5, "meet_dir": str(meeting), "meet": 2}
    deployments = [deployment("limited", flow_dir, "record", parameters=parameters)]
    with running_agent(
        tmp_path / "agent",
        api_url=prefect_server.api_url,
        python=prefect_server.python,
        deployments=deployments,
        name="e2e-limit",
        agent={"limit": 2},
        flow_run={"engine": engine},
    ) as agent:
        deployment_id = api.wait_deployment("e2e-limited", "limited")
        run_ids = [api.create_run(deployment_id) for _ in range(6)]
        states = [api.wait_final(run_id, timeout=180) for run_id in run_ids]
        assert all(s["type"] == "COMPLETED" for s in states), (states, agent.log_text()[-3000:])
    assert [launches(api, run_id) for run_id in run_ids] == [[engine]] * 6
    intervals = [tuple(json.loads(p.read_text())[:2]) for p in markers.iterdir()]
    assert len(intervals) == 6
    peak = overlaps(intervals)
    print(f"peak concurrent runs with limit 2: {peak}")
    assert peak <= 2
    assert peak == 2, "the limit should also be used, not just respected"


def test_two_agents_run_each_run_exactly_once(
    prefect_server: Any, flow_dir: Path, api: Api, tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    deployments = [
        deployment(
            "shared", flow_dir, "record", parameters={"marker_dir": str(markers), "seconds": 0.2}
        )
    ]
    common = dict(
        api_url=prefect_server.api_url, python=prefect_server.python, deployments=deployments
    )
    with (
        running_agent(
            tmp_path / "a",
            name="e2e-a",
            agent={"limit": 3},
            env={"RUNNER_AGENT_TEST_NAME": "a"},
            flow_run={"env": {"RUNNER_AGENT_TEST_NAME": "a"}},
            **common,
        ) as agent_a,
        running_agent(
            tmp_path / "b",
            name="e2e-b",
            agent={"limit": 3},
            flow_run={"env": {"RUNNER_AGENT_TEST_NAME": "b"}},
            **common,
        ) as agent_b,
    ):
        deployment_id = api.wait_deployment("e2e-shared", "shared")
        run_ids = [api.create_run(deployment_id) for _ in range(20)]
        states = [api.wait_final(run_id, timeout=300) for run_id in run_ids]
        assert all(s["type"] == "COMPLETED" for s in states), (
            states,
            agent_a.log_text()[-2000:],
            agent_b.log_text()[-2000:],
        )
    for run_id in run_ids:
        types = [s["type"] for s in api.history(run_id)]
        assert types.count("PENDING") == 1, (run_id, types)
        assert types.count("RUNNING") == 1, (run_id, types)
    ran_by = [json.loads(p.read_text())[2] for p in markers.iterdir()]
    assert len(ran_by) == 20
    print(f"runs per agent: a={ran_by.count('a')} b={ran_by.count('b')}")
