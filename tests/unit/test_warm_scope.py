"""The systemd side of warm starts, with faked busctl/systemctl (pytest-subprocess): the
StartTransientUnit argv that moves W into the run's scope, the template's own scope, the move's
failure, and stopping leftovers. The real thing runs in the booted test bed (tests/system)."""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from pytest_subprocess import FakeProcess

from agent import daemon
from agent.launch.base import LaunchError, LaunchRequest
from agent.launch.process import ProcessLauncher
from agent.launch.systemd import (
    INFINITY,
    TEMPLATE_MEMORY_MAX,
    TEMPLATE_TASKS_MAX,
    SystemdLauncher,
    start_transient_scope_argv,
)
from agent.settings import Settings
from agent.warm.memory import WARM_DIRECTORY
from agent.warm.pool import PROGRAM

RUN_ID = UUID("0b9a5c1e-6f55-4f3e-9d0a-2f1c7d9e8a11")
UNIT = f"runner-agent-run-{RUN_ID}.scope"
SECRET = "pnu_secret_key_value"
MiB = 1024 * 1024
DESCRIPTION = f"Prefect flow run brave-otter ({RUN_ID}) of deployment hello"
SLICE = "runner-agent-flows.slice"
HEAD = [
    "call",
    "--quiet",
    "org.freedesktop.systemd1",
    "/org/freedesktop/systemd1",
    "org.freedesktop.systemd1.Manager",
    "StartTransientUnit",
    "ssa(sv)a(sa(sv))",
]


def request(tmp_path: Path, **changes: Any) -> LaunchRequest:
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    base = LaunchRequest(
        flow_run_id=RUN_ID,
        flow_run_name="brave-otter",
        deployment_name="hello",
        working_dir=tmp_path,
        python=sys.executable,
        memory_max=512 * MiB,
        cpu_quota=50,
        tasks_max=64,
        runtime_max=6 * 3600.0,
        user="",
        env={"PREFECT_API_KEY": SECRET, "PREFECT__FLOW_RUN_ID": str(RUN_ID)},
        run_dir=run_dir,
        slice=SLICE,
        engine="warm",
    )
    return replace(base, **changes)


def properties(argv: list[str]) -> tuple[int, dict[str, tuple[str, list[str]]]]:
    """Parse the a(sv) of StartTransientUnit: (the count it announces, name -> (type, values))."""
    assert argv[-1] == "0"  # no auxiliary units
    at = argv.index("fail") + 1
    count = int(argv[at])
    rest = argv[at + 1 : -1]
    found: dict[str, tuple[str, list[str]]] = {}
    while rest:
        name, signature, *rest = rest
        if signature == "au":
            n = int(rest[0])
            values, rest = rest[: n + 1], rest[n + 1 :]
        else:
            assert signature in ("s", "t"), signature
            values, rest = rest[:1], rest[1:]
        assert name not in found
        found[name] = (signature, values)
    return count, found


def test_scope_argv_with_every_limit(tmp_path: Path) -> None:
    argv = start_transient_scope_argv(request(tmp_path), [4242], user_manager=False)
    assert argv == [
        "busctl",
        *HEAD,
        UNIT,
        "fail",
        "8",
        *("PIDs", "au", "1", "4242"),
        *("Slice", "s", SLICE),
        *("Description", "s", DESCRIPTION),
        *("CollectMode", "s", "inactive-or-failed"),
        *("MemoryMax", "t", str(512 * MiB)),
        *("TasksMax", "t", "64"),
        *("CPUQuotaPerSecUSec", "t", "500000"),  # 50% of one CPU: 0.5 s per second
        *("RuntimeMaxUSec", "t", "21600000000"),
        "0",
    ]


