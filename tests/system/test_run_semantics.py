"""Run semantics that only count under a real systemd (issue 13), with the real
`runner-agent.service` in a booted systemd 252 with enforced limits:

- `on_crashed` runs exactly once for a run killed by one of its own limits: at MemoryMax the
  engine dies without a word, so the agent runs the hooks, in `runner-agent-hook-<id>.scope` with
  the run's limits; at RuntimeMaxSec systemd sends SIGTERM, the engine reports Crashed and runs
  the hooks itself, and the agent only replaces the message with one that names the limit.
- A cancellation ends CANCELLED with no CRASHED in between, `on_cancellation` runs once, and
  nothing of the run's scope survives, not even a grandchild in a session of its own.
- With Prefect's documented zombie-run automation installed, a run outlives two minutes of
  `systemctl stop runner-agent` and completes: the engine's own heartbeats keep it alive.

The flows' hooks append one JSON line per call to a file inside the container, recording where
they ran (their unit and the limits of its cgroups), so "exactly once" and "in which unit" are
read from what the hooks did, not from the agent's own account.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.integration.engines import launches
from tests.integration.prefect_server import PrefectServer
from tests.system.semantics import (
    AGENT_DOWN,
    HOG_MEMORY,
    HOG_MEMORY_BYTES,
    LONG_RUN,
    POOL,
    RUNTIMES,
    TASKS_MAX,
    ZOMBIE_WITHIN,
    events,
    history,
    hook_scope,
    installed_agent,
    markers,
    set_state,
    started_agent,
    stored_through,
    timestamp,
    unit_list,
    wait_story_told,
    zombie_automation,
    zombie_control,
)
from tests.system.test_agent_service import SERVICE, Bed, scope
from tests.system.testbed import Container


@pytest.fixture(scope="module")
def bed(host_container: Container, prefect_server: PrefectServer, engine: str) -> Iterator[Bed]:
    """The installed agent, once per engine: every test of this module runs with each."""
    with installed_agent(host_container, prefect_server, engine) as installed:
        yield installed


@pytest.fixture
def agent(bed: Bed) -> Iterator[Bed]:
    """The agent started for one test; stopped, and every run and hook scope gone, after it."""
    with started_agent(bed) as started:
        yield started


# -- a. on_crashed exactly once for the limits' kills ------------------------------------------


def test_oom_kill_runs_on_crashed_once_in_a_hook_scope_with_the_run_limits(agent: Bed) -> None:
    run_id = agent.run("hog", megabytes=1000)
    state = agent.wait_crashed_naming(run_id, f"MemoryMax={HOG_MEMORY}", timeout=120)
    print(f"OOM at MemoryMax={HOG_MEMORY}: {state['message']}")
    wait_story_told(agent, run_id)
    seen = markers(agent.c, run_id)
    print(f"hooks: {seen}")
    assert [m["hook"] for m in seen] == ["crashed"], seen
    hook = seen[0]
    # The engine died without a word: the agent ran the hook, in a unit of its own, with the
    # run's limits (read by the hook from its own cgroups).
    assert hook["unit"] == hook_scope(run_id), hook
    assert int(hook["memory_max"]) == HOG_MEMORY_BYTES, hook
    assert hook["tasks_max"] == str(TASKS_MAX), hook
    assert hook["state"] == "CRASHED" and f"MemoryMax={HOG_MEMORY}" in hook["message"], hook
    assert "CANCELLED" not in history(agent.api, run_id)
    assert agent.api.state(run_id)["type"] == "CRASHED"
    assert hook_scope(run_id) not in unit_list(agent.c)
    assert launches(agent.api, run_id) == [agent.engine]


@pytest.mark.parametrize("deployment", sorted(RUNTIMES))
def test_runtime_limit_runs_on_crashed_once(agent: Bed, deployment: str) -> None:
    """Who runs the hook depends on how far the engine got before systemd's SIGTERM: exactly
    once either way. The hooks' time limit is the agent's hook_timeout, not the run's."""
    runtime = RUNTIMES[deployment]
    run_id = agent.run(deployment)
    state = agent.wait_crashed_naming(run_id, f"RuntimeMaxSec={runtime}", timeout=180)
    print(f"RuntimeMaxSec={runtime}: {state['message']}")
    wait_story_told(agent, run_id)
    seen = markers(agent.c, run_id)
    states = agent.api.history(run_id)
    print(f"hooks: {seen}; history: {[(s['type'], s['message']) for s in states]}")
    assert [m["hook"] for m in seen] == ["crashed"], seen
    crashes = [s for s in states if s["type"] == "CRASHED"]
    if any(not (s["message"] or "").startswith("Process exited") for s in crashes):
        # The engine had loaded the flow: it reported Crashed and ran the hook itself, in the
        # run's own scope; the agent then replaced only the message. That can happen before
        # RUNNING too (seen at 1 s on a quiet machine: PENDING, then the engine's Crashed).
        print("the engine reported the crash and ran on_crashed")
        assert seen[0]["unit"] == scope(run_id), seen
        first_crash = next(i for i, s in enumerate(states) if s["type"] == "CRASHED")
        assert states[first_crash - 1]["type"] in ("PENDING", "RUNNING"), states
    else:
        # Killed before the engine could report anything: the agent ran the hook.
        print("the agent reported the crash and ran on_crashed")
        assert seen[0]["unit"] == hook_scope(run_id), seen
        assert len(crashes) == 1, states
    final = agent.api.state(run_id)
    assert final["type"] == "CRASHED" and f"RuntimeMaxSec={runtime}" in final["message"]
    assert not {"COMPLETED", "CANCELLED"} & {s["type"] for s in states}, states
    assert launches(agent.api, run_id) == [agent.engine]


