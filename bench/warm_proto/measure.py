"""Issue 17's measurement: cold `python -m prefect.engine` vs (a) fork from a template vs (b) a
pre-started process per run, against a real Prefect server, on this machine.

From the repository root, in the agent's venv:

    RUNNER_AGENT_TEST_PREFECT_VENV=$P $A/bin/python -m bench.warm_proto.measure \\
        [--sequential 12] [--burst 24] [--limit 4] [--out warm.json]

The harness plays the agent: it creates a run, proposes PENDING (the claim), launches it the
chosen way (same environment, working directory, wrapper records in every mode) and waits for
it. Latencies come from the server's state timestamps; CPU is the engine's process tree
(cold: wait4 of the wrapper; fork: W's own rusage record of itself and E; handover: wait4 of
the process, which includes the imports it did before the hand-over). Everything started is
stopped at the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from agent.launch.base import base_environment, find_user
from agent.launch.wrapper import WRAPPER, WRAPPER_NAME, privilege_drop
from agent.states import pending_state
from bench.api import BenchApi
from bench.warm_proto.pool import (
    ForkTemplate,
    HandoverPool,
    RunSpec,
    WarmHandle,
    WarmRefused,
    template_environment,
)
from tests.integration.prefect_server import PrefectServer, prefect_venv

FLOWS = Path(__file__).with_name("flows")
MODES = ("cold", "fork", "handover")
ENGINE_RETRIES = "7"


@dataclass
class RunResult:
    mode: str
    run_id: str
    status: int
    cpu: float  # the engine's process tree, CPU-s
    cpu_after_handover: float | None  # (b) only: what E used after the hand-over
    launched_at: float  # POSIX time the harness started the launch
    fallback: bool = False  # (b) no ready process: started cold
    start: float | None = None  # created -> RUNNING (server)
    launch_to_running: float | None = None
    total: float | None = None
    final: str | None = None
    phases: dict[str, float] | None = None


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class Harness:
    def __init__(
        self, api: BenchApi, python: str, work: Path, api_url: str, flow_env: Mapping[str, str]
    ) -> None:
        self.api = api
        self.python = python
        self.work = work
        self.api_url = api_url
        self.flow_env = dict(flow_env)
        self.deployments: dict[str, str] = {}
        self.template: ForkTemplate | None = None
        self.handover: HandoverPool | None = None
        self.handover_wait = False

    # -- server objects --------------------------------------------------------------------

    def deploy(self, name: str, entrypoint: str) -> str:
        flow = self.api.request("POST", "/flows/", json={"name": name}).json()
        body = {"name": name, "flow_id": flow["id"], "path": str(FLOWS), "entrypoint": entrypoint}
        dep = self.api.request("POST", "/deployments/", json=body).json()
        self.deployments[name] = str(dep["id"])
        return self.deployments[name]

    def create_and_claim(self, deployment: str) -> str:
        run_id = self.api.create_run(self.deployments[deployment])
        self.claim(run_id)
        return run_id

    def claim(self, run_id: str) -> None:
        answer = self.api.request(
            "POST", f"/flow_runs/{run_id}/set_state", json={"state": pending_state()}
        ).json()
        if answer.get("status") != "ACCEPT":
            raise RuntimeError(f"claim of {run_id} refused: {answer}")

    # -- one run ----------------------------------------------------------------------------

    def environment(
        self, run_id: str, tmpdir: Path, extra: Mapping[str, str], user: str = ""
    ) -> dict[str, str]:
        """What the agent gives the engine (launcher.base_environment + engine_environment)."""
        env = base_environment(user, extra=self.flow_env)
        env.update(extra)
        env["PREFECT__FLOW_RUN_ID"] = run_id
        env["PREFECT_API_URL"] = self.api_url
        env["TMPDIR"] = str(tmpdir)
        env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
        env.setdefault("PREFECT_CLIENT_MAX_RETRIES", ENGINE_RETRIES)
        return env

    def dirs(self, run_id: str) -> tuple[Path, Path]:
        run_dir = self.work / "runs" / run_id
        tmpdir = self.work / "state" / run_id / "tmp"
        run_dir.mkdir(parents=True, mode=0o700)
        tmpdir.mkdir(parents=True, mode=0o700)
        return run_dir, tmpdir

    def launch_and_wait(
        self,
        mode: str,
        run_id: str,
        *,
        phases: bool = False,
        extra_env: Mapping[str, str] | None = None,
        profile: bool = False,
        user: str = "",
    ) -> RunResult:
        run_dir, tmpdir = self.dirs(run_id)
        env = self.environment(run_id, tmpdir, extra_env or {}, user)
        identity = None
        if user:
            entry = find_user(user)
            os.chown(tmpdir, entry.pw_uid, entry.pw_gid)
            identity = {
                "uid": entry.pw_uid,
                "gid": entry.pw_gid,
                "groups": sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid))),
            }
        launched = time.time()
        if mode == "cold":
            return self._cold(run_id, run_dir, env, launched, user)
        umask = os.umask(0o022)
        os.umask(umask)  # the agent's own, which a cold run inherits
        spec = RunSpec(
            run_id=run_id,
            env=env,
            cwd=str(FLOWS),
            run_dir=str(run_dir),
            umask=umask,
            user=identity,
            output={"file": str(run_dir / "output.log")},
            rusage=True,
            phases=phases,
            profile=profile,
        )
        try:
            handle = self._warm(mode, spec)
        except WarmRefused as exc:
            print(f"  {mode}: {run_id} falls back to cold: {exc}", file=sys.stderr)
            result = self._cold(run_id, run_dir, env, launched, user)
            result.mode, result.fallback = mode, True
            return result
        status = handle.wait()
        usage = json.loads((run_dir / "rusage.json").read_text())
        if handle.rusage is not None:  # (b): the whole process, imports included
            cpu = handle.rusage.ru_utime + handle.rusage.ru_stime
            after = float(usage["engine_cpu"])
        else:
            cpu = float(usage["supervisor_cpu"]) + float(usage["engine_cpu"])
            after = None
        result = RunResult(mode, run_id, status, cpu, after, launched)
        if phases and (run_dir / "phases.json").exists():
            stamps = json.loads((run_dir / "phases.json").read_text())
            stamps["launched"] = launched
            stamps["forked"] = usage.get("forked")
            result.phases = stamps
        return result

    def _warm(self, mode: str, spec: RunSpec) -> WarmHandle:
        if mode == "fork":
            assert self.template is not None
            return self.template.launch(spec)
        assert self.handover is not None
        return self.handover.launch(spec, wait=self.handover_wait)

    def _cold(
        self, run_id: str, run_dir: Path, env: Mapping[str, str], launched: float, user: str = ""
    ) -> RunResult:
        """What ProcessLauncher.launch does (setpriv only for another user)."""
        drop = privilege_drop(find_user(user)) if user else []
        argv = [
            "/bin/sh",
            "-c",
            WRAPPER,
            WRAPPER_NAME,
            str(run_dir),
            *drop,
            self.python,
            "-m",
            "prefect.engine",
        ]
        with (run_dir / "output.log").open("ab") as out:
            proc = subprocess.Popen(
                argv,
                env=dict(env),
                cwd=FLOWS,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        code = os.waitstatus_to_exitcode(status)
        return RunResult(
            "cold",
            run_id,
            code if code >= 0 else 128 - code,
            usage.ru_utime + usage.ru_stime,
            None,
            launched,
        )

    def finish(self, result: RunResult) -> RunResult:
        line = self.api.timeline(result.run_id)
        result.start, result.total, result.final = line.start, line.total, line.final_type
        running = next((ts for ts, t in line.states if t == "RUNNING"), None)
        if running is not None:
            result.launch_to_running = running - result.launched_at
            if result.phases is not None:
                result.phases["running"] = running
        return result

    # -- pools ------------------------------------------------------------------------------

    def start_pools(self, limit: int) -> dict[str, Any]:
        env = template_environment(
            {"PYTHONDONTWRITEBYTECODE": "1", **self.flow_env}, self.work / "template-home"
        )
        (self.work / "template-home").mkdir(exist_ok=True)
        self.template = ForkTemplate(self.python, env, self.work)
        self.handover = HandoverPool(self.python, env, self.work, limit)
        self.template.wait_ready()
        self.handover.wait_ready()
        info: dict[str, Any] = {"template": self.template.process.ready_info}
        info["template_idle"] = footprint(self.template.pid)
        waiting = self.handover.waiting[0]
        info["waiting_process"] = waiting.ready_info
        info["waiting_idle"] = footprint(waiting.proc.pid)
        return info

    def stop_pools(self) -> None:
        if self.template is not None:
            self.template.stop()
        if self.handover is not None:
            self.handover.stop()


def footprint(pid: int) -> dict[str, Any]:
    proc = psutil.Process(pid)
    with proc.oneshot():
        mem = proc.memory_full_info()
        times = proc.cpu_times()
        return {
            "rss_mib": mem.rss / 2**20,
            "pss_mib": mem.pss / 2**20,
            "uss_mib": mem.uss / 2**20,
            "threads": proc.num_threads(),
            "tasks": len(list(Path(f"/proc/{pid}/task").iterdir())),
            "cpu": times.user + times.system,
        }


# -- scenarios -------------------------------------------------------------------------------


def sequential(h: Harness, n: int, modes: tuple[str, ...]) -> list[RunResult]:
    """n no-op runs per mode, one at a time, the modes interleaved so noise hits all alike."""
    results = []
    for i in range(n):
        for mode in modes:
            run_id = h.create_and_claim("noop")
            result = h.finish(h.launch_and_wait(mode, run_id, phases=(mode != "cold")))
            results.append(result)
            print(
                f"  seq {i} {mode:8} start {result.start:.3f}s status {result.status} "
                f"cpu {result.cpu:.2f}s {result.final}",
                file=sys.stderr,
            )
    return results


def burst(h: Harness, mode: str, size: int, limit: int) -> dict[str, Any]:
    run_ids = [h.api.create_run(h.deployments["noop"]) for _ in range(size)]
    began = time.time()

    def one(run_id: str) -> RunResult:
        h.claim(run_id)
        return h.launch_and_wait(mode, run_id)

    with ThreadPoolExecutor(max_workers=limit) as pool:
        results = list(pool.map(one, run_ids))
    ended = time.time()
    results = [h.finish(r) for r in results]
    lines = [h.api.timeline(r) for r in run_ids]
    first_created = min(line.created for line in lines)
    last_final = max(line.final_at or 0.0 for line in lines)
    return {
        "mode": mode,
        "size": size,
        "limit": limit,
        "wall_client": ended - began,
        "wall_server": last_final - first_created,
        "cpu_per_run": statistics.mean(r.cpu for r in results),
        "start_p50": pct([r.start for r in results if r.start is not None], 0.5),
        "final": sorted({str(r.final) for r in results}),
        "fallbacks": sum(r.fallback for r in results),
        "statuses": sorted({r.status for r in results}),
    }


def memory_during_run(h: Harness, mode: str) -> dict[str, Any]:
    """Footprints while a sleeper run sleeps: the engine (E), and its parent (sh or W).

    Warm processes are found through the handle, not /proc/<pid>/environ: that shows the
    environment a process was exec'd with, so for a forked E it is the template's.
    """
    run_id = h.create_and_claim("sleeper")
    found: dict[str, Any] = {}
    if mode == "cold":
        box: dict[str, RunResult] = {}
        thread = threading.Thread(target=lambda: box.update(r=h.launch_and_wait(mode, run_id)))
        thread.start()
        h.api.wait_states([run_id], frozenset({"RUNNING"}), 60, what="sleeper running")
        for proc in psutil.process_iter():
            try:
                if proc.environ().get("PREFECT__FLOW_RUN_ID") == run_id and proc.name() != "sh":
                    found["engine"] = footprint(proc.pid)
                    parent = proc.parent()
                    if parent is not None:
                        found["parent"] = {"name": parent.name(), **footprint(parent.pid)}
            except psutil.Error:
                continue
        thread.join()
        found["status"] = box["r"].status
        return found
    run_dir, tmpdir = h.dirs(run_id)
    spec = RunSpec(
        run_id=run_id,
        env=h.environment(run_id, tmpdir, {}),
        cwd=str(FLOWS),
        run_dir=str(run_dir),
        output={"file": str(run_dir / "output.log")},
    )
    handle = h._warm(mode, spec)
    h.api.wait_states([run_id], frozenset({"RUNNING"}), 60, what="sleeper running")
    found["engine"] = footprint(handle.engine)
    found["parent"] = {"name": "W", **footprint(handle.pid)}
    found["engine_environ_shows_run_id"] = (
        psutil.Process(handle.engine).environ().get("PREFECT__FLOW_RUN_ID") == run_id
    )
    if mode == "fork":
        assert h.template is not None
        found["template"] = footprint(h.template.pid)
    found["status"] = handle.wait()
    return found


def _sleeping_in_flow(h: Harness, run_id: str) -> bool:
    return h.api.state_types([run_id]).get(run_id) == "RUNNING"


def summarize(results: list[RunResult], mode: str) -> dict[str, Any]:
    rs = [r for r in results if r.mode == mode]
    starts = [r.start for r in rs if r.start is not None]
    l2r = [r.launch_to_running for r in rs if r.launch_to_running is not None]
    out: dict[str, Any] = {
        "n": len(rs),
        "start_p50": pct(starts, 0.5),
        "start_p90": pct(starts, 0.9),
        "launch_to_running_p50": pct(l2r, 0.5),
        "total_p50": pct([r.total for r in rs if r.total is not None], 0.5),
        "cpu_per_run_p50": pct([r.cpu for r in rs], 0.5),
        "cpu_after_handover_p50": pct(
            [r.cpu_after_handover for r in rs if r.cpu_after_handover is not None], 0.5
        ),
        "fallbacks": sum(r.fallback for r in rs),
        "final": sorted({str(r.final) for r in rs}),
    }
    phased = [r.phases for r in rs if r.phases]
    if phased:
        out["phases_p50"] = phase_breakdown(phased)
    return out


def phase_breakdown(stamps: list[dict[str, float]]) -> dict[str, float]:
    """Median durations (s) of the warm start's steps, from E's and W's own clocks."""
    steps = {
        "launch -> E forked (connect, W fork, spec, records)": ("launched", "forked"),
        "E forked -> turned (reset env, settings, logging)": ("forked", "turned"),
        "turned -> first API call done (load_flow_run)": ("turned", "load_flow_run.end"),
        "flow load (load_flow: deployment read + user module import)": (
            "load_flow.start",
            "load_flow.end",
        ),
        "run_flow entered -> RUNNING (server timestamp)": ("run_flow.start", "running"),
        "launch -> RUNNING (server timestamp)": ("launched", "running"),
        "run_flow entered -> E exit (proposes RUNNING ... COMPLETED)": (
            "run_flow.start",
            "run_flow.end",
        ),
    }
    out = {}
    for label, (a, b) in steps.items():
        values = [s[b] - s[a] for s in stamps if s.get(a) and s.get(b)]
        out[label] = pct(values, 0.5)
    out["E's own CPU after the fork"] = pct([s["cpu"] for s in stamps if "cpu" in s], 0.5)
    return out


