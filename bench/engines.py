"""Issue 17: cold and warm engines side by side, with Prefect's Runner at two poll intervals.

Four contenders, one after the other, against the benchmark's Prefect server, `limit = 4`:

- runner-agent with a cold and a warm deployment of the same no-op flow (`engine = "cold"` and
  `"warm"`), in one agent, so both see the same moment of the machine: sequential runs
  alternate cold and warm, bursts alternate too;
- Prefect's Runner (`prefect.serve`) at its default poll interval, then at a 1 s poll.

Per contender: sequential start latency (created -> RUNNING, server time), bursts (first created
-> last final), and the engine's CPU per run. That CPU is measured the same way for all: the
user + system time of the runs' processes as their parent's accounting has it once it has
waited for them (`children_cpu`: a process's CPU time is added to its parent's children time
when the parent reaps it, and includes what its own reaped children used). The parent is the
agent for a cold run (its sh wrapper, and the engine under it), the template for a warm run (W,
and E under it; the template's own time is added, as its forks are its work), and the Runner
for the Runner's runs (its spawned engine processes). Readings are taken only after every run
process has been reaped (`wait_reaped`). The warm template's memory comes from `runner-agent
status --json`. Then bench/phases.py times one run's phases, cold and warm.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench import phases, procs, scenarios
from bench.api import BenchApi, BenchError, wait_until
from bench.plan import LIMIT, Plan
from bench.scenarios import Burst, Sequential
from bench.subjects import (
    NOOP_FLOW,
    AgentDeployment,
    Contender,
    start_agent,
    start_runner,
)
from bench.warm import TemplateMemory, started_cold, template_memory, template_pid

REAP_TIMEOUT = 60.0
STAMPS_TIMEOUT = 30.0
FAST_POLL = 1
KINDS = ("cold", "warm")
FAILURES = (BenchError, httpx.HTTPError, OSError, ValueError, psutil.Error)


@dataclass
class EngineRuns:
    """One column: a contender's sequential runs, bursts and CPU per run."""

    label: str
    sequential: Sequential = field(default_factory=lambda: Sequential([]))
    sequential_cpu: float | None = None  # CPU-s per run
    bursts: list[Burst] = field(default_factory=list)
    burst_cpu: list[float] = field(default_factory=list)  # CPU-s per run, per burst
    started_cold: int | None = None  # warm only: runs the agent started cold instead
    errors: list[str] = field(default_factory=list)


@dataclass
class EnginesResult:
    runner_default_poll: int
    cold: EngineRuns = field(default_factory=lambda: EngineRuns("runner-agent, cold"))
    warm: EngineRuns = field(default_factory=lambda: EngineRuns("runner-agent, warm"))
    runner_default: EngineRuns = field(default_factory=lambda: EngineRuns("Prefect Runner"))
    runner_fast: EngineRuns = field(default_factory=lambda: EngineRuns("Prefect Runner"))
    templates: list[TemplateMemory] = field(default_factory=list)
    phase_runs: list[phases.PhaseRun] = field(default_factory=list)
    loads: list[tuple[str, str]] = field(default_factory=list)  # (step, load averages)
    errors: list[str] = field(default_factory=list)

    @property
    def columns(self) -> tuple[EngineRuns, ...]:
        return (self.cold, self.warm, self.runner_default, self.runner_fast)

    @property
    def failed(self) -> bool:
        return bool(self.errors) or any(c.errors for c in self.columns)


@dataclass(frozen=True)
class Setup:
    """What the scenario needs from the benchmark (bench/run.py)."""

    api: BenchApi
    plan: Plan
    workdir: Path
    flows_dir: Path
    agent_bin: Path
    api_url: str
    server_env: Mapping[str, str]
    prefect_python: str
    tag: str
    log_level: str
    log: Callable[[str], None]
    stop: Callable[[Contender], None]


@dataclass(frozen=True)
class Meter:
    """The CPU time of a contender's runs: `read()` is cumulative, `settle()` waits until every
    run process has been reaped (so that `read()` has all of it)."""

    read: Callable[[], float]
    settle: Callable[[], None]


def agent_meters(agent: Contender, template: int) -> dict[str, Meter]:
    def settle() -> None:
        procs.wait_reaped(agent.pid, lambda p: p.pid == template, REAP_TIMEOUT)
        procs.wait_reaped(template, lambda p: False, REAP_TIMEOUT)

    return {
        "cold": Meter(lambda: procs.children_cpu(agent.pid), settle),
        "warm": Meter(lambda: procs.cpu_seconds(template) + procs.children_cpu(template), settle),
    }


