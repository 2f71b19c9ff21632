"""Warm runs under a real systemd 252 with enforced limits. Issue 17, question 3.

    RUNNER_AGENT_TEST_PREFECT_VENV=$P $A/bin/python -m bench.warm_proto.scope_check [--out F]

The host part boots the system test bed (tests/system/testbed.py, the host's OS with enforced
v1 limits), starts a Prefect server on the host (the container shares the network) and runs the
inner part inside the container as a transient service, `warm-driver.service`, which plays the
agent (the agent's own cgroup). The inner part checks, and times:

1. `busctl call ... StartTransientUnit` moving an EXISTING pid into a new scope with
   MemoryMax/TasksMax/CPUQuota: how long the call takes, how long until the pid is in the
   scope in every hierarchy, that the limits are written, and that an allocation over
   MemoryMax is OOM-killed (137).
2. A template in its own scope (`runner-agent-warm-<hash>.scope`, started with
   `systemd-run --scope` by the driver): never in the driver's cgroup.
3. Warm runs: W moved into `runner-agent-run-<id>.scope` before it forks E; both in the scope,
   the template still in its own; created -> RUNNING next to cold runs (agent.units argv).
4. `systemctl kill --kill-who=all` of one run's scope reaches that run only (template and a
   second run live on); W records E's status.
5. OOM of a warm run at MemoryMax (137 recorded by W; the template lives on), memory charged
   to a warm run's scope next to a cold one's.
6. Stopping the template's scope (an agent upgrade) leaves running warm runs alone.
7. The flow's output reaches the journal under the run's unit and identifier.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from agent.launch.base import LaunchRequest, base_environment
from agent.launch.systemd import systemd_run_argv
from agent.states import pending_state
from bench.api import BenchApi
from bench.warm_proto.measure import ENGINE_RETRIES, FLOWS, pct
from bench.warm_proto.pool import (
    ForkTemplate,
    RunSpec,
    WarmHandle,
    start_transient_scope_argv,
    template_environment,
)
from tests.integration.prefect_server import PrefectServer, prefect_venv

SLICE = "runner-agent-flows.slice"
RUNS = Path("/run/warm-check/runs")
REPO = Path(__file__).resolve().parents[2]


# -- inside the container ------------------------------------------------------------------


def cgroup_of(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, key, path = line.split(":", 2)
        out[key or "v2"] = path
    return out


def controller_file(controller: str, where: dict[str, str], name: str) -> str:
    """A cgroup v1 file of `controller` for the process whose /proc/<pid>/cgroup is `where`."""
    key = next((k for k in where if controller in k.split(",")), None)
    mount = next(
        (
            d
            for d in Path("/sys/fs/cgroup").iterdir()
            if controller in d.name.split(",") and not d.is_symlink()
        ),
        None,
    )
    if key is None or mount is None:
        return f"no {controller} hierarchy in {sorted(where)}"
    try:
        return (mount / where[key].lstrip("/") / name).read_text().strip()
    except OSError as exc:
        return f"unreadable: {exc.strerror}"


def mib(text: str) -> float | str:
    return int(text) / 2**20 if text.isdigit() else text


def systemctl(*args: str) -> str:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False).stdout


def show(unit: str, *props: str) -> dict[str, str]:
    out = systemctl("show", unit, "--property=" + ",".join(props))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def move(
    unit: str,
    pid: int,
    *,
    memory_max: int | None = None,
    tasks_max: int | None = None,
    cpu_quota: int | None = None,
) -> float:
    """Move `pid` into a new scope; returns the seconds busctl took."""
    argv = start_transient_scope_argv(
        unit,
        [pid],
        slice=SLICE,
        description=f"warm check {unit}",
        memory_max=memory_max,
        tasks_max=tasks_max,
        cpu_quota=cpu_quota,
        runtime_max=None,
    )
    began = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, text=True)
    return time.monotonic() - began


def wait_moved(pid: int, unit: str, timeout: float = 10.0) -> float:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if cgroup_of(pid).get("name=systemd", "").endswith("/" + unit):
            return time.monotonic() - began
        time.sleep(0.0005)
    raise RuntimeError(f"{pid} not in {unit}")


def check_busctl_move() -> dict[str, Any]:
    """1. An existing process, moved, limited, OOM-killed; and the move's cost, ten times."""
    result: dict[str, Any] = {}
    victim = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.readline(); x = b'x' * (200 << 20)"],
        stdin=subprocess.PIPE,
    )
    assert victim.stdin is not None
    unit = "ratb-move-oom.scope"
    result["before"] = cgroup_of(victim.pid)
    result["busctl_s"] = move(unit, victim.pid, memory_max=50 << 20, tasks_max=5, cpu_quota=20)
    result["until_moved_s"] = wait_moved(victim.pid, unit)
    time.sleep(0.05)  # the other hierarchies follow the tracking one
    where = cgroup_of(victim.pid)
    result["after"] = where
    result["memory.limit_in_bytes"] = controller_file("memory", where, "memory.limit_in_bytes")
    result["pids.max"] = controller_file("pids", where, "pids.max")
    result["cpu.cfs_quota_us"] = controller_file("cpu", where, "cpu.cfs_quota_us")
    result["unit"] = show(
        unit, "ActiveState", "MemoryMax", "TasksMax", "CPUQuotaPerSecUSec", "Slice"
    )
    victim.stdin.write(b"go\n")
    victim.stdin.close()
    result["allocation_over_MemoryMax_exit"] = victim.wait(30)
    if result["allocation_over_MemoryMax_exit"] < 0:
        result["allocation_over_MemoryMax_exit"] = 128 - result["allocation_over_MemoryMax_exit"]
    calls, moves = [], []
    for i in range(10):
        sleeper = subprocess.Popen(["sleep", "30"])
        name = f"ratb-move-{i}.scope"
        calls.append(move(name, sleeper.pid, memory_max=100 << 20, tasks_max=50, cpu_quota=100))
        moves.append(wait_moved(sleeper.pid, name) + calls[-1])
        sleeper.kill()
        sleeper.wait()
    result["busctl_call_p50_s"] = statistics.median(calls)
    result["call_until_moved_p50_s"] = statistics.median(moves)
    return result


