"""The scenarios, each measured the same way for both contenders.

Latencies come from the server's state timestamps (bench/api.py); memory, CPU, threads and fds
from psutil on the serving process (the agent, or the python running `prefect.serve`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import psutil

from bench import procs
from bench.api import FINAL, BenchApi, BenchError, Timeline, wait_until
from bench.subjects import Contender

RUN_TIMEOUT = 180.0
CANCELLED_TIMEOUT = 60.0
# How long after CANCELLED a surviving grandchild counts as an orphan.
ORPHAN_GRACE = 5.0


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); q in [0, 100]."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _alive(contender: Contender) -> None:
    if not contender.alive():
        raise BenchError(
            f"{contender.label} exited with status {contender.proc.returncode}; log tail:\n"
            f"{contender.log_tail()}"
        )


@dataclass(frozen=True)
class Idle:
    seconds: float
    rss: float  # median of the samples, bytes
    footprint: procs.Footprint  # at the end of the window
    cpu_percent: float  # of one core


def idle(contender: Contender, seconds: float) -> Idle:
    _alive(contender)
    samples: list[int] = []
    ticks0, (ns0, tids0) = procs.cpu_seconds(contender.pid), procs.cpu_ns(contender.pid)
    wall0 = time.monotonic()
    while time.monotonic() - wall0 < seconds:
        samples.append(procs.footprint(contender.pid).rss)
        time.sleep(min(1.0, max(0.0, seconds - (time.monotonic() - wall0))))
    ticks1, (ns1, tids1) = procs.cpu_seconds(contender.pid), procs.cpu_ns(contender.pid)
    wall1 = time.monotonic()
    _alive(contender)
    # Nanosecond precision unless a thread exited meanwhile (its time would be lost).
    used = (ns1 - ns0) / 1e9 if tids0 <= tids1 else ticks1 - ticks0
    return Idle(
        seconds=wall1 - wall0,
        rss=statistics.median(samples),
        footprint=procs.footprint(contender.pid),
        cpu_percent=100 * used / (wall1 - wall0),
    )


@dataclass(frozen=True)
class Sequential:
    timelines: list[Timeline]

    @property
    def completed(self) -> int:
        return sum(1 for t in self.timelines if t.final_type == "COMPLETED")

    def values(self, what: str) -> list[float]:
        found = [getattr(t, what) for t in self.timelines]
        return [float(v) for v in found if v is not None]


def sequential(api: BenchApi, contender: Contender, deployment_id: str, runs: int) -> Sequential:
    """One run at a time: create it, wait until it is final, read its timeline."""
    timelines = []
    for _ in range(runs):
        _alive(contender)
        run_id = api.create_run(deployment_id)
        api.wait_final([run_id], RUN_TIMEOUT)
        timelines.append(api.timeline(run_id))
    return Sequential(timelines)


@dataclass(frozen=True)
class Burst:
    runs: int
    completed: int
    wall: float  # first created -> last final, server time
    peak_rss: int
    cpu_seconds: float  # of the serving process during the burst
    run_ids: tuple[str, ...] = ()


def burst(api: BenchApi, contender: Contender, deployment_id: str, runs: int) -> Burst:
    _alive(contender)
    cpu0 = procs.cpu_seconds(contender.pid)
    with procs.PeakRss(contender.pid) as peak:
        run_ids = [api.create_run(deployment_id) for _ in range(runs)]
        api.wait_final(run_ids, RUN_TIMEOUT + 20 * runs)
    cpu1 = procs.cpu_seconds(contender.pid)
    timelines = [api.timeline(r) for r in run_ids]
    finals = [t.final_at for t in timelines if t.final_at is not None]
    return Burst(
        runs=runs,
        completed=sum(1 for t in timelines if t.final_type == "COMPLETED"),
        wall=max(finals) - min(t.created for t in timelines),
        peak_rss=peak.peak,
        cpu_seconds=cpu1 - cpu0,
        run_ids=tuple(run_ids),
    )


@dataclass(frozen=True)
class Cancellation:
    run_id: str
    final_type: str | None
    latency: float | None  # CANCELLING -> CANCELLED, server time
    orphans: int  # `sleep 600` grandchildren alive ORPHAN_GRACE after CANCELLED
    leftovers: int  # any other process of the run still alive then
    engine_gone: float | None  # CANCELLING -> the run's processes (but `sleep`) have exited
    states: tuple[tuple[float, str], ...]  # seconds after CANCELLING, state type
    history: tuple[str, ...] = ()  # every state type of the run, in order
    path: str | None = None  # how runner-agent stopped it (cancel_path); None for the Runner

    @property
    def crashed_in_history(self) -> bool:
        """A cancelled run that went through CRASHED fired every "Crashed" automation."""
        return "CRASHED" in self.history


# runner-agent's note in the run's logs says which way the cancellation went (supervisor.py).
CANCEL_PATHS = (
    ("the engine acknowledged the cancellation", "control channel"),
    ("no control channel answer from the engine", "fallback: SIGTERM without acknowledgement"),
)


def cancel_path(messages: list[str]) -> str | None:
    for text, path in CANCEL_PATHS:
        if any(text in message for message in messages):
            return path
    return None


def cancellation(api: BenchApi, contender: Contender, deployment_id: str, tag: str) -> Cancellation:
    """Cancel a sleeper once it runs and its `sleep 600` grandchild exists."""
    _alive(contender)
    run_id = api.create_run(deployment_id)

    def started() -> bool:
        _alive(contender)
        return api.state_types([run_id]).get(run_id) == "RUNNING" and bool(
            procs.sleepers(tag).get(run_id)
        )

    wait_until(started, RUN_TIMEOUT, interval=0.25, what=f"sleeper {run_id} and its grandchild")
    sleeping = procs.sleepers(tag).get(run_id, [])
    engine = [p for p in procs.marked(tag) if _run_id_of(p) == run_id and p not in sleeping]
    api.set_cancelling(run_id)
    # Watch only the pids known before the request: cheap enough to poll every 10 ms.
    gone_at = _wait_gone(engine, timeout=RUN_TIMEOUT)
    try:
        # Not just any final state: the engine answers SIGTERM with CRASHED for a moment,
        # which its runner is expected to replace with CANCELLED.
        api.wait_states(
            [run_id],
            frozenset({"CANCELLED"}),
            CANCELLED_TIMEOUT,
            what=f"run {run_id} to be CANCELLED",
        )
    except BenchError:
        api.wait_final([run_id], RUN_TIMEOUT)  # it ended otherwise; the timeline says how
    timeline = api.timeline(run_id)
    final_at = timeline.final_at or time.time()
    time.sleep(max(0.0, final_at + ORPHAN_GRACE - time.time()))
    orphans = procs.sleepers(tag).get(run_id, [])
    others = [p for p in procs.marked(tag) if p not in orphans and _run_id_of(p) == run_id]
    # Count first, then clean up: nothing of a cancelled run may outlive the benchmark.
    procs.kill(orphans + others)
    # The agent's notes reach the server in batches; ORPHAN_GRACE has passed since CANCELLED.
    path = cancel_path(api.log_messages(run_id))
    cancelling = (
        final_at - timeline.cancel
        if timeline.cancel is not None
        else next((ts for ts, t in timeline.states if t == "CANCELLING"), None)
    )
    return Cancellation(
        run_id,
        timeline.final_type,
        timeline.cancel,
        len(orphans),
        len(others),
        engine_gone=gone_at - cancelling if gone_at and cancelling else None,
        states=tuple(
            (ts - cancelling, t)
            for ts, t in timeline.states
            if cancelling is not None and ts >= cancelling
        ),
        history=tuple(t for _ts, t in timeline.states),
        path=path,
    )


def _wait_gone(watched: list[psutil.Process], timeout: float) -> float | None:
    """POSIX time at which every watched process had exited (zombies count as exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_running(p) for p in watched):
            return time.time()
        time.sleep(0.01)
    return None


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _run_id_of(proc: psutil.Process) -> str:
    try:
        return str(proc.environ().get("PREFECT__FLOW_RUN_ID", ""))
    except (psutil.Error, OSError):
        return ""


