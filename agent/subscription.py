"""Events in: one websocket subscription to Prefect's `/api/events/out`, routed to handlers.

The protocol is the one Prefect's server speaks (prefect/server/api/events.py and
prefect/server/utilities/subscriptions.py): subprotocol `prefect`, then
`{"type": "auth", "token": ...}` answered by `{"type": "auth_success"}`, then one
`{"type": "filter", "filter": <EventFilter>}`, then a stream of `{"type": "event", "event": ...}`.

The filter is fixed per connection, so changing the handlers or the related ids reconnects
with a new filter. While the socket is down, `connected` is False and the connection
callback fires, so callers fall back to polling; this module never polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any

from agent.backoff import Backoff

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

log = logging.getLogger("agent.subscription")

Handler = Callable[[dict[str, Any]], Awaitable[None] | None]
ConnectionCallback = Callable[[bool], object]

# The server's live filter also checks `occurred <= until`, so `until` must lie far ahead
# (Prefect's own subscriber uses a year).
_UNTIL_AHEAD = timedelta(days=365)
_LIVE_SLACK = timedelta(hours=1)
# Event ids remembered to drop the duplicates a backfill replays after a reconnect. Only ids of
# a sane length are kept: 2048 hostile megabyte ids would hold gigabytes.
_SEEN_IDS = 2048
_MAX_ID_CHARS = 100


def websocket_url(api_url: str, path: str) -> str:
    """`http://host:4200/api` + `/events/out` -> `ws://host:4200/api/events/out`."""
    base = api_url.rstrip("/")
    if base.startswith("https://"):
        base = "wss://" + base.removeprefix("https://")
    elif base.startswith("http://"):
        base = "ws://" + base.removeprefix("http://")
    return base + "/" + path.lstrip("/")


async def open_prefect_socket(
    url: str,
    *,
    token: str | None,
    headers: Mapping[str, str] | None,
    open_timeout: float,
    close_timeout: float = 2.0,
) -> ClientConnection:
    """Connect with subprotocol `prefect` and complete the auth handshake."""
    # Imported here: the agent only pays for websockets once it connects.
    from websockets.asyncio.client import connect
    from websockets.typing import Subprotocol

    ws = await connect(
        url,
        subprotocols=[Subprotocol("prefect")],
        additional_headers=dict(headers or {}),
        open_timeout=open_timeout,
        # Shutdown waits at most this long for the server's close frame.
        close_timeout=close_timeout,
        # No permessage-deflate: its per-connection zlib state costs memory, events are small.
        compression=None,
    )
    try:
        async with asyncio.timeout(open_timeout):
            await ws.send(json.dumps({"type": "auth", "token": token}))
            reply = json.loads(await ws.recv())
        if not isinstance(reply, dict) or reply.get("type") != "auth_success":
            reason = reply.get("reason") if isinstance(reply, dict) else None
            raise ConnectionError(f"authentication refused by {url}: {reason or reply!r:.200}")
    except BaseException:
        await ws.close()
        raise
    return ws


def _resource_ids(event: Mapping[str, Any]) -> set[str]:
    ids: set[str] = set()
    related = event.get("related")
    resources = [event.get("resource"), *(related if isinstance(related, list) else ())]
    for resource in resources:
        if isinstance(resource, Mapping):
            rid = resource.get("prefect.resource.id")
            if isinstance(rid, str):
                ids.add(rid)
    return ids


class EventSubscription:
    """One `/api/events/out` websocket, reconnecting with backoff, dispatching by event name."""

    def __init__(
        self,
        api_url: str,
        *,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        on_connection_change: ConnectionCallback | None = None,
        backfill: float = 60.0,
        initial_backoff: float = 0.5,
        max_backoff: float = 30.0,
        open_timeout: float = 10.0,
    ) -> None:
        self.url = websocket_url(api_url, "events/out")
        self._token = token
        self._headers = dict(headers or {})
        self._on_connection_change = on_connection_change
        self._backfill = backfill
        self._backoff = Backoff(initial_backoff, max_backoff)
        self._open_timeout = open_timeout
        self._handlers: dict[str, list[Handler]] = {}
        self._related: dict[str, frozenset[str]] = {}
        self._changed = asyncio.Event()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._replay_since: datetime | None = None
        self._task: asyncio.Task[None] | None = None
        self.connected_event = asyncio.Event()
        self.received = 0
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        return self.connected_event.is_set()

    # -- registration -------------------------------------------------------------------

    def subscribe(self, event_name: str, handler: Handler) -> None:
        """Call `handler(event)` for each event named `event_name` (reconnects if new name)."""
        handlers = self._handlers.setdefault(event_name, [])
        handlers.append(handler)
        if len(handlers) == 1:
            self._changed.set()

    def set_related(self, event_name: str, resource_ids: Iterable[str] | None) -> None:
        """Only deliver `event_name` events involving one of `resource_ids` (None: all).

        E.g. `set_related("prefect.flow-run.Scheduled", ["prefect.deployment.<id>", ...])`.
        An empty collection delivers none. Reconnects only if the set changed.
        """
        new = None if resource_ids is None else frozenset(resource_ids)
        if self._related.get(event_name) == new:
            return
        if new is None:
            self._related.pop(event_name, None)
        else:
            self._related[event_name] = new
        if event_name in self._handlers:
            self._changed.set()

    def event_filter(self, now: datetime | None = None) -> dict[str, Any]:
        """The EventFilter (prefect/server/events/filters.py) for the current registrations."""
        now = now or datetime.now(UTC)
        if self._backfill > 0:
            since = self._replay_since or now - timedelta(seconds=self._backfill)
        else:
            # Without backfill `since` only gates the live stream; leave room for clock skew.
            since = now - _LIVE_SLACK
        names = sorted(self._handlers)
        event_filter: dict[str, Any] = {
            "occurred": {"since": since.isoformat(), "until": (now + _UNTIL_AHEAD).isoformat()},
            "event": {"name": names},
        }
        # The server's live stream ignores `related` filters (EventRelatedFilter has no
        # `includes`), but honours `any_resource`. It can narrow the stream only when every
        # subscribed name is restricted; the exact per-name check happens on receipt.
        if names and all(name in self._related for name in names):
            ids = sorted(set().union(*(self._related[name] for name in names)))
            event_filter["any_resource"] = {"id": ids}
        return event_filter

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> EventSubscription:
        self._task = asyncio.create_task(self.run(), name="event-subscription")
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

    async def run(self) -> None:
        """Stay subscribed until cancelled; safe to run in the caller's TaskGroup."""
        attempt = 0
        while True:
            while not self._handlers:
                self._changed.clear()
                await self._changed.wait()
            self._changed.clear()
            established, why = await self._connect_once()
            if why is None:
                attempt = 0
                log.info("event subscription changed; reconnecting with the new filter")
                continue
            attempt = 1 if established else attempt + 1
            await self._back_off(attempt, why)

    async def _connect_once(self) -> tuple[bool, str | None]:
        """One connection's life: (was it established, why it ended or None if reconfigured)."""
        try:
            ws = await open_prefect_socket(
                self.url,
                token=self._token,
                headers=self._headers,
                open_timeout=self._open_timeout,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return False, f"could not connect to {self.url}: {exc!r}"
        try:
            await self._session(ws)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return True, f"event stream lost: {exc!r}"
        finally:
            # The next connection replays what was missed meanwhile; seen ids drop the overlap.
            self._replay_since = datetime.now(UTC) - timedelta(seconds=self._backfill)
            self._set_connected(False)
            with contextlib.suppress(Exception):
                await ws.close()
        if self._changed.is_set():
            return True, None
        return True, "event stream closed by the server"

    async def _back_off(self, attempt: int, why: str) -> None:
        delay = self._backoff.delay(attempt)
        log.warning("%s; reconnecting in %.1fs", why, delay)
        self.reconnects += 1
        # A registration change cuts the wait short: the new filter is wanted now.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout=delay)

    async def _session(self, ws: ClientConnection) -> None:
        await ws.send(
            json.dumps(
                {
                    "type": "filter",
                    "filter": self.event_filter(),
                    "backfill": self._backfill > 0,
                }
            )
        )
        self._set_connected(True)
        reader = asyncio.create_task(self._read(ws), name="event-subscription-read")
        changed = asyncio.create_task(self._changed.wait(), name="event-subscription-changed")
        try:
            done, _ = await asyncio.wait({reader, changed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, changed):
                task.cancel()
            await asyncio.gather(reader, changed, return_exceptions=True)
        if reader in done:
            reader.result()

    async def _read(self, ws: ClientConnection) -> None:
        from websockets.exceptions import ConnectionClosedOK

        with contextlib.suppress(ConnectionClosedOK):
            async for raw in ws:
                await self._on_message(raw)

    async def _on_message(self, raw: str | bytes) -> None:
        try:
            message = json.loads(raw)
        except (ValueError, RecursionError):
            log.warning("skipped a message that is not JSON: %.200r", raw)
            return
        if not isinstance(message, dict) or message.get("type") != "event":
            log.warning("skipped an unexpected message: %.200r", raw)
            return
        event = message.get("event")
        name = event.get("event") if isinstance(event, dict) else None
        if not isinstance(event, dict) or not isinstance(name, str):
            log.warning("skipped a malformed event message: %.200r", raw)
            return
        if not self._first_sighting(event):
            return
        self.received += 1
        related = self._related.get(name)
        if related is not None and not related & _resource_ids(event):
            return
        for handler in list(self._handlers.get(name, ())):
            try:
                result = handler(event)
                if inspect.isawaitable(result):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("handler %r failed for event %s", handler, name)

    def _first_sighting(self, event: Mapping[str, Any]) -> bool:
        event_id = event.get("id")
        if isinstance(event_id, str) and len(event_id) <= _MAX_ID_CHARS:
            if event_id in self._seen:
                return False
            self._seen[event_id] = None
            if len(self._seen) > _SEEN_IDS:
                self._seen.popitem(last=False)
        return True

    def _set_connected(self, up: bool) -> None:
        if up == self.connected:
            return
        if up:
            self.connected_event.set()
            log.info("subscribed to %s for %s", self.url, ", ".join(sorted(self._handlers)))
        else:
            self.connected_event.clear()
        if self._on_connection_change is not None:
            try:
                self._on_connection_change(up)
            except Exception:
                log.exception("connection callback failed")
