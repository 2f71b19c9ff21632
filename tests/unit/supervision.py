"""A run's supervisor with a fake API (httpx.MockTransport) and a fake launcher, shared by the
supervisor's and the outcomes' tests: `FakeServer`, `FakeLauncher`, `make_settings`, `supervise`."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import httpx

from agent import recovery
from agent.api import PrefectClient
from agent.flowlogs import FlowRunLogs
from agent.launch.base import LaunchError, LaunchRequest
from agent.records import RunRecord, RunRecords
from agent.reporting import Reporter
from agent.schemas import FlowRun
from agent.settings import load_settings
from agent.storage import Storage
from agent.supervisor import RunContext, Supervisor
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
        job_variables: dict[str, Any] | None = None,
    ) -> None:
        self.run_id = run_id
        self.job_variables = job_variables or {}
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
            "job_variables": self.job_variables,
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


def make_settings(tmp_path: Path) -> Any:
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
    control: Any = None,
    on_cancelled: Any = None,
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
            control=control,
            on_cancelled=on_cancelled,
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
