"""Host trouble (issue #9, item 5): a state directory the agent cannot write, a disk that fills
up while it works, and a deployment's code directory that is missing or disappears mid-run.

A missing flow interpreter: test_runs_e2e.py::test_bad_interpreter_is_crashed_with_reason.
Mounts (tmpfs, read-only binds) need root; those cases skip where mounting is not permitted.
"""

from __future__ import annotations

import configparser
import contextlib
import errno
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.agent_process import AgentProcess, Api, running_agent, wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

FLOWS = textwrap.dedent(
    """
    import os, pathlib, time
    from prefect import flow

    def mark(marker: str) -> None:
        with open(marker, "a") as out:
            out.write(os.environ["PREFECT__FLOW_RUN_ID"] + "\\n")

    def wait_for(path: str, *, gone: bool) -> None:
        deadline = time.time() + 60
        while os.path.exists(path) is gone and time.time() < deadline:
            time.sleep(0.1)

    @flow
    def hello():
        return "hello"

    @flow
    def until_go(marker: str, go: str):
        mark(marker)
        wait_for(go, gone=False)

    @flow
    def reads_its_code(marker: str, code_dir: str):
        mark(marker)
        wait_for(code_dir, gone=True)
        return pathlib.Path("data.txt").read_text()

    @flow
    def already_loaded(marker: str, code_dir: str):
        mark(marker)
        wait_for(code_dir, gone=True)
        return "done"
    """
)


def code_dir(parent: Path, name: str) -> Path:
    directory = parent / name
    directory.mkdir(parents=True)
    (directory / "flows.py").write_text(FLOWS)
    (directory / "data.txt").write_text("data\n")
    return directory


