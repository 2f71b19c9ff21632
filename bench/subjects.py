"""The two contenders, serving the same flows: runner-agent and Prefect's Runner (`serve`).

Each contender gets its own deployments (same flows, different deployment names) and is stopped
before the next one starts, so neither ever sees the other's runs.
"""

from __future__ import annotations

import os
import subprocess
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
        # poll "default": the Runner's own default (PREFECT_RUNNER_POLL_FREQUENCY unset).
        prefix, limit, poll = sys.argv[1], int(sys.argv[2]), sys.argv[3]
        serve(
            noop.to_deployment(name=f"{prefix}-noop"),
            sleeper.to_deployment(name=f"{prefix}-sleeper"),
            limit=limit,
            query_seconds=None if poll == "default" else int(poll),
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


@dataclass(frozen=True)
class AgentDeployment:
    """A `[[deployment]]` of the benchmark's agent: its flow, entrypoint, and any other keys
    (`python`, `engine`, `env`, ...)."""

    flow_name: str
    entrypoint: str
    extra: Mapping[str, Any] = field(default_factory=dict)


def agent_config(
    *,
    api_url: str,
    name: str,
    limit: int,
    workdir: Path,
    python: str,
    flow_env: Mapping[str, str],
    deployments: Mapping[str, AgentDeployment],
    flows_dir: Path,
    work_pools: Sequence[str] = (),
) -> str:
    """The agent's TOML: defaults everywhere except what the benchmark must pin.

    `deployments` maps a deployment name to its flow, entrypoint and other keys; each of
    `work_pools` is served, and created if missing. poll_interval and prefetch are left at
    their defaults on purpose.
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
    listed = [
        {
            "name": dep_name,
            "flow_name": dep.flow_name,
            "entrypoint": dep.entrypoint,
            "path": str(flows_dir),
            **dep.extra,
        }
        for dep_name, dep in deployments.items()
    ]
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
    workdir: Path | None = None
    config: Path | None = None  # runner-agent's TOML

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
    deployments: Mapping[str, tuple[str, AgentDeployment]] | None = None,
    label: str = "runner-agent",
) -> Contender:
    """runner-agent serving the no-op and sleeper flows (or, with fake_python, only a fake; or,
    with `deployments`, role -> (name, deployment), those), and `work_pools`."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {procs.MARKER: tag, "PREFECT_HOME": str(workdir / "prefect-home")}
    env.update(flow_env or {})
    if deployments is not None:
        served = dict(deployments.values())
        roles = {role: (dep.flow_name, name) for role, (name, dep) in deployments.items()}
    elif fake_python is None:
        served = {
            "agent-noop": AgentDeployment(NOOP_FLOW, "flows.py:noop"),
            "agent-sleeper": AgentDeployment(SLEEPER_FLOW, "flows.py:sleeper"),
        }
        roles = {"noop": (NOOP_FLOW, "agent-noop"), "sleeper": (SLEEPER_FLOW, "agent-sleeper")}
    else:
        served = {
            "agent-fake": AgentDeployment(
                SLEEPER_FLOW, "flows.py:sleeper", {"python": str(fake_python)}
            )
        }
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
            deployments=served,
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
    return Contender(label, proc, log, roles, workdir=workdir, config=config)


def start_runner(
    *,
    python: str,
    server_env: Mapping[str, str],
    workdir: Path,
    flows_dir: Path,
    tag: str,
    limit: int,
    poll_interval: int | None,
    prefix: str = "runner",
    label: str = "Prefect Runner",
) -> Contender:
    """Prefect's Runner via `prefect.serve(..., limit=...)`, polling every `poll_interval`
    seconds (None: the Runner's own default); its deployments are `<prefix>-noop`, `-sleeper`."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(server_env)
    env.update(
        {
            procs.MARKER: tag,
            "PREFECT_HOME": str(workdir / "prefect-home"),
            # The Runner keeps its scratch space under TMPDIR; keep it in our work dir.
            "TMPDIR": str(workdir / "tmp"),
        }
    )
    if poll_interval is not None:
        env["PREFECT_RUNNER_POLL_FREQUENCY"] = str(poll_interval)
    (workdir / "tmp").mkdir(exist_ok=True)
    log = workdir / "runner.log"
    poll = "default" if poll_interval is None else str(poll_interval)
    proc = procs.start(
        [python, "serve_runner.py", prefix, str(limit), poll],
        env=env,
        cwd=flows_dir,
        log=log,
    )
    roles = {"noop": (NOOP_FLOW, f"{prefix}-noop"), "sleeper": (SLEEPER_FLOW, f"{prefix}-sleeper")}
    return Contender(label, proc, log, roles, workdir=workdir)


RUNNER_DEFAULT_POLL = (
    "from prefect.settings import get_current_settings; "
    "print(get_current_settings().runner.poll_frequency)"
)


def runner_default_poll(python: str, tag: str, home: Path) -> int:
    """The Runner's default poll interval (`PREFECT_RUNNER_POLL_FREQUENCY`) in this Prefect."""
    home.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(
        [python, "-c", RUNNER_DEFAULT_POLL],
        env={**base_env(tag), "PREFECT_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])
