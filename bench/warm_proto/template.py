"""Warm engine template (prototype for issue 17), run by the FLOW's python, not the agent's.

    <flow python> template.py fork SOCKET_PATH      # (a) a template that forks one child per run
    <flow python> template.py handover SOCKET_PATH  # (b) a one-shot process that becomes one run

Both import what every run needs, check that the imports started no thread and opened no file,
then wait. Nothing here reads a run's data before it is the run's own process:

(a) `fork`: the template accepts a connection and forks at once, without reading from it. The
    child (the run's *supervisor*, W) reads the run's spec from that connection, so no secret of
    any run ever enters the template's memory, where every later child (of any user) would
    inherit it.
(b) `handover`: the process accepts one connection and is itself W.

W then does what the cold path's sh WRAPPER does: a session of its own, the run's output (the
journal stream, or `<run_dir>/output.log`), the `<run_dir>/pid` record (its own pid), one child
E that becomes the engine, the `<run_dir>/exit-status` record (shell convention), and exits with
that status. TERM and INT are handled (no-op) in W, as the wrapper traps them, so a SIGTERM aimed
at the whole run still lets W record E's status.

E resets what the imports cached from the template's environment (`turn_into_run`) and runs
`prefect.engine` as `python -m prefect.engine` would: as `__main__`, through runpy, at the top of
this script's stack, so SystemExit, uncaught exceptions, atexit and non-daemon threads end E
exactly as they end a cold engine.

Protocol, one JSON object per line on the connection (the agent's side: bench/warm_proto/pool.py):
  agent -> W  {"spec": {...}}          (see `Spec` below)
  W -> agent  {"pid": W} | {"error": "..."}   ("error": use a cold start)
  agent -> W  {"go": true}             (the agent holds a pidfd of W; with spec["scope"], W is
                                        being moved into the run's scope)
  W -> agent  {"engine": E}            (W has recorded its pid and started E)
"""

# Process plumbing next to fork/dup2/setresuid: os-level calls on purpose.
# ruff: noqa: PTH100, PTH105, PTH108, PTH109, PTH110, PTH111, PTH115, PTH116, PTH118, PTH208

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

PRELOAD = (
    "prefect.engine",
    "prefect.flow_engine",
    "prefect.client.orchestration",
    "prefect._internal.metrics",
    "prefect.flows",
    "prefect.runner.storage",
    "prefect.deployments.steps.core",
    "prefect.logging.handlers",
    "prefect.events.worker",
    "prefect.task_engine",
    "prefect.results",
    # imported lazily by every run (found by diffing sys.modules at a warm run's exit)
    "anyio._backends._asyncio",
    "anyio.streams.memory",
    "anyio.streams.stapled",
    "anyio.streams.tls",
    "pydantic.v1",
    "rich._emoji_codes",
    "encodings.idna",
    "stringprep",
    "runpy",
)
# Read by the interpreter at start-up (or by the locale): a run whose values differ cannot use a
# template started with other values. PYTHONDONTWRITEBYTECODE and PYTHONPYCACHEPREFIX are
# applied in E instead (sys.dont_write_bytecode, sys.pycache_prefix).
APPLIED_IN_CHILD = ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")
MAX_SPEC = 4 * 1024 * 1024
SPEC_TIMEOUT = 30.0
GO_TIMEOUT = 60.0
SCOPE_TIMEOUT = 10.0
EXIT_REFUSED = 75  # W could not take the run: nothing was started; the agent starts it cold
EXIT_INTERNAL = 70
_PR_SET_PDEATHSIG = 1
JOURNAL_STDOUT = "/run/systemd/journal/stdout"

Spec = dict[str, Any]


# -- start-up --------------------------------------------------------------------------------


def startup_values(environ: dict[str, str]) -> dict[str, str]:
    return {
        k: v
        for k, v in environ.items()
        if (k.startswith(("PYTHON", "LC_")) or k == "LANG") and k not in APPLIED_IN_CHILD
    }


