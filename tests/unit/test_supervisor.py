"""A run's life with a fake API (httpx.MockTransport) and a fake launcher: every claim answer,
launch failures, exit reporting, cancellation and recovery from records."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest

from agent import recovery
from agent.api import PrefectClient
from agent.flowlogs import FlowRunLogs
from agent.launch.base import LaunchError, LaunchRequest
from agent.records import RunRecord, RunRecords
from agent.reporting import Reporter
from agent.schemas import FlowRun
from agent.settings import load_settings
from agent.storage import Storage
from agent.supervisor import Phase, RunContext, Supervisor
from agent.workspace import Workspaces
from tests.unit.fakes import FakeEngines, FakeHooks


class FakeServer:
    """Answers the endpoints a supervisor uses; records every request body."""

    def __init__(
        self,
        run_id: UUID,
        *,
        state: str = "SCHEDULED",
        claim_answers: list[dict[str, Any]] | None = None,
    ) -> None:
        self.run_id = run_id
        self.state: dict[str, Any] = {"type": state, "name": state.title(), "message": None}
        self.claim_answers = list(claim_answers or [])
        self.proposals: list[dict[str, Any]] = []
        self.logs: list[dict[str, Any]] = []

    def run_body(self) -> dict[str, Any]:
        return {
            "id": str(self.run_id),
            "name": "brave-otter",
            "flow_id": str(uuid4()),
            "deployment_id": str(uuid4()),
            "tags": [],
            "state": self.state,
        }

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "GET" and path.endswith(f"/flow_runs/{self.run_id}"):
            return httpx.Response(200, json=self.run_body())
        if path.endswith("/set_state"):
            body = json.loads(request.content)
            self.proposals.append(body)
            proposed = body["state"]
            if proposed["type"] == "PENDING" and self.claim_answers:
                answer = self.claim_answers.pop(0)

            else:
                answer = {"status": "ACCEPT", "details": {}}
            if answer["status"] in ("ACCEPT", "APPLIED-BUT-ERROR"):
                self.state = {k: proposed.get(k) for k in ("type", "name", "message")}
            if answer["status"] == "APPLIED-BUT-ERROR":
                # The server applied it, the answer went wrong: the outcome must be re-read.
                return httpx.Response(409, json={"detail": "answer mangled on the way"})
            return httpx.Response(201, json={**answer, "state": self.state})
        if path.endswith("/logs/"):
            self.logs.extend(json.loads(request.content))
            return httpx.Response(201, json=None)
        return httpx.Response(404, json={"detail": f"unexpected {request.method} {path}"})


@dataclass
class FakeHandle:
    flow_run_id: UUID
    unit: str | None
    pid: int | None
    status: int = 0
    released: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait(self) -> int:
        await self.released.wait()
        return self.status


class FakeLauncher:
    name = "fake"

    def __init__(
        self,
        *,
        status: int = 0,
        result: str | None = None,
        fail: str | None = None,
        finish_at_once: bool = True,
        engine: Any = None,
    ) -> None:
        self.engine = engine  # what the fake engine reports to the server while it runs
        self.status = status
        self.result = result
        self.fail = fail
        self.finish_at_once = finish_at_once
        self.requests: list[LaunchRequest] = []
        self.calls: list[str] = []
        self.handle: FakeHandle | None = None

    async def launch(self, request: LaunchRequest) -> FakeHandle:
        self.requests.append(request)
        if self.fail:
            raise LaunchError(self.fail)
        if self.engine is not None:
            self.engine()
        self.handle = FakeHandle(
            request.flow_run_id, f"unit-{request.flow_run_id}", None, self.status
        )
        if self.finish_at_once:
            self.handle.released.set()
        return self.handle

    async def terminate(self, handle: Any) -> None:
        self.calls.append("terminate")
        handle.status = 143
        handle.released.set()

    async def kill(self, handle: Any) -> None:
        self.calls.append("kill")

    async def unit_result(self, handle: Any) -> str | None:
        return self.result

    def read_exit_record(self, run_dir: Path) -> int | None:
        path = run_dir / "exit-status"
        return int(path.read_text()) if path.exists() else None


CONFIG = """
[agent]
name = "unit-agent"
state_dir = "{state}"
runtime_dir = "{run}"
cancel_grace = "1s"

