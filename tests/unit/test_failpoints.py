"""Failpoints: parsing RUNNER_AGENT_FAILPOINTS, what `hit` does, and the daemon's exit 78."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.failpoints import NAMES, VARIABLE, Action, FailpointError, Failpoints


def parse(text: str) -> Failpoints:
    return Failpoints.from_environ({VARIABLE: text})


def test_unset_or_empty_arms_nothing() -> None:
    assert not Failpoints.from_environ({})
    assert not parse("")
    assert not parse(" , ")


def test_every_point_and_both_actions_parse() -> None:
    armed = parse(
        "after-claim=kill, during-launch = sleep:1.5,while-running=sleep:0,after-exit=kill"
    )
    assert dict(armed.actions) == {
        "after-claim": Action("kill"),
        "during-launch": Action("sleep", 1.5),
        "while-running": Action("sleep", 0.0),
        "after-exit": Action("kill"),
    }
    assert set(armed.actions) == set(NAMES)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("after-lunch=kill", "unknown point 'after-lunch'"),
        ("after-claim=explode", "unknown action 'explode'"),
        ("after-claim", "entry 'after-claim' is not <point>=<action>"),
        ("after-claim=", "is not <point>=<action>"),
        ("=kill", "is not <point>=<action>"),
        ("after-claim=sleep:", "sleep needs a number of seconds >= 0, got ''"),
        ("after-claim=sleep:soon", "got 'soon'"),
        ("after-claim=sleep:-1", "got '-1'"),
        ("after-claim=sleep:nan", "got 'nan'"),
        ("after-claim=kill,after-claim=sleep:1", "point 'after-claim' is given twice"),
    ],
)
def test_bad_values_are_one_line_naming_the_variable(text: str, problem: str) -> None:
    with pytest.raises(FailpointError) as caught:
        parse(text)
    message = str(caught.value)
    assert message.startswith(f"environment ({VARIABLE}): ")
    assert problem in message
    assert "\n" not in message


async def test_hit_kills_only_at_an_armed_point() -> None:
    kills: list[str] = []
    armed = Failpoints({"after-claim": Action("kill")}, kill=lambda: kills.append("kill"))
    await armed.hit("while-running")
    assert kills == []
    await armed.hit("after-claim")
    assert kills == ["kill"]


async def test_hit_sleeps_for_the_given_time() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    armed = Failpoints({"during-launch": Action("sleep", 2.5)}, sleep=sleep)
    await armed.hit("during-launch")
    await armed.hit("after-exit")
    assert slept == [2.5]


def test_the_default_kill_is_sigkill_to_the_process_itself() -> None:
    # A child armed at one point dies by SIGKILL: no handler, no cleanup, exactly like a crash.
    code = (
        "import asyncio; from agent.failpoints import Failpoints, VARIABLE\n"
        "fp = Failpoints.from_environ({VARIABLE: 'after-exit=kill'})\n"
        "asyncio.run(fp.hit('after-exit'))\n"
        "print('survived')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done
    assert "survived" not in done.stdout


def test_the_agent_refuses_bad_failpoints_with_exit_78(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\nstate_dir = "{tmp_path / "state"}"\nruntime_dir = "{tmp_path / "run"}"\n'
        '[api]\nurl = "http://127.0.0.1:9/api"\n'
    )
    config.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNNER_AGENT_", "PREFECT_"))}
    env.pop("NOTIFY_SOCKET", None)
    env[VARIABLE] = "after-claim=maybe"
    done = subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(config), "run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 78, done
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    errors = [line for line in lines if line["level"] == "ERROR"]
    assert len(errors) == 1, lines
    assert f"environment ({VARIABLE}): unknown action 'maybe'" in errors[0]["message"]
    # Refused before anything was created on disk.
    assert not (tmp_path / "state").exists()
