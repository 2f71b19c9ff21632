"""The hand-over between the agent and a template's W, spoken by hand or broken on purpose:
refusals before `go` start nothing and record nothing; a peer of another uid is refused; a
failed scope move under systemd (faked busctl) gives the run to the cold launcher; a template
dies with the process that started it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_subprocess import FakeProcess

from agent.launch.base import LaunchError
from agent.launch.systemd import SystemdLauncher, start_transient_scope_argv, systemd_run_argv
from agent.launch.wrapper import read_exit_record
from agent.warm.launcher import (
    WarmHandle,
)
from agent.warm.pool import (
    PROGRAM,
)
from tests.unit.fakes.warm import (
    BLOCK,
    Warm,
    adopting_orphans,
    connection,
    eventually,
    exit_with,
    gone,
    site_packages,
    warm_setup,
)

SLICE = "runner-agent-flows.slice"


async def talk(warm: Warm, spec: dict[str, Any], *then: bytes) -> tuple[int | None, bytes]:
    """Connect to the ready template, send the spec, then `then`; (W's pid, what came back
    after the pid answer), once W is gone."""
    req = warm.request("")
    template = await warm.ready(req)
    async with connection(template) as (reader, writer):
        writer.write(json.dumps({"spec": spec}).encode() + b"\n")
        await writer.drain()
        first = json.loads(await reader.readline())
        pid = first.get("pid")
        if pid is None:
            return None, json.dumps(first).encode()
        for line in then:
            writer.write(line)
            await writer.drain()
        writer.write_eof()
        rest = await reader.read()
    await eventually(lambda: gone(pid), "W is gone")
    return pid, rest


def spec_of(warm: Warm, **env: str) -> tuple[dict[str, Any], Path]:
    req = warm.request(exit_with(0), **env)
    return warm.launcher._spec(req, warm.launcher._environment(req)), req.run_dir


async def serves(warm: Warm) -> None:
    """The template still forks runs (a refusal ended only that W)."""
    handle = await warm.launch(warm.request(exit_with(8)))
    assert isinstance(handle, WarmHandle)
    assert await handle.wait() == 8


async def test_other_interpreter_start_up_values_are_refused_before_anything_starts(
    warm: Warm,
) -> None:
    spec, run_dir = spec_of(warm)
    spec["env"] = {**spec["env"], "PYTHONHASHSEED": "7", "LANG": "de_DE.UTF-8"}
    pid, answer = await talk(warm, spec)
    assert pid is None
    assert json.loads(answer) == {
        "error": "interpreter start-up variables differ from the template's: "
        "['LANG', 'PYTHONHASHSEED']"
    }
    assert list(run_dir.iterdir()) == []
    await serves(warm)


FAILED = "the run's warm supervisor failed: "


@pytest.mark.parametrize(
    ("then", "answer"),
    [
        ((), FAILED + "RuntimeError('the agent closed the connection or sent too much')"),
        ((b'{"go": false}\n',), None),
        ((b"[1, 2]\n",), FAILED + "RuntimeError('not a JSON object')"),
        ((b"not json\n",), FAILED + "JSONDecodeError('Expecting value: line 1 column 1 (char 0)')"),
    ],
    ids=["eof", "no-go", "not-an-object", "not-json"],
)
async def test_without_go_w_starts_and_records_nothing(
    warm: Warm, then: tuple[bytes], answer: str | None
) -> None:
    spec, run_dir = spec_of(warm)
    pid, rest = await talk(warm, spec, *then)
    assert pid is not None
    assert rest == (b"" if answer is None else json.dumps({"error": answer}).encode() + b"\n")
    assert list(run_dir.iterdir()) == []
    await serves(warm)


@pytest.fixture
def passable() -> Iterator[Path]:
    """A directory another user may pass (the pool's own is 0700: this opens it on purpose)."""
    root = Path(tempfile.mkdtemp(prefix="runner-agent-warm-peer-"))
    try:
        root.chmod(0o711)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def open_to_others(socket_path: Path) -> None:
    socket_path.parent.chmod(0o711)
    socket_path.chmod(0o777)


@pytest.mark.skipif(os.geteuid() != 0, reason="connecting as another user needs root")
async def test_a_peer_of_another_uid_cannot_hand_a_run_over(
    passable: Path,
    flow_python: Path,
) -> None:
    async with warm_setup(passable, flow_python) as harness:
        req = harness.request(exit_with(0))
        template = await harness.ready(req)
        open_to_others(template.socket_path)
        spec = harness.launcher._spec(req, harness.launcher._environment(req))
        line = json.dumps({"spec": spec})
        client = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "s.connect(sys.argv[1])\n"
            "try:\n"
            "    s.sendall(sys.argv[2].encode() + b'\\n')\n"
            "    print(repr(s.recv(100)) if s.recv(100, socket.MSG_PEEK) else 'no answer')\n"
            "except OSError:\n"
            "    print('no answer')\n"
        )
        argv = ["/usr/bin/python3", "-I", "-c", client, str(template.socket_path), line]
        done = await asyncio.to_thread(
            subprocess.run, argv, user="nobody", capture_output=True, text=True, timeout=120
        )
        assert (done.returncode, done.stdout, done.stderr) == (0, "no answer\n", "")
        assert list(req.run_dir.iterdir()) == []
        assert await (await harness.launch(req)).wait() == 0  # the agent's own user may


