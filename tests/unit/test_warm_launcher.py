"""Warm runs for real: WarmPool + WarmLauncher around the process launcher, a template run by a
throwaway venv's python with a fake `prefect` (tests/unit/fakes/warm.py), whose engine does what
each test asks. Warm and cold runs of the same request are compared fact by fact: the exit
status and records, the environment, identity, working directory, umask, TMPDIR, output."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import shutil
import signal
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.launch.base import LaunchRequest, SubprocessHandle, base_environment
from agent.launch.process import ProcessLauncher
from agent.launch.wrapper import read_exit_record, read_pid_record
from agent.processes import holds_open, wrapper_start_time
from agent.warm.launcher import WarmHandle
from tests.unit.fakes.warm import (
    BLOCK,
    FACTS,
    SECRET,
    Warm,
    eventually,
    exit_with,
    gone,
    make_request,
    templates,
    warm_setup,
)

HAS_TOKYO = Path("/usr/share/zoneinfo/Asia/Tokyo").exists()


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


async def warm_run(warm: Warm, req: LaunchRequest) -> WarmHandle:
    await warm.ready(req)
    handle = await warm.launch(req)
    assert isinstance(handle, WarmHandle), "the run started cold"
    return handle


async def cold_run(warm: Warm, req: LaunchRequest) -> int:
    handle = warm.runs.add(await ProcessLauncher().launch(replace(req, engine="cold")))
    assert isinstance(handle, SubprocessHandle)
    return await handle.wait()


def outcome(req: LaunchRequest) -> dict[str, Any]:
    """What a run left, then removed so that the same request can run again."""
    records = {}
    for path in sorted(req.run_dir.iterdir()):
        records[path.name] = (stat.S_IMODE(path.stat().st_mode), path.stat().st_uid)
    output = (req.run_dir / "output.log").read_text()
    facts_file = req.working_dir / "facts.json"
    facts = json.loads(facts_file.read_text()) if facts_file.exists() else None
    if facts is not None:
        del facts["authkey"]  # random per process, cold or warm
    result = {
        "exit": read_exit_record(req.run_dir),
        "records": records,
        "output": output,
        "facts": facts,
    }
    for path in [*req.run_dir.iterdir(), facts_file]:
        path.unlink(missing_ok=True)
    return result


async def test_a_warm_run_leaves_the_wrappers_records(warm: Warm) -> None:
    req = warm.request(FACTS)
    handle = await warm_run(warm, req)
    assert (handle.flow_run_id, handle.unit) == (req.flow_run_id, None)
    assert await handle.wait() == 0
    assert read_pid_record(req.run_dir) == handle.pid
    assert (req.run_dir / "pid").read_text() == f"{handle.pid}\n"
    assert (req.run_dir / "exit-status").read_text() == "0\n"
    left = outcome(req)
    assert left["records"] == {
        "exit-status": (0o600, os.getuid()),
        "output.log": (0o600, os.getuid()),
        "pid": (0o600, os.getuid()),
    }
    assert sorted(left["output"].splitlines()) == ["engine err", "engine out"]


@pytest.mark.parametrize(
    ("engine", "status"),
    [
        (exit_with(3), 3),
        ("raise SystemExit(5)", 5),
        ("import sys; sys.exit('a message')", 1),
        ("raise RuntimeError('the flow broke')", 1),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 137),
        ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", 143),
        ("import atexit, os; atexit.register(os._exit, 9)", 9),
        (
            "import threading, time\n"
            "threading.Thread(target=lambda: (time.sleep(0.2), print('late'))).start()",
            0,
        ),
    ],
)
async def test_the_exit_status_is_the_cold_runs(warm: Warm, engine: str, status: int) -> None:
    req = warm.request(engine)
    assert await (await warm_run(warm, req)).wait() == status
    warm_left = outcome(req)
    assert await cold_run(warm, req) == status
    cold_left = outcome(req)
    assert warm_left["exit"] == cold_left["exit"] == status
    assert warm_left["records"] == cold_left["records"]
    # A traceback's frames differ (E's stack starts in template.py), not what it says; the
    # cold wrapper's sh adds its own report of a signal ("Terminated"), W does not.
    assert said(warm_left["output"]) == said(cold_left["output"])


def said(output: str) -> list[str]:
    sh = ("Killed", "Terminated")
    return [line for line in output.splitlines() if not line.startswith((" ", *sh))]


def expected_env(req: LaunchRequest) -> dict[str, str]:
    return {**base_environment(req.user, extra=req.env), "PWD": str(req.working_dir)}


async def test_the_engine_is_the_cold_engine_fact_by_fact(warm: Warm) -> None:
    home = warm.base / "home"
    home.mkdir()
    req = warm.request(
        FACTS, HOME=str(home), PREFECT_LOGGING_LEVEL="DEBUG", PYTHONUNBUFFERED="1", TZ="Asia/Tokyo"
    )
    with umask(0o022):
        await warm.ready(req)
    with umask(0o027):  # the agent's umask at launch is the run's, not the template's
        assert await (await warm_run(warm, req)).wait() == 0
        warm_left = outcome(req)
        assert await cold_run(warm, req) == 0
        cold_left = outcome(req)
    assert warm_left == cold_left
    facts = warm_left["facts"]
    if HAS_TOKYO:  # the template imported with no TZ: time.tzset() in E
        assert facts["tz"] == ["JST", "JST"]
    # Exactly the run's environment: nothing of the template's (PREFECT_HOME, its PATH order).
    assert facts["env"] == expected_env(req)
    assert facts["context"] == facts["env"]  # Prefect's settings, from the run's environment
    assert facts["logging"] == {"level": "DEBUG", "setups": 1}
    assert facts["prefect_home"] == str(home / ".prefect")
    assert facts["umask"] == 0o027
    assert facts["cwd"] == facts["path0"] == str(req.working_dir)
    assert facts["tmp"] == req.env["TMPDIR"]
    assert facts["main"].endswith("/site-packages/prefect/engine.py")
    assert facts["argv"] == [facts["main"]]
    assert facts["engine_module"] is False
    assert facts["dont_write_bytecode"] is True
    assert facts["stdin"] == "/dev/null"
    assert facts["fds"] == [0, 1, 2, 3]  # stdio and the listing's own
    assert facts["signals"] == [str(signal.SIG_DFL), str(signal.default_int_handler)]
    assert facts["session_leader"] is True
    assert facts["ids"] == [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), facts["ids"][4]]


@pytest.fixture
def shared() -> Iterator[Path]:
    """Runs of another user need a way to their directories (tmp_path's are 0700)."""
    root = Path(tempfile.mkdtemp(prefix="runner-agent-warm-user-"))
    try:
        root.chmod(0o755)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def writable_request(base: Path, python: Path, engine: str) -> LaunchRequest:
    req = make_request(base, python, engine)
    req.working_dir.chmod(0o777)
    return req


@pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user needs root")
async def test_as_another_user_only_the_engine_changes_user(warm: Warm, shared: Path) -> None:
    req = replace(writable_request(shared, warm.python, FACTS), user="nobody")
    assert await (await warm_run(warm, req)).wait() == 0
    warm_left = outcome(req)
    assert await cold_run(warm, req) == 0
    assert warm_left == outcome(req)
    entry = pwd.getpwnam("nobody")
    uid, gid = entry.pw_uid, entry.pw_gid
    groups = sorted(set(os.getgrouplist("nobody", gid)))
    assert warm_left["facts"]["ids"] == [uid, uid, gid, gid, groups]
    assert warm_left["facts"]["env"]["HOME"] == entry.pw_dir
    assert warm_left["facts"]["dumpable"] == 1  # py-spy, gdb, core dumps: as cold
    # The records stay the agent's: W did not change user.
    assert {owner for _, owner in warm_left["records"].values()} == {0}


async def test_bytecode_setting_is_per_run_and_shares_the_template(warm: Warm) -> None:
    writes = warm.request(FACTS)
    writes = replace(
        writes, env={k: v for k, v in writes.env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    )
    quiet = warm.request(FACTS)
    assert warm.key(writes) == warm.key(quiet)
    assert await (await warm_run(warm, writes)).wait() == 0
    assert await (await warm_run(warm, quiet)).wait() == 0
    assert outcome(writes)["facts"]["dont_write_bytecode"] is False
    assert outcome(quiet)["facts"]["dont_write_bytecode"] is True
    assert [t.forks for t in templates(warm.pool)] == [2]


async def test_each_warm_run_has_its_own_multiprocessing_authkey(warm: Warm) -> None:
    """Forks would share the template's: one run could then talk to another's manager."""
    runs = [warm.request(FACTS) for _ in range(3)]
    for req in runs:
        assert await (await warm_run(warm, req)).wait() == 0
    keys = {json.loads((req.working_dir / "facts.json").read_text())["authkey"] for req in runs}
    assert len(keys) == 3


async def started(req: LaunchRequest) -> int:
    marker = req.working_dir / "engine.pid"
    await eventually(marker.exists, "the engine started")
    return int(await eventually(lambda: marker.read_text(), "the engine's pid"))


async def test_terminate_lets_w_record_the_engines_sigterm(warm: Warm) -> None:
    req = warm.request(BLOCK)
    handle = await warm_run(warm, req)
    engine = await started(req)
    assert engine in [p.pid for p in psutil.Process(handle.pid).children()]
    await warm.launcher.terminate(handle)
    assert await handle.wait() == 143
    assert read_exit_record(req.run_dir) == 143
    await eventually(lambda: gone(engine), "the engine is gone")


async def test_kill_takes_w_too_and_leaves_no_exit_record(warm: Warm) -> None:
    req = warm.request(BLOCK + "\nimport signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n")
    handle = await warm_run(warm, req)
    await started(req)
    await warm.launcher.kill(handle)
    assert await handle.wait() == 137
    assert read_exit_record(req.run_dir) is None
    assert await warm.launcher.unit_result(handle) is None


async def test_an_engine_killed_alone_is_recorded_137(warm: Warm) -> None:
    req = warm.request(BLOCK)
    handle = await warm_run(warm, req)
    os.kill(await started(req), signal.SIGKILL)
    assert await handle.wait() == 137
    assert read_exit_record(req.run_dir) == 137  # W lived to record it


async def test_w_is_this_runs_wrapper_for_recovery_while_it_runs(warm: Warm) -> None:
    req = warm.request(BLOCK)
    other = warm.request("")
    handle = await warm_run(warm, req)
    engine = await started(req)
    assert handle.pid is not None
    w = handle.pid
    assert holds_open(w, req.run_dir)
    assert wrapper_start_time(w, req.run_dir) == psutil.Process(w).create_time()
    assert wrapper_start_time(w, other.run_dir) is None  # another run's directory
    assert not holds_open(engine, req.run_dir)  # E closed W's hold
    assert wrapper_start_time(engine, req.run_dir) is None
    (req.working_dir / "go").touch()
    assert await handle.wait() == 0
    assert wrapper_start_time(w, req.run_dir) is None


async def test_runs_of_one_template_run_side_by_side(warm: Warm) -> None:
    first, second = warm.request(BLOCK), warm.request(BLOCK)
    handles = [await warm_run(warm, first), await warm_run(warm, second)]
    engines = [await started(first), await started(second)]
    assert len({h.pid for h in handles}) == 2 and len(set(engines)) == 2
    [template] = templates(warm.pool)
    assert template.forks == 2
    assert {h.pid for h in handles} <= {p.pid for p in psutil.Process(template.pid).children()}
    for req in (second, first):
        (req.working_dir / "go").touch()
    assert [await h.wait() for h in handles] == [0, 0]


def writable_memory(pid: int) -> Iterator[bytes]:
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            if "w" not in fields[1] or (len(fields) > 5 and fields[5].startswith("[v")):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            mem.seek(start)
            try:
                yield mem.read(end - start)
            except OSError:
                continue


async def test_no_run_data_reaches_the_template(warm: Warm) -> None:
    req = warm.request(FACTS)
    template = await warm.ready(req)
    assert template.pid is not None
    assert await (await warm_run(warm, req)).wait() == 0
    environ = psutil.Process(template.pid).environ()
    assert environ == {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "PREFECT_HOME": str(warm.pool.directory / "prefect-home"),
    }
    assert SECRET not in " ".join(psutil.Process(template.pid).cmdline())
    try:
        chunks = list(writable_memory(template.pid))
    except PermissionError:
        pytest.skip("cannot read the template's memory here")
    assert chunks
    assert not any(SECRET.encode() in chunk for chunk in chunks)
    assert not any(str(req.flow_run_id).encode() in chunk for chunk in chunks)


@pytest.mark.parametrize(
    "changes",
    [{"engine": "cold"}, {"kind": "hook"}, {"capture_output": True}],
    ids=["cold", "hook", "captured"],
)
async def test_what_is_not_a_warm_engine_run_goes_to_the_wrapped_launcher(
    warm: Warm, changes: dict[str, Any]
) -> None:
    req = replace(warm.request(exit_with(4)), **changes)
    handle = await warm.launch(req)
    assert isinstance(handle, SubprocessHandle)
    if handle.output is not None:
        await handle.output.read()
    assert await handle.wait() == 4
    assert templates(warm.pool) == []  # no template was even started


async def test_a_socket_path_too_long_for_sun_path_is_reached_through_the_directory(
    tmp_path: Path,
    flow_python: Path,
) -> None:
    deep = tmp_path / ("d" * 100)
    async with warm_setup(deep, flow_python) as harness:
        req = harness.request(exit_with(6))
        template = await harness.ready(req)
        assert len(str(template.socket_path)) > 108
        assert await (await warm_run(harness, req)).wait() == 6


async def test_a_supervisor_that_fails_after_go_ends_the_run_with_70_and_says_why(
    warm: Warm, caplog: pytest.LogCaptureFixture
) -> None:
    req = warm.request(exit_with(0))
    (req.run_dir / "output.log").mkdir()  # W cannot open the run's output
    with caplog.at_level(logging.WARNING, logger="agent.warm"):
        handle = await warm_run(warm, req)
    assert await handle.wait() == 70  # recorded: not taken for a SIGKILL (137)
    assert read_exit_record(req.run_dir) == 70
    assert read_pid_record(req.run_dir) == handle.pid  # at once after `go`: adoptable
    assert [r.getMessage() for r in caplog.records] == [
        f"warm start of run {req.flow_run_id} failed before its engine started: the run's "
        "warm supervisor failed: IsADirectoryError(21, 'Is a directory')"
    ]


async def test_pythonsafepath_keeps_the_working_directory_off_sys_path(warm: Warm) -> None:
    req = warm.request(FACTS, PYTHONSAFEPATH="1")
    assert await (await warm_run(warm, req)).wait() == 0
    warm_left = outcome(req)
    assert await cold_run(warm, req) == 0
    assert warm_left == outcome(req)
    assert warm_left["facts"]["cwd_on_path"] is False
