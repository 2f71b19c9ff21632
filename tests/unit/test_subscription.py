"""EventSubscription against a fake Prefect events server (real websockets, loopback)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection

from agent.subscription import EventSubscription, websocket_url
from tests.unit.fakes import FakeEventsServer

CANCELLING = "prefect.flow-run.Cancelling"
SCHEDULED = "prefect.flow-run.Scheduled"


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


async def test_auth_handshake_and_filter(fake_events: FakeEventsServer) -> None:
    sub = fast(fake_events.api_url, token="s3cret", headers={"Authorization": "Bearer s3cret"})
    sub.subscribe(CANCELLING, lambda e: None)
    sub.subscribe(SCHEDULED, lambda e: None)
    sub.set_related(SCHEDULED, ["prefect.deployment.d2", "prefect.deployment.d1"])
    before = datetime.now(UTC)
    async with sub:
        await asyncio.wait_for(sub.connected_event.wait(), 5)
        connected_inside = sub.connected
    assert connected_inside
    assert not sub.connected_event.is_set()
    assert fake_events.paths == ["/api/events/out"]
    assert fake_events.subprotocols == ["prefect"]
    assert fake_events.headers[0]["Authorization"] == "Bearer s3cret"
    assert fake_events.auths == [{"type": "auth", "token": "s3cret"}]
    [message] = fake_events.filters
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
    await eventually(lambda: fake_events.closed == 1)


async def test_no_token_sends_null_and_restricted_filter(fake_events: FakeEventsServer) -> None:
    sub = fast(fake_events.api_url, backfill=0)
    sub.subscribe(SCHEDULED, lambda e: None)
    sub.set_related(SCHEDULED, ["prefect.deployment.b", "prefect.deployment.a"])
    async with sub:
        await asyncio.wait_for(sub.connected_event.wait(), 5)
    assert fake_events.auths == [{"type": "auth", "token": None}]
    assert fake_events.filters[0]["backfill"] is False
    assert fake_events.filters[0]["filter"]["event"] == {"name": [SCHEDULED]}
    assert fake_events.filters[0]["filter"]["any_resource"] == {
        "id": ["prefect.deployment.a", "prefect.deployment.b"]
    }


async def test_no_handlers_no_connection(fake_events: FakeEventsServer) -> None:
    async with fast(fake_events.api_url) as sub:
        await asyncio.sleep(0.2)
        assert not sub.connected
    assert fake_events.connections == 0


async def test_routes_events_to_handlers_by_name(fake_events: FakeEventsServer) -> None:
    async def script(ws: ServerConnection, n: int) -> None:
        await ws.send(event_message(CANCELLING, 1))
        await ws.send(event_message(SCHEDULED, 2, ("prefect.deployment.mine",)))
        await ws.send(event_message(SCHEDULED, 3, ("prefect.deployment.other",)))
        await ws.send(event_message("prefect.flow-run.Running", 4))
        await ws.send(event_message(CANCELLING, 5))
        await ws.wait_closed()

    fake_events.script = script
    cancelling: list[str] = []
    scheduled: list[str] = []

    async def on_scheduled(event: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        scheduled.append(event["resource"]["prefect.resource.id"])

    sub = fast(fake_events.api_url)
    sub.subscribe(CANCELLING, lambda e: cancelling.append(e["resource"]["prefect.resource.id"]))
    sub.subscribe(SCHEDULED, on_scheduled)
    sub.set_related(SCHEDULED, ["prefect.deployment.mine"])
    async with sub:
        await eventually(lambda: len(cancelling) == 2)
        await asyncio.sleep(0.05)
    assert cancelling == ["prefect.flow-run.run-1", "prefect.flow-run.run-5"]
    assert scheduled == ["prefect.flow-run.run-2"]


async def test_bad_messages_are_skipped(
    fake_events: FakeEventsServer, caplog: pytest.LogCaptureFixture
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

    fake_events.script = script
    seen: list[dict[str, Any]] = []
    sub = fast(fake_events.api_url)
    sub.subscribe(CANCELLING, seen.append)
    with caplog.at_level(logging.WARNING, logger="agent.subscription"):
        async with sub:
            await eventually(lambda: len(seen) == 1)
    assert seen[0]["event"] == CANCELLING
    assert sum("skipped" in r.getMessage() for r in caplog.records) == 6
    assert fake_events.connections == 1


async def test_handler_exception_is_contained(
    fake_events: FakeEventsServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def script(ws: ServerConnection, n: int) -> None:
        await ws.send(event_message(CANCELLING, 1))
        await ws.send(event_message(CANCELLING, 2))
        await ws.wait_closed()

    fake_events.script = script
    seen: list[int] = []

    def broken(event: dict[str, Any]) -> None:
        raise RuntimeError("boom")

    async def broken_async(event: dict[str, Any]) -> None:
        raise ValueError("async boom")

    sub = fast(fake_events.api_url)
    sub.subscribe(CANCELLING, broken)
    sub.subscribe(CANCELLING, broken_async)
    sub.subscribe(CANCELLING, lambda e: seen.append(len(seen)))
    with caplog.at_level(logging.ERROR, logger="agent.subscription"):
        async with sub:
            await eventually(lambda: len(seen) == 2)
            assert sub.connected
    assert fake_events.connections == 1
    assert sum("failed for event" in r.getMessage() for r in caplog.records) == 4


async def test_reconnects_after_server_drops(fake_events: FakeEventsServer) -> None:
    async def script(ws: ServerConnection, n: int) -> None:
        await ws.send(event_message(CANCELLING, n + 1))
        if n == 0:
            await ws.close(1011, "going away")
            return
        await ws.wait_closed()

    fake_events.script = script
    seen: list[str] = []
    transitions: list[bool] = []
    sub = fast(fake_events.api_url, on_connection_change=transitions.append)
    sub.subscribe(CANCELLING, lambda e: seen.append(e["id"][-1]))
    async with sub:
        await eventually(lambda: len(seen) == 2)
        assert sub.connected
    assert seen == ["1", "2"]
    assert fake_events.connections == 2
    assert transitions == [True, False, True, False]
    # The second connection replays from around the drop, so nothing in the gap is missed.
    since = datetime.fromisoformat(fake_events.filters[1]["filter"]["occurred"]["since"])
    assert datetime.now(UTC) - timedelta(seconds=70) < since


async def test_duplicate_event_ids_are_dropped(fake_events: FakeEventsServer) -> None:
    async def script(ws: ServerConnection, n: int) -> None:
        await ws.send(event_message(CANCELLING, 1))
        await ws.send(event_message(CANCELLING, 1))
        await ws.send(event_message(CANCELLING, 2))
        await ws.wait_closed()

    fake_events.script = script
    seen: list[str] = []
    sub = fast(fake_events.api_url)
    sub.subscribe(CANCELLING, lambda e: seen.append(e["id"]))
    async with sub:
        await eventually(lambda: len(seen) == 2)
        await asyncio.sleep(0.05)
    assert len(seen) == 2 and len(set(seen)) == 2


async def test_changing_registrations_reconnects_with_new_filter(
    fake_events: FakeEventsServer,
) -> None:
    sub = fast(fake_events.api_url)
    sub.subscribe(CANCELLING, lambda e: None)
    async with sub:
        await asyncio.wait_for(sub.connected_event.wait(), 5)
        sub.set_related(SCHEDULED, ["prefect.deployment.x"])  # no handler yet: no reconnect
        await asyncio.sleep(0.1)
        assert fake_events.connections == 1
        sub.subscribe(SCHEDULED, lambda e: None)
        await eventually(lambda: len(fake_events.filters) == 2)
        sub.set_related(SCHEDULED, ["prefect.deployment.x"])  # unchanged: no reconnect
        sub.set_related(SCHEDULED, ["prefect.deployment.x", "prefect.deployment.y"])
        await eventually(lambda: len(fake_events.filters) == 3)
        await asyncio.sleep(0.1)
    assert [f["filter"]["event"]["name"] for f in fake_events.filters] == [
        [CANCELLING],
        [CANCELLING, SCHEDULED],
        [CANCELLING, SCHEDULED],
    ]
    assert fake_events.connections == 3
    await eventually(lambda: fake_events.closed == 3)


async def test_refused_auth_retries_with_backoff(fake_events: FakeEventsServer) -> None:
    fake_events.refuse_auth = True
    transitions: list[bool] = []
    sub = fast(fake_events.api_url, on_connection_change=transitions.append)
    sub.subscribe(CANCELLING, lambda e: None)
    async with sub:
        await eventually(lambda: fake_events.connections >= 3)
        assert not sub.connected
        fake_events.refuse_auth = False
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


async def test_runs_in_a_task_group_and_stops_cleanly(fake_events: FakeEventsServer) -> None:
    sub = fast(fake_events.api_url)
    sub.subscribe(CANCELLING, lambda e: None)
    before = asyncio.all_tasks()
    with pytest.raises(ExceptionGroup):
        async with asyncio.TaskGroup() as tg:
            tg.create_task(sub.run())
            await asyncio.wait_for(sub.connected_event.wait(), 5)
            raise RuntimeError("stop")
    assert not sub.connected
    assert asyncio.all_tasks() == before
    await eventually(lambda: fake_events.closed == 1)
