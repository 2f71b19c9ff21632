"""BENCHMARKS.md: both columns, the ratio, the issue's targets, the footprint, the machine.

Everything here is a pure function of the measured results (bench/scenarios.py, bench/imports.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bench import engines_report, pools
from bench.engines import EnginesResult
from bench.imports import ImportStep, floor, imports_table
from bench.procs import MIB
from bench.scenarios import Burst, Cancellation, FootprintSeries, Idle, Sequential, percentile

# The first column of the side-by-side table; tests/bench parses it by this header.
TABLE_HEADER = (
    "| figure | runner-agent | Prefect Runner | ratio | runner-agent better | target | met |"
)


@dataclass
class ContenderResult:
    label: str
    idle: Idle | None = None
    sequential: Sequential | None = None
    bursts: list[Burst] = field(default_factory=list)
    cancellations: list[Cancellation] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class Report:
    mode: str
    date: str
    duration: float
    command: str
    plan: str
    poll_interval: float
    machine: dict[str, str]
    agent: ContenderResult
    runner: ContenderResult
    footprint: FootprintSeries | None
    pool: pools.PoolPickup | None
    imports: list[ImportStep]
    engines: EnginesResult | None = None
    errors: list[str] = field(default_factory=list)


Getter = Callable[[ContenderResult], float | None]


@dataclass(frozen=True)
class Row:
    figure: str
    unit: str  # "s", "MiB", "%", "" (a count), "of" (a count out of a total)
    get: Getter
    target: float | None = None  # the target: runner-agent's value must be below it
    total: Callable[[ContenderResult], int] | None = None  # for "of" rows


def _seq(what: str, q: float) -> Getter:
    def get(r: ContenderResult) -> float | None:
        values = r.sequential.values(what) if r.sequential else []
        return percentile(values, q) if values else None

    return get


def _idle(pick: Callable[[Idle], float]) -> Getter:
    return lambda r: pick(r.idle) if r.idle else None


def _bursts(pick: Callable[[list[Burst]], float]) -> Getter:
    return lambda r: pick(r.bursts) if r.bursts else None


def _cancel_latency(pick: Callable[[list[float]], float]) -> Getter:
    def get(r: ContenderResult) -> float | None:
        values = [c.latency for c in r.cancellations if c.latency is not None]
        return pick(values) if values and len(values) == len(r.cancellations) else None

    return get


def _median(values: list[float]) -> float:
    return percentile(values, 50)


ROWS: tuple[Row, ...] = (
    Row("idle RSS (median over the window)", "MiB", _idle(lambda i: i.rss / MIB), 25.0),
    Row("idle USS (private memory)", "MiB", _idle(lambda i: i.footprint.uss / MIB)),
    Row("idle PSS", "MiB", _idle(lambda i: i.footprint.pss / MIB)),
    Row("idle CPU, % of one core", "%", _idle(lambda i: i.cpu_percent), 0.1),
    Row("idle threads", "", _idle(lambda i: float(i.footprint.threads))),
    Row("idle open fds", "", _idle(lambda i: float(i.footprint.fds))),
    Row("pickup, created → PENDING, p50", "s", _seq("pickup", 50), 0.3),
    Row("pickup, created → PENDING, p95", "s", _seq("pickup", 95)),
    Row("start, created → RUNNING, p50", "s", _seq("start", 50)),
    Row("start, created → RUNNING, p95", "s", _seq("start", 95)),
    Row("total, created → COMPLETED, p50", "s", _seq("total", 50)),
    Row("total, created → COMPLETED, p95", "s", _seq("total", 95)),
    Row(
        "sequential runs not COMPLETED",
        "of",
        lambda r: (
            float(len(r.sequential.timelines) - r.sequential.completed) if r.sequential else None
        ),
        total=lambda r: len(r.sequential.timelines) if r.sequential else 0,
    ),
    Row(
        "burst wall, first created → last final, median",
        "s",
        _bursts(lambda b: _median([x.wall for x in b])),
    ),
    Row("burst wall, worst", "s", _bursts(lambda b: max(x.wall for x in b))),
    Row(
        "burst peak RSS of the serving process",
        "MiB",
        _bursts(lambda b: max(x.peak_rss for x in b) / MIB),
    ),
    Row(
        "burst CPU of the serving process per run",
        "s",
        _bursts(lambda b: sum(x.cpu_seconds for x in b) / sum(x.runs for x in b)),
    ),
    Row(
        "burst runs not COMPLETED",
        "of",
        _bursts(lambda b: float(sum(x.runs - x.completed for x in b))),
        total=lambda r: sum(x.runs for x in r.bursts),
    ),
    # Issue 13's target is on the p50, issue 8's on the worst.
    Row("cancel, CANCELLING → CANCELLED, p50", "s", _cancel_latency(_median), 1.0),
    Row("cancel, CANCELLING → CANCELLED, worst", "s", _cancel_latency(max), 1.0),
    Row(
        "cancelled runs not CANCELLED",
        "of",
        lambda r: (
            float(sum(1 for c in r.cancellations if c.final_type != "CANCELLED"))
            if r.cancellations
            else None
        ),
        total=lambda r: len(r.cancellations),
    ),
    Row(
        "cancelled runs with CRASHED in their history",
        "of",
        lambda r: (
            float(sum(1 for c in r.cancellations if c.crashed_in_history))
            if r.cancellations
            else None
        ),
        target=0.5,  # i.e. none: a Crashed fires "Crashed" automations
        total=lambda r: len(r.cancellations),
    ),
    Row(
        "`sleep` grandchildren alive 5 s after CANCELLED",
        "of",
        lambda r: float(sum(c.orphans for c in r.cancellations)) if r.cancellations else None,
        target=0.5,  # i.e. none
        total=lambda r: len(r.cancellations),
    ),
)


def fmt(value: float | None, unit: str, total: int = 0) -> str:
    if value is None:
        return "n/a"
    if unit == "s":
        return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    if unit == "%":
        return f"{value:.3f} %"
    if unit == "of":
        return f"{value:.0f} of {total}"
    return f"{value:.0f}"


def _ratio(agent: float | None, runner: float | None) -> str:
    if agent is None or runner is None:
        return "n/a"
    if agent == 0:
        return "=" if runner == 0 else "∞"
    return f"{runner / agent:.1f}x"


def _better(agent: float | None, runner: float | None, unit: str) -> str:
    if agent is None or runner is None:
        return "n/a"
    if fmt(agent, unit) == fmt(runner, unit):
        return "tie"  # equal at the precision shown
    return "yes" if agent < runner else "no"


def _target(row: Row) -> tuple[str, Callable[[float], bool] | None]:
    if row.target is None:
        return "", None
    threshold = row.target
    if row.unit == "of":
        return "none", lambda v: v < threshold
    return f"< {fmt(threshold, row.unit)}", lambda v: v < threshold


def side_by_side(agent: ContenderResult, runner: ContenderResult) -> list[str]:
    lines = [TABLE_HEADER, "|---|---|---|---|---|---|---|"]
    for row in ROWS:
        a, r = row.get(agent), row.get(runner)
        a_total = row.total(agent) if row.total else 0
        r_total = row.total(runner) if row.total else 0
        target_text, check = _target(row)
        met = "" if check is None else ("n/a" if a is None else ("yes" if check(a) else "**no**"))
        lines.append(
            f"| {row.figure} | {fmt(a, row.unit, a_total)} | {fmt(r, row.unit, r_total)} "
            f"| {_ratio(a, r)} | {_better(a, r, row.unit)} | {target_text} | {met} |"
        )
    return lines


def footprint_table(series: FootprintSeries | None) -> list[str]:
    lines = [
        "| running runs | RSS | USS | PSS | threads | open fds | RSS per run over idle |",
        "|---|---|---|---|---|---|---|",
    ]
    if series is None or not series.points:
        return [*lines, "| n/a | n/a | n/a | n/a | n/a | n/a | n/a |"]
    base = series.points.get(0)
    for count, fp in sorted(series.points.items()):
        per_run = f"{(fp.rss - base.rss) / count / 1024:.0f} KiB" if base and count else "—"
        lines.append(
            f"| {count} | {fp.rss / MIB:.1f} MiB | {fp.uss / MIB:.1f} MiB | {fp.pss / MIB:.1f} MiB "
            f"| {fp.threads} | {fp.fds} | {per_run} |"
        )
    return lines


METHOD = """\
- Both contenders run against one Prefect server (SQLite, loopback) that the benchmark starts and
  stops itself. Each serves its own deployments of the same two flows (a no-op flow, and a sleeper
  whose body starts a `sleep 600` grandchild and then sleeps), `limit = 4`, flows executed by the
  Prefect venv's python. runner-agent runs with `launcher = "process"` (no systemd here) and
  otherwise default settings; the Runner is `prefect.serve(..., limit=4)` in a script.
