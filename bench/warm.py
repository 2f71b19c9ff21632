"""runner-agent's warm template, as the benchmark sees it: when it is ready, what it costs, and
which runs the agent started cold instead (agent/warm)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.api import BenchError, wait_until
from bench.subjects import Contender, base_env

TEMPLATE_TIMEOUT = 180.0  # its imports, beside whatever else runs on the machine


@dataclass(frozen=True)
class TemplateMemory:
    """The warm template's memory, idle, after `forks` warm runs (the benchmark's count)."""

    forks: int
    rss: int | None
    pss: int | None
    uss: int | None
    source: str


def status_templates(agent_bin: Path, agent: Contender, tag: str) -> list[dict[str, Any]]:
    """The "warm_templates" of `runner-agent status --json` (the agent's public view of them:
    a template is listed once it is ready, with its pid and memory)."""
    argv = [str(agent_bin), "--config", str(agent.config), "status", "--json"]
    out = subprocess.run(
        argv, env=base_env(tag), capture_output=True, text=True, timeout=60, check=False
    )
    try:
        listed = json.loads(out.stdout).get("warm_templates") or []
    except (ValueError, AttributeError):
        return []
    return [item for item in listed if isinstance(item, dict)]


def template_pid(agent_bin: Path, agent: Contender, tag: str) -> int:
    """The pid of the agent's (one) ready warm template, once `status` lists it alive."""

    def ready() -> int | None:
        if not agent.alive():
            raise BenchError(f"{agent.label} exited; log tail:\n{agent.log_tail()}")
        for item in status_templates(agent_bin, agent, tag):
            pid = item.get("pid")
            if item.get("alive") and isinstance(pid, int):
                return pid
        return None

    try:
        return int(wait_until(ready, TEMPLATE_TIMEOUT, interval=1.0, what="a ready warm template"))
    except BenchError as exc:
        raise BenchError(f"{exc}; log tail:\n{agent.log_tail()}") from exc


def template_memory(
    agent_bin: Path, agent: Contender, tag: str, pid: int, forks: int
) -> TemplateMemory:
    """From `runner-agent status --json`; psutil if it does not list the template.
    `forks`: the warm runs it served, as the benchmark counts them."""
    for item in status_templates(agent_bin, agent, tag):
        if item.get("pid") == pid and item.get("alive"):
            return TemplateMemory(
                forks,
                item.get("rss_bytes"),
                item.get("pss_bytes"),
                item.get("uss_bytes"),
                "`runner-agent status --json`",
            )
    info = psutil.Process(pid).memory_full_info()
    return TemplateMemory(forks, info.rss, info.pss, info.uss, "psutil")


def started_cold(agent: Contender, run_ids: list[str]) -> int:
    """Warm runs the agent started cold (its log names each: agent/warm/launcher.py)."""
    log = agent.log_path.read_text(errors="replace")
    return sum(1 for r in run_ids if f"warm start unavailable for run {r}" in log)
