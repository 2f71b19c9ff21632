"""The warm engine template: a program run by the FLOW's python (never imported by the agent).

    <flow python> template.py SOCKET_PATH

It imports what every run of Prefect's engine needs, checks that the imports started no thread
and left no file open (forking is safe), and forks one child per connection without reading from
it. The child, W, is the run's supervisor; it alone reads the run's spec (its environment holds
the run's secrets), so nothing of any run ever enters the template, whose memory every later
child, of any user, inherits.

W does what the cold path's sh wrapper does (agent/launch/wrapper.py): a session of its own, the
run's output (a journal stream, or `<run_dir>/output.log`), the `<run_dir>/pid` record (its own
pid), one child E that becomes the engine, the `<run_dir>/exit-status` record, and it exits with
E's status. TERM and INT are no-ops in W, as the wrapper traps them, so a SIGTERM aimed at the
whole run still lets W record E's status. W holds `<run_dir>` open for its life: its argv is the
template's, and the open directory is what identifies it as this run's (agent/processes.py).

E becomes the run's engine through turn.py: at the top of this script's stack, so SystemExit,
exceptions, atexit and non-daemon threads end E exactly as they end a cold engine.

Protocol, one JSON object per line (the agent's side: agent/warm/pool.py, launcher.py):
  template -> agent (stderr)  {"ready": pid, "site": [...], "user_site": bool, "values": {...}}
  agent -> W  {"spec": {...}}
  W -> agent  {"pid": W} | {"error": "..."}   (an error: nothing started, start it cold)
  agent -> W  {"go": true}                    (W's scope, if any, is being set up)
  W -> agent  {"engine": E}
Stdlib only, Python 3.9 or newer: it runs in the flow's venv.
"""

# ruff: noqa: PTH100, PTH101, PTH105, PTH112, PTH118, PTH208

from __future__ import annotations

import sys

# Not this file's directory on sys.path: the agent's own modules must never shadow a flow's.
if __name__ == "__main__":
    del sys.path[0]

import contextlib
import gc
import importlib
import importlib.util
import json
import os
import signal
import socket
import struct
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
# Read by the interpreter at start-up (or by the C locale): a run whose values differ cannot use
# this template. These two are applied in E instead (sys.dont_write_bytecode, pycache_prefix).
APPLIED_IN_CHILD = ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")
MAX_SPEC = 4 * 1024 * 1024
SPEC_TIMEOUT = 30.0
GO_TIMEOUT = 60.0
SCOPE_TIMEOUT = 10.0
EXIT_REFUSED = 75  # nothing was started; the agent starts the run cold
EXIT_INTERNAL = 70
_PR_SET_PDEATHSIG = 1
JOURNAL_STDOUT = "/run/systemd/journal/stdout"

Spec = dict[str, Any]


def startup_values(environ: dict[str, str]) -> dict[str, str]:
    return {
        k: v
        for k, v in environ.items()
        if (k.startswith(("PYTHON", "LC_")) or k == "LANG") and k not in APPLIED_IN_CHILD
    }


class Start:
    """What the fresh interpreter had before the template changed anything."""

    def __init__(self) -> None:
        self.values = startup_values(dict(os.environ))
        self.handlers = {s: signal.getsignal(s) for s in _signals()}
        self.mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        self.ppid = os.getppid()


def _signals() -> list[signal.Signals]:
    return [
        s
        for s in signal.valid_signals()
        if isinstance(s, signal.Signals) and s not in (signal.SIGKILL, signal.SIGSTOP)
    ]


def die_with_parent(expected_ppid: int) -> None:
    """A template never outlives the agent that started it (an upgrade leaves none behind)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != expected_ppid:  # the parent died before prctl
        os._exit(0)


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


# -- the template's loop ---------------------------------------------------------------------


def serve(listener: socket.socket, start: Start) -> tuple[Spec, socket.socket]:
    """Fork one W per connection; returns only in E."""
    listener.settimeout(1.0)
    while True:
        _reap()
        try:
            conn, _ = listener.accept()
        except OSError:  # socket.timeout: TimeoutError only from Python 3.10
            continue
        conn.settimeout(None)
        pid = os.fork()
        if pid == 0:
            listener.close()
            return supervise(conn, start)
        conn.close()


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


# -- W: the run's supervisor -----------------------------------------------------------------


def _defer(signum: int, frame: Any) -> None:
    """TERM/INT while E runs: W records E's status first (what the wrapper's trap does)."""


def supervise(conn: socket.socket, start: Start) -> tuple[Spec, socket.socket]:
    """W's life. Returns only in E; W itself always ends with os._exit."""
    try:
        if os.getsid(0) != os.getpid():
            os.setsid()
        signal.signal(signal.SIGTERM, _defer)
        signal.signal(signal.SIGINT, _defer)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # Only the agent's own user may hand runs over (the socket's directory is its alone too).
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        if struct.unpack("3i", creds)[1] != os.getuid():
            os._exit(EXIT_REFUSED)
        reader = conn.makefile("rb")
        conn.settimeout(SPEC_TIMEOUT)
        spec = _read(reader)["spec"]
        problem = incompatible(spec, start)
        if problem:
            _send(conn, {"error": problem})
            os._exit(EXIT_REFUSED)
        before = _cgroups()
        _send(conn, {"pid": os.getpid()})
        # Nothing is started or recorded before `go`: if the agent dies first, W just exits and
        # the run was never launched. After it, the agent holds a pidfd of W.
        conn.settimeout(GO_TIMEOUT)
        if not _read(reader).get("go"):
            os._exit(EXIT_REFUSED)
        if spec.get("scope"):
            wait_for_scope(spec["scope"], before)
        connect_output(spec)
        run_dir = spec["run_dir"]
        run_dir_fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)  # held: W's identity
        _record(run_dir, "pid", os.getpid())
        engine = os.fork()
        if engine == 0:
            reader.close()
            os.close(run_dir_fd)
            return spec, conn
        _send(conn, {"engine": engine})
        reader.close()
        conn.close()
        status = _wait(engine)
        _record(run_dir, "exit-status", status)
        os._exit(status)
    except BaseException as exc:  # W never returns into the template's loop
        try:
            sys.stderr.write(f"runner-agent warm supervisor: {exc!r}\n")
            sys.stderr.flush()
        finally:
            os._exit(EXIT_INTERNAL)


