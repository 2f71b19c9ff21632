"""The one place that knows a process's identity: a pid together with its start time.

A pid alone is recycled by the kernel; the pid and the start time that psutil reads from
/proc/<pid>/stat name one process for good. The agent records both when it launches a run, and
recovery, `runner-agent status` and adoption check both before they trust a pid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import psutil

from agent.launch.wrapper import WRAPPER_NAME

# psutil derives the start time from clock ticks since boot: two reads may differ slightly.
START_TIME_TOLERANCE = 0.05


def process_create_time(pid: int | None) -> float | None:
    """The start time that, with the pid, identifies a launched process across restarts."""
    if pid is None:
        return None
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def process_alive(pid: int | None, create_time: float | None) -> bool:
    """True when `pid` still is the process we launched (not a recycled pid, not a zombie)."""
    if pid is None:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(proc.create_time() - create_time) < START_TIME_TOLERANCE
    except psutil.Error:
        return False


def wrapper_start_time(pid: int, run_dir: Path) -> float | None:
    """The start time of `pid` if it is alive and is the wrapper of the run in `run_dir`.

    The wrapper's argv is `sh -c WRAPPER runner-agent-run <run_dir> <python> ...` (the exec
    chain of both launchers keeps it), and a run directory belongs to exactly one run, so a
    recycled pid cannot pass for it.
    A warm run's supervisor (agent/warm) has the template's argv; it holds `run_dir` open for
    its life instead, which a recycled pid cannot do either.
    """
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        argv = proc.cmdline()
        if WRAPPER_NAME in argv:
            at = argv.index(WRAPPER_NAME)
            if argv[at + 1 : at + 2] != [str(run_dir)]:
                return None
        elif not holds_open(pid, run_dir):
            return None
        return float(proc.create_time())
    except psutil.Error:
        return None


def holds_open(pid: int, directory: Path) -> bool:
    """Whether `pid` has `directory` open (psutil's open_files lists regular files only)."""
    wanted = {str(directory), os.path.realpath(directory)}
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if str(fd.readlink()) in wanted:
                return True
        except OSError:
            continue  # closed meanwhile
    return False


@dataclass(frozen=True)
class Usage:
    """What the run's processes (the recorded pid and its descendants) use right now."""

    processes: int
    rss_bytes: int
    cpu_seconds: float
    started_at: float | None  # the main process's start time (epoch seconds)


def process_usage(pid: int | None, create_time: float | None = None) -> Usage | None:
    """psutil figures of `pid` and all its descendants; None when it is gone (or, given its
    `create_time`, when the pid now names another process)."""
    if pid is None or not process_alive(pid, create_time):
        return None
    try:
        main = psutil.Process(pid)
        started_at: float | None = main.create_time()
        family = [main, *main.children(recursive=True)]
    except psutil.Error:
        return None
    rss, cpu, count = 0, 0.0, 0
    for proc in family:
        try:
            with proc.oneshot():
                rss += proc.memory_info().rss
                times = proc.cpu_times()
                cpu += times.user + times.system
                count += 1
        except psutil.Error:
            continue  # it ended between listing and reading
    return Usage(count, rss, cpu, started_at)
