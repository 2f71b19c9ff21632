"""sd_notify against a real AF_UNIX datagram socket, and the liveness-gated watchdog."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.notify import Liveness, Notifier, run_watchdog
from tests.unit.virtual_time import run_virtual, virtual_loop

# A blocked send or a lost cancellation must fail fast, not hang the suite.
pytestmark = pytest.mark.timeout(30)


class NotifySocket:
    """What systemd would see: a datagram socket that collects the messages sent to it."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)

    def drain(self) -> list[str]:
        """Everything queued on the socket, in order (the sends are done when this is called)."""
        messages = []
        while True:
            try:
                messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return messages


@pytest.fixture
def notify_dir() -> Iterator[Path]:
    # A short path: AF_UNIX addresses are limited to 108 bytes.
    with tempfile.TemporaryDirectory(prefix="notify-", dir="/tmp") as directory:
        yield Path(directory)


@pytest.fixture
def systemd(notify_dir: Path) -> Iterator[tuple[NotifySocket, dict[str, str]]]:
    path = str(notify_dir / "notify.sock")
    receiver = NotifySocket(path)
    try:
        yield receiver, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"}
    finally:
        receiver.sock.close()


def test_messages_reach_the_socket(systemd: tuple[NotifySocket, dict[str, str]]) -> None:
    receiver, environ = systemd
    notifier = Notifier(environ)
    notifier.ready()
    notifier.status("polling 2 deployments\nline two")
    notifier.watchdog()
    notifier.reloading()
    notifier.ready()
    notifier.stopping()
    assert receiver.drain() == [
        "READY=1",
        "STATUS=polling 2 deployments line two",
        "WATCHDOG=1",
        "RELOADING=1",
        "READY=1",
        "STOPPING=1",
    ]


def test_abstract_socket() -> None:
    name = f"runner-agent-test-{os.getpid()}-{time.monotonic_ns()}"
    receiver = NotifySocket("\0" + name)
    try:
        Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert receiver.drain() == ["READY=1"]
    finally:
        receiver.sock.close()


