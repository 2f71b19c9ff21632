"""Deployments carry the parameter schema `flow.serve` registers, and the server enforces it.

The reference is Prefect itself: the same flow file served by Prefect's Runner (`flow.serve`)
under another deployment name, and Prefect's own CLI for `prefect deployment run`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.agent_process import AgentProcess, Api, running_agent, wait_for
from tests.integration.gitserver import make_bare_repo
from tests.integration.prefect_server import PrefectServer

pytestmark = pytest.mark.integration

TYPED = textwrap.dedent(
    '''
    import datetime
    import enum
    from typing import Optional

    from pydantic import BaseModel, Field
    from prefect import flow


    class Color(str, enum.Enum):
        RED = "red"
        GREEN = "green"


    class Window(BaseModel):
        start: datetime.date
        days: int = Field(7, ge=1, description="Length of the window")


    @flow(name="typed-flow")
    def typed(
        n: int,
        name: str = "world",
        ratio: float = 0.5,
        color: Color = Color.GREEN,
        window: Optional[Window] = None,
        labels: list[str] = ["a", "b"],
        when: Optional[datetime.datetime] = None,
    ):
        """Counts things in a window.

        Args:
            n: How many things to count.
            name: Who is asking.
            color: The colour to paint them.
            window: The time window.
        """
        return n
    '''
)

COUNT = textwrap.dedent(
    """
    import json, pathlib
    from prefect import flow

    @flow(name="count-flow")
    def count(n: int, out: str):
        pathlib.Path(out).write_text(json.dumps([n, type(n).__name__]))
    """
)

BROKEN = textwrap.dedent(
    """
    import not_a_module_of_this_venv
    from prefect import flow

    @flow(name="broken-flow")
    def broken(n: int):
        return n
    """
)

SERVE = (
    "from prefect.flows import load_flow_from_entrypoint\n"
    "load_flow_from_entrypoint('flow.py:typed').serve(name='by-serve', "
    "print_starting_message=False)\n"
)


def client_env(server: PrefectServer, home: Path) -> dict[str, str]:
    """Prefect's CLI and Runner on the test server; their client retries 503s by itself."""
    return {**server.env(), "PREFECT_HOME": str(home)}