def test_scope_argv_without_limits_for_the_user_manager(tmp_path: Path) -> None:
    req = request(
        tmp_path, memory_max=None, cpu_quota=None, tasks_max=None, runtime_max=None, slice=""
    )
    argv = start_transient_scope_argv(req, [7, 8], user_manager=True, slice="fallback.slice")
    assert INFINITY == 18446744073709551615
    assert argv == [
        "busctl",
        "--user",
        *HEAD,
        UNIT,
        "fail",
        "6",
        *("PIDs", "au", "2", "7", "8"),
        *("Slice", "s", "fallback.slice"),
        *("Description", "s", DESCRIPTION),
        *("CollectMode", "s", "inactive-or-failed"),
        *("MemoryMax", "t", "18446744073709551615"),
        *("TasksMax", "t", "18446744073709551615"),
        "0",
    ]


@pytest.mark.parametrize(
    ("changes", "cpu", "runtime"),
    [
        ({"cpu_quota": 200, "runtime_max": 1.5}, "2000000", "1500000"),
        ({"cpu_quota": 1, "runtime_max": None}, "10000", None),
        ({"cpu_quota": None, "runtime_max": 0.001}, None, "1000"),
        ({"cpu_quota": None, "runtime_max": 0.0}, None, None),  # 0: no runtime limit, as cold
    ],
)
def test_cpu_quota_and_runtime_in_microseconds(
    tmp_path: Path, changes: dict[str, Any], cpu: str | None, runtime: str | None
) -> None:
    argv = start_transient_scope_argv(request(tmp_path, **changes), [1], user_manager=False)
    count, props = properties(argv)
    assert count == len(props)
    assert props.get("CPUQuotaPerSecUSec") == (("t", [cpu]) if cpu else None)
    assert props.get("RuntimeMaxUSec") == (("t", [runtime]) if runtime else None)


@pytest.mark.parametrize("user_manager", [False, True])
@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"memory_max": None, "tasks_max": None},
        {"cpu_quota": None},
        {"runtime_max": None},
        {"cpu_quota": None, "runtime_max": None, "kind": "hook"},
    ],
)
def test_the_announced_property_count_is_the_real_one(
    tmp_path: Path, changes: dict[str, Any], user_manager: bool
) -> None:
    req = request(tmp_path, **changes)
    argv = start_transient_scope_argv(req, [11, 12, 13], user_manager=user_manager)
    count, props = properties(argv)
    assert count == len(props)
    assert props["PIDs"] == ("au", ["3", "11", "12", "13"])
    assert argv[argv.index("fail") - 1] == f"runner-agent-{req.kind}-{RUN_ID}.scope"
    assert not any(SECRET in arg for arg in argv)


def test_template_prefix_is_a_scope_of_its_own_in_the_flows_slice() -> None:
    unit, what = "runner-agent-warm-0123456789ab-1.scope", "the template for /v/bin/python"
    common = [
        "--scope",
        "--quiet",
        "--collect",
        "--no-ask-password",
        f"--unit={unit}",
        f"--slice={SLICE}",
        f"--description={what}",
        "-p",
        "MemoryMax=1G",
        "-p",
        "TasksMax=64",
        "--",
    ]
    assert (TEMPLATE_MEMORY_MAX, TEMPLATE_TASKS_MAX) == ("1G", 64)
    system = SystemdLauncher(slice=SLICE, user_manager=False)
    user = SystemdLauncher(slice=SLICE, user_manager=True, manager_env={})
    assert system.template_prefix(unit, what) == ["systemd-run", *common]
    assert user.template_prefix(unit, what) == ["systemd-run", "--user", *common]


async def test_move_into_scope_runs_busctl_with_the_managers_environment(
    tmp_path: Path, fp: FakeProcess
) -> None:
    req = request(tmp_path)
    recorder = fp.register(start_transient_scope_argv(req, [4242], user_manager=True, slice=SLICE))
    launcher = SystemdLauncher(
        slice=SLICE, user_manager=True, manager_env={"XDG_RUNTIME_DIR": "/run/user/1000"}
    )
    await launcher.move_into_scope(req, 4242)
    [call] = recorder.calls
    assert call.kwargs is not None
    env = call.kwargs["env"]
    assert env["XDG_RUNTIME_DIR"] == "/run/user/1000"
    assert SECRET not in env.values()  # the run's environment is not busctl's


