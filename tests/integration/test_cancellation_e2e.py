"""Cancellation and heartbeats, end to end, with the real agent and a real Prefect server."""

from __future__ import annotations

import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.integration.agent_process import AgentProcess, Api, running_agent, wait_for
from tests.integration.engines import engine_of, launches

pytestmark = pytest.mark.integration

FLOWS = textwrap.dedent(
    """
    import os, pathlib, subprocess, time
    from prefect import flow

    @flow
    def sleeper(marker_dir: str):
        child = subprocess.Popen(["sleep", "300"])
        pathlib.Path(marker_dir, os.environ["PREFECT__FLOW_RUN_ID"]).write_text(
            f"{os.getpid()} {child.pid}"
        )
        time.sleep(300)

    @flow
    def quick(marker_dir: str):
        pathlib.Path(marker_dir, os.environ["PREFECT__FLOW_RUN_ID"]).write_text("ran")
    """
)


def start_agent(
    prefect_server: Any, tmp_path: Path, *, websocket: bool, suffix: str, engine: str = "cold"
) -> Any:
    """Deployments get per-test flow names, so no run is created from another test's config."""
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "flows.py").write_text(FLOWS)
    markers = tmp_path / "markers"
    markers.mkdir()
    deployments = [
        {
            "name": "sleeper",
            "flow_name": f"cancel-sleeper-{suffix}",
            "entrypoint": "flows.py:sleeper",
            "path": str(flows),
            "parameters": {"marker_dir": str(markers)},
            "tags": ["cancel-test"],
        },
        {
            "name": "quick",
            "flow_name": f"cancel-quick-{suffix}",
            "entrypoint": "flows.py:quick",
            "path": str(flows),
            "parameters": {"marker_dir": str(markers)},
        },
    ]
    agent = running_agent(
        tmp_path / "agent",
        api_url=prefect_server.api_url,
        python=prefect_server.python,
        deployments=deployments,
        name=f"cancel-{'ws' if websocket else 'poll'}",
        agent={
            "events_websocket": websocket,
            "cancel_grace": "5s",
            "poll_interval": "2s",
            "prefetch": "15s",
            "heartbeat_interval": "2s",
        },
        flow_run={"engine": engine},
    )
    return agent, markers


