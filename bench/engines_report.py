"""BENCHMARKS.md's "Warm engine" section (issue 17), from bench/engines.py's results.

A pure function of the results, like bench/report.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from bench import phases
from bench.engines import EngineRuns, EnginesResult
from bench.plan import LIMIT
from bench.procs import MIB
from bench.scenarios import percentile

# tests/bench parses the tables by these headers and the rows by these labels.
TABLE_HEADER_START = "| figure | runner-agent, cold | runner-agent, warm |"
MEMORY_HEADER = "| warm template, idle | RSS | PSS | USS | source |"
PHASES_HEADER = "| phase (p50 of the instrumented runs) | cold | warm |"
START_P50 = "start, created → RUNNING, p50"
BURST_WALL = "burst wall, first created → last final, median"
CPU_PER_RUN = "engine CPU per run, all measured runs"
START_TARGET = 0.3  # s, warm
BURST_TARGET = 0.5  # warm ÷ cold
CPU_TARGET = 1 / 3  # warm ÷ cold

Get = Callable[[EngineRuns], float | None]


def _seq(what: str, q: float) -> Get:
    def get(c: EngineRuns) -> float | None:
        values = c.sequential.values(what)
        return percentile(values, q) if values else None

    return get


def _burst_wall(pick: Callable[[list[float]], float]) -> Get:
    return lambda c: pick([b.wall for b in c.bursts]) if c.bursts else None


def cpu_per_run(c: EngineRuns) -> float | None:
    """Over the sequential runs and the bursts' runs together."""
    weighted: list[tuple[float, int]] = []
    if c.sequential_cpu is not None and c.sequential.timelines:
        weighted.append((c.sequential_cpu, len(c.sequential.timelines)))
    weighted += [(cpu, b.runs) for cpu, b in zip(c.burst_cpu, c.bursts, strict=False)]
    runs = sum(n for _, n in weighted)
    return sum(cpu * n for cpu, n in weighted) / runs if runs else None


def _not_completed(c: EngineRuns) -> str:
    runs = len(c.sequential.timelines) + sum(b.runs for b in c.bursts)
    bad = len(c.sequential.timelines) - c.sequential.completed
    bad += sum(b.runs - b.completed for b in c.bursts)
    return f"{bad} of {runs}" if runs else "n/a"


def _median(values: list[float]) -> float:
    return percentile(values, 50)


ROWS: tuple[tuple[str, str, Get], ...] = (
    (START_P50, "s", _seq("start", 50)),
    ("start, created → RUNNING, p90", "s", _seq("start", 90)),
    ("pickup, created → PENDING, p50", "s", _seq("pickup", 50)),
    ("total, created → final, p50", "s", _seq("total", 50)),
    (BURST_WALL, "s", _burst_wall(_median)),
    ("burst wall, worst", "s", _burst_wall(max)),
    ("engine CPU per run, sequential runs", "cpu", lambda c: c.sequential_cpu),
    (
        "engine CPU per run, bursts (median of the bursts)",
        "cpu",
        lambda c: _median(c.burst_cpu) if c.burst_cpu else None,
    ),
    (CPU_PER_RUN, "cpu", cpu_per_run),
)


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "cpu":
        return f"{value:.2f} CPU-s"
    if unit == "MiB":
        return f"{value / MIB:.1f} MiB"
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"


def _ratio(warm: float | None, cold: float | None) -> str:
    return "n/a" if warm is None or not cold else f"{warm / cold:.2f}"


def table(result: EnginesResult) -> list[str]:
    columns = result.columns
    header = (
        f"{TABLE_HEADER_START} {columns[2].label} | {columns[3].label} | warm ÷ cold | target |"
    )
    lines = [header, "|---" * 7 + "|"]
    targets = {
        START_P50: f"warm < {START_TARGET:.2f} s",
        BURST_WALL: f"warm ÷ cold ≤ {BURST_TARGET:.2f}",
        CPU_PER_RUN: "warm ÷ cold ≤ 0.33",
    }
    for label, unit, get in ROWS:
        values = [get(c) for c in columns]
        cells = " | ".join(fmt(v, unit) for v in values)
        ratio = _ratio(values[1], values[0])
        lines.append(f"| {label} | {cells} | {ratio} | {targets.get(label, '')} |")
    lines.append(
        "| runs not COMPLETED | " + " | ".join(_not_completed(c) for c in columns) + " | | |"
    )
    started = result.warm.started_cold
    lines.append(
        f"| warm runs the agent started cold | — | {'n/a' if started is None else started} "
        "| — | — | | none |"
    )
    return lines


