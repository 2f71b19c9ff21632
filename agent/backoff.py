"""The one backoff policy: capped exponential growth with equal jitter.

Every retry in the agent (API requests, state deliveries, the events websocket, the event and
log buffers) waits `Backoff.delay(attempt)`: half of the capped exponential step is fixed and
half is random. The fixed half keeps a retry from hammering a server that just failed; the
random half spreads a fleet of agents that all lost the API at the same moment.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# Beyond this exponent the step is capped anyway; it keeps 2**n small.
_MAX_EXPONENT = 32


@dataclass(frozen=True)
class Backoff:
    """`base` is the first step in seconds, `cap` the largest."""

    base: float
    cap: float
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.base <= 0 or self.cap < self.base:
            raise ValueError(f"need 0 < base <= cap, got base={self.base}, cap={self.cap}")

    def step(self, attempt: int) -> float:
        """The un-jittered step after failed `attempt` (1-based)."""
        exponent = min(max(attempt, 1) - 1, _MAX_EXPONENT)
        return min(self.cap, self.base * float(2**exponent))

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed `attempt` (1-based): between step/2 and step."""
        step = self.step(attempt)
        return step / 2 + self.rng.uniform(0.0, step / 2)