def run_quietly(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    done = run_quietly("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        unmount(path)


@contextlib.contextmanager
def read_only_bind(path: Path) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    done = run_quietly("mount", "--bind", str(path), str(path))
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.strip()}")
    try:
        done = run_quietly("mount", "-o", "remount,ro,bind", str(path))
        assert done.returncode == 0, done.stderr
        yield path
    finally:
        unmount(path)


def unmount(path: Path) -> None:
    if run_quietly("umount", str(path)).returncode != 0:
        run_quietly("umount", "-l", str(path))


def fill(directory: Path) -> Path:
    """Write zeros into `directory` until its file system is full; returns the filler."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


def free(filler: Path) -> None:
    filler.unlink(missing_ok=True)


def history(api: Api, run_id: str) -> list[str]:
    return [s["type"] for s in api.history(run_id)]


# -- a state directory the agent cannot use: exit 78, one line, before READY ------------------


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        path.chmod(0o777)  # the non-root case sends from another user
        self.sock.setblocking(False)

    def messages(self) -> list[str]:
        out: list[str] = []
        while True:
            try:
                out += self.sock.recv(4096).decode().splitlines()
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.sock.close()


def start_refused(
    workdir: Path, prefect_server: Any, state_dir: Path, *, as_user: str = ""
) -> tuple[int, list[str], list[str]]:
    """Run `runner-agent run` to its end; (exit status, stderr lines, sd_notify messages)."""
    agent = AgentProcess(
        workdir,
        api_url=prefect_server.api_url,
        python=prefect_server.python,
        name="refused",
        deployments=[
            {"name": "refused", "flow_name": "refused", "entrypoint": "f.py:f", "path": "/srv"}
        ],
        agent={"state_dir": str(state_dir), "runtime_dir": str(workdir / "run")},
    )
    agent.config_path.chmod(0o644)
    notify = NotifySocket(workdir / "notify.sock")
    prefix = []
    if as_user:
        entry = pwd.getpwnam(as_user)
        prefix = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}"]
        prefix += ["--clear-groups", "--"]
    try:
        done = subprocess.run(
            [*prefix, sys.executable, "-m", "agent", "--config", str(agent.config_path), "run"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            env={**agent.env, "NOTIFY_SOCKET": str(notify.path)},
        )
        return done.returncode, done.stderr.splitlines(), notify.messages()
    finally:
        notify.close()


@contextlib.contextmanager
def unusable_state_dir(kind: str, base: Path) -> Iterator[tuple[Path, str]]:
    """A state directory that fails for the agent, and the problem it must report."""
    if kind == "under-a-file":
        # Root ignores permission bits, but not this.
        (base / "blocker").write_text("a file, not a directory")
        yield base / "blocker" / "state", "Not a directory"
    elif kind == "read-only-mount":
        with read_only_bind(base / "ro") as mount:
            yield mount, "Read-only file system"
    elif kind == "full-disk":
        with tmpfs(base / "full", "64k") as mount:
            (mount / "state").mkdir()
            fill(mount)
            yield mount / "state", "No space left on device"
    elif kind == "not-the-agent-users":
        # For an agent user other than root, permission bits are what fail.
        state = base / "root-only"
        state.mkdir(mode=0o700)
        yield state, "Permission denied"
    else:  # pragma: no cover
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["under-a-file", "read-only-mount", "full-disk", "not-the-agent-users"]
)
def test_an_unusable_state_directory_exits_78_with_one_line_before_ready(
    kind: str, prefect_server: Any
) -> None:
    as_user = "nobody" if kind == "not-the-agent-users" else ""
    if as_user and shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    # Not under pytest's tmp_path: that is root's 0700 directory, closed to the other user.
    base = Path(tempfile.mkdtemp(prefix="runner-agent-host-"))
    base.chmod(0o755)
    try:
        with unusable_state_dir(kind, base) as (state_dir, problem):
            started = time.monotonic()
            status, stderr, notified = start_refused(
                base / "agent", prefect_server, state_dir, as_user=as_user
            )
            took = time.monotonic() - started
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"{kind}: exit {status} after {took:.2f}s: {stderr}")
    assert status == 78, stderr
    assert len(stderr) == 1, stderr
    line = json.loads(stderr[0])
    assert line["level"] == "ERROR"
    assert line["message"] == (f"cannot start: {state_dir}: not a writable directory ({problem})")
    assert "READY=1" not in notified, notified


def test_the_unit_does_not_restart_on_exit_78() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(REPO / "systemd" / "runner-agent.service")
    service = unit["Service"]
    assert service["Restart"] == "on-failure"
    assert "78" in service["RestartPreventExitStatus"].split()


# -- the state disk fills up while the agent works --------------------------------------------


def test_a_full_state_disk_defers_claims_and_loses_nothing(
    prefect_server: Any, api: Api, tmp_path: Path
) -> None:
    code = code_dir(tmp_path, "code")
    marker, go = tmp_path / "executions.txt", tmp_path / "go"
    with tmpfs(tmp_path / "state-fs", "4m") as fs:
        state = fs / "state"
        with running_agent(
            tmp_path / "agent",
            api_url=prefect_server.api_url,
            python=prefect_server.python,
            name="disk-full",
            deployments=[
                {
                    "name": "disk-full",
                    "flow_name": "host-until-go",
                    "entrypoint": "flows.py:until_go",
                    "path": str(code),
                    "parameters": {"marker": str(marker), "go": str(go)},
                }
            ],
            agent={"state_dir": str(state)},
        ) as agent:
            deployment_id = api.wait_deployment("host-until-go", "disk-full")
            # Once the agent has remembered its deployments, it writes only run records.
            wait_for((state / "deployments.json").exists, 30, what="the deployment sync")
            filler = fill(fs)
            run_id = api.create_run(deployment_id)
            refused = (
                f"not claiming the run: cannot write the run record "
                f"{state}/runs/{run_id}/record.json: No space left on device"
            )
            wait_for(lambda: refused in agent.log_text(), 30, what="the refused claim")
            # It retries once per poll (1 s here), not in a tight loop, and stays alive.
            time.sleep(3)
            assert agent.log_text().count(refused) <= 5
            assert agent.proc is not None and agent.proc.poll() is None
            assert api.state(run_id)["type"] == "SCHEDULED"
            assert "PENDING" not in history(api, run_id)

            free(filler)
            wait_for(marker.exists, 60, what="the run to start once there is room")
            # Full again while it runs: the `exited` record cannot be written either.
            filler = fill(fs)
            go.touch()
            final = api.wait_final(run_id)
            wait_for(lambda: not (state / "runs" / run_id).exists(), 30, what="the record to go")
            log = agent.log_text()
            free(filler)
    assert final["type"] == "COMPLETED", (final, log[-3000:])
    assert "record.json: No space left on device; carrying on with the run" in log
    types = history(api, run_id)
    assert types.count("PENDING") == 1 and types.count("RUNNING") == 1, types
    assert marker.read_text().splitlines() == [run_id]


# -- the deployment's code directory is missing, or disappears mid-run ------------------------


@pytest.fixture(scope="module")
def code_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    parent = tmp_path_factory.mktemp("host-code")
    names = ["gone-at-launch", "gone-before-load", "reads-its-code", "already-loaded"]
    return {name: code_dir(parent, name) for name in names}


@pytest.fixture(scope="module")
def code_agent(
    prefect_server: Any,
    code_dirs: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[AgentProcess, Path]]:
    work = tmp_path_factory.mktemp("host-code-agent")
    markers = work / "markers"
    markers.mkdir()
    # An interpreter whose engine (`-m prefect.engine`, not the agent's schema helper) starts
    # slowly: it waits until the test has removed the code.
    slow = work / "slow-python"
    gone = code_dirs["gone-before-load"]
    slow.write_text(
        f'#!/bin/sh\nif [ "$1" = -m ]; then\n  touch {markers}/gone-before-load\n'
        f"  while [ -d {gone} ]; do sleep 0.1; done\nfi\n"
        f'exec {prefect_server.python} "$@"\n'
    )
    slow.chmod(0o755)

    def deployment(name: str, func: str, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "flow_name": f"host-{name}",
            "entrypoint": f"flows.py:{func}",
            "path": str(code_dirs[name]),
            **extra,
        }

    def params(name: str) -> dict[str, Any]:
        return {"parameters": {"marker": str(markers / name), "code_dir": str(code_dirs[name])}}

    with running_agent(
        work / "agent",
        api_url=prefect_server.api_url,
        python=prefect_server.python,
        name="code-trouble",
        deployments=[
            deployment("gone-at-launch", "hello"),
            deployment("gone-before-load", "hello", python=str(slow)),
            deployment("reads-its-code", "reads_its_code", **params("reads-its-code")),
            deployment("already-loaded", "already_loaded", **params("already-loaded")),
        ],
    ) as agent:
        yield agent, markers


def test_a_code_directory_missing_at_launch_is_crashed_never_launched(
    code_agent: tuple[AgentProcess, Path], code_dirs: dict[str, Path], api: Api
) -> None:
    agent, _ = code_agent
    deployment_id = api.wait_deployment("host-gone-at-launch", "gone-at-launch")
    shutil.rmtree(code_dirs["gone-at-launch"])
    run_id = api.create_run(deployment_id)
    state = api.wait_final(run_id)
    assert state["type"] == "CRASHED", (state, agent.log_text()[-3000:])
    assert state["message"] == (f"working directory does not exist: {code_dirs['gone-at-launch']}")
    assert history(api, run_id) == ["SCHEDULED", "PENDING", "CRASHED"]


@pytest.mark.parametrize(
    ("name", "final", "reason"),
    [
        # Gone before the engine loaded the flow: it exits 1, still PENDING; the agent says why.
        ("gone-before-load", "CRASHED", "the deployment's code directory {dir} no longer exists"),
        # Gone after it loaded the flow, which then reads a file of its own: the engine fails it.
        ("reads-its-code", "FAILED", "No such file or directory: 'data.txt'"),
        # Gone after it loaded the flow, which needs nothing more from it: nothing is wrong.
        ("already-loaded", "COMPLETED", ""),
    ],
)
def test_a_code_directory_that_disappears_mid_run_never_leaves_it_running(
    name: str,
    final: str,
    reason: str,
    code_agent: tuple[AgentProcess, Path],
    code_dirs: dict[str, Path],
    api: Api,
) -> None:
    agent, markers = code_agent
    directory = code_dirs[name]
    deployment_id = api.wait_deployment(f"host-{name}", name)
    run_id = api.create_run(deployment_id)
    wait_for((markers / name).exists, 60, what=f"run {run_id} to start")
    shutil.rmtree(directory)
    state = api.wait_final(run_id)
    print(f"{name}: {state['type']}: {state.get('message')}; engine said: {api.logs(run_id)}")
    assert state["type"] == final, (state, agent.log_text()[-3000:])
    assert reason.format(dir=directory) in (state.get("message") or ""), state
    types = history(api, run_id)
    assert types.count("PENDING") == 1 and types.count(final) == 1, types
    assert types[-1] == final, types