def cancel(api: Api, run_id: str) -> None:
    response = api.request(
        "POST",
        f"/flow_runs/{run_id}/set_state",
        json={"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True},
    )
    response.raise_for_status()


def events_named(api: Api, name: str, since: datetime) -> list[dict[str, Any]]:
    response = api.request(
        "POST",
        "/events/filter",
        json={
            "filter": {"event": {"name": [name]}, "occurred": {"since": since.isoformat()}},
            "limit": 50,
        },
    )
    response.raise_for_status()
    return list(response.json()["events"])


def wait_cancelled(api: Api, run_id: str) -> dict[str, Any]:
    """The engine acknowledges the cancel intent on its control channel, ends as a cancellation
    on the SIGTERM that follows, and the agent proposes Cancelled (docs/runs.md)."""

    def cancelled() -> dict[str, Any] | None:
        state = api.state(run_id)
        return state if state.get("type") == "CANCELLED" else None

    return dict(wait_for(cancelled, 60, what=f"run {run_id} to be CANCELLED"))


def cancel_running_sleeper(
    api: Api, agent: AgentProcess, markers: Path, suffix: str
) -> tuple[str, list[int]]:
    deployment_id = api.wait_deployment(f"cancel-sleeper-{suffix}", "sleeper")
    run_id = api.create_run(deployment_id)
    marker = markers / run_id
    wait_for(marker.exists, 90, what="the sleeper to start its grandchild")
    pids = [int(p) for p in marker.read_text().split()]
    assert all(psutil.pid_exists(p) for p in pids)
    # The flow's engine (pids[0]) is the configured one: its parent is the sh wrapper, or a
    # warm supervisor.
    assert engine_of(pids[0]) == agent.engine, (pids, agent.engine)
    cancel(api, run_id)
    state = wait_cancelled(api, run_id)
    assert state["type"] == "CANCELLED", (state, agent.log_text()[-3000:])
    assert state["message"] == "Flow run was cancelled successfully."
    history = api.history(run_id)
    # A cancellation is no crash: the engine never reports Crashed on the way.
    assert "CRASHED" not in [s["type"] for s in history], history
    cancelling = next(s for s in history if s["type"] == "CANCELLING")["timestamp"]
    cancelled = next(s for s in history if s["type"] == "CANCELLED")["timestamp"]
    latency = datetime.fromisoformat(cancelled) - datetime.fromisoformat(cancelling)
    print(f"cancellation latency CANCELLING -> CANCELLED: {latency.total_seconds():.2f}s")
    assert launches(api, run_id) == [agent.engine]
    return run_id, pids


def assert_gone(pids: list[int]) -> None:
    def all_gone() -> bool:
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    return False
            except psutil.NoSuchProcess:
                continue
        return True

    wait_for(all_gone, 10, interval=0.2, what=f"processes {pids} to be gone")


def test_cancel_kills_the_whole_run_via_websocket(
    prefect_server: Any, api: Api, tmp_path: Path, engine: str
) -> None:
    since = datetime.now(UTC) - timedelta(seconds=5)
    suffix = f"ws-{engine}"
    agent_cm, markers = start_agent(
        prefect_server, tmp_path, websocket=True, suffix=suffix, engine=engine
    )
    with agent_cm as agent:
        run_id, pids = cancel_running_sleeper(api, agent, markers, suffix)
        assert_gone(pids)

        def cancelled_event() -> list[dict[str, Any]]:
            return [
                e
                for e in events_named(api, "prefect.runner.cancelled-flow-run", since)
                if any(
                    r["prefect.resource.id"] == f"prefect.flow-run.{run_id}" for r in e["related"]
                )
            ]

        events = wait_for(cancelled_event, 30, what="the cancelled-flow-run event")
        event = events[0]
        assert event["resource"]["prefect.resource.id"] == "prefect.runner.cancel-ws"
        roles = {r["prefect.resource.role"] for r in event["related"]}
        assert {"flow-run", "flow", "deployment", "tag"} <= roles
        assert "cancellation event for run" in agent.log_text()


def test_cancel_works_by_polling_without_websocket(
    prefect_server: Any, api: Api, tmp_path: Path
) -> None:
    agent_cm, markers = start_agent(prefect_server, tmp_path, websocket=False, suffix="poll")
    with agent_cm as agent:
        _, pids = cancel_running_sleeper(api, agent, markers, "poll")
        assert_gone(pids)
        assert "seen by polling" in agent.log_text()


def test_heartbeats_reach_the_event_api(prefect_server: Any, api: Api, tmp_path: Path) -> None:
    since = datetime.now(UTC) - timedelta(seconds=5)
    agent_cm, markers = start_agent(prefect_server, tmp_path, websocket=True, suffix="beat")
    with agent_cm:
        deployment_id = api.wait_deployment("cancel-sleeper-beat", "sleeper")
        run_id = api.create_run(deployment_id)
        wait_for((markers / run_id).exists, 90, what="the sleeper to run")

        def run_heartbeat() -> list[dict[str, Any]]:
            return [
                e
                for e in events_named(api, "prefect.flow-run.heartbeat", since)
                if e["resource"]["prefect.resource.id"] == f"prefect.flow-run.{run_id}"
            ]

        beat = wait_for(run_heartbeat, 30, what="a flow-run heartbeat")[0]
        related = {r["prefect.resource.role"]: r for r in beat["related"]}
        assert related["deployment"]["prefect.resource.id"] == f"prefect.deployment.{deployment_id}"
        flow_id = api.run(run_id)["flow_id"]
        assert related["flow"]["prefect.resource.id"] == f"prefect.flow.{flow_id}"
        assert related["tag"]["prefect.resource.id"] == "prefect.tag.cancel-test"
        # The engine's own heartbeat (it carries its version), not the agent's stand-in: it
        # goes on while the agent is stopped (docs/runs.md).
        assert beat["resource"].get("prefect.version")

        def agent_heartbeat() -> list[dict[str, Any]]:
            return [
                e
                for e in events_named(api, "runner-agent.heartbeat", since)
                if e["resource"]["prefect.resource.id"] == "prefect.runner.cancel-ws"
            ]

        payload = wait_for(agent_heartbeat, 30, what="the agent heartbeat")[-1]["payload"]
        assert payload["launcher"] == "process"
        assert payload["limit"] == 4
        assert {"host", "version", "running"} <= set(payload)
        cancel(api, run_id)
        assert wait_cancelled(api, run_id)["type"] == "CANCELLED"


def test_run_cancelled_before_its_time_is_never_launched(
    prefect_server: Any, api: Api, tmp_path: Path
) -> None:
    agent_cm, markers = start_agent(prefect_server, tmp_path, websocket=True, suffix="early")
    with agent_cm as agent:
        deployment_id = api.wait_deployment("cancel-quick-early", "quick")
        start = datetime.now(UTC) + timedelta(seconds=10)
        run_id = api.create_run(
            deployment_id,
            state={"type": "SCHEDULED", "state_details": {"scheduled_time": start.isoformat()}},
        )
        # The agent sees it within the 15 s prefetch and waits for its time.
        wait_for(lambda: run_id in agent.log_text(), 15, what="the agent to pick the run up")
        cancel(api, run_id)
        time.sleep(max(0.0, (start - datetime.now(UTC)).total_seconds()) + 6)
        types = [s["type"] for s in api.history(run_id)]
        assert "PENDING" not in types and "RUNNING" not in types, types
        assert api.state(run_id)["type"] == "CANCELLED"
        assert not (markers / run_id).exists()
