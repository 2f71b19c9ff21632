"""How a flow run's process is started and stopped: the `Launcher` protocol, the process
launcher (hosts without systemd) and the `auto` choice. The systemd launcher is in units.py.

Both launchers run the engine under the same tiny POSIX sh wrapper (WRAPPER), which records the
engine's exit status in `<run_dir>/exit-status` before it exits with that same status, so a run's
end can be told also by an agent process that did not start it. See docs/launcher.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol
from uuid import UUID

from agent.states import shell_status

log = logging.getLogger("agent.launcher")

EXIT_RECORD = "exit-status"
PID_RECORD = "pid"
OUTPUT_LOG = "output.log"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SETPRIV = "/usr/bin/setpriv"

# $1 is the run directory, the rest the engine's argv. The engine runs in the foreground: a
# trapped TERM/INT (a *handled* disposition, reset to default in the exec'd engine; an ignored one
# would be inherited) is deferred until the foreground child ends, so a SIGTERM aimed at the whole
# run still lets the wrapper record the child's status. Both records are atomic (temp + mv) and
# 0600; the umask is set in a subshell so that the engine keeps the one it was given.
WRAPPER = """\
dir=$1; shift
(umask 077; printf '%s\\n' "$$" >"$dir/.pid.$$") && mv -f "$dir/.pid.$$" "$dir/pid"
trap 'true' TERM INT
"$@"
status=$?
(umask 077; printf '%s\\n' "$status" >"$dir/.exit-status.$$") &&
    mv -f "$dir/.exit-status.$$" "$dir/exit-status"
exit "$status"
"""
WRAPPER_NAME = "runner-agent-run"  # the wrapper's $0


class LaunchError(Exception):
    """The run could not be started; str() is the reason, shown in the Crashed state."""


@dataclass(frozen=True)
class LaunchRequest:
    flow_run_id: UUID
    flow_run_name: str
    deployment_name: str
    working_dir: Path
    python: str
    memory_max: int | None  # bytes; None = infinity
    cpu_quota: int | None  # percent
    tasks_max: int | None
    runtime_max: float | None  # seconds
    user: str  # "" = the agent's own user
    env: Mapping[str, str]  # the engine's extra environment (secrets included, never argv)
    run_dir: Path  # exists, writable by the flow's user
    slice: str

    @property
    def command(self) -> list[str]:
        return [self.python, "-m", "prefect.engine"]


def wrapped_command(req: LaunchRequest) -> list[str]:
    """The wrapper around the engine: `sh -c WRAPPER runner-agent-run <run_dir> <python> -m ...`."""
    return ["/bin/sh", "-c", WRAPPER, WRAPPER_NAME, str(req.run_dir), *req.command]


class RunHandle(Protocol):
    """A started run. `pid` is the wrapper's (with systemd-run --scope, the same process)."""

    @property
    def flow_run_id(self) -> UUID: ...
    @property
    def unit(self) -> str | None: ...
    @property
    def pid(self) -> int | None: ...

    async def wait(self) -> int:
        """The exit status, shell convention (128+N for signal N)."""
        ...


class SubprocessHandle:
    """A run whose wrapper is this agent process's child."""

    def __init__(self, flow_run_id: UUID, unit: str | None,
                 process: asyncio.subprocess.Process) -> None:
        self.flow_run_id = flow_run_id
        self.unit = unit
        self.pid: int | None = process.pid
        self._process = process

    async def wait(self) -> int:
        return shell_status(await self._process.wait())


@dataclass(frozen=True)
class AdoptedRun:
    """A run found on the host after an agent restart."""

    flow_run_id: UUID
    unit: str | None
    pid: int | None
    exit_status: int | None  # recorded by the wrapper; None while it runs (or if it was killed)


class Launcher(Protocol):
    name: str

    async def launch(self, req: LaunchRequest) -> RunHandle: ...
    async def terminate(self, handle: RunHandle) -> None: ...
    async def kill(self, handle: RunHandle) -> None: ...
    async def unit_result(self, handle: RunHandle) -> str | None: ...
    async def list_running(self, runs_dir: Path | None = None) -> list[AdoptedRun]: ...
    def read_exit_record(self, run_dir: Path) -> int | None: ...


# -- shared helpers ------------------------------------------------------------------------------


def read_exit_record(run_dir: Path) -> int | None:
    """The status the wrapper recorded, or None (still running, killed, or never started)."""
    return _read_int(run_dir / EXIT_RECORD)


