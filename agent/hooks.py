"""Running the flow hooks the engine cannot run: `on_cancellation` and some `on_crashed`.

As under Prefect's Runner, the engine is started with
`PREFECT__ENABLE_CANCELLATION_AND_CRASHED_HOOKS=false`: it leaves `on_cancellation` to its
supervisor, and it cannot run `on_crashed` when it died without reporting (an OOM kill,
SIGKILL, `os._exit`). The agent never imports Prefect, so it runs those hooks in a short-lived
process of the run's own python, in the run's code directory, with the run's environment,
user and limits, in a unit (or process group) of its own, `runner-agent-hook-<id>.scope`, and
with a time limit. The script (hookscript.py) logs through Prefect's run logger, so the hooks'
messages reach the run's Prefect logs; its raw output goes to the agent's own log.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from agent.launch.base import Launcher, LaunchError, LaunchRequest, RunHandle

log = logging.getLogger("agent.hooks")

SCRIPT = Path(__file__).with_name("hookscript.py")
# A hook's output kept for the agent's log; the rest is read and dropped.
MAX_OUTPUT = 64 * 1024
CONTROL_VARIABLES = ("PREFECT__CONTROL_PORT", "PREFECT__CONTROL_TOKEN")


class HookKind(enum.Enum):
    CANCELLATION = "cancellation"
    CRASHED = "crashed"


class HookResult(enum.Enum):
    RAN = "ran"  # the hooks ran (each hook's own exception is logged in the run's logs)
    FLOW_NOT_LOADED = "flow-not-loaded"
    FAILED = "failed"  # the hook process failed or could not start
    TIMED_OUT = "timed-out"


@dataclass(frozen=True)
class HookOutcome:
    result: HookResult
    detail: str = ""


def hook_request(
    run: LaunchRequest, kind: HookKind, *, entrypoint: str | None, timeout: float, source: str
) -> LaunchRequest:
    """The hook process's request: the run's python, directory, user, environment and limits,
    with the hooks' time limit as its runtime limit, and its own unit and run directory.

    Not the run's own runtime limit: a run killed at RuntimeMaxSec would leave its on_crashed
    hooks that same budget, often less than the hook process needs to start (seen: a 5 s limit
    killed the hook process while it was flushing the hook's logs)."""
    env = {k: v for k, v in run.env.items() if k not in CONTROL_VARIABLES}
    # `-c`, not the script's path: a script's own directory goes first on sys.path, and the
    # agent package's modules (http.py, ...) would shadow the standard library's.
    args = ("-c", source, kind.value, *([entrypoint] if entrypoint else []))
    return replace(
        run,
        args=args,
        kind="hook",
        capture_output=True,
        env=env,
        runtime_max=timeout,
        run_dir=run.run_dir / f"hook-{kind.value}",
    )


class HookRunner:
    def __init__(
        self,
        launcher: Launcher,
        *,
        timeout: Callable[[], float],
        source: str | None = None,
    ) -> None:
        self._launcher = launcher
        self._timeout = timeout
        self._source = source if source is not None else SCRIPT.read_text()

    async def run(
        self, kind: HookKind, run: LaunchRequest, *, entrypoint: str | None
    ) -> HookOutcome:
        timeout = self._timeout()
        request = hook_request(
            run, kind, entrypoint=entrypoint, timeout=timeout, source=self._source
        )
        context = {"flow_run_id": str(run.flow_run_id)}
        shutil.rmtree(request.run_dir, ignore_errors=True)
        request.run_dir.mkdir(mode=0o700, parents=True)
        try:
            try:
                handle = await self._launcher.launch(request)
            except (LaunchError, OSError) as exc:
                return HookOutcome(HookResult.FAILED, f"could not start: {exc}")
            output = asyncio.ensure_future(_read_bounded(handle))
            try:
                status = await asyncio.wait_for(asyncio.shield(handle.wait()), timeout=timeout)
            except TimeoutError:
                await self._launcher.kill(handle)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(handle.wait(), timeout=10)
                return HookOutcome(HookResult.TIMED_OUT, f"did not finish within {timeout:g}s")
            finally:
                with contextlib.suppress(TimeoutError):
                    text = await asyncio.wait_for(output, timeout=5)
                    if text.strip():
                        log.info("on_%s hooks said: %s", kind.value, text.strip(), extra=context)
                output.cancel()
        finally:
            shutil.rmtree(request.run_dir, ignore_errors=True)
        if status == 0:
            return HookOutcome(HookResult.RAN)
        if status == 3:
            return HookOutcome(HookResult.FLOW_NOT_LOADED, "the flow could not be loaded")
        return HookOutcome(HookResult.FAILED, f"the hook process exited with status {status}")


async def _read_bounded(handle: RunHandle) -> str:
    """The first MAX_OUTPUT bytes of the output; reads to the end so the child never blocks."""
    if handle.output is None:
        return ""
    kept = bytearray()
    while chunk := await handle.output.read(65536):
        if len(kept) < MAX_OUTPUT:
            kept += chunk[: MAX_OUTPUT - len(kept)]
    return kept.decode(errors="replace")
