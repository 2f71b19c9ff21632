"""Reporter: outcomes survive outages; only a definite 4xx ends an attempt."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID

import pytest

from agent.api import ApiError, ApiUnavailable, CredentialsRefused, MalformedResponse
from agent.reporting import CrashOutcome, Reporter
from agent.schemas import FlowRun, OrchestrationResult

RUN = UUID("11111111-1111-1111-1111-111111111111")
OTHER = UUID("22222222-2222-2222-2222-222222222222")


def flow_run(state_type: str, run_id: UUID = RUN) -> FlowRun:
    return FlowRun.model_validate({"id": str(run_id), "state": {"type": state_type}})


def accept() -> OrchestrationResult:
    return OrchestrationResult.model_validate({"status": "ACCEPT"})


class ScriptedClient:
    """Answers reads and proposals from scripts: an exception is raised, anything else returned."""

    def __init__(self, reads: list[Any] | None = None, sets: list[Any] | None = None) -> None:
        self.reads = list(reads or [])
        self.sets = list(sets or [])
        self.read_calls: list[UUID] = []
        self.proposals: list[tuple[UUID, dict[str, Any], bool]] = []

    async def read_flow_run(self, flow_run_id: UUID) -> FlowRun:
        self.read_calls.append(flow_run_id)
        return self._next(self.reads)  # type: ignore[no-any-return]

    async def set_flow_run_state(
        self, flow_run_id: UUID, state: dict[str, Any], *, force: bool
    ) -> OrchestrationResult:
        self.proposals.append((flow_run_id, state, force))
        return self._next(self.sets)  # type: ignore[no-any-return]

    @staticmethod
    def _next(script: list[Any]) -> Any:
        answer = script.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


def reporter(client: ScriptedClient, sleep: Any = None) -> Reporter:
    return Reporter(client, sleep=sleep or Sleeps())  # type: ignore[arg-type]


def malformed() -> MalformedResponse:
    return MalformedResponse("GET", "/flow_runs/x", 200, "not JSON", "<html>starting</html>")


@pytest.mark.parametrize(
    "transient",
    [
        ApiUnavailable("GET /flow_runs/x failed after 5 attempt(s)"),
        CredentialsRefused("the API credentials were refused (HTTP 403)"),
        malformed(),
    ],
    ids=["unavailable", "credentials", "malformed"],
)
async def test_read_is_retried_through_transient_failures(transient: Exception) -> None:
    # A run whose process exited must not stay RUNNING because a proxy said 403 or sent HTML.
    sleeps = Sleeps()
    client = ScriptedClient(reads=[transient, transient, flow_run("RUNNING")])
    result = await reporter(client, sleeps).read_run(RUN, retry=True)
    assert result is not None and result.state is not None
    assert result.state.type == "RUNNING"
    assert len(client.read_calls) == 3
    # Jittered, doubling backoff: ~1 s, then ~2 s.
    assert 0.5 <= sleeps.delays[0] <= 1 and 1 <= sleeps.delays[1] <= 2


async def test_read_gives_up_on_a_definite_answer() -> None:
    client = ScriptedClient(reads=[ApiError(404, "Flow run not found")])
    assert await reporter(client).read_run(RUN, retry=True) is None
    assert len(client.read_calls) == 1


async def test_read_without_retry_returns_at_once() -> None:
    client = ScriptedClient(reads=[ApiUnavailable("down")])
    assert await reporter(client).read_run(RUN, retry=False) is None
    assert len(client.read_calls) == 1


async def test_proposal_keeps_its_transition_id_across_retries() -> None:
    client = ScriptedClient(
        sets=[ApiUnavailable("down"), CredentialsRefused("403"), malformed(), accept()]
    )
    state = {
        "type": "CRASHED",
        "name": "Crashed",
        "message": "Process exited with status 3",
        "state_details": {"transition_id": "t-1"},
    }
    assert await reporter(client).propose(RUN, state, force=False) == "ACCEPT"
    assert len(client.proposals) == 4
    assert {id(s) for _, s, _ in client.proposals} == {id(state)}
    assert state["state_details"] == {"transition_id": "t-1"}


async def test_proposal_gives_up_on_a_definite_answer() -> None:
    client = ScriptedClient(sets=[ApiError(409, "conflict")])
    state = {"type": "CRASHED", "name": "Crashed", "message": "m", "state_details": {}}
    assert await reporter(client).propose(RUN, state, force=False) is None
    assert len(client.proposals) == 1


async def test_crash_after_an_outage_unless_the_engine_reported() -> None:
    client = ScriptedClient(reads=[ApiUnavailable("down"), flow_run("RUNNING")], sets=[accept()])
    await reporter(client).crash_if_running(RUN, "Process exited with status 1")
    [(run_id, state, force)] = client.proposals
    assert (run_id, state["type"], state["message"], force) == (
        RUN,
        "CRASHED",
        "Process exited with status 1",
        False,
    )

    completed = ScriptedClient(reads=[ApiUnavailable("down"), flow_run("COMPLETED")])
    await reporter(completed).crash_if_running(RUN, "Process exited with status 0")
    assert completed.proposals == []


def flow_run_named(state_type: str, name: str, policy: dict[str, Any] | None = None) -> FlowRun:
    return FlowRun.model_validate(
        {
            "id": str(RUN),
            "state": {"type": state_type, "name": name},
            "empirical_policy": policy or {},
        }
    )


@pytest.mark.parametrize(
    ("current", "outcome"),
    [
        (flow_run_named("RUNNING", "Running"), CrashOutcome.CRASHED),
        (flow_run_named("PENDING", "Pending"), CrashOutcome.CRASHED),
        # The engine that would retry in its own process is gone: nobody else will run it.
        (
            flow_run_named("SCHEDULED", "AwaitingRetry", {"retry_type": "in_process"}),
            CrashOutcome.CRASHED,
        ),
        (flow_run_named("PAUSED", "Suspended"), CrashOutcome.LEFT_ALONE),
        (flow_run_named("SCHEDULED", "Resuming"), CrashOutcome.LEFT_ALONE),
        # Prefect keeps `retry_type` in_process after a retry, through a suspend and resume.
        (
            flow_run_named("SCHEDULED", "Resuming", {"retry_type": "in_process"}),
            CrashOutcome.LEFT_ALONE,
        ),
        (
            flow_run_named("SCHEDULED", "AwaitingRetry", {"retry_type": "reschedule"}),
            CrashOutcome.LEFT_ALONE,
        ),
        (flow_run_named("CANCELLING", "Cancelling"), CrashOutcome.LEFT_ALONE),
        (flow_run_named("FAILED", "Failed"), CrashOutcome.LEFT_ALONE),
    ],
    ids=[
        "running",
        "pending",
        "in-process-retry",
        "suspended",
        "resuming",
        "resuming-after-an-in-process-retry",
        "rescheduled-retry",
        "cancelling",
        "failed",
    ],
)
async def test_only_runs_left_in_flight_are_crashed(
    current: FlowRun, outcome: CrashOutcome
) -> None:
    client = ScriptedClient(reads=[current], sets=[accept()])
    report = await reporter(client).crash_if_running(RUN, "Process exited with status 0")
    assert report.outcome is outcome
    crashed = [state["type"] for _, state, _ in client.proposals]
    assert crashed == (["CRASHED"] if outcome is CrashOutcome.CRASHED else [])


async def test_a_delivery_that_gets_through_wakes_the_others() -> None:
    """Once the API answers one delivery, the others retry now, not after their backoff."""

    async def forever(_delay: float) -> None:
        await asyncio.Event().wait()

    first = asyncio.Event()
    client = ScriptedClient(reads=[ApiUnavailable("down"), flow_run("RUNNING")])
    shared = Reporter(client, sleep=forever)  # type: ignore[arg-type]

    async def waiting_read() -> FlowRun | None:
        first.set()
        return await shared.read_run(RUN, retry=True)

    task = asyncio.ensure_future(waiting_read())
    await first.wait()
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(client.read_calls) == 1 and not task.done()  # in its (endless) backoff
    shared.api_answered()
    result = await asyncio.wait_for(task, timeout=2)
    assert result is not None and len(client.read_calls) == 2


async def test_a_successful_read_of_another_run_is_the_wake_up() -> None:
    async def forever(_delay: float) -> None:
        await asyncio.Event().wait()

    client = ScriptedClient(reads=[ApiUnavailable("down")])
    shared = Reporter(client, sleep=forever)  # type: ignore[arg-type]
    task = asyncio.ensure_future(shared.read_run(RUN, retry=True))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()
    client.reads += [flow_run("RUNNING", OTHER), flow_run("RUNNING")]
    assert await shared.read_run(OTHER, retry=False) is not None
    result = await asyncio.wait_for(task, timeout=2)
    assert result is not None and result.id == RUN