@dataclass
class FootprintSeries:
    points: dict[int, procs.Footprint] = field(default_factory=dict)
    cancel_wall: float | None = None  # all runs CANCELLING -> all CANCELLED, local clock
    cancelled: int = 0
    leftovers: int = 0


def footprint_series(
    api: BenchApi,
    contender: Contender,
    deployment_id: str,
    tag: str,
    counts: list[int],
    settle: float,
) -> FootprintSeries:
    """The agent's footprint with 0, 4, 50 ... runs of the fake engine running at once."""
    series = FootprintSeries()
    run_ids: list[str] = []
    try:
        for count in sorted(counts):
            _alive(contender)
            run_ids += [api.create_run(deployment_id) for _ in range(count - len(run_ids))]

            def launched(expected: int = count, ids: list[str] = run_ids) -> bool:
                _alive(contender)
                by_run = procs.sleepers(tag)
                return sum(1 for r in ids if by_run.get(r)) == expected

            wait_until(
                launched,
                RUN_TIMEOUT + 2 * count,
                interval=0.5,
                what=f"{count} fake runs to be running",
            )
            time.sleep(settle)
            series.points[count] = procs.footprint(contender.pid)
        if run_ids:
            started = time.monotonic()
            for run_id in run_ids:
                api.set_cancelling(run_id)
            states = api.wait_states(
                run_ids, FINAL, RUN_TIMEOUT, what=f"{len(run_ids)} fake runs to be cancelled"
            )
            series.cancel_wall = time.monotonic() - started
            series.cancelled = sum(1 for s in states.values() if s == "CANCELLED")
    finally:
        by_run = procs.sleepers(tag)
        series.leftovers = procs.kill([p for r in run_ids for p in by_run.get(r, [])])
    return series
