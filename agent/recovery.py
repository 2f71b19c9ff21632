"""Finishing the story of runs that a previous agent process started (after a restart or a
SIGKILL), from their durable records. See docs/runs.md for the decision table.

Two kinds of evidence tell whether a run's process was started: the agent's record (`running`
carries the pid and its start time) and the wrapper's own records in the run directory
(`pid`, written by the wrapper as its first act, and `exit-status`). The wrapper's pid record
covers the gap between the spawn and the agent's `running` record, so a run caught there is
adopted, never launched a second time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from agent import claims
from agent.claims import Verdict
from agent.launch.wrapper import read_exit_record, read_pid_record
from agent.processes import process_alive, wrapper_start_time
from agent.records import RunRecord
from agent.supervisor import Phase, Supervisor

ADOPTED_POLL_INTERVAL = 1.0
# An adopted run that vanished without recording its status (the wrapper itself was killed).
UNKNOWN_EXIT_STATUS = 255
VANISHED = (
    "The flow run's process ended while the agent was not running and left no exit status "
    "(was the host rebooted?)"
)
# How long after a `launching` record a spawned wrapper may take to write its pid record.
PID_RECORD_GRACE = 5.0
PID_RECORD_POLL = 0.1


@dataclass(frozen=True)
class Launched:
    """What the records say about a run's process: it was started, and is it still ours?"""

    pid: int
    create_time: float | None
    alive: bool


async def find_launched(record: RunRecord, *, record_age: float | None) -> Launched | None:
    """The run's process, or None when nothing shows that it was ever started.

    `record_age` is how long ago the record was written (None: long ago).
    """
    if record.pid is not None:
        create_time = record.extra.get("create_time")
        return Launched(record.pid, create_time, process_alive(record.pid, create_time))
    if record.phase != "launching" or record.run_dir is None:
        return None
    run_dir = Path(record.run_dir)
    pid = read_pid_record(run_dir)
    # Spawned just before the agent died, the wrapper may not have written its pid yet.
    waited = record_age if record_age is not None else PID_RECORD_GRACE
    while pid is None and waited < PID_RECORD_GRACE:
        await asyncio.sleep(PID_RECORD_POLL)
        waited += PID_RECORD_POLL
        pid = read_pid_record(run_dir)
    if pid is None:
        return None
    create_time = wrapper_start_time(pid, run_dir)
    return Launched(pid, create_time, create_time is not None)


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
        self.output: asyncio.StreamReader | None = None
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


def exit_record(record: RunRecord) -> int | None:
    if record.run_dir is None:
        return None
    return read_exit_record(Path(record.run_dir))


async def resume(sup: Supervisor, record: RunRecord) -> None:
    """Finish the story of a run that a previous agent process started."""
    sup.record = record
    try:
        await _resume(sup, record)
    finally:
        sup.phase = Phase.DONE


async def _resume(sup: Supervisor, record: RunRecord) -> None:
    ctx = sup.ctx
    if record.extra.get("cancel_requested"):
        sup.request_cancel()  # the cancellation a previous agent process had begun
    # Best effort: heartbeats and messages want the run's names; the API may be down.
    sup.flow_run = await ctx.reporter.read_run(sup.id, retry=False)
    sup.restore_job_variables()
    working_dir = record.extra.get("working_dir")
    if record.phase in ("launching", "running", "exited"):
        sup.workspace = ctx.workspaces.adopt(sup.id, Path(working_dir) if working_dir else None)
    if record.phase == "exited":
        await sup.report_exit(record.exit_status, record.unit_result)
        return
    launched: Launched | None = None
    if record.phase in ("launching", "running"):
        launched = await find_launched(record, record_age=ctx.records.age(sup.id))
        status = exit_record(record)
        if status is None and launched is not None and launched.alive:
            status, result = await _adopt(sup, record, launched)
        else:
            result = None
        if status is not None:
            sup.save_after_the_fact("exited", exit_status=status, unit_result=result)
            await sup.report_exit(status, result)
            return
    current = await ctx.reporter.read_run(sup.id, retry=True)
    if current is None:
        await sup.finish()
        return
    sup.flow_run = current
    if (
        launched is None
        and record.phase in ("claiming", "launching")
        and claims.is_our_claim(current, ctx.settings.agent.name)
    ):
        # Claimed, and nothing shows a start: start it now rather than leave it stuck in PENDING.
        if sup.workspace is not None:
            await ctx.workspaces.finish(sup.workspace)
            sup.workspace = None
        sup.note("Launching a run that was claimed before an agent restart")
        await sup.launch_and_follow()
        return
    if (
        launched is None
        and record.phase == "claiming"
        and sup.deployment is not None
        and claims.verdict(current) is Verdict.CLAIMABLE
    ):
        # The claim of the process that died may still be committed by a busy server after
        # this read: claim anew rather than drop the run. Ours lands, or theirs does and
        # carries our name; either way the run is ours (claims.propose_claim).
        sup.note("Claiming again a run whose claim was in flight at an agent restart")
        if await sup.claim():
            await sup.launch_claimed()
            return
        await sup.finish()
        return
    state_type = current.state.type if current.state else None
    if (record.phase == "running" or launched is not None) and not (
        state_type and state_type.is_final
    ):
        # It was started and is gone without a status: it ran at most once; never twice.
        await ctx.reporter.crash_if_running(sup.id, VANISHED)
    await sup.finish()


async def _adopt(
    sup: Supervisor, record: RunRecord, launched: Launched
) -> tuple[int | None, str | None]:
    """Follow a live run started by a previous agent process until it ends."""
    unit = record.unit or (sup.unit if record.launcher == "systemd" else None)
    if record.pid is None:
        # Caught between spawn and the `running` record: write what we now know.
        sup.save_after_the_fact(
            "running",
            pid=launched.pid,
            unit=unit,
            extra={**record.extra, "create_time": launched.create_time},
        )
    sup.mark_running()
    flow_run = sup.flow_run_settings
    sup.engine = await sup.ctx.engines.info(flow_run.python, flow_run.env)
    sup.note(f"Adopted the running flow run ({unit or launched.pid}) after an agent restart")
    handle = AdoptedHandle(
        flow_run_id=sup.id,
        unit=unit,
        pid=launched.pid,
        create_time=launched.create_time,
        read_status=lambda: exit_record(record),
    )
    return await sup.follow(handle)
