"""The systemd launcher: each run is a transient scope, `runner-agent-run-<id>.scope`.

Chain of execs, one pid throughout (the agent's child):
  systemd-run --scope ... -- systemd-cat --identifier=... -- sh -c WRAPPER ... [setpriv ...] engine
systemd-run registers the scope (with the limits) and execs; systemd-cat connects stdout and
stderr to journald from inside the scope and execs the wrapper, which runs the engine. The agent
keeps systemd-run's stderr on a pipe only until then, to explain launch failures. Why each piece
is there: docs/launcher.md. `systemd_run_argv` is pure, for tests and the system test bed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from uuid import UUID

from agent.launch.base import (
    LaunchError,
    LaunchRequest,
    RunHandle,
    SubprocessHandle,
    base_environment,
    changes_user,
    check_request,
    find_user,
)
from agent.launch.wrapper import (
    privilege_drop,
    read_exit_record,
    read_pid_record,
    wrapped_command,
)

log = logging.getLogger("agent.launch.systemd")

UNIT_PREFIX = "runner-agent-"
START_TIMEOUT = 60.0  # systemd-run waits for the manager's job; a hung bus must not hang us
STARTED_POLL = 0.05  # how often to look for the wrapper's pid record while it starts
SYSTEMCTL_TIMEOUT = 30.0
_GONE = ("not loaded", "not found", "does not exist")
# A warm template's scope (agent/warm): one Prefect import (~90 MiB) and the runs' supervisors
# between their fork and their move into the run's scope.
TEMPLATE_MEMORY_MAX = "1G"
TEMPLATE_TASKS_MAX = 64


def unit_name(flow_run_id: UUID, kind: str = "run") -> str:
    """`runner-agent-run-<id>.scope` for a run's engine, `runner-agent-hook-<id>.scope` for
    its hooks."""
    return f"{identifier(flow_run_id, kind)}.scope"


def identifier(flow_run_id: UUID, kind: str = "run") -> str:
    return f"{UNIT_PREFIX}{kind}-{flow_run_id}"


def format_seconds(seconds: float) -> str:
    """A systemd time span: whole seconds as "21600s", fractions in milliseconds."""
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


def description(req: LaunchRequest) -> str:
    return (
        f"Prefect flow run {req.flow_run_name} ({req.flow_run_id}) "
        f"of deployment {req.deployment_name}"
    )


def systemd_run_argv(
    req: LaunchRequest,
    *,
    user_manager: bool,
    slice: str = "",
    privilege_drop: Sequence[str] = (),
    systemd_run: str = "systemd-run",
    systemd_cat: str = "systemd-cat",
) -> list[str]:
    """The full argv; `privilege_drop` (wrapper.privilege_drop) goes in front of the engine.
    No secret ever appears here: the environment carries them."""
    argv = [systemd_run]
    if user_manager:
        argv.append("--user")
    argv += [
        "--scope",
        "--quiet",
        "--collect",
        "--no-ask-password",
        f"--unit={unit_name(req.flow_run_id, req.kind)}",
        f"--slice={req.slice or slice}",
        f"--description={description(req)}",
        "-p",
        f"MemoryMax={req.memory_max if req.memory_max is not None else 'infinity'}",
    ]
    if req.cpu_quota is not None:
        argv += ["-p", f"CPUQuota={req.cpu_quota}%"]
    argv += ["-p", f"TasksMax={req.tasks_max if req.tasks_max is not None else 'infinity'}"]
    if req.runtime_max:
        argv += ["-p", f"RuntimeMaxSec={format_seconds(req.runtime_max)}"]
    argv.append("--")
    if not req.capture_output:
        argv += [systemd_cat, f"--identifier={identifier(req.flow_run_id, req.kind)}", "--"]
    return argv + wrapped_command(req.run_dir, req.command, privilege_drop=privilege_drop)


INFINITY = 2**64 - 1  # "infinity" on the bus


def start_transient_scope_argv(
    req: LaunchRequest, pids: Sequence[int], *, user_manager: bool, slice: str = ""
) -> list[str]:
    """`busctl call ... StartTransientUnit` that puts existing `pids` into the run's scope with
    the limits `systemd_run_argv` gives a cold run, in the bus's units (bytes, tasks, CPU
    microseconds per second, runtime microseconds). For warm starts (agent/warm)."""
    props: list[str] = [
        "PIDs",
        "au",
        str(len(pids)),
        *map(str, pids),
        "Slice",
        "s",
        req.slice or slice,
        "Description",
        "s",
        description(req),
        "CollectMode",
        "s",
        "inactive-or-failed",  # --collect
        "MemoryMax",
        "t",
        str(req.memory_max if req.memory_max is not None else INFINITY),
        "TasksMax",
        "t",
        str(req.tasks_max if req.tasks_max is not None else INFINITY),
    ]
    if req.cpu_quota is not None:
        props += ["CPUQuotaPerSecUSec", "t", str(req.cpu_quota * 10_000)]
    if req.runtime_max:
        props += ["RuntimeMaxUSec", "t", str(round(req.runtime_max * 1_000_000))]
    count = 6 + (req.cpu_quota is not None) + bool(req.runtime_max)
    return [
        "busctl",
        *(["--user"] if user_manager else []),
        "call",
        "--quiet",
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "StartTransientUnit",
        "ssa(sv)a(sa(sv))",
        unit_name(req.flow_run_id, req.kind),
        "fail",
        str(count),
        *props,
        "0",
    ]


def systemctl_argv(user_manager: bool, *args: str, systemctl: str = "systemctl") -> list[str]:
    return [systemctl, *(["--user"] if user_manager else []), *args]


def parse_properties(text: str) -> dict[str, str]:
    """`systemctl show` output (Key=Value lines)."""
    props: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            props[key.strip()] = value.strip()
    return props


class SystemdLauncher:
    name = "systemd"

    def __init__(
        self,
        *,
        slice: str,
        user_manager: bool,
        manager_env: Mapping[str, str] | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.slice = slice
        self.user_manager = user_manager
        # `systemd-run --user`/`systemctl --user` find the user's bus through XDG_RUNTIME_DIR.
        self._manager_env = dict(
            manager_env
            if manager_env is not None
            else ({"XDG_RUNTIME_DIR": f"/run/user/{os.geteuid()}"} if user_manager else {})
        )
        self._start_timeout = start_timeout

    @property
    def manager_env(self) -> dict[str, str]:
        """What systemd-run and systemctl need to find the manager (also in the run's env)."""
        return dict(self._manager_env)

    async def launch(self, req: LaunchRequest) -> RunHandle:
        check_request(req)
        drop: list[str] = []
        if changes_user(req.user):
            if self.user_manager:
                raise LaunchError(
                    f"cannot run flows as user {req.user!r}: the agent is not root "
                    "(it uses the user manager)"
                )
            drop = privilege_drop(find_user(req.user))
        argv = systemd_run_argv(
            req, user_manager=self.user_manager, slice=self.slice, privilege_drop=drop
        )
        env = base_environment(req.user, extra={**self._manager_env, **req.env})
        unit = unit_name(req.flow_run_id, req.kind)
        try:
            # systemd-run --scope execs the command: it inherits this cwd and this environment.
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE
                if req.capture_output
                else asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.STDOUT if req.capture_output else asyncio.subprocess.PIPE,
                cwd=req.working_dir,
                env=env,
            )
        except OSError as exc:
            raise LaunchError(f"could not start {argv[0]}: {exc.strerror or exc}") from exc
        if req.capture_output:
            # systemd-run's own complaints, if any, arrive with the output.
            return SubprocessHandle(req.flow_run_id, unit, process)
        try:
            errors = await asyncio.wait_for(
                _started(process, req.run_dir), timeout=self._start_timeout
            )
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise LaunchError(
                f"systemd-run did not start {unit} within {self._start_timeout:g}s"
            ) from None
        text = "; ".join(
            line.strip() for line in errors.decode(errors="replace").splitlines() if line.strip()
        )
        if text:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(process.wait()), timeout=2.0)
            if process.returncode is not None and read_exit_record(req.run_dir) is None:
                # The wrapper never ran: this is systemd-run's or systemd-cat's refusal.
                raise LaunchError(f"systemd-run failed with status {process.returncode}: {text}")
            log.warning(
                "systemd-run for %s said: %s",
                unit,
                text,
                extra={"flow_run_id": str(req.flow_run_id)},
            )
        return SubprocessHandle(req.flow_run_id, unit, process)

    def _unit(self, handle: RunHandle) -> str:
        return handle.unit or unit_name(handle.flow_run_id)

    def template_prefix(self, unit: str, what: str) -> list[str]:
        """`systemd-run --scope` for a warm template (agent/warm): a scope of its own in the
        flows' slice, never the agent's cgroup, with room for the runs' supervisors it forks."""
        return [
            "systemd-run",
            *(["--user"] if self.user_manager else []),
            "--scope",
            "--quiet",
            "--collect",
            "--no-ask-password",
            f"--unit={unit}",
            f"--slice={self.slice}",
            f"--description={what}",
            "-p",
            f"MemoryMax={TEMPLATE_MEMORY_MAX}",
            "-p",
            f"TasksMax={TEMPLATE_TASKS_MAX}",
            "--",
        ]

    async def move_into_scope(self, req: LaunchRequest, pid: int) -> None:
        """Put the running `pid` into the run's new scope, with the run's limits."""
        argv = start_transient_scope_argv(
            req, [pid], user_manager=self.user_manager, slice=self.slice
        )
        code, _, err = await self._call(argv)
        if code != 0:
            raise LaunchError(f"StartTransientUnit for {unit_name(req.flow_run_id)} failed: {err}")

    async def stop_units(self, pattern: str) -> None:
        """Stop every loaded unit matching `pattern` (leftovers of a previous agent)."""
        await self._quietly("stop", pattern)

    async def _systemctl(self, *args: str) -> tuple[int, str, str]:
        return await self._call(systemctl_argv(self.user_manager, *args))

    async def _call(self, argv: list[str]) -> tuple[int, str, str]:
        env = base_environment("", extra=self._manager_env)
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), timeout=SYSTEMCTL_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            log.warning("%s timed out after %gs", " ".join(argv), SYSTEMCTL_TIMEOUT)
            return -1, "", "timed out"
        code = process.returncode if process.returncode is not None else -1
        return code, out.decode(errors="replace"), err.decode(errors="replace").strip()

    async def _quietly(self, *args: str) -> None:
        """Run systemctl; a unit that is already gone is what we wanted anyway."""
        code, _, err = await self._systemctl(*args)
        if code != 0 and not any(word in err for word in _GONE):
            log.warning("systemctl %s failed (%d): %s", " ".join(args), code, err)

    async def terminate(self, handle: RunHandle) -> None:
        await self._quietly("kill", "--kill-who=all", "--signal=SIGTERM", self._unit(handle))

    async def kill(self, handle: RunHandle) -> None:
        unit = self._unit(handle)
        await self._quietly("kill", "--kill-who=all", "--signal=SIGKILL", unit)
        await self._quietly("stop", unit)

    async def unit_result(self, handle: RunHandle) -> str | None:
        """The scope's Result while it is still loaded (--collect unloads it soon after)."""
        code, out, _ = await self._systemctl(
            "show", "-p", "Result,ActiveState,SubState,LoadState", self._unit(handle)
        )
        props = parse_properties(out)
        if code != 0 or props.get("LoadState") in (None, "not-found"):
            return None
        return props.get("Result") or None


async def _started(process: asyncio.subprocess.Process, run_dir: Path) -> bytes:
    """systemd-run's complaints, once the wrapper runs (its pid record) or stderr reaches EOF.

    EOF alone is not enough: uvloop leaks inheritable copies of a child's stdio fds into the
    child (seen in the system test bed), so the run itself would hold our stderr pipe open
    until it ends. The wrapper's pid record proves systemd-run and systemd-cat are done.
    """
    assert process.stderr is not None
    eof = asyncio.ensure_future(process.stderr.read())
    try:
        while not eof.done():
            if read_pid_record(run_dir) is not None:
                return b""
            await asyncio.wait({eof}, timeout=STARTED_POLL)
        return eof.result()
    finally:
        eof.cancel()