def incompatible(spec: Spec, start: Start) -> str | None:
    wanted = startup_values(spec["env"])
    if wanted != start.values:
        keys = sorted({k for k, _ in set(wanted.items()) ^ set(start.values.items())})
        return f"interpreter start-up variables differ from the template's: {keys}"
    import site

    if site.ENABLE_USER_SITE:
        return "the flow's python has a user site directory (it depends on the run's user)"
    return None


def _cgroups() -> dict[str, str]:
    """/proc/self/cgroup as hierarchy -> path ("name=systemd", "memory", "" for v2, ...)."""
    with open("/proc/self/cgroup") as f:
        return {
            key: path
            for _, key, path in (line.rstrip("\n").split(":", 2) for line in f if line.strip())
        }


def wait_for_scope(unit: str, before: dict[str, str]) -> None:
    """StartTransientUnit returns before systemd has moved the pid, and on cgroup v1 systemd
    moves it hierarchy by hierarchy: wait until every hierarchy that had W in a scope (the
    template's) has it in the run's, so that E is born in the run's memory, pids and cpu
    cgroups."""
    deadline = time.monotonic() + SCOPE_TIMEOUT
    suffix = "/" + unit
    while True:
        now = _cgroups()
        tracking = now.get("name=systemd", now.get(""))
        moved = [key for key, path in before.items() if path.endswith(".scope")]
        if (
            tracking is not None
            and tracking.endswith(suffix)
            and all(now.get(key, "").endswith(suffix) for key in moved)
        ):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"not moved into {unit} within {SCOPE_TIMEOUT:g}s: {now}")
        time.sleep(0.001)


def connect_output(spec: Spec) -> None:
    """fds 1 and 2 of W (and so E): the journal stream, or the run's output.log."""
    out = spec.get("output") or {}
    sys.stdout.flush()
    sys.stderr.flush()
    if "journal" in out:
        fd = journal_stream(out["journal"])
    elif "file" in out:
        fd = os.open(out["file"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    else:
        return
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)


def journal_stream(identifier: str) -> int:
    """What systemd-cat does: a stream to journald, opened from inside the run's scope (journald
    attributes a stream to its peer's cgroup). Header per sd_journal_stream_fd(3): identifier,
    unit id, priority 6 (info), level prefix 1, no forwarding to syslog, kmsg or console."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(JOURNAL_STDOUT)
    sock.shutdown(socket.SHUT_RD)
    sock.sendall(f"{identifier}\n\n6\n1\n0\n0\n0\n".encode())
    return sock.detach()


def _wait(pid: int) -> int:
    while True:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return 255
        except InterruptedError:
            continue
        if os.WIFEXITED(status):
            return os.WEXITSTATUS(status)
        if os.WIFSIGNALED(status):
            return 128 + os.WTERMSIG(status)


def _record(run_dir: str, name: str, value: int) -> None:
    """Atomic and 0600, like the wrapper's records."""
    tmp = os.path.join(run_dir, f".{name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, f"{value}\n".encode())
    finally:
        os.close(fd)
    os.replace(tmp, os.path.join(run_dir, name))


def _read(reader: Any) -> dict[str, Any]:
    line = reader.readline(MAX_SPEC)
    if not line.endswith(b"\n"):
        raise RuntimeError("the agent closed the connection or sent too much")
    message = json.loads(line)
    if not isinstance(message, dict):
        raise RuntimeError("not a JSON object")
    return message


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def main(argv: list[str]) -> tuple[Spec, socket.socket, Start]:
    start = Start()
    die_with_parent(start.ppid)
    # Whatever the starter let us inherit beyond stdio would be shared by every run.
    os.closerange(3, 1 << 16)
    preload()
    problems = check_clean()
    if problems:
        sys.stderr.write(json.dumps({"refused": "; ".join(problems)}) + "\n")
        sys.stderr.flush()
        sys.exit(EXIT_REFUSED)
    import site

    # Objects that survive the imports go to a permanent generation: the collector of every
    # child then never touches (and so never copies) their pages.
    gc.collect()
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(argv[1])
    os.chmod(argv[1], 0o600)  # the agent's alone, like every file in its runtime directory
    listener.listen(64)
    ready = {
        "ready": os.getpid(),
        "site": [p for p in site.getsitepackages() if os.path.isdir(p)],
        "user_site": bool(site.ENABLE_USER_SITE),
        "values": start.values,
    }
    sys.stderr.write(json.dumps(ready) + "\n")
    sys.stderr.flush()
    spec, conn = serve(listener, start)
    return spec, conn, start


def load_turn() -> Any:
    """E's half (turn.py), loaded by path (this directory is not on sys.path), before forks."""

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "turn.py")  # noqa: PTH120
    spec = importlib.util.spec_from_file_location("runner_agent_warm_turn", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    _turn = load_turn()
    _spec, _conn, _start = main(sys.argv)
    _conn.close()
    _turn.turn_into_run(_spec, _start.handlers, _start.mask)
    del _spec, _conn, _start
    _turn.run_engine()
