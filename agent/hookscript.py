"""Run a flow's `on_cancellation` or `on_crashed` hooks, for runner-agent.

This file is run as a script by the flow's OWN python (`python hookscript.py KIND
[ENTRYPOINT]`), in the run's code directory and with the run's environment, never imported by
the agent: it imports Prefect, the agent never does. It behaves like Prefect's Runner's hook
runner (prefect/runner/_hook_runner.py): it loads the flow, calls each hook with keyword
arguments `flow=, flow_run=, state=`, logs "Running hook ..." and each hook's failure to the
run's logger (so to the run's Prefect logs), and goes on with the next hook after a failure.

KIND is `cancellation` (the state given to the hooks is Cancelling, as under Prefect's Runner)
or `crashed` (the run's current state, the Crashed the agent reported). With ENTRYPOINT
(`path/to/file.py:flow`) the flow is loaded from the working directory; without, as the engine
does it from the deployment (running its pull steps in the working directory).

Exit status: 0 when the hooks ran (a hook's own exception is logged, not fatal), 2 on bad
arguments, 3 when the flow could not be loaded.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
from pathlib import Path
from typing import Any
from uuid import UUID

KINDS = ("cancellation", "crashed")
CANCELLED_MESSAGE = "Flow run was cancelled."


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or argv[1] not in KINDS:
        print(f"usage: {argv[0]} {{{'|'.join(KINDS)}}} [ENTRYPOINT]", file=sys.stderr)
        return 2
    try:
        flow_run_id = UUID(os.environ["PREFECT__FLOW_RUN_ID"])
    except (KeyError, ValueError):
        print("PREFECT__FLOW_RUN_ID is missing or not a UUID", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path.cwd()))  # the flow's modules, as the engine finds them
    return asyncio.run(run(argv[1], flow_run_id, argv[2] if len(argv) == 3 else None))


async def run(kind: str, flow_run_id: UUID, entrypoint: str | None) -> int:
    from prefect.client.orchestration import get_client
    from prefect.flows import load_flow_from_entrypoint, load_flow_from_flow_run
    from prefect.logging.handlers import APILogHandler
    from prefect.logging.loggers import flow_run_logger
    from prefect.states import Cancelling

    async with get_client() as client:
        flow_run = await client.read_flow_run(flow_run_id)
        logger = flow_run_logger(flow_run)
        try:
            if entrypoint is not None:
                flow = load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)
            else:
                flow = await load_flow_from_flow_run(
                    client, flow_run, storage_base_path=str(Path.cwd()), use_placeholder_flow=False
                )
        except Exception:
            logger.warning(
                "runner-agent could not load the flow to run its on_%s hooks",
                kind,
                exc_info=True,
            )
            await APILogHandler.aflush()
            return 3
    if kind == "cancellation":
        state: Any = Cancelling(message=CANCELLED_MESSAGE)
        hooks = list(flow.on_cancellation_hooks or [])
    else:
        state = flow_run.state
        hooks = list(flow.on_crashed_hooks or [])
    logger = flow_run_logger(flow_run, flow)
    for hook in hooks:
        name = getattr(hook, "__name__", None) or repr(hook)
        logger.info("Running hook %r in response to entering state %r", name, state.name)
        try:
            result = hook(flow=flow, flow_run=flow_run, state=state)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.error("An error was encountered while running hook %r", name, exc_info=True)
        else:
            logger.info("Hook %r finished running successfully", name)
    await APILogHandler.aflush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
