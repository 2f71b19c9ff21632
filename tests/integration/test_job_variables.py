"""Job variables sent with a run, through Prefect's own client and CLI, against the real server.

The flow writes what it sees (its environment) to a file; the agent's "Launched ..." line in the
run's Prefect logs shows the limits the run got. That the scope itself carries them is checked
in the booted systemd (tests/system/test_run_semantics.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.agent_process import AgentProcess, Api, running_agent
from tests.integration.prefect_server import PrefectServer

pytestmark = pytest.mark.integration

ENV_FLOW = textwrap.dedent(
    """
    import json, os, pathlib
    from prefect import flow

    @flow(name="env-flow")
    def env_flow(out: str):
        pathlib.Path(out).write_text(json.dumps({"X": os.environ.get("X")}))
    """
)

RUN_WITH_CLIENT = textwrap.dedent(
    """
    import json, sys
    from prefect.deployments import run_deployment

    run = run_deployment(
        "env-flow/jobvars", job_variables=json.loads(sys.argv[1]), timeout=0
    )
    print(run.id)
    """
)


@pytest.fixture(scope="module")
def agent_and_out(
    prefect_server: PrefectServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[AgentProcess, Path]]:
    root = tmp_path_factory.mktemp("jobvars")
    code = root / "code"
    code.mkdir()
    (code / "flow.py").write_text(ENV_FLOW)
    out = root / "out"
    out.mkdir()
    deployments = [
        {
            "name": "jobvars",
            "flow_name": "env-flow",
            "entrypoint": "flow.py:env_flow",
            "path": str(code),
            "parameters": {"out": str(out / "seen.json")},
        }
    ]
    with running_agent(
        root / "agent",
        api_url=prefect_server.api_url,
        python=prefect_server.python,
        deployments=deployments,
        name="jobvars",
    ) as agent:
        yield agent, out


def _prefect_python(server: PrefectServer, home: Path, *args: str) -> str:
    home.mkdir(exist_ok=True)
    done = subprocess.run(
        [server.python, *args],
        env={**server.env(), "PREFECT_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _run_id(output: str) -> str:
    match = re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", output)
    assert match, output
    return match.group(0)


def test_run_deployment_job_variables_reach_the_flow_and_its_limits(
    agent_and_out: tuple[AgentProcess, Path],
    prefect_server: PrefectServer,
    api: Api,
    tmp_path: Path,
) -> None:
    agent, out = agent_and_out
    api.wait_deployment("env-flow", "jobvars", timeout=60)
    job_variables = {"env": {"X": "1"}, "memory_max": "300M"}
    output = _prefect_python(
        prefect_server, tmp_path / "home", "-c", RUN_WITH_CLIENT, json.dumps(job_variables)
    )
    run_id = _run_id(output)
    state = api.wait_final(run_id)
    assert state["type"] == "COMPLETED", (state, agent.log_text()[-3000:])
    assert json.loads((out / "seen.json").read_text()) == {"X": "1"}
    logs = api.wait_logs(run_id, "Job variables applied: env, memory_max", "MemoryMax=300M")
    launched = [line for line in logs if line.startswith("Launched in")]
    assert launched and "MemoryMax=300M" in launched[0], logs


def test_a_job_variable_the_host_does_not_allow_is_crashed_never_started(
    agent_and_out: tuple[AgentProcess, Path],
    prefect_server: PrefectServer,
    api: Api,
    tmp_path: Path,
) -> None:
    agent, _ = agent_and_out
    api.wait_deployment("env-flow", "jobvars", timeout=60)
    prefect = str(prefect_server.venv / "bin" / "prefect")
    home = tmp_path / "cli-home"
    home.mkdir()
    done = subprocess.run(
        [prefect, "deployment", "run", "env-flow/jobvars", "--job-variable", "user=root"],
        env={**prefect_server.env(), "PREFECT_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = _run_id(re.sub(r"(?s).*UUID: ", "", done.stdout))
    state = api.wait_final(run_id)
    assert state["type"] == "CRASHED", (state, agent.log_text()[-3000:])
    message = state["message"]
    assert "job variable 'user'" in message and "agent.job_variables" in message, message
    assert [s["type"] for s in api.history(run_id)] == ["SCHEDULED", "PENDING", "CRASHED"]
