"""The benchmark keeps working (issue 8): `python -m bench.run --smoke` end to end.

It starts its own Prefect server, runs every scenario once against runner-agent and Prefect's
Runner (and runner-agent's work-pool pickup beside a config deployment), and must write a
complete report and leave no process behind.
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

from bench import pools, procs
from bench.imports import STEPS
from bench.report import ROWS, TABLE_HEADER
from tests.integration.prefect_server import VENV_ENV

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# A hang guard, not a speed target: the smoke run takes a few minutes, longer on a busy machine.
TIMEOUT = 900.0
# A figure the report prints: "0.12 s", "45.3 MiB", "0.010 %", "15", "0 of 3".
NUMBER = re.compile(r"^(\d+(\.\d+)?) (s|MiB|%)$|^\d+$|^\d+ of \d+$")


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

    imports = table(report, "| import step (cumulative) | RSS | PSS | USS | +RSS |")
    assert [row[0] for row in imports] == [label for label, _ in STEPS]
    rss = [float(row[1].split()[0]) for row in imports]
    assert rss == sorted(rss) and rss[0] > 3, rss
    assert "## Errors" not in report
