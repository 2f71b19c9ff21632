"""The agent's own messages about a flow run, shown in the run's log view in the Prefect UI.

Messages are buffered (bounded, oldest dropped first and counted) and posted in batches to
`POST /logs/`. A failed batch goes back to the front of the buffer, so an API outage delays the
messages instead of losing them, up to the buffer's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any
from uuid import UUID

log = logging.getLogger("agent.flowlogs")

LOGGER_NAME = "runner-agent"
SendLogs = Callable[[list[dict[str, Any]]], Awaitable[None]]


class FlowRunLogs:
    def __init__(
        self,
        send: SendLogs,
        *,
        max_buffered: int = 10_000,
        batch_size: int = 200,
        flush_interval: float = 1.0,
        max_backoff: float = 30.0,
    ) -> None:
        self._send = send
        self._buffer: deque[dict[str, Any]] = deque()
        self._max_buffered = max_buffered
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._max_backoff = max_backoff
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        self.sent = 0

    def emit(self, flow_run_id: UUID, message: str, level: int = logging.INFO) -> None:
        """Queue one message for the run's log view; never blocks, never raises."""
        if len(self._buffer) >= self._max_buffered:
            self._buffer.popleft()
            self.dropped += 1
        self._buffer.append(
            {
                "name": LOGGER_NAME,
                "level": level,
                "message": message,
                "timestamp": datetime.now(UTC).isoformat(),
                "flow_run_id": str(flow_run_id),
                "task_run_id": None,
            }
        )
        if len(self._buffer) >= self._batch_size:
            self._wakeup.set()

    @property
    def pending(self) -> int:
        return len(self._buffer)

    async def __aenter__(self) -> FlowRunLogs:
        self._task = asyncio.create_task(self._run(), name="flow-run-logs")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        # One bounded last attempt, so a clean stop delivers what it can.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), timeout=3.0)
        if self._buffer:
            log.warning("%d flow-run log messages were not delivered at shutdown", self.pending)

    async def flush(self) -> None:
        while self._buffer:
            batch = [
                self._buffer.popleft() for _ in range(min(self._batch_size, len(self._buffer)))
            ]
            try:
                await self._send(batch)
            except BaseException:
                self._buffer.extendleft(reversed(batch))
                raise
            self.sent += len(batch)

    async def _run(self) -> None:
        backoff = self._flush_interval
        reported_drops = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=backoff)
            self._wakeup.clear()
            if self.dropped != reported_drops:
                log.warning(
                    "dropped %d flow-run log messages while the API was unreachable",
                    self.dropped - reported_drops,
                )
                reported_drops = self.dropped
            try:
                await self.flush()
                backoff = self._flush_interval
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                backoff = min(self._max_backoff, max(backoff * 2, 1.0))
                log.warning(
                    "could not post %d flow-run log messages, retrying in %.0fs: %s",
                    self.pending,
                    backoff,
                    exc,
                )
