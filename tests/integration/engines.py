"""The two ways a run's engine starts (`[flow_run] engine`, docs/warm-engine.md), for the tests
of run semantics that run once with each (the `engine` fixture, tests/conftest.py), and how a
test tells which one ran a run.

A warm run's supervisor W and its engine E are forked from a template: their
/proc/<pid>/cmdline and environ are the template's (`<python> .../agent/warm/template.py
<socket>`), not `python -m prefect.engine` and the run's environment. So these helpers find and
recognise a run's processes by what holds for both engines: the `<run_dir>/pid` record (the sh
wrapper, or W, which holds its run directory open) and its descendants, and the engine's parent
(the wrapper, or W).
"""

from __future__ import annotations

from pathlib import Path

import psutil

from agent.launch.wrapper import PID_RECORD, WRAPPER_NAME
from agent.processes import holds_open
from tests.integration.agent_process import Api, wait_for

ENGINES = ("cold", "warm")
# The agent's note on each launch, in the run's Prefect logs; it names a warm start
# (agent/supervisor.py).
LAUNCHED = "Launched in "
WARM_NOTE = "forked from a warm engine template"
# The program of a warm template, hence the argv of every warm run's W and E.
TEMPLATE_PROGRAM = "agent/warm/template.py"


def launches(api: Api, run_id: str, count: int = 1) -> list[str]:
    """How the agent launched each attempt of the run, oldest first: "warm" or "cold".

    Waits until `count` launch notes are in the run's Prefect logs (they come in batches).
    """
    notes: list[str] = []

    def enough() -> bool:
        notes[:] = [m for m in api.logs(run_id) if m.startswith(LAUNCHED)]  # oldest first
        return len(notes) >= count

    try:
        wait_for(enough, 30, what=f"{count} launch notes of run {run_id}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; notes: {notes}") from None
    return ["warm" if WARM_NOTE in note else "cold" for note in notes]


def argv_engine(cmdline: str | list[str]) -> str | None:
    """Which engine's process an argv is: "cold" (the sh wrapper, or `python -m
    prefect.engine`), "warm" (the template's argv, as W and E have it), None (neither)."""
    text = cmdline if isinstance(cmdline, str) else " ".join(cmdline)
    if TEMPLATE_PROGRAM in text:
        return "warm"
    if WRAPPER_NAME in text or "-m prefect.engine" in text:
        return "cold"
    return None


def engine_of(engine_pid: int) -> str | None:
    """Which engine runs the live process `engine_pid` (a flow's `os.getpid()`): "cold" when
    its parent is the sh wrapper, "warm" when its parent is a warm supervisor W (the template's
    argv), None when it is gone or neither."""
    try:
        parent = psutil.Process(engine_pid).parent()
        return argv_engine(parent.cmdline()) if parent is not None else None
    except psutil.Error:
        return None


def run_supervisor(run_dir: Path) -> tuple[str, psutil.Process] | None:
    """The live process the run's `<run_dir>/pid` record names, and its engine: ("cold", the
    sh wrapper, whose argv names the run directory) or ("warm", W, which holds it open). None
    when there is no record or the pid is no longer the run's."""
    try:
        proc = psutil.Process(int((run_dir / PID_RECORD).read_text()))
        argv = proc.cmdline()
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
    except (OSError, ValueError, psutil.Error):
        return None
    if WRAPPER_NAME in argv and str(run_dir) in argv:
        return "cold", proc
    if argv_engine(argv) == "warm" and holds_open(proc.pid, run_dir):
        return "warm", proc
    return None
