"""Concurrency on this host: at most `agent.limit` flow runs at once.

Every run the agent holds takes a slot from the moment a poll hands it a supervisor (waiting
for its start time, claiming, running or reporting) until its story is told; recovered runs
take theirs at start. A reload may lower the limit below the slots in use: the runs keep their
slots and nothing new is taken until enough have ended.
"""

from __future__ import annotations

from collections.abc import Iterator
from uuid import UUID


class Slots:
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._held: set[UUID] = set()

    @property
    def limit(self) -> int:
        return self._limit

    def resize(self, limit: int) -> None:
        self._limit = limit

    @property
    def used(self) -> int:
        return len(self._held)

    @property
    def free(self) -> int:
        return max(0, self._limit - len(self._held))

    def take(self, flow_run_id: UUID, *, force: bool = False) -> bool:
        """Hold a slot for the run; False when none is free. `force` is for recovered runs,
        which are on this host already, whatever the limit says now."""
        if flow_run_id in self._held:
            return True
        if not force and self.free <= 0:
            return False
        self._held.add(flow_run_id)
        return True

    def release(self, flow_run_id: UUID) -> None:
        self._held.discard(flow_run_id)

    def __contains__(self, flow_run_id: object) -> bool:
        return flow_run_id in self._held

    def __iter__(self) -> Iterator[UUID]:
        return iter(self._held)

    def __len__(self) -> int:
        return len(self._held)
