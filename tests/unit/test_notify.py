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


class NotifySocket:
    """What systemd would see: a datagram socket that collects the messages sent to it."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)

    def drain(self) -> list[str]:
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

    task = asyncio.create_task(run_watchdog(
        notifier, Liveness(), interval=0.05, on_tick=on_tick, status=lambda: f"tick {ticks}",
    ))
    await asyncio.sleep(0.52)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    messages = receiver.drain()
    pings = messages.count("WATCHDOG=1")
    assert 8 <= pings <= 12
    assert ticks == pings
    assert messages[:2] == ["WATCHDOG=1", "STATUS=tick 0"]
    assert f"STATUS=tick {ticks - 1}" in messages
    await asyncio.sleep(0.1)
    assert receiver.drain() == []  # cancelled means stopped


async def test_no_watchdog_configured_still_updates_status(notify_dir: Path) -> None:
    receiver = NotifySocket(str(notify_dir / "n.sock"))
    try:
        notifier = Notifier({"NOTIFY_SOCKET": str(notify_dir / "n.sock")})
        task = asyncio.create_task(
            run_watchdog(notifier, Liveness(), interval=0.05, on_tick=None, status=lambda: "ok")
        )
        await asyncio.sleep(0.12)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        messages = receiver.drain()
        assert messages and set(messages) == {"STATUS=ok"}
    finally:
        receiver.sock.close()


async def test_a_stalled_loop_withholds_the_ping(
    systemd: tuple[NotifySocket, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    receiver, environ = systemd
    liveness = Liveness()
    liveness.register("poll", 0.2)  # and never progresses
    liveness.register("heartbeats", 60)
    ticks = 0

    async def on_tick() -> None:
        nonlocal ticks
        ticks += 1

    task = asyncio.create_task(run_watchdog(
        Notifier(environ), liveness, interval=0.05, on_tick=on_tick, status=lambda: "fine",
    ))
    await asyncio.sleep(0.12)
    before = receiver.drain()
    assert before.count("WATCHDOG=1") >= 2
    await asyncio.sleep(0.2)  # poll goes stale
    receiver.drain()
    ticks_at_stall = ticks
    await asyncio.sleep(0.3)
    stalled = receiver.drain()
    assert "WATCHDOG=1" not in stalled
    assert ticks == ticks_at_stall  # no agent heartbeat while stalled either
    assert len(stalled) >= 4
    assert all(m.startswith("STATUS=stalled: poll ") for m in stalled)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # logged once, not at every tick
    assert "poll" in errors[0].getMessage()
    assert "heartbeats" not in errors[0].getMessage()

    liveness.progress("poll")
    await asyncio.sleep(0.12)
    assert "WATCHDOG=1" in receiver.drain()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_blocked_event_loop_stops_the_pings(
    systemd: tuple[NotifySocket, dict[str, str]],
) -> None:
    receiver, environ = systemd
    task = asyncio.create_task(
        run_watchdog(Notifier(environ), Liveness(), interval=0.05, on_tick=None, status=None)
    )

    async def blocking() -> None:
        time.sleep(0.4)  # noqa: ASYNC251 - the point of the test

    await asyncio.sleep(0.12)
    assert receiver.drain().count("WATCHDOG=1") >= 2
    await blocking()
    assert receiver.drain() == []
    await asyncio.sleep(0.12)
    assert receiver.drain().count("WATCHDOG=1") >= 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


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

    task = asyncio.create_task(
        run_watchdog(Notifier(environ), Liveness(), interval=0.05, on_tick=on_tick, status=None)
    )
    await asyncio.sleep(0.52)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert 8 <= receiver.drain().count("WATCHDOG=1") <= 12
    assert "abandoned" in caplog.text
    assert "watchdog tick failed" in caplog.text
    assert "api down" in caplog.text