def runner_meter(runner: Contender) -> Meter:
    def tracker(proc: psutil.Process) -> bool:  # multiprocessing's, lives as long as the Runner
        return "resource_tracker" in " ".join(proc.cmdline())

    return Meter(
        lambda: procs.children_cpu(runner.pid),
        lambda: procs.wait_reaped(runner.pid, tracker, REAP_TIMEOUT),
    )


def _alternating(
    api: BenchApi, contender: Contender, ids: Mapping[str, str], runs: int, meters: dict[str, Meter]
) -> dict[str, tuple[Sequential, float]]:
    """`runs` sequential runs of each deployment, alternating; with the CPU per run of each."""
    for meter in meters.values():
        meter.settle()
    before = {kind: meters[kind].read() for kind in ids}
    timelines: dict[str, list[Any]] = {kind: [] for kind in ids}
    for _ in range(runs):
        for kind, deployment_id in ids.items():
            done = scenarios.sequential(api, contender, deployment_id, 1)
            timelines[kind] += done.timelines
    for meter in meters.values():
        meter.settle()
    return {
        kind: (Sequential(timelines[kind]), (meters[kind].read() - before[kind]) / runs)
        for kind in ids
    }


def _burst(
    api: BenchApi, contender: Contender, deployment_id: str, size: int, meter: Meter
) -> tuple[Burst, float]:
    meter.settle()
    before = meter.read()
    burst = scenarios.burst(api, contender, deployment_id, size)
    meter.settle()
    return burst, (meter.read() - before) / size


def _deployments(setup: Setup, contender: Contender) -> dict[str, str]:
    ids = {
        role: setup.api.wait_deployment(flow, name, timeout=120)
        for role, (flow, name) in contender.deployments.items()
    }
    setup.log(f"{contender.label}: deployments registered; settling {setup.plan.settle:g} s")
    time.sleep(setup.plan.settle)
    return ids


def _warm_up(setup: Setup, contender: Contender, ids: Mapping[str, str]) -> dict[str, str]:
    """One run of each first: probes, byte code and first connections are not measured."""
    return {
        kind: scenarios.sequential(setup.api, contender, deployment_id, 1).timelines[0].run_id
        for kind, deployment_id in ids.items()
    }


def measure_agent(setup: Setup, result: EnginesResult) -> None:
    plan = setup.plan
    workdir = setup.workdir / "engines-agent"
    noop = "flows.py:noop"
    agent = _start_agent(
        setup,
        workdir,
        "runner-agent",
        {
            "cold": ("engines-cold-noop", AgentDeployment(NOOP_FLOW, noop, {"engine": "cold"})),
            "warm": ("engines-warm-noop", AgentDeployment(NOOP_FLOW, noop, {"engine": "warm"})),
        },
    )
    try:
        ids = _deployments(setup, agent)
        template = template_pid(setup.agent_bin, agent, setup.tag)
        first = _warm_up(setup, agent, ids)["warm"]
        meters = agent_meters(agent, template)
        meters["cold"].settle()
        forks = 1 - started_cold(agent, [first])
        result.templates.append(template_memory(setup.agent_bin, agent, setup.tag, template, forks))
        setup.log(f"runner-agent: {plan.engine_sequential} cold and warm runs, alternating")
        for kind, (seq, cpu) in _alternating(
            setup.api, agent, ids, plan.engine_sequential, meters
        ).items():
            column = result.cold if kind == "cold" else result.warm
            column.sequential, column.sequential_cpu = seq, cpu
        for _ in range(plan.engine_bursts):
            for kind in KINDS:
                setup.log(f"runner-agent: a burst of {plan.burst_size}, {kind}")
                column = result.cold if kind == "cold" else result.warm
                burst, cpu = _burst(setup.api, agent, ids[kind], plan.burst_size, meters[kind])
                column.bursts.append(burst)
                column.burst_cpu.append(cpu)
        warm_ids = [t.run_id for t in result.warm.sequential.timelines]
        warm_ids += [r for b in result.warm.bursts for r in b.run_ids]
        result.warm.started_cold = started_cold(agent, warm_ids)
        forks += len(warm_ids) - result.warm.started_cold
        result.templates.append(template_memory(setup.agent_bin, agent, setup.tag, template, forks))
    finally:
        setup.stop(agent)


