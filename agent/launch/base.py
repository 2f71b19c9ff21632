"""The `Launcher` protocol, the launch request and the run handle, and the checks and the
environment that every launcher shares."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from uuid import UUID

from agent.states import shell_status

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# What a run's python runs: Prefect's engine, as Prefect's Runner starts it.
ENGINE_ARGS = ("-m", "prefect.engine")


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
    run_dir: Path  # exists, the agent's own: the wrapper records the pid and exit status here
    slice: str
    # What the python runs: the engine, or (kind "hook") the hook runner script.
    args: tuple[str, ...] = ENGINE_ARGS
    kind: str = "run"  # names the unit: runner-agent-<kind>-<flow run id>.scope
    # The engine's output goes to the journal (or output.log); a hook's comes back on a pipe
    # (RunHandle.output), to be posted to the run's Prefect logs.
    capture_output: bool = False
    # "warm": started from a warm template when one is ready (agent/warm), else as "cold".
    engine: str = "cold"

    @property
    def command(self) -> list[str]:
        return [self.python, *self.args]


class RunHandle(Protocol):
    """A started run. `pid` is the wrapper's (with systemd-run --scope, the same process)."""

    @property
    def flow_run_id(self) -> UUID: ...
    @property
    def unit(self) -> str | None: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def output(self) -> asyncio.StreamReader | None:
        """stdout and stderr together, for a request with `capture_output`."""
        ...

    async def wait(self) -> int:
        """The exit status, shell convention (128+N for signal N)."""
        ...


class Launcher(Protocol):
    name: str

    async def launch(self, req: LaunchRequest) -> RunHandle: ...
    async def terminate(self, handle: RunHandle) -> None: ...
    async def kill(self, handle: RunHandle) -> None: ...
    async def unit_result(self, handle: RunHandle) -> str | None: ...


class SubprocessHandle:
    """A run whose wrapper is this agent process's child."""

    def __init__(
        self, flow_run_id: UUID, unit: str | None, process: asyncio.subprocess.Process
    ) -> None:
        self.flow_run_id = flow_run_id
        self.unit = unit
        self.pid: int | None = process.pid
        self.output: asyncio.StreamReader | None = process.stdout
        self._process = process

    async def wait(self) -> int:
        return shell_status(await self._process.wait())


def find_user(user: str) -> pwd.struct_passwd:
    """The passwd entry of `user`, or of the agent's own uid for ""."""
    try:
        return pwd.getpwnam(user) if user else pwd.getpwuid(os.geteuid())
    except KeyError:
        raise LaunchError(f"unknown user {user!r}") from None


def changes_user(user: str) -> bool:
    """Whether running as `user` means leaving the agent's own uid."""
    return bool(user) and find_user(user).pw_uid != os.geteuid()


def check_request(req: LaunchRequest) -> None:
    """Refuse what is sure to fail, with a reason a person can act on."""
    if not req.working_dir.is_dir():
        raise LaunchError(f"working directory does not exist: {req.working_dir}")
    if changes_user(req.user) and os.geteuid() != 0:
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
        env.update(
            HOME=entry.pw_dir,
            USER=entry.pw_name,
            LOGNAME=entry.pw_name,
            SHELL=entry.pw_shell or "/bin/sh",
        )
    env.update(extra or {})
    return env
