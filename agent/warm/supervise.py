"""W, a warm run's supervisor: what the cold path's sh wrapper is (agent/launch/wrapper.py).

Forked by the template for one connection, W is the only process that reads the run's spec
(its environment holds the run's secrets). It answers with its pid, waits for `go` (the agent
holds a pidfd of it and, under systemd, has put it into the run's scope), then: the `pid`
record, the run's output (journal stream or `<run_dir>/output.log`), one child E that becomes
the engine (turn.py), the `exit-status` record (shell convention), and exit with E's status.
TERM and INT are no-ops in W, as the wrapper traps them, so a SIGTERM aimed at the whole run
still lets W record E's status. W holds `<run_dir>` open for its life: its argv is the
template's, and the open directory is what identifies it as this run's (agent/processes.py).

Loaded by template.py by path; stdlib only, Python 3.9+.
"""

# ruff: noqa: PTH105, PTH118

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys
import time
from typing import Any

MAX_SPEC = 4 * 1024 * 1024
SPEC_TIMEOUT = 30.0
GO_TIMEOUT = 60.0
SCOPE_TIMEOUT = 10.0
JOURNAL_TIMEOUT = 10.0
EXIT_REFUSED = 75  # nothing was started; the agent starts the run cold
EXIT_INTERNAL = 70  # W failed after `go`, before the engine ran: recorded as the run's status
JOURNAL_STDOUT = "/run/systemd/journal/stdout"
APPLIED_IN_CHILD = ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")

Spec = dict[str, Any]


def startup_values(environ: Any) -> dict[str, str]:
    """What the interpreter reads once at start-up (or the C locale does): a template serves only
    runs with its own values. The two APPLIED_IN_CHILD are set in E instead."""
    return {
        k: v
        for k, v in environ.items()
        if (k.startswith(("PYTHON", "LC_")) or k == "LANG") and k not in APPLIED_IN_CHILD
    }


def _defer(signum: int, frame: Any) -> None:
    """TERM/INT while E runs: W records E's status first (what the wrapper's trap does)."""


def supervise(conn: socket.socket, values: dict[str, str]) -> Spec:
    """W's life. Returns (the spec) only in E; W itself always ends with os._exit."""
    started = False
    run_dir = ""
    try:
        # Nothing of W goes to the template's stderr: the agent reads it to its end.
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 2)
        os.close(null)
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
        spec: Spec = _read(reader)["spec"]
        problem = incompatible(spec, values)
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
        started = True
        run_dir = spec["run_dir"]
        run_dir_fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)  # held: W's identity
        # At once: an agent restarted from here on adopts the run instead of starting it again.
        _record(run_dir, "pid", os.getpid())
        if spec.get("scope"):
            wait_for_scope(spec["scope"], before)
        connect_output(spec)
        engine = os.fork()
        if engine == 0:
            reader.close()
            os.close(run_dir_fd)
            conn.close()
            return spec
    except BaseException as exc:  # W never returns into the template's loop
        _fail(conn, run_dir if started else "", exc)
    # From here on the only way out is: wait for E, record its status, exit with it.
    with contextlib.suppress(OSError):  # the agent went away or gave up: the run goes on
        _send(conn, {"engine": engine})
    reader.close()
    conn.close()
    status = _wait(engine)
    try:
        _record(run_dir, "exit-status", status)
    finally:
        os._exit(status)


def _fail(conn: socket.socket, run_dir: str, exc: BaseException) -> None:
    """W failed. Before `go` nothing was started; after it, the run ends with EXIT_INTERNAL as
    its recorded status (not as a SIGKILL without a record), and the agent is told why."""
    try:
        if run_dir:
            _record(run_dir, "exit-status", EXIT_INTERNAL)
        conn.settimeout(1.0)
        _send(conn, {"error": f"the run's warm supervisor failed: {exc!r}"})
    except BaseException:
        pass
    finally:
        os._exit(EXIT_INTERNAL if run_dir else EXIT_REFUSED)


def incompatible(spec: Spec, values: dict[str, str]) -> str | None:
    wanted = startup_values(spec["env"])
    if wanted != values:
        keys = sorted({k for k, _ in set(wanted.items()) ^ set(values.items())})
        return f"interpreter start-up variables differ from the template's: {keys}"
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
    sock.settimeout(JOURNAL_TIMEOUT)
    sock.connect(JOURNAL_STDOUT)
    sock.shutdown(socket.SHUT_RD)
    sock.sendall(f"{identifier}\n\n6\n1\n0\n0\n0\n".encode())
    sock.settimeout(None)  # blocking again: E writes to it
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
