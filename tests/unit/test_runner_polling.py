"""Idle polling stays cheap (issue 8): one request per `poll_interval`, wake-ups coalesce.

The runner, its fake server (httpx.MockTransport) and its fake launcher all live in the event
loop, so these run on a virtual clock (tests/unit/virtual_time.py): the counts are those of the
runner's timing logic, whatever the machine is doing.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.flowlogs import FlowRunLogs
from agent.runner import MIN_WAKE_GAP, POLL_JITTER
from tests.unit import test_fuzz_api_loop as fakes
from tests.unit.virtual_time import run_virtual


async def count_polls(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    interval: float,
    seconds: float,
    wake_every: float | None = None,
) -> tuple[int, list[str]]:
    """Polls sent in `seconds` after the first one, waking the runner every `wake_every`."""
    config = fakes.CONFIG.replace('poll_interval = "10ms"', f'poll_interval = "{interval}s"')
    monkeypatch.setattr(fakes, "CONFIG", config)
    server = fakes.FakePrefect()
    fakes._registered(server, tmp_path)  # registered and up to date; no runs due
    async with (
        fakes.agent_env(tmp_path, server) as (cfg, client, launcher, _errors),
        FlowRunLogs(client.create_logs) as logs,
    ):
        assert cfg.agent.poll_interval == interval
        runner = fakes.make_runner(cfg, client, launcher, logs)
        task = asyncio.create_task(runner.run())
        try:
            await fakes.eventually(lambda: "scheduled" in server.hits, "the first poll")
            first = server.hits.index("scheduled")
            loop = asyncio.get_running_loop()
            end = loop.time() + seconds
            while loop.time() < end:
                if wake_every is not None:
                    runner.wake()  # a storm of Scheduled events, e.g. for future runs
                await asyncio.sleep(wake_every or seconds)
        finally:
            runner.stop()
            await asyncio.wait_for(task, timeout=10)
    return server.hits[first + 1 :].count("scheduled"), server.hits[first + 1 :]


def test_an_idle_agent_sends_one_request_per_poll_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    polls, hits = run_virtual(count_polls(tmp_path, monkeypatch, interval=0.2, seconds=1.0))
    # At most one poll per shortest jittered interval; nothing else is asked while idle.
    assert 2 <= polls <= 1.0 / (0.2 * (1 - POLL_JITTER)) + 1, polls
    assert set(hits) == {"scheduled"}, sorted(set(hits))


def test_a_storm_of_wake_ups_costs_a_few_polls_not_one_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 100 wake-ups in 0.5 s with a 10 s interval: without coalescing, ~100 polls.
    polls, _ = run_virtual(
        count_polls(tmp_path, monkeypatch, interval=10.0, seconds=0.5, wake_every=0.005)
    )
    assert 1 <= polls <= 0.5 / MIN_WAKE_GAP + 2, polls


def test_a_single_wake_up_polls_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # One Scheduled event after a quiet spell: polled right away, not after the 10 s interval.
    polls, _ = run_virtual(
        count_polls(tmp_path, monkeypatch, interval=10.0, seconds=0.3, wake_every=0.25)
    )
    assert polls >= 1, polls
