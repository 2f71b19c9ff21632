"""How much the benchmark measures: the full plan (BENCHMARKS.md) and the smoke plan (tests)."""

from __future__ import annotations

from dataclasses import dataclass

LIMIT = 4


@dataclass(frozen=True)
class Plan:
    idle: float  # seconds
    sequential: int
    bursts: int
    burst_size: int
    cancellations: int
    footprint: tuple[int, ...]
    settle: float  # seconds after the deployments are registered
    # Issue 17 (bench/engines.py): per contender, sequential runs and bursts of `burst_size`;
    # per engine, instrumented runs for the phase breakdown (bench/phases.py).
    engine_sequential: int = 0
    engine_bursts: int = 0
    phase_runs: int = 0

    def describe(self) -> str:
        return (
            f"idle {self.idle:g} s; {self.sequential} sequential no-op runs; {self.bursts} "
            f"burst(s) of {self.burst_size} no-op runs; {self.cancellations} cancellation(s); "
            f"footprint with {', '.join(map(str, self.footprint))} runs; work-pool pickup: "
            f"{self.sequential} pool and {self.sequential} config runs, alternating; engines: "
            f"{self.engine_sequential} sequential runs and {self.engine_bursts} burst(s) of "
            f"{self.burst_size} per contender, {self.phase_runs} instrumented run(s) per engine"
        )


FULL = Plan(
    idle=30,
    sequential=15,
    bursts=3,
    burst_size=24,
    cancellations=3,
    footprint=(0, 4, 50),
    settle=10,
    engine_sequential=15,
    engine_bursts=3,
    phase_runs=10,
)
SMOKE = Plan(
    idle=3,
    sequential=1,
    bursts=1,
    burst_size=4,
    cancellations=1,
    footprint=(0, 4),
    settle=3,
    engine_sequential=1,
    engine_bursts=1,
    phase_runs=1,
)