class Start:
    """What a fresh interpreter had before the template changed anything."""

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
    """The template must not outlive the agent that started it (an upgrade leaves none)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != expected_ppid:  # the parent died before prctl
        os._exit(0)


def preload() -> float:
    started = time.process_time()
    for name in PRELOAD:
        __import__(name)
    return time.process_time() - started


def check_clean() -> list[str]:
    """Why this process cannot be forked safely; [] when it can."""
    problems = []
    tasks = os.listdir("/proc/self/task")
    if len(tasks) != 1 or threading.active_count() != 1:
        names = [t.name for t in threading.enumerate()]
        problems.append(f"threads after the imports: {len(tasks)} tasks, {names}")
    fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    extra = [fd for fd in fds if fd > 2]
    if len(extra) > 1:  # the listdir's own fd
        problems.append(f"open files after the imports: {extra}")
    control = sys.modules.get("prefect._internal.control_listener")
    if control is not None and getattr(control, "_configured", False):
        problems.append("the control listener was configured in the template")
    return problems


# -- the template's loop ---------------------------------------------------------------------


def serve_forks(listener: socket.socket, start: Start) -> tuple[Spec, socket.socket]:
    """Fork one W per connection; return only in E (with its spec)."""
    while True:
        _reap()
        try:
            listener.settimeout(1.0)
            conn, _ = listener.accept()
        except TimeoutError:
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
        reader = conn.makefile("rb")
        conn.settimeout(SPEC_TIMEOUT)
        spec = _read(reader)["spec"]
        problem = incompatible(spec, start)
        if problem:
            _send(conn, {"error": problem})
            os._exit(EXIT_REFUSED)
        before = _cgroups()
        _send(conn, {"pid": os.getpid()})
        # Nothing is started or recorded before `go`: if the agent dies first, W just exits
        # (EOF) and the run was never launched. After it, the agent holds a pidfd of W, so W's
        # pid cannot be reused under it.
        conn.settimeout(GO_TIMEOUT)
        if not _read(reader).get("go"):
            os._exit(EXIT_REFUSED)
        if spec.get("scope"):
            wait_for_scope(spec["scope"], before)
        connect_output(spec)
        run_dir = spec["run_dir"]
        # Held for W's life: what identifies W as this run's (its argv is the template's).
        run_dir_fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
        _record(run_dir, "pid", os.getpid())
        phases = {"forked": time.time()} if spec.get("phases") else None
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
        if spec.get("rusage"):
            _record_rusage(run_dir, phases)
        os._exit(status)
    except BaseException as exc:  # W must never return into the template's loop
        try:
            sys.stderr.write(f"runner-agent warm supervisor: {exc!r}\n")
            sys.stderr.flush()
        finally:
            os._exit(EXIT_INTERNAL)


def incompatible(spec: Spec, start: Start) -> str | None:
    wanted = startup_values(spec["env"])
    if wanted != start.values:
        keys = sorted(set(wanted.items()) ^ set(start.values.items()))
        return f"interpreter start-up variables differ from the template's: {keys}"
    import site

    if site.ENABLE_USER_SITE:
        return "the interpreter has a user site directory (it depends on the run's user)"
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
    moves it one hierarchy after the other. Wait until the tracking hierarchy names the unit
    and every hierarchy that had W in a scope (the template's) has it in the unit, so that E
    is born in the run's memory, pids and cpu cgroups, not the template's."""
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


def journal_stream(identifier: str) -> int:
    """What systemd-cat does: a stream to journald, opened from inside the run's scope (journald
    attributes a stream to its peer's cgroup). Header per sd_journal_stream_fd(3): identifier,
    unit id, priority (6, info), level prefix (1), forward to syslog, kmsg, console (0)."""
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


def _record_rusage(run_dir: str, phases: dict[str, float] | None) -> None:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    data = {
        "supervisor_cpu": own.ru_utime + own.ru_stime,
        "engine_cpu": kids.ru_utime + kids.ru_stime,
        "engine_maxrss_kib": kids.ru_maxrss,
        "forked": phases["forked"] if phases else None,
    }
    with open(os.path.join(run_dir, "rusage.json"), "w") as f:
        json.dump(data, f)


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


# -- E: becoming the run's engine ------------------------------------------------------------


def turn_into_run(spec: Spec, conn: socket.socket, start: Start) -> None:
    """Make this forked process what `python -m prefect.engine` started cold would be."""
    conn.close()
    for signum, handler in start.handlers.items():
        if handler is not None:
            signal.signal(signum, handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, start.mask)
    user = spec.get("user")
    if user:
        os.setgroups(user["groups"])
        os.setresgid(user["gid"], user["gid"], user["gid"])
        os.setresuid(user["uid"], user["uid"], user["uid"])
    os.umask(spec["umask"])
    os.chdir(spec["cwd"])
    os.environ.clear()
    os.environ.update(spec["env"])
    # The cold path's sh wrapper exports PWD (kept if it names the working directory).
    if not _same_dir(os.environ.get("PWD"), "."):
        os.environ["PWD"] = os.getcwd()
    # `python -m` puts the working directory (resolved) first on sys.path.
    sys.path[0] = os.getcwd()
    sys.argv[:] = [""]
    sys.dont_write_bytecode = bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))
    sys.pycache_prefix = os.environ.get("PYTHONPYCACHEPREFIX") or None
    reset_import_time_state()
    # Prefect read its settings and configured logging at import, from the template's env.
    # At import the global settings context does not exist yet, so the profiles are found
    # from the environment alone; with the template's context in place they would be read
    # from the template's PREFECT_HOME. So: no context, then a new one, as at import.
    import prefect.context
    import prefect.logging.configuration as logging_configuration

    delattr(prefect.context, "GLOBAL_SETTINGS_CONTEXT")
    prefect.context.refresh_global_settings_context()
    logging_configuration.PROCESS_LOGGING_CONFIG.clear()
    logging_configuration.setup_logging()
    if spec.get("phases"):
        _instrument(spec["run_dir"])


