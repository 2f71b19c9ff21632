"""The flow-info component: the helper process (faked), its failures, and the cache."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
from pathlib import Path
from typing import Any

import pytest
from pytest_subprocess import FakeProcess

from agent.flowinfo import HELPER, FlowInfo, FlowInfoFailure, FlowInspector
from agent.flowinfo_cache import FlowInfoCache
from agent.launch.wrapper import privilege_drop
from agent.settings import DeploymentSettings, FlowRunSettings
from agent.storage import Storage
from tests.unit.fakes.schemas import SCHEMA

ANSWER = {"flow_name": "count", "description": "Counts.", "parameter_openapi_schema": SCHEMA}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Kills:
    def __init__(self) -> None:
        self.pids: list[int] = []

    def __call__(self, pid: int) -> None:
        self.pids.append(pid)


@pytest.fixture
def venv(tmp_path: Path) -> Path:
    """A venv's layout; the fake process stands in for its python."""
    root = tmp_path / "venv"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "python").write_text("")
    (root / "bin" / "python").chmod(0o755)
    (root / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
    (root / "pyvenv.cfg").write_text("home = /usr/bin\n")
    return root


@pytest.fixture
def code(tmp_path: Path) -> Path:
    directory = tmp_path / "code"
    (directory / "lib").mkdir(parents=True)
    (directory / "flow.py").write_text("from prefect import flow\n")
    (directory / "lib" / "models.py").write_text("X = 1\n")
    return directory


@pytest.fixture
def state(tmp_path: Path) -> Path:
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    return directory


def deployment(code: Path, **extra: Any) -> DeploymentSettings:
    fields: dict[str, Any] = {"name": "etl", "entrypoint": "flow.py:count", "path": str(code)}
    return DeploymentSettings(**{**fields, **extra})


def argv(venv: Path) -> list[str]:
    return [str(venv / "bin" / "python"), str(HELPER), "flow.py:count"]


def inspector(
    state: Path, venv: Path, *, clock: Clock | None = None, kills: Kills | None = None, **kw: Any
) -> FlowInspector:
    defaults = FlowRunSettings(python=str(venv / "bin" / "python"), env={"SHARED": "1"})
    return FlowInspector(
        state,
        Storage(state),
        lambda: defaults,
        clock=clock or Clock(),
        kill_group=kills or Kills(),
        **kw,
    )


async def inspect(flow_info: FlowInspector, target: DeploymentSettings) -> Any:
    """One lookup, waiting as long as it takes."""
    return (await flow_info.lookup((target,), wait=30))[target.name]


async def test_runs_the_helper_with_the_flows_python_in_its_code_dir(
    fp: FakeProcess, state: Path, venv: Path, code: Path
) -> None:
    recorder = fp.register(argv(venv), stdout=json.dumps(ANSWER))
    target = deployment(code, env={"OWN": "2"})
    info = await inspect(inspector(state, venv), target)
    assert info == FlowInfo("count", "Counts.", SCHEMA)
    [call] = recorder.calls
    assert call.kwargs is not None
    assert call.kwargs["cwd"] == code
    assert call.kwargs["start_new_session"] is True
    env = call.kwargs["env"]
    # The runs' minimal environment and the deployment's env; nothing from the agent's own.
    assert env["SHARED"] == "1" and env["OWN"] == "2"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PATH"].startswith("/usr/local/sbin")
    assert not [name for name in env if name.startswith(("PREFECT_", "RUNNER_AGENT_"))]
    assert set(env) <= {
        "PATH",
        "LANG",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "SHARED",
        "OWN",
        "PYTHONDONTWRITEBYTECODE",
    }


def test_the_helper_file_imports_nothing_from_the_agent() -> None:
    source = HELPER.read_text()
    assert "from agent" not in source and "import agent" not in source


async def test_a_timeout_kills_the_process_group(
    fp: FakeProcess, state: Path, venv: Path, code: Path
) -> None:
    recorder = fp.register(argv(venv), stdout=json.dumps(ANSWER), wait=0.5)
    kills = Kills()
    info = await inspect(inspector(state, venv, kills=kills, timeout=0.05), deployment(code))
    assert info == FlowInfoFailure("timed out after 0.05s")
    assert kills.pids == [recorder.calls[0].pid]  # the group's id is its leader's pid


@pytest.mark.parametrize(
    ("stdout", "returncode", "stderr", "reason"),
    [
        ("not json", 0, "", "malformed answer from the helper: b'not json'"),
        (
            json.dumps({"flow_name": 5}),
            0,
            "",
            "malformed answer from the helper: b'{\"flow_name\": 5}'",
        ),
        (
            json.dumps({"error": "SyntaxError: invalid syntax (flow.py, line 3)"}),
            1,
            "",
            "SyntaxError: invalid syntax (flow.py, line 3)",
        ),
        ("", 1, "Traceback ...\nMemoryError\n", "MemoryError (exit status 1)"),
        ("", -9, "", "killed by signal 9"),
        (json.dumps({"error": "E" * 5000}), 1, "", "E" * 297 + "..."),
    ],
)
async def test_failures_read_as_one_bounded_line(
    fp: FakeProcess,
    state: Path,
    venv: Path,
    code: Path,
    stdout: str,
    returncode: int,
    stderr: str,
    reason: str,
) -> None:
    fp.register(argv(venv), stdout=stdout, stderr=stderr, returncode=returncode)
    assert await inspect(inspector(state, venv), deployment(code)) == FlowInfoFailure(reason)


async def test_a_complete_answer_counts_whatever_the_exit_status(
    fp: FakeProcess, state: Path, venv: Path, code: Path
) -> None:
    # The group is killed as soon as the answer is read; the helper may not have exited yet.
    recorder = fp.register(argv(venv), stdout=json.dumps(ANSWER), returncode=-9)
    kills = Kills()
    info = await inspect(inspector(state, venv, kills=kills), deployment(code))
    assert info == FlowInfo("count", "Counts.", SCHEMA)
    assert kills.pids == [recorder.calls[0].pid]


async def test_oversize_output_is_cut_off_and_the_group_killed(
    fp: FakeProcess, state: Path, venv: Path, code: Path
) -> None:
    recorder = fp.register(argv(venv), stdout="x" * 5000)
    kills = Kills()
    info = await inspect(inspector(state, venv, kills=kills, max_output=1000), deployment(code))
    assert info == FlowInfoFailure("printed more than 1000 bytes")
    assert set(kills.pids) == {recorder.calls[0].pid}


async def test_a_missing_python_is_a_failure(fp: FakeProcess, state: Path, code: Path) -> None:
    fp.allow_unregistered(True)  # a real exec of a path that does not exist
    target = deployment(code, python="/nonexistent/venv/bin/python")
    info = await inspect(inspector(state, Path("/nonexistent/x")), target)
    assert info == FlowInfoFailure(
        "cannot run /nonexistent/venv/bin/python: No such file or directory"
    )


async def test_an_unknown_user_is_a_failure(
    fp: FakeProcess, state: Path, venv: Path, code: Path
) -> None:
    info = await inspect(inspector(state, venv), deployment(code, user="no-such-user-x"))
    assert info == FlowInfoFailure("unknown user 'no-such-user-x'")
    assert not fp.calls


async def test_another_user_runs_it_through_setpriv(
    fp: FakeProcess, state: Path, venv: Path, code: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    nobody = pwd.getpwnam("nobody")
    recorder = fp.register(
        [
            *privilege_drop(nobody),  # the one privilege drop runs use too
            *argv(venv),
        ],
        stdout=json.dumps(ANSWER),
    )
    info = await inspect(inspector(state, venv), deployment(code, user="nobody"))
    assert isinstance(info, FlowInfo)
    [call] = recorder.calls
    assert call.kwargs is not None and call.kwargs["env"]["USER"] == "nobody"


async def test_another_user_needs_a_root_agent(
    fp: FakeProcess, state: Path, venv: Path, code: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 4321)
    info = await inspect(inspector(state, venv), deployment(code, user="nobody"))
    assert info == FlowInfoFailure("cannot run flows as user 'nobody': the agent is not root")
    assert not fp.calls


# -- caching ----------------------------------------------------------------------------------


async def test_a_result_is_cached_across_restarts(
    fp: FakeProcess, state: Path, venv: Path, code: Path
) -> None:
    fp.register(argv(venv), stdout=json.dumps(ANSWER))  # once only: a second run would fail
    target = deployment(code)
    first = await inspect(inspector(state, venv), target)
    again = await inspect(inspector(state, venv), target)  # a new agent process
    assert first == again == FlowInfo("count", "Counts.", SCHEMA)
    assert fp.call_count(argv(venv)) == 1
    [entry] = (state / "flowinfo").iterdir()
    assert entry.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    "change",
    ["entry file content", "other module", "site-packages", "python", "env", "entrypoint"],
)
async def test_what_invalidates_the_cache(
    fp: FakeProcess, state: Path, venv: Path, code: Path, change: str
) -> None:
    fp.register(argv(venv), stdout=json.dumps(ANSWER), occurrences=2)
    target = deployment(code)
    await inspect(inspector(state, venv), target)
    if change == "entry file content":
        (code / "flow.py").write_text("from prefect import flow  # edited\n")
    elif change == "other module":
        (code / "lib" / "models.py").write_text("X = 22\n")
    elif change == "site-packages":  # what pip install does to it
        (venv / "lib" / "python3.11" / "site-packages" / "pydantic-9.dist-info").mkdir()
    elif change == "python":
        (venv / "pyvenv.cfg").write_text("home = /opt/python3.12/bin\n")
    elif change == "env":
        target = deployment(code, env={"PYTHONPATH": "/srv/lib"})
    else:
        fp.register([*argv(venv)[:2], "flow.py:other"], stdout=json.dumps(ANSWER))
        target = deployment(code, entrypoint="flow.py:other")
    await inspect(inspector(state, venv), target)
    assert len(fp.calls) == 2


async def test_unchanged_code_is_not_recomputed(
    fp: FakeProcess, state: Path, venv: Path, code: Path
) -> None:
    fp.register(argv(venv), stdout=json.dumps(ANSWER))
    # Ignored: bytecode caches, hidden directories, files that are not Python.
    await inspect(inspector(state, venv), deployment(code))
    (code / "__pycache__").mkdir()
    (code / "__pycache__" / "flow.cpython-311.pyc").write_text("x")
    (code / ".git").mkdir()
    (code / ".git" / "x.py").write_text("x")
    (code / "README.md").write_text("x")
    await inspect(inspector(state, venv), deployment(code))
    assert len(fp.calls) == 1


async def test_a_failure_is_remembered_for_a_while_not_stored(
    fp: FakeProcess, state: Path, venv: Path, code: Path
) -> None:
    fp.register(
        argv(venv),
        stdout=json.dumps({"error": "ModuleNotFoundError: x"}),
        returncode=1,
        occurrences=3,
    )
    clock = Clock()
    flow_info = inspector(state, venv, clock=clock)
    target = deployment(code)
    assert await inspect(flow_info, target) == FlowInfoFailure("ModuleNotFoundError: x")
    clock.now += 60
    assert await inspect(flow_info, target) == FlowInfoFailure("ModuleNotFoundError: x")
    assert len(fp.calls) == 1
    clock.now += 300
    await inspect(flow_info, target)
    assert len(fp.calls) == 2
    await inspect(inspector(state, venv), target)  # a restart tries again at once
    assert len(fp.calls) == 3
    assert not list((state / "flowinfo").glob("*.json"))


def test_the_cache_keeps_the_most_recently_used_entries(tmp_path: Path) -> None:
    cache = FlowInfoCache(tmp_path / "cache", max_entries=3)
    info = FlowInfo("f", None, {"type": "object", "properties": {}})
    for n, key in enumerate("abcd"):
        cache.put(key, info)
        os.utime(tmp_path / "cache" / f"{key}.json", ns=(n * 10**9, n * 10**9))
        if key == "c":
            assert cache.get("a") == info  # used: now the newest
    assert sorted(p.stem for p in (tmp_path / "cache").glob("*.json")) == ["a", "c", "d"]


def test_a_corrupt_cache_entry_is_a_miss(tmp_path: Path) -> None:
    cache = FlowInfoCache(tmp_path)
    (tmp_path / "k.json").write_text('{"flow_name": "f"')
    (tmp_path / "m.json").write_text('{"flow_name": "f", "parameter_openapi_schema": []}')
    assert cache.get("k") is None and cache.get("m") is None
    assert not list(tmp_path.iterdir())


def test_an_unwritable_cache_only_costs_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    FlowInfoCache(blocker / "cache").put("k", FlowInfo("f", None, {}))
    assert "could not cache a parameter schema" in caplog.text


# -- waiting ----------------------------------------------------------------------------------


async def test_a_slow_helper_is_not_waited_for_and_not_started_twice(
    fp: FakeProcess, state: Path, venv: Path, code: Path
) -> None:
    fp.register(argv(venv), stdout=json.dumps(ANSWER), wait=0.3)
    flow_info = inspector(state, venv)
    target = deployment(code)
    assert await flow_info.lookup((target,), wait=0.01) == {"etl": None}
    assert await flow_info.lookup((target,), wait=0.01) == {"etl": None}
    await asyncio.sleep(0.5)
    assert await flow_info.lookup((target,), wait=5) == {
        "etl": FlowInfo("count", "Counts.", SCHEMA)
    }
    assert len(fp.calls) == 1


async def test_a_missing_code_directory_is_named(
    fp: FakeProcess, state: Path, venv: Path, tmp_path: Path
) -> None:
    info = await inspect(inspector(state, venv), deployment(tmp_path / "gone"))
    assert info == FlowInfoFailure(f"the code directory {tmp_path / 'gone'} does not exist")
    assert not fp.calls


async def test_a_long_computation_does_not_hold_up_the_others(
    fp: FakeProcess, state: Path, venv: Path, code: Path, tmp_path: Path
) -> None:
    other_code = tmp_path / "other"
    other_code.mkdir()
    (other_code / "flow.py").write_text("")
    fp.register(argv(venv), stdout=json.dumps(ANSWER), wait=2.0)
    fp.register([*argv(venv)[:2], "flow.py:fast"], stdout=json.dumps(ANSWER))
    clock = Clock()
    flow_info = inspector(state, venv, clock=clock)
    slow = deployment(code)
    fast = deployment(other_code, name="fast", entrypoint="flow.py:fast")
    first = await flow_info.lookup((slow, fast), wait=0.2)
    assert first == {"etl": None, "fast": FlowInfo("count", "Counts.", SCHEMA)}
    clock.now += 1  # the slow one has had its wait
    # A sync again: "fast" is looked up afresh (from the cache) and waited for; "etl" is not,
    # though this lookup would wait long enough for it.
    again = await flow_info.lookup((slow, fast), wait=10)
    assert again == {"etl": None, "fast": FlowInfo("count", "Counts.", SCHEMA)}
