"""sd_notify against a real AF_UNIX datagram socket, and the liveness-gated watchdog."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.notify import Liveness, Notifier, run_watchdog

# A blocked send or a lost cancellation must fail fast, not hang the suite.
pytestmark = pytest.mark.timeout(30)


class NotifySocket:
    """What systemd would see: a datagram socket that collects the messages sent to it.

    Like systemd it must keep reading while the agent sends (`watching()`), because a datagram
    socket queues only net.unix.max_dgram_qlen messages. It reads in a thread, so the receive
    times stay true while the event loop under test is blocked.
    """

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.01)
        self._received: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def _read(self) -> None:
        while True:
            try:
                message = self.sock.recv(4096).decode()
            except TimeoutError:
                return
            with self._lock:
                self._received.append((time.monotonic(), message))

    def drain_timed(self) -> list[tuple[float, str]]:
        """Everything received since the last drain, in order, with the time it arrived."""
        self._read()
        with self._lock:
            messages, self._received = self._received, []
        return messages

    def drain(self) -> list[str]:
        return [message for _, message in self.drain_timed()]

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        stop = threading.Event()

        def reader() -> None:
            while not stop.is_set():
                self._read()

        thread = threading.Thread(target=reader, name="notify-socket", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


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


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_watchdog_pings_at_the_interval(
    systemd: tuple[NotifySocket, dict[str, str]],
) -> None:
    receiver, environ = systemd
    notifier = Notifier(environ)
    assert notifier.watchdog_interval == 0.05
    ticks = 0

    async def on_tick() -> None:
        nonlocal ticks
        ticks += 1

    with receiver.watching():
        task = asyncio.create_task(run_watchdog(
            notifier, Liveness(), interval=0.05, on_tick=on_tick, status=lambda: f"tick {ticks}",
        ))
        await asyncio.sleep(0.52)
        await _cancel(task)
        timed = receiver.drain_timed()
        await asyncio.sleep(0.15)
        assert receiver.drain() == []  # cancelled means stopped
    messages = [message for _, message in timed]
    pings = [at for at, message in timed if message == "WATCHDOG=1"]
    assert 8 <= len(pings) <= 12
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert 0.04 <= sum(gaps) / len(gaps) <= 0.07
    assert min(gaps) >= 0.03  # never a burst of pings
    # Each tick: ping, status, then the agent heartbeat (on_tick).
    assert ticks == len(pings)
    assert messages[:4] == ["WATCHDOG=1", "STATUS=tick 0", "WATCHDOG=1", "STATUS=tick 1"]
    assert messages[-1] == f"STATUS=tick {ticks - 1}"


async def test_no_watchdog_configured_still_updates_status(notify_dir: Path) -> None:
    receiver = NotifySocket(str(notify_dir / "n.sock"))
    ticks = 0

    async def on_tick() -> None:
        nonlocal ticks
        ticks += 1

    try:
        notifier = Notifier({"NOTIFY_SOCKET": str(notify_dir / "n.sock")})
        with receiver.watching():
            task = asyncio.create_task(
                run_watchdog(notifier, Liveness(), interval=0.05, on_tick=on_tick,
                             status=lambda: "ok")
            )
            await asyncio.sleep(0.12)
            await _cancel(task)
        messages = receiver.drain()
        assert len(messages) >= 2
        assert set(messages) == {"STATUS=ok"}
        assert ticks == len(messages)  # the agent heartbeat still runs on every tick
    finally:
        receiver.sock.close()


async def test_a_stalled_poll_loop_withholds_the_ping(
    systemd: tuple[NotifySocket, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    receiver, environ = systemd
    liveness = Liveness()
    ticks = 0

    async def on_tick() -> None:
        nonlocal ticks
        ticks += 1

    async def poll_loop(block: asyncio.Event) -> None:
        liveness.register("poll", 0.2)
        try:
            while True:
                await asyncio.sleep(0.02)  # one poll; a failed one (API outage) counts too
                liveness.progress("poll")
                if block.is_set():
                    await asyncio.Event().wait()  # wedged: awaits something that never comes
        finally:
            liveness.unregister("poll")

    async def heartbeats() -> None:
        liveness.register("heartbeats", 60)
        while True:
            await asyncio.sleep(0.02)
            liveness.progress("heartbeats")

    block = asyncio.Event()
    with receiver.watching():
        async with asyncio.TaskGroup() as group:
            loops = [group.create_task(poll_loop(block)), group.create_task(heartbeats())]
            watchdog = group.create_task(run_watchdog(
                Notifier(environ), liveness, interval=0.05, on_tick=on_tick,
                status=lambda: "1/4 runs; API ok",
            ))
            await asyncio.sleep(0.3)
            healthy = receiver.drain()
            assert healthy.count("WATCHDOG=1") >= 4
            assert "STATUS=1/4 runs; API ok" in healthy

            block.set()
            await asyncio.sleep(0.25)  # poll goes stale after 0.2 s
            receiver.drain()
            ticks_at_stall = ticks
            await asyncio.sleep(0.3)
            stalled = receiver.drain()
            assert "WATCHDOG=1" not in stalled
            assert len(stalled) >= 4
            assert set(stalled) == {
                "STATUS=stalled: poll made no progress; watchdog ping withheld"
            }
            assert ticks == ticks_at_stall  # no agent heartbeat while stalled either

            for task in [*loops, watchdog]:
                task.cancel()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # logged once, not at every tick
    assert "poll" in errors[0].getMessage()
    assert "heartbeats" not in errors[0].getMessage()


async def test_pings_resume_when_the_loop_progresses_again(
    systemd: tuple[NotifySocket, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.notify")
    receiver, environ = systemd
    now = [0.0]
    liveness = Liveness(clock=lambda: now[0])
    liveness.register("poll", 10)
    with receiver.watching():
        task = asyncio.create_task(
            run_watchdog(Notifier(environ), liveness, interval=0.05, on_tick=None, status=None)
        )
        await asyncio.sleep(0.08)
        now[0] = 11.0
        await asyncio.sleep(0.12)
        receiver.drain()
        await asyncio.sleep(0.12)
        assert "WATCHDOG=1" not in receiver.drain()
        liveness.progress("poll")
        await asyncio.sleep(0.12)
        assert receiver.drain().count("WATCHDOG=1") >= 2
        await _cancel(task)
    assert "all loops are making progress again" in caplog.text


async def test_a_blocked_event_loop_stops_the_pings(
    systemd: tuple[NotifySocket, dict[str, str]],
) -> None:
    receiver, environ = systemd

    async def blocking() -> None:
        time.sleep(0.4)  # noqa: ASYNC251 - the point of the test

    with receiver.watching():
        task = asyncio.create_task(
            run_watchdog(Notifier(environ), Liveness(), interval=0.05, on_tick=None, status=None)
        )
        await asyncio.sleep(0.12)
        assert receiver.drain().count("WATCHDOG=1") >= 2
        blocked_at = time.monotonic()
        await blocking()
        unblocked_at = time.monotonic()
        await asyncio.sleep(0.12)
        timed = receiver.drain_timed()
        await _cancel(task)
    assert unblocked_at - blocked_at >= 0.4
    pings = [at for at, message in timed if message == "WATCHDOG=1"]
    assert not [at for at in pings if at < unblocked_at]  # silence for the whole block
    assert 2 <= len(pings) <= 5  # and back at the normal cadence afterwards


async def test_a_slow_or_failing_tick_never_delays_the_ping(
    systemd: tuple[NotifySocket, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    receiver, environ = systemd
    calls = 0

    async def on_tick() -> None:
        nonlocal calls
        calls += 1
        if calls % 2:
            await asyncio.sleep(10)  # a hung API call
        raise RuntimeError("api down")

    with receiver.watching():
        task = asyncio.create_task(
            run_watchdog(Notifier(environ), Liveness(), interval=0.05, on_tick=on_tick,
                         status=None)
        )
        await asyncio.sleep(0.52)
        await _cancel(task)
    assert 8 <= receiver.drain().count("WATCHDOG=1") <= 12
    assert "abandoned" in caplog.text
    assert "watchdog tick failed" in caplog.text
    assert "api down" in caplog.text


async def test_cancelled_mid_tick_exits_cleanly(
    systemd: tuple[NotifySocket, dict[str, str]],
) -> None:
    receiver, environ = systemd
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def on_tick() -> None:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with receiver.watching():
        task = asyncio.create_task(
            run_watchdog(Notifier(environ), Liveness(), interval=5, on_tick=on_tick, status=None)
        )
        await asyncio.wait_for(started.wait(), 1)
        await _cancel(task)
    assert cancelled.is_set()  # the heartbeat in flight was cancelled, not left behind
    assert receiver.drain() == ["WATCHDOG=1"]


async def test_a_failing_status_callback_does_not_stop_the_ping(
    systemd: tuple[NotifySocket, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    receiver, environ = systemd

    def status() -> str:
        raise KeyError("runs")

    with receiver.watching():
        task = asyncio.create_task(
            run_watchdog(Notifier(environ), Liveness(), interval=0.05, on_tick=None,
                         status=status)
        )
        await asyncio.sleep(0.12)
        await _cancel(task)
    assert set(receiver.drain()) == {"WATCHDOG=1"}
    assert "building the status text failed" in caplog.text


def test_a_full_queue_never_blocks_the_sender(
    systemd: tuple[NotifySocket, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.notify")
    receiver, environ = systemd
    notifier = Notifier(environ)
    started = time.monotonic()
    for _ in range(50):  # nobody reads: the queue (max_dgram_qlen) fills up
        notifier.watchdog()
    assert time.monotonic() - started < 1
    assert "failed" in caplog.text
    assert 1 <= len(receiver.drain()) < 50