- Latencies are the server's own state timestamps (`/api/flow_runs/{id}`,
  `/api/flow_run_states/?flow_run_id=`): pickup = created → first PENDING, start = created →
  first RUNNING, total = created → final state; cancel = last CANCELLING → CANCELLED. A
  cancelled run's whole state history is listed, and a CRASHED in it is counted: it fires
  "Crashed" automations although nothing crashed. runner-agent's path (control channel or
  fallback) is read from its note in the run's logs.
- Memory, CPU, threads and fds are psutil figures of the serving process alone (the agent; for
  the Runner the python running `prefect.serve`), not of the flow runs it starts. Idle is measured
  after start-up settled (deployments registered, then a pause); idle CPU is the sum of the
  threads' `/proc/<pid>/task/*/schedstat` run time (ns), or psutil's 10 ms ticks if a thread
  exited during the window. USS is private memory, PSS is RSS with shared pages divided among
  their users.
- Sequential runs: each run is created (`POST /deployments/{id}/create_flow_run`) only after the
  previous one is final. Bursts: all runs created at once; peak RSS sampled every 0.1 s.
- Cancellations: a sleeper is cancelled (`set_state` CANCELLING, `force`) once it is RUNNING and
  its `sleep 600` grandchild exists; a grandchild still alive 5 s after CANCELLED is an orphan
  (then killed, so nothing is left behind).
