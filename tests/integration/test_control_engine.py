"""The control channel against Prefect's own engine (`python -m prefect.engine`), real server.

Each test starts the engine by hand for a deployment run, as the agent would: PENDING proposed,
the run's id, the server's URL, `PREFECT__ENABLE_CANCELLATION_AND_CRASHED_HOOKS=false` (the
supervisor owns those hooks, as under Prefect's Runner) and the channel's port and token in its
environment. The flows leave a marker file for every hook that runs inside the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.control import ControlChannel
from agent.control_protocol import (
    AcknowledgedIntent,
    ControlEndpoint,
    Disposition,
    EngineReceipt,
    SignalResult,
)
from tests.integration.agent_process import Api
from tests.integration.prefect_server import PrefectServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

FLOWS = """
import os, pathlib, time
from prefect import flow

def marker(name):
    return pathlib.Path(os.environ["MARKER_DIR"], name)

def record(kind):
    def hook(flow, flow_run, state):
        marker(kind).write_text(f"{state.type.value} {state.name}")
    return hook

HOOKS = dict(
    on_cancellation=[record("on_cancellation")],
    on_crashed=[record("on_crashed")],
    on_completion=[record("on_completion")],
)

@flow(**HOOKS)
def sleeper():
    marker("started").write_text("")
    time.sleep(120)

@flow(**HOOKS)
def quick():
    return 42
