"""A run's life with a fake API (httpx.MockTransport) and a fake launcher: every claim answer,
launch failures, exit reporting, cancellation and recovery from records."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from agent.records import RunRecord
from agent.supervisor import Phase, Supervisor
from tests.unit.fakes import FakeLauncher, FakePrefect
from tests.unit.supervision import make_settings, proposed_types, supervise


@pytest.fixture
def settings(tmp_path: Path) -> Any:
    return make_settings(tmp_path)


async def test_accept_launches_with_the_exact_request(settings: Any) -> None:
    server = FakePrefect(uuid4())
    completed = {"type": "COMPLETED", "name": "Completed", "message": None}
    launcher = FakeLauncher(status=0, engine=lambda: setattr(server, "state", completed))
    supervisor, records = await supervise(settings, server, launcher)
    assert proposed_types(server) == ["PENDING"]
    claim = server.proposals[0]
    assert claim["force"] is False
    assert claim["state"]["message"] == "Claimed by runner-agent 'unit-agent'"
    assert claim["state"]["state_details"]["transition_id"]
    request = launcher.requests[0]
    assert request.python == "/opt/venv/bin/python"
    assert request.memory_max == 512 * 1024**2
    assert request.env["PREFECT__FLOW_RUN_ID"] == str(server.run_id)
    assert request.env["TMPDIR"].endswith(f"runs/{server.run_id}/tmp")
    # Reads the venv's compiled bytecode, writes none into a shared checkout.
    assert request.env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert "PYTHONPYCACHEPREFIX" not in request.env
    assert request.env["PREFECT_CLIENT_MAX_RETRIES"] == "7"
    assert supervisor.phase is Phase.DONE
    assert records.all() == []  # forgotten once reported
    messages = [entry["message"] for entry in server.logs]
    assert any(m.startswith("Claimed by runner-agent 'unit-agent' on host") for m in messages)
    assert any("MemoryMax=512M" in m for m in messages)


async def test_a_claim_applied_despite_an_error_answer_is_launched_and_noted(
    settings: Any,
) -> None:
    server = FakePrefect(uuid4(), claim_answers=[{"status": "APPLIED-BUT-ERROR"}])
    launcher = FakeLauncher(status=0)
    await supervise(settings, server, launcher)
    # The claim, its repeat (REJECTed as a duplicate: the claim stood), the crash (exit 0, no
    # final state).
    assert proposed_types(server) == ["PENDING", "PENDING", "CRASHED"]
    claims = [p["state"]["state_details"]["transition_id"] for p in server.proposals[:2]]
    assert claims[0] == claims[1]
    assert len(launcher.requests) == 1
    messages = [entry["message"] for entry in server.logs]
    assert any(m.startswith("Claimed by runner-agent 'unit-agent' on host") for m in messages)


@pytest.mark.parametrize("status", ["REJECT", "ABORT"])
async def test_reject_and_abort_skip_the_run(settings: Any, status: str) -> None:
    server = FakePrefect(
        uuid4(), claim_answers=[{"status": status, "details": {"reason": "taken"}}]
    )
    launcher = FakeLauncher()
    await supervise(settings, server, launcher)
    assert launcher.requests == []
    assert proposed_types(server) == ["PENDING"]


async def test_wait_retries_the_claim(settings: Any) -> None:
    server = FakePrefect(
        uuid4(),
        claim_answers=[
            {"status": "WAIT", "details": {"delay_seconds": 0.05}},
            {"status": "ACCEPT", "details": {}},
        ],
    )
    launcher = FakeLauncher()
    await supervise(settings, server, launcher)
    assert proposed_types(server)[:2] == ["PENDING", "PENDING"]
    assert len(launcher.requests) == 1


async def test_cancelling_before_launch_is_cancelled_and_never_launched(settings: Any) -> None:
    server = FakePrefect(uuid4(), state="CANCELLING")
    launcher = FakeLauncher()
    await supervise(settings, server, launcher)
    assert launcher.requests == []
    assert proposed_types(server) == ["CANCELLED"]
    assert server.proposals[0]["force"] is True


async def test_nonzero_exit_of_a_running_run_is_crashed_with_the_reason(settings: Any) -> None:
    server = FakePrefect(uuid4())
    launcher = FakeLauncher(status=137, result="oom-kill")
    await supervise(settings, server, launcher)
    assert proposed_types(server) == ["PENDING", "CRASHED"]
    message = server.proposals[1]["state"]["message"]
    assert "137" in message and "MemoryMax=512M" in message


async def test_final_state_from_the_engine_is_not_overwritten(settings: Any) -> None:
    server = FakePrefect(uuid4())
    launcher = FakeLauncher(status=1, finish_at_once=False)

    async def engine_reports_failed(supervisor: Supervisor, launcher: FakeLauncher) -> None:
        while launcher.handle is None:
            await asyncio.sleep(0.01)
        server.state = {"type": "FAILED", "name": "Failed", "message": "boom"}
        launcher.handle.released.set()

    await supervise(settings, server, launcher, before=engine_reports_failed)
    assert proposed_types(server) == ["PENDING"]


async def test_launch_failure_is_crashed_never_left_pending(settings: Any) -> None:
    server = FakePrefect(uuid4())
    launcher = FakeLauncher(fail="command not found: /opt/venv/bin/python")
    await supervise(settings, server, launcher)
    assert proposed_types(server) == ["PENDING", "CRASHED"]
    assert server.proposals[1]["state"]["message"] == "command not found: /opt/venv/bin/python"


async def test_cancellation_of_a_running_run_kills_and_marks_cancelled(settings: Any) -> None:
    server = FakePrefect(uuid4())
    launcher = FakeLauncher(finish_at_once=False)

    async def cancel_when_running(supervisor: Supervisor, launcher: FakeLauncher) -> None:
        while supervisor.phase is not Phase.RUNNING:
            await asyncio.sleep(0.01)
        # The engine answers SIGTERM with Crashed; that is replaced by Cancelled.
        server.state = {"type": "CRASHED", "name": "Crashed", "message": "SIGTERM"}
        supervisor.request_cancel()

    await supervise(settings, server, launcher, before=cancel_when_running)
    assert launcher.calls == ["terminate", "kill"]
    assert proposed_types(server) == ["PENDING", "CANCELLED"]
    assert server.proposals[1]["force"] is True
    assert server.proposals[1]["state"]["message"] == "Flow run was cancelled successfully."


async def test_recovery_launches_a_run_claimed_but_never_started(settings: Any) -> None:
    run_id = uuid4()
    server = FakePrefect(run_id, state="PENDING")
    server.state["message"] = "Claimed by runner-agent 'unit-agent'"
    record = RunRecord(flow_run_id=str(run_id), deployment="hello", phase="claiming")
    launcher = FakeLauncher(status=0)
    await supervise(settings, server, launcher, record=record)
    assert len(launcher.requests) == 1
    # No new claim (it is ours already); the fake engine reports nothing, so the exit is.
    assert proposed_types(server) == ["CRASHED"]
    assert "status 0" in server.proposals[0]["state"]["message"]


async def test_recovery_claims_anew_a_run_whose_claim_was_in_flight(settings: Any) -> None:
    """Killed while its claim was in flight, and the server still shows SCHEDULED: that claim
    may yet be committed (a busy server commits late), so the run is claimed anew, not dropped
    to be left PENDING by the late commit."""
    run_id = uuid4()
    server = FakePrefect(run_id, state="SCHEDULED")
    record = RunRecord(flow_run_id=str(run_id), deployment="hello", phase="claiming")
    launcher = FakeLauncher(status=0)
    _, records = await supervise(settings, server, launcher, record=record)
    assert len(launcher.requests) == 1
    assert proposed_types(server) == ["PENDING", "CRASHED"]  # exit 0 without a final state
    assert server.proposals[0]["state"]["message"] == "Claimed by runner-agent 'unit-agent'"
    assert records.all() == []


async def test_recovery_does_not_launch_someone_elses_claim(settings: Any) -> None:
    run_id = uuid4()
    server = FakePrefect(run_id, state="PENDING")
    server.state["message"] = "Claimed by runner-agent 'other-host'"
    record = RunRecord(flow_run_id=str(run_id), deployment="hello", phase="claiming")
    launcher = FakeLauncher()
    _, records = await supervise(settings, server, launcher, record=record)
    assert launcher.requests == []
    assert records.all() == []


async def test_recovery_reports_a_run_that_exited_while_the_agent_was_away(
    settings: Any, tmp_path: Path
) -> None:
    run_id = uuid4()
    server = FakePrefect(run_id, state="RUNNING")
    run_dir = tmp_path / "exited-run"
    run_dir.mkdir()
    (run_dir / "exit-status").write_text("3\n")
    record = RunRecord(
        flow_run_id=str(run_id),
        deployment="hello",
        phase="running",
        pid=2**22 + 7,
        run_dir=str(run_dir),
    )
    launcher = FakeLauncher()
    await supervise(settings, server, launcher, record=record)
    assert launcher.requests == []
    assert proposed_types(server) == ["CRASHED"]
    assert "status 3" in server.proposals[0]["state"]["message"]


async def test_waits_for_the_scheduled_start(settings: Any) -> None:
    server = FakePrefect(uuid4())
    start = datetime.now(UTC) + timedelta(seconds=0.6)
    body = server.run_body()
    server.run_body = lambda: {**body, "next_scheduled_start_time": start.isoformat()}  # type: ignore[method-assign]
    launcher = FakeLauncher()
    await supervise(settings, server, launcher)
    assert datetime.now(UTC) >= start
    assert len(launcher.requests) == 1


async def test_a_limit_kill_replaces_the_engines_own_crash_message(settings: Any) -> None:
    server = FakePrefect(uuid4())
    engine_crash = {
        "type": "CRASHED",
        "name": "Crashed",
        "message": "Execution was aborted by a termination signal.",
    }
    launcher = FakeLauncher(
        status=137, result="oom-kill", engine=lambda: setattr(server, "state", engine_crash)
    )
    await supervise(settings, server, launcher)
    assert proposed_types(server) == ["PENDING", "CRASHED"]
    assert server.proposals[1]["force"] is True
    assert "MemoryMax=512M" in server.proposals[1]["state"]["message"]


async def test_an_engine_crash_without_a_limit_is_kept(settings: Any) -> None:
    server = FakePrefect(uuid4())
    engine_crash = {"type": "CRASHED", "name": "Crashed", "message": "engine's own reason"}
    launcher = FakeLauncher(status=1, engine=lambda: setattr(server, "state", engine_crash))
    await supervise(settings, server, launcher)
    assert proposed_types(server) == ["PENDING"]
