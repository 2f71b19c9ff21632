"""The machine a benchmark ran on (the report's "Machine" table), and the command it ran."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

from tests.integration.prefect_server import VENV_ENV


def machine_info(agent_python: str, prefect_python: str) -> dict[str, str]:
    def first_line(path: str, prefix: str = "") -> str:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(prefix):
                    return line.split(":", 1)[-1].strip() if prefix else line.strip()
        except OSError:
            pass
        return "unknown"

    def run(argv: list[str]) -> str:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        return out.stdout.strip() or f"unknown ({out.stderr.strip()[-200:]})"

    mem_kib = first_line("/proc/meminfo", "MemTotal").split()[0]
    return {
        "CPU": first_line("/proc/cpuinfo", "model name"),
        "cores": str(os.cpu_count()),
        "RAM": f"{int(mem_kib) / 1024 / 1024:.1f} GiB" if mem_kib.isdigit() else "unknown",
        "kernel": platform.release(),
        "Debian": first_line("/etc/debian_version"),
        "Python (agent)": run([agent_python, "-c", "import sys; print(sys.version.split()[0])"]),
        "Prefect (server, Runner, engine)": run(
            [prefect_python, "-c", "import importlib.metadata as m; print(m.version('prefect'))"]
        ),
        "load average at the start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def agent_revision(repo: Path) -> str:
    """The checkout measured: version, commit, and whether agent/ had uncommitted changes."""
    from agent import __version__

    def git(*args: str) -> str:
        try:
            out = subprocess.run(
                ["git", "-C", str(repo), *args],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except OSError:
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    dirty = " + uncommitted changes in agent/" if git("status", "--porcelain", "agent") else ""
    return f"{__version__} ({commit}{dirty})"


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this report."""
    parts = [
        f"{VENV_ENV}={shlex.quote(str(args.prefect_venv))}",
        shlex.quote(sys.executable),
        "-m",
        "bench.run",
    ]
    if args.smoke:
        parts.append("--smoke")
    for scenario in args.only:
        parts += ["--only", scenario]
    parts += ["--out", shlex.quote(str(args.out))]
    for item in args.agent_flow_env:
        parts += ["--agent-flow-env", shlex.quote(item)]
    return " ".join(parts)
