"""The hook process's launch request (hooks.hook_request): the run's limits, its own time limit."""

from __future__ import annotations

from pathlib import Path
from uuid import uuid4

from agent.hooks import HookKind, hook_request
from agent.launch.base import LaunchRequest


def run_request(tmp_path: Path, *, runtime_max: float | None) -> LaunchRequest:
    return LaunchRequest(
        flow_run_id=uuid4(),
        flow_run_name="brave-otter",
        deployment_name="etl",
        working_dir=tmp_path / "code",
        python="/srv/venv/bin/python",
        memory_max=100 << 20,
        cpu_quota=150,
        tasks_max=64,
        runtime_max=runtime_max,
        user="etl",
        env={
            "PREFECT__FLOW_RUN_ID": "x",
            "PREFECT__CONTROL_PORT": "4242",
            "PREFECT__CONTROL_TOKEN": "secret",
        },
        run_dir=tmp_path / "run",
        slice="runner-agent-flows.slice",
    )


def test_a_short_run_runtime_limit_does_not_cut_the_hooks_time(tmp_path: Path) -> None:
    # A run killed at RuntimeMaxSec=5s: its on_crashed hooks get the hook timeout, not 5 s.
    run = run_request(tmp_path, runtime_max=5.0)
    hook = hook_request(
        run, HookKind.CRASHED, entrypoint="flows.py:etl", timeout=120.0, source="print()"
    )
    assert hook.runtime_max == 120.0
    assert (hook.memory_max, hook.cpu_quota, hook.tasks_max, hook.user) == (
        100 << 20,
        150,
        64,
        "etl",
    )
    assert (hook.kind, hook.capture_output) == ("hook", True)
    assert hook.run_dir == tmp_path / "run" / "hook-crashed"
    assert hook.args == ("-c", "print()", "crashed", "flows.py:etl")
    # The control channel's token was the engine's; the hook process never gets it.
    assert dict(hook.env) == {"PREFECT__FLOW_RUN_ID": "x"}


def test_a_run_without_a_runtime_limit_gives_its_hooks_the_hook_timeout(tmp_path: Path) -> None:
    run = run_request(tmp_path, runtime_max=None)
    hook = hook_request(run, HookKind.CANCELLATION, entrypoint=None, timeout=300.0, source="")
    assert hook.runtime_max == 300.0
    assert hook.args == ("-c", "", "cancellation")