def read_pid_record(run_dir: Path) -> int | None:
    return _read_int(run_dir / PID_RECORD)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def find_user(user: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(user) if user else pwd.getpwuid(os.geteuid())
    except KeyError:
        raise LaunchError(f"unknown user {user!r}") from None


def check_request(req: LaunchRequest) -> None:
    """Refuse what is sure to fail, with a reason a person can act on."""
    if not req.working_dir.is_dir():
        raise LaunchError(f"working directory does not exist: {req.working_dir}")
    if req.user and find_user(req.user).pw_uid != os.geteuid() and os.geteuid() != 0:
        raise LaunchError(f"cannot run flows as user {req.user!r}: the agent is not root")
    python = req.python
    if "/" not in python:
        found = shutil.which(python, path=req.env.get("PATH", DEFAULT_PATH))
        if found is None:
            raise LaunchError(f"command not found: {python}")
        python = found
    path = Path(python)
    if not path.is_file():
        raise LaunchError(f"command not found: {python}")
    if not os.access(path, os.X_OK):
        raise LaunchError(f"command not executable (permission denied): {python}")


def base_environment(user: str, *, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A minimal environment for the flow's user; nothing leaks from the agent's own."""
    env = {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"}
    try:
        entry = find_user(user)
    except LaunchError:
        if user:
            raise
        # Our own uid without a passwd entry (some containers): no names to give.
    else:
        env.update(HOME=entry.pw_dir, USER=entry.pw_name, LOGNAME=entry.pw_name,
                   SHELL=entry.pw_shell or "/bin/sh")
    env.update(extra or {})
    return env


def setpriv_prefix(user: str) -> list[str]:
    """Become `user` (uid, gid and exactly its supplementary groups) and exec the rest."""
    entry = find_user(user)
    return [SETPRIV, f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups", "--"]


def limits_ignored(req: LaunchRequest) -> list[str]:
    names = []
    if req.memory_max is not None:
        names.append("memory_max")
    if req.cpu_quota is not None:
        names.append("cpu_quota")
    if req.tasks_max is not None:
        names.append("tasks_max")
    if req.runtime_max is not None:
        names.append("runtime_max")
    return names


def _signal_group(pgid: int | None, signum: signal.Signals) -> None:
    if pgid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def scan_runs(runs_dir: Path) -> list[AdoptedRun]:
    """Runs under `runs_dir` whose wrapper is alive and has recorded no status yet."""
    found: list[AdoptedRun] = []
    if not runs_dir.is_dir():
        return found
    for run_dir in sorted(runs_dir.iterdir()):
        try:
            flow_run_id = UUID(run_dir.name)
        except ValueError:
            continue
        pid = read_pid_record(run_dir)
        if read_exit_record(run_dir) is None and pid is not None and _pid_alive(pid):
            found.append(AdoptedRun(flow_run_id, None, pid, None))
    return found


# -- the process launcher ----------------------------------------------------------------------


class ProcessLauncher:
    """A plain process in its own session and process group, for hosts without systemd.

    Output is appended to `<run_dir>/output.log` (the agent holds no pipe). Limits cannot be
    enforced. A grandchild that calls setsid() leaves the group and escapes terminate/kill:
    only the systemd launcher's cgroup catches everything.
    """

    name = "process"

    async def launch(self, req: LaunchRequest) -> RunHandle:
        check_request(req)
        ignored = limits_ignored(req)
        if ignored:
            log.warning("the process launcher cannot enforce %s; ignored for run %s",
                        ", ".join(ignored), req.flow_run_id,
                        extra={"flow_run_id": str(req.flow_run_id)})
        argv = wrapped_command(req)
        if req.user and find_user(req.user).pw_uid != os.geteuid():
            # Only the engine changes user: the wrapper keeps writing its records into the
            # agent's private run directory. (uvloop has no user=/group=; setpriv execs.)
            at = len(argv) - len(req.command)
            argv[at:at] = setpriv_prefix(req.user)
        env = base_environment(req.user, extra=req.env)
        output = os.open(req.run_dir / OUTPUT_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=output,
                stderr=asyncio.subprocess.STDOUT, cwd=req.working_dir, env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise LaunchError(f"could not start {argv[0]}: {exc.strerror or exc}") from exc
        finally:
            os.close(output)
        return SubprocessHandle(req.flow_run_id, None, process)

    async def terminate(self, handle: RunHandle) -> None:
        _signal_group(handle.pid, signal.SIGTERM)

    async def kill(self, handle: RunHandle) -> None:
        _signal_group(handle.pid, signal.SIGKILL)

    async def unit_result(self, handle: RunHandle) -> str | None:
        return None

    async def list_running(self, runs_dir: Path | None = None) -> list[AdoptedRun]:
        return scan_runs(runs_dir) if runs_dir is not None else []

    def read_exit_record(self, run_dir: Path) -> int | None:
        return read_exit_record(run_dir)


# -- choosing one ----------------------------------------------------------------------------------


def _systemd_booted() -> bool:
    return Path("/run/systemd/system").exists()


def select_launcher(
    choice: Literal["auto", "systemd", "process"],
    *,
    slice: str,
    is_root: bool,
    systemd_present: Callable[[], bool] = _systemd_booted,
) -> Launcher:
    """The configured launcher; `auto` is systemd when /run/systemd/system exists."""
    from agent.units import SystemdLauncher  # units builds on this module's types

    present = systemd_present()
    if choice == "process" or (choice == "auto" and not present):
        why = ("configured" if choice == "process"
               else "auto: /run/systemd/system does not exist (systemd is not running)")
        log.info("launcher: process (%s)", why)
        return ProcessLauncher()
    manager = "system manager" if is_root else "user manager (--user)"
    if choice == "systemd" and not present:
        log.warning("launcher: systemd (configured), but /run/systemd/system does not exist; "
                    "launches will fail")
    else:
        why = "configured" if choice == "systemd" else "auto: /run/systemd/system exists"
        log.info("launcher: systemd via the %s, slice %s (%s)", manager, slice, why)
    return SystemdLauncher(slice=slice, user_manager=not is_root)
