"""`runner-agent status` and `runner-agent logs` (agent/status.py) against records in a tmp
state_dir, real processes for the psutil figures, and a fake journalctl (pytest-subprocess)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_subprocess import FakeProcess

from agent import cli, status
from agent.records import RunRecord, RunRecords

RUN_A = "11111111-1111-4111-8111-111111111111"
RUN_B = "22222222-2222-4222-8222-222222222222"
CONFIG = """
[agent]
state_dir = "{state}"
runtime_dir = "{runtime}"

[flow_run]
memory_max = "1G"
cpu_quota = "150%"
tasks_max = 64
runtime_max = "2h"

[[deployment]]
name = "small"
flow_name = "f"
entrypoint = "flow.py:f"
path = "/srv/flows"
memory_max = "100M"
runtime_max = "5s"
user = "nobody"
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(CONFIG.format(state=tmp_path / "state", runtime=tmp_path / "run"))
    path.chmod(0o600)
    return path


def main(config: Path, *argv: str, path_env: str = "/nonexistent") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(
        ["--config", str(config), *argv], environ={"PATH": path_env}, stdout=out, stderr=err
    )
    return code, out.getvalue(), err.getvalue()


# CPU seconds the busy process burns before it says it is ready. Counted on its own CPU clock,
# not the wall clock: on a loaded machine a wall-clock budget buys less CPU.
BURNT = 0.3


