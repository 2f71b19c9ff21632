"""Work-pool mode against the real server: the agent as a worker of `[[work_pool]]`s.

One agent serves `hosts` (type runner-agent, created by the agent) and `wp-process` (type
process, created by a test as `prefect work-pool create --type process` would); the queue tests
start agents of their own. Deployments come from Prefect's own `prefect deploy` (a prefect.yaml
with a git_clone pull step) or from the API.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.integration.agent_process import AgentProcess, Api, running_agent, wait_for
from tests.integration.gitserver import make_bare_repo
from tests.integration.prefect_server import PrefectServer, make_flow_dir
from tests.integration.run_story import wait_story_done

pytestmark = pytest.mark.integration

AGENT = "wp-host"
HOSTS = "hosts"
PROCESS_POOL = "wp-process"
QUEUED = "wp-queued"
WAIT = 120.0

# Writes what the run saw: a marker, its cwd and $GREETING (a missing file: the body never ran).
FLOW = """
import json, os, pathlib
from prefect import flow

@flow(name="{name}")
def {func}(out: str):
    seen = {{"marker": "ran", "cwd": os.getcwd(), "greeting": os.environ.get("GREETING")}}
    pathlib.Path(out).write_text(json.dumps(seen))
"""

PREFECT_YAML = """
name: wp-project
prefect-version: 3.8.8
pull:
  - prefect.deployments.steps.git_clone:
      repository: {repository}
      branch: main
deployments:
  - name: hello
    entrypoint: flows/hello.py:hello
    work_pool:
      name: {pool}
      job_variables:
        memory_max: 300M
