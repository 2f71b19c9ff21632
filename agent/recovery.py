"""Finishing the story of runs that a previous agent process started (after a restart or a
SIGKILL), from their durable records. See docs/runs.md for the decision table.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from uuid import UUID

from agent.records import RunRecord

if TYPE_CHECKING:
    from agent.supervisor import Supervisor

ADOPTED_POLL_INTERVAL = 1.0
# An adopted run that vanished without recording its status (the wrapper itself was killed).
UNKNOWN_EXIT_STATUS = 255
VANISHED = (
    "The flow run's process ended while the agent was not running and left no exit status "
    "(was the host rebooted?)"
)


def process_alive(pid: int | None, create_time: float | None) -> bool:
    """True when `pid` still is the process we launched (not a recycled pid)."""
    if pid is None:
        return False
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(proc.create_time() - create_time) < 0.05
    except psutil.Error:
        return False


class AdoptedHandle:
    """A run this agent process did not start: its end is seen through the exit record."""

    def __init__(
        self,
        *,
        flow_run_id: UUID,
        unit: str | None,
        pid: int | None,
        create_time: float | None,
        read_status: Callable[[], int | None],
    ) -> None:
        self.flow_run_id = flow_run_id
        self.unit = unit
        self.pid = pid
        self._create_time = create_time
        self._read_status = read_status

    async def wait(self) -> int:
        while True:
            status = self._read_status()
            if status is not None:
                return status
            if not process_alive(self.pid, self._create_time):
                # The record is written just before exit; look once more, then give up.
                status = self._read_status()
                return status if status is not None else UNKNOWN_EXIT_STATUS
            await asyncio.sleep(ADOPTED_POLL_INTERVAL)


def exit_record(sup: Supervisor, record: RunRecord) -> int | None:
    if record.run_dir is None:
        return None
    return sup.ctx.launcher.read_exit_record(Path(record.run_dir))


async def resume(sup: Supervisor, record: RunRecord) -> None:
    ctx = sup.ctx
    # Best effort: heartbeats and messages want the run's names; the API may be down.
    sup.flow_run = await ctx.reporter.read_run(sup.id, retry=False)
    working_dir = record.extra.get("working_dir")
    if record.phase in ("launching", "running", "exited"):
        sup.workspace = ctx.workspaces.adopt(sup.id, Path(working_dir) if working_dir else None)
    if record.phase == "exited":
        await sup.report_exit(record.exit_status, record.unit_result)
        return
    if record.phase in ("launching", "running"):
        status = exit_record(sup, record)
        result = None
        create_time = record.extra.get("create_time")
        if status is None and process_alive(record.pid, create_time):
            sup.mark_running()
            sup.note(
                f"Adopted the running flow run ({record.unit or record.pid}) after an agent restart"
            )
            handle = AdoptedHandle(
                flow_run_id=sup.id,
                unit=record.unit,
                pid=record.pid,
                create_time=create_time,
                read_status=lambda: exit_record(sup, record),
            )
            status, result = await sup.follow(handle)
        if status is not None:
            sup.save("exited", exit_status=status, unit_result=result)
            await sup.report_exit(status, result)
            return
    current = await ctx.reporter.read_run(sup.id, retry=True)
    if current is None:
        await sup.finish()
        return
    sup.flow_run = current
    if record.phase in ("claiming", "launching") and sup.is_our_claim(current):
        # Claimed but never started: start it now rather than leave it stuck in PENDING.
        if sup.workspace is not None:
            await ctx.workspaces.finish(sup.workspace)
            sup.workspace = None
        sup.note("Launching a run that was claimed before an agent restart")
        await sup.launch_and_follow()
        return
    state_type = current.state.type if current.state else None
    if record.phase == "running" and not (state_type and state_type.is_final):
        await ctx.reporter.crash_unless_final(sup.id, VANISHED)
    await sup.finish()
