"""Warm starts: a run's engine forked from a template instead of a cold `python -m prefect.engine`.

`WarmLauncher` wraps the configured launcher (systemd or process) and has its interface. A run
whose settings say `engine = "warm"` is handed to its template when one is ready; in every other
case, and on any refusal or error before the run starts, the wrapped launcher starts it cold and
the reason is logged. Stopping, killing and the unit's result are the wrapped launcher's: a warm
run has the same unit, process group and records as a cold one. docs/warm-engine.md.

The hand-over (one JSON object per line, agent/warm/template.py):
  connect -> the template forks W -> {"spec"} -> W answers {"pid"} -> the agent opens a pidfd of W
  and, under systemd, puts W into the run's scope -> {"go"} -> W records its pid, forks the engine.
Before `go` nothing was started: a failure there is a cold start. After it the run has started.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from uuid import UUID

from agent.launch.base import (
    DEFAULT_PATH,
    ENGINE_ARGS,
    Launcher,
    LaunchRequest,
    RunHandle,
    base_environment,
    changes_user,
    check_request,
    find_user,
)
from agent.launch.systemd import SystemdLauncher, identifier, unit_name
from agent.launch.wrapper import OUTPUT_LOG, read_exit_record, user_ids
from agent.run_settings import FlowRunSettings
from agent.warm.keys import connect_path, template_key
from agent.warm.pool import Template, WarmPool

log = logging.getLogger("agent.warm")

HANDOVER_TIMEOUT = 5.0  # connect and W's pid answer; slower means the template is in trouble
ENGINE_ANSWER_TIMEOUT = 10.0
MAX_ANSWER = 64 * 1024
SIGKILL_STATUS = 128 + signal.SIGKILL


class WarmRefused(Exception):
    """Nothing was started: start the run cold. str() says why."""


class WarmHandle:
    """A warm run. `pid` is W's, which records the exit status as the cold wrapper does; W is
    the template's child, so its end is seen through a pidfd, not wait()."""

    warm = True

    def __init__(
        self, flow_run_id: UUID, unit: str | None, pid: int, pidfd: int, run_dir: Path
    ) -> None:
        self.flow_run_id = flow_run_id
        self.unit = unit
        self.pid: int | None = pid
        self.output: asyncio.StreamReader | None = None
        self.run_dir = run_dir
        self._pidfd = pidfd
        self._status: int | None = None

    async def wait(self) -> int:
        if self._status is not None:
            return self._status
        if self._pidfd >= 0:
            loop = asyncio.get_running_loop()
            ended: asyncio.Future[None] = loop.create_future()
            loop.add_reader(self._pidfd, _settle, ended)
            try:
                await ended
            finally:
                loop.remove_reader(self._pidfd)
            # Only once W ended: a cancelled wait() must leave the pidfd for the next one.
            self.close()
        status = read_exit_record(self.run_dir)
        # No record: W itself was SIGKILLed (the whole run killed, or the OOM killer chose it),
        # which is what a cold run's wait() reports when its wrapper is.
        self._status = status if status is not None else SIGKILL_STATUS
        return self._status

    def close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def wants_warm(req: LaunchRequest) -> bool:
    # The template can only become `python -m prefect.engine`: any other program starts cold.
    return (
        req.engine == "warm"
        and req.kind == "run"
        and not req.capture_output
        and req.args == ENGINE_ARGS
    )


def resolve_python(python: str, env: dict[str, str]) -> str | None:
    if "/" in python:
        return python if Path(python).is_absolute() else None
    return shutil.which(python, path=env.get("PATH", DEFAULT_PATH))


def current_umask() -> int:
    """The agent's umask, which a cold run inherits (read, not set: no window where it changes)."""
    with Path("/proc/self/status").open() as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