@pytest.fixture
def busy_process() -> Iterator[subprocess.Popen[bytes]]:
    """A 'flow' holding 64 MB that has started a grandchild, like a real run's main process."""
    code = (
        "import subprocess, sys, time\n"
        "data = b'x' * (64 << 20)\n"
        "child = subprocess.Popen(['sleep', '60'])\n"
        f"while time.process_time() < {BURNT}: pass\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    child_pid = int(proc.stdout.readline())  # after the burn
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()
        subprocess.run(["kill", "-9", str(child_pid)], check=False)


def save(config: Path, **fields: Any) -> None:
    state = config.parent / "state"
    RunRecords(state).save(RunRecord(**fields))


def test_status_json_has_records_usage_and_deployment_limits(
    config: Path, busy_process: subprocess.Popen[bytes]
) -> None:
    now = time.time()
    save(
        config,
        flow_run_id=RUN_A,
        deployment="small",
        phase="running",
        claimed_at=now - 90,
        unit=f"runner-agent-run-{RUN_A}.scope",
        pid=busy_process.pid,
        launcher="systemd",
    )
    save(
        config,
        flow_run_id=RUN_B,
        deployment="gone-from-config",
        phase="exited",
        claimed_at=now - 10,
        pid=2**22 + 12345,
        exit_status=3,
    )
    code, out, err = main(config, "status", "--json")
    took = time.time() - now
    assert (code, err) == (0, "")
    runs = json.loads(out)["runs"]
    assert [r["flow_run_id"] for r in runs] == [RUN_A, RUN_B]  # oldest claim first
    a, b = runs
    assert (a["deployment"], a["phase"], a["pid"], a["alive"]) == (
        "small",
        "running",
        busy_process.pid,
        True,
    )
    assert a["unit"] == f"runner-agent-run-{RUN_A}.scope"
    assert 90 <= a["age_seconds"] <= 90 + took
    assert a["processes"] == 2  # the main process and its `sleep` child
    assert a["rss_bytes"] >= 64 << 20
    # /proc counts CPU time in clock ticks (10 ms), process_time() to the nanosecond.
    assert a["cpu_seconds"] >= BURNT - 0.05
    # The deployment's overrides merged over [flow_run].
    assert a["limits"] == {
        "memory_max": "100M",
        "cpu_quota": "150%",
        "tasks_max": 64,
        "runtime_max": "5s",
        "user": "nobody",
        "configured": True,
    }
    assert (b["alive"], b["processes"], b["rss_bytes"], b["cpu_seconds"]) == (False, 0, None, None)
    assert b["limits"] == {
        "memory_max": "1G",
        "cpu_quota": "150%",
        "tasks_max": 64,
        "runtime_max": "2h",
        "user": None,
        "configured": False,
    }


def test_status_shows_the_limits_a_run_got_from_its_job_variables(config: Path) -> None:
    layers = {"deployment": {"cpu_quota": "50%"}, "flow run": {"memory_max": "300M"}}
    save(
        config,
        flow_run_id=RUN_A,
        deployment="small",
        phase="running",
        claimed_at=time.time(),
        pid=2**22 + 12345,
        extra={"job_variables": layers},
    )
    code, out, err = main(config, "status", "--json")
    assert (code, err) == (0, "")
    [run] = json.loads(out)["runs"]
    assert run["limits"] == {
        "memory_max": "300M",
        "cpu_quota": "50%",
        "tasks_max": 64,
        "runtime_max": "5s",
        "user": "nobody",
        "configured": True,
    }


def test_status_table(config: Path, busy_process: subprocess.Popen[bytes]) -> None:
    now = time.time()
    save(
        config,
        flow_run_id=RUN_A,
        deployment="small",
        phase="running",
        claimed_at=now - 75,
        unit=f"runner-agent-run-{RUN_A}.scope",
        pid=busy_process.pid,
    )
    save(config, flow_run_id=RUN_B, deployment="old", phase="claiming", claimed_at=None)
    code, out, _err = main(config, "status")
    took = time.time() - now
    assert code == 0
    header, row_a, row_b = out.splitlines()
    assert header.split()[:4] == ["FLOW", "RUN", "DEPLOYMENT", "PHASE"]
    cells = row_a.split()
    assert cells[:4] == [RUN_A, "small", "running", str(busy_process.pid)]
    # The age, whole seconds, from the claim to whenever the command read the clock.
    assert cells[4] in {status.human_seconds(75 + s) for s in range(int(took) + 1)}, took
    assert cells[5].endswith("M") and float(cells[5][:-1]) >= 64
    assert "mem=100M cpu=150% tasks=64 runtime=5s" in row_a
    assert row_a.endswith(f"runner-agent-run-{RUN_A}.scope")
    assert row_b.split()[:6] == [RUN_B, "old", "(not", "configured)", "claiming", "-"]


def test_status_without_runs(config: Path) -> None:
    assert main(config, "status") == (0, "no flow runs on this host\n", "")
    code, out, _ = main(config, "status", "--json")
    assert (code, json.loads(out)) == (0, {"runs": [], "warm_templates": []})


def test_status_with_a_bad_config_exits_78(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("[agent]\nlimit = 0\n")
    path.chmod(0o600)
    code, out, err = main(path, "status")
    assert (code, out) == (78, "")
    assert err.strip().endswith("agent.limit: must be >= 1, got 0")


def test_human_figures() -> None:
    assert [status.human_bytes(v) for v in (None, 512, 1536, 100 << 20, 3 << 30)] == [
        "-",
        "512B",
        "1.5K",
        "100.0M",
        "3.0G",
    ]
    assert [status.human_seconds(v) for v in (None, 4.25, 75, 3725)] == [
        "-",
        "4.2s",
        "1m15s",
        "1h02m",
    ]


@pytest.fixture
def fake_journalctl(tmp_path: Path) -> Path:
    """An executable named journalctl on PATH, so `which` finds it; fp answers for it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "journalctl"
    exe.write_text("#!/bin/sh\nexit 99\n")
    exe.chmod(0o755)
    return exe


def test_logs_reads_the_scope_journal(config: Path, fake_journalctl: Path, fp: FakeProcess) -> None:
    fp.register(
        [str(fake_journalctl), "--no-pager", "-o", "cat", "-u", f"runner-agent-run-{RUN_A}.scope"],
        stdout=["hello from the flow", "Finished in state Completed()"],
    )
    code, out, err = main(config, "logs", RUN_A, path_env=str(fake_journalctl.parent))
    assert (code, err) == (0, "")
    assert out == "hello from the flow\nFinished in state Completed()\n"


def test_logs_follow_passes_f_and_journalctl_status(
    config: Path, fake_journalctl: Path, fp: FakeProcess
) -> None:
    fp.register(
        [
            str(fake_journalctl),
            "--no-pager",
            "-o",
            "cat",
            "-u",
            f"runner-agent-run-{RUN_A}.scope",
            "-f",
        ],
        stdout="line\n",
        returncode=1,
    )
    code, out, _err = main(config, "logs", "-f", RUN_A, path_env=str(fake_journalctl.parent))
    assert (code, out) == (1, "line\n")
    assert (
        fp.call_count(
            [
                str(fake_journalctl),
                "--no-pager",
                "-o",
                "cat",
                "-u",
                f"runner-agent-run-{RUN_A}.scope",
                "-f",
            ]
        )
        == 1
    )


def test_logs_rejects_a_bad_id(config: Path, fp: FakeProcess) -> None:
    code, out, err = main(config, "logs", "not-a-uuid")
    assert (code, out) == (2, "")
    assert err == "runner-agent: not a flow run id: 'not-a-uuid'\n"
    assert len(fp.calls) == 0


def test_logs_without_journalctl_prints_the_process_launchers_output(
    config: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run" / "runs" / RUN_B
    run_dir.mkdir(parents=True)
    (run_dir / "output.log").write_text("printed by the flow\n")
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    assert main(config, "logs", RUN_B, path_env=str(empty)) == (0, "printed by the flow\n", "")
    missing = str(uuid.uuid4())
    code, out, err = main(config, "logs", missing, path_env=str(empty))
    assert (code, out) == (1, "")
    assert f"runs/{missing}/output.log: no output recorded" in err


def test_print_file_follows_until_the_file_goes(tmp_path: Path) -> None:
    path = tmp_path / "output.log"
    path.write_text("first\n")
    out = io.StringIO()
    polls = 0

    def append_then_remove(_seconds: float) -> None:
        nonlocal polls
        polls += 1
        if polls == 1:
            with path.open("a") as handle:
                handle.write("second\n")
        else:
            path.unlink()

    code = status.print_file(path, out, lambda _m: None, follow=True, sleep=append_then_remove)
    assert (code, out.getvalue()) == (0, "first\nsecond\n")
