"""The two contenders, serving the same flows: runner-agent and Prefect's Runner (`serve`).

Each contender gets its own deployments (same flows, different deployment names) and is stopped
before the next one starts, so neither ever sees the other's runs.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench import procs
from tests.integration.agent_process import render_config

NOOP_FLOW = "bench-noop"
SLEEPER_FLOW = "bench-sleeper"

FLOWS = textwrap.dedent(
    """
    import subprocess
    import time

    from prefect import flow


    @flow(name="bench-noop")
    def noop() -> None:
        return None


    @flow(name="bench-sleeper")
    def sleeper() -> None:
        # A grandchild of the serving process: cancelling the run must take it down too.
        subprocess.Popen(["sleep", "600"])
        time.sleep(600)
    """
)

# `prefect.serve` exactly as a user would write it; the poll interval comes in as an argument.
SERVE = textwrap.dedent(
    """
    import sys

    from prefect import serve

    from flows import noop, sleeper

    if __name__ == "__main__":
        prefix, limit, poll = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        serve(
            noop.to_deployment(name=f"{prefix}-noop"),
            sleeper.to_deployment(name=f"{prefix}-sleeper"),
            limit=limit,
            query_seconds=poll,
            print_starting_message=False,
        )
    """
)

# Stands in for the engine in the footprint scenario: the agent runs `<python> -m prefect.engine`
# under its sh wrapper, and this just sleeps, so the figures are the agent's own. The agent's
# other uses of a flow's python get a quick answer: its engine probe (`-I -c`, agent/engines.py)
# hears of an engine that sends its own heartbeats, as Prefect 3.8.8 does, but has no control
# channel (this one cannot connect back); the hook runner (`-c`) finds no hooks; the schema
# helper (a script path) fails at once. A probe that hung instead would cost every launch the
# probe's 30 s timeout, and a hook that hung would hold every cancellation for
# `agent.hook_timeout`.
FAKE_PYTHON = """\
#!/bin/sh
case "$1" in
    -m) exec sleep 600 ;;
    -I) echo '{"version": "0+fake", "root": "/nonexistent/prefect", "control_channel": false,\
 "engine_heartbeats": true}'; exit 0 ;;
    -c) exit 0 ;;
esac
exit 1
"""


def write_flows(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "flows.py").write_text(FLOWS)
    (directory / "serve_runner.py").write_text(SERVE)
    return directory


def write_fake_python(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "python"
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    return path


def agent_config(
    *,
    api_url: str,
    name: str,
    limit: int,
    workdir: Path,
    python: str,
    flow_env: Mapping[str, str],
    deployments: Mapping[str, tuple[str, str, str | None]],
    flows_dir: Path,
    work_pools: Sequence[str] = (),
) -> str:
    """The agent's TOML: defaults everywhere except what the benchmark must pin.

    `deployments` maps a deployment name to (flow name, entrypoint, python override or None);
    each of `work_pools` is served, and created if missing. poll_interval and prefetch are left
    at their defaults on purpose.
    """
    sections: dict[str, dict[str, Any]] = {
        "api": {"url": api_url},
        "agent": {
            "name": name,
            "limit": limit,
            "launcher": "process",
            "state_dir": str(workdir / "state"),
            "runtime_dir": str(workdir / "run"),
        },
        "flow_run": {"python": python, "env": dict(flow_env)},
    }
    listed = []
    for dep_name, (flow_name, entrypoint, python_override) in deployments.items():
        entry = {
            "name": dep_name,
            "flow_name": flow_name,
            "entrypoint": entrypoint,
            "path": str(flows_dir),
        }
        if python_override is not None:
            entry["python"] = python_override
        listed.append(entry)
    return render_config(sections, listed, [{"name": n, "create": True} for n in work_pools])


def base_env(tag: str) -> dict[str, str]:
    """Our own environment minus anything that would configure a contender behind our back."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "RUNNER_AGENT_"))
        and k not in {"NOTIFY_SOCKET", "JOURNAL_STREAM"}
    }
    env[procs.MARKER] = tag
    return env


@dataclass
class Contender:
    """A started contender: its process, its deployments, and where its log is."""

    label: str
    proc: psutil.Popen
    log_path: Path
    deployments: dict[str, tuple[str, str]] = field(default_factory=dict)  # role -> (flow, name)

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc})"


def start_agent(
    *,
    agent_bin: Path,
    api_url: str,
    workdir: Path,
    flows_dir: Path,
    flow_python: str,
    tag: str,
    limit: int,
    log_level: str,
    fake_python: Path | None = None,
    flow_env: Mapping[str, str] | None = None,
    work_pools: Sequence[str] = (),
) -> Contender:
    """runner-agent serving the no-op and sleeper flows (or, with fake_python, only a fake),
    and `work_pools`."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {procs.MARKER: tag, "PREFECT_HOME": str(workdir / "prefect-home")}
    env.update(flow_env or {})
    if fake_python is None:
        deployments: dict[str, tuple[str, str, str | None]] = {
            "agent-noop": (NOOP_FLOW, "flows.py:noop", None),
            "agent-sleeper": (SLEEPER_FLOW, "flows.py:sleeper", None),
        }
        roles = {"noop": (NOOP_FLOW, "agent-noop"), "sleeper": (SLEEPER_FLOW, "agent-sleeper")}
    else:
        deployments = {"agent-fake": (SLEEPER_FLOW, "flows.py:sleeper", str(fake_python))}
        roles = {"fake": (SLEEPER_FLOW, "agent-fake")}
    config = workdir / "agent.toml"
    config.write_text(
        agent_config(
            api_url=api_url,
            name=f"bench-{workdir.name}",
            limit=limit,
            workdir=workdir,
            python=flow_python,
            flow_env=env,
            deployments=deployments,
            flows_dir=flows_dir,
            work_pools=work_pools,
        )
    )
    config.chmod(0o600)
    log = workdir / "agent.log"
    proc = procs.start(
        [str(agent_bin), "--config", str(config), "--log-level", log_level, "run"],
        env=base_env(tag),
        cwd=workdir,
        log=log,
    )
    return Contender("runner-agent", proc, log, roles)


def start_runner(
    *,
    python: str,
    server_env: Mapping[str, str],
    workdir: Path,
    flows_dir: Path,
    tag: str,
    limit: int,
    poll_interval: int,
) -> Contender:
    """Prefect's Runner via `prefect.serve(..., limit=...)`, polling every `poll_interval`."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(server_env)
    env.update(
        {
            procs.MARKER: tag,
            "PREFECT_HOME": str(workdir / "prefect-home"),
            "PREFECT_RUNNER_POLL_FREQUENCY": str(poll_interval),
            # The Runner keeps its scratch space under TMPDIR; keep it in our work dir.
            "TMPDIR": str(workdir / "tmp"),
        }
    )
    (workdir / "tmp").mkdir(exist_ok=True)
    log = workdir / "runner.log"
    proc = procs.start(
        [python, "serve_runner.py", "runner", str(limit), str(poll_interval)],
        env=env,
        cwd=flows_dir,
        log=log,
    )
    roles = {"noop": (NOOP_FLOW, "runner-noop"), "sleeper": (SLEEPER_FLOW, "runner-sleeper")}
    return Contender("Prefect Runner", proc, log, roles)