- Footprint: a second runner-agent (limit 50) whose deployment's `python` is a tiny script that
  ignores its arguments and `exec sleep 600`, so the figures are the agent's, not the engine's;
  measured once that many wrappers run, then all runs are cancelled.
- Import footprint: a fresh interpreter of the agent's venv imports each step cumulatively and
  reads `/proc/self/smaps_rollup` after each.
- Other work on the machine adds noise; the load average is recorded below."""


def _targets(report: Report) -> list[str]:
    lines = []
    for row in ROWS:
        if row.target is None:
            continue
        a = row.get(report.agent)
        text, check = _target(row)
        verdict = "n/a" if a is None or check is None else ("met" if check(a) else "**not met**")
        total = row.total(report.agent) if row.total else 0
        lines.append(f"- {row.figure}: {fmt(a, row.unit, total)}, target {text}: {verdict}")
    beaten = [
        row.figure
        for row in ROWS
        if _better(row.get(report.agent), row.get(report.runner), row.unit) == "no"
    ]
    lines.append(
        "- runner-agent is better than or equal to the Runner on every row"
        if not beaten
        else "- rows where the Runner is better: " + "; ".join(beaten)
    )
    return lines


def cancellation_detail(results: tuple[ContenderResult, ...]) -> list[str]:
    """Where a cancellation's time goes: the run's states and the exit of its processes."""
    lines = []
    for result in results:
        for c in result.cancellations:
            steps = [(offset, t) for offset, t in c.states]
            if c.engine_gone is not None:
                steps.append((c.engine_gone, "processes exited (all but `sleep`)"))
            text = " → ".join(f"{t} {offset:+.2f} s" for offset, t in sorted(steps))
            flag = " **CRASHED in its history**" if c.crashed_in_history else ""
            path = f"; path: {c.path}" if c.path else ""
            lines.append(
                f"- {result.label}, run `{c.run_id[:8]}`: {text or 'n/a'}; "
                f"history {' > '.join(c.history) or 'n/a'}{flag}{path}; "
                f"orphans {c.orphans}, other leftovers {c.leftovers}"
            )
    return lines


def render(report: Report) -> str:
    fp = report.footprint
    lines = [
        "# Benchmarks: runner-agent versus Prefect's Runner",
        "",
        f"Issue 8's side-by-side benchmark, **{report.mode}** run of {report.date}, "
        f"{report.duration / 60:.1f} min of wall time. Both contenders served the same flows "
        f"from the same Prefect server, one after the other, with `limit = 4` and a "
        f"{report.poll_interval:g} s poll interval (runner-agent's default `poll_interval`; the "
        f"Runner got the same as `PREFECT_RUNNER_POLL_FREQUENCY` and `query_seconds`).",
        "",
        "Reproduce, from the repository root:",
        "",
        "```sh",
        report.command,
        "```",
        "",
        "## Side by side",
        "",
        f"Scenarios: {report.plan}.",
        "",
        *side_by_side(report.agent, report.runner),
        "",
        "Ratio = Prefect Runner ÷ runner-agent. Every figure is lower-is-better, so above 1x "
        "favours runner-agent. *target* is the issue's target for runner-agent.",
        "",
        "Where the cancellations' time went: seconds after CANCELLING, states by the server's "
        "timestamps, process exits as seen by psutil polling every 10 ms (an upper bound: on a "
        "loaded machine the poller itself runs late):",
        "",
        *cancellation_detail((report.agent, report.runner)),
        "",
        "## The issue's targets",
        "",
        *_targets(report),
        "",
        "## runner-agent's footprint with running runs",
        "",
        *footprint_table(fp),
    ]
    if fp is not None and fp.cancel_wall is not None:
        total = max(fp.points) if fp.points else 0
        lines += [
            "",
            f"Cancelling all {total} at once: {fp.cancelled} of {total} CANCELLED after "
            f"{fp.cancel_wall:.1f} s; {fp.leftovers} process(es) left to kill.",
        ]
    lines += [
        *pools.section(report.pool),
        *engines_report.section(report.engines),
        "",
        "## Import footprint",
        "",
        *imports_table(report.imports),
        *floor(report.imports, report.agent.idle.rss if report.agent.idle else None),
        "",
        "## How it is measured",
        "",
        METHOD,
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in report.machine.items()),
    ]
    errors = report.errors + [
        f"{r.label}: {e}" for r in (report.agent, report.runner) for e in r.errors
    ]
    if errors:
        lines += ["", "## Errors", "", *(f"- {e}" for e in errors)]
    return "\n".join(lines) + "\n"