[flow_run]
python = "/opt/venv/bin/python"
memory_max = "512M"

[[deployment]]
name = "hello"
entrypoint = "flow.py:hello"
path = "{code}"
"""


@pytest.fixture
def settings(tmp_path: Path) -> Any:
    config = tmp_path / "agent.toml"
    config.write_text(CONFIG.format(state=tmp_path / "state", run=tmp_path / "run", code=tmp_path))
    config.chmod(0o600)
    return load_settings(config, {})


async def supervise(
    settings: Any,
    server: FakeServer,
    launcher: FakeLauncher,
    *,
    record: RunRecord | None = None,
    before: Any = None,
    hooks: FakeHooks | None = None,
    engines: FakeEngines | None = None,
) -> tuple[Supervisor, RunRecords]:
    transport = httpx.MockTransport(server.handler)
    client = PrefectClient(settings.api, transport=transport, max_attempts=1)
    async with client, FlowRunLogs(client.create_logs, flush_interval=0.01) as logs:
        records = RunRecords(settings.agent.state_dir)
        ctx = RunContext(
            settings=settings,
            client=client,
            launcher=launcher,  # type: ignore[arg-type]
            flow_logs=logs,
            records=records,
            reporter=Reporter(client, sleep=_no_sleep),
            workspaces=Workspaces(lambda: settings, Storage(settings.agent.state_dir)),
            engines=engines or FakeEngines(),  # type: ignore[arg-type]
            hooks=hooks or FakeHooks(),  # type: ignore[arg-type]
        )
        flow_run = FlowRun.model_validate(server.run_body())
        supervisor = Supervisor(ctx, server.run_id, settings.deployments[0], flow_run=flow_run)
        if record is not None:
            work = asyncio.ensure_future(recovery.resume(supervisor, record))
        else:
            work = asyncio.ensure_future(supervisor.run())
        if before is not None:
            await before(supervisor, launcher)
        await asyncio.wait_for(work, timeout=10)
        await logs.flush()
    return supervisor, records


async def _no_sleep(_: float) -> None:
    await asyncio.sleep(0)


def proposed_types(server: FakeServer) -> list[str]:
    return [p["state"]["type"] for p in server.proposals]


async def test_accept_launches_with_the_exact_request(settings: Any) -> None:
    server = FakeServer(uuid4())
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
    server = FakeServer(uuid4(), claim_answers=[{"status": "APPLIED-BUT-ERROR"}])
    launcher = FakeLauncher(status=0)
    await supervise(settings, server, launcher)
    assert proposed_types(server) == ["PENDING", "CRASHED"]  # one claim; exit 0 without a state
    assert len(launcher.requests) == 1
    messages = [entry["message"] for entry in server.logs]
    assert any(m.startswith("Claimed by runner-agent 'unit-agent' on host") for m in messages)


@pytest.mark.parametrize("status", ["REJECT", "ABORT"])
async def test_reject_and_abort_skip_the_run(settings: Any, status: str) -> None:
    server = FakeServer(uuid4(), claim_answers=[{"status": status, "details": {"reason": "taken"}}])
    launcher = FakeLauncher()
    await supervise(settings, server, launcher)
    assert launcher.requests == []
    assert proposed_types(server) == ["PENDING"]


async def test_wait_retries_the_claim(settings: Any) -> None:
    server = FakeServer(
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
    server = FakeServer(uuid4(), state="CANCELLING")
    launcher = FakeLauncher()
    await supervise(settings, server, launcher)
    assert launcher.requests == []
    assert proposed_types(server) == ["CANCELLED"]
    assert server.proposals[0]["force"] is True


async def test_nonzero_exit_of_a_running_run_is_crashed_with_the_reason(settings: Any) -> None:
    server = FakeServer(uuid4())
    launcher = FakeLauncher(status=137, result="oom-kill")
    await supervise(settings, server, launcher)
    assert proposed_types(server) == ["PENDING", "CRASHED"]
    message = server.proposals[1]["state"]["message"]
    assert "137" in message and "MemoryMax=512M" in message


async def test_final_state_from_the_engine_is_not_overwritten(settings: Any) -> None:
    server = FakeServer(uuid4())
    launcher = FakeLauncher(status=1, finish_at_once=False)

    async def engine_reports_failed(supervisor: Supervisor, launcher: FakeLauncher) -> None:
        while launcher.handle is None:
            await asyncio.sleep(0.01)
        server.state = {"type": "FAILED", "name": "Failed", "message": "boom"}
        launcher.handle.released.set()

    await supervise(settings, server, launcher, before=engine_reports_failed)
    assert proposed_types(server) == ["PENDING"]


async def test_launch_failure_is_crashed_never_left_pending(settings: Any) -> None:
    server = FakeServer(uuid4())
    launcher = FakeLauncher(fail="command not found: /opt/venv/bin/python")
    await supervise(settings, server, launcher)
    assert proposed_types(server) == ["PENDING", "CRASHED"]
    assert server.proposals[1]["state"]["message"] == "command not found: /opt/venv/bin/python"


async def test_cancellation_of_a_running_run_kills_and_marks_cancelled(settings: Any) -> None:
    server = FakeServer(uuid4())
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
    server = FakeServer(run_id, state="PENDING")
    server.state["message"] = "Claimed by runner-agent 'unit-agent'"
    record = RunRecord(flow_run_id=str(run_id), deployment="hello", phase="claiming")
    launcher = FakeLauncher(status=0)
    await supervise(settings, server, launcher, record=record)
    assert len(launcher.requests) == 1
    # No new claim (it is ours already); the fake engine reports nothing, so the exit is.
    assert proposed_types(server) == ["CRASHED"]
    assert "status 0" in server.proposals[0]["state"]["message"]


async def test_recovery_does_not_launch_someone_elses_claim(settings: Any) -> None:
    run_id = uuid4()
    server = FakeServer(run_id, state="PENDING")
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
    server = FakeServer(run_id, state="RUNNING")
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
    server = FakeServer(uuid4())
    start = datetime.now(UTC) + timedelta(seconds=0.6)
    body = server.run_body()
    server.run_body = lambda: {**body, "next_scheduled_start_time": start.isoformat()}  # type: ignore[method-assign]
    launcher = FakeLauncher()
    await supervise(settings, server, launcher)
    assert datetime.now(UTC) >= start
    assert len(launcher.requests) == 1


async def test_a_limit_kill_replaces_the_engines_own_crash_message(settings: Any) -> None:
    server = FakeServer(uuid4())
    engine_crash = {"type": "CRASHED", "name": "Crashed",
                    "message": "Execution was aborted by a termination signal."}
    launcher = FakeLauncher(status=137, result="oom-kill",
                            engine=lambda: setattr(server, "state", engine_crash))
    await supervise(settings, server, launcher)
    assert proposed_types(server) == ["PENDING", "CRASHED"]
    assert server.proposals[1]["force"] is True
    assert "MemoryMax=512M" in server.proposals[1]["state"]["message"]


async def test_an_engine_crash_without_a_limit_is_kept(settings: Any) -> None:
    server = FakeServer(uuid4())
    engine_crash = {"type": "CRASHED", "name": "Crashed", "message": "engine's own reason"}
    launcher = FakeLauncher(status=1, engine=lambda: setattr(server, "state", engine_crash))
    await supervise(settings, server, launcher)
    assert proposed_types(server) == ["PENDING"]
