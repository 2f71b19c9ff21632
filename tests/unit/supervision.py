"""A run's supervisor over the shared fakes (tests/unit/fakes/), for the supervisor's and the
outcomes' tests: `make_settings`, `supervise`, `proposed_types`."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from agent import recovery
from agent.api import PrefectClient
from agent.flowlogs import FlowRunLogs
from agent.pools import RECORD_KEY, PoolRun
from agent.records import RunRecord, RunRecords
from agent.reporting import Reporter
from agent.schemas import FlowRun
from agent.settings import load_settings
from agent.storage import Storage
from agent.supervisor import RunContext, Supervisor
from agent.workspace import Workspaces
from tests.unit.fakes import FakeEngines, FakeHooks, FakeLauncher, FakePrefect

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


def make_settings(tmp_path: Path, extra_agent: str = "") -> Any:
    """The unit config; `extra_agent` is added to its [agent] table."""
    config = tmp_path / "agent.toml"
    text = CONFIG.format(state=tmp_path / "state", run=tmp_path / "run", code=tmp_path)
    config.write_text(text.replace("[agent]\n", f"[agent]\n{extra_agent}\n", 1))
    config.chmod(0o600)
    return load_settings(config, {})


async def supervise(
    settings: Any,
    server: FakePrefect,
    launcher: FakeLauncher,
    *,
    record: RunRecord | None = None,
    before: Any = None,
    hooks: FakeHooks | None = None,
    engines: FakeEngines | None = None,
    control: Any = None,
    on_cancelled: Any = None,
    pool_run: PoolRun | None = None,
) -> tuple[Supervisor, RunRecords]:
    transport = server.transport()
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
        deployment = pool_run.deployment if pool_run is not None else settings.deployments[0]
        supervisor = Supervisor(ctx, server.run_id, deployment, flow_run=flow_run)
        if pool_run is not None:
            supervisor.pool_run = pool_run
            supervisor.record.extra = {RECORD_KEY: pool_run.to_record()}
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


def proposed_types(server: FakePrefect) -> list[str]:
    return server.proposed_types()