def test_no_socket_is_a_no_op() -> None:
    notifier = Notifier({"WATCHDOG_USEC": "100000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.ready()
    notifier.status("x")
    notifier.watchdog()


def test_send_failure_is_not_raised(notify_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.notify")
    notifier = Notifier({"NOTIFY_SOCKET": str(notify_dir / "missing.sock")})
    assert notifier.enabled
    notifier.ready()
    assert "READY=1" in caplog.text


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(extra: dict[str, str], expected: float | None) -> None:
    assert Notifier({"NOTIFY_SOCKET": "/run/x", **extra}).watchdog_interval == expected


def test_liveness() -> None:
    now = [100.0]
    liveness = Liveness(clock=lambda: now[0])
    liveness.register("poll", 10)
    liveness.register("cancellation", 30)
    assert liveness.check() == []
    now[0] = 111
    assert liveness.check() == ["poll"]
    assert liveness.check(now=105) == []
    liveness.progress("poll")
    assert liveness.check() == []
    # Re-registering changes the staleness but keeps the last progress.
    now[0] = 125
    liveness.register("poll", 10)
    assert liveness.check() == ["poll"]
    liveness.register("poll", 20)
    assert liveness.check() == []
    now[0] = 200
    assert liveness.check() == ["cancellation", "poll"]
    liveness.unregister("poll")
    liveness.unregister("never-registered")
    liveness.progress("never-registered")
    assert liveness.check() == ["cancellation"]
    # A new registration starts from now.
    liveness.register("poll", 1)
    assert liveness.check() == ["cancellation"]


# -- the watchdog, on a virtual clock ---------------------------------------------------------
# run_watchdog does all its work in the loop, so these run on tests/unit/virtual_time.py: the
# cadence is exact and a busy machine cannot stretch it. What reaches a real socket is tested
# above and below. The tests wake between ticks (0.31 s, not 0.30 s): at the same instant the
# order of two timers would be the test's subject, and a cancellation landing just as an
# on_tick finishes is swallowed by Python 3.11's asyncio.wait_for.

WATCHDOG_ENV = {"NOTIFY_SOCKET": "/nonexistent/notify.sock", "WATCHDOG_USEC": "100000"}
PING = "WATCHDOG=1"


class RecordingNotifier(Notifier):
    """What systemd would receive, stamped with the loop's clock when it was sent."""

    def __init__(self, environ: dict[str, str] = WATCHDOG_ENV) -> None:
        super().__init__(environ)
        self.sent: list[tuple[float, str]] = []
        self._read = 0

    def send(self, message: str) -> None:
        self.sent.append((asyncio.get_running_loop().time(), message))

    def drain(self) -> list[str]:
        """The messages sent since the last drain."""
        fresh, self._read = self.sent[self._read :], len(self.sent)
        return [message for _, message in fresh]

    def times(self, message: str) -> list[float]:
        return [at for at, sent in self.sent if sent == message]


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_watchdog_pings_at_the_interval() -> None:
    notifier = RecordingNotifier()
    assert notifier.watchdog_interval == 0.05
    ticks = 0

    async def on_tick() -> None:
        nonlocal ticks
        ticks += 1

    async def main() -> float:
        start = virtual_loop().time()
        task = asyncio.create_task(
            run_watchdog(
                notifier,
                Liveness(),
                interval=0.05,
                on_tick=on_tick,
                status=lambda: f"tick {ticks}",
            )
        )
        await asyncio.sleep(0.52)
        await _cancel(task)
        sent = len(notifier.sent)
        await asyncio.sleep(0.15)
        assert len(notifier.sent) == sent  # cancelled means stopped
        return start

    start = run_virtual(main())
    pings = [at - start for at in notifier.times(PING)]
    assert pings == pytest.approx([0.05 * n for n in range(11)])  # at once, then every 0.05 s
    # Each tick: ping, status, then the agent heartbeat (on_tick).
    assert ticks == len(pings)
    messages = [message for _, message in notifier.sent]
    assert messages == [m for n in range(ticks) for m in (PING, f"STATUS=tick {n}")]


def test_no_watchdog_configured_still_updates_status() -> None:
    notifier = RecordingNotifier({"NOTIFY_SOCKET": WATCHDOG_ENV["NOTIFY_SOCKET"]})
    assert notifier.watchdog_interval is None
    ticks = 0

    async def on_tick() -> None:
        nonlocal ticks
        ticks += 1

    async def main() -> None:
        task = asyncio.create_task(
            run_watchdog(notifier, Liveness(), interval=0.05, on_tick=on_tick, status=lambda: "ok")
        )
        await asyncio.sleep(0.12)
        await _cancel(task)

    run_virtual(main())
    assert notifier.drain() == ["STATUS=ok"] * 3  # at 0, 0.05 and 0.10 s
    assert ticks == 3  # the agent heartbeat still runs on every tick


def test_a_stalled_poll_loop_withholds_the_ping(caplog: pytest.LogCaptureFixture) -> None:
    notifier = RecordingNotifier()
    ticks = 0

    async def on_tick() -> None:
        nonlocal ticks
        ticks += 1

    async def poll_loop(liveness: Liveness, block: asyncio.Event) -> None:
        liveness.register("poll", 0.2)
        try:
            while True:
                await asyncio.sleep(0.02)  # one poll; a failed one (API outage) counts too
                liveness.progress("poll")
                if block.is_set():
                    await asyncio.Event().wait()  # wedged: awaits something that never comes
        finally:
            liveness.unregister("poll")

    async def heartbeats(liveness: Liveness) -> None:
        liveness.register("heartbeats", 60)
        while True:
            await asyncio.sleep(0.02)
            liveness.progress("heartbeats")

    async def main() -> None:
        liveness = Liveness(clock=virtual_loop().time)
        block = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            loops = [
                group.create_task(poll_loop(liveness, block)),
                group.create_task(heartbeats(liveness)),
            ]
            watchdog = group.create_task(
                run_watchdog(
                    notifier,
                    liveness,
                    interval=0.05,
                    on_tick=on_tick,
                    status=lambda: "1/4 runs; API ok",
                )
            )
            await asyncio.sleep(0.31)
            healthy = notifier.drain()
            assert healthy.count(PING) == 7  # at 0, 0.05, ... 0.30 s
            assert "STATUS=1/4 runs; API ok" in healthy

            block.set()  # the poll at 0.32 s is its last: stale from the tick at 0.55 s on
            await asyncio.sleep(0.25)
            notifier.drain()
            ticks_at_stall = ticks
            await asyncio.sleep(0.3)
            stalled = notifier.drain()
            assert stalled == ["STATUS=stalled: poll made no progress; watchdog ping withheld"] * 6
            assert ticks == ticks_at_stall  # no agent heartbeat while stalled either

            for task in [*loops, watchdog]:
                task.cancel()

    run_virtual(main())
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # logged once, not at every tick
    assert "poll" in errors[0].getMessage()
    assert "heartbeats" not in errors[0].getMessage()


def test_pings_resume_when_the_loop_progresses_again(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.notify")
    notifier = RecordingNotifier()
    now = [0.0]
    liveness = Liveness(clock=lambda: now[0])
    liveness.register("poll", 10)

    async def main() -> None:
        task = asyncio.create_task(
            run_watchdog(notifier, liveness, interval=0.05, on_tick=None, status=None)
        )
        await asyncio.sleep(0.08)
        assert notifier.drain() == [PING, PING]
        now[0] = 11.0
        await asyncio.sleep(0.24)
        assert PING not in notifier.drain()
        liveness.progress("poll")
        await asyncio.sleep(0.12)
        assert notifier.drain() == [PING, PING]  # the next two ticks
        await _cancel(task)

    run_virtual(main())
    assert "all loops are making progress again" in caplog.text


def test_a_blocked_event_loop_stops_the_pings() -> None:
    notifier = RecordingNotifier()

    async def main() -> tuple[float, float]:
        loop = virtual_loop()
        task = asyncio.create_task(
            run_watchdog(notifier, Liveness(), interval=0.05, on_tick=None, status=None)
        )
        await asyncio.sleep(0.12)
        assert notifier.drain() == [PING] * 3
        blocked_at = loop.time()
        loop.advance(0.4)  # a blocking call: 0.4 s pass and nothing else in the loop runs
        unblocked_at = loop.time()
        await asyncio.sleep(0.12)
        await _cancel(task)
        return blocked_at, unblocked_at

    blocked_at, unblocked_at = run_virtual(main())
    pings = notifier.times(PING)
    assert not [at for at in pings if blocked_at < at < unblocked_at]  # silence while blocked
    # One overdue ping at once, then the normal cadence: never a burst to catch up.
    after = [at - unblocked_at for at in pings if at >= unblocked_at]
    assert after == pytest.approx([0.0, 0.05, 0.10])


def test_a_slow_or_failing_tick_never_delays_the_ping(caplog: pytest.LogCaptureFixture) -> None:
    notifier = RecordingNotifier()
    calls = 0

    async def on_tick() -> None:
        nonlocal calls
        calls += 1
        if calls % 2:
            await asyncio.sleep(10)  # a hung API call
        raise RuntimeError("api down")

    async def main() -> float:
        start = virtual_loop().time()
        task = asyncio.create_task(
            run_watchdog(notifier, Liveness(), interval=0.05, on_tick=on_tick, status=None)
        )
        await asyncio.sleep(0.52)
        await _cancel(task)
        return start

    start = run_virtual(main())
    pings = [at - start for at in notifier.times(PING)]
    assert pings == pytest.approx([0.05 * n for n in range(11)])
    assert "abandoned" in caplog.text
    assert "watchdog tick failed" in caplog.text
    assert "api down" in caplog.text


def test_cancelled_mid_tick_exits_cleanly() -> None:
    notifier = RecordingNotifier()
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def on_tick() -> None:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def main() -> None:
        task = asyncio.create_task(
            run_watchdog(notifier, Liveness(), interval=5, on_tick=on_tick, status=None)
        )
        await started.wait()
        await _cancel(task)

    run_virtual(main())
    assert cancelled.is_set()  # the heartbeat in flight was cancelled, not left behind
    assert notifier.drain() == [PING]


def test_a_failing_status_callback_does_not_stop_the_ping(
    caplog: pytest.LogCaptureFixture,
) -> None:
    notifier = RecordingNotifier()

    def status() -> str:
        raise KeyError("runs")

    async def main() -> None:
        task = asyncio.create_task(
            run_watchdog(notifier, Liveness(), interval=0.05, on_tick=None, status=status)
        )
        await asyncio.sleep(0.12)
        await _cancel(task)

    run_virtual(main())
    assert notifier.drain() == [PING] * 3
    assert "building the status text failed" in caplog.text


def test_a_full_queue_never_blocks_the_sender(
    systemd: tuple[NotifySocket, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.notify")
    receiver, environ = systemd
    notifier = Notifier(environ)
    for _ in range(50):  # nobody reads: the queue (max_dgram_qlen) fills up
        notifier.watchdog()
    # The sends that found the queue full failed at once; a blocking send would have hung here
    # (the module's timeout) instead of failing.
    assert "failed" in caplog.text
    assert 1 <= len(receiver.drain()) < 50
