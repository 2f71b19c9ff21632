"""Operator commands: `runner-agent status` and `runner-agent logs <flow-run-id>`.

Both read only what is on this host: the agent's durable run records (records.py), the
processes themselves (psutil) and the journal. They never talk to the API, so they answer while
the agent or the server is down.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO
from uuid import UUID

from agent.jobvars import JobVariablesError, apply_job_variables, recorded_layers
from agent.launch.systemd import unit_name
from agent.launch.wrapper import OUTPUT_LOG
from agent.processes import Usage, process_usage
from agent.records import RunRecord, RunRecords
from agent.settings import FlowRunSettings, Settings
from agent.values import format_count, format_cpu_quota, format_duration, format_size
from agent.warm.memory import TemplateStatus

EX_OK = 0
EX_FAILURE = 1


@dataclass(frozen=True)
class RunStatus:
    flow_run_id: str
    deployment: str
    unit: str | None
    pid: int | None
    phase: str
    claimed_at: float | None
    age_seconds: float | None
    alive: bool
    processes: int
    rss_bytes: int | None
    cpu_seconds: float | None
    limits: dict[str, Any]


def limits_of(
    settings: Settings, deployment: str, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A run's limits, as the config spells them: its deployment's, with the job variables it
    was launched with (`extra` of its record) applied."""
    configured = settings.deployment(deployment)
    flow_run: FlowRunSettings = (
        configured.flow_run_settings(settings.flow_run)
        if configured is not None
        else settings.flow_run
    )
    with contextlib.suppress(JobVariablesError):  # the host's config changed since the launch
        flow_run = apply_job_variables(
            flow_run, recorded_layers(extra or {}), allowed=settings.agent.job_variables
        )
    return {
        "memory_max": format_size(flow_run.memory_max),
        "cpu_quota": format_cpu_quota(flow_run.cpu_quota),
        "tasks_max": format_count(flow_run.tasks_max),
        "runtime_max": format_duration(flow_run.runtime_max),
        "user": flow_run.user or None,
        "configured": configured is not None,
    }


def run_status(
    record: RunRecord,
    settings: Settings,
    *,
    usage: Callable[[int | None, float | None], Usage | None] = process_usage,
    now: float,
) -> RunStatus:
    used = usage(record.pid, record.extra.get("create_time"))
    since = (
        record.claimed_at
        if record.claimed_at is not None
        else (used.started_at if used is not None else None)
    )
    return RunStatus(
        flow_run_id=record.flow_run_id,
        deployment=record.deployment,
        unit=record.unit,
        pid=record.pid,
        phase=record.phase,
        claimed_at=record.claimed_at,
        age_seconds=max(0.0, now - since) if since is not None else None,
        alive=used is not None,
        processes=used.processes if used is not None else 0,
        rss_bytes=used.rss_bytes if used is not None else None,
        cpu_seconds=used.cpu_seconds if used is not None else None,
        limits=limits_of(settings, record.deployment, record.extra),
    )


def collect(
    settings: Settings,
    *,
    usage: Callable[[int | None, float | None], Usage | None] = process_usage,
    clock: Callable[[], float] = time.time,
) -> list[RunStatus]:
    """Every run this host's agent has a record of, oldest claim first."""
    records = RunRecords(settings.agent.state_dir).all()
    now = clock()
    found = [run_status(r, settings, usage=usage, now=now) for r in records]
    return sorted(found, key=lambda s: (s.claimed_at is None, s.claimed_at or 0.0, s.flow_run_id))


# -- rendering ---------------------------------------------------------------------------------


def human_bytes(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = int(seconds)
    if whole < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(whole, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


COLUMNS = ("FLOW RUN", "DEPLOYMENT", "PHASE", "PID", "AGE", "RSS", "CPU", "LIMITS", "UNIT")


def table_rows(runs: Iterable[RunStatus]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for run in runs:
        limits = run.limits
        pid = "-" if run.pid is None else f"{run.pid}{'' if run.alive else ' (gone)'}"
        rows.append(
            (
                run.flow_run_id,
                run.deployment + ("" if limits["configured"] else " (not configured)"),
                run.phase,
                pid,
                human_seconds(run.age_seconds),
                human_bytes(run.rss_bytes),
                human_seconds(run.cpu_seconds),
                f"mem={limits['memory_max']} cpu={limits['cpu_quota']} "
                f"tasks={limits['tasks_max']} runtime={limits['runtime_max']}",
                run.unit or "-",
            )
        )
    return rows


def render_table(runs: Sequence[RunStatus]) -> str:
    if not runs:
        return "no flow runs on this host\n"
    rows = [COLUMNS, *table_rows(runs)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join(lines) + "\n"


def render_templates(templates: Sequence[TemplateStatus]) -> str:
    """The warm templates section (none: nothing, as for a host without warm deployments)."""
    if not templates:
        return ""
    rows = [("WARM TEMPLATE", "PID", "PYTHON", "FORKS", "RSS", "PSS", "USS", "UNIT")]
    for t in templates:
        pid = "-" if t.pid is None else f"{t.pid}{'' if t.alive else ' (gone)'}"
        rows.append(
            (
                t.key,
                pid,
                t.python,
                str(t.forks),
                human_bytes(t.rss_bytes),
                human_bytes(t.pss_bytes),
                human_bytes(t.uss_bytes),
                t.unit,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n" + "\n".join(lines) + "\n"


def render_json(runs: Sequence[RunStatus], templates: Sequence[TemplateStatus] = ()) -> str:
    document = {"runs": [asdict(r) for r in runs], "warm_templates": [asdict(t) for t in templates]}
    return json.dumps(document, indent=2) + "\n"


# -- the run's output --------------------------------------------------------------------------


def journal_argv(journalctl: str, flow_run_id: UUID, *, follow: bool) -> list[str]:
    """The journal of the run's scope: the flow's own output, also after the run has ended."""
    argv = [journalctl, "--no-pager", "-o", "cat", "-u", unit_name(flow_run_id)]
    return [*argv, "-f"] if follow else argv


def output_log(settings: Settings, flow_run_id: UUID) -> Path:
    """Where the process launcher keeps a run's output (next to its exit status)."""
    return settings.agent.runtime_dir / "runs" / str(flow_run_id) / OUTPUT_LOG


def stream(argv: list[str], out: TextIO) -> int:
    """Run argv, copying its output line by line (so `-f` shows lines as they come)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, errors="replace")
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            out.write(line)
            out.flush()
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        return 130
    finally:
        proc.stdout.close()


def print_file(
    path: Path,
    out: TextIO,
    error: Callable[[str], None],
    *,
    follow: bool,
    poll: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    try:
        handle = path.open(errors="replace")
    except FileNotFoundError:
        error(f"{path}: no output recorded for this run (it may have ended and been cleaned up)")
        return EX_FAILURE
    except OSError as exc:
        error(f"{path}: {exc.strerror or exc}")
        return EX_FAILURE
    with handle:
        try:
            while True:
                chunk = handle.read()
                if chunk:
                    out.write(chunk)
                    out.flush()
                if not follow or not path.exists():
                    return EX_OK
                sleep(poll)
        except KeyboardInterrupt:
            return 130
