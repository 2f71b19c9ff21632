"""Fault: a fleet. Three agents with separate state directories serve one deployment, limit 4
each, and 100 runs fall due at the same moment.

Each run must execute exactly once (one PENDING and one RUNNING in its state history, one line
from its flow body), every run completes, and the work spreads across the agents. The runs are
real `python -m prefect.engine` processes, so the wall time is mostly the engine's start-up on
this host; it is printed (pytest -s) and put into the assertion messages.

On a 2-core host the twelve engines and the SQLite server compete for the CPU, and an engine that
meets a busy server backs off for up to ~4 minutes (`PREFECT_CLIENT_MAX_RETRIES`). So the wait
is for progress, not against a total budget: it fails only when no run has become final for
`STALL` seconds, and then names the runs that are stuck, their histories and their agents' words.
"""

from __future__ import annotations

import collections
import re
import textwrap
import time
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.integration.agent_process import CLAIM, FINAL, AgentProcess, Api, running_agent, wait_for

# The whole test is bounded only by pytest's guard for a hang; the wait below fails first.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(2400)]

AGENTS = ("fleet-a", "fleet-b", "fleet-c")
LIMIT = 4
RUNS = 100
# Longer than an engine's longest API back-off (2 + 4 + ... + 128 s with 7 retries).
STALL = 330.0

FLOWS = textwrap.dedent(
    """
    import os
    from prefect import flow

    @flow
    def noop(out: str):
        with open(out, "a") as f:
            f.write(f"{os.environ['PREFECT__FLOW_RUN_ID']} {os.environ['FLEET_AGENT']}\\n")
    """
)


def registrations(agent: AgentProcess) -> list[tuple[str, str]]:
    """("registered" | "up to date", deployment id) for each sync of the `fleet` deployment."""
    pattern = re.compile(r"deployment 'fleet-flow/fleet' (is up to date|)\s?\(([0-9a-f-]{36})\)")
    found = []
    for record in agent.records():
        message = str(record.get("message", ""))
        if (match := pattern.search(message)) and record.get("logger") == "agent.deployments":
            found.append(("up to date" if match[1] else "registered", match[2]))
    return found


def run_states(api: Api, deployment_id: str) -> dict[str, str]:
    body = {"deployments": {"id": {"any_": [deployment_id]}}, "limit": 200}
    response = api.request("POST", "/flow_runs/filter", json=body)
    response.raise_for_status()
    return {r["id"]: (r.get("state") or {}).get("type", "") for r in response.json()}


def test_fleet_of_three_runs_each_run_once(prefect_server: Any, tmp_path: Path) -> None:
    flow_dir = tmp_path / "flows"
    flow_dir.mkdir()
    (flow_dir / "flows.py").write_text(FLOWS)
    out = tmp_path / "executions.log"
    out.touch()
    deployment = {
        "name": "fleet",
        "flow_name": "fleet-flow",
        "entrypoint": "flows.py:noop",
        "path": str(flow_dir),
        "parameters": {"out": str(out)},
    }
    api = Api(prefect_server.api_url)
    with ExitStack() as stack:
        stack.callback(api.close)  # last out: the assertions below still use it
        fleet = stack.enter_context(ExitStack())

        def start(name: str) -> AgentProcess:
            return fleet.enter_context(
                running_agent(
                    tmp_path / name,
                    api_url=prefect_server.api_url,
                    python=prefect_server.python,
                    deployments=[deployment],
                    name=name,
                    agent={"limit": LIMIT},
                    flow_run={"env": {"FLEET_AGENT": name}},
                )
            )

        # The first agent registers the deployment; the others, started while it already
        # exists, must find it up to date and leave it alone (an upsert would re-schedule).
        first = start(AGENTS[0])
        wait_for(lambda: registrations(first), 60, what="the first registration")
        [(_, deployment_id)] = registrations(first)
        updated = api.request("GET", f"/deployments/{deployment_id}").json()["updated"]
        agents = [first, *(start(name) for name in AGENTS[1:])]
        wait_for(lambda: all(registrations(a) for a in agents), 60, what="three registrations")
        for agent in agents[1:]:
            assert registrations(agent) == [("up to date", deployment_id)], agent.name

        due = datetime.now(UTC) + timedelta(seconds=10)
        state = {
            "type": "SCHEDULED",
            "name": "Scheduled",
            "state_details": {"scheduled_time": due.isoformat()},
        }
        run_ids = [api.create_run(deployment_id, state=state) for _ in range(RUNS)]
        wait_for(lambda: datetime.now(UTC) >= due, 30, interval=0.1, what="the due time")
        # Timed from the due time (creating the runs may have taken longer than the lead).
        started = time.monotonic() - (datetime.now(UTC) - due).total_seconds()

        states = wait_for_all_final(api, deployment_id, agents)
        wall = time.monotonic() - started
        fleet.close()  # stop the agents: what follows only reads
        check_fleet(api, deployment_id, updated, run_ids, states, out, wall)