def verdicts(result: EnginesResult) -> tuple[list[str], dict[str, bool | None]]:
    """The issue's targets, one line each, and which were met (None: not measured)."""
    cold, warm = result.cold, result.warm
    start = _seq("start", 50)(warm)
    walls = _burst_wall(_median)(warm), _burst_wall(_median)(cold)
    cpus = cpu_per_run(warm), cpu_per_run(cold)

    def within(pair: tuple[float | None, float | None], limit: float) -> bool | None:
        warm_value, cold_value = pair
        if warm_value is None or not cold_value:
            return None
        return warm_value / cold_value <= limit

    met: dict[str, bool | None] = {
        "start": None if start is None else start < START_TARGET,
        "burst": within(walls, BURST_TARGET),
        "cpu": within(cpus, CPU_TARGET),
    }

    def verdict(key: str) -> str:
        return {None: "n/a", True: "met", False: "**not met**"}[met[key]]

    lines = [
        f"- warm start p50 (created → RUNNING): {fmt(start, 's')}, target < "
        f"{START_TARGET:.2f} s: {verdict('start')}",
        f"- a burst of {warm.bursts[0].runs if warm.bursts else 'n/a'} at limit 4, wall "
        f"(median): warm {fmt(walls[0], 's')}, cold {fmt(walls[1], 's')}, "
        f"{_ratio(*walls)} of cold's, target ≤ {BURST_TARGET:.2f}: {verdict('burst')}",
        f"- engine CPU per run: warm {fmt(cpus[0], 'cpu')}, cold {fmt(cpus[1], 'cpu')}, "
        f"{_ratio(*cpus)} of cold's, target ≤ 1/3: {verdict('cpu')}",
        "- the memory of the warm template: reported below",
    ]
    return lines, met


def memory_table(result: EnginesResult) -> list[str]:
    lines = [MEMORY_HEADER, "|---|---|---|---|---|"]
    for t in result.templates:
        lines.append(
            f"| after {t.forks} warm run(s) | {fmt(t.rss, 'MiB')} | {fmt(t.pss, 'MiB')} "
            f"| {fmt(t.uss, 'MiB')} | {t.source} |"
        )
    if not result.templates:
        lines.append("| n/a | n/a | n/a | n/a | n/a |")
    return lines


def phases_table(result: EnginesResult) -> list[str]:
    rows = phases.breakdown(result.phase_runs)
    lines = [PHASES_HEADER, "|---|---|---|"]
    for label, cold, warm in rows:
        unit = "cpu" if label == phases.CPU_ROW else "s"
        lines.append(
            f"| {label} | {fmt(cold, unit) if cold is not None else '—'} "
            f"| {fmt(warm, unit) if warm is not None else '—'} |"
        )
    return lines