async def test_move_into_scope_without_the_requests_slice_uses_the_launchers(
    tmp_path: Path, fp: FakeProcess
) -> None:
    req = request(tmp_path, slice="")
    argv = start_transient_scope_argv(req, [5], user_manager=False, slice="mine.slice")
    assert argv[argv.index("Slice") + 2] == "mine.slice"
    recorder = fp.register(argv)
    await SystemdLauncher(slice="mine.slice", user_manager=False).move_into_scope(req, 5)
    assert recorder.call_count() == 1


async def test_a_failed_move_is_a_launch_error_with_busctls_words(
    tmp_path: Path, fp: FakeProcess
) -> None:
    req = request(tmp_path)
    fp.register(
        start_transient_scope_argv(req, [4242], user_manager=False, slice=SLICE),
        returncode=1,
        stderr=f"Call failed: Unit {UNIT} already exists.\n",
    )
    launcher = SystemdLauncher(slice=SLICE, user_manager=False)
    with pytest.raises(LaunchError) as caught:
        await launcher.move_into_scope(req, 4242)
    assert str(caught.value) == (
        f"StartTransientUnit for {UNIT} failed: Call failed: Unit {UNIT} already exists."
    )


@pytest.mark.parametrize("user_manager", [False, True])
async def test_stop_units_stops_the_pattern(fp: FakeProcess, user_manager: bool) -> None:
    argv = ["systemctl", *(["--user"] if user_manager else []), "stop", "runner-agent-warm-*.scope"]
    recorder = fp.register(argv)
    launcher = SystemdLauncher(slice=SLICE, user_manager=user_manager, manager_env={})
    await launcher.stop_units("runner-agent-warm-*.scope")
    assert recorder.call_count() == 1


async def test_stop_units_is_quiet_about_nothing_to_stop_and_logs_a_real_failure(
    fp: FakeProcess, caplog: pytest.LogCaptureFixture
) -> None:
    launcher = SystemdLauncher(slice=SLICE, user_manager=False)
    fp.register(["systemctl", "stop", "a.scope"], returncode=5, stderr="Unit a.scope not loaded.\n")
    fp.register(["systemctl", "stop", "b.scope"], returncode=1, stderr="Access denied\n")
    with caplog.at_level(logging.WARNING):
        await launcher.stop_units("a.scope")
        assert caplog.records == []
        await launcher.stop_units("b.scope")
    assert [r.getMessage() for r in caplog.records] == [
        "systemctl stop b.scope failed (1): Access denied"
    ]


async def test_the_daemons_pool_under_systemd(tmp_path: Path, fp: FakeProcess) -> None:
    settings = Settings.model_validate({"agent": {"runtime_dir": str(tmp_path / "rt")}})
    launcher = SystemdLauncher(
        slice=SLICE, user_manager=True, manager_env={"XDG_RUNTIME_DIR": "/run/user/7"}
    )
    pool = daemon.warm_pool(launcher, settings)
    assert pool.directory == tmp_path / "rt" / WARM_DIRECTORY
    assert pool._prefix("u.scope", "w") == launcher.template_prefix("u.scope", "w")
    assert pool._extra_env == {"XDG_RUNTIME_DIR": "/run/user/7"}
    assert pool._program == PROGRAM
    # Before its first template: leftovers of an earlier agent are stopped.
    stop = fp.register(["systemctl", "--user", "stop", "runner-agent-warm-*.scope"])
    assert pool._before_first_start is not None
    await pool._before_first_start()
    assert stop.call_count() == 1


def test_the_daemons_pool_under_the_process_launcher(tmp_path: Path) -> None:
    settings = Settings.model_validate({"agent": {"runtime_dir": str(tmp_path / "rt")}})
    pool = daemon.warm_pool(ProcessLauncher(), settings)
    assert pool.directory == tmp_path / "rt" / WARM_DIRECTORY
    assert pool._prefix("u.scope", "w") == []
    assert (pool._extra_env, pool._before_first_start) == ({}, None)
