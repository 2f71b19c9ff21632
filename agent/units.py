"""The systemd launcher: each run is a transient scope, `runner-agent-run-<id>.scope`.

Chain of execs, one pid throughout (the agent's child):
  systemd-run --scope ... -- systemd-cat --identifier=... -- sh -c WRAPPER ... [setpriv ...] engine
systemd-run registers the scope (with the limits) and execs; systemd-cat connects stdout and
stderr to journald from inside the scope and execs the wrapper, which runs the engine. The agent
keeps systemd-run's stderr on a pipe only until then, to explain launch failures. Why each piece
is there: docs/launcher.md. `systemd_run_argv` is pure, for tests and the system test bed.

With a `user`, only the engine becomes that user (setpriv: uid, gid and exactly the user's
groups, real, effective and saved alike). The wrapper stays the agent's, so the run directory
and the records it writes there stay the agent's too (0700), out of the flow's reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from uuid import UUID

from agent.launcher import (
    SETPRIV,
    AdoptedRun,
    LaunchError,
    LaunchRequest,
    RunHandle,
    SubprocessHandle,
    base_environment,
    check_request,
    find_user,
    read_exit_record,
    read_pid_record,
    wrapped_command,
)

log = logging.getLogger("agent.units")

UNIT_PREFIX = "runner-agent-run-"
START_TIMEOUT = 60.0  # systemd-run waits for the manager's job; a hung bus must not hang us
STARTED_POLL = 0.05  # how often to look for the wrapper's pid record while it starts
SYSTEMCTL_TIMEOUT = 30.0
_UNIT_RE = re.compile(rf"^{UNIT_PREFIX}([0-9a-f-]{{36}})\.scope$")
_GONE = ("not loaded", "not found", "does not exist")


def unit_name(flow_run_id: UUID) -> str:
    return f"{UNIT_PREFIX}{flow_run_id}.scope"


def flow_run_id_of(unit: str) -> UUID | None:
    match = _UNIT_RE.match(unit)
    if match is None:
        return None
    try:
        return UUID(match.group(1))
    except ValueError:
        return None


def format_seconds(seconds: float) -> str:
    """A systemd time span: whole seconds as "21600s", fractions in milliseconds."""
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


def description(req: LaunchRequest) -> str:
    return (f"Prefect flow run {req.flow_run_name} ({req.flow_run_id}) "
            f"of deployment {req.deployment_name}")


def systemd_run_argv(
    req: LaunchRequest,
    *,
    user_manager: bool,
    slice: str = "",
    group: str = "",
    groups: Sequence[int] = (),
    systemd_run: str = "systemd-run",
    systemd_cat: str = "systemd-cat",
) -> list[str]:
    """The full argv. `group` is the user's primary group, `groups` all its group ids; with
    `req.user` the engine is started through `privilege_drop`. No secret ever appears here: the
    environment carries them."""
    argv = [systemd_run]
    if user_manager:
        argv.append("--user")
    argv += [
        "--scope",
        "--quiet",
        "--collect",
        "--no-ask-password",
        f"--unit={unit_name(req.flow_run_id)}",
        f"--slice={req.slice or slice}",
        f"--description={description(req)}",
        "-p", f"MemoryMax={req.memory_max if req.memory_max is not None else 'infinity'}",
    ]
    if req.cpu_quota is not None:
        argv += ["-p", f"CPUQuota={req.cpu_quota}%"]
    argv += ["-p", f"TasksMax={req.tasks_max if req.tasks_max is not None else 'infinity'}"]
    if req.runtime_max:
        argv += ["-p", f"RuntimeMaxSec={format_seconds(req.runtime_max)}"]
    argv += ["--", systemd_cat, f"--identifier={UNIT_PREFIX}{req.flow_run_id}", "--"]
    command = wrapped_command(req)
    if req.user:
        at = len(command) - len(req.command)  # the engine's argv closes the wrapper's
        command[at:at] = privilege_drop(req.user, group or req.user, groups)
    return argv + command


def privilege_drop(user: str, group: str, groups: Sequence[int]) -> list[str]:
    """setpriv's argv prefix that becomes `user`:`group` with exactly `groups` (none: cleared)."""
    supplementary = (f"--groups={','.join(str(g) for g in groups)}" if groups
                     else "--clear-groups")
    return [SETPRIV, f"--reuid={user}", f"--regid={group}", supplementary, "--"]