@contextmanager
def server(venv: Path, home: Path, api_url: str | None) -> Iterator[str]:
    if api_url:
        yield api_url
        return
    srv = PrefectServer(venv, home)
    srv.start()
    try:
        yield srv.api_url
    finally:
        srv.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.warm_proto.measure")
    parser.add_argument("--sequential", type=int, default=12)
    parser.add_argument("--burst", type=int, default=24)
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--bursts", type=int, default=1, help="bursts per mode")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--api-url",
        default=None,
        help="use this running server instead of starting one (development)",
    )
    args = parser.parse_args(argv)
    venv = prefect_venv(os.environ)
    python = str(venv / "bin" / "python")
    report: dict[str, Any] = {"load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="warm-measure-") as tmp:
        work = Path(tmp)
        (work / "home").mkdir()
        with server(venv, work / "server", args.api_url) as api_url:
            api = BenchApi(api_url)
            flow_env = {"HOME": str(work / "home")}
            h = Harness(api, python, work, api_url, flow_env)
            try:
                for name, entry in (("noop", "noop.py:noop"), ("sleeper", "sleeper.py:sleeper")):
                    h.deploy(name, entry)
                report["pools"] = h.start_pools(args.limit)
                print("pools ready", report["pools"], file=sys.stderr)
                # one warm-up run per mode (server caches, page cache), not counted
                for mode in MODES:
                    h.launch_and_wait(mode, h.create_and_claim("noop"))
                results = sequential(h, args.sequential, MODES)
                report["sequential"] = {m: summarize(results, m) for m in MODES}
                report["sequential_runs"] = [asdict(r) for r in results]
                report["memory_during_run"] = {m: memory_during_run(h, m) for m in MODES}
                bursts = []
                for _ in range(args.bursts):
                    for mode in ("cold", "fork", "handover", "handover-wait"):
                        h.handover_wait = mode == "handover-wait"
                        real = "handover" if mode == "handover-wait" else mode
                        b = burst(h, real, args.burst, args.limit)
                        b["mode"] = mode
                        bursts.append(b)
                        print(f"  burst {mode}: {b}", file=sys.stderr)
                        h.handover_wait = False
                report["bursts"] = bursts
                assert h.template is not None
                report["template_after"] = footprint(h.template.pid)
            finally:
                h.stop_pools()
                api.close()
    report["load_after"] = os.getloadavg()
    text = json.dumps(report, indent=1, default=str)
    if args.out:
        args.out.write_text(text)
    print(
        json.dumps(
            {k: report[k] for k in ("sequential", "bursts", "pools", "memory_during_run")},
            indent=1,
            default=str,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