@contextlib.contextmanager
def served_by_prefect(server: PrefectServer, flow_dir: Path, home: Path) -> Iterator[None]:
    """`flow.serve` in a subprocess from the Prefect venv, until the block ends."""
    log = (home.parent / "serve.log").open("ab")
    proc = subprocess.Popen(
        [server.python, "-c", SERVE],
        cwd=flow_dir,
        env=client_env(server, home),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    try:
        yield
    finally:
        for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture(scope="module")
def setup(
    prefect_server: PrefectServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[AgentProcess, dict[str, Path]]]:
    root = tmp_path_factory.mktemp("schema")
    dirs = {}
    for name, source in (("typed", TYPED), ("count", COUNT), ("broken", BROKEN)):
        dirs[name] = root / name
        dirs[name].mkdir()
        (dirs[name] / "flow.py").write_text(source)
    bare = make_bare_repo(root / "repos", "flows.git", {"flows/flow.py": TYPED})
    dirs["out"] = root / "out"
    dirs["out"].mkdir()
    deployments = [
        {
            "name": "by-agent",
            "flow_name": "typed-flow",
            "entrypoint": "flow.py:typed",
            "path": str(dirs["typed"]),
        },
        {
            "name": "by-agent-git",
            "flow_name": "typed-flow",
            "entrypoint": "flow.py:typed",
            "git": {"url": f"file://{bare}", "branch": "main", "subdirectory": "flows"},
        },
        {
            "name": "enforced",
            "flow_name": "count-flow",
            "entrypoint": "flow.py:count",
            "path": str(dirs["count"]),
            "parameters": {"out": str(dirs["out"] / "n.json")},
        },
        {
            "name": "broken",
            "flow_name": "broken-flow",
            "entrypoint": "flow.py:broken",
            "path": str(dirs["broken"]),
        },
    ]
    with running_agent(
        root / "agent",
        api_url=prefect_server.api_url,
        python=prefect_server.python,
        deployments=deployments,
        name="schema",
    ) as agent:
        yield agent, dirs


def deployment(api: Api, flow_name: str, name: str) -> dict[str, Any]:
    deployment_id = api.wait_deployment(flow_name, name, timeout=60)
    response = api.request("GET", f"/deployments/{deployment_id}")
    response.raise_for_status()
    return dict(response.json())


def test_the_schema_is_the_one_flow_serve_registers(
    setup: tuple[AgentProcess, dict[str, Path]],
    prefect_server: PrefectServer,
    api: Api,
    tmp_path: Path,
) -> None:
    agent, dirs = setup
    home = tmp_path / "serve-home"
    home.mkdir()
    with served_by_prefect(prefect_server, dirs["typed"], home):
        served = deployment(api, "typed-flow", "by-serve")
    ours = deployment(api, "typed-flow", "by-agent")
    from_git = deployment(api, "typed-flow", "by-agent-git")
    schema = served["parameter_openapi_schema"]
    # The flow has what the comparison must cover: types, defaults, a model, an enum and
    # descriptions from its docstring.
    assert schema["required"] == ["n"]
    assert schema["properties"]["n"]["description"] == "How many things to count."
    assert schema["properties"]["name"]["default"] == "world"
    assert set(schema["definitions"]) == {"Color", "Window"}
    assert ours["parameter_openapi_schema"] == schema, agent.log_text()[-3000:]
    assert from_git["parameter_openapi_schema"] == schema
    assert ours["description"] == served["description"] == from_git["description"]
    assert served["description"].startswith("Counts things in a window.")
    assert ours["enforce_parameter_schema"] is served["enforce_parameter_schema"] is True


def prefect_cli(server: PrefectServer, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(server.venv / "bin" / "prefect"), *args],
        env=client_env(server, home),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_server_enforces_the_schema_for_prefects_cli(
    setup: tuple[AgentProcess, dict[str, Path]],
    prefect_server: PrefectServer,
    api: Api,
    tmp_path: Path,
) -> None:
    agent, dirs = setup
    deployment(api, "count-flow", "enforced")
    home = tmp_path / "cli-home"
    home.mkdir()
    refused = prefect_cli(
        prefect_server,
        home,
        "deployment",
        "run",
        "count-flow/enforced",
        "--param",
        "n=notanumber",
    )
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0, output
    assert "Validation failed" in output and "'notanumber' is not of type 'integer'" in output, (
        output
    )

    accepted = prefect_cli(
        prefect_server, home, "deployment", "run", "count-flow/enforced", "--param", "n=7"
    )
    output = accepted.stdout + accepted.stderr
    assert accepted.returncode == 0, output
    match = re.search(r"UUID: ([0-9a-f-]{36})", output)
    assert match, output
    state = api.wait_final(match.group(1))
    assert state["type"] == "COMPLETED", (state, agent.log_text()[-3000:])
    assert json.loads((dirs["out"] / "n.json").read_text()) == [7, "int"]


def test_a_flow_that_cannot_be_imported_registers_without_a_schema(
    setup: tuple[AgentProcess, dict[str, Path]], api: Api
) -> None:
    agent, _ = setup
    broken = deployment(api, "broken-flow", "broken")
    assert broken["parameter_openapi_schema"] == {"type": "object", "properties": {}}
    assert broken["description"] is None
    line = (
        "deployment 'broken-flow/broken': registering it without a parameter schema: "
        "cannot load the flow flow.py:broken: "
        "ModuleNotFoundError: No module named 'not_a_module_of_this_venv'"
    )
    wait_for(lambda: line in messages(agent), 30, what="the agent's warning")


def messages(agent: AgentProcess) -> list[str]:
    return [str(record.get("message")) for record in agent.records()]


def test_a_restart_with_unchanged_code_neither_recomputes_nor_re_registers(
    prefect_server: PrefectServer,
    api: Api,
    flow_dir_factory: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    flow_dir = flow_dir_factory(TYPED)
    deployments = [
        {
            "name": "restarted",
            "flow_name": "typed-flow",
            "entrypoint": "flow.py:typed",
            "path": str(flow_dir),
        }
    ]
    state_dir = str(tmp_path / "state")
    common: dict[str, Any] = {
        "api_url": prefect_server.api_url,
        "python": prefect_server.python,
        "deployments": deployments,
        "agent": {"state_dir": state_dir},
    }
    with running_agent(tmp_path / "first", name="schema-first", **common) as first:
        wait_for(
            lambda: any(
                "registered deployment 'typed-flow/restarted'" in m for m in messages(first)
            ),
            60,
            what="the first registration",
        )
    assert any("computed the parameter schema of flow 'typed-flow'" in m for m in messages(first))
    updated = deployment(api, "typed-flow", "restarted")["updated"]
    with running_agent(tmp_path / "second", name="schema-second", **common) as second:
        wait_for(
            lambda: any(
                "deployment 'typed-flow/restarted' is up to date" in m for m in messages(second)
            ),
            60,
            what="the up-to-date check",
        )
    assert not any("computed the parameter schema" in m for m in messages(second))
    assert deployment(api, "typed-flow", "restarted")["updated"] == updated