"""

HISTORY_TIMEOUT = 60.0
ENGINE_START_TIMEOUT = 90.0  # importing prefect and loading the flow on a busy 2-core machine


async def call(api: Api, method: str, url: str, **kwargs: Any) -> Any:
    """Api.request off the event loop, so the channel keeps serving the engine meanwhile."""
    response = await asyncio.to_thread(api.request, method, url, **kwargs)
    response.raise_for_status()
    return response.json() if response.content else None


async def poll(what: str, check: Callable[[], Any], within: float, interval: float = 0.1) -> Any:
    try:
        async with asyncio.timeout(within):
            while not (value := check()):
                await asyncio.sleep(interval)
            return value
    except TimeoutError:
        raise AssertionError(f"timed out after {within:.0f}s waiting for {what}") from None


@dataclass
class Engine:
    flow_run_id: uuid.UUID
    endpoint: ControlEndpoint
    process: asyncio.subprocess.Process
    markers: Path
    log_path: Path

    def marker(self, name: str) -> str | None:
        path = self.markers / name
        return path.read_text() if path.exists() else None

    def hook_markers(self) -> list[str]:
        return sorted(p.name for p in self.markers.iterdir() if p.name.startswith("on_"))

    async def exit_status(self, within: float = 60.0) -> int:
        try:
            async with asyncio.timeout(within):
                return await self.process.wait()
        except TimeoutError:
            raise AssertionError(
                f"engine still running after {within:.0f}s; its log:\n{self.log()}"
            ) from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class EngineStarter:
    server: PrefectServer
    api: Api
    directory: Path

    @contextlib.asynccontextmanager
    async def start(
        self, python: str, entrypoint: str, channel: ControlChannel, name: str
    ) -> AsyncIterator[Engine]:
        """A deployment run for `flows.py:<entrypoint>`, claimed, its engine started."""
        flow = await call(self.api, "POST", "/flows/", json={"name": f"control-{name}"})
        deployment = await call(
            self.api,
            "POST",
            "/deployments/",
            json={
                "name": f"control-{name}-{uuid.uuid4().hex[:8]}",
                "flow_id": flow["id"],
                "path": str(self.directory),
                "entrypoint": f"flows.py:{entrypoint}",
            },
        )
        run = await call(
            self.api, "POST", f"/deployments/{deployment['id']}/create_flow_run", json={}
        )
        claimed = await call(
            self.api,
            "POST",
            f"/flow_runs/{run['id']}/set_state",
            json={"state": {"type": "PENDING", "name": "Pending"}},
        )
        assert claimed["status"] == "ACCEPT", claimed
        flow_run_id = uuid.UUID(run["id"])
        endpoint = channel.register(flow_run_id)
        assert endpoint is not None
        markers = self.directory / f"markers-{flow_run_id}"
        markers.mkdir()
        env = {
            **self.server.env(),
            **endpoint.environment(),
            "PREFECT__FLOW_RUN_ID": str(flow_run_id),
            "PREFECT__ENABLE_CANCELLATION_AND_CRASHED_HOOKS": "false",
            "MARKER_DIR": str(markers),
        }
        log_path = self.directory / f"engine-{flow_run_id}.log"
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                python,
                "-m",
                "prefect.engine",
                cwd=self.directory,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        try:
            yield Engine(flow_run_id, endpoint, process, markers, log_path)
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
            channel.unregister(flow_run_id)

    async def history(self, flow_run_id: uuid.UUID) -> list[dict[str, Any]]:
        states = await call(
            self.api, "GET", "/flow_run_states/", params={"flow_run_id": str(flow_run_id)}
        )
        return sorted(states, key=lambda state: state["timestamp"])

    async def state(self, flow_run_id: uuid.UUID) -> dict[str, Any]:
        run = await call(self.api, "GET", f"/flow_runs/{flow_run_id}")
        return dict(run["state"])

    async def set_state(self, flow_run_id: uuid.UUID, body: dict[str, Any], force: bool) -> str:
        result = await call(
            self.api,
            "POST",
            f"/flow_runs/{flow_run_id}/set_state",
            json={"state": body, "force": force},
        )
        return str(result["status"])


@pytest.fixture
def starter(prefect_server: PrefectServer, api: Api, tmp_path: Path) -> EngineStarter:
    (tmp_path / "flows.py").write_text(FLOWS)
    return EngineStarter(prefect_server, api, tmp_path)


@pytest.fixture
async def channel(caplog: pytest.LogCaptureFixture) -> AsyncIterator[ControlChannel]:
    caplog.set_level(logging.DEBUG, logger="agent.control")
    async with ControlChannel() as channel:
        yield channel


def types(history: list[dict[str, Any]]) -> list[str]:
    return [state["type"] for state in history]


async def test_engine_negotiates_version_two_and_reports_its_final_state(
    starter: EngineStarter,
    channel: ControlChannel,
    prefect_server: PrefectServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with starter.start(prefect_server.python, "quick", channel, "quick") as engine:
        assert await engine.exit_status() == 0, engine.log()
        final = await starter.state(engine.flow_run_id)
        assert final["type"] == "COMPLETED"
        receipt = channel.conclusion(engine.flow_run_id)
        assert isinstance(receipt, EngineReceipt), engine.log()
        assert receipt.disposition is Disposition.STATE_REPORTED
        assert receipt.state is not None
        assert (receipt.state.type, receipt.state.name) == ("COMPLETED", "Completed")
        assert str(receipt.state.id) == final["id"]
        assert await channel.signal(engine.flow_run_id, "cancel") is SignalResult.ALREADY_CONCLUDED
        assert engine.hook_markers() == ["on_completion"]
    messages = [r.getMessage() for r in caplog.records]
    assert "control protocol 2" in messages


async def test_acknowledged_cancel_then_sigterm_leaves_the_state_to_the_supervisor(
    starter: EngineStarter, channel: ControlChannel, prefect_server: PrefectServer
) -> None:
    async with starter.start(prefect_server.python, "sleeper", channel, "cancel") as engine:
        await poll(
            "the flow to start with the engine connected",
            lambda: (
                engine.marker("started") is not None
                and channel.protocol_version(engine.flow_run_id) == 2
            ),
            ENGINE_START_TIMEOUT,
        )
        cancelling = {"type": "CANCELLING", "name": "Cancelling"}
        assert await starter.set_state(engine.flow_run_id, cancelling, force=True) == "ACCEPT"

        assert await channel.signal(engine.flow_run_id, "cancel") is SignalResult.ACKNOWLEDGED
        assert channel.conclusion(engine.flow_run_id) == AcknowledgedIntent("cancel")
        engine.process.send_signal(signal.SIGTERM)
        assert await engine.exit_status() == 0, engine.log()

        # The engine proposed nothing: the run waits in CANCELLING for the supervisor.
        assert (await starter.state(engine.flow_run_id))["type"] == "CANCELLING"
        cancelled = {"type": "CANCELLED", "name": "Cancelled"}
        assert await starter.set_state(engine.flow_run_id, cancelled, force=False) == "ACCEPT"
        history = await starter.history(engine.flow_run_id)
        assert types(history) == ["SCHEDULED", "PENDING", "RUNNING", "CANCELLING", "CANCELLED"]
        assert engine.hook_markers() == []  # on_cancellation is the supervisor's to run


async def test_bare_sigterm_crashes_the_run_inside_the_engine(
    starter: EngineStarter, channel: ControlChannel, prefect_server: PrefectServer
) -> None:
    # What the agent did before the channel, and still does when the engine never connected.
    async with starter.start(prefect_server.python, "sleeper", channel, "bare-sigterm") as engine:
        await poll(
            "the flow to start",
            lambda: engine.marker("started") is not None,
            ENGINE_START_TIMEOUT,
        )
        engine.process.send_signal(signal.SIGTERM)
        assert await engine.exit_status() == -signal.SIGTERM, engine.log()
        history = await starter.history(engine.flow_run_id)
        assert types(history) == ["SCHEDULED", "PENDING", "RUNNING", "CRASHED"]
        assert history[-1]["message"] == "Execution was aborted by a termination signal."
        # Crashes the engine reports stay the engine's: it ran on_crashed despite the setting,
        # and its receipt says so, so a supervisor must not run the hook again.
        assert engine.hook_markers() == ["on_crashed"]
        receipt = channel.conclusion(engine.flow_run_id)
        assert isinstance(receipt, EngineReceipt) and receipt.state is not None
        assert (receipt.state.type, str(receipt.state.id)) == ("CRASHED", history[-1]["id"])


async def test_older_engine_completes_against_the_pinned_server_and_ignores_the_channel(
    starter: EngineStarter, channel: ControlChannel, prefect_old_venv: Path
) -> None:
    python = str(prefect_old_venv / "bin" / "python")
    async with starter.start(python, "quick", channel, "old-quick") as engine:
        assert await engine.exit_status() == 0, engine.log()
        history = await starter.history(engine.flow_run_id)
        assert types(history) == ["SCHEDULED", "PENDING", "RUNNING", "COMPLETED"]
        assert engine.hook_markers() == ["on_completion"]
        assert channel.conclusion(engine.flow_run_id) is None
        assert "control" not in engine.log().lower()  # silently ignored
        assert await channel.signal(engine.flow_run_id, "cancel") is SignalResult.NOT_ACKNOWLEDGED
        # It never used its token: the token still opens a session.
        reader, writer = await asyncio.open_connection("127.0.0.1", engine.endpoint.port)
        writer.write(engine.endpoint.token.encode() + b"\n\x00PF\x02\x01")
        async with asyncio.timeout(10):
            assert await reader.readexactly(5) == b"\x00PF\x02\x01"
        writer.close()


async def test_older_engine_dies_on_bare_sigterm_without_reporting_anything(
    starter: EngineStarter, channel: ControlChannel, prefect_old_venv: Path
) -> None:
    python = str(prefect_old_venv / "bin" / "python")
    async with starter.start(python, "sleeper", channel, "old-sigterm") as engine:
        await poll(
            "the flow to start",
            lambda: engine.marker("started") is not None,
            ENGINE_START_TIMEOUT,
        )
        assert await channel.signal(engine.flow_run_id, "cancel") is SignalResult.NOT_ACKNOWLEDGED
        engine.process.send_signal(signal.SIGTERM)
        assert await engine.exit_status() == -signal.SIGTERM, engine.log()
        history = await starter.history(engine.flow_run_id)
        # Its SIGTERM handler re-raises the signal before the crash is reported: the run stays
        # RUNNING, no hook runs; the supervisor's fallback must do both.
        assert types(history) == ["SCHEDULED", "PENDING", "RUNNING"]
        assert engine.hook_markers() == []
        assert channel.conclusion(engine.flow_run_id) is None