"""


def pool_agent(
    workdir: Path, server: PrefectServer, name: str, pools: Sequence[Mapping[str, Any]]
) -> AbstractContextManager[AgentProcess]:
    """`runner-agent run` with no `[[deployment]]`, serving these `[[work_pool]]`s."""
    return running_agent(
        workdir,
        api_url=server.api_url,
        python=server.python,
        deployments=[],
        name=name,
        work_pools=pools,
    )


@pytest.fixture(scope="module")
def agent(
    prefect_server: PrefectServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AgentProcess]:
    pools: list[dict[str, Any]] = [{"name": HOSTS, "create": True}, {"name": PROCESS_POOL}]
    with pool_agent(tmp_path_factory.mktemp("pools") / "agent", prefect_server, AGENT, pools) as a:
        yield a


def prefect_cli(server: PrefectServer, home: Path, cwd: Path, *args: str) -> str:
    """Prefect's own CLI from the test venv, as a user would run it, without prompts."""
    home.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [str(server.venv / "bin" / "prefect"), *args],
        cwd=cwd,
        env={**server.env(), "PREFECT_HOME": str(home), "PREFECT_CLI_PROMPT": "false"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def read_pool(api: Api, name: str) -> dict[str, Any] | None:
    response = api.request("GET", f"/work_pools/{name}")
    if response.status_code == 404:
        return None
    response.raise_for_status()
    return dict(response.json())


def wait_pool(api: Api, name: str) -> dict[str, Any]:
    return dict(wait_for(lambda: read_pool(api, name), WAIT, what=f"work pool {name}"))


def pool_deployment(
    api: Api, flow_name: str, name: str, code: Path, pool: str, **fields: Any
) -> str:
    """A deployment of `pool` without pull steps: the code is in `code`."""
    return api.pool_deployment(
        pool,
        flow_name,
        name,
        entrypoint="flow.py:main",
        path=str(code),
        enforce_parameter_schema=False,
        **fields,
    )


def flow_code(tmp_path: Path, flow_name: str) -> Path:
    return make_flow_dir(tmp_path, FLOW.format(name=flow_name, func="main"))


def run_id_in(output: str) -> str:
    match = re.search(r"UUID: ([0-9a-f-]{36})", output)
    assert match, output
    return match.group(1)


def warnings(agent: AgentProcess) -> list[str]:
    """The agent's last few warnings and errors."""
    records = [r for r in agent.records() if r.get("level") in ("WARNING", "ERROR")]
    return [str(r.get("message")) for r in records[-5:]]


def seen(out: Path) -> dict[str, Any]:
    return dict(json.loads(out.read_text()))


def test_prefect_deploy_with_a_git_pull_step_runs_in_a_fresh_code_dir(
    agent: AgentProcess, prefect_server: PrefectServer, api: Api, tmp_path: Path
) -> None:
    bare = make_bare_repo(
        tmp_path / "repos", "flows.git", {"flows/hello.py": FLOW.format(name="hello", func="hello")}
    )
    # The user's checkout, where they run `prefect deploy`.
    project = tmp_path / "project"
    subprocess.run(["git", "clone", "--quiet", str(bare), str(project)], check=True)
    (project / "prefect.yaml").write_text(PREFECT_YAML.format(repository=bare, pool=HOSTS))
    wait_pool(api, HOSTS)  # the agent creates it

    home = tmp_path / "cli-home"
    prefect_cli(prefect_server, home, project, "deploy", "--all", "--no-prompt")
    api.wait_deployment("hello", "hello", timeout=WAIT)
    out = tmp_path / "out.json"
    output = prefect_cli(
        prefect_server, home, project, "deployment", "run", "hello/hello", "--param", f"out={out}"
    )
    run_id = run_id_in(output)

    state = api.wait_final(run_id, timeout=WAIT)
    assert state["type"] == "COMPLETED", (state, agent.log_text()[-4000:])
    code = agent.workdir / "state" / "runs" / run_id / "code"
    cwd = Path(seen(out)["cwd"])
    assert seen(out)["marker"] == "ran"
    # The engine ran the pull step in the run's own directory and moved into the clone.
    assert cwd.parent == code, (cwd, code)
    logs = api.wait_logs(run_id, "Launched in", "MemoryMax=300M", timeout=60)
    launched = [line for line in logs if line.startswith("Launched in")]
    assert launched and "MemoryMax=300M" in launched[0], logs
    wait_story_done(agent, run_id)
    assert not code.exists(), list(code.rglob("*"))[:20]

    def ready() -> dict[str, Any] | None:
        pool = read_pool(api, HOSTS)
        return pool if pool is not None and pool.get("status") == "READY" else None

    pool = dict(wait_for(ready, WAIT, what="pool hosts READY"))
    assert pool["type"] == "runner-agent", pool
    workers = api.request("POST", f"/work_pools/{HOSTS}/workers/filter", json={})
    workers.raise_for_status()
    mine = [w for w in workers.json() if w["name"] == AGENT]
    assert mine, workers.json()
    beat = datetime.fromisoformat(mine[0]["last_heartbeat_time"])
    assert datetime.now(UTC) - beat < timedelta(seconds=WAIT), mine


def test_a_process_pool_run_gets_its_env_and_stream_output_is_ignored(
    agent: AgentProcess, prefect_server: PrefectServer, api: Api, tmp_path: Path
) -> None:
    template = json.loads(
        prefect_cli(
            prefect_server,
            tmp_path / "cli-home",
            tmp_path,
            "work-pool",
            "get-default-base-job-template",
            "--type",
            "process",
        )
    )
    if read_pool(api, PROCESS_POOL) is None:
        created = api.request(
            "POST",
            "/work_pools/",
            json={"name": PROCESS_POOL, "type": "process", "base_job_template": template},
        )
        # 409: a retried creation that had in fact been made.
        assert created.status_code in (200, 201, 409), created.text
    out = tmp_path / "out.json"
    deployment_id = pool_deployment(
        api,
        "wp-process-greet",
        "greet",
        flow_code(tmp_path, "wp-process-greet"),
        PROCESS_POOL,
        parameters={"out": str(out)},
        job_variables={"env": {"GREETING": "hi"}, "stream_output": False},
    )
    run_id = api.create_run(deployment_id)
    state = api.wait_final(run_id, timeout=WAIT)
    assert state["type"] == "COMPLETED", (state, agent.log_text()[-4000:])
    assert seen(out)["greeting"] == "hi"

    def ignored() -> list[str]:
        return [
            line
            for line in agent.log_text().splitlines()
            if "no meaning here" in line and PROCESS_POOL in line
        ]

    lines = wait_for(ignored, 30, what="the agent's word on stream_output")
    assert "stream_output" in lines[0], lines


def test_a_run_that_sets_a_key_the_host_does_not_allow_crashes_unstarted(
    agent: AgentProcess, api: Api, tmp_path: Path
) -> None:
    wait_pool(api, HOSTS)
    out = tmp_path / "out.json"
    deployment_id = pool_deployment(
        api,
        "wp-guarded",
        "guarded",
        flow_code(tmp_path, "wp-guarded"),
        HOSTS,
        parameters={"out": str(out)},
    )
    run_id = api.create_run(deployment_id, job_variables={"user": "root"})
    state = api.wait_final(run_id, timeout=WAIT)
    assert state["type"] == "CRASHED", (state, agent.log_text()[-4000:])
    message = state["message"]
    assert "'user'" in message and "agent.job_variables" in message, message
    types = [s["type"] for s in api.history(run_id)]
    assert "PENDING" in types and "RUNNING" not in types, types  # claimed, never started
    assert not out.exists(), "the flow body ran"


def test_a_queue_the_agent_does_not_serve_keeps_its_runs(
    prefect_server: PrefectServer, api: Api, tmp_path: Path
) -> None:
    pools = [{"name": QUEUED, "create": True, "queues": ["high"]}]
    with pool_agent(tmp_path / "agent", prefect_server, "wp-queues", pools) as agent:
        wait_pool(api, QUEUED)
        for queue in ("high", "low"):
            made = api.request("POST", f"/work_pools/{QUEUED}/queues", json={"name": queue})
            assert made.status_code in (200, 201, 409), made.text
        out = tmp_path / "out"
        out.mkdir()
        code = flow_code(tmp_path, "wp-queued")
        deployment_id = pool_deployment(api, "wp-queued", "queued", code, QUEUED)
        low, high = (
            api.create_run(
                deployment_id, work_queue_name=queue, parameters={"out": str(out / queue)}
            )
            for queue in ("low", "high")
        )
        try:
            assert api.run(low)["work_queue_name"] == "low"
            state = api.wait_final(high, timeout=WAIT)
            assert state["type"] == "COMPLETED", (state, agent.log_text()[-4000:])
            # The agent polled many times (every second) while the high run went through.
            wait_story_done(agent, high)
            # Never claimed: its only state is the one it was created in.
            assert [s["type"] for s in api.history(low)] == ["SCHEDULED"], api.history(low)
            assert not (out / "low").exists()
        finally:
            api.request("DELETE", f"/flow_runs/{low}")


def test_a_pool_with_a_missing_queue_holds_up_no_other_pool(
    prefect_server: PrefectServer, api: Api, tmp_path: Path
) -> None:
    out = tmp_path / "out.json"
    code = flow_code(tmp_path, "wp-fine")
    deployment_id = pool_deployment(
        api, "wp-fine", "fine", code, "wp-fine", parameters={"out": str(out)}
    )
    made = api.request("POST", "/work_pools/", json={"name": "wp-broken", "type": "runner-agent"})
    assert made.status_code in (200, 201, 409), made.text
    # Polling wp-broken answers 404 at every poll: its queue "missing" does not exist.
    pools: list[dict[str, Any]] = [
        {"name": "wp-broken", "queues": ["missing"]},
        {"name": "wp-fine"},
    ]
    with pool_agent(tmp_path / "agent", prefect_server, "wp-isolated", pools) as agent:
        run_id = api.create_run(deployment_id)
        try:
            state = api.wait_final(run_id, timeout=WAIT)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; agent warnings: {warnings(agent)}") from None
        assert state["type"] == "COMPLETED", (state, warnings(agent))
        assert seen(out)["marker"] == "ran"
        assert worker_status(api, "wp-fine", "wp-isolated") == "ONLINE"
    # Stopped, it sends no heartbeats: Prefect marks it OFFLINE as it does its own workers
    # (after 3 missed heartbeats, at its foreman's next round).
    wait_for(
        lambda: worker_status(api, "wp-fine", "wp-isolated") == "OFFLINE",
        WAIT,
        what="the stopped agent to be OFFLINE",
    )


def worker_status(api: Api, pool: str, worker: str) -> str | None:
    response = api.request("POST", f"/work_pools/{pool}/workers/filter", json={})
    response.raise_for_status()
    found = [w for w in response.json() if w["name"] == worker]
    return str(found[0]["status"]) if found else None
