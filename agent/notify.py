"""sd_notify (READY, STATUS, WATCHDOG, STOPPING, RELOADING) and the liveness check behind it.

The watchdog ping is a statement about the program, not the socket: `run_watchdog` withholds
WATCHDOG=1 when one of the registered loops (poll, cancellation, heartbeats) has stopped making
progress, and a blocked event loop stops the pings by itself. systemd then restarts the agent;
flow runs keep running in their own units.

The protocol (one datagram per message) is sent directly rather than through the `sdnotify`
package: that package reads `os.environ` instead of the environment it is given, and sends on a
blocking socket, so a full queue on the manager's side would stall the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

log = logging.getLogger("agent.notify")


def _socket_address(value: str) -> str | None:
    """NOTIFY_SOCKET as an AF_UNIX address: a path, or "@name" for the abstract namespace."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


class Notifier:
    """Sends sd_notify messages; every method is a no-op when $NOTIFY_SOCKET is unset."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        raw = environ.get("NOTIFY_SOCKET", "")
        self._address = _socket_address(raw) if raw else None
        if raw and self._address is None:
            log.warning("NOTIFY_SOCKET=%r is not a supported address; not notifying", raw)
        self._watchdog_interval = _watchdog_interval(environ)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None without a watchdog."""
        return self._watchdog_interval if self.enabled else None

    def ready(self) -> None:
        self.send("READY=1")

    def reloading(self) -> None:
        # systemd 252 has no Type=notify-reload, so no MONOTONIC_USEC; READY=1 ends the reload.
        self.send("RELOADING=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def status(self, text: str) -> None:
        self.send("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def send(self, message: str) -> None:
        """Send one message; failures are logged at debug level, never raised.

        Non-blocking: when the manager's queue is full the message is dropped rather than
        stalling the event loop (a stalled loop would then miss its own watchdog pings).
        """
        if self._address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode(), socket.MSG_DONTWAIT, self._address)
        except OSError as exc:
            log.debug("sd_notify %r failed: %s", message, exc)


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    pid = environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2 / 1_000_000 if usec > 0 else None


@dataclass
class _Loop:
    stale_after: float
    last_progress: float


class Liveness:
    """Which long-running loops are still making progress."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._loops: dict[str, _Loop] = {}

    def register(self, name: str, stale_after: float) -> None:
        """Start watching `name`; re-registering only updates `stale_after`."""
        loop = self._loops.get(name)
        if loop is None:
            self._loops[name] = _Loop(stale_after, self._clock())
        else:
            loop.stale_after = stale_after

    def progress(self, name: str) -> None:
        loop = self._loops.get(name)
        if loop is not None:
            loop.last_progress = self._clock()

    def unregister(self, name: str) -> None:
        self._loops.pop(name, None)

    def check(self, now: float | None = None) -> list[str]:
        """Names of the loops whose last progress is older than their `stale_after`."""
        at = self._clock() if now is None else now
        return sorted(n for n, lp in self._loops.items() if at - lp.last_progress > lp.stale_after)


async def run_watchdog(
    notifier: Notifier,
    liveness: Liveness,
    *,
    interval: float,
    on_tick: Callable[[], Awaitable[None]] | None = None,
    status: Callable[[], str] | None = None,
) -> None:
    """Every `interval`: ping the watchdog and run `on_tick`, unless a loop has stalled.

    `on_tick` gets at most what is left of the interval, so a slow API never delays the next
    ping. Runs until cancelled.
    """
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    while True:
        deadline = loop.time() + interval
        stalled = liveness.check()
        if stalled:
            names = ", ".join(stalled)
            notifier.status(f"stalled: {names} made no progress; watchdog ping withheld")
            if stalled != reported:
                log.error("no progress in %s; withholding the watchdog ping", names)
        else:
            if reported:
                log.info("all loops are making progress again")
            if notifier.watchdog_interval is not None:
                notifier.watchdog()
            if status is not None:
                try:
                    notifier.status(status())
                except Exception:
                    log.exception("building the status text failed")
            if on_tick is not None:
                await _bounded(on_tick, max(deadline - loop.time(), 0.0))
        reported = stalled
        await asyncio.sleep(max(deadline - loop.time(), 0.0))


async def _bounded(on_tick: Callable[[], Awaitable[None]], budget: float) -> None:
    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that arrives
    # as the tick finishes, and the watchdog loop would outlive its stop.
    try:
        async with asyncio.timeout(budget):
            await on_tick()
    except TimeoutError:
        log.warning("watchdog tick took longer than %.1fs; abandoned", budget)
    except Exception:
        log.exception("watchdog tick failed")
