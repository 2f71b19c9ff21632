"""Job variables at launch: a run's own job variables over the host's settings, within the host's
allow-list; a run that asks for more is never started and ends CRASHED naming the key."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from agent.records import RunRecord
from tests.unit.fakes import FakeLauncher, FakePrefect
from tests.unit.supervision import make_settings, proposed_types, supervise


@pytest.fixture
def settings(tmp_path: Path) -> Any:
    return make_settings(tmp_path)


def _messages(server: FakePrefect) -> list[str]:
    return [str(entry["message"]) for entry in server.logs]


async def test_a_runs_job_variables_set_its_limits_and_environment(settings: Any) -> None:
    server = FakePrefect(
        uuid4(), job_variables={"env": {"X": "1", "ON": True}, "memory_max": "300M"}
    )
    launcher = FakeLauncher(status=0, finish_at_once=False)
    seen: list[dict[str, Any]] = []

    async def look_at_the_record(supervisor: Any, fake: FakeLauncher) -> None:
        while fake.handle is None:
            await asyncio.sleep(0.01)
        seen.append(dict(supervisor.record.extra))
        fake.handle.released.set()

    await supervise(settings, server, launcher, before=look_at_the_record)
    request = launcher.requests[0]
    assert request.memory_max == 300 * 1024**2
    assert request.env["X"] == "1"
    assert request.env["ON"] == "true"
    assert request.cpu_quota == 200  # untouched keys keep the host's value
    messages = _messages(server)
    assert "Job variables applied: env, memory_max" in messages
    assert any(m.startswith("Launched in") and "MemoryMax=300M" in m for m in messages)
    # The record keeps the layers, so a restarted agent rebuilds the same settings.
    assert seen[0]["job_variables"] == {
        "deployment": {},
        "flow run": {"env": {"X": "1", "ON": True}, "memory_max": "300M"},
    }
    # Values never appear in the log line, only keys (env values may be secrets).
    assert not any("X=1" in m for m in messages)


async def test_a_key_the_host_does_not_allow_is_crashed_and_never_started(settings: Any) -> None:
    server = FakePrefect(uuid4(), job_variables={"user": "root"})
    launcher = FakeLauncher()
    await supervise(settings, server, launcher)
    assert launcher.requests == []
    assert proposed_types(server) == ["PENDING", "CRASHED"]
    message = server.proposals[1]["state"]["message"]
    assert message.startswith("job variable 'user' (from the flow run): not allowed")
    assert "agent.job_variables" in message


@pytest.mark.parametrize(
    ("job_variables", "key", "problem"),
    [
        ({"memory_max": "lots"}, "memory_max", "lots"),
        ({"cpu_quota": "150"}, "cpu_quota", "150"),
        ({"env": ["X=1"]}, "env", "expected a table"),
        ({"image": "python:3.12"}, "image", "unknown here"),
    ],
)
async def test_an_invalid_job_variable_is_crashed_naming_it(
    settings: Any, job_variables: dict[str, Any], key: str, problem: str
) -> None:
    server = FakePrefect(uuid4(), job_variables=job_variables)
    launcher = FakeLauncher()
    await supervise(settings, server, launcher)
    assert launcher.requests == []
    assert proposed_types(server) == ["PENDING", "CRASHED"]
    message = server.proposals[1]["state"]["message"]
    assert message.startswith(f"job variable {key!r} (from the flow run)")
    assert problem in message


async def test_a_restarted_agent_explains_an_exit_with_the_runs_own_limits(
    settings: Any, tmp_path: Path
) -> None:
    run_id = uuid4()
    server = FakePrefect(run_id, state="RUNNING")
    run_dir = tmp_path / "exited-run"
    run_dir.mkdir()
    (run_dir / "exit-status").write_text("137\n")
    record = RunRecord(
        flow_run_id=str(run_id),
        deployment="hello",
        phase="running",
        pid=2**22 + 7,
        run_dir=str(run_dir),
        extra={"job_variables": {"deployment": {}, "flow run": {"memory_max": "300M"}}},
    )
    await supervise(settings, server, FakeLauncher(), record=record)
    assert proposed_types(server) == ["CRASHED"]
    assert "MemoryMax=300M" in server.proposals[0]["state"]["message"]