class Runs:
    def __init__(self, api: BenchApi, api_url: str, python: str, home: Path) -> None:
        self.api, self.api_url, self.python, self.home = api, api_url, python, home
        self.deployments: dict[str, str] = {}

    def deploy(self, name: str, entrypoint: str) -> None:
        flow = self.api.request("POST", "/flows/", json={"name": name}).json()
        body = {"name": name, "flow_id": flow["id"], "path": str(FLOWS), "entrypoint": entrypoint}
        self.deployments[name] = self.api.request("POST", "/deployments/", json=body).json()["id"]

    def create(self, name: str, parameters: dict[str, Any] | None = None) -> str:
        response = self.api.request(
            "POST",
            f"/deployments/{self.deployments[name]}/create_flow_run",
            json={"parameters": parameters or {}},
        )
        run_id = str(response.json()["id"])
        self.api.request("POST", f"/flow_runs/{run_id}/set_state", json={"state": pending_state()})
        return run_id

    def env(self, run_id: str, tmpdir: Path) -> dict[str, str]:
        env = base_environment("", extra={"HOME": str(self.home)})
        env.update(
            PREFECT__FLOW_RUN_ID=run_id,
            PREFECT_API_URL=self.api_url,
            TMPDIR=str(tmpdir),
            PYTHONDONTWRITEBYTECODE="1",
            PREFECT_CLIENT_MAX_RETRIES=ENGINE_RETRIES,
        )
        return env

    def dirs(self, run_id: str) -> tuple[Path, Path]:
        run_dir, tmpdir = RUNS / run_id, RUNS / run_id / "tmp"
        tmpdir.mkdir(parents=True)
        return run_dir, tmpdir

    def warm(
        self,
        template: ForkTemplate,
        run_id: str,
        memory_max: int | None = None,
    ) -> tuple[WarmHandle, dict[str, float]]:
        run_dir, tmpdir = self.dirs(run_id)
        unit = f"runner-agent-run-{run_id}.scope"
        spec = RunSpec(
            run_id=run_id,
            env=self.env(run_id, tmpdir),
            cwd=str(FLOWS),
            run_dir=str(run_dir),
            umask=0o022,
            scope=unit,
            output={"journal": f"runner-agent-run-{run_id}"},
        )
        times: dict[str, float] = {}

        def scope(pid: int) -> None:
            times["busctl_s"] = move(unit, pid, memory_max=memory_max, tasks_max=512, cpu_quota=200)

        began = time.monotonic()
        handle = template.launch(spec, move=scope)
        times["launch_s"] = time.monotonic() - began
        return handle, times

    def cold(self, run_id: str, memory_max: int | None = None) -> subprocess.Popen[bytes]:
        run_dir, tmpdir = self.dirs(run_id)
        req = LaunchRequest(
            flow_run_id=uuid.UUID(run_id),
            flow_run_name="x",
            deployment_name="x",
            working_dir=FLOWS,
            python=self.python,
            memory_max=memory_max,
            cpu_quota=200,
            tasks_max=512,
            runtime_max=None,
            user="",
            env=self.env(run_id, tmpdir),
            run_dir=run_dir,
            slice=SLICE,
        )
        argv = systemd_run_argv(req, user_manager=False, slice=SLICE)
        return subprocess.Popen(
            argv, cwd=FLOWS, env=dict(req.env), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )

    def start_p(self, run_id: str) -> float | None:
        line = self.api.timeline(run_id)
        return line.start

    def wait_state(self, run_id: str, state: str, timeout: float = 60) -> None:
        self.api.wait_states([run_id], frozenset({state}), timeout, what=f"{run_id} {state}")


