"""A deployment's flow as Prefect sees it: its parameter schema, description and name.

The agent never imports Prefect. `_flowinfo_helper.py` does, run by the deployment's own python
in its code directory (for git, the checkout of the current commit), so the schema is the one
`flow.serve` would register from the same code and the same Prefect. The helper runs
- as the flow's user (setpriv, as runs do) with the runs' minimal environment and the
  deployment's `env`, but no API URL or key: loading a flow needs no server;
- in its own process group, killed whole after HELPER_TIMEOUT or when it prints more than
  MAX_OUTPUT bytes;
- at most CONCURRENCY at a time.

Results are cached per code version (flowinfo_cache.py). A failure (the flow cannot be
imported, the helper timed out, the python is missing) is a FlowInfoFailure whose `reason` is
one bounded line; it is remembered for FAILURE_MEMORY seconds for the same code version, so a
sync repeated every poll does not re-run a broken import each time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.flowinfo_cache import (
    FlowInfo,
    FlowInfoCache,
    cache_key,
    code_tree_marks,
    python_fingerprint,
)
from agent.launch.base import DEFAULT_PATH, LaunchError, base_environment, changes_user, find_user
from agent.launch.wrapper import privilege_drop
from agent.settings import DeploymentSettings, FlowRunSettings
from agent.storage import Storage, StorageError
from agent.workspace import allow_pass_through

__all__ = ["HELPER", "FlowInfo", "FlowInfoFailure", "FlowInfoLookup", "FlowInspector"]

log = logging.getLogger("agent.flowinfo")

HELPER = Path(__file__).with_name("_flowinfo_helper.py")
HELPER_TIMEOUT = 60.0
MAX_OUTPUT = 1024 * 1024  # bytes of JSON; a schema is a few KiB
STDERR_KEPT = 4096  # the tail, for the reason of a crash
REASON_LIMIT = 300
CONCURRENCY = 2
FAILURE_MEMORY = 300.0


@dataclass(frozen=True)
class FlowInfoFailure:
    """Why the flow's info could not be computed; `reason` is one line, bounded."""

    reason: str


FlowInfoResult = FlowInfo | FlowInfoFailure


class FlowInfoLookup(Protocol):
    async def lookup(
        self, deployments: Sequence[DeploymentSettings], wait: float
    ) -> dict[str, FlowInfoResult | None]: ...


def one_line(text: str, limit: int = REASON_LIMIT) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def kill_process_group(pid: int) -> None:
    if pid <= 1:  # never our own group (0), every process (-1) or init's group
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class _OutputTooLarge(Exception):
    pass


async def _read_all(stream: asyncio.StreamReader | None, limit: int) -> bytes:
    """Everything up to `limit` bytes; _OutputTooLarge beyond."""
    data = bytearray()
    while stream is not None and (chunk := await stream.read(65536)):
        data += chunk
        if len(data) > limit:
            raise _OutputTooLarge
    return bytes(data)


async def _read_tail(stream: asyncio.StreamReader | None, keep: int) -> bytes:
    """The last `keep` bytes; reads to the end, so the child never blocks on a full pipe."""
    tail = b""
    while stream is not None and (chunk := await stream.read(65536)):
        tail = (tail + chunk)[-keep:]
    return tail


@dataclass(frozen=True)
class HelperCommand:
    argv: list[str]
    cwd: Path
    env: dict[str, str]


