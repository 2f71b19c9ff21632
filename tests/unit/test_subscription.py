"""EventSubscription against a fake Prefect events server (real websockets, loopback)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.typing import Subprotocol

from agent.subscription import EventSubscription, websocket_url

CANCELLING = "prefect.flow-run.Cancelling"
SCHEDULED = "prefect.flow-run.Scheduled"

Script = Callable[[ServerConnection, int], Awaitable[None]]


class FakeEventsServer:
    """Speaks the server side of /api/events/out; `script(ws, n)` drives connection n."""

    def __init__(self) -> None:
        self.auths: list[dict[str, Any]] = []
        self.filters: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.subprotocols: list[str | None] = []
        self.paths: list[str] = []
        self.refuse_auth = False
        self.script: Script = self.hold
        self.connections = 0
        self.closed = 0
        self.server: Server | None = None
        self.port = 0

    @staticmethod
    async def hold(ws: ServerConnection, n: int) -> None:
        await ws.wait_closed()

    async def handler(self, ws: ServerConnection) -> None:
        n = self.connections
        self.connections += 1
        assert ws.request is not None
        self.paths.append(ws.request.path)
        self.headers.append(dict(ws.request.headers.raw_items()))
        self.subprotocols.append(ws.subprotocol)
        try:
            auth = json.loads(await ws.recv())
            self.auths.append(auth)
            if self.refuse_auth:
                await ws.close(1008, "Invalid token")
                return
            await ws.send(json.dumps({"type": "auth_success"}))
            self.filters.append(json.loads(await ws.recv()))
            await self.script(ws, n)
        finally:
            self.closed += 1

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"


@pytest.fixture
async def server() -> AsyncIterator[FakeEventsServer]:
    fake = FakeEventsServer()
    async with serve(fake.handler, "127.0.0.1", 0, subprotocols=[Subprotocol("prefect")]) as srv:
        fake.server = srv
        fake.port = next(iter(srv.sockets)).getsockname()[1]
        yield fake


def event_message(name: str, n: int, related: tuple[str, ...] = ()) -> str:
    return json.dumps(
        {
            "type": "event",
            "event": {
                "id": f"00000000-0000-0000-0000-{n:012d}",
                "occurred": datetime.now(UTC).isoformat(),
                "event": name,
                "resource": {"prefect.resource.id": f"prefect.flow-run.run-{n}"},
                "related": [
                    {"prefect.resource.id": r, "prefect.resource.role": "deployment"}
                    for r in related
                ],
                "payload": {},
            },
        }
    )


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not check():
            await asyncio.sleep(0.01)


def fast(sub_url: str, **kwargs: Any) -> EventSubscription:
    kwargs.setdefault("initial_backoff", 0.02)
    kwargs.setdefault("max_backoff", 0.1)
    return EventSubscription(sub_url, **kwargs)


def test_websocket_url() -> None:
    assert websocket_url("http://h:4200/api", "events/out") == "ws://h:4200/api/events/out"
    assert websocket_url("https://h/api/", "/events/in") == "wss://h/api/events/in"


async def test_auth_handshake_and_filter(server: FakeEventsServer) -> None:
    sub = fast(server.api_url, token="s3cret", headers={"Authorization": "Bearer s3cret"})
    sub.subscribe(CANCELLING, lambda e: None)
    sub.subscribe(SCHEDULED, lambda e: None)
    sub.set_related(SCHEDULED, ["prefect.deployment.d2", "prefect.deployment.d1"])
    before = datetime.now(UTC)
    async with sub:
        await asyncio.wait_for(sub.connected_event.wait(), 5)
        connected_inside = sub.connected
    assert connected_inside
    assert not sub.connected_event.is_set()
    assert server.paths == ["/api/events/out"]
    assert server.subprotocols == ["prefect"]
    assert server.headers[0]["Authorization"] == "Bearer s3cret"
    assert server.auths == [{"type": "auth", "token": "s3cret"}]
    [message] = server.filters
    assert message["type"] == "filter"
    assert message["backfill"] is True
    flt = message["filter"]
    assert flt["event"] == {"name": [CANCELLING, SCHEDULED]}
    # Cancelling is unrestricted, so the server cannot narrow the stream by resource.
    assert "any_resource" not in flt
    assert "related" not in flt
    since = datetime.fromisoformat(flt["occurred"]["since"])
    until = datetime.fromisoformat(flt["occurred"]["until"])
    assert before - timedelta(seconds=61) <= since <= before
    assert until > before + timedelta(days=300)
    await eventually(lambda: server.closed == 1)


async def test_no_token_sends_null_and_restricted_filter(server: FakeEventsServer) -> None:
    sub = fast(server.api_url, backfill=0)
    sub.subscribe(SCHEDULED, lambda e: None)
    sub.set_related(SCHEDULED, ["prefect.deployment.b", "prefect.deployment.a"])
    async with sub:
        await asyncio.wait_for(sub.connected_event.wait(), 5)
    assert server.auths == [{"type": "auth", "token": None}]
    assert server.filters[0]["backfill"] is False
    assert server.filters[0]["filter"]["event"] == {"name": [SCHEDULED]}
    assert server.filters[0]["filter"]["any_resource"] == {
        "id": ["prefect.deployment.a", "prefect.deployment.b"]
    }


async def test_no_handlers_no_connection(server: FakeEventsServer) -> None:
    async with fast(server.api_url) as sub:
        await asyncio.sleep(0.2)
        assert not sub.connected
    assert server.connections == 0


async def test_routes_events_to_handlers_by_name(server: FakeEventsServer) -> None:
    async def script(ws: ServerConnection, n: int) -> None:
        await ws.send(event_message(CANCELLING, 1))
        await ws.send(event_message(SCHEDULED, 2, ("prefect.deployment.mine",)))
        await ws.send(event_message(SCHEDULED, 3, ("prefect.deployment.other",)))
        await ws.send(event_message("prefect.flow-run.Running", 4))
        await ws.send(event_message(CANCELLING, 5))
        await ws.wait_closed()

    server.script = script
    cancelling: list[str] = []
    scheduled: list[str] = []

    async def on_scheduled(event: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        scheduled.append(event["resource"]["prefect.resource.id"])

    sub = fast(server.api_url)
    sub.subscribe(CANCELLING, lambda e: cancelling.append(e["resource"]["prefect.resource.id"]))
    sub.subscribe(SCHEDULED, on_scheduled)
    sub.set_related(SCHEDULED, ["prefect.deployment.mine"])
    async with sub:
        await eventually(lambda: len(cancelling) == 2)
        await asyncio.sleep(0.05)
    assert cancelling == ["prefect.flow-run.run-1", "prefect.flow-run.run-5"]
    assert scheduled == ["prefect.flow-run.run-2"]


async def test_bad_messages_are_skipped(
    server: FakeEventsServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def script(ws: ServerConnection, n: int) -> None:
        for bad in [
            "{not json",
            "[1, 2]",
            json.dumps({"type": "event"}),
            json.dumps({"type": "event", "event": "nope"}),
            json.dumps({"type": "event", "event": {"event": 7}}),
            json.dumps({"type": "something-else"}),
        ]:
            await ws.send(bad)
        await ws.send(event_message(CANCELLING, 1))
        await ws.wait_closed()

    server.script = script
    seen: list[dict[str, Any]] = []
    sub = fast(server.api_url)
    sub.subscribe(CANCELLING, seen.append)
    with caplog.at_level(logging.WARNING, logger="agent.subscription"):
        async with sub:
            await eventually(lambda: len(seen) == 1)
    assert seen[0]["event"] == CANCELLING
    assert sum("skipped" in r.getMessage() for r in caplog.records) == 6
    assert server.connections == 1


async def test_handler_exception_is_contained(
    server: FakeEventsServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def script(ws: ServerConnection, n: int) -> None:
        await ws.send(event_message(CANCELLING, 1))
        await ws.send(event_message(CANCELLING, 2))
        await ws.wait_closed()

    server.script = script
    seen: list[int] = []

    def broken(event: dict[str, Any]) -> None:
        raise RuntimeError("boom")

    async def broken_async(event: dict[str, Any]) -> None:
        raise ValueError("async boom")

    sub = fast(server.api_url)
    sub.subscribe(CANCELLING, broken)
    sub.subscribe(CANCELLING, broken_async)
    sub.subscribe(CANCELLING, lambda e: seen.append(len(seen)))
    with caplog.at_level(logging.ERROR, logger="agent.subscription"):
        async with sub:
            await eventually(lambda: len(seen) == 2)
            assert sub.connected
    assert server.connections == 1
    assert sum("failed for event" in r.getMessage() for r in caplog.records) == 4


async def test_reconnects_after_server_drops(server: FakeEventsServer) -> None:
    async def script(ws: ServerConnection, n: int) -> None:
        await ws.send(event_message(CANCELLING, n + 1))
        if n == 0:
            await ws.close(1011, "going away")
            return
        await ws.wait_closed()

    server.script = script
    seen: list[str] = []
    transitions: list[bool] = []
    sub = fast(server.api_url, on_connection_change=transitions.append)
    sub.subscribe(CANCELLING, lambda e: seen.append(e["id"][-1]))
    async with sub:
        await eventually(lambda: len(seen) == 2)
        assert sub.connected
    assert seen == ["1", "2"]
    assert server.connections == 2
    assert transitions == [True, False, True, False]
    # The second connection replays from around the drop, so nothing in the gap is missed.
    since = datetime.fromisoformat(server.filters[1]["filter"]["occurred"]["since"])
    assert datetime.now(UTC) - timedelta(seconds=70) < since


async def test_duplicate_event_ids_are_dropped(server: FakeEventsServer) -> None:
    async def script(ws: ServerConnection, n: int) -> None:
        await ws.send(event_message(CANCELLING, 1))
        await ws.send(event_message(CANCELLING, 1))
        await ws.send(event_message(CANCELLING, 2))
        await ws.wait_closed()

    server.script = script
    seen: list[str] = []
    sub = fast(server.api_url)
    sub.subscribe(CANCELLING, lambda e: seen.append(e["id"]))
    async with sub:
        await eventually(lambda: len(seen) == 2)
        await asyncio.sleep(0.05)
    assert len(seen) == 2 and len(set(seen)) == 2


async def test_changing_registrations_reconnects_with_new_filter(
    server: FakeEventsServer,
) -> None:
    sub = fast(server.api_url)
    sub.subscribe(CANCELLING, lambda e: None)
    async with sub:
        await asyncio.wait_for(sub.connected_event.wait(), 5)
        sub.set_related(SCHEDULED, ["prefect.deployment.x"])  # no handler yet: no reconnect
        await asyncio.sleep(0.1)
        assert server.connections == 1
        sub.subscribe(SCHEDULED, lambda e: None)
        await eventually(lambda: len(server.filters) == 2)
        sub.set_related(SCHEDULED, ["prefect.deployment.x"])  # unchanged: no reconnect
        sub.set_related(SCHEDULED, ["prefect.deployment.x", "prefect.deployment.y"])
        await eventually(lambda: len(server.filters) == 3)
        await asyncio.sleep(0.1)
    assert [f["filter"]["event"]["name"] for f in server.filters] == [
        [CANCELLING],
        [CANCELLING, SCHEDULED],
        [CANCELLING, SCHEDULED],
    ]
    assert server.connections == 3
    await eventually(lambda: server.closed == 3)


async def test_refused_auth_retries_with_backoff(server: FakeEventsServer) -> None:
    server.refuse_auth = True
    transitions: list[bool] = []
    sub = fast(server.api_url, on_connection_change=transitions.append)
    sub.subscribe(CANCELLING, lambda e: None)
    async with sub:
        await eventually(lambda: server.connections >= 3)
        assert not sub.connected
        server.refuse_auth = False
        await asyncio.wait_for(sub.connected_event.wait(), 5)
    assert transitions == [True, False]


async def test_unreachable_server_then_shutdown_is_clean() -> None:
    sub = fast("http://127.0.0.1:9/api", open_timeout=0.5)
    sub.subscribe(CANCELLING, lambda e: None)
    before = asyncio.all_tasks()
    async with sub:
        await eventually(lambda: sub.reconnects >= 1)
        assert not sub.connected
    assert asyncio.all_tasks() == before


async def test_runs_in_a_task_group_and_stops_cleanly(server: FakeEventsServer) -> None:
    sub = fast(server.api_url)
    sub.subscribe(CANCELLING, lambda e: None)
    before = asyncio.all_tasks()
    with pytest.raises(ExceptionGroup):
        async with asyncio.TaskGroup() as tg:
            tg.create_task(sub.run())
            await asyncio.wait_for(sub.connected_event.wait(), 5)
            raise RuntimeError("stop")
    assert not sub.connected
    assert asyncio.all_tasks() == before
    await eventually(lambda: server.closed == 1)
