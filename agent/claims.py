"""Claiming a run: proposing PENDING, so that exactly one agent of a fleet runs it.

The claim is a PENDING proposal with `force=false` and a message that names the agent. Prefect
answers a second claim of the same run with ABORT, so only one claimant wins. A claim whose
answer is lost (an outage, a timeout) is settled by proposing the same transition again until
the server decides; its duplicate-transition rule makes the repeat safe. A WAIT is honoured
(bounded by schemas.MAX_WAIT_SECONDS) and the claim is then proposed anew with a fresh
transition id.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from datetime import UTC, datetime, timedelta
from uuid import UUID

from agent import states
from agent.api import PrefectApiError, PrefectClient
from agent.reporting import Reporter
from agent.schemas import FlowRun, StateType

DEFAULT_WAIT = 1.0


class Verdict(enum.Enum):
    """What the server's copy of a run says about claiming it now."""

    CLAIMABLE = "claimable"
    CANCELLING = "cancelling"  # cancelled before launch: settle it as CANCELLED, never launch
    CANCELLED = "cancelled"
    NOT_SCHEDULED = "not-scheduled"  # taken by someone else, or finished
    RETRYING_IN_PROCESS = "retrying-in-process"  # its own engine, alive elsewhere, re-runs it


def claim_message(agent_name: str) -> str:
    return f"Claimed by runner-agent {agent_name!r}"


def verdict(flow_run: FlowRun) -> Verdict:
    state_type = flow_run.state_type
    if state_type is StateType.CANCELLING:
        return Verdict.CANCELLING
    if state_type is StateType.CANCELLED:
        return Verdict.CANCELLED
    if state_type is not StateType.SCHEDULED:
        return Verdict.NOT_SCHEDULED
    if flow_run.retrying_in_process:
        return Verdict.RETRYING_IN_PROCESS
    return Verdict.CLAIMABLE


def is_our_claim(flow_run: FlowRun, agent_name: str) -> bool:
    state = flow_run.state
    return (
        state is not None
        and state.type is StateType.PENDING
        and (state.message or "") == claim_message(agent_name)
    )


async def propose_claim(
    client: PrefectClient,
    reporter: Reporter,
    flow_run_id: UUID,
    *,
    agent_name: str,
    log: logging.LoggerAdapter[logging.Logger],
) -> bool:
    """Propose PENDING until the server decides; True when this agent won the run."""
    while True:
        # A fresh transition id per proposal; a WAIT makes the next one a new proposal.
        pending = states.pending_state()
        pending["message"] = claim_message(agent_name)
        try:
            result = await client.set_flow_run_state(flow_run_id, pending, force=False)
        except PrefectApiError as exc:
            # Outcome unknown, and a read-back cannot settle it: a busy server may commit a
            # request after the client gave up on it, i.e. after we read SCHEDULED. The same
            # transition proposed again is decided for good: ACCEPT, or Prefect's REJECT of a
            # transition the run already made (read as ACCEPT by the client), or ABORT.
            log.warning("claim unanswered, proposing it again until decided: %s", exc)
            decision = await reporter.propose(flow_run_id, pending, force=False)
            if decision == "ACCEPT":
                return True
            current = await reporter.read_run(flow_run_id, retry=True)
            return current is not None and is_our_claim(current, agent_name)
        if result.status == "ACCEPT":
            return True
        if result.status == "WAIT":
            delay = float(result.details.delay_seconds or DEFAULT_WAIT)
            log.info("server asked to wait %.1fs before claiming", delay)
            await asyncio.sleep(delay)
            continue
        log.info("not claimed (%s): %s", result.status, result.details.reason or "no reason given")
        return False


# A claim given back over a pool's concurrency limit is due again after this.
SLOT_RETRY = timedelta(seconds=5)
# What occupies a pool's slot for the server (WORK_POOL_SLOT_OCCUPYING_STATES): not CANCELLING,
# or a run stuck there would make every claim be given back while the server offers more.
ACTIVE = ("PENDING", "RUNNING")


def within_pool_limit(active: list[FlowRun], flow_run_id: UUID, limit: int) -> bool:
    """Whether our claim is one of the first `limit` of the pool's active runs. Runs past
    PENDING come first, then claims by their time and id: every claimant ranks alike, and a
    later claim sees every earlier one. (Timestamps are taken when a request arrives, not when it
    commits, so a slow commit can still let one more through; the server's own check narrows it.)"""
    oldest = datetime.min.replace(tzinfo=UTC)

    def rank(run: FlowRun) -> tuple[bool, datetime, str]:
        state = run.state
        if state is None or state.type is not StateType.PENDING:
            return (False, oldest, str(run.id))
        return (True, state.timestamp or oldest, str(run.id))

    ranked = [run.id for run in sorted(active, key=rank)]
    # Not listed: the read missed our own claim; keep it rather than give back a slot we hold.
    return flow_run_id not in ranked or ranked.index(flow_run_id) < limit


async def hold_pool_slot(
    client: PrefectClient,
    reporter: Reporter,
    flow_run_id: UUID,
    *,
    pool: str,
    limit: int,
    agent_name: str,
    log: logging.LoggerAdapter[logging.Logger],
) -> bool:
    """After a won claim: keep it only within the pool's concurrency limit, else give it back
    (SCHEDULED "AwaitingConcurrencySlot", due again in SLOT_RETRY). Prefect applies the limit
    only when it lists runs, so agents polling at the same moment could exceed it together.

    The give-back is not forced: a run cancelled meanwhile is not made SCHEDULED again. When it
    is refused, the run as the server has it decides: our claim still standing is kept (over
    the limit, rather than stuck in PENDING); a cancellation is settled as CANCELLED."""
    body = {
        "work_pools": {"name": {"any_": [pool]}},
        "flow_runs": {"state": {"type": {"any_": list(ACTIVE)}}},
        "limit": 200,
    }
    try:
        active = await client.filter_flow_runs(body)
    except PrefectApiError as exc:
        log.warning(
            "cannot check work pool %r's concurrency limit; keeping the claim: %s", pool, exc
        )
        return True
    if within_pool_limit(active, flow_run_id, limit):
        return True
    message = f"Work pool {pool!r} is at its concurrency limit ({limit}); waiting for a slot"
    due = datetime.now(UTC) + SLOT_RETRY
    decision = await reporter.propose(
        flow_run_id, states.awaiting_slot_state(due, message), force=False
    )
    if decision == "ACCEPT":
        log.info("gave the claim back: %s", message)
        return False
    current = await reporter.read_run(flow_run_id, retry=True)
    if current is not None and current.state_type is StateType.CANCELLING:
        await reporter.propose(flow_run_id, states.cancelled_state(), force=True)
        return False
    kept = current is not None and is_our_claim(current, agent_name)
    log.info("could not give the claim back (%s); %s", decision, "kept" if kept else "lost")
    return kept