def test_job_variables_set_the_run_scope_limits_and_environment(agent: Bed) -> None:
    """Job variables sent with a run (the body `run_deployment(job_variables=...)` posts; issue
    14): the run's scope carries the run's MemoryMax over the host's 1G, in systemd and in the
    kernel's cgroup, and the engine has the run's env."""
    job_variables = {"memory_max": "300M", "env": {"X": "1"}}
    run_id = agent.api.create_run(
        agent.ids["long"], parameters={"seconds": 20}, job_variables=job_variables
    )
    unit = agent.wait_running(run_id, timeout=120)
    shown = agent.c.show(unit, "MemoryMax", "ControlGroup")
    group = agent.c.cgroup_dir("memory", shown["ControlGroup"])  # a host path
    enforced = (group / "memory.limit_in_bytes").read_text().strip()
    environs = [
        Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        for pid in (group / "cgroup.procs").read_text().split()
    ]
    print(f"{unit}: MemoryMax={shown['MemoryMax']}, memory.limit_in_bytes={enforced}")
    assert shown["MemoryMax"] == str(300 << 20)
    assert enforced == str(300 << 20)
    assert agent.scope_engine(unit) == agent.engine
    if agent.engine == "cold":
        # A warm run's W and E show their template's environment there (docs/warm-engine.md);
        # what the engine itself sees is checked below, for both.
        assert environs and all(b"X=1" in environ for environ in environs), len(environs)
    assert agent.api.wait_final(run_id, timeout=120)["type"] == "COMPLETED"
    assert launches(agent.api, run_id) == [agent.engine]
    agent.c.exec(["journalctl", "--sync"], check=False)
    output = agent.c.exec(["runner-agent", "logs", run_id]).stdout
    assert "sleeping 20.0s, X=1" in output, output


def test_a_work_pool_run_gets_its_deployments_limits_in_its_scope(agent: Bed) -> None:
    """A deployment of a `runner-agent` work pool (as `prefect deploy` makes it, with
    `job_variables: {memory_max: 300M}`): its run's scope carries MemoryMax=300M over the
    host's 1G, in systemd and in the kernel's cgroup, and it completes."""
    api = agent.api
    agent.c.wait_for(
        lambda: api.request("GET", f"/work_pools/{POOL}").status_code == 200,
        60,
        "the agent to create its work pool",
    )
    code = api.request("GET", f"/deployments/{agent.ids['long']}").json()["path"]
    flow_id = api.request("POST", "/flows/", json={"name": "sem-pool"}).json()["id"]
    body = {
        "name": "pool-sleeper",
        "flow_id": flow_id,
        "entrypoint": "flows.py:sleeper",
        "path": code,
        "work_pool_name": POOL,
        "job_variables": {"memory_max": "300M"},
    }
    deployment_id = api.request("POST", "/deployments/", json=body).json()["id"]
    run_id = api.create_run(deployment_id, parameters={"seconds": 20})
    unit = agent.wait_running(run_id, timeout=120)
    shown = agent.c.show(unit, "MemoryMax", "ControlGroup")
    group = agent.c.cgroup_dir("memory", shown["ControlGroup"])
    enforced = (group / "memory.limit_in_bytes").read_text().strip()
    print(f"{unit}: MemoryMax={shown['MemoryMax']}, memory.limit_in_bytes={enforced}")
    assert shown["MemoryMax"] == str(300 << 20)
    assert enforced == str(300 << 20)
    assert agent.api.wait_final(run_id, timeout=120)["type"] == "COMPLETED"
    # A pool run takes the host's [flow_run] engine too (the template the deployments keep).
    assert launches(api, run_id) == [agent.engine]
    pool = api.request("GET", f"/work_pools/{POOL}").json()
    assert (pool["type"], pool["status"]) == ("runner-agent", "READY"), pool


# -- b. cancellation ---------------------------------------------------------------------------