async def test_a_failed_scope_move_is_the_runs_launch_failure(
    tmp_path: Path, flow_python: Path, fp: FakeProcess
) -> None:
    """As a failed systemd-run is for a cold run: the unit may be a live run's, so no cold start
    beside it; W, told nothing, starts nothing."""
    fp.allow_unregistered(True)  # the template itself runs for real
    systemd = SystemdLauncher(slice=SLICE, user_manager=False)
    async with warm_setup(tmp_path, flow_python, inner=systemd) as harness:
        req = harness.request(exit_with(0))
        unit = f"runner-agent-run-{req.flow_run_id}.scope"
        template = await harness.ready(req)
        shape = start_transient_scope_argv(req, [0], user_manager=False, slice=SLICE)
        at = shape.index("au") + 2
        shape[at] = fp.regex(r"^[0-9]+$")  # type: ignore[call-overload]
        move = fp.register(shape, returncode=1, stderr=f"Unit {unit} already exists.\n")
        cold = fp.register(systemd_run_argv(req, user_manager=False, slice=SLICE))
        with pytest.raises(LaunchError) as caught:
            await harness.launcher.launch(req)
        assert str(caught.value) == (
            f"StartTransientUnit for {unit} failed: Unit {unit} already exists."
        )
        [call] = move.calls
        w = int(str(list(call.args)[at]))
        assert w != template.pid
        assert list(call.args) == start_transient_scope_argv(
            req, [w], user_manager=False, slice=SLICE
        )
        assert cold.call_count() == 0
        await eventually(lambda: gone(w), "the abandoned W is gone")
        assert list(req.run_dir.iterdir()) == []


@pytest.fixture
def subreaper() -> Iterator[None]:
    with adopting_orphans():
        yield


async def test_a_template_dies_with_the_process_that_started_it(
    tmp_path: Path,
    flow_python: Path,
    subreaper: None,
) -> None:
    # A careless starter: the template inherits an open file beyond stdio, and closes it.
    starter = (
        "import os, subprocess, sys\n"
        "leak = os.open('/dev/null', os.O_RDONLY)\n"
        "argv = [sys.argv[1], sys.argv[2], 't.sock', str(os.getpid())]\n"
        "p = subprocess.Popen(argv, stderr=subprocess.PIPE, pass_fds=[leak])\n"
        "print(p.stderr.readline().decode(), flush=True)\n"
        "p.wait()\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        starter,
        str(flow_python),
        str(PROGRAM),
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    )
    left: list[int] = []
    try:
        assert process.stdout is not None
        ready = json.loads(await process.stdout.readline())
        left.append(ready["ready"])
        # The venv as it was before the imports, to tell later whether it changed.
        stamped = [path for path, _, _ in ready["stamps"]]
        assert stamped == [str(flow_python), str(site_packages(flow_python))]
        fds = open_fds(left[0])
        assert sorted(fds) == [0, 1, 2, 3] and fds[3].startswith("socket:")  # its listener
        process.kill()
        await process.wait()
        # Orphaned, it is this process's child now: reaped here once it has ended.
        await eventually(lambda: reaped(left[0]), "the template ended")
        left.clear()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            reaped(pid, block=True)


def open_fds(pid: int) -> dict[int, str]:
    return {int(fd.name): str(fd.readlink()) for fd in Path(f"/proc/{pid}/fd").iterdir()}


def reaped(pid: int, *, block: bool = False) -> bool:
    try:
        return os.waitpid(pid, 0 if block else os.WNOHANG)[0] == pid
    except ChildProcessError:
        return False


def output_fifo(run_dir: Path) -> Path:
    """W opens the run's output after `go`: a FIFO holds it there until the test reads."""
    fifo = run_dir / "output.log"
    os.mkfifo(fifo, 0o600)
    return fifo


async def test_w_supervises_its_engine_even_if_the_agent_left_after_go(
    warm: Warm, subreaper: None
) -> None:
    req = warm.request(BLOCK)
    spec = warm.launcher._spec(req, warm.launcher._environment(req))
    fifo = output_fifo(req.run_dir)
    template = await warm.ready(req)
    async with connection(template) as (reader, writer):
        writer.write(json.dumps({"spec": spec}).encode() + b"\n" + b'{"go": true}\n')
        await writer.drain()
        w = json.loads(await reader.readline())["pid"]
    # The agent is gone (died, or gave up waiting) before W could say which engine it started.
    output = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # now W gets its output, forks E
    engine = None
    try:
        marker = req.working_dir / "engine.pid"
        engine = int(await eventually(lambda: marker.exists() and marker.read_text(), "E runs"))
        (req.working_dir / "go").touch()
        await eventually(lambda: gone(w) and gone(engine), "the run ended")
        assert read_exit_record(req.run_dir) == 0
    finally:
        if engine is not None:
            with contextlib.suppress(OSError):
                os.kill(engine, signal.SIGKILL)
            reaped(engine)  # this process's child if W left it an orphan
        os.close(output)