def measure_runner(setup: Setup, column: EngineRuns, poll: int | None, prefix: str) -> None:
    plan = setup.plan
    runner = start_runner(
        python=setup.prefect_python,
        server_env=setup.server_env,
        workdir=setup.workdir / prefix,
        flows_dir=setup.flows_dir,
        tag=setup.tag,
        limit=LIMIT,
        poll_interval=poll,
        prefix=prefix,
        label=column.label,
    )
    try:
        ids = {"noop": _deployments(setup, runner)["noop"]}
        _warm_up(setup, runner, ids)
        meter = runner_meter(runner)
        setup.log(f"{column.label}: {plan.engine_sequential} sequential runs")
        column.sequential, cpu = _alternating(
            setup.api, runner, ids, plan.engine_sequential, {"noop": meter}
        )["noop"]
        column.sequential_cpu = cpu
        for _ in range(plan.engine_bursts):
            setup.log(f"{column.label}: a burst of {plan.burst_size}")
            burst, per_run = _burst(setup.api, runner, ids["noop"], plan.burst_size, meter)
            column.bursts.append(burst)
            column.burst_cpu.append(per_run)
    finally:
        setup.stop(runner)


def measure_phases(setup: Setup, result: EnginesResult) -> None:
    """Instrumented runs (bench/phases.py), cold and warm alternating, in an agent of their own."""
    workdir = setup.workdir / "engines-phases"
    out = workdir / "stamps"
    out.mkdir(parents=True)
    env = {"PYTHONPATH": str(phases.write_site(workdir / "site")), phases.OUT_ENV: str(out)}
    noop = "flows.py:noop"
    agent = _start_agent(
        setup,
        workdir,
        "runner-agent, instrumented",
        {
            kind: (f"phases-{kind}-noop", AgentDeployment(NOOP_FLOW, noop, {"engine": kind}))
            for kind in KINDS
        },
        env,
    )
    try:
        ids = _deployments(setup, agent)
        template_pid(setup.agent_bin, agent, setup.tag)
        _warm_up(setup, agent, ids)
        setup.log(f"phases: {setup.plan.phase_runs} instrumented cold and warm runs")
        for _ in range(setup.plan.phase_runs):
            for kind in KINDS:
                timeline = scenarios.sequential(setup.api, agent, ids[kind], 1).timelines[0]

                def stamps(run_id: str = timeline.run_id) -> dict[str, Any] | None:
                    return phases.read_stamps(out, run_id)

                found = wait_until(stamps, STAMPS_TIMEOUT, what=f"{kind} run's phase stamps")
                result.phase_runs.append(phases.PhaseRun(kind, timeline, found))
    finally:
        setup.stop(agent)


def _start_agent(
    setup: Setup,
    workdir: Path,
    label: str,
    deployments: Mapping[str, tuple[str, AgentDeployment]],
    flow_env: Mapping[str, str] | None = None,
) -> Contender:
    return start_agent(
        agent_bin=setup.agent_bin,
        api_url=setup.api_url,
        workdir=workdir,
        flows_dir=setup.flows_dir,
        flow_python=setup.prefect_python,
        tag=setup.tag,
        limit=LIMIT,
        log_level=setup.log_level,
        flow_env=flow_env,
        deployments=deployments,
        label=label,
    )


def measure(setup: Setup, default_poll: int) -> EnginesResult:
    """The whole scenario; a contender that fails is recorded and the next one still runs."""
    result = EnginesResult(default_poll)
    result.runner_default.label = f"Prefect Runner, poll {default_poll} s (default)"
    result.runner_fast.label = f"Prefect Runner, poll {FAST_POLL} s"
    steps: list[tuple[str, list[str], Callable[[], None]]] = [
        ("runner-agent cold and warm", result.cold.errors, lambda: measure_agent(setup, result)),
        (
            result.runner_default.label,
            result.runner_default.errors,
            lambda: measure_runner(setup, result.runner_default, None, "runner-default"),
        ),
        (
            result.runner_fast.label,
            result.runner_fast.errors,
            lambda: measure_runner(setup, result.runner_fast, FAST_POLL, "runner-fast"),
        ),
        ("phases", result.errors, lambda: measure_phases(setup, result)),
    ]
    for what, errors, step in steps:
        setup.log(f"engines: {what}")
        result.loads.append((what, _load()))
        try:
            step()
        except FAILURES as exc:
            errors.append(f"{what}: {exc}")
            setup.log(f"engines: {what} failed: {exc}")
    result.loads.append(("the end", _load()))
    return result


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