def test_cancel_has_no_crash_runs_on_cancellation_once_and_leaves_no_process(
    agent: Bed,
) -> None:
    c = agent.c
    run_id = agent.run("grandchildren")
    unit = agent.wait_running(run_id)

    def grandchildren() -> dict[str, int]:
        found = {}
        for pid in agent.scope_pids(unit):
            cmdline, _status = agent.process(pid)
            if cmdline in ("sleep 3011", "sleep 3012"):
                found[cmdline] = pid
        return found if len(found) == 2 else {}

    pids = c.wait_for(grandchildren, 60, "the flow to start both grandchildren")
    assert agent.scope_engine(unit) == agent.engine
    sessions = {
        name: c.exec(["ps", "-o", "sid=", "-p", str(pid)]).stdout.strip()
        for name, pid in pids.items()
    }
    assert sessions["sleep 3012"] != sessions["sleep 3011"], sessions  # setsid worked
    group = agent.c.show(unit, "ControlGroup")["ControlGroup"]

    set_state(agent.api, run_id, {"type": "CANCELLING", "name": "Cancelling"})
    agent.wait_state(run_id, "CANCELLED", timeout=60)
    wait_story_told(agent, run_id)

    types = history(agent.api, run_id)
    seen = markers(c, run_id)
    print(f"history: {types}; hooks: {seen}")
    assert "CRASHED" not in types, types
    assert types[-1] == "CANCELLED", types
    assert [m["hook"] for m in seen] == ["cancellation"], seen
    assert seen[0]["unit"] == hook_scope(run_id), seen
    assert seen[0]["state"] == "CANCELLING", seen
    assert not [e["id"] for e in events(agent.api, "prefect.flow-run.Crashed", run_id)]
    assert launches(agent.api, run_id) == [agent.engine]
    # Nothing of the run is left: not the scope, not its cgroup, not either grandchild.
    c.wait_for(lambda: unit not in unit_list(c), 30, f"{unit} to go")
    left = c.exec(["pgrep", "-f", "^sleep 301[12]$"], check=False)
    assert left.returncode == 1, left.stdout
    assert not agent.c.cgroup_dir("memory", group).exists(), group


# -- c. the zombie-run automation and an agent that is away --------------------------------------


def test_run_outlives_a_stopped_agent_under_the_zombie_automation(agent: Bed) -> None:
    c, api = agent.c, agent.api
    response = api.request(
        "POST",
        "/automations/",
        json=zombie_automation(f"crash zombie flows {uuid.uuid4().hex[:8]}"),
    )
    assert response.status_code == 201, response.text
    automation_id = response.json()["id"]
    try:
        run_id = agent.run("long")
        agent.wait_running(run_id, timeout=120)
        flow_id = api.run(run_id)["flow_id"]
        # The trigger is armed once a first heartbeat was seen ("after").
        c.wait_for(
            lambda: events(api, "prefect.flow-run.heartbeat", run_id),
            120,
            "the run's first heartbeat event",
        )
        stopped_at = datetime.now(UTC)
        c.systemctl("stop", SERVICE)
        control = zombie_control(api, flow_id)
        time.sleep(AGENT_DOWN)
        assert api.state(run_id)["type"] == "RUNNING", api.state(run_id)
        restarted_at = datetime.now(UTC)
        agent.start_agent()

        final = api.wait_final(run_id, timeout=LONG_RUN + 240)
        wait_story_told(agent, run_id)
        types = history(api, run_id)
        print(f"history: {types}; final: {final}")
        assert final["type"] == "COMPLETED", final
        assert "CRASHED" not in types, types
        assert not events(api, "prefect.flow-run.Crashed", run_id)
        assert launches(api, run_id) == [agent.engine]

        # The automation was live all along: the control run, silent, was crashed by it.
        control_state = api.wait_final(control, timeout=ZOMBIE_WITHIN + 240)
        print(f"control run: {control_state}")
        assert control_state["type"] == "CRASHED", control_state
        assert "missing heartbeats" in (control_state.get("message") or ""), control_state

        # Heartbeats went on while the agent was stopped, and none came after the final state.
        # The engine is gone (the story is told); what it sent is stored once a later event is.
        stored_through(api, run_id)
        final_at = timestamp(final["timestamp"])
        occurred = sorted(
            timestamp(b["occurred"]) for b in events(api, "prefect.flow-run.heartbeat", run_id)
        )
        during = [t for t in occurred if stopped_at <= t <= restarted_at]
        print(
            f"{len(occurred)} heartbeats at {[t.strftime('%H:%M:%S.%f') for t in occurred]}, "
            f"{len(during)} while the agent was stopped; final state {final_at.isoformat()}"
        )
        assert len(during) >= 2, occurred
        assert occurred[-1] <= final_at, (occurred[-1], final_at)
    finally:
        api.request("DELETE", f"/automations/{automation_id}")
