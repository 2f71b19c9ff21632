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
