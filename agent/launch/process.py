"""The process launcher: a plain process group per run, for hosts without systemd."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

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
from agent.launch.wrapper import OUTPUT_LOG, privilege_drop, wrapped_command

log = logging.getLogger("agent.launch.process")


def limits_ignored(req: LaunchRequest) -> list[str]:
    """The limits a request sets that a plain process cannot enforce."""
    limits = {
        "memory_max": req.memory_max,
        "cpu_quota": req.cpu_quota,
        "tasks_max": req.tasks_max,
        "runtime_max": req.runtime_max,
    }
    return [name for name, value in limits.items() if value is not None]


def _signal_group(pgid: int | None, signum: signal.Signals) -> None:
    if pgid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


class ProcessLauncher:
    """A plain process in its own session and process group.

    Output is appended to `<run_dir>/output.log` (the agent holds no pipe). Limits cannot be
    enforced. A grandchild that calls setsid() leaves the group and escapes terminate/kill:
    only the systemd launcher's cgroup catches everything.
    """

    name = "process"

    async def launch(self, req: LaunchRequest) -> RunHandle:
        check_request(req)
        ignored = limits_ignored(req)
        if ignored:
            log.warning(
                "the process launcher cannot enforce %s; ignored for run %s",
                ", ".join(ignored),
                req.flow_run_id,
                extra={"flow_run_id": str(req.flow_run_id)},
            )
        # Only the engine changes user: the wrapper keeps writing its records into the agent's
        # private run directory. (uvloop has no user=/group=; setpriv execs.)
        drop = privilege_drop(find_user(req.user)) if changes_user(req.user) else []
        argv = wrapped_command(req.run_dir, req.command, privilege_drop=drop)
        env = base_environment(req.user, extra=req.env)
        output = (
            asyncio.subprocess.PIPE
            if req.capture_output
            else os.open(req.run_dir / OUTPUT_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        )
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=asyncio.subprocess.STDOUT,
                cwd=req.working_dir,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise LaunchError(f"could not start {argv[0]}: {exc.strerror or exc}") from exc
        finally:
            if output != asyncio.subprocess.PIPE:
                os.close(output)
        return SubprocessHandle(req.flow_run_id, None, process)

    async def terminate(self, handle: RunHandle) -> None:
        _signal_group(handle.pid, signal.SIGTERM)

    async def kill(self, handle: RunHandle) -> None:
        _signal_group(handle.pid, signal.SIGKILL)

    async def unit_result(self, handle: RunHandle) -> str | None:
        return None