async def run_helper(
    command: HelperCommand,
    *,
    time_limit: float = HELPER_TIMEOUT,
    max_output: int = MAX_OUTPUT,
    kill_group: Callable[[int], None] = kill_process_group,
) -> FlowInfoResult:
    """Run the helper once; never raises but CancelledError (after killing the group)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *command.argv,
            cwd=command.cwd,
            env=command.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # the whole group dies on a timeout
        )
    except OSError as exc:
        return FlowInfoFailure(one_line(f"cannot run {command.argv[0]}: {exc.strerror or exc}"))
    problem = None
    try:
        async with asyncio.timeout(time_limit):
            out, err = await _communicate(proc, max_output, kill_group)
    except TimeoutError:
        problem = f"timed out after {time_limit:g}s"
    except _OutputTooLarge:
        problem = f"printed more than {max_output} bytes"
    except BaseException:  # cancelled: the agent is stopping or the config changed
        kill_group(proc.pid)
        with contextlib.suppress(Exception):
            await asyncio.shield(proc.wait())
        raise
    if problem is not None:
        kill_group(proc.pid)
        await proc.wait()
        return FlowInfoFailure(problem)
    return parse_answer(proc.returncode, out, err)


async def _communicate(
    proc: asyncio.subprocess.Process, max_output: int, kill_group: Callable[[int], None]
) -> tuple[bytes, bytes]:
    try:
        async with asyncio.TaskGroup() as group:
            err = group.create_task(_read_tail(proc.stderr, STDERR_KEPT))
            group.create_task(proc.wait())  # returns once stderr is closed too
            out = await _read_all(proc.stdout, max_output)
            # Only the helper holds its stdout: at EOF its answer is complete. Processes the
            # flow's module started would hold stderr open for good: the group goes now.
            kill_group(proc.pid)
    except ExceptionGroup as errors:
        if errors.subgroup(_OutputTooLarge) is not None:
            raise _OutputTooLarge from None
        raise
    return out, err.result()


def parse_answer(returncode: int | None, stdout: bytes, stderr: bytes) -> FlowInfoResult:
    """The helper's answer decides; the exit status only explains a missing one (a complete
    answer may come with our own SIGKILL, sent as soon as it was read)."""
    try:
        answer = json.loads(stdout)
    except ValueError:
        answer = None
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        return FlowInfoFailure(one_line(answer["error"]))
    info = FlowInfo.from_json(answer)
    if info is not None:
        return info
    if returncode == 0:
        return FlowInfoFailure(one_line(f"malformed answer from the helper: {stdout[:200]!r}"))
    lines = [line for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    if returncode is not None and returncode < 0:
        status = f"killed by signal {-returncode}"
    else:
        status = f"exit status {returncode}"
    return FlowInfoFailure(one_line(f"{lines[-1]} ({status})" if lines else status))


@dataclass(frozen=True)
class _Job:
    inputs: tuple[DeploymentSettings, FlowRunSettings]
    task: asyncio.Task[FlowInfoResult]
    deadline: float  # of waiting for it; it runs on until done


class FlowInspector:
    """Computes FlowInfo for deployments, at most once per code version, in the background."""

    def __init__(
        self,
        state_dir: Path,
        storage: Storage,
        flow_run_defaults: Callable[[], FlowRunSettings],
        *,
        timeout: float = HELPER_TIMEOUT,
        max_output: int = MAX_OUTPUT,
        kill_group: Callable[[int], None] = kill_process_group,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._state_dir = state_dir
        self._storage = storage
        self._flow_run_defaults = flow_run_defaults
        self._timeout = timeout
        self._max_output = max_output
        self._kill_group = kill_group
        self._clock = clock
        self.cache = FlowInfoCache(state_dir / "flowinfo")
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self._failures: dict[str, tuple[float, FlowInfoFailure]] = {}
        self._inflight: dict[str, _Job] = {}

    async def lookup(
        self, deployments: Sequence[DeploymentSettings], wait: float
    ) -> dict[str, FlowInfoResult | None]:
        """Each deployment's info, or None if it is still being computed.

        Each computation is waited for at most `wait` seconds from its start, over all lookups:
        one still running from an earlier lookup delays none of the others. What is not ready
        keeps being computed; a later lookup picks it up.
        """
        tasks = {d.key: self._start(d, wait) for d in deployments}
        for name in set(self._inflight) - set(tasks):
            self._inflight.pop(name).task.cancel()
        now = self._clock()
        waited = [self._inflight[n] for n in tasks if self._inflight[n].deadline > now]
        if waited:
            timeout = max(job.deadline for job in waited) - now
            await asyncio.wait({job.task for job in waited}, timeout=timeout)
        return {
            name: task.result() if task.done() and not task.cancelled() else None
            for name, task in tasks.items()
        }

    def _start(self, deployment: DeploymentSettings, wait: float) -> asyncio.Task[FlowInfoResult]:
        flow_run = deployment.flow_run_settings(self._flow_run_defaults())
        inputs = (deployment, flow_run)
        running = self._inflight.get(deployment.key)
        if running is not None and not running.task.done():
            if running.inputs == inputs:
                return running.task
            running.task.cancel()  # a reload changed what it depends on
        # A finished one is started again: from the caches that is quick, and it notices
        # code that changed since.
        task = asyncio.create_task(
            self.inspect(deployment, flow_run), name=f"flowinfo-{deployment.key}"
        )
        self._inflight[deployment.key] = _Job(inputs, task, self._clock() + wait)
        return task

    async def inspect(
        self, deployment: DeploymentSettings, flow_run: FlowRunSettings
    ) -> FlowInfoResult:
        """The deployment's FlowInfo, or why not. Raises nothing but CancelledError."""
        try:
            async with self._code(deployment, flow_run.user) as (code_dir, code_version):
                info = await self._inspect_code(deployment, flow_run, code_dir, code_version)
                commit = code_version.get("commit")
                if isinstance(info, FlowInfo) and isinstance(commit, str):
                    info = dataclasses.replace(info, commit=commit)
                return info
        except (StorageError, LaunchError) as exc:
            return FlowInfoFailure(one_line(str(exc)))
        except Exception as exc:
            log.exception("computing the parameter schema of %r failed", deployment.key)
            return FlowInfoFailure(one_line(f"unexpected error: {exc!r}"))

    async def _inspect_code(
        self,
        deployment: DeploymentSettings,
        flow_run: FlowRunSettings,
        code_dir: Path,
        code_version: Mapping[str, Any],
    ) -> FlowInfoResult:
        command = self.command(deployment.entrypoint, flow_run, code_dir)
        key = await asyncio.to_thread(
            _key, deployment.entrypoint, code_version, flow_run, command.env
        )
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        remembered = self._failures.get(key)
        if remembered is not None and self._clock() - remembered[0] < FAILURE_MEMORY:
            return remembered[1]
        async with self._slots:
            started = self._clock()
            result = await run_helper(
                command,
                time_limit=self._timeout,
                max_output=self._max_output,
                kill_group=self._kill_group,
            )
        if isinstance(result, FlowInfo):
            log.info(
                "deployment %r: computed the parameter schema of flow %r in %.1fs",
                deployment.key,
                result.flow_name,
                self._clock() - started,
                extra={"deployment": deployment.key},
            )
            self.cache.put(key, result)
            self._failures.pop(key, None)
        else:
            now = self._clock()
            self._failures = {
                k: v for k, v in self._failures.items() if now - v[0] < FAILURE_MEMORY
            }
            self._failures[key] = (now, result)
        return result

    def command(self, entrypoint: str, flow_run: FlowRunSettings, code_dir: Path) -> HelperCommand:
        """The helper's argv, directory and environment (raises LaunchError for a bad user)."""
        env = base_environment(
            flow_run.user, extra={"PYTHONDONTWRITEBYTECODE": "1", **flow_run.env}
        )
        argv = [flow_run.python, str(HELPER), entrypoint]
        if changes_user(flow_run.user):
            if os.geteuid() != 0:
                raise LaunchError(
                    f"cannot run flows as user {flow_run.user!r}: the agent is not root"
                )
            argv = [*privilege_drop(find_user(flow_run.user)), *argv]
        return HelperCommand(argv, code_dir, env)

    @contextlib.asynccontextmanager
    async def _code(
        self, deployment: DeploymentSettings, user: str
    ) -> AsyncIterator[tuple[Path, dict[str, Any]]]:
        """The code directory and what identifies its version; a git checkout stays leased."""
        entry_file = deployment.entrypoint.rpartition(":")[0]
        if deployment.git is None:
            if deployment.path is None:  # settings guarantee one of them
                raise LaunchError(f"deployment {deployment.name!r} has no code source")
            if not deployment.path.is_dir():
                raise LaunchError(f"the code directory {deployment.path} does not exist")
            marks = await asyncio.to_thread(code_tree_marks, deployment.path, entry_file)
            yield deployment.path, {"path": str(deployment.path), "files": marks}
            return
        with await self._storage.prepare(deployment.key, deployment.git) as checkout:
            if changes_user(user):
                allow_pass_through(self._state_dir, checkout.path)
            yield (
                checkout.path,
                {
                    "commit": checkout.commit,
                    "subdirectory": deployment.git.subdirectory,
                    "submodules": deployment.git.submodules,
                },
            )


def _key(
    entrypoint: str,
    code_version: Mapping[str, Any],
    flow_run: FlowRunSettings,
    env: Mapping[str, str],
) -> str:
    try:
        helper = HELPER.read_text()
    except OSError as exc:
        helper = f"unreadable: {exc}"
    return cache_key(
        {
            "helper": helper,
            "entrypoint": entrypoint,
            "code": code_version,
            "python": python_fingerprint(flow_run.python, env.get("PATH", DEFAULT_PATH)),
            "env": env,
            "user": flow_run.user,
        }
    )