def systemctl_argv(user_manager: bool, *args: str, systemctl: str = "systemctl") -> list[str]:
    return [systemctl, *(["--user"] if user_manager else []), *args]


def kill_argv(unit: str, signal_name: str, *, user_manager: bool) -> list[str]:
    return systemctl_argv(user_manager, "kill", "--kill-who=all", f"--signal={signal_name}", unit)


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

    def __init__(self, *, slice: str, user_manager: bool,
                 manager_env: Mapping[str, str] | None = None,
                 start_timeout: float = START_TIMEOUT) -> None:
        self.slice = slice
        self.user_manager = user_manager
        # `systemd-run --user`/`systemctl --user` find the user's bus through XDG_RUNTIME_DIR.
        self._manager_env = dict(manager_env if manager_env is not None else (
            {"XDG_RUNTIME_DIR": f"/run/user/{os.geteuid()}"} if user_manager else {}))
        self._start_timeout = start_timeout

    def _identity(self, user: str) -> tuple[str, list[int]]:
        """The user's primary group name and all its group ids; ("", []) for our own user."""
        if not user:
            return "", []
        entry = find_user(user)
        if self.user_manager:
            if entry.pw_uid != os.geteuid():
                raise LaunchError(f"cannot run flows as user {user!r}: the agent is not root "
                                  "(it uses the user manager)")
            return "", []
        try:
            group = grp.getgrgid(entry.pw_gid).gr_name
        except KeyError:
            group = str(entry.pw_gid)
        return group, sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid)))

    async def launch(self, req: LaunchRequest) -> RunHandle:
        check_request(req)
        group, groups = self._identity(req.user)
        # The user manager runs everything as the agent's own user (checked in _identity).
        request = replace(req, user="") if self.user_manager else req
        argv = systemd_run_argv(request, user_manager=self.user_manager, slice=self.slice,
                                group=group, groups=groups)
        env = base_environment(req.user, extra={**self._manager_env, **req.env})
        unit = unit_name(req.flow_run_id)
        try:
            # systemd-run --scope execs the command: it inherits this cwd and this environment.
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, cwd=req.working_dir, env=env,
            )
        except OSError as exc:
            raise LaunchError(f"could not start {argv[0]}: {exc.strerror or exc}") from exc
        try:
            errors = await asyncio.wait_for(_started(process, req.run_dir),
                                            timeout=self._start_timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise LaunchError(f"systemd-run did not start {unit} within "
                              f"{self._start_timeout:g}s") from None
        text = "; ".join(line.strip() for line in errors.decode(errors="replace").splitlines()
                         if line.strip())
        if text:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(process.wait()), timeout=2.0)
            if process.returncode is not None and read_exit_record(req.run_dir) is None:
                # The wrapper never ran: this is systemd-run's or systemd-cat's refusal.
                raise LaunchError(f"systemd-run failed with status {process.returncode}: {text}")
            log.warning("systemd-run for %s said: %s", unit, text,
                        extra={"flow_run_id": str(req.flow_run_id)})
        return SubprocessHandle(req.flow_run_id, unit, process)

    def _unit(self, handle: RunHandle) -> str:
        return handle.unit or unit_name(handle.flow_run_id)

    async def _systemctl(self, *args: str) -> tuple[int, str, str]:
        argv = systemctl_argv(self.user_manager, *args)
        env = base_environment("", extra=self._manager_env)
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env,
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

    async def list_running(self, runs_dir: Path | None = None) -> list[AdoptedRun]:
        """Active `runner-agent-run-*.scope` units; pids and statuses from `runs_dir`."""
        code, out, err = await self._systemctl(
            "list-units", "--type=scope", "--state=active", "--plain", "--no-legend",
            "--no-pager", f"{UNIT_PREFIX}*.scope",
        )
        if code != 0:
            log.warning("could not list run units: %s", err)
            return []
        found: list[AdoptedRun] = []
        for line in out.splitlines():
            fields = line.split()
            flow_run_id = flow_run_id_of(fields[0]) if fields else None
            if flow_run_id is None:
                continue
            run_dir = runs_dir / str(flow_run_id) if runs_dir is not None else None
            found.append(AdoptedRun(
                flow_run_id, fields[0],
                read_pid_record(run_dir) if run_dir else None,
                read_exit_record(run_dir) if run_dir else None,
            ))
        return found

    def read_exit_record(self, run_dir: Path) -> int | None:
        return read_exit_record(run_dir)


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
