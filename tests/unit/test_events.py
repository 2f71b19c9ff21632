"""Event builders (exact Prefect shapes) and the bounded, batching EventEmitter."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.typing import Subprotocol

from agent import emitter as emitter_module
from agent import events
from agent.emitter import EventEmitter
from agent.notify import Liveness
from agent.runner import Runner
from agent.settings import load_settings
from agent.storage import Storage
from tests.unit.virtual_time import run_virtual, virtual_loop

RUN = UUID("11111111-1111-1111-1111-111111111111")
FLOW = UUID("22222222-2222-2222-2222-222222222222")
DEPLOYMENT = UUID("33333333-3333-3333-3333-333333333333")
EVENT_ID = UUID("44444444-4444-4444-4444-444444444444")
WHEN = datetime(2026, 11, 23, 21, 0, 0, 123456, tzinfo=UTC)


class RefusedEndpoint(Exception):
    """Stands in for agent.api.ApiError: a 4xx answer carrying its status."""

    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code


class Unavailable(Exception):
    """Stands in for agent.api.ApiUnavailable."""


def fixed(event: dict[str, Any]) -> dict[str, Any]:
    """Replace the generated id so whole events compare exactly."""
    UUID(event["id"])  # it is a UUID
    return {**event, "id": str(EVENT_ID)}


def ev(n: int) -> dict[str, Any]:
    return {"n": n}


# -- builders ----------------------------------------------------------------------------


def test_flow_run_heartbeat_matches_prefects_engine() -> None:
    event = events.flow_run_heartbeat(
        flow_run_id=RUN,
        flow_run_name="witty-fox",
        flow_id=FLOW,
        flow_name="etl",
        deployment_id=DEPLOYMENT,
        tags=["b", "a", "b"],
        occurred=WHEN,
    )
    assert fixed(event) == {
        "id": str(EVENT_ID),
        "occurred": "2026-11-23T21:00:00.123456+00:00",
        "event": "prefect.flow-run.heartbeat",
        "resource": {
            "prefect.resource.id": f"prefect.flow-run.{RUN}",
            "prefect.resource.name": "witty-fox",
        },
        "related": [
            {
                "prefect.resource.id": f"prefect.flow.{FLOW}",
                "prefect.resource.role": "flow",
                "prefect.resource.name": "etl",
            },
            {
                "prefect.resource.id": f"prefect.deployment.{DEPLOYMENT}",
                "prefect.resource.role": "deployment",
            },
            {"prefect.resource.id": "prefect.tag.a", "prefect.resource.role": "tag"},
            {"prefect.resource.id": "prefect.tag.b", "prefect.resource.role": "tag"},
        ],
        "payload": {},
    }


def test_flow_run_heartbeat_without_deployment() -> None:
    event = events.flow_run_heartbeat(
        flow_run_id=str(RUN),
        flow_run_name=None,
        flow_id=None,
        flow_name=None,
        deployment_id=None,
    )
    assert event["resource"] == {
        "prefect.resource.id": f"prefect.flow-run.{RUN}",
        "prefect.resource.name": "",
    }
    assert event["related"] == []
    assert datetime.fromisoformat(event["occurred"]).tzinfo is not None
    assert (
        event["id"]
        != events.flow_run_heartbeat(
            flow_run_id=RUN, flow_run_name=None, flow_id=None, flow_name=None, deployment_id=None
        )["id"]
    )


def test_agent_heartbeat() -> None:
    event = events.agent_heartbeat(
        agent_name="Build Box #1",
        host="build-1",
        version="0.1.0",
        limit=4,
        running=2,
        launcher="systemd",
        occurred=WHEN,
    )
    assert fixed(event) == {
        "id": str(EVENT_ID),
        "occurred": "2026-11-23T21:00:00.123456+00:00",
        "event": "runner-agent.heartbeat",
        "resource": {
            "prefect.resource.id": "prefect.runner.build-box-1",
            "prefect.resource.name": "Build Box #1",
        },
        "related": [],
        "payload": {
            "host": "build-1",
            "version": "0.1.0",
            "limit": 4,
            "running": 2,
            "launcher": "systemd",
        },
    }


def test_cancelled_flow_run_matches_prefects_runner() -> None:
    event = events.cancelled_flow_run(
        agent_name="agent-a",
        flow_run_id=RUN,
        flow_run_name="witty-fox",
        flow_id=FLOW,
        flow_name="etl",
        deployment_id=DEPLOYMENT,
        deployment_name="nightly",
        tags=["run-tag", "shared"],
        deployment_tags=["shared", "dep-tag"],
        occurred=WHEN,
    )
    assert fixed(event) == {
        "id": str(EVENT_ID),
        "occurred": "2026-11-23T21:00:00.123456+00:00",
        "event": "prefect.runner.cancelled-flow-run",
        "resource": {
            "prefect.resource.id": "prefect.runner.agent-a",
            "prefect.resource.name": "agent-a",
        },
        "related": [
            {
                "prefect.resource.id": f"prefect.deployment.{DEPLOYMENT}",
                "prefect.resource.role": "deployment",
                "prefect.resource.name": "nightly",
            },
            {
                "prefect.resource.id": f"prefect.flow.{FLOW}",
                "prefect.resource.role": "flow",
                "prefect.resource.name": "etl",
            },
            {
                "prefect.resource.id": f"prefect.flow-run.{RUN}",
                "prefect.resource.role": "flow-run",
                "prefect.resource.name": "witty-fox",
            },
            {"prefect.resource.id": "prefect.tag.dep-tag", "prefect.resource.role": "tag"},
            {"prefect.resource.id": "prefect.tag.run-tag", "prefect.resource.role": "tag"},
            {"prefect.resource.id": "prefect.tag.shared", "prefect.resource.role": "tag"},
        ],
        "payload": {},
    }


def test_slugify() -> None:
    assert events.slugify("agent-a") == "agent-a"
    assert events.slugify("  Héllo, World!_2 ") == "hello-world-2"


# -- emitter: buffering and retries ------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.failures: list[BaseException] = []

    async def __call__(self, batch: list[dict[str, Any]]) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.batches.append(list(batch))

    @property
    def sent(self) -> list[dict[str, Any]]:
        return [e for b in self.batches for e in b]


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not check():
            await asyncio.sleep(0.01)


async def test_buffer_is_bounded_drops_oldest_and_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    send = Recorder()
    emitter = EventEmitter(send, max_buffered=3)
    for n in range(5):
        emitter.emit(ev(n))
    assert emitter.stats() == {"sent": 0, "dropped": 2, "rejected": 0, "pending": 3}
    with caplog.at_level(logging.WARNING, logger="agent.emitter"):
        await emitter.flush()
        await emitter.aclose()
    assert send.sent == [ev(2), ev(3), ev(4)]
    assert emitter.stats() == {"sent": 3, "dropped": 2, "rejected": 0, "pending": 0}
    assert "dropped 2 events while the API was unreachable" in caplog.text


async def test_failed_batch_goes_back_to_the_front_in_order() -> None:
    send = Recorder()
    send.failures.append(Unavailable("down"))
    emitter = EventEmitter(send, batch_size=2)
    for n in range(3):
        emitter.emit(ev(n))
    with pytest.raises(Unavailable):
        await emitter.flush()
    assert emitter.stats() == {"sent": 0, "dropped": 0, "rejected": 0, "pending": 3}
    emitter.emit(ev(3))
    await emitter.flush()
    assert send.batches == [[ev(0), ev(1)], [ev(2), ev(3)]]


async def test_requeue_stays_bounded() -> None:
    send = Recorder()
    emitter = EventEmitter(send, max_buffered=3, batch_size=2)
    for n in range(3):
        emitter.emit(ev(n))

    async def failing(batch: list[dict[str, Any]]) -> None:
        # Events arrive while the batch is in flight, then the send fails.
        emitter.emit(ev(10))
        emitter.emit(ev(11))
        raise Unavailable("down")

    emitter._send = failing
    with pytest.raises(Unavailable):
        await emitter.flush()
    # Buffer held [2, 10, 11]; [0, 1] went back in front, and the two oldest were dropped.
    assert list(emitter._buffer) == [ev(2), ev(10), ev(11)]
    assert emitter.dropped == 2


async def test_background_sender_batches_and_retries_with_backoff() -> None:
    send = Recorder()
    send.failures += [Unavailable("down"), Unavailable("still down")]
    async with EventEmitter(send, batch_size=3, flush_interval=0.05, max_backoff=0.2) as em:
        for n in range(7):
            em.emit(ev(n))
        await eventually(lambda: em.stats()["sent"] == 7)
        assert em.stats() == {"sent": 7, "dropped": 0, "rejected": 0, "pending": 0}
    assert send.failures == []
    assert send.sent == [ev(n) for n in range(7)]
    assert all(len(b) <= 3 for b in send.batches)


def test_full_batch_is_sent_before_the_interval() -> None:
    send = Recorder()

    async def main() -> None:  # on a virtual clock (tests/unit/virtual_time.py)
        async with EventEmitter(send, batch_size=5, flush_interval=30) as em:
            await asyncio.sleep(0.05)  # let the sender start waiting
            for n in range(5):
                em.emit(ev(n))
            await eventually(lambda: len(send.batches) == 1, within=2)

    run_virtual(main())
    assert send.batches == [[ev(n) for n in range(5)]]


async def test_exit_flushes_what_is_pending() -> None:
    send = Recorder()
    before = asyncio.all_tasks()
    async with EventEmitter(send, flush_interval=30) as em:
        em.emit(ev(1))
    assert send.sent == [ev(1)]
    assert asyncio.all_tasks() == before


def test_exit_is_bounded_when_the_api_hangs(caplog: pytest.LogCaptureFixture) -> None:
    async def hang(batch: list[dict[str, Any]]) -> None:
        await asyncio.sleep(3600)

    async def main() -> tuple[EventEmitter, float]:  # on a virtual clock
        before = asyncio.all_tasks()
        loop = virtual_loop()
        start = loop.time()
        async with EventEmitter(hang, flush_interval=0.01, shutdown_timeout=0.2) as em:
            em.emit(ev(1))
            await asyncio.sleep(0.05)  # the sender is now stuck in hang()
        assert asyncio.all_tasks() == before
        return em, loop.time() - start

    with caplog.at_level(logging.WARNING, logger="agent.emitter"):
        em, took = run_virtual(main())
    assert took == pytest.approx(0.05 + 0.2)  # the shutdown_timeout, not the hour
    assert em.stats() == {"sent": 0, "dropped": 0, "rejected": 0, "pending": 1}
    assert "1 events were not delivered at shutdown" in caplog.text


def test_emit_never_blocks_without_a_loop() -> None:
    emitter = EventEmitter(Recorder(), max_buffered=2)
    for n in range(1000):
        emitter.emit(ev(n))
    assert emitter.stats() == {"sent": 0, "dropped": 998, "rejected": 0, "pending": 2}


# -- emitter: websocket fallback ---------------------------------------------------------


async def test_falls_back_to_events_in_websocket_on_404() -> None:
    received: list[dict[str, Any]] = []
    auths: list[dict[str, Any]] = []
    paths: list[str] = []

    async def events_in(ws: ServerConnection) -> None:
        assert ws.request is not None
        paths.append(ws.request.path)
        auths.append(json.loads(await ws.recv()))
        await ws.send(json.dumps({"type": "auth_success"}))
        async for message in ws:
            received.append(json.loads(message))

    send = Recorder()
    send.failures.append(RefusedEndpoint(404))
    async with serve(events_in, "127.0.0.1", 0, subprotocols=[Subprotocol("prefect")]) as srv:
        port = next(iter(srv.sockets)).getsockname()[1]
        api_url = f"http://127.0.0.1:{port}/api"
        async with EventEmitter(send, api_url=api_url, token="tok", flush_interval=0.05) as em:
            for n in range(3):
                em.emit(ev(n))
            await eventually(lambda: em.stats()["sent"] == 3)
            assert em.use_websocket
            em.emit(ev(3))
            await eventually(lambda: len(received) == 4)
    assert received == [ev(n) for n in range(4)]
    assert send.batches == []
    assert paths == ["/api/events/in"]  # one connection, reused
    assert auths == [{"type": "auth", "token": "tok"}]


async def test_rejected_batch_is_dropped_and_other_errors_do_not_switch_transport() -> None:
    send = Recorder()
    send.failures += [RefusedEndpoint(422), Unavailable("down"), RefusedEndpoint(403)]
    async with EventEmitter(
        send, api_url="http://127.0.0.1:9/api", flush_interval=0.02, max_backoff=0.05
    ) as em:
        em.emit(ev(1))
        await eventually(lambda: em.stats()["rejected"] == 1)
        em.emit(ev(2))
        await eventually(lambda: em.stats()["sent"] == 1)
        assert not em.use_websocket
    assert send.sent == [ev(2)]
    assert em.stats() == {"sent": 1, "dropped": 0, "rejected": 1, "pending": 0}


# -- the STATUS line: what an outage has queued ------------------------------------------


def test_backlog_text_names_what_is_queued_and_what_was_dropped() -> None:
    emitter = EventEmitter(Recorder(), max_buffered=3)
    logs = EventEmitter(Recorder(), max_buffered=100, kind="flow-run log messages")
    assert emitter_module.backlog_text(emitter, logs) == ""
    assert emitter_module.with_backlog("1/4 runs; API ok", emitter, logs) == "1/4 runs; API ok"
    for n in range(5):
        emitter.emit(ev(n))
    logs.emit(ev(0))
    assert emitter_module.backlog_text(emitter, logs) == (
        "3/3 events queued, 1/100 flow-run log messages queued, 2 events dropped"
    )
    assert emitter_module.with_backlog("0/4 runs; API unreachable for 42s", emitter) == (
        "0/4 runs; API unreachable for 42s; 3/3 events queued, 2 events dropped"
    )


async def test_backlog_clears_once_delivered_but_drops_stay_visible() -> None:
    send = Recorder()
    send.failures.append(Unavailable("down"))
    emitter = EventEmitter(send, max_buffered=2)
    for n in range(3):
        emitter.emit(ev(n))
    with pytest.raises(Unavailable):
        await emitter.flush()
    assert emitter_module.backlog_text(emitter) == "2/2 events queued, 1 events dropped"
    await emitter.flush()
    assert emitter_module.backlog_text(emitter) == "1 events dropped"


async def test_shutdown_logs_the_delivery_counters(caplog: pytest.LogCaptureFixture) -> None:
    send = Recorder()
    send.failures.append(RefusedEndpoint(422))
    emitter = EventEmitter(send, max_buffered=2, kind="flow-run log messages")
    emitter.emit(ev(0))
    await emitter.flush()  # rejected
    for n in range(3):
        emitter.emit(ev(n))
    with caplog.at_level(logging.INFO, logger="agent.emitter"):
        await emitter.aclose()
    assert (
        "flow-run log messages: 2 sent, 1 dropped, 1 rejected, 0 not delivered" in caplog.messages
    )


def test_runner_status_says_how_long_the_api_has_been_unreachable(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\nlimit = 4\nstate_dir = "{tmp_path / "state"}"\nruntime_dir = "{tmp_path}"\n'
    )
    config.chmod(0o600)
    settings = load_settings(config, {})
    now = [1000.0]
    runner = Runner(
        settings,
        client=None,  # type: ignore[arg-type]
        launcher=None,  # type: ignore[arg-type]
        flow_logs=None,  # type: ignore[arg-type]
        liveness=Liveness(),
        registry=None,  # type: ignore[arg-type]
        storage=Storage(settings.agent.state_dir),
        monotonic=lambda: now[0],
    )
    assert runner.status_text() == "0/4 runs; no poll yet; API not checked yet"
    now[0] += 5
    runner.api_ok = False  # never reached since the start
    assert runner.status_text().endswith("; API unreachable for 5s")
    now[0] += 1
    runner.api_ok = True
    runner.last_poll = now[0]
    assert runner.status_text() == "0/4 runs; last poll 0s ago; API ok"
    now[0] += 10
    runner.last_poll = now[0]
    runner.api_ok = False
    now[0] += 32  # the last success was 42 s ago, whatever the failed polls since
    runner.last_poll = now[0] - 2
    runner.api_ok = False
    assert runner.status_text() == "0/4 runs; last poll 2s ago; API unreachable for 42s"


def test_retry_now_ends_the_backoff_once_the_api_is_back() -> None:
    sent: list[list[dict[str, Any]]] = []
    attempts = 0
    failing = True

    async def send(batch: list[dict[str, Any]]) -> None:
        nonlocal attempts
        attempts += 1
        if failing:
            raise OSError("connection refused")
        sent.append(batch)

    async def main() -> float:  # on a virtual clock: the backoff is exact
        nonlocal failing
        loop = virtual_loop()
        emitter = EventEmitter(send, flush_interval=0.5, max_backoff=60.0)
        async with emitter:
            emitter.emit({"event": "a"})
            while attempts < 3:  # backoffs 0.5 s, 1 s; now waiting 2 s
                await asyncio.sleep(0.01)
            failing = False
            back = loop.time()
            emitter.retry_now()
            while not sent:
                await asyncio.sleep(0.01)
            return loop.time() - back

    took = run_virtual(main())
    assert sent and sent[0][0]["event"] == "a"
    assert took < 0.5, f"delivered {took:.2f}s after retry_now, i.e. after the backoff"


async def test_an_idle_emitter_runs_no_timer() -> None:
    sent: list[list[dict[str, Any]]] = []

    async def send(batch: list[dict[str, Any]]) -> None:
        sent.append(batch)

    emitter = EventEmitter(send, flush_interval=0.01)
    cycles = 0
    report_drops = emitter._report_drops

    def counting(*args: Any, **kwargs: Any) -> None:
        nonlocal cycles
        cycles += 1
        report_drops(*args, **kwargs)

    emitter._report_drops = counting  # type: ignore[method-assign]
    async with emitter:
        await asyncio.sleep(0.3)  # 30 flush intervals with nothing to send
        idle_cycles = cycles
        emitter.emit({"event": "first"})
        for _ in range(100):
            if sent:
                break
            await asyncio.sleep(0.01)
    assert idle_cycles == 0, f"the idle emitter woke {idle_cycles} times"
    assert sent == [[{"event": "first"}]]
