"""The bounded, batching sender behind events and flow-run log messages.

`EventEmitter.emit()` never blocks and never raises: items wait in a bounded buffer (oldest
dropped first, and counted) and a background task posts them in batches, retrying with backoff
(agent.backoff) through API outages. If the server refuses `POST /api/events` (404/405), it
switches to the `/api/events/in` websocket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from agent.backoff import Backoff
from agent.subscription import open_prefect_socket, websocket_url

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

log = logging.getLogger("agent.emitter")

Event = dict[str, Any]
SendEvents = Callable[[list[Event]], Awaitable[None]]


class Backlog(Protocol):
    """What `backlog_text` reads: an EventEmitter, or FlowRunLogs which wraps one."""

    @property
    def kind(self) -> str: ...
    @property
    def pending(self) -> int: ...
    @property
    def dropped(self) -> int: ...
    @property
    def max_buffered(self) -> int: ...


def backlog_text(*buffers: Backlog) -> str:
    """`52/5000 events queued, 3 flow-run log messages dropped`, or "" when all is delivered.

    For the STATUS line: an operator sees how close an outage is to costing data.
    """
    parts = [f"{b.pending}/{b.max_buffered} {b.kind} queued" for b in buffers if b.pending]
    parts += [f"{b.dropped} {b.kind} dropped" for b in buffers if b.dropped]
    return ", ".join(parts)


def with_backlog(status: str, *buffers: Backlog) -> str:
    """`status`, followed by `; <backlog_text>` when something is queued or was dropped."""
    backlog = backlog_text(*buffers)
    return f"{status}; {backlog}" if backlog else status


# The server says `POST /api/events` does not exist here: use the websocket instead.
_ENDPOINT_REFUSED = frozenset({404, 405})
# The server refuses these events themselves: retrying the same batch would block the queue.
_EVENTS_REJECTED = frozenset({400, 409, 413, 422})


def _status(exc: BaseException) -> object:
    """The HTTP status an API error carries, whatever the attribute is called."""
    status = getattr(exc, "status_code", None) or getattr(exc, "status", None)
    if status is None:
        status = getattr(getattr(exc, "response", None), "status_code", None)
    return status


class EventEmitter:
    def __init__(
        self,
        send: SendEvents,
        *,
        api_url: str | None = None,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        max_buffered: int = 5_000,
        batch_size: int = 200,
        flush_interval: float = 1.0,
        max_backoff: float = 30.0,
        drop_report_interval: float = 60.0,
        shutdown_timeout: float = 3.0,
        open_timeout: float = 10.0,
        kind: str = "events",
    ) -> None:
        """`send` posts one batch (PrefectClient.emit_events); `api_url` enables the fallback.

        `kind` names the items in log lines: the same buffer also carries flow-run log messages.
        """
        self.kind = kind
        self._send = send
        self._ws_url = websocket_url(api_url, "events/in") if api_url else None
        self._token = token
        self._headers = dict(headers or {})
        self._max_buffered = max_buffered
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._backoff = Backoff(flush_interval, max(max_backoff, flush_interval))
        self._drop_report_interval = drop_report_interval
        self._shutdown_timeout = shutdown_timeout
        self._open_timeout = open_timeout
        self._buffer: deque[Event] = deque()
        self._wakeup = asyncio.Event()
        # Set when an item lands in an empty buffer: an idle emitter runs no timer at all.
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ws: ClientConnection | None = None
        self.use_websocket = False
        self.sent = 0
        self.dropped = 0
        self.rejected = 0
        self._reported_drops = 0
        self._last_drop_report = 0.0

    # -- producer side (sync, never blocks, never raises) ----------------------------

    def emit(self, event: Event) -> None:
        try:
            if not self._buffer:
                self._arrived.set()
            self._buffer.append(event)
            self._trim()
            if len(self._buffer) >= self._batch_size:
                self._wakeup.set()
        except Exception:  # pragma: no cover - a deque append does not fail in practice
            log.exception("could not queue an event")

    def stats(self) -> dict[str, int]:
        return {
            "sent": self.sent,
            "dropped": self.dropped,
            "rejected": self.rejected,
            "pending": len(self._buffer),
        }

    @property
    def pending(self) -> int:
        return len(self._buffer)

    @property
    def max_buffered(self) -> int:
        return self._max_buffered

    def retry_now(self) -> None:
        """The API is back (a poll got through): end any backoff and send what is queued."""
        if self._buffer:
            self._wakeup.set()

    def _trim(self) -> None:
        while len(self._buffer) > self._max_buffered:
            self._buffer.popleft()
            self.dropped += 1

    # -- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> EventEmitter:
        self._task = asyncio.create_task(self.run(), name="event-emitter")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.aclose()

    async def aclose(self) -> None:
        """One bounded last flush, then close the websocket (for TaskGroup use after run())."""
        try:
            async with asyncio.timeout(self._shutdown_timeout):
                await self.flush()
        except Exception as exc:
            log.debug("final %s flush failed: %r", self.kind, exc)
        await self._close_ws()
        self._report_drops(force=True)
        if self._buffer:
            log.warning("%d %s were not delivered at shutdown", len(self._buffer), self.kind)
        log.info(
            "%s: %d sent, %d dropped, %d rejected, %d not delivered",
            self.kind,
            self.sent,
            self.dropped,
            self.rejected,
            len(self._buffer),
        )

    async def run(self) -> None:
        """Post batches until cancelled."""
        failures = 0
        while True:
            if not self._buffer and not failures:
                # Idle: sleep until the first item, then give it one flush interval of company.
                await self._arrived.wait()
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._wakeup.wait(),
                    timeout=self._backoff.delay(failures) if failures else self._flush_interval,
                )
            self._wakeup.clear()
            self._report_drops()
            try:
                await self.flush()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if _status(exc) in _ENDPOINT_REFUSED and not self.use_websocket and self._ws_url:
                    log.warning(
                        "the server refused POST /events (%s); sending events over %s",
                        exc,
                        self._ws_url,
                    )
                    self.use_websocket = True
                    continue
                failures += 1
                log.warning(
                    "could not send %d %s, retrying in ~%.0fs: %r",
                    self.pending,
                    self.kind,
                    self._backoff.step(failures),
                    exc,
                )
                await self._close_ws()

    async def flush(self) -> None:
        """Send everything buffered; on failure the batch returns to the front, in order."""
        while self._buffer:
            count = min(self._batch_size, len(self._buffer))
            batch = [self._buffer.popleft() for _ in range(count)]
            try:
                if self.use_websocket:
                    await self._send_ws(batch)
                else:
                    await self._send(batch)
            except Exception as exc:
                if _status(exc) in _EVENTS_REJECTED:
                    self.rejected += len(batch)
                    log.error(
                        "the server rejected %d %s, dropped them: %r", len(batch), self.kind, exc
                    )
                    continue
                self._requeue(batch)
                raise
            except BaseException:
                self._requeue(batch)
                raise
            self.sent += len(batch)

    def _requeue(self, batch: list[Event]) -> None:
        self._buffer.extendleft(reversed(batch))
        self._trim()

    async def _send_ws(self, batch: list[Event]) -> None:
        assert self._ws_url is not None
        if self._ws is None:
            self._ws = await open_prefect_socket(
                self._ws_url,
                token=self._token,
                headers=self._headers,
                open_timeout=self._open_timeout,
            )
        for event in batch:
            await self._ws.send(json.dumps(event))
        # A pong after the sends means the server has read them (as Prefect's checkpoint).
        pong = await self._ws.ping()
        async with asyncio.timeout(self._open_timeout):
            await pong

    async def _close_ws(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()

    def _report_drops(self, *, force: bool = False) -> None:
        new = self.dropped - self._reported_drops
        now = time.monotonic()
        if new and (force or now - self._last_drop_report >= self._drop_report_interval):
            log.warning("dropped %d %s while the API was unreachable", new, self.kind)
            self._reported_drops = self.dropped
            self._last_drop_report = now
