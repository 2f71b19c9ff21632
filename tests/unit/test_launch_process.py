"""The REAL process launcher (no fakes): process groups, the wrapper's exit record, output.log,
launch failures, and the `auto` choice.

The "engine" is a `prefect/engine.py` written into the run's working directory: the launcher runs
`<python> -m prefect.engine` with that directory as cwd, so Python imports it from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from uuid import uuid4

import psutil
import pytest

from agent.launch.auto import select_launcher
from agent.launch.base import LaunchError, LaunchRequest, RunHandle
from agent.launch.process import ProcessLauncher
from agent.launch.systemd import SystemdLauncher
from agent.launch.wrapper import read_exit_record

SECRET = "pnu_secret_key_value"


def make_request(tmp_path: Path, engine: str, **changes: object) -> LaunchRequest:
    code = tmp_path / "code"
    (code / "prefect").mkdir(parents=True, exist_ok=True)
    (code / "prefect" / "__init__.py").write_text("")
    (code / "prefect" / "engine.py").write_text(textwrap.dedent(engine))
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    run_id = uuid4()
    request = LaunchRequest(
        flow_run_id=run_id,
        flow_run_name="brave-otter",
        deployment_name="hello",
        working_dir=code,
        python=sys.executable,
        memory_max=None,
        cpu_quota=None,
        tasks_max=None,
        runtime_max=None,
        user="",
        env={
            "PREFECT__FLOW_RUN_ID": str(run_id),
            "PREFECT_API_KEY": SECRET,
            "TMPDIR": str(tmp_path),
        },
        run_dir=run_dir,
        slice="runner-agent-flows.slice",
    )
    return replace(request, **changes)  # type: ignore[arg-type]


def family(pid: int) -> list[psutil.Process]:
    proc = psutil.Process(pid)
    return [proc, *proc.children(recursive=True)]


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    left = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc)
        except psutil.NoSuchProcess:
            pass
    return left


async def wait_for(predicate: object, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.fixture
def launcher() -> ProcessLauncher:
    return ProcessLauncher()


@pytest.fixture
async def cleanup() -> AsyncIterator[list[RunHandle]]:
    """Every handle a test started is killed (whole group) and reaped, also on failure."""
    handles: list[RunHandle] = []
    yield handles
    for handle in handles:
        if handle.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(handle.pid, signal.SIGKILL)
        await asyncio.wait_for(handle.wait(), timeout=10)


# A flow that starts a grandchild `sleep 300` and reports both pids, then waits.
GRANDCHILD = """
    import pathlib, subprocess, sys, time
    child = subprocess.Popen(["sleep", "300"])
    pathlib.Path("grandchild.pid").write_text(str(child.pid))
    print("started", child.pid, flush=True)
    time.sleep(300)
"""

# The same, but the flow and its grandchild shrug off SIGTERM.
STUBBORN = """
    import pathlib, signal, subprocess, sys, time
    child = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 300 & wait"])
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pathlib.Path("grandchild.pid").write_text(str(child.pid))
    time.sleep(300)
