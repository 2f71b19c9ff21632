"""The warm engine template: a program run by the FLOW's python (never imported by the agent).

    <flow python> template.py SOCKET AGENT_PID

It imports what every run of Prefect's engine needs, checks that forking it is safe (no thread,
no open file, nothing configured), and forks one child per connection without reading from it.
The child, W (supervise.py), is the run's supervisor; it alone reads the run's spec, so nothing
of any run ever enters the template, whose memory every later child, of any user, inherits. E,
W's child, becomes the run's engine (turn.py) at the top of this script's stack, so SystemExit,
exceptions, atexit and non-daemon threads end it exactly as they end a cold engine.

Protocol, one JSON object per line (the agent's side: agent/warm/pool.py and launcher.py):
  template -> agent (stderr)  {"ready": pid, "stamps": [...]} | {"refused": why, "stamps": [...]}
  agent -> W  {"spec": {...}}
  W -> agent  {"pid": W} | {"error": "..."}   (nothing started: the agent starts it cold)
  agent -> W  {"go": true}                    (W is in the run's scope, if any)
  W -> agent  {"engine": E} | {"error": "..."}  (the run has started; an error ends it)
Stdlib only, Python 3.9 or newer: it runs in the flow's venv.
"""

# ruff: noqa: PTH100, PTH101, PTH116, PTH118, PTH120, PTH208

from __future__ import annotations

import sys

# Not this file's directory on sys.path: the agent's own modules must never shadow a flow's.
if __name__ == "__main__" and not getattr(sys.flags, "safe_path", False):
    del sys.path[0]

import contextlib
import gc
import importlib
import importlib.util
import json
import os
import signal
import socket
import threading
import time
from typing import Any

PRELOAD = (
    "prefect.engine",
    "prefect.flow_engine",
    "prefect.client.orchestration",
    "prefect.flows",
    "prefect.runner.storage",
    "prefect.deployments.steps.core",
    "prefect.logging.handlers",
    "prefect.events.worker",
    "prefect.task_engine",
    "prefect.results",
    # Imported lazily by every run (found by diffing sys.modules at a warm run's exit).
    "anyio._backends._asyncio",
    "anyio.streams.memory",
    "anyio.streams.stapled",
    "anyio.streams.tls",
    "rich._emoji_codes",
    "encodings.idna",
    "stringprep",
    "runpy",
)
OPTIONAL = ("prefect._internal.metrics", "pydantic.v1")  # not in every Prefect release
EXIT_REFUSED = 75
_PR_SET_PDEATHSIG = 1


def load_sibling(name: str) -> Any:
    """supervise.py or turn.py, by path (this directory is not on sys.path), before any fork."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"runner_agent_warm_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Start:
    """What the fresh interpreter had before the template changed anything."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.handlers = {s: signal.getsignal(s) for s in _signals()}
        self.mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])


def _signals() -> list[signal.Signals]:
    return [
        s
        for s in signal.valid_signals()
        if isinstance(s, signal.Signals) and s not in (signal.SIGKILL, signal.SIGSTOP)
    ]


def die_with_agent(agent_pid: int) -> None:
    """A template never outlives the agent that started it (an upgrade leaves none behind)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != agent_pid:  # the agent died before prctl
        os._exit(0)


def stamps() -> list[list[Any]]:
    """The venv as it is before the imports: the agent compares it before each warm start (pip
    adds and removes dist-info directories, so site-packages' mtime moves with every change)."""
    import site

    found = []
    for path in [sys.executable, *site.getsitepackages()]:
        try:
            st = os.stat(path)
        except OSError:
            continue
        found.append([path, st.st_ino, st.st_mtime_ns])
    return found


def preload() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    for name in OPTIONAL:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def check_clean() -> list[str]:
    """Why this process cannot be forked safely; [] when it can."""
    problems = []
    tasks = os.listdir("/proc/self/task")
    if len(tasks) != 1 or threading.active_count() != 1:
        names = [t.name for t in threading.enumerate()]
        problems.append(f"threads after the imports: {len(tasks)} tasks, {names}")
    extra = [int(fd) for fd in os.listdir("/proc/self/fd") if int(fd) > 2]
    if len(extra) > 1:  # the listdir's own fd
        problems.append(f"open files after the imports: {sorted(extra)}")
    control = sys.modules.get("prefect._internal.control_listener")
    if control is not None and getattr(control, "_configured", False):
        problems.append("the engine's control listener was configured at import")
    return problems


def serve(listener: socket.socket, start: Start, w: Any) -> dict[str, Any]:
    """Fork one W per connection; returns (the run's spec) only in E."""
    listener.settimeout(1.0)
    while True:
        _reap()
        try:
            conn, _ = listener.accept()
        except OSError as exc:  # the 1 s timeout; EMFILE and the like: not a busy loop
            if not isinstance(exc, (TimeoutError, socket.timeout)):
                time.sleep(0.1)
            continue
        conn.settimeout(None)
        try:
            pid = os.fork()
        except OSError:  # TasksMax or memory: this run starts cold, the template lives on
            conn.close()
            continue
        if pid == 0:
            listener.close()
            return w.supervise(conn, start.values)  # type: ignore[no-any-return]
        conn.close()


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _say(message: dict[str, Any]) -> None:
    sys.stderr.write(json.dumps(message) + "\n")
    sys.stderr.flush()


def main(argv: list[str], w: Any) -> tuple[dict[str, Any], Start]:
    start = Start(w.startup_values(os.environ))
    die_with_agent(int(argv[2]))
    # Whatever the starter let us inherit beyond stdio would be shared by every run.
    os.closerange(3, 1 << 16)
    before = stamps()
    import site

    if site.ENABLE_USER_SITE:
        # Its directory depends on the run's user and HOME, which a template cannot know.
        _say({"refused": "the flow's python has a user site directory", "stamps": before})
        sys.exit(EXIT_REFUSED)
    preload()
    problems = check_clean()
    if problems:
        _say({"refused": "; ".join(problems), "stamps": before})
        sys.exit(EXIT_REFUSED)
    # Objects that survive the imports go to a permanent generation: the collector of every
    # child then never touches (and so never copies) their pages.
    gc.collect()
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(argv[1])
    os.chmod(argv[1], 0o600)  # the agent's alone, like every file in its runtime directory
    listener.listen(64)
    _say({"ready": os.getpid(), "stamps": before})
    return serve(listener, start, w), start


if __name__ == "__main__":
    _w, _turn = load_sibling("supervise"), load_sibling("turn")
    _spec, _start = main(sys.argv, _w)
    _turn.turn_into_run(_spec, _start.handlers, _start.mask)
    del _spec, _start, _w
    _turn.run_engine()
