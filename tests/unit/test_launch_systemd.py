"""The systemd launcher with faked systemd-run/systemctl (pytest-subprocess): exact argv, the
environment (secrets there, never in argv), launch failures and systemctl kill/stop/show.
The real thing runs in the booted-systemd test bed (tests/system)."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from pytest_subprocess import FakeProcess

from agent.launch.base import LaunchError, LaunchRequest
from agent.launch.systemd import (
    SystemdLauncher,
    format_seconds,
    parse_properties,
    systemd_run_argv,
    unit_name,
)
from agent.launch.wrapper import WRAPPER

RUN_ID = UUID("0b9a5c1e-6f55-4f3e-9d0a-2f1c7d9e8a11")
UNIT = f"runner-agent-run-{RUN_ID}.scope"
SECRET = "pnu_secret_key_value"
MiB = 1024 * 1024


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
        env={
            "PREFECT__FLOW_RUN_ID": str(RUN_ID),
            "PREFECT_API_URL": "http://127.0.0.1:4200/api",
            "PREFECT_API_KEY": SECRET,
            "TMPDIR": "/var/lib/runner-agent/runs/x/tmp",
            "MY_SETTING": "1",
        },
        run_dir=run_dir,
        slice="runner-agent-flows.slice",
    )
    return replace(base, **changes)


def tail(req: LaunchRequest) -> list[str]:
    return [
        "--",
        "systemd-cat",
        f"--identifier=runner-agent-run-{RUN_ID}",
        "--",
        "/bin/sh",
        "-c",
        WRAPPER,
        "runner-agent-run",
        str(req.run_dir),
        req.python,
        "-m",
        "prefect.engine",
    ]


DESCRIPTION = f"--description=Prefect flow run brave-otter ({RUN_ID}) of deployment hello"


def test_argv_as_root_with_every_limit(tmp_path: Path) -> None:
    req = request(tmp_path)
    assert systemd_run_argv(req, user_manager=False) == [
        "systemd-run",
        "--scope",
        "--quiet",
        "--collect",
        "--no-ask-password",
        f"--unit={UNIT}",
        "--slice=runner-agent-flows.slice",
        DESCRIPTION,
        "-p",
        f"MemoryMax={512 * MiB}",
        "-p",
        "CPUQuota=50%",
        "-p",
        "TasksMax=64",
        "-p",
        "RuntimeMaxSec=21600s",
        *tail(req),
    ]


def test_argv_for_the_user_manager_with_infinite_limits(tmp_path: Path) -> None:
    req = request(
        tmp_path, memory_max=None, cpu_quota=None, tasks_max=None, runtime_max=None, slice=""
    )
    assert systemd_run_argv(req, user_manager=True, slice="fallback.slice") == [
        "systemd-run",
        "--user",
        "--scope",
        "--quiet",
        "--collect",
        "--no-ask-password",
        f"--unit={UNIT}",
        "--slice=fallback.slice",
        DESCRIPTION,
        "-p",
        "MemoryMax=infinity",
        "-p",
        "TasksMax=infinity",
        *tail(req),
    ]


def test_argv_with_a_user_sets_uid_gid_and_exactly_its_groups(tmp_path: Path) -> None:
    req = request(tmp_path, user="flows", runtime_max=1.5, cpu_quota=200)
    *wrapper, python, dash_m, module = tail(req)
    # Only the engine switches user; the wrapper stays the agent's to write its records.
    drop = ["/usr/bin/setpriv", "--reuid=1500", "--regid=998", "--groups=998,1001", "--"]
    assert systemd_run_argv(req, user_manager=False, privilege_drop=drop) == [
        "systemd-run",
        "--scope",
        "--quiet",
        "--collect",
        "--no-ask-password",
        f"--unit={UNIT}",
        "--slice=runner-agent-flows.slice",
        DESCRIPTION,
        "-p",
        f"MemoryMax={512 * MiB}",
        "-p",
        "CPUQuota=200%",
        "-p",
        "TasksMax=64",
        "-p",
        "RuntimeMaxSec=1500ms",
        *wrapper,
        *drop,
        python,
        dash_m,
        module,
    ]


def test_no_secret_in_argv(tmp_path: Path) -> None:
    drop = ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--groups=65534", "--"]
    argv = systemd_run_argv(
        request(tmp_path, user="nobody"), user_manager=False, privilege_drop=drop
    )
    assert not any(SECRET in arg for arg in argv)
    assert not any(arg.startswith(("-E", "--setenv")) for arg in argv)


@pytest.mark.parametrize(("seconds", "text"), [(21600.0, "21600s"), (1.5, "1500ms"), (60, "60s")])
def test_format_seconds(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text


def test_unit_name() -> None:
    assert unit_name(RUN_ID) == UNIT


async def test_launch_passes_secrets_through_the_environment(
    tmp_path: Path, fp: FakeProcess
) -> None:
    req = request(tmp_path)
    recorder = fp.register(systemd_run_argv(req, user_manager=False), returncode=0)
    launcher = SystemdLauncher(slice="runner-agent-flows.slice", user_manager=False)
    handle = await launcher.launch(req)
    assert (handle.flow_run_id, handle.unit) == (RUN_ID, UNIT)
    assert await handle.wait() == 0
    [call] = recorder.calls
    assert call.kwargs is not None
    env = call.kwargs["env"]
    assert env["PREFECT_API_KEY"] == SECRET
    assert env["MY_SETTING"] == "1" and env["PREFECT__FLOW_RUN_ID"] == str(RUN_ID)
    assert env["PATH"].startswith("/usr/local/sbin:")
    assert "XDG_RUNTIME_DIR" not in env  # the system manager needs no user bus
    assert call.kwargs["cwd"] == tmp_path
    assert not any(SECRET in str(arg) for arg in call.args)


async def test_user_manager_gets_its_bus_and_refuses_other_users(
    tmp_path: Path, fp: FakeProcess
) -> None:
    req = request(tmp_path)
    recorder = fp.register(systemd_run_argv(req, user_manager=True), returncode=0)
    launcher = SystemdLauncher(
        slice="x.slice", user_manager=True, manager_env={"XDG_RUNTIME_DIR": "/run/user/1000"}
    )
    await (await launcher.launch(req)).wait()
    assert recorder.calls[0].kwargs["env"]["XDG_RUNTIME_DIR"] == "/run/user/1000"  # type: ignore[index]
    with pytest.raises(LaunchError, match="cannot run flows as user 'nobody'"):
        await launcher.launch(request(tmp_path, user="nobody"))


async def test_launch_failure_carries_systemd_runs_words(tmp_path: Path, fp: FakeProcess) -> None:
    req = request(tmp_path)
    fp.register(
        systemd_run_argv(req, user_manager=False),
        returncode=1,
        stderr="Failed to start transient scope unit: Unit runner-agent-run-x.scope "
        "already exists.\n",
    )
    launcher = SystemdLauncher(slice="runner-agent-flows.slice", user_manager=False)
    with pytest.raises(LaunchError) as caught:
        await launcher.launch(req)
    assert str(caught.value) == (
        "systemd-run failed with status 1: Failed to start transient scope unit: "
        "Unit runner-agent-run-x.scope already exists."
    )


async def test_stderr_from_a_run_that_did_start_is_only_a_warning(
    tmp_path: Path, fp: FakeProcess, caplog: pytest.LogCaptureFixture
) -> None:
    req = request(tmp_path)
    (req.run_dir / "exit-status").write_text("3\n")  # the wrapper ran and recorded
    fp.register(systemd_run_argv(req, user_manager=False), returncode=3, stderr="a warning\n")
    launcher = SystemdLauncher(slice="runner-agent-flows.slice", user_manager=False)
    handle = await launcher.launch(req)
    assert await handle.wait() == 3
    assert "a warning" in caplog.text


async def test_interpreter_missing_is_refused_before_systemd_run(
    tmp_path: Path, fp: FakeProcess
) -> None:
    launcher = SystemdLauncher(slice="s.slice", user_manager=False)
    with pytest.raises(LaunchError, match=r"^command not found: /opt/x/bin/python$"):
        await launcher.launch(request(tmp_path, python="/opt/x/bin/python"))
    assert len(fp.calls) == 0


async def test_terminate_and_kill_signal_every_process_then_stop(
    tmp_path: Path, fp: FakeProcess
) -> None:
    term = fp.register(["systemctl", "kill", "--kill-who=all", "--signal=SIGTERM", UNIT])
    kill = fp.register(["systemctl", "kill", "--kill-who=all", "--signal=SIGKILL", UNIT])
    stop = fp.register(["systemctl", "stop", UNIT])
    launcher = SystemdLauncher(slice="s.slice", user_manager=False)
    handle = _Handle(RUN_ID, UNIT)
    await launcher.terminate(handle)
    await launcher.kill(handle)
    assert (term.call_count(), kill.call_count(), stop.call_count()) == (1, 1, 1)


async def test_kill_of_a_unit_that_is_gone_is_quiet(
    fp: FakeProcess, caplog: pytest.LogCaptureFixture
) -> None:
    fp.register(
        ["systemctl", "--user", "kill", "--kill-who=all", "--signal=SIGKILL", UNIT],
        returncode=1,
        stderr=f"Failed to kill unit {UNIT}: Unit {UNIT} not loaded.\n",
    )
    fp.register(
        ["systemctl", "--user", "stop", UNIT],
        returncode=5,
        stderr=f"Failed to stop {UNIT}: Unit {UNIT} not loaded.\n",
    )
    launcher = SystemdLauncher(slice="s.slice", user_manager=True)
    await launcher.kill(_Handle(RUN_ID, None))  # unit derived from the id
    assert "failed" not in caplog.text


async def test_a_real_systemctl_failure_is_logged(
    fp: FakeProcess, caplog: pytest.LogCaptureFixture
) -> None:
    fp.register(
        ["systemctl", "kill", "--kill-who=all", "--signal=SIGTERM", UNIT],
        returncode=1,
        stderr="Failed to kill unit: Access denied\n",
    )
    await SystemdLauncher(slice="s.slice", user_manager=False).terminate(_Handle(RUN_ID, UNIT))
    assert "Access denied" in caplog.text


@pytest.mark.parametrize(
    ("stdout", "returncode", "expected"),
    [
        ("Result=oom-kill\nActiveState=failed\nSubState=failed\nLoadState=loaded\n", 0, "oom-kill"),
        ("LoadState=loaded\nResult=timeout\nActiveState=failed\nSubState=failed\n", 0, "timeout"),
        ("Result=success\nActiveState=active\nSubState=running\nLoadState=loaded\n", 0, "success"),
        ("Result=success\nActiveState=inactive\nSubState=dead\nLoadState=not-found\n", 0, None),
        ("", 1, None),
    ],
)
async def test_unit_result(
    fp: FakeProcess, stdout: str, returncode: int, expected: str | None
) -> None:
    fp.register(
        ["systemctl", "show", "-p", "Result,ActiveState,SubState,LoadState", UNIT],
        stdout=stdout,
        returncode=returncode,
    )
    launcher = SystemdLauncher(slice="s.slice", user_manager=False)
    assert await launcher.unit_result(_Handle(RUN_ID, UNIT)) == expected


def test_parse_properties() -> None:
    assert parse_properties("A=1\nB=x=y\n\nnoise\n") == {"A": "1", "B": "x=y"}


class _Handle:
    def __init__(self, flow_run_id: UUID, unit: str | None) -> None:
        self.flow_run_id = flow_run_id
        self.unit = unit
        self.pid: int | None = None
        self.output: asyncio.StreamReader | None = None

    async def wait(self) -> int:
        return 0
