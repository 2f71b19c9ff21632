"""Where a run's start goes, phase by phase, for a cold and a warm engine (issue 17).

The instrumented deployments put a directory on the runs' PYTHONPATH that holds only the
`sitecustomize.py` below. The interpreter imports it at start-up: in a cold engine, and in a
warm template (PYTHONPATH is one of the start-up variables that key the template, so the
instrumented deployment gets a template of its own and the others stay uninstrumented). It
stamps the time of the forks (W from the template, E from W), of `runpy.run_module` (the warm
engine starting after its turn), of `load_flow_run`, `load_flow` and `run_flow` in
`prefect.flow_engine`, and, at E's exit, writes the stamps with E's own CPU time to
`$BENCH_PHASES_DIR/<flow run id>.json`. The server's timestamps (created, PENDING, RUNNING,
final) complete the picture. Same host, same clock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.api import Timeline
from bench.scenarios import percentile

OUT_ENV = "BENCH_PHASES_DIR"  # spelled out in SITECUSTOMIZE too

# Stdlib only; no thread, no open file, nothing configured before the fork: a warm template
# refuses to serve otherwise (agent/warm/template.py check_clean).
SITECUSTOMIZE = '''\
"""runner-agent bench/phases.py: stamps the phases of a flow run's engine."""
import atexit
import functools
import os
import runpy
import sys
import time

_STAMPS = {"interpreter": time.time()}


def _forked():
    # A warm template's children: W first (the template's fork), then E (W's fork). What the
    # template itself called is not the run's.
    for key in [k for k in _STAMPS if "." in k]:
        del _STAMPS[key]
    _STAMPS["e_forked" if "w_forked" in _STAMPS else "w_forked"] = time.time()


os.register_at_fork(after_in_child=_forked)
_DEPTH = {}


def _timed(name, fn):
    @functools.wraps(fn)
    def timed(*args, **kwargs):
        _STAMPS.setdefault(name + ".start", time.time())
        _DEPTH[name] = _DEPTH.get(name, 0) + 1
        try:
            return fn(*args, **kwargs)
        finally:
            _DEPTH[name] -= 1
            if not _DEPTH[name]:  # the outermost call of a recursive one
                _STAMPS.setdefault(name + ".end", time.time())

    return timed


PATCHED = {
    "prefect.flow_engine": ("load_flow_run", "load_flow", "run_flow"),
    "prefect.context": ("root_settings_context",),
    "prefect.logging.configuration": ("setup_logging",),
}


class _Patcher:
    """Wraps functions of Prefect's modules as soon as each module has run (so a call made by
    the module's own body, at import, is not timed)."""

    def find_spec(self, name, path=None, target=None):
        if name not in PATCHED:
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                for fn in PATCHED[name]:
                    setattr(module, fn, _timed(fn, getattr(module, fn)))

            spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Patcher())
_run_module = runpy.run_module


def _run_module_stamped(*args, **kwargs):
    _STAMPS.setdefault("engine_started", time.time())  # a warm E, its turn done
    return _run_module(*args, **kwargs)


runpy.run_module = _run_module_stamped


def _process_start():
    # Clock ticks since boot (CLOCK_BOOTTIME); /proc/stat's btime is whole seconds only.
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - age


def _dump():
    out, run_id = os.environ.get("BENCH_PHASES_DIR"), os.environ.get("PREFECT__FLOW_RUN_ID")
    if not out or not run_id or "load_flow_run.start" not in _STAMPS:
        return
    times = os.times()
    _STAMPS.update(
        exit=time.time(), pid=os.getpid(), cpu=times.user + times.system, started=_process_start()
    )
    import json

    tmp = os.path.join(out, "." + run_id)
    with open(tmp, "w") as f:
        json.dump(_STAMPS, f)
    os.replace(tmp, os.path.join(out, run_id + ".json"))


