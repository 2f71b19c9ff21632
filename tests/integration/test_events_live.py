"""Events in and out against the session's real Prefect server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from agent import events
from agent.emitter import EventEmitter
from agent.subscription import EventSubscription
from tests.integration.prefect_server import PrefectServer

pytestmark = pytest.mark.integration

CANCELLING = "prefect.flow-run.Cancelling"
SCHEDULED = "prefect.flow-run.Scheduled"
# Bound on every wait for the server: a hang guard. A busy server (SQLite, two cores shared
# with busy processes) takes seconds to connect or to deliver an event, never a minute.
PATIENCE = 60.0


class EndpointRefused(Exception):
    status_code = 404


def poster(client: httpx.AsyncClient) -> Callable[[list[dict[str, Any]]], Any]:
    async def send(batch: list[dict[str, Any]]) -> None:
        response = await client.post("/events", json=batch)
        response.raise_for_status()

    return send


async def read_back(
    client: httpx.AsyncClient, name: str, resource_id: str, within: float = PATIENCE
) -> dict[str, Any]:
    """Events persist asynchronously: poll `POST /events/filter` until ours shows up."""
    body = {"filter": {"event": {"name": [name]}, "resource": {"id": [resource_id]}}, "limit": 10}
    async with asyncio.timeout(within):
        while True:
            response = await client.post("/events/filter", json=body)
            response.raise_for_status()
            found = response.json()["events"]
            if found:
                assert len(found) == 1
                return dict(found[0])
            await asyncio.sleep(0.5)


def assert_same_event(stored: dict[str, Any], sent: dict[str, Any]) -> None:
    assert stored["id"] == sent["id"]
    assert stored["event"] == sent["event"]
    assert stored["resource"] == sent["resource"]
    assert stored["related"] == sent["related"]
    assert stored["payload"] == sent["payload"]


# Creations are retried on 503 (tests/integration/server_http.py): flows and deployments are
# upserts, flow runs carry an idempotency key.
async def create_flow(client: httpx.AsyncClient, name: str) -> str:
    response = await client.post("/flows/", json={"name": name})
    response.raise_for_status()
    return str(response.json()["id"])


async def create_deployment(client: httpx.AsyncClient, flow_id: str, name: str) -> str:
    response = await client.post(
        "/deployments/", json={"name": name, "flow_id": flow_id, "entrypoint": "flow.py:f"}
    )
    response.raise_for_status()
    return str(response.json()["id"])


async def set_state(client: httpx.AsyncClient, run_id: str, state_type: str) -> None:
    response = await client.post(
        f"/flow_runs/{run_id}/set_state",
        json={"state": {"type": state_type, "name": state_type.title()}, "force": True},
    )
    response.raise_for_status()
    assert response.json()["status"] == "ACCEPT", response.json()


async def test_heartbeats_can_be_read_back(
    prefect_server: PrefectServer, prefect_ahttp: httpx.AsyncClient
) -> None:
    run_id, flow_id, deployment_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    agent_name = f"it-agent-{uuid.uuid4().hex[:8]}"
    heartbeat = events.flow_run_heartbeat(
        flow_run_id=run_id,
        flow_run_name="brisk-otter",
        flow_id=flow_id,
        flow_name="etl",
        deployment_id=deployment_id,
        tags=["nightly", "team-a"],
    )
    agent = events.agent_heartbeat(
        agent_name=agent_name,
        host="host-1",
        version="0.1.0",
        limit=4,
        running=1,
        launcher="process",
    )
    # The flush at exit may outlast the 3 s default while the poster rides out a 503.
    async with EventEmitter(
        poster(prefect_ahttp), api_url=prefect_server.api_url, shutdown_timeout=PATIENCE
    ) as emitter:
        emitter.emit(heartbeat)
        emitter.emit(agent)
    assert emitter.stats() == {"sent": 2, "dropped": 0, "rejected": 0, "pending": 0}

    stored = await read_back(prefect_ahttp, events.FLOW_RUN_HEARTBEAT, f"prefect.flow-run.{run_id}")
    assert_same_event(stored, heartbeat)
    stored = await read_back(prefect_ahttp, events.AGENT_HEARTBEAT, f"prefect.runner.{agent_name}")
    assert_same_event(stored, agent)
    assert stored["payload"] == {
        "host": "host-1",
        "version": "0.1.0",
        "limit": 4,
        "running": 1,
        "launcher": "process",
    }


async def test_websocket_fallback_delivers_events(
    prefect_server: PrefectServer, prefect_ahttp: httpx.AsyncClient
) -> None:
    async def refused(batch: list[dict[str, Any]]) -> None:
        raise EndpointRefused("POST /events: 404")

    run_id = uuid.uuid4()
    event = events.cancelled_flow_run(
        agent_name="it-agent",
        flow_run_id=run_id,
        flow_run_name="calm-heron",
        flow_id=uuid.uuid4(),
        flow_name="etl",
        deployment_id=uuid.uuid4(),
        deployment_name="nightly",
        tags=["x"],
        deployment_tags=["y"],
    )
    async with EventEmitter(refused, api_url=prefect_server.api_url, flush_interval=0.1) as emitter:
        emitter.emit(event)
        async with asyncio.timeout(PATIENCE):
            while emitter.stats()["sent"] < 1:
                await asyncio.sleep(0.05)
        assert emitter.use_websocket
    stored = await read_back(prefect_ahttp, events.CANCELLED_FLOW_RUN, "prefect.runner.it-agent")
    assert_same_event(stored, event)


async def test_subscription_sees_cancelling(
    prefect_server: PrefectServer, prefect_ahttp: httpx.AsyncClient
) -> None:
    seen: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    sub = EventSubscription(prefect_server.api_url)
    sub.subscribe(CANCELLING, seen.put_nowait)
    async with sub:
        await asyncio.wait_for(sub.connected_event.wait(), PATIENCE)
        flow_id = await create_flow(prefect_ahttp, "events-live-cancel")
        response = await prefect_ahttp.post(
            "/flow_runs/", json={"flow_id": flow_id, "idempotency_key": str(uuid.uuid4())}
        )
        response.raise_for_status()
        run_id = response.json()["id"]
        await set_state(prefect_ahttp, run_id, "RUNNING")
        await set_state(prefect_ahttp, run_id, "CANCELLING")
        async with asyncio.timeout(PATIENCE):
            while True:
                event = await seen.get()
                if event["resource"]["prefect.resource.id"] == f"prefect.flow-run.{run_id}":
                    break
    assert event["event"] == CANCELLING
    related = {r["prefect.resource.id"]: r["prefect.resource.role"] for r in event["related"]}
    assert related[f"prefect.flow.{flow_id}"] == "flow"


async def test_subscription_sees_scheduled_runs_of_its_deployments_only(
    prefect_server: PrefectServer, prefect_ahttp: httpx.AsyncClient
) -> None:
    flow_id = await create_flow(prefect_ahttp, "events-live-scheduled")
    mine = await create_deployment(prefect_ahttp, flow_id, f"mine-{uuid.uuid4().hex[:6]}")
    other = await create_deployment(prefect_ahttp, flow_id, f"other-{uuid.uuid4().hex[:6]}")
    seen: list[dict[str, Any]] = []
    got_one = asyncio.Event()

    async def on_scheduled(event: dict[str, Any]) -> None:
        seen.append(event)
        got_one.set()

    sub = EventSubscription(prefect_server.api_url)
    sub.subscribe(SCHEDULED, on_scheduled)
    sub.set_related(SCHEDULED, [f"prefect.deployment.{mine}"])
    async with sub:
        await asyncio.wait_for(sub.connected_event.wait(), PATIENCE)
        run_ids = {}
        for deployment_id in (other, mine):
            response = await prefect_ahttp.post(
                f"/deployments/{deployment_id}/create_flow_run",
                json={"idempotency_key": str(uuid.uuid4())},
            )
            response.raise_for_status()
            assert response.json()["state"]["type"] == "SCHEDULED"
            run_ids[deployment_id] = response.json()["id"]
        await asyncio.wait_for(got_one.wait(), PATIENCE)
        # Give the other deployment's event time to arrive, were it (wrongly) let through.
        await asyncio.sleep(2)
    assert [e["resource"]["prefect.resource.id"] for e in seen] == [
        f"prefect.flow-run.{run_ids[mine]}"
    ]
    assert f"prefect.deployment.{mine}" in {r["prefect.resource.id"] for r in seen[0]["related"]}
    # The server itself narrowed the stream (any_resource), not just the client.
    assert sub.received == 1
