"""Truthful heartbeats (issue 13; docs/runs.md): with the pinned engine the run's
`prefect.flow-run.heartbeat` events come from the engine itself (they carry `prefect.version`),
none from the agent, and none after the run's final state. The process launcher.

Prefect's zombie-run automation starts its 90 s clock at every heartbeat; one that arrives after
the final state would make it act on a run that has already ended.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.integration.agent_process import AgentProcess, Api, running_agent, wait_for
from tests.integration.prefect_server import PrefectServer
from tests.integration.run_story import (
    EVENT_SETTLE,
    MARKERS,
    agent_says,
    cancel_via_api,
    run_events,
    since_now,
    state_time,
    wait_event,
    wait_story_done,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

HEARTBEAT = "prefect.flow-run.heartbeat"
ENGINE_BEAT = 30  # Prefect's floor for PREFECT_FLOWS_HEARTBEAT_FREQUENCY, so the agent's too
CANCEL_GRACE = ENGINE_BEAT + 5  # a deaf engine surely beats once within it
FLOWS = (
    MARKERS
    + """
import signal, time
from prefect import flow

@flow
def forty_seconds():
    mark("started")
    time.sleep(40)

@flow
def deaf_to_sigterm():
    # Like a flow stuck in a long call that never returns to Python: the engine takes the
    # cancel intent, but its SIGTERM handler cannot run.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    mark("started")
    time.sleep(300)
"""
)


def beats(api: Api, run_id: str, since: datetime) -> list[dict[str, Any]]:
    return run_events(api, run_id, [HEARTBEAT], since)


def occurred(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["occurred"])


class Setup:
    def __init__(self, agent: AgentProcess, api: Api) -> None:
        self.agent, self.api = agent, api

    def start(self, name: str) -> str:
        return self.api.create_run(self.api.wait_deployment(f"beats-{name}", name))

    def check_after_final(self, run_id: str, since: datetime, final_event: str) -> None:
        """No heartbeat after the final state; every one the engine's."""
        final = self.api.state(run_id)
        wait_story_done(self.agent, run_id)
        # The final state's own event is stored; any heartbeat sent before the engine died is
        # too, a few seconds later.
        wait_event(self.api, run_id, final_event, since)
        time.sleep(EVENT_SETTLE)
        sent = beats(self.api, run_id, since)
        assert sent, "no heartbeat at all"
        late = [e["occurred"] for e in sent if occurred(e) > state_time(final)]
        assert not late, (final["timestamp"], late)
        assert all(e["resource"].get("prefect.version") for e in sent), sent


@pytest.fixture
def setup(
    prefect_server: PrefectServer,
    api: Api,
    tmp_path: Path,
    flow_dir_factory: Callable[[str], Path],
) -> Iterator[Setup]:
    flow_dir = flow_dir_factory(FLOWS)
    markers = tmp_path / "markers"
    markers.mkdir()
    deployments = [
        {
            "name": name,
            "flow_name": f"beats-{name}",
            "entrypoint": f"flow.py:{func}",
            "path": str(flow_dir),
            "env": {"MARKER_DIR": str(markers)},
        }
        for name, func in (("forty", "forty_seconds"), ("deaf", "deaf_to_sigterm"))
    ]
    with running_agent(
        tmp_path / "agent",
        api_url=prefect_server.api_url,
        python=prefect_server.python,
        deployments=deployments,
        name="beats",
        agent={"heartbeat_interval": "5s", "cancel_grace": f"{CANCEL_GRACE}s"},
    ) as agent:
        yield Setup(agent, api)


def test_engine_heartbeats_stop_at_the_final_state(setup: Setup) -> None:
    since = since_now()
    run_id = setup.start("forty")
    # The engine beats when its flow starts and every 30 s after: two in a 40 s flow.
    running = wait_for(
        lambda: len(found := beats(setup.api, run_id, since)) >= 2 and found,
        180,
        interval=1.0,
        what="two engine heartbeats",
    )
    assert setup.api.state(run_id)["type"] in ("RUNNING", "COMPLETED")
    assert all(e["resource"].get("prefect.version") for e in running), running
    state = setup.api.wait_final(run_id, timeout=120)
    assert state["type"] == "COMPLETED", state
    setup.check_after_final(run_id, since, "prefect.flow-run.Completed")


def test_no_heartbeat_after_cancelled_while_the_engine_lingers(setup: Setup) -> None:
    """An engine that acknowledged the cancel intent but is slow to act on the SIGTERM that
    follows beats on through the grace; CANCELLED must wait until it is gone."""
    since = since_now()
    run_id = setup.start("deaf")
    wait_for(lambda: beats(setup.api, run_id, since), 180, what="the first heartbeat")
    cancel_via_api(setup.api, run_id)
    wait_for(
        lambda: setup.api.state(run_id).get("type") == "CANCELLED",
        CANCEL_GRACE + 120,
        what="CANCELLED",
    )
    setup.check_after_final(run_id, since, "prefect.flow-run.Cancelled")
    assert agent_says(setup.agent, run_id, "the engine acknowledged the cancellation")
    # The grace is longer than the engine's beat: it did beat while it lingered, so this test
    # is about that window.
    history = setup.api.history(run_id)
    cancelling = state_time(next(s for s in history if s["type"] == "CANCELLING"))
    lingering = [e for e in beats(setup.api, run_id, since) if occurred(e) > cancelling]
    assert lingering, "no heartbeat during the grace"