def reset_import_time_state() -> None:
    """What the template's imports computed from ITS environment, working directory or process
    (found by bench/warm_proto/import_caches.py), recomputed as the run's cold engine would
    have it. Run after the environment, user and working directory are the run's."""
    import importlib
    import logging
    import site
    import tempfile

    cwd = os.path.abspath(os.getcwd())
    time.tzset()  # time.timezone, time.tzname (TZ)
    tempfile.tempdir = None  # gettempdir() caches TMPDIR
    importlib.invalidate_caches()  # directory listings of sys.path entries
    site.USER_BASE = None  # from HOME; recomputed on demand
    site.USER_SITE = None
    site.getusersitepackages()
    logging._startTime = time.time()  # type: ignore[attr-defined]  # relativeCreated's origin
    home = os.path.join(os.path.expanduser("~"), ".prefect")
    for name in ("prefect.settings.constants", "prefect.settings.sources"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "DEFAULT_PREFECT_HOME"):
            module.DEFAULT_PREFECT_HOME = type(module.DEFAULT_PREFECT_HOME)(home)
    rich = sys.modules.get("rich")
    if rich is not None and hasattr(rich, "_IMPORT_CWD"):
        rich._IMPORT_CWD = cwd
    process = sys.modules.get("multiprocessing.process")
    if process is not None:
        process.ORIGINAL_DIR = cwd  # type: ignore[attr-defined]
        # Each interpreter makes its own key for its managers' connections; forks would share
        # the template's, and one run could then authenticate to another run's manager.
        process.current_process().authkey = os.urandom(32)
    handlers = sys.modules.get("wsgiref.handlers")
    if handlers is not None:
        handlers.BaseHandler.os_environ = handlers.read_environ()  # type: ignore[attr-defined]
    config = sys.modules.get("fsspec.config")
    if config is not None:
        default = os.path.join(os.path.expanduser("~"), ".config/fsspec")
        config.default_conf_dir = default  # type: ignore[attr-defined]
        config.conf_dir = os.environ.get("FSSPEC_CONFIG_DIR", default)  # type: ignore[attr-defined]
        config.conf.clear()  # type: ignore[attr-defined]
        config.set_conf_files(config.conf_dir, config.conf)  # type: ignore[attr-defined]
        config.set_conf_env(config.conf)  # type: ignore[attr-defined]


def _same_dir(a: str | None, b: str) -> bool:
    if not a or not a.startswith("/"):
        return False
    try:
        return os.path.samestat(os.stat(a), os.stat(b))
    except OSError:
        return False


def _instrument(run_dir: str) -> None:
    """Bench only: time the engine's phases (first API call, flow load) into phases.json."""
    import atexit

    import prefect.flow_engine as flow_engine

    stamps: dict[str, Any] = {"turned": time.time()}
    stamps["fds_at_turn"] = {
        fd: os.readlink(f"/proc/self/fd/{fd}")
        for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}")
    }
    before = set(sys.modules)

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            stamps[f"{name}.start"] = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                stamps[f"{name}.end"] = time.time()

        return wrapper

    for name in ("load_flow_run", "load_flow", "run_flow"):
        setattr(flow_engine, name, timed(name, getattr(flow_engine, name)))

    def dump() -> None:
        stamps["cpu"] = time.process_time()
        stamps["imported_in_run"] = sorted(set(sys.modules) - before)
        with open(os.path.join(run_dir, "phases.json"), "w") as f:
            json.dump(stamps, f)

    atexit.register(dump)


def main(argv: list[str]) -> tuple[Spec, socket.socket, Start]:
    start = Start()
    mode, path = argv[1], argv[2]
    if mode == "fork":
        die_with_parent(start.ppid)
    cpu = preload()
    problems = check_clean()
    if problems:
        sys.stderr.write("runner-agent warm template refused: " + "; ".join(problems) + "\n")
        sys.exit(EXIT_REFUSED)
    # Objects that survive the imports go to a permanent generation: the collector of every
    # child then never touches (and so never copies) their pages.
    gc.collect()
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    sys.stderr.write(json.dumps({"ready": os.getpid(), "import_cpu": cpu}) + "\n")
    sys.stderr.flush()
    if mode == "fork":
        spec, conn = serve_forks(listener, start)
    else:
        conn, _ = listener.accept()
        listener.close()
        os.unlink(path)
        spec, conn = supervise(conn, start)
    return spec, conn, start


def _profile(run_dir: str) -> None:
    """Bench only: cProfile E from the fork to its exit, into profile.out."""
    import atexit
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    atexit.register(
        lambda: (profiler.disable(), profiler.dump_stats(os.path.join(run_dir, "profile.out")))
    )


def run_engine() -> None:
    """`python -m prefect.engine`. A cold interpreter has no `prefect.engine` module while the
    engine runs as __main__ (a later import makes a second one); so neither has E."""
    import runpy

    sys.modules.pop("prefect.engine", None)
    package = sys.modules["prefect"]
    if "engine" in vars(package):
        delattr(package, "engine")
    runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    _spec, _conn, _start = main(sys.argv)
    if _spec.get("profile"):
        _profile(_spec["run_dir"])
    turn_into_run(_spec, _conn, _start)
    del _spec, _conn, _start
    run_engine()
