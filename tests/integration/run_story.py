"""Helpers for tests that follow one run's whole story: its events, its hook markers, the end
of the agent's work on it, and the processes it left behind."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil

from tests.integration.agent_process import AgentProcess, Api, wait_for

# Events are stored asynchronously: absence is only asserted this long after a later event of
# the same run was seen.
EVENT_SETTLE = 10.0
PAGE = 50  # the most /events/filter returns at once

# Flow-side helpers shared by the flows of these tests: every line a flow or a hook writes names
# the run and the writing process, so a test can count who ran what, where, how often.
MARKERS = """
import os, pathlib

def marker(name):
    return pathlib.Path(os.environ["MARKER_DIR"], os.environ["PREFECT__FLOW_RUN_ID"] + "." + name)

def mark(name, text=""):
    with open(marker(name), "a") as out:
        out.write(f"{os.getpid()} {text}\\n")

def count(name):
    return len(marker(name).read_text().splitlines()) if marker(name).exists() else 0

def on_cancellation(flow, flow_run, state):
    mark("on_cancellation", state.name)

def on_crashed(flow, flow_run, state):
    mark("on_crashed", state.name)

HOOKS = dict(on_cancellation=[on_cancellation], on_crashed=[on_crashed])
"""


def marks(marker_dir: Path, run_id: str, name: str) -> list[list[str]]:
    """The lines `mark(name, ...)` wrote for the run, each as [pid, text...]."""
    path = marker_dir / f"{run_id}.{name}"
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines()]


def run_events(
    api: Api, run_id: str, names: Iterable[str], since: datetime
) -> list[dict[str, Any]]:
    """Events of `names` whose resource is the run, oldest first."""
    body = {
        "filter": {
            "event": {"name": list(names)},
            "resource": {"id": [f"prefect.flow-run.{run_id}"]},
            "occurred": {"since": since.isoformat()},
            "order": "ASC",
        },
        "limit": PAGE,
    }
    response = api.request("POST", "/events/filter", json=body)
    response.raise_for_status()
    return list(response.json()["events"])


def related_events(api: Api, run_id: str, name: str, since: datetime) -> list[dict[str, Any]]:
    """Events of `name` that name the run among their related resources."""
    body = {
        "filter": {
            "event": {"name": [name]},
            "related": {"id": [f"prefect.flow-run.{run_id}"]},
            "occurred": {"since": since.isoformat()},
        },
        "limit": PAGE,
    }
    response = api.request("POST", "/events/filter", json=body)
    response.raise_for_status()
    return list(response.json()["events"])


def wait_event(
    api: Api, run_id: str, name: str, since: datetime, timeout: float = 60
) -> dict[str, Any]:
    found = wait_for(
        lambda: run_events(api, run_id, [name], since),
        timeout,
        interval=1.0,
        what=f"event {name} of run {run_id}",
    )
    return dict(found[0])


def assert_no_event(api: Api, run_id: str, name: str, since: datetime) -> None:
    """Call only after a later event of the run was seen: stored events settle in seconds."""
    time.sleep(EVENT_SETTLE)
    found = run_events(api, run_id, [name], since)
    assert not found, [(e["event"], e["occurred"]) for e in found]


def wait_story_done(agent: AgentProcess, run_id: str, timeout: float = 120) -> None:
    """The agent is done with the run (hooks run, final state reported) once its record goes."""
    record = agent.workdir / "state" / "runs" / run_id
    wait_for(lambda: not record.exists(), timeout, what=f"the agent to finish run {run_id}")


def pid_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids: Iterable[int], timeout: float = 30) -> None:
    pids = list(pids)
    wait_for(lambda: all(pid_gone(p) for p in pids), timeout, what=f"processes {pids} to end")


def agent_says(agent: AgentProcess, run_id: str, text: str) -> bool:
    return any(
        r.get("flow_run_id") == run_id and text in str(r.get("message", ""))
        for r in agent.records()
    )


def cancel_via_api(api: Api, run_id: str) -> None:
    response = api.request(
        "POST",
        f"/flow_runs/{run_id}/set_state",
        json={"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True},
    )
    response.raise_for_status()
    assert response.json()["status"] == "ACCEPT", response.json()


def prefect_env(api_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RUNNER_AGENT_"))}
    env["PREFECT_API_URL"] = api_url
    return env


def cancel_via_cli(prefect_venv: Path, api_url: str, run_id: str) -> str:
    """`prefect flow-run cancel <id>`, Prefect's own CLI, as a user would type it."""
    for _attempt in range(5):
        done = subprocess.run(
            [str(prefect_venv / "bin" / "prefect"), "flow-run", "cancel", run_id],
            env=prefect_env(api_url),
            capture_output=True,
            text=True,
            timeout=180,
        )
        if done.returncode == 0:
            return done.stdout
        # The CLI has its own retries; a busy SQLite server may still outlast them.
        if "503" not in done.stdout + done.stderr:
            break
    raise AssertionError(f"prefect flow-run cancel failed: {done.stdout}\n{done.stderr}")


def prefect_python(prefect_venv: Path, api_url: str, script: str, *args: str) -> str:
    """Run a short script with the Prefect venv's python (Prefect's own client)."""
    done = subprocess.run(
        [str(prefect_venv / "bin" / "python"), "-c", script, *args],
        env=prefect_env(api_url),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, f"{script}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def state_time(state: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(state["timestamp"])


def since_now() -> datetime:
    # The server's clock is the host's; a little slack for rounding.
    return datetime.now(UTC) - timedelta(seconds=5)