def wait_for_all_final(api: Api, deployment_id: str, agents: list[AgentProcess]) -> dict[str, str]:
    """Every run's final state type; fails when no run became final for STALL seconds."""
    done, last_progress = -1, time.monotonic()
    while True:
        states = run_states(api, deployment_id)
        now_done = sum(1 for t in states.values() if t in FINAL)
        if now_done == RUNS:
            return states
        if now_done > done:
            done, last_progress = now_done, time.monotonic()
        elif time.monotonic() - last_progress > STALL:
            pytest.fail(stall_report(api, states, agents), pytrace=False)
        time.sleep(2)


def stall_report(api: Api, states: dict[str, str], agents: list[AgentProcess]) -> str:
    """What a stuck fleet looks like: state counts, each stuck run's history and agent lines."""
    counts = collections.Counter(states.values())
    lines = [f"no run became final for {STALL:.0f}s; states: {dict(counts)}"]
    stuck = [run_id for run_id, t in states.items() if t not in FINAL]
    for run_id in stuck[:5]:
        history = [(s["type"], s.get("message") or "") for s in api.history(run_id)]
        lines.append(f"run {run_id}: {history}")
        for agent in agents:
            said = [
                f"{r.get('time')} {r.get('message')}"
                for r in agent.records()
                if r.get("flow_run_id") == run_id
            ]
            if said:
                lines.append(f"  {agent.name}: " + " | ".join(said[-8:]))
    return "\n".join(lines)


def check_fleet(
    api: Api,
    deployment_id: str,
    updated: str,
    run_ids: list[str],
    states: dict[str, str],
    out: Path,
    wall: float,
) -> None:
    assert sorted(states) == sorted(run_ids)
    not_completed = {r: t for r, t in states.items() if t != "COMPLETED"}
    claimed_by: dict[str, str] = {}
    for run_id in run_ids:
        history = api.history(run_id)
        types = [s["type"] for s in history]
        assert types.count("PENDING") == 1, (run_id, types)
        assert types.count("RUNNING") == 1, (run_id, types)
        pending = next(s for s in history if s["type"] == "PENDING")
        match = CLAIM.match(pending.get("message") or "")
        assert match, pending
        claimed_by[run_id] = match[1]
    split = collections.Counter(claimed_by.values())
    figures = (
        f"{RUNS} runs on {len(AGENTS)} agents (limit {LIMIT} each): wall time {wall:.0f}s "
        f"from the due time to the last final state; per agent "
        + ", ".join(f"{name}={split[name]}" for name in AGENTS)
    )
    print(figures)
    assert not not_completed, (figures, not_completed)

    executions = [line.split() for line in out.read_text().splitlines()]
    ran = collections.Counter(run_id for run_id, _ in executions)
    assert sorted(ran) == sorted(run_ids) and set(ran.values()) == {1}, (figures, ran)
    # The agent that claimed a run is the one whose flow body ran it.
    assert {run_id: name for run_id, name in executions} == claimed_by, figures
    assert all(split[name] >= 10 for name in AGENTS), figures
    # Nobody re-registered the deployment while the fleet worked.
    assert api.request("GET", f"/deployments/{deployment_id}").json()["updated"] == updated
