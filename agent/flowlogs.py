"""The agent's own messages about a flow run, shown in the run's log view in the Prefect UI.

Messages go through the same bounded, batching buffer as events (`EventEmitter`, oldest dropped
first and counted; a failed batch goes back to the front), posted to `POST /logs/`. An API outage
delays the messages instead of losing them, up to the buffer's size.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any
from uuid import UUID

from agent.emitter import EventEmitter

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
        self._buffer = EventEmitter(
            send,
            max_buffered=max_buffered,
            batch_size=batch_size,
            flush_interval=flush_interval,
            max_backoff=max_backoff,
            kind="flow-run log messages",
        )

    def emit(self, flow_run_id: UUID, message: str, level: int = logging.INFO) -> None:
        """Queue one message for the run's log view; never blocks, never raises."""
        self._buffer.emit(
            {
                "name": LOGGER_NAME,
                "level": level,
                "message": message,
                "timestamp": datetime.now(UTC).isoformat(),
                "flow_run_id": str(flow_run_id),
                "task_run_id": None,
            }
        )

    @property
    def kind(self) -> str:
        return self._buffer.kind

    @property
    def pending(self) -> int:
        return self._buffer.pending

    @property
    def max_buffered(self) -> int:
        return self._buffer.max_buffered

    @property
    def dropped(self) -> int:
        return self._buffer.dropped

    @property
    def sent(self) -> int:
        return self._buffer.sent

    def stats(self) -> dict[str, int]:
        return self._buffer.stats()

    def retry_now(self) -> None:
        self._buffer.retry_now()

    async def flush(self) -> None:
        await self._buffer.flush()

    async def __aenter__(self) -> FlowRunLogs:
        await self._buffer.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._buffer.__aexit__(exc_type, exc, tb)
