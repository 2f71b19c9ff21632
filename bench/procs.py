"""Processes: starting the contenders, measuring them with psutil, and leaving nothing behind.

Every process the benchmark starts carries MARKER=<tag> in its environment, and both contenders
pass it on to their flow runs (runner-agent through `flow_run.env`, the Runner by inheritance).
So "what did this benchmark leave behind" is a question psutil can answer exactly, without
guessing from command lines that another test on the same host might share.

Except for warm runs (agent/warm): their supervisor and engine are forks of a template, whose
/proc environ and argv they show, so they are found through the agent's own records instead
(`run_processes`: each run directory's `pid` record and its descendants); what they exec (a
flow's `sleep` grandchild) carries the marker again.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import psutil

MARKER = "BENCH_RUNNER_AGENT_TAG"
SLEEP_ARGV = ["sleep", "600"]
MIB = 1024 * 1024
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # If the benchmark itself is killed, what it started must not outlive it.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def start(argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, log: Path) -> psutil.Popen:
    """Start `argv` in its own session, output to `log` (called from the main thread only)."""
    with log.open("ab") as out:
        return psutil.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def stop(proc: psutil.Popen, timeout: float = 30.0) -> int | None:
    """SIGTERM, then SIGKILL; the exit status (None if it had to be killed)."""
    if proc.poll() is not None:
        return int(proc.returncode)
    with contextlib.suppress(psutil.NoSuchProcess):
        proc.send_signal(signal.SIGTERM)
    try:
        return int(proc.wait(timeout))
    except (subprocess.TimeoutExpired, psutil.TimeoutExpired):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
        proc.wait(10)
        return None


@dataclass(frozen=True)
class Footprint:
    rss: int
    uss: int
    pss: int
    threads: int
    fds: int


def footprint(pid: int) -> Footprint:
    proc = psutil.Process(pid)
    with proc.oneshot():
        full = proc.memory_full_info()
        return Footprint(
            rss=int(full.rss),
            uss=int(full.uss),
            pss=int(full.pss),
            threads=proc.num_threads(),
            fds=proc.num_fds(),
        )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process itself (not its children)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def children_cpu(pid: int) -> float:
    """User + system CPU time of the children the process has waited for (and of theirs)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.children_user + times.children_system)


def wait_reaped(pid: int, keep: Callable[[psutil.Process], bool], timeout: float) -> None:
    """Until every child of `pid` but the `keep` ones has exited and been waited for, so that
    its CPU time is in `children_cpu(pid)`. TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    parent = psutil.Process(pid)
    while True:
        left = [c for c in parent.children() if not _kept(c, keep)]
        if not left:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"children of {pid} still not reaped: {[c.pid for c in left]}")
        time.sleep(0.1)


def _kept(proc: psutil.Process, keep: Callable[[psutil.Process], bool]) -> bool:
    try:
        return keep(proc)
    except psutil.Error:
        return False


def run_processes(runtime_dir: Path) -> list[psutil.Process]:
    """The live processes of runner-agent's runs: each run directory's `pid` record (the cold
    wrapper or the warm supervisor, checked as the agent checks it) and its descendants."""
    from agent.processes import wrapper_start_time

    found: list[psutil.Process] = []
    for record in sorted((runtime_dir / "runs").glob("*/pid")):
        try:
            pid = int(record.read_text().strip())
        except (OSError, ValueError):
            continue
        if wrapper_start_time(pid, record.parent) is None:
            continue
        with contextlib.suppress(psutil.Error):
            top = psutil.Process(pid)
            found += [top, *top.children(recursive=True)]
    return found


def with_cwd_under(directory: Path) -> list[psutil.Process]:
    """Live processes whose working directory is `directory` or below it (a warm template runs
    in its agent's runtime directory)."""
    top = os.path.realpath(directory)
    found = []
    for proc in psutil.process_iter():
        try:
            cwd = proc.cwd()
            if proc.status() == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
                continue
        except psutil.Error:
            continue
        if cwd == top or cwd.startswith(top + os.sep):
            found.append(proc)
    return found


def cpu_ns(pid: int) -> tuple[int, frozenset[int]]:
    """CPU time in ns of the live threads (schedstat), and their ids.

    Nanoseconds, where psutil's figures come in clock ticks (10 ms): an idle window of 30 s at
    the 0.1 % target is only 3 ticks. A thread that exits takes its time with it, so callers
    compare the thread ids and fall back to `cpu_seconds` when one went away.
    """
    total, tids = 0, set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        tids.add(int(task.name))
    return total, frozenset(tids)


class PeakRss:
    """Samples a process's RSS in a background thread; `.peak` after the block."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self._proc = psutil.Process(pid)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
        self.peak = 0
        self.samples = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, int(self._proc.memory_info().rss))
                self.samples += 1
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()


def _environ(proc: psutil.Process) -> dict[str, str]:
    try:
        return dict(proc.environ())
    except (psutil.Error, OSError):
        return {}


def marked(tag: str) -> list[psutil.Process]:
    """Live (non-zombie) processes that carry this benchmark's marker."""
    found = []
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        if _environ(proc).get(MARKER) == tag:
            found.append(proc)
    return found


def sleepers(tag: str) -> dict[str, list[psutil.Process]]:
    """The `sleep 600` processes of this benchmark, by the flow run id in their environment."""
    by_run: dict[str, list[psutil.Process]] = {}
    for proc in marked(tag):
        try:
            if proc.cmdline() != SLEEP_ARGV:
                continue
        except psutil.Error:
            continue
        run_id = _environ(proc).get("PREFECT__FLOW_RUN_ID", "")
        by_run.setdefault(run_id, []).append(proc)
    return by_run


def kill(procs: Sequence[psutil.Process]) -> int:
    """SIGKILL each and reap what is ours; how many were still alive."""
    killed = 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
            killed += 1
    psutil.wait_procs(list(procs), timeout=5)
    return killed


def kill_marked(tag: str, *, attempts: int = 5) -> int:
    """Kill everything carrying the marker, until nothing new appears; how many were killed."""
    total = 0
    for _ in range(attempts):
        procs = marked(tag)
        if not procs:
            break
        total += kill(procs)
        time.sleep(0.2)
    return total