atexit.register(_dump)
'''


def write_site(directory: Path) -> Path:
    """The directory to put on the instrumented runs' PYTHONPATH."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return directory


@dataclass(frozen=True)
class PhaseRun:
    engine: str  # "cold" | "warm"
    timeline: Timeline
    stamps: dict[str, Any]

    @property
    def warm(self) -> bool:
        return "w_forked" in self.stamps  # False: a warm deployment's run that started cold


def read_stamps(out: Path, run_id: str) -> dict[str, Any] | None:
    try:
        data = json.loads((out / f"{run_id}.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _span(run: PhaseRun, start: str, end: str) -> float | None:
    """Seconds from one stamp to another; server stamps: created, pending, running, final."""
    t = run.timeline
    server: dict[str, float | None] = {
        "created": t.created,
        "pending": _first(t, "PENDING"),
        "running": _first(t, "RUNNING"),
        "final": t.final_at,
    }

    def at(name: str) -> float | None:
        if name in server:
            return server[name]
        value = run.stamps.get(name)
        return float(value) if isinstance(value, int | float) else None

    a, b = at(start), at(end)
    return None if a is None or b is None else b - a


def _first(t: Timeline, state_type: str) -> float | None:
    return next((ts for ts, s in t.states if s == state_type), None)


Span = tuple[str, str] | None


@dataclass(frozen=True)
class Phase:
    key: str
    label: str
    cold: Span  # (from, to): stamp names as in SITECUSTOMIZE, or the server's states
    warm: Span


PHASES: tuple[Phase, ...] = (
    Phase(
        "claim",
        "created → PENDING: the agent's pickup and claim",
        ("created", "pending"),
        ("created", "pending"),
    ),
    Phase(
        "launch",
        "PENDING → the run's process exists (cold: python started by the wrapper; warm: W "
        "forked by the template)",
        ("pending", "started"),
        ("pending", "w_forked"),
    ),
    Phase(
        "handover",
        "hand-over: W forked → E forked (spec, W's pid, pidfd, `go`, output, `pid` record; "
        "under systemd also the scope move)",
        None,
        ("w_forked", "e_forked"),
    ),
    Phase(
        "turn",
        "cold: interpreter start-up (exec → site); warm: E turned into the run (environment, "
        "identity, Prefect settings, logging)",
        ("started", "interpreter"),
        ("e_forked", "engine_started"),
    ),
    Phase(
        "settings",
        "— of which Prefect's settings, from the run's environment (`root_settings_context`; "
        "cold: built by Prefect's imports, not timed)",
        None,
        ("root_settings_context.start", "root_settings_context.end"),
    ),
    Phase(
        "logging",
        "— of which the logging config (`setup_logging`; cold: during Prefect's imports)",
        ("setup_logging.start", "setup_logging.end"),
        ("setup_logging.start", "setup_logging.end"),
    ),
    Phase(
        "main",
        "→ first API call: `prefect.engine` as `__main__` (cold: with Prefect's imports)",
        ("interpreter", "load_flow_run.start"),
        ("engine_started", "load_flow_run.start"),
    ),
    Phase(
        "api",
        "first API call (`load_flow_run`: a client, GET the run)",
        ("load_flow_run.start", "load_flow_run.end"),
        ("load_flow_run.start", "load_flow_run.end"),
    ),
    Phase(
        "load",
        "flow load (`load_flow`: the deployment, its pull step, the flow's module)",
        ("load_flow.start", "load_flow.end"),
        ("load_flow.start", "load_flow.end"),
    ),
    Phase(
        "to_run_flow",
        "flow loaded → `run_flow` entered (run logger, metrics)",
        ("load_flow.end", "run_flow.start"),
        ("load_flow.end", "run_flow.start"),
    ),
    Phase(
        "running",
        "`run_flow` entered → RUNNING (contexts, an async client, workers, the proposal)",
        ("run_flow.start", "running"),
        ("run_flow.start", "running"),
    ),
    Phase("start", "**created → RUNNING**", ("created", "running"), ("created", "running")),
    Phase(
        "tail",
        "final state → the engine exits (heartbeat thread, log and event workers)",
        ("final", "exit"),
        ("final", "exit"),
    ),
    Phase(
        "hold",
        "PENDING → the engine exits: how long a run holds its slot",
        ("pending", "exit"),
        ("pending", "exit"),
    ),
)
CPU_ROW = "engine CPU of E alone (cold: imports included; warm: after its fork)"


def median_span(runs: list[PhaseRun], span: Span) -> float | None:
    if span is None:
        return None
    values = [v for r in runs if (v := _span(r, *span)) is not None]
    return percentile(values, 50) if values else None


def median_cpu(runs: list[PhaseRun]) -> float | None:
    values = [float(r.stamps["cpu"]) for r in runs if isinstance(r.stamps.get("cpu"), int | float)]
    return percentile(values, 50) if values else None


def medians(runs: list[PhaseRun]) -> dict[str, tuple[float | None, float | None]]:
    """Phase key (and "cpu") -> (cold p50, warm p50) in seconds; warm counts only the runs that
    really were forked."""
    cold = [r for r in runs if r.engine == "cold"]
    warm = [r for r in runs if r.engine == "warm" and r.warm]
    found = {p.key: (median_span(cold, p.cold), median_span(warm, p.warm)) for p in PHASES}
    found["cpu"] = (median_cpu(cold), median_cpu(warm))
    return found


def breakdown(runs: list[PhaseRun]) -> list[tuple[str, float | None, float | None]]:
    """(phase, cold p50, warm p50), in the table's order."""
    found = medians(runs)
    rows = [(p.label, *found[p.key]) for p in PHASES]
    return [*rows, (CPU_ROW, *found["cpu"])]
