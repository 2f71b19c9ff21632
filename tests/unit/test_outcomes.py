"""How a run's story ends: which state the agent reports, which hooks it runs, and when.

Driven through a real Supervisor with fakes for the server, the launcher, the engine probe, the
hook runner and the control channel (tests/unit/fakes/, test_supervisor.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest

from agent.control_protocol import (
    AcknowledgedIntent,
    ControlEndpoint,
    Disposition,
    EngineReceipt,
    ReportedState,
    SignalResult,
)
from agent.hooks import HookKind
from agent.records import RunRecord
from agent.supervisor import Phase, Supervisor
from tests.unit.fakes import LEGACY, FakeEngines, FakeHooks, FakeLauncher, FakePrefect
from tests.unit.supervision import make_settings, proposed_types, supervise


@pytest.fixture
def settings(tmp_path: Path) -> Any:
    return make_settings(tmp_path)


class FakeControl:
    """A control channel whose engine answers `signal` with `answer`."""

    def __init__(self, answer: SignalResult = SignalResult.ACKNOWLEDGED, conclusion: Any = None):
        self.answer = answer
        self.conclusion_value = conclusion
        self.registered: list[UUID] = []
        self.signals: list[str] = []

    def register(self, flow_run_id: UUID) -> ControlEndpoint:
        self.registered.append(flow_run_id)
        return ControlEndpoint(40123, "t0ken")

    async def signal(self, flow_run_id: UUID, intent: str) -> SignalResult:
        self.signals.append(intent)
        if self.answer is SignalResult.ACKNOWLEDGED:
            self.conclusion_value = AcknowledgedIntent("cancel")
        return self.answer

    def unregister(self, flow_run_id: UUID) -> Any:
        return self.conclusion_value


def running_then(server: FakePrefect, **state: Any) -> Any:
    """An engine that sets RUNNING at launch (and then `state`, if given)."""

    def engine() -> None:
        server.state = {"type": "RUNNING", "name": "Running", "message": None}
        if state:
            server.state = {"message": None, **state}

    return engine


async def cancel_when_running(supervisor: Supervisor, launcher: FakeLauncher) -> None:
    while supervisor.phase is not Phase.RUNNING:
        await asyncio.sleep(0.01)
    supervisor.request_cancel()


async def test_a_crash_the_engine_could_not_report_runs_on_crashed_once(settings: Any) -> None:
    server = FakePrefect(uuid4())
    hooks = FakeHooks()
    launcher = FakeLauncher(status=3, engine=running_then(server))
    await supervise(settings, server, launcher, hooks=hooks)
    assert proposed_types(server) == ["PENDING", "CRASHED"]
    assert hooks.kinds() == [HookKind.CRASHED]
    _, request, entrypoint = hooks.ran[0]
    assert entrypoint == "flow.py:hello"
    assert request.python == "/opt/venv/bin/python"  # the run's own interpreter and limits
    assert request.memory_max == 512 * 1024**2


async def test_an_engine_reported_crash_keeps_its_hooks_to_the_engine(settings: Any) -> None:
    server = FakePrefect(uuid4())
    hooks = FakeHooks()
    launcher = FakeLauncher(status=143, engine=running_then(server, type="CRASHED", name="Crashed"))
    await supervise(settings, server, launcher, hooks=hooks)
    assert proposed_types(server) == ["PENDING"]
    assert hooks.ran == []


async def test_a_suspended_run_is_left_alone(settings: Any) -> None:
    server = FakePrefect(uuid4())
    hooks = FakeHooks()
    launcher = FakeLauncher(status=0, engine=running_then(server, type="PAUSED", name="Suspended"))
    await supervise(settings, server, launcher, hooks=hooks)
    assert proposed_types(server) == ["PENDING"]
    assert hooks.ran == []


async def test_an_engine_receipt_means_nothing_to_add(settings: Any) -> None:
    server = FakePrefect(uuid4())
    receipt = EngineReceipt(Disposition.STATE_REPORTED, ReportedState(uuid4(), "FAILED", "Failed"))
    control = FakeControl(conclusion=receipt)
    # Exit 1 with the run still RUNNING on the server: without the receipt this is a crash.
    launcher = FakeLauncher(status=1, engine=running_then(server))
    await supervise(settings, server, launcher, control=control)
    assert proposed_types(server) == ["PENDING"]


async def test_an_acknowledged_cancel_is_cancelled_once_the_process_ended(settings: Any) -> None:
    server = FakePrefect(uuid4())
    control = FakeControl(SignalResult.ACKNOWLEDGED)
    hooks = FakeHooks()
    cancelled: list[UUID] = []
    launcher = FakeLauncher(finish_at_once=False, engine=running_then(server))
    states_at_terminate: list[list[str]] = []
    states_at_exit: list[list[str]] = []
    states_at_hooks: list[list[str]] = []
    exits: list[asyncio.Task[None]] = []

    async def terminate(handle: Any) -> None:
        launcher.calls.append("terminate")
        states_at_terminate.append(proposed_types(server))

        async def exit_later() -> None:
            # The acknowledged engine takes its time (about 2 s for a real one) to exit 0,
            # and sends its own heartbeats until its flow has unwound.
            await asyncio.sleep(0.2)
            states_at_exit.append(proposed_types(server))
            handle.status = 0
            handle.released.set()

        exits.append(asyncio.ensure_future(exit_later()))

    real_hooks_run = hooks.run

    async def run_hooks(*args: Any, **kwargs: Any) -> Any:
        states_at_hooks.append(proposed_types(server))
        return await real_hooks_run(*args, **kwargs)

    launcher.terminate = terminate  # type: ignore[method-assign]
    hooks.run = run_hooks  # type: ignore[method-assign]
    await supervise(
        settings,
        server,
        launcher,
        control=control,
        hooks=hooks,
        before=cancel_when_running,
        on_cancelled=lambda sup: cancelled.append(sup.id),
    )
    assert control.signals == ["cancel"]
    assert states_at_terminate == [["PENDING"]]
    # No CANCELLED while the engine lives (it could still beat), but before the hooks run.
    assert states_at_exit == [["PENDING"]]
    assert states_at_hooks == [["PENDING", "CANCELLED"]]
    assert proposed_types(server) == ["PENDING", "CANCELLED"]
    assert hooks.kinds() == [HookKind.CANCELLATION]  # once, after the process ended
    assert cancelled == [server.run_id]
    # The engine got the control channel in its environment, and only it did.
    request = launcher.requests[0]
    assert request.env["PREFECT__CONTROL_PORT"] == "40123"
    assert request.env["PREFECT__CONTROL_TOKEN"] == "t0ken"
    assert request.env["PREFECT__ENABLE_CANCELLATION_AND_CRASHED_HOOKS"] == "false"
    assert request.env["PREFECT__DEPLOYMENT_NAME"] == "hello"
    # Set, Prefect 3.8 looks for a path-less (git) deployment's code in a directory "None".
    assert "PREFECT__STORAGE_BASE_PATH" not in request.env


async def test_an_unacknowledged_cancel_falls_back_to_signals(settings: Any) -> None:
    server = FakePrefect(uuid4())
    control = FakeControl(SignalResult.NOT_ACKNOWLEDGED)
    hooks = FakeHooks()
    cancelled: list[UUID] = []

    def engine() -> None:
        # What a 3.8.8 engine does on a bare SIGTERM: it reports Crashed itself.
        server.state = {"type": "CRASHED", "name": "Crashed", "message": "terminated"}

    launcher = FakeLauncher(finish_at_once=False, engine=running_then(server))
    real_terminate = launcher.terminate

    async def terminate(handle: Any) -> None:
        engine()
        await real_terminate(handle)

    launcher.terminate = terminate  # type: ignore[method-assign]
    await supervise(
        settings,
        server,
        launcher,
        control=control,
        hooks=hooks,
        before=cancel_when_running,
        on_cancelled=lambda sup: cancelled.append(sup.id),
    )
    assert launcher.calls == ["terminate", "kill"]
    assert proposed_types(server) == ["PENDING", "CANCELLED"]
    assert server.proposals[1]["force"] is True
    assert hooks.kinds() == [HookKind.CANCELLATION]
    assert cancelled == [server.run_id]


async def test_an_old_engine_gets_no_control_channel(settings: Any) -> None:
    server = FakePrefect(uuid4())
    control = FakeControl()
    launcher = FakeLauncher(status=0, engine=running_then(server, type="COMPLETED"))
    await supervise(settings, server, launcher, control=control, engines=FakeEngines(LEGACY))
    assert control.registered == []
    assert "PREFECT__CONTROL_TOKEN" not in launcher.requests[0].env


async def test_a_refused_cancelled_proposal_sends_no_event(settings: Any) -> None:
    server = FakePrefect(uuid4(), state="CANCELLING")
    original = server.handler

    def refuse_cancelled(request: Any) -> Any:
        if request.url.path.endswith("/set_state") and b"CANCELLED" in request.content:
            import httpx

            return httpx.Response(201, json={"status": "REJECT", "details": {}})
        return original(request)

    server.handler = refuse_cancelled  # type: ignore[method-assign]
    cancelled: list[UUID] = []
    await supervise(
        settings, server, FakeLauncher(), on_cancelled=lambda sup: cancelled.append(sup.id)
    )
    assert cancelled == []


async def test_hooks_that_started_before_a_restart_are_not_run_again(settings: Any) -> None:
    run_id = uuid4()
    server = FakePrefect(run_id, state="CANCELLING")
    hooks = FakeHooks()
    record = RunRecord(
        flow_run_id=str(run_id),
        deployment="hello",
        phase="exited",
        exit_status=0,
        extra={"cancel_requested": True, "hooks_started": ["cancellation"]},
    )
    await supervise(settings, server, FakeLauncher(), record=record, hooks=hooks)
    assert hooks.ran == []
    assert proposed_types(server) == ["CANCELLED"]


async def test_a_run_cancelled_as_its_process_ended_is_cancelled_not_crashed(
    settings: Any,
) -> None:
    server = FakePrefect(uuid4())
    hooks = FakeHooks()
    launcher = FakeLauncher(status=143, engine=running_then(server, type="CANCELLING"))
    await supervise(settings, server, launcher, hooks=hooks)
    assert proposed_types(server) == ["PENDING", "CANCELLED"]
    assert hooks.kinds() == [HookKind.CANCELLATION]
