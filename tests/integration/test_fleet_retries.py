"""Fleet-safe in-process retries (issue 13): three agents serve one deployment whose flow has
`retries=2, retry_delay_seconds=3` and fails its first two attempts.

While the run waits in AwaitingRetry it is SCHEDULED and due within every agent's prefetch
window, so each agent's poll returns it; only its own engine may run it again (Prefect's
`retry_type: in_process`). Every attempt must run once, all in the first engine's process, and
the run must be claimed once.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.integration.agent_process import CLAIM, AgentProcess, Api, running_agent, wait_for
from tests.integration.prefect_server import PrefectServer
from tests.integration.run_story import MARKERS, marks, wait_story_done

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

AGENTS = ("retry-a", "retry-b", "retry-c")
FLOWS = (
    MARKERS
    + """
from prefect import flow

@flow(retries=2, retry_delay_seconds=3)
def flaky():
    attempt = count("attempt") + 1
    mark("attempt", str(attempt))
    if attempt < 3:
        raise RuntimeError(f"attempt {attempt} fails on purpose")
"""
)


def synced(agent: AgentProcess) -> bool:
    return any(
        "deployment 'fleet-retries/flaky'" in str(r.get("message", ""))
        and r.get("logger") == "agent.deployments"
        for r in agent.records()
    )


def test_in_process_retries_stay_with_their_engine(
    prefect_server: PrefectServer,
    api: Api,
    tmp_path: Path,
    flow_dir_factory: Callable[[str], Path],
) -> None:
    flow_dir = flow_dir_factory(FLOWS)
    markers = tmp_path / "markers"
    markers.mkdir()
    deployment = {
        "name": "flaky",
        "flow_name": "fleet-retries",
        "entrypoint": "flow.py:flaky",
        "path": str(flow_dir),
        "env": {"MARKER_DIR": str(markers)},
    }
    with ExitStack() as fleet:
        agents = [
            fleet.enter_context(
                running_agent(
                    tmp_path / name,
                    api_url=prefect_server.api_url,
                    python=prefect_server.python,
                    deployments=[deployment],
                    name=name,
                    # Every agent polls often and looks well past the retry delay.
                    agent={"poll_interval": "1s", "prefetch": "10s"},
                )
            )
            for name in AGENTS
        ]
        wait_for(lambda: all(synced(a) for a in agents), 90, what="three synced agents")
        deployment_id = api.wait_deployment("fleet-retries", "flaky")
        run_id = api.create_run(deployment_id)
        state = api.wait_final(run_id, timeout=300)
        logs = "\n".join(a.log_text()[-2000:] for a in agents)
        assert state["type"] == "COMPLETED", (state, logs)
        history = api.history(run_id)
        pending = [s for s in history if s["type"] == "PENDING"]
        assert len(pending) == 1, [s["type"] for s in history]
        claimant = CLAIM.match(pending[0].get("message") or "")
        assert claimant and claimant[1] in AGENTS, pending
        owner = agents[AGENTS.index(claimant[1])]
        wait_story_done(owner, run_id)

    names = [f"{s['type']}({s['name']})" for s in history]
    print(f"{run_id} (claimed by {claimant[1]}): {' > '.join(names)}")
    assert names.count("SCHEDULED(AwaitingRetry)") == 2, names
    assert names.count("RUNNING(Running)") == 3, names
    assert "CRASHED" not in " ".join(names), names
    attempts = marks(markers, run_id, "attempt")
    # Each attempt ran once, in order, all in the one engine the claimant launched.
    assert [text for _, text in attempts] == ["1", "2", "3"], attempts
    assert len({pid for pid, _ in attempts}) == 1, attempts
