"""The benchmark keeps working (issue 8): `python -m bench.run --smoke` end to end.

It starts its own Prefect server, runs every scenario once against runner-agent and Prefect's
Runner (and runner-agent's work-pool pickup beside a config deployment, and issue 17's cold and
warm engines beside the Runner at two poll intervals), and must write a complete report and
leave no process behind: no warm template, no forked run either. Figures are checked for being
figures, never against a time budget.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from bench import engines_report, phases, pools, procs
from bench.imports import STEPS
from bench.report import ROWS, TABLE_HEADER
from tests.integration.prefect_server import VENV_ENV

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# A hang guard, not a speed target: the smoke run takes a few minutes, longer on a busy machine.
TIMEOUT = 900.0
# A figure the report prints: "0.12 s", "45.3 MiB", "0.010 %", "15", "0 of 3".
NUMBER = re.compile(r"^(\d+(\.\d+)?) (s|MiB|%|CPU-s)$|^\d+$|^\d+ of \d+$")
# A phase can come out a few ms below zero: a process's start time has 10 ms ticks.
PHASE = re.compile(r"^-?\d+\.\d+ (s|CPU-s)$")


def table(text: str, header: str) -> list[list[str]]:
    """The rows of the markdown table that starts with `header` (cells stripped)."""
    lines = text.splitlines()
    start = lines.index(header)
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def table_starting(text: str, prefix: str) -> list[list[str]]:
    """The rows of the markdown table whose header line starts with `prefix`."""
    header = next(line for line in text.splitlines() if line.startswith(prefix))
    return table(text, header)


def leftovers(tag: str, workdir: str) -> list[str]:
    """Processes carrying the benchmark's tag or pointing into its work directory."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
            environ = proc.environ()
        except (psutil.Error, OSError):
            continue
        if environ.get(procs.MARKER) == tag or (
            workdir and (workdir in cmdline or workdir in (proc.info["cwd"] or ""))
        ):
            found.append(f"{proc.pid}: {cmdline}")
    return found


# Beyond the suite's 600 s: the benchmark's own timeout and its clean-up must come first.
@pytest.mark.timeout(TIMEOUT + 120)
def test_smoke_benchmark_writes_a_full_report(tmp_path: Path) -> None:
    venv = os.environ.get(VENV_ENV, "")
    if not venv:
        pytest.skip(
            f"{VENV_ENV} is not set: the benchmark needs the Prefect venv that packaging/dev.sh "
            "builds (run `bash packaging/dev.sh test`)"
        )
    out = tmp_path / "BENCHMARKS.md"
    tag = f"test-{uuid.uuid4().hex[:12]}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.run", "--smoke", "--out", str(out), "--tag", tag],
        cwd=REPO,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the benchmark cleans up on it; then make sure.
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"the smoke benchmark took over {TIMEOUT:.0f}s:\n{output[-4000:]}")
    match = re.search(r"work dir (\S+),", output)
    workdir = match.group(1) if match else ""
    assert proc.returncode == 0, output[-4000:]

    left = leftovers(tag, workdir)
    assert not left, f"processes left behind: {left}"
    assert workdir and not Path(workdir).exists(), f"work dir {workdir!r} not removed"

    report = out.read_text()
    rows = table(report, TABLE_HEADER)
    assert [row[0] for row in rows] == [row.figure for row in ROWS]
    for figure, agent, runner, *_ in rows:
        assert NUMBER.match(agent), f"runner-agent's {figure!r} is not a figure: {agent!r}"
        assert NUMBER.match(runner), f"the Runner's {figure!r} is not a figure: {runner!r}"

    def value(figure: str, column: int) -> float:
        cell = next(row[column] for row in rows if row[0] == figure)
        return float(cell.split()[0])

    # Plausible, not just numeric: a live python process, runs that were really picked up.
    for column in (1, 2):
        assert 5 < value("idle RSS (median over the window)", column) < 1024
        assert 0 < value("pickup, created → PENDING, p50", column) < 60
        assert 0 < value("total, created → COMPLETED, p50", column) < 120
        assert value("sequential runs not COMPLETED", column) == 0

    footprint = table(
        report, "| running runs | RSS | USS | PSS | threads | open fds | RSS per run over idle |"
    )
    assert [row[0] for row in footprint] == ["0", "4"]
    for row in footprint:
        assert all(NUMBER.match(cell) for cell in row[1:6]), row

    # One agent served both: a run of the pool's deployment made through the API, and one of the
    # config's, each picked up and COMPLETED.
    pool = table(report, pools.TABLE_HEADER)
    assert [row[0] for row in pool] == [pools.POOL_ROW, pools.CONFIG_ROW], pool
    for label, runs, *latencies, not_completed in pool:
        assert runs == "1", (label, runs)
        for cell in latencies:
            assert NUMBER.match(cell) and cell.endswith(" s"), (label, cell)
        assert 0 < float(latencies[0].split()[0]) < 60, (label, latencies)
        assert not_completed == "0 of 1", (label, not_completed)

    check_engines(report)

    imports = table(report, "| import step (cumulative) | RSS | PSS | USS | +RSS |")
    assert [row[0] for row in imports] == [label for label, _ in STEPS]
    rss = [float(row[1].split()[0]) for row in imports]
    assert rss == sorted(rss) and rss[0] > 3, rss
    assert "## Errors" not in report


def check_engines(report: str) -> None:
    """Issue 17's section: four columns of figures, the template's memory, the phases."""
    rows = table_starting(report, engines_report.TABLE_HEADER_START)
    labels = [label for label, _, _ in engines_report.ROWS]
    assert [row[0] for row in rows] == [
        *labels,
        "runs not COMPLETED",
        "warm runs the agent started cold",
    ]
    for label, *cells in rows[: len(labels)]:
        for cell in cells[:4]:  # cold, warm, Runner at its default poll, Runner at 1 s
            assert NUMBER.match(cell), (label, cell, cells)
    not_completed = rows[len(labels)][1:5]
    assert all(cell.startswith("0 of ") for cell in not_completed), not_completed
    assert rows[-1][2].isdigit(), rows[-1]
    for target in ("- warm start p50", "- a burst of", "- engine CPU per run: warm"):
        line = next(line for line in report.splitlines() if line.startswith(target))
        assert line.endswith((": met", ": **not met**")), line

    memory = table(report, engines_report.MEMORY_HEADER)
    assert len(memory) == 2, memory
    for row in memory:
        assert all(NUMBER.match(cell) and cell.endswith(" MiB") for cell in row[1:4]), row

    steps = table(report, engines_report.PHASES_HEADER)
    assert len(steps) == len(phases.PHASES) + 1, steps
    untimed_cold = {p.label for p in phases.PHASES if p.cold is None}
    for label, cold, warm in steps:
        assert PHASE.match(warm), (label, warm)  # a warm run really was forked and timed
        assert PHASE.match(cold) or (cold == "—" and label in untimed_cold), (label, cold)