def bounds(result: EnginesResult, met: dict[str, bool | None]) -> list[str]:
    """What bounds each missed figure, in the instrumented runs' own numbers."""
    found = phases.medians(result.phase_runs)

    def warm(*keys: str) -> float:
        return sum(found[k][1] or 0.0 for k in keys)

    def cold(key: str) -> float:
        return found[key][0] or 0.0

    lines = []
    if met["start"] is False:
        rest = warm("turn", "main", "api", "load", "to_run_flow", "running")
        lines.append(
            f"- **Start.** Of a warm run's created → RUNNING ({warm('start'):.2f} s p50 in the "
            f"instrumented runs), the agent's part up to the engine's fork (pickup and claim "
            f"{warm('claim'):.2f} s, launch {warm('launch'):.2f} s, hand-over "
            f"{warm('handover'):.2f} s) is {warm('claim', 'launch', 'handover'):.2f} s; the "
            f"rest, {rest:.2f} s, is Prefect's per-process start in E after the fork: the turn "
            f"into the run {warm('turn'):.2f} s (of which Prefect's settings "
            f"{warm('settings'):.2f} s and the logging config {warm('logging'):.2f} s, both "
            f"built from the run's environment), `prefect.engine` as `__main__` "
            f"{warm('main'):.2f} s, the first API call {warm('api'):.2f} s, the flow load "
            f"{warm('load'):.2f} s and `run_flow` up to the RUNNING proposal "
            f"{warm('to_run_flow', 'running'):.2f} s. That part depends on the run's "
            "environment, so a template that has seen no run cannot do it before the claim; the "
            "ways below it (a pre-turned child per deployment, one SSL context for both "
            "clients) are in docs/warm-engine.md. This bench uses the process launcher (no "
            "systemd here), so there is no scope move; in the systemd test bed it added 8 ms "
            "(quiet) to 51 ms (load 8) to the hand-over (docs/warm-engine.md)."
        )
    if met["burst"] is False:
        size = result.warm.bursts[0].runs if result.warm.bursts else 0
        rounds = -(-size // LIMIT)
        lines.append(
            f"- **Burst.** A run holds its slot from its claim to its engine's exit: "
            f"{warm('hold'):.2f} s warm and {cold('hold'):.2f} s cold (p50, PENDING → exit), of "
            f"which {warm('tail'):.2f} s (warm) come after the run is already final, while the "
            "engine joins its heartbeat thread (it sleeps in 1 s steps) and drains its log and "
            f"event workers. {size} runs at limit {LIMIT} are {rounds} rounds, so a warm burst "
            f"takes at least about {rounds} x {warm('hold'):.2f} = {rounds * warm('hold'):.1f} s "
            "however little CPU it needs, and cold's wall shrinks when the machine has CPU to "
            f"spare ({os.cpu_count()} cores here)."
        )
    if met["cpu"] is False:
        cpu_c, cpu_w = found["cpu"]
        lines.append(
            f"- **CPU.** E alone used {fmt(cpu_w, 'cpu')} after its fork (cold E, imports "
            f"included: {fmt(cpu_c, 'cpu')}); the rest of a warm run's CPU is W and the fork."
        )
    return lines


def section(result: EnginesResult | None) -> list[str]:
    """The report's "Warm engine" section; nothing when the scenario was not run."""
    if result is None:
        return []
    target_lines, met = verdicts(result)
    n_phase = sum(1 for r in result.phase_runs if r.engine == "cold")
    forked = sum(1 for r in result.phase_runs if r.engine == "warm" and r.warm)
    lines = [
        "",
        "## Warm engine (issue 17): cold and warm side by side, and the Runner at two polls",
        "",
        "One runner-agent served a cold and a warm deployment of the no-op flow (`engine = "
        '"cold"` and `"warm"`, launcher `process`, `limit = 4`); sequential runs alternated cold '
        "and warm, and so did the bursts. Then Prefect's Runner (`prefect.serve(..., limit=4)`) "
        f"at its default poll ({result.runner_default_poll} s, `PREFECT_RUNNER_POLL_FREQUENCY` "
        f"of this Prefect), then at a {result.runner_fast.label.split('poll ')[-1]} poll. Each "
        "contender had one run per deployment before the measured ones. Latencies by the "
        "server's state timestamps. Engine CPU per run: the user + system time of the runs' "
        "processes as their parent accounts it once it has reaped them (the agent for a cold "
        "run: its sh wrapper and the engine; the template for a warm run: W and E, plus the "
        "template's own time; the Runner for its runs: the spawned engine processes), read "
        "only when no run process was left, divided by the runs.",
        "",
        *table(result),
        "",
        "Load average (1, 5, 15 min) as each step began: "
        + "; ".join(f"{what}: {load}" for what, load in result.loads)
        + f". The machine has {os.cpu_count()} cores; other work may run beside the benchmark.",
        "",
        "Targets (warm):",
        "",
        *target_lines,
        "",
        "The warm template's memory (RSS; PSS shares the pages it shares with other processes, "
        "here the Prefect server's python and the runs it forked; USS is what stopping it "
        "frees):",
        "",
        *memory_table(result),
        "",
        f"Where a run's start goes: {n_phase} instrumented run(s) per engine ({forked} warm "
        "one(s) really forked), in an agent of their own, cold and warm alternating "
        "(bench/phases.py stamps the engine's phases from a `sitecustomize` on the runs' "
        "PYTHONPATH; server timestamps for the states). Medians of each phase, so they do not "
        "add up exactly to the total:",
        "",
        *phases_table(result),
    ]
    missed = bounds(result, met)
    if missed:
        lines += ["", "What bounds the missed figures:", "", *missed]
    errors = result.errors + [f"{c.label}: {e}" for c in result.columns for e in c.errors]
    if errors:
        lines += ["", "Errors in this section:", "", *(f"- {e}" for e in errors)]
    return lines