def record(run_id: str, name: str) -> str | None:
    try:
        return (RUNS / run_id / name).read_text().strip()
    except OSError:
        return None


def inner(api_url: str) -> dict[str, Any]:
    report: dict[str, Any] = {"driver_cgroup": cgroup_of(os.getpid())}
    report["busctl_move"] = check_busctl_move()
    venv = prefect_venv(os.environ)
    python = str(venv / "bin" / "python")
    work = Path(tempfile.mkdtemp(prefix="warm-check-"))
    home = work / "home"
    home.mkdir()
    api = BenchApi(api_url)
    runs = Runs(api, api_url, python, home)
    for name, entry in (
        ("noop", "noop.py:noop"),
        ("sleeper", "sleeper.py:sleeper"),
        ("hog", "hog.py:hog"),
    ):
        runs.deploy(name, entry)
    key = hashlib.sha256(python.encode()).hexdigest()[:12]
    warm_unit = f"runner-agent-warm-{key}.scope"
    prefix = [
        "systemd-run",
        "--scope",
        "--quiet",
        "--collect",
        f"--unit={warm_unit}",
        f"--slice={SLICE}",
        "-p",
        "TasksMax=64",
        "--",
    ]
    env = template_environment({"PYTHONDONTWRITEBYTECODE": "1"}, work / "template-home")
    (work / "template-home").mkdir()
    template = ForkTemplate(python, env, work, prefix=prefix)
    try:
        template.wait_ready()
        report["template"] = {
            "cgroup": cgroup_of(template.pid),
            "tasks": len(list(Path(f"/proc/{template.pid}/task").iterdir())),
            "ready": template.process.ready_info,
        }
        # 3. warm and cold no-op runs, alternating
        warm_starts, cold_starts, busctl, launch = [], [], [], []
        for _ in range(6):
            run_id = runs.create("noop")
            handle, times = runs.warm(template, run_id)
            status = handle.wait(120)
            warm_starts.append(runs.start_p(run_id))
            busctl.append(times["busctl_s"])
            launch.append(times["launch_s"])
            assert status == 0, (status, record(run_id, "exit-status"))
            cold_id = runs.create("noop")
            proc = runs.cold(cold_id)
            assert proc.wait(120) == 0
            cold_starts.append(runs.start_p(cold_id))
        report["noop"] = {
            "warm_start_p50_s": pct([s for s in warm_starts if s], 0.5),
            "cold_start_p50_s": pct([s for s in cold_starts if s], 0.5),
            "warm_starts": warm_starts,
            "cold_starts": cold_starts,
            "busctl_p50_s": pct(busctl, 0.5),
            "launch_p50_s": pct(launch, 0.5),
        }
        subprocess.run(["journalctl", "--sync"], check=False)
        report["noop"]["journal_identifier_lines"] = subprocess.run(
            ["journalctl", "--no-pager", "-q", "-t", f"runner-agent-run-{run_id}"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.count("flow run")
        report["noop"]["journal_unit_lines"] = subprocess.run(
            ["journalctl", "--no-pager", "-q", "-u", f"runner-agent-run-{run_id}.scope"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.count("flow run")
        report["kill_one_run"] = check_kill(runs, template)
        report["oom"] = check_oom(runs, template)
        report["memory_charged"] = check_memory(runs, template)
        report["template_stop"] = check_template_stop(runs, template, warm_unit)
    finally:
        template.stop()
        systemctl("stop", warm_unit)
        api.close()
    return report


def check_kill(runs: Runs, template: ForkTemplate) -> dict[str, Any]:
    a, b = runs.create("sleeper", {"seconds": 30}), runs.create("sleeper", {"seconds": 6})
    ha, _ = runs.warm(template, a)
    hb, _ = runs.warm(template, b)
    runs.wait_state(a, "RUNNING")
    runs.wait_state(b, "RUNNING")
    unit_a = f"runner-agent-run-{a}.scope"
    out: dict[str, Any] = {
        "W_cgroup": cgroup_of(ha.pid)["name=systemd"],
        "E_cgroup": cgroup_of(ha.engine)["name=systemd"],
        "E_memory_cgroup": cgroup_of(ha.engine)["memory"],
        "template_cgroup": cgroup_of(template.pid)["name=systemd"],
        "scope_limits": show(unit_a, "MemoryMax", "TasksMax", "CPUQuotaPerSecUSec", "Slice"),
        "scope_pids": sorted(
            int(p)
            for p in controller_file("pids", cgroup_of(ha.engine), "cgroup.procs").split()
            if p.isdigit()
        ),
        "W_and_E": sorted([ha.pid, ha.engine]),
    }
    systemctl("kill", "--kill-who=all", "--signal=SIGTERM", unit_a)
    out["killed_run_status"] = ha.wait(60)
    out["killed_run_exit_record"] = record(a, "exit-status")
    out["template_alive_after_kill"] = template.process.proc.poll() is None
    out["other_run_state_after_kill"] = runs.api.state_types([b])[b]
    out["other_run_status"] = hb.wait(120)
    out["other_run_final"] = runs.api.state_types([b])[b]
    out["killed_run_final"] = runs.api.state_types([a])[a]
    # the same kill of a cold run, for comparison
    c = runs.create("sleeper", {"seconds": 30})
    proc = runs.cold(c)
    runs.wait_state(c, "RUNNING")
    systemctl("kill", "--kill-who=all", "--signal=SIGTERM", f"runner-agent-run-{c}.scope")
    out["cold_killed_run_status"] = proc.wait(60)
    out["cold_killed_run_exit_record"] = record(c, "exit-status")
    time.sleep(1)
    out["cold_killed_run_final"] = runs.api.state_types([c])[c]
    return out


def check_oom(runs: Runs, template: ForkTemplate) -> dict[str, Any]:
    warm_id = runs.create("hog", {"megabytes": 300})
    handle, _ = runs.warm(template, warm_id, memory_max=100 << 20)
    status = handle.wait(120)
    cold_id = runs.create("hog", {"megabytes": 300})
    cold_status = runs.cold(cold_id, memory_max=100 << 20).wait(120)
    return {
        "warm_status": status,
        "warm_exit_record": record(warm_id, "exit-status"),
        "template_alive": template.process.proc.poll() is None,
        "cold_status": cold_status,
        "cold_exit_record": record(cold_id, "exit-status"),
    }


def check_memory(runs: Runs, template: ForkTemplate) -> dict[str, Any]:
    """memory.usage_in_bytes of a sleeping warm run's scope vs a cold one's."""
    out: dict[str, Any] = {}
    warm_id = runs.create("sleeper", {"seconds": 8})
    handle, _ = runs.warm(template, warm_id)
    cold_id = runs.create("sleeper", {"seconds": 8})
    proc = runs.cold(cold_id)
    runs.wait_state(warm_id, "RUNNING")
    runs.wait_state(cold_id, "RUNNING")
    time.sleep(2)
    for label, run_id in (("warm", warm_id), ("cold", cold_id)):
        unit = f"runner-agent-run-{run_id}.scope"
        where = {"memory": show(unit, "ControlGroup")["ControlGroup"]}
        out[f"{label}_scope_memory_usage_mib"] = mib(
            controller_file("memory", where, "memory.usage_in_bytes")
        )
    out["template_scope_memory_usage_mib"] = mib(
        controller_file("memory", cgroup_of(template.pid), "memory.usage_in_bytes")
    )
    out["warm_status"] = handle.wait(60)
    out["cold_status"] = proc.wait(60)
    return out


def check_template_stop(runs: Runs, template: ForkTemplate, warm_unit: str) -> dict[str, Any]:
    run_id = runs.create("sleeper", {"seconds": 6})
    handle, _ = runs.warm(template, run_id)
    runs.wait_state(run_id, "RUNNING")
    systemctl("stop", warm_unit)
    time.sleep(0.5)
    out: dict[str, Any] = {
        "template_alive": template.process.proc.poll() is None,
        "run_state_after_stop": runs.api.state_types([run_id])[run_id],
        "W_parent_after_stop": Path(f"/proc/{handle.pid}/stat")
        .read_text()
        .rpartition(")")[2]
        .split()[1],
    }
    out["run_status"] = handle.wait(120)
    out["run_final"] = runs.api.state_types([run_id])[run_id]
    out["exit_record"] = record(run_id, "exit-status")
    return out


# -- on the host ----------------------------------------------------------------------------


def host(api_url: str | None, out: Path | None) -> int:
    from tests.system.testbed import CACHE, Container

    venv = prefect_venv(os.environ)
    agent_python = sys.executable
    server = None
    tmp = Path(tempfile.mkdtemp(prefix="warm-scope-"))
    if api_url is None:
        server = PrefectServer(venv, tmp / "server")
        server.start()
        api_url = server.api_url
    # The agent venv's editable install points at the main checkout: bind it too (read-only).
    binds = [str(CACHE), str(REPO)]
    for line in Path(agent_python).parent.parent.glob(
        "lib/python3*/site-packages/__editable___*finder.py"
    ):
        text = line.read_text()
        binds += sorted({p for p in ("/work/main",) if p in text and p not in binds})
    container = Container.host(binds_ro=binds)
    try:
        container.start()
        container.verify_limits_enforced()
        result = container.exec(
            [
                "systemd-run",
                "--unit=warm-driver.service",
                "--wait",
                "--pipe",
                "--quiet",
                "--collect",
                "-p",
                f"WorkingDirectory={REPO}",
                "-E",
                f"PYTHONPATH={REPO}",
                "-E",
                f"RUNNER_AGENT_TEST_PREFECT_VENV={venv}",
                agent_python,
                "-m",
                "bench.warm_proto.scope_check",
                "inner",
                "--api-url",
                api_url,
            ],
            check=False,
            timeout=900,
        )
        sys.stderr.write(result.stderr[-5000:])
        text = result.stdout
        if out is not None:
            out.write_text(text)
        print(text)
        return result.returncode
    finally:
        container.close()
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.warm_proto.scope_check")
    parser.add_argument("part", nargs="?", default="host", choices=["host", "inner"])
    parser.add_argument("--api-url", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.part == "inner":
        report = inner(args.api_url)
        print(json.dumps(report, indent=1, default=str))
        return 0
    return host(args.api_url, args.out)


if __name__ == "__main__":
    sys.exit(main())
