"""Work pools against the real server: queue priorities as the server applies them, and a fleet
of agents serving one pool, where each run executes exactly once.

The pool, its queues, the deployment and the runs are made through the API, as `prefect deploy`
and `prefect work-queue create` make them; the agents only serve the pool.
"""

from __future__ import annotations

import collections
import textwrap
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.integration.agent_process import CLAIM, FINAL, AgentProcess, Api, running_agent, wait_for
from tests.integration.prefect_server import PrefectServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

RUNS = 60
POOL_LIMIT = 4
FLOWS = textwrap.dedent(
    """
    import os, time
    from prefect import flow

    @flow
    def note(out: str):
        with open(out, "a") as f:
            f.write(f"{os.environ['PREFECT__FLOW_RUN_ID']} {os.environ['POOL_AGENT']}\\n")
        time.sleep(2)  # long enough for the runs of three agents to overlap
    """
)


def ok(response: Any) -> dict[str, Any]:
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def pool_deployment(api: Api, tmp_path: Path, pool: str, queues: dict[str, int]) -> str:
    """A pool with these queues (name -> priority) and a deployment of it; the deployment id."""
    ok(api.request("POST", "/work_pools/", json={"name": pool, "type": "runner-agent"}))
    for name, priority in queues.items():
        body = {"name": name, "priority": priority}
        ok(api.request("POST", f"/work_pools/{pool}/queues", json=body))
    code = tmp_path / "code"
    code.mkdir()
    (code / "flows.py").write_text(FLOWS)
    return api.pool_deployment(
        pool,
        f"{pool}-flow",
        "note",
        entrypoint="flows.py:note",
        path=str(code),
        parameters={"out": str(tmp_path / "executions.log")},
    )


def due_runs(api: Api, deployment_id: str, queue: str | None, count: int) -> list[str]:
    due = datetime.now(UTC) - timedelta(seconds=1)
    state = {
        "type": "SCHEDULED",
        "name": "Scheduled",
        "state_details": {"scheduled_time": due.isoformat()},
    }
    extra = {"work_queue_name": queue} if queue else {}
    return [api.create_run(deployment_id, state=state, **extra) for _ in range(count)]


def executions(tmp_path: Path) -> list[tuple[str, str]]:
    log = tmp_path / "executions.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [(run_id, agent) for run_id, agent in (line.split() for line in lines)]


def start_agent(
    stack: ExitStack, tmp_path: Path, server: PrefectServer, name: str, limit: int, pool: str
) -> AgentProcess:
    return stack.enter_context(
        running_agent(
            tmp_path / name,
            api_url=server.api_url,
            python=server.python,
            deployments=[],
            name=name,
            agent={"limit": limit},
            flow_run={"env": {"POOL_AGENT": name}},
            work_pools=[{"name": pool}],
        )
    )


def wait_all_final(api: Api, run_ids: list[str], timeout: float) -> dict[str, str]:
    def final() -> dict[str, str] | None:
        types = {run_id: api.state(run_id)["type"] for run_id in run_ids}
        return types if all(t in FINAL for t in types.values()) else None

    found: dict[str, str] = wait_for(final, timeout, interval=1.0, what="every run final")
    return found


def test_runs_of_a_higher_priority_queue_go_first(
    prefect_server: PrefectServer, tmp_path: Path, api: Api
) -> None:
    """Three runs wait in `low` (priority 10), then three in `high` (priority 1), all due before
    the agent starts; with one slot it runs them as the server orders them: `high` first."""
    deployment_id = pool_deployment(api, tmp_path, "prio", {"high": 1, "low": 10})
    low = due_runs(api, deployment_id, "low", 3)
    high = due_runs(api, deployment_id, "high", 3)
    with ExitStack() as stack:
        start_agent(stack, tmp_path, prefect_server, "prio-agent", 1, "prio")
        states = wait_all_final(api, low + high, timeout=300)
    assert set(states.values()) == {"COMPLETED"}, states
    order = [run_id for run_id, _ in executions(tmp_path)]
    print(f"execution order: {['high' if r in high else 'low' for r in order]}")
    assert sorted(order) == sorted(low + high)
    assert set(order[:3]) == set(high), order


def test_a_fleet_keeps_to_the_pools_concurrency_limit_and_runs_each_run_once(
    prefect_server: PrefectServer, tmp_path: Path, api: Api
) -> None:
    """Three agents (limit 4 each) serve one pool whose concurrency limit is 4, with a high and
    a low priority queue, and 60 runs fall due at once. Prefect applies the pool's limit only
    when it lists runs; the agents keep to it at the claim (claims.hold_pool_slot)."""
    deployment_id = pool_deployment(api, tmp_path, "fleet-pool", {"high": 1, "low": 10})
    patch = {"concurrency_limit": POOL_LIMIT}
    api.request("PATCH", "/work_pools/fleet-pool", json=patch).raise_for_status()
    agents = ("pool-a", "pool-b", "pool-c")
    high = due_runs(api, deployment_id, "high", RUNS // 2)
    low = due_runs(api, deployment_id, "low", RUNS // 2)
    run_ids = high + low
    with ExitStack() as stack:
        for name in agents:
            start_agent(stack, tmp_path, prefect_server, name, 4, "fleet-pool")
        states = wait_all_final(api, run_ids, timeout=900)
    assert set(states.values()) == {"COMPLETED"}, states
    histories = {run_id: api.history(run_id) for run_id in run_ids}
    claimed_by = {}
    for run_id, history in histories.items():
        types = [s["type"] for s in history]
        assert types.count("RUNNING") == 1, (run_id, types)
        last_claim = [s for s in history if s["type"] == "PENDING"][-1]
        match = CLAIM.match(last_claim.get("message") or "")
        assert match, last_claim
        claimed_by[run_id] = match[1]
    ran = executions(tmp_path)
    assert collections.Counter(run_id for run_id, _ in ran) == collections.Counter(run_ids)
    assert dict(ran) == claimed_by  # the claimant's own flow body ran it
    peak, first = running_peak(histories), first_started(histories, POOL_LIMIT)
    given_back = sum(
        [s["name"] for s in h].count("AwaitingConcurrencySlot") for h in histories.values()
    )
    print(
        f"{RUNS} runs: at most {peak} RUNNING at once (pool limit {POOL_LIMIT}); claims given "
        f"back: {given_back}; split: {collections.Counter(claimed_by.values())}"
    )
    assert peak <= POOL_LIMIT, peak
    assert set(first) <= set(high), first
    workers = api.request("POST", "/work_pools/fleet-pool/workers/filter", json={})
    workers.raise_for_status()
    assert set(agents) <= {worker["name"] for worker in workers.json()}, workers.json()


def running_peak(histories: dict[str, list[dict[str, Any]]]) -> int:
    """The most runs RUNNING at one moment, from each run's RUNNING to its final state."""
    events: list[tuple[datetime, int]] = []
    for history in histories.values():
        running = next(s for s in history if s["type"] == "RUNNING")
        final = next(s for s in history if s["type"] in FINAL)
        events += [(stamp(final), -1), (stamp(running), 1)]
    peak = current = 0
    for _, step in sorted(events):  # an end before a start at the same instant
        current += step
        peak = max(peak, current)
    return peak


def first_started(histories: dict[str, list[dict[str, Any]]], count: int) -> list[str]:
    started = {
        run_id: stamp(next(s for s in history if s["type"] == "RUNNING"))
        for run_id, history in histories.items()
    }
    return sorted(started, key=started.__getitem__)[:count]


def stamp(state: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(state["timestamp"]))