"""


async def started(request: LaunchRequest) -> None:
    marker = request.working_dir / "grandchild.pid"
    await wait_for(marker.exists)


async def test_terminate_kills_the_whole_group_grandchildren_included(
    tmp_path: Path, launcher: ProcessLauncher, cleanup: list[RunHandle]
) -> None:
    request = make_request(tmp_path, GRANDCHILD)
    handle = await launcher.launch(request)
    cleanup.append(handle)
    assert handle.unit is None and handle.pid is not None
    await started(request)
    procs = family(handle.pid)
    grandchild = int((request.working_dir / "grandchild.pid").read_text())
    assert grandchild in {p.pid for p in procs}
    assert len(procs) == 3  # wrapper, engine, sleep

    await launcher.terminate(handle)
    status = await asyncio.wait_for(handle.wait(), timeout=10)

    assert status == 143
    await wait_for(lambda: not alive(procs))
    assert read_exit_record(request.run_dir) == 143  # the wrapper survived to record it


async def test_kill_finishes_what_ignores_sigterm(
    tmp_path: Path, launcher: ProcessLauncher, cleanup: list[RunHandle]
) -> None:
    request = make_request(tmp_path, STUBBORN)
    handle = await launcher.launch(request)
    cleanup.append(handle)
    assert handle.pid is not None
    await started(request)
    pid = handle.pid
    await wait_for(lambda: len(family(pid)) == 4)
    procs = family(handle.pid)

    await launcher.terminate(handle)
    await asyncio.sleep(0.5)
    assert len(alive(procs)) == 4  # everyone ignored or deferred SIGTERM

    await launcher.kill(handle)
    assert await asyncio.wait_for(handle.wait(), timeout=10) == 137
    await wait_for(lambda: not alive(procs))
    assert read_exit_record(request.run_dir) is None  # SIGKILL leaves no time to record


async def test_terminate_and_kill_after_the_run_ended_are_harmless(
    tmp_path: Path, launcher: ProcessLauncher
) -> None:
    handle = await launcher.launch(make_request(tmp_path, "print('done')"))
    assert await handle.wait() == 0
    await launcher.terminate(handle)
    await launcher.kill(handle)


async def test_exit_status_of_os_exit_is_returned_and_recorded(
    tmp_path: Path, launcher: ProcessLauncher
) -> None:
    request = make_request(tmp_path, "import os; os._exit(3)")
    handle = await launcher.launch(request)
    assert await asyncio.wait_for(handle.wait(), timeout=30) == 3
    assert read_exit_record(request.run_dir) == 3
    assert read_exit_record(request.run_dir) == 3
    assert sorted(p.name for p in request.run_dir.iterdir()) == ["exit-status", "output.log", "pid"]
    assert await launcher.unit_result(handle) is None


async def test_wrapper_records_the_status_of_a_child_that_outlives_sigterm_briefly(
    tmp_path: Path, launcher: ProcessLauncher, cleanup: list[RunHandle]
) -> None:
    engine = """
        import pathlib, signal, sys, time
        def stop(*_):
            time.sleep(0.7)
            sys.exit(5)
        signal.signal(signal.SIGTERM, stop)
        pathlib.Path("grandchild.pid").write_text("ready")
        time.sleep(300)
    """
    request = make_request(tmp_path, engine)
    handle = await launcher.launch(request)
    cleanup.append(handle)
    await started(request)
    await launcher.terminate(handle)  # the wrapper gets SIGTERM too
    assert await asyncio.wait_for(handle.wait(), timeout=10) == 5
    assert read_exit_record(request.run_dir) == 5


async def test_output_goes_to_output_log_and_the_environment_is_minimal(
    tmp_path: Path, launcher: ProcessLauncher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_ONLY_VARIABLE", "leaked")
    engine = """
        import os, sys
        print("out:", os.getcwd())
        print("err:", os.environ["PREFECT_API_KEY"], os.environ["PREFECT__FLOW_RUN_ID"],
              file=sys.stderr)
        print("leak:", os.environ.get("AGENT_ONLY_VARIABLE"), os.environ["PATH"])
        print("stdin:", repr(sys.stdin.read()))
    """
    request = make_request(tmp_path, engine)
    handle = await launcher.launch(request)
    assert await asyncio.wait_for(handle.wait(), timeout=30) == 0
    output = (request.run_dir / "output.log").read_text()
    assert f"out: {request.working_dir}" in output
    assert f"err: {SECRET} {request.flow_run_id}" in output
    assert "leak: None /usr/local/sbin:" in output
    assert "stdin: ''" in output


async def test_the_key_is_not_in_any_argv(
    tmp_path: Path, launcher: ProcessLauncher, cleanup: list[RunHandle]
) -> None:
    request = make_request(tmp_path, GRANDCHILD)
    handle = await launcher.launch(request)
    cleanup.append(handle)
    await started(request)
    assert handle.pid is not None
    for proc in family(handle.pid):
        assert SECRET not in " ".join(proc.cmdline())
    assert SECRET in psutil.Process(handle.pid).environ()["PREFECT_API_KEY"]


async def test_runs_as_the_configured_user(launcher: ProcessLauncher) -> None:
    if os.geteuid() != 0:
        pytest.skip("switching users needs root")
    # pytest's tmp_path sits under a 0700 directory that `nobody` cannot traverse.
    with tempfile.TemporaryDirectory(prefix="runner-agent-launcher-") as directory:
        os.chmod(directory, 0o755)  # noqa: PTH101
        await _run_as_nobody(Path(directory), launcher)


async def _run_as_nobody(tmp_path: Path, launcher: ProcessLauncher) -> None:
    engine = """
        import os
        print("ids:", os.getuid(), os.getgid(), os.getgroups(), os.environ["HOME"], flush=True)
    """
    request = make_request(tmp_path, engine, user="nobody")
    os.chown(request.run_dir, 65534, 65534)
    handle = await launcher.launch(request)
    assert await asyncio.wait_for(handle.wait(), timeout=30) == 0
    assert "ids: 65534 65534 [65534] /nonexistent" in (request.run_dir / "output.log").read_text()
    assert read_exit_record(request.run_dir) == 0


async def test_limits_are_named_in_a_warning(
    tmp_path: Path, launcher: ProcessLauncher, caplog: pytest.LogCaptureFixture
) -> None:
    request = make_request(
        tmp_path, "pass", memory_max=512 * 1024 * 1024, cpu_quota=50, runtime_max=60.0
    )
    with caplog.at_level(logging.WARNING, logger="agent.launch"):
        handle = await launcher.launch(request)
        assert await handle.wait() == 0
    assert "cannot enforce memory_max, cpu_quota, runtime_max" in caplog.text


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"python": "/opt/x/bin/python"}, "command not found: /opt/x/bin/python"),
        ({"python": "no-such-python-here"}, "command not found: no-such-python-here"),
        (
            {"working_dir": Path("/srv/no/such/flows")},
            "working directory does not exist: /srv/no/such/flows",
        ),
        ({"user": "no-such-user-x"}, "unknown user 'no-such-user-x'"),
    ],
)
async def test_launch_failures_are_explained(
    tmp_path: Path, launcher: ProcessLauncher, changes: dict[str, object], reason: str
) -> None:
    with pytest.raises(LaunchError) as caught:
        await launcher.launch(make_request(tmp_path, "pass", **changes))
    assert str(caught.value) == reason
    assert not (tmp_path / "run" / "pid").exists()  # nothing started


async def test_an_interpreter_that_is_not_executable(
    tmp_path: Path, launcher: ProcessLauncher
) -> None:
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\n")
    python.chmod(0o644)
    if os.access(python, os.X_OK):
        pytest.skip("root may execute anything here")
    with pytest.raises(LaunchError, match="command not executable"):
        await launcher.launch(make_request(tmp_path, "pass", python=str(python)))


@pytest.mark.parametrize(
    ("choice", "present", "expected", "why"),
    [
        ("auto", True, "systemd", "auto: /run/systemd/system exists"),
        ("auto", False, "process", "auto: /run/systemd/system does not exist"),
        ("process", True, "process", "configured"),
        ("systemd", True, "systemd", "configured"),
        ("systemd", False, "systemd", "launches will fail"),
    ],
)
def test_select_launcher(
    choice: str, present: bool, expected: str, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="agent.launch"):
        chosen = select_launcher(
            choice,  # type: ignore[arg-type]
            slice="flows.slice",
            is_root=True,
            systemd_present=lambda: present,
        )
    assert chosen.name == expected
    [record] = caplog.records
    assert why in record.getMessage()


def test_select_launcher_uses_the_user_manager_when_not_root() -> None:
    root = select_launcher("systemd", slice="a.slice", is_root=True, systemd_present=lambda: True)
    user = select_launcher("systemd", slice="a.slice", is_root=False, systemd_present=lambda: True)
    assert isinstance(root, SystemdLauncher) and isinstance(user, SystemdLauncher)
    assert (root.user_manager, user.user_manager) == (False, True)
    assert root.slice == "a.slice"


@pytest.fixture(autouse=True)
def no_stray_children() -> Iterator[None]:
    """A test that leaves a process behind fails."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    deadline = time.monotonic() + 5
    while True:
        left = [p for p in alive(psutil.Process().children(recursive=True)) if p.pid not in before]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, [p.cmdline() for p in left]


async def test_a_non_root_agent_refuses_another_user(
    tmp_path: Path, launcher: ProcessLauncher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 4321)
    with pytest.raises(LaunchError, match="cannot run flows as user 'nobody': the agent is not"):
        await launcher.launch(make_request(tmp_path, "pass", user="nobody"))
