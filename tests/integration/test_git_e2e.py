"""A deployment whose code comes from git runs to COMPLETED through the real agent, and a push
between two runs gives the second run the new commit."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.integration.agent_process import Api, running_agent
from tests.integration.gitserver import make_bare_repo, push_commit

pytestmark = pytest.mark.integration


def flow_source(greeting: str) -> str:
    return textwrap.dedent(
        f"""
        import os, pathlib
        from prefect import flow

        @flow
        def greet(marker_dir: str):
            pathlib.Path(marker_dir, os.environ["PREFECT__FLOW_RUN_ID"]).write_text(
                "{greeting} " + os.getcwd()
            )
        """
    )


def test_git_deployment_runs_the_claimed_commit(
    prefect_server: Any, api: Api, tmp_path: Path
) -> None:
    bare = make_bare_repo(tmp_path / "repos", "flows.git", {"flows/greet.py": flow_source("v1")})
    markers = tmp_path / "markers"
    markers.mkdir()
    deployments = [
        {
            "name": "from-git",
            "flow_name": "git-greet",
            "entrypoint": "greet.py:greet",
            "git": {
                "url": f"file://{bare}",
                "branch": "main",
                "subdirectory": "flows",
                "pull_interval": "0s",
            },
            "parameters": {"marker_dir": str(markers)},
        }
    ]
    with running_agent(
        tmp_path / "agent",
        api_url=prefect_server.api_url,
        python=prefect_server.python,
        deployments=deployments,
        name="git-e2e",
    ) as agent:
        deployment_id = api.wait_deployment("git-greet", "from-git")
        first = api.create_run(deployment_id)
        state = api.wait_final(first)
        assert state["type"] == "COMPLETED", (state, agent.log_text()[-3000:])
        text, cwd = (markers / first).read_text().split(" ", 1)
        assert text == "v1"
        storage = tmp_path / "agent" / "state" / "storage"
        assert Path(cwd).is_relative_to(storage), cwd
        api.wait_logs(first, "Flow code: commit")

        new_sha = push_commit(bare, {"flows/greet.py": flow_source("v2")})
        second = api.create_run(deployment_id)
        assert api.wait_final(second)["type"] == "COMPLETED"
        text2, cwd2 = (markers / second).read_text().split(" ", 1)
        assert text2 == "v2"
        assert new_sha in cwd2 and cwd2 != cwd
        api.wait_logs(second, new_sha)


def test_unreachable_git_source_crashes_the_run_with_the_reason(
    prefect_server: Any, api: Api, tmp_path: Path
) -> None:
    deployments = [
        {
            "name": "bad-git",
            "flow_name": "git-missing",
            "entrypoint": "greet.py:greet",
            "git": {"url": f"file://{tmp_path}/no-such-repo.git", "branch": "main"},
        }
    ]
    with running_agent(
        tmp_path / "agent",
        api_url=prefect_server.api_url,
        python=prefect_server.python,
        deployments=deployments,
        name="git-bad",
    ):
        deployment_id = api.wait_deployment("git-missing", "bad-git")
        run_id = api.create_run(deployment_id)
        state = api.wait_final(run_id)
        assert state["type"] == "CRASHED"
        assert state["message"].startswith("Could not pull flow code from"), state
        types = [s["type"] for s in api.history(run_id)]
        assert "RUNNING" not in types