class WarmLauncher:
    """The configured launcher, with warm starts for the runs that ask for them."""

    def __init__(self, inner: Launcher, pool: WarmPool) -> None:
        self.name = inner.name
        self.inner = inner
        self.pool = pool
        self._systemd = inner if isinstance(inner, SystemdLauncher) else None

    def keep_warm(self, flow_runs: Iterable[FlowRunSettings]) -> None:
        """Start (and keep) the templates of the deployments configured with engine "warm"."""
        keys = set()
        for flow_run in flow_runs:
            if flow_run.engine != "warm":
                continue
            env = base_environment("", extra=flow_run.env)
            python = resolve_python(flow_run.python, env)
            if python is not None:
                keys.add(template_key(python, env))
        self.pool.keep(keys)

    async def launch(self, req: LaunchRequest) -> RunHandle:
        if not wants_warm(req):
            return await self.inner.launch(req)
        check_request(req)
        try:
            return await self._launch_warm(req)
        except WarmRefused as exc:
            log.info(
                "warm start unavailable for run %s: %s; starting it cold",
                req.flow_run_id,
                exc,
                extra={"flow_run_id": str(req.flow_run_id)},
            )
        return await self.inner.launch(req)

    async def terminate(self, handle: RunHandle) -> None:
        await self.inner.terminate(handle)

    async def kill(self, handle: RunHandle) -> None:
        await self.inner.kill(handle)

    async def unit_result(self, handle: RunHandle) -> str | None:
        return await self.inner.unit_result(handle)

    # -- the hand-over -------------------------------------------------------------------------

    def _environment(self, req: LaunchRequest) -> dict[str, str]:
        """Exactly what the wrapped launcher gives a cold run's processes."""
        extra = dict(req.env)
        if self._systemd is not None:
            extra = {**self._systemd.manager_env, **extra}
        return base_environment(req.user, extra=extra)

    def _spec(self, req: LaunchRequest, env: dict[str, str]) -> dict[str, Any]:
        user = None
        if changes_user(req.user):
            uid, gid, groups = user_ids(find_user(req.user))
            user = {"uid": uid, "gid": gid, "groups": groups}
        if self._systemd is not None:
            output = {"journal": identifier(req.flow_run_id, req.kind)}
        else:
            output = {"file": str(req.run_dir / OUTPUT_LOG)}
        return {
            "env": env,
            "cwd": str(req.working_dir),
            "run_dir": str(req.run_dir),
            "umask": current_umask(),
            "user": user,
            "output": output,
            "scope": unit_name(req.flow_run_id, req.kind) if self._systemd else None,
        }

    async def _launch_warm(self, req: LaunchRequest) -> RunHandle:
        env = self._environment(req)
        python = resolve_python(req.python, env)
        if python is None:
            raise WarmRefused(f"{req.python} is not an absolute path")
        template = self.pool.take(template_key(python, env))
        if isinstance(template, str):
            raise WarmRefused(template)
        spec = self._spec(req, env)
        pid, pidfd = await self._hand_over(template, req, spec)
        unit = unit_name(req.flow_run_id, req.kind) if self._systemd else None
        return WarmHandle(req.flow_run_id, unit, pid, pidfd, req.run_dir)

    async def _hand_over(
        self, template: Template, req: LaunchRequest, spec: dict[str, Any]
    ) -> tuple[int, int]:
        """W's pid and a pidfd of it, once W was told to go; WarmRefused before that."""
        reader, writer = await self._connect(template)
        pidfd = -1
        go = False
        try:
            writer.write(json.dumps({"spec": spec}).encode() + b"\n")
            await writer.drain()
            answer = await _answer(reader, HANDOVER_TIMEOUT)
            if "pid" not in answer:
                raise WarmRefused(str(answer.get("error") or "its template gave no answer"))
            pid = int(answer["pid"])
            # W waits for `go`, so it is alive now: the pidfd cannot name a reused pid.
            pidfd = os.pidfd_open(pid)
            if self._systemd is not None:
                # A failure here is the run's launch failure, as systemd-run's is for a cold
                # start: the unit may exist already (the run is running), so no cold start.
                await self._systemd.move_into_scope(req, pid)
            go = True
            writer.write(b'{"go": true}\n')
            await writer.drain()
        except (OSError, TimeoutError, ValueError, WarmRefused) as exc:
            # A `go` that could not be written never reached W (the connection is broken): W
            # exits having started nothing, and the run starts cold.
            _abandon(writer, pidfd)
            if isinstance(exc, WarmRefused):
                raise
            raise WarmRefused(f"the hand-over failed: {exc!r}") from None
        except BaseException:
            if not go:  # LaunchError, or cancelled: W sees EOF and starts nothing
                _abandon(writer, pidfd)
            else:
                os.close(pidfd)  # cancelled after go: the run goes on, an agent restart adopts it
                writer.close()
            raise
        # The run has started. The engine's pid is only reported; W's failure ends the run with
        # its own recorded status, and its reason goes to the log here.
        try:
            answer = await _answer(reader, ENGINE_ANSWER_TIMEOUT)
        except (OSError, TimeoutError, ValueError):
            answer = {}
        except BaseException:
            os.close(pidfd)
            writer.close()
            raise
        writer.close()
        if "error" in answer:
            log.warning(
                "warm start of run %s failed before its engine started: %s",
                req.flow_run_id,
                answer["error"],
                extra={"flow_run_id": str(req.flow_run_id)},
            )
        return pid, pidfd

    async def _connect(
        self, template: Template
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        directory_fd = None
        if len(str(template.socket_path)) > 100:
            directory_fd = os.open(self.pool.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            async with asyncio.timeout(HANDOVER_TIMEOUT):
                return await asyncio.open_unix_connection(
                    connect_path(template.socket_path, directory_fd), limit=MAX_ANSWER
                )
        except (OSError, TimeoutError) as exc:
            raise WarmRefused(f"its template did not answer: {exc!r}") from None
        finally:
            if directory_fd is not None:
                os.close(directory_fd)


def _abandon(writer: asyncio.StreamWriter, pidfd: int) -> None:
    writer.close()
    if pidfd >= 0:
        os.close(pidfd)


async def _answer(reader: asyncio.StreamReader, within: float) -> dict[str, Any]:
    async with asyncio.timeout(within):
        line = await reader.readline()
    if not line:
        return {}
    message = json.loads(line)
    return message if isinstance(message, dict) else {}
