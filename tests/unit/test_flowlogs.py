from __future__ import annotations

import asyncio
import logging
from typing import Any
from uuid import uuid4

import pytest

from agent.emitter import backlog_text
from agent.flowlogs import FlowRunLogs


class Sink:
    def __init__(self, fail_times: int = 0) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.fail_times = fail_times

    async def __call__(self, batch: list[dict[str, Any]]) -> None:
        if self.fail_times:
            self.fail_times -= 1
            raise ConnectionError("API down")
        self.batches.append(batch)


async def test_messages_are_posted_in_prefect_log_shape() -> None:
    sink = Sink()
    run_id = uuid4()
    async with FlowRunLogs(sink, flush_interval=0.05) as logs:
        logs.emit(run_id, "Claimed by runner-agent 'a'")
        logs.emit(run_id, "Process exited with status 3", logging.WARNING)
        for _ in range(100):
            if sink.batches:
                break
            await asyncio.sleep(0.02)
    sent = [entry for batch in sink.batches for entry in batch]
    assert [e["message"] for e in sent] == [
        "Claimed by runner-agent 'a'",
        "Process exited with status 3",
    ]
    assert sent[0]["flow_run_id"] == str(run_id)
    assert sent[0]["name"] == "runner-agent"
    assert sent[1]["level"] == logging.WARNING
    assert sent[0]["task_run_id"] is None
    assert sent[0]["timestamp"].endswith("+00:00")


async def test_failed_batches_are_retried_in_order() -> None:
    sink = Sink(fail_times=2)
    run_id = uuid4()
    logs = FlowRunLogs(sink, flush_interval=0.01, max_backoff=0.02)
    async with logs:
        for i in range(5):
            logs.emit(run_id, f"m{i}")
        for _ in range(300):
            if logs.sent == 5:
                break
            await asyncio.sleep(0.01)
    assert [e["message"] for batch in sink.batches for e in batch] == [f"m{i}" for i in range(5)]
    assert logs.dropped == 0


async def test_buffer_is_bounded_and_drops_oldest() -> None:
    sink = Sink(fail_times=10**6)
    logs = FlowRunLogs(sink, max_buffered=3, flush_interval=10)
    run_id = uuid4()
    for i in range(10):
        logs.emit(run_id, f"m{i}")
    assert logs.pending == 3
    assert logs.dropped == 7
    with pytest.raises(ConnectionError):
        await logs.flush()
    # A failed flush puts the batch back: nothing is lost beyond the bound.
    assert logs.pending == 3


async def test_backlog_and_counters_for_the_status_line() -> None:
    sink = Sink(fail_times=1)
    logs = FlowRunLogs(sink, max_buffered=2, flush_interval=10)
    run_id = uuid4()
    for i in range(3):
        logs.emit(run_id, f"m{i}")
    assert (logs.kind, logs.max_buffered) == ("flow-run log messages", 2)
    assert backlog_text(logs) == "2/2 flow-run log messages queued, 1 flow-run log messages dropped"
    with pytest.raises(ConnectionError):
        await logs.flush()
    await logs.flush()
    assert logs.stats() == {"sent": 2, "dropped": 1, "rejected": 0, "pending": 0}
    assert backlog_text(logs) == "1 flow-run log messages dropped"
