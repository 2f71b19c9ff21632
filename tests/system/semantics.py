"""The bed of tests/system/test_run_semantics.py: flows with hooks that record where they ran,
the agent installed as a real service, and readers of what the hooks, the states and the
events say."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.integration.agent_process import Api, render_config
from tests.integration.prefect_server import PrefectServer
from tests.system.conftest import REPO
from tests.system.test_agent_service import (
    CONFIG,
    SERVICE,
    SLICE,
    STOP_SCOPES,
    Bed,
    container_time,
)
from tests.system.testbed import CACHE, Container, install_agent, install_units

MARKERS = "/var/tmp/ra-hook-markers"  # inside the container; the flows run as root
HOG_MEMORY, HOG_MEMORY_BYTES = "100M", 100 << 20
# Deployment -> runtime_max. 1 s ends the engine before it can report anything (its imports
# alone take longer), 40 s while it runs the flow; 5 s (the issue's) either way, by the load.
RUNTIMES = {"runtime-1s": "1s", "runtime-5s": "5s", "runtime-40s": "40s"}
TASKS_MAX = 512  # the bed's default limit; a hook's cgroup must carry it too
ZOMBIE_WITHIN = 90  # seconds, as in Prefect's "Detect zombie flows"
# Seconds; the run that outlives the agent's stop. Off the engine's 30 s heartbeat grid: Prefect's
# engine checks the run's state, then emits, so a beat due at the very moment the run completes
# can land just after COMPLETED (seen with 180 s; docs/runs.md). That race is the engine's.
LONG_RUN = 165
AGENT_DOWN = 120  # seconds
POOL = "system-pool"  # a work pool the agent creates (type runner-agent)

FLOWS = textwrap.dedent(
    """
    import json, os, subprocess, time
    from prefect import flow

    MARKERS = "/var/tmp/ra-hook-markers"

    def _cgroups():
        groups = {}
        with open("/proc/self/cgroup") as handle:
            for line in handle:
                _id, keys, path = line.rstrip("\\n").split(":", 2)
                for key in keys.split(","):
                    groups[key] = path
        return groups

    def _read(path):
        try:
            with open(path) as handle:
                return handle.read().strip()
        except OSError as exc:
            return f"unreadable: {exc}"

    def _record(kind, flow_run, state):
        groups = _cgroups()
        line = {
            "hook": kind,
            "state": state.type.value,
            "message": state.message,
            "pid": os.getpid(),
            "unit": groups.get("name=systemd", "").rsplit("/", 1)[-1],
            "memory_max": _read(f"/sys/fs/cgroup/memory{groups.get('memory', '')}"
                                "/memory.limit_in_bytes"),
            "tasks_max": _read(f"/sys/fs/cgroup/pids{groups.get('pids', '')}/pids.max"),
        }
        os.makedirs(MARKERS, exist_ok=True)
        with open(os.path.join(MARKERS, f"{flow_run.id}.jsonl"), "a") as handle:
            handle.write(json.dumps(line) + "\\n")

    def on_crashed(flow, flow_run, state):
        _record("crashed", flow_run, state)

    def on_cancellation(flow, flow_run, state):
        _record("cancellation", flow_run, state)

    HOOKS = {"on_crashed": [on_crashed], "on_cancellation": [on_cancellation]}

    @flow(**HOOKS)
    def hog(megabytes: int = 1000):
        print(f"allocating {megabytes} MB", flush=True)
        data = b"x" * (megabytes << 20)
        print(f"allocated {len(data)} bytes", flush=True)

    @flow(**HOOKS)
    def sleeper(seconds: float = 60.0):
        # X: what the engine itself sees of a job variable's env (a warm engine's
        # /proc/<pid>/environ is its template's).
        print(f"sleeping {seconds}s, X={os.environ.get('X')}", flush=True)
        time.sleep(seconds)

    @flow(**HOOKS)
    def grandchildren():
        # One child in the engine's session, one in a session of its own (setsid): a process
        # group kill would miss the second.
        subprocess.Popen(["sleep", "3011"])
        subprocess.Popen(["setsid", "sleep", "3012"])
        print("started the grandchildren", flush=True)
        time.sleep(300)
    """
)


def deployments(flows: Path) -> list[dict[str, Any]]:
    def deployment(name: str, func: str, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "flow_name": f"sem-{name}",
            "entrypoint": f"flows.py:{func}",
            "path": str(flows),
            **extra,
        }

    return [
        deployment("hog", "hog", memory_max=HOG_MEMORY),
        *(
            deployment(name, "sleeper", runtime_max=runtime, parameters={"seconds": 60})
            for name, runtime in RUNTIMES.items()
        ),
        deployment("grandchildren", "grandchildren"),
        deployment("long", "sleeper", parameters={"seconds": LONG_RUN}),
    ]


@contextmanager
def installed_agent(
    c: Container, prefect_server: PrefectServer, engine: str = "cold"
) -> Iterator[Bed]:
    """The agent installed as `runner-agent.service`, its deployments registered, stopped;
    its runs start with `engine` (`[flow_run] engine`)."""
    # The flows must be visible inside: under the test cache, which is bound at the same path.
    flows = Path(tempfile.mkdtemp(prefix="system-semantics-flows-", dir=CACHE))
    api = Api(prefect_server.api_url)
    try:
        flows.chmod(0o755)
        (flows / "flows.py").write_text(FLOWS)
        install_units(c, REPO)
        install_agent(c, Path(sys.prefix))  # pytest runs from the agent venv
        config = render_config(
            {
                "api": {"url": prefect_server.api_url, "timeout": "10s"},
                "agent": {
                    "name": "system-semantics",
                    "limit": 4,
                    "poll_interval": "1s",
                    "prefetch": "5s",
                    "heartbeat_interval": "5s",
                    "cancel_grace": "5s",
                    "launcher": "systemd",
                    "hook_timeout": "2m",
                },
                "flow_run": {
                    "python": prefect_server.python,
                    "memory_max": "1G",
                    "cpu_quota": "200%",
                    "tasks_max": TASKS_MAX,
                    "runtime_max": "10m",
                    "env": {"PREFECT_HOME": "/var/tmp/ra-prefect-root"},
                    "engine": engine,
                },
            },
            deployments(flows),
        )
        config += f'\n[[work_pool]]\nname = "{POOL}"\ncreate = true\n'
        c.write_file(CONFIG, config, 0o600)
        c.exec(["runner-agent", "check-config"])
        c.systemctl("start", SERVICE)
        ids = {
            d["name"]: api.wait_deployment(d["flow_name"], d["name"]) for d in deployments(flows)
        }
        c.systemctl("stop", SERVICE)
        yield Bed(c, api, ids, engine)
    finally:
        c.systemctl("stop", SERVICE, check=False)
        c.exec(
            [
                "sh",
                "-c",
                f"systemctl stop {STOP_SCOPES} 'runner-agent-hook-*'; systemctl reset-failed",
            ],
            check=False,
        )
        c.exec(
            [
                "rm",
                "-rf",
                "/etc/runner-agent",
                "/etc/systemd/system/runner-agent.service",
                f"/etc/systemd/system/{SLICE}",
                "/var/lib/runner-agent",
                "/run/runner-agent",
                "/usr/bin/runner-agent",
                MARKERS,
            ],
            check=False,
        )
        c.systemctl("daemon-reload", check=False)
        api.close()
        shutil.rmtree(flows, ignore_errors=True)


@contextmanager
def started_agent(bed: Bed) -> Iterator[Bed]:
    """The agent started for one test; stopped, and every run and hook scope gone, after it."""
    c = bed.c
    since = container_time(c)
    bed.start_agent()
    try:
        yield bed
    finally:
        print(f"--- agent journal since {since}:")
        print(bed.journal_since(since, SERVICE, "-o", "short-precise", "-n", "200"))
        c.systemctl("stop", SERVICE, check=False)
        c.exec(["sh", "-c", f"systemctl stop {STOP_SCOPES} 'runner-agent-hook-*'"], check=False)
        c.wait_for(lambda: not unit_list(c), 30, "run and hook scopes to go")
        c.exec(["systemctl", "reset-failed"], check=False)


def unit_list(c: Container) -> list[str]:
    """Loaded run and hook scopes (the agent's scopes are --collect: gone once they end)."""
    out = c.exec(
        [
            "systemctl",
            "list-units",
            "--all",
            "--plain",
            "--no-legend",
            "runner-agent-run-*",
            "runner-agent-hook-*",
        ],
        check=False,
    ).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def hook_scope(run_id: str) -> str:
    return f"runner-agent-hook-{run_id}.scope"


def markers(c: Container, run_id: str) -> list[dict[str, Any]]:
    out = c.exec(["cat", f"{MARKERS}/{run_id}.jsonl"], check=False).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def wait_story_told(bed: Bed, run_id: str, timeout: float = 180) -> None:
    """Until the agent has finished the run's story: states, hooks, record removed.

    `runner-agent status` lists the runs that have a record; the record goes last.
    """

    def done() -> bool:
        status = json.loads(bed.c.exec(["runner-agent", "status", "--json"]).stdout)
        return all(r["flow_run_id"] != run_id for r in status["runs"])

    bed.c.wait_for(done, timeout, f"the agent to finish run {run_id}")


def history(api: Api, run_id: str) -> list[str]:
    return [s["type"] for s in api.history(run_id)]


def set_state(api: Api, run_id: str, state: dict[str, Any]) -> None:
    response = api.request(
        "POST", f"/flow_runs/{run_id}/set_state", json={"state": state, "force": True}
    )
    response.raise_for_status()


def events(api: Api, name: str, run_id: str) -> list[dict[str, Any]]:
    """Every stored event `name` about flow run `run_id`, oldest first (all pages)."""
    body = {
        "filter": {
            "event": {"name": [name]},
            "resource": {"id": [f"prefect.flow-run.{run_id}"]},
            "occurred": {"since": "2020-01-01T00:00:00+00:00"},
            "order": "ASC",
        },
        "limit": 50,
    }
    response = api.request("POST", "/events/filter", json=body)
    response.raise_for_status()
    page = response.json()
    found = list(page["events"])
    while page.get("next_page"):
        response = api.request("GET", page["next_page"])
        response.raise_for_status()
        page = response.json()
        found += page["events"]
    return found


def stored_through(api: Api, run_id: str, timeout: float = 60) -> None:
    """Until an event posted now about the run is stored; events sent before it are then too
    (the server persists them in the order it received them)."""
    name = "runner-agent.test.sentinel"
    sentinel = {
        "id": str(uuid.uuid4()),
        "occurred": datetime.now(UTC).isoformat(),
        "event": name,
        "resource": {"prefect.resource.id": f"prefect.flow-run.{run_id}"},
        "related": [],
        "payload": {},
    }
    api.request("POST", "/events", json=[sentinel]).raise_for_status()
    deadline = time.monotonic() + timeout
    while not any(e["id"] == sentinel["id"] for e in events(api, name, run_id)):
        assert time.monotonic() < deadline, f"event {sentinel['id']} not stored in {timeout}s"
        time.sleep(1)


def timestamp(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# -- the zombie-run automation


def zombie_automation(name: str) -> dict[str, Any]:
    """Prefect's documented zombie-run automation ("Detect zombie flows"), as REST JSON."""
    return {
        "name": name,
        "trigger": {
            "type": "event",
            "posture": "Proactive",
            "after": ["prefect.flow-run.heartbeat"],
            "expect": [
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            ],
            "match": {"prefect.resource.id": ["prefect.flow-run.*"]},
            "for_each": ["prefect.resource.id"],
            "threshold": 1,
            "within": ZOMBIE_WITHIN,
        },
        "actions": [
            {
                "type": "change-flow-run-state",
                "state": "CRASHED",
                "message": "Flow run marked as crashed due to missing heartbeats.",
            }
        ],
    }


def zombie_control(api: Api, flow_id: str) -> str:
    """A RUNNING run that nobody runs, with one heartbeat: the automation must crash it.

    It proves, within the test, that the automation is installed and acted on by the server's
    services; without it, "never crashed" below would prove nothing.
    """
    response = api.request(
        "POST", "/flow_runs/", json={"flow_id": flow_id, "name": "zombie-control"}
    )
    response.raise_for_status()
    run_id = str(response.json()["id"])
    set_state(api, run_id, {"type": "RUNNING", "name": "Running"})
    heartbeat = {
        "id": str(uuid.uuid4()),
        "occurred": datetime.now(UTC).isoformat(),
        "event": "prefect.flow-run.heartbeat",
        "resource": {
            "prefect.resource.id": f"prefect.flow-run.{run_id}",
            "prefect.resource.name": "zombie-control",
        },
        "related": [],
        "payload": {},
    }
    api.request("POST", "/events", json=[heartbeat]).raise_for_status()
    return run_id
