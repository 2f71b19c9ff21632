"""agent.api against the session's real Prefect 3.8 server: the shapes it sends are accepted."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import httpx
import pytest

from agent.api import ApiError, ApiUnavailable, CredentialsRefused, PrefectClient
from agent.schemas import SetStateStatus, StateType
from tests.integration.prefect_server import (
    PrefectServer,
    StaticApiConfig,
    make_flow_dir,
    prefect_venv,
)
from tests.integration.server_http import AsyncRetryingTransport

pytestmark = pytest.mark.integration

T = TypeVar("T")


def client_for(server: PrefectServer, **kwargs: Any) -> PrefectClient:
    return PrefectClient(StaticApiConfig(server.api_url), **kwargs)


@pytest.fixture
async def client(prefect_server: PrefectServer) -> AsyncIterator[PrefectClient]:
    """The agent's client, over the tests' retrying transport: the tests here check the shapes
    the agent sends, and must not fail because the busy server answered 503 once too often."""
    async with client_for(prefect_server, transport=AsyncRetryingTransport()) as c:
        yield c


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def eventually(
    probe: Callable[[], Awaitable[T | None]], within: float = 20.0, step: float = 0.5
) -> T:
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(step)


async def new_deployment(client: PrefectClient, **extra: Any) -> UUID:
    flow_id = await client.upsert_flow(unique("flow"))
    body = {"name": unique("dep"), "flow_id": str(flow_id), **extra}
    return await client.upsert_deployment(body)


def pending(message: str) -> dict[str, Any]:
    return {"type": "PENDING", "name": "Pending", "message": message}


async def test_health(client: PrefectClient) -> None:
    await client.health()


async def test_upsert_flow_returns_the_same_id_twice(client: PrefectClient) -> None:
    name = unique("flow")
    first = await client.upsert_flow(name)
    assert await client.upsert_flow(name) == first
    assert await client.upsert_flow(unique("flow")) != first


async def test_deployment_upsert_update_and_read(client: PrefectClient, tmp_path: Path) -> None:
    flow_name = unique("flow")
    flow_id = await client.upsert_flow(flow_name)
    body = {
        "name": "nightly",
        "flow_id": str(flow_id),
        "paused": False,
        "path": str(tmp_path),
        "entrypoint": "flow.py:main",
        "parameters": {"n": 3, "who": "x"},
        "tags": ["a", "b"],
        "description": "made by test_api_live",
        "enforce_parameter_schema": False,
        "schedules": [
            {"schedule": {"cron": "30 2 * * *", "timezone": "Europe/Berlin"}, "active": True},
            {"schedule": {"interval": 3600.0}, "active": True},
        ],
    }
    deployment_id = await client.upsert_deployment(body)
    assert await client.upsert_deployment(body) == deployment_id  # upsert on flow + name

    read = await client.read_deployment(deployment_id)
    assert (read.id, read.name, read.flow_id) == (deployment_id, "nightly", flow_id)
    assert (read.path, read.entrypoint) == (str(tmp_path), "flow.py:main")
    assert read.parameters == {"n": 3, "who": "x"}
    assert sorted(read.tags) == ["a", "b"]
    assert read.description == "made by test_api_live"
    assert read.paused is False
    specs = sorted((s["schedule"] for s in read.schedules), key=lambda s: "cron" in s)
    assert specs[0]["interval"] == 3600.0
    assert (specs[1]["cron"], specs[1]["timezone"]) == ("30 2 * * *", "Europe/Berlin")

    raw = await client.read_deployment_by_name(flow_name, "nightly")
    assert raw is not None and UUID(raw["id"]) == deployment_id
    assert await client.read_deployment_by_name(flow_name, "no such deployment") is None

    await client.update_deployment(deployment_id, {"paused": True})
    assert (await client.read_deployment(deployment_id)).paused is True
    found = await client.filter_deployments({"deployments": {"id": {"any_": [str(deployment_id)]}}})
    assert [d.id for d in found] == [deployment_id]


async def test_claim_race_and_crash_report(
    prefect_server: PrefectServer, client: PrefectClient, prefect_ahttp: httpx.AsyncClient
) -> None:
    deployment_id = await new_deployment(client)
    # Not client.create_flow_run: it sends no idempotency key, so a retried 503 that had made
    # the run would leave a second one due, and the scheduled-runs query below would see both.
    created = await prefect_ahttp.post(
        f"/deployments/{deployment_id}/create_flow_run",
        json={"tags": ["t1"], "idempotency_key": str(uuid.uuid4())},
    )
    created.raise_for_status()
    run = await client.read_flow_run(UUID(created.json()["id"]))
    assert run.state is not None and run.state.type is StateType.SCHEDULED

    due = await client.get_scheduled_flow_runs(
        [deployment_id], scheduled_before=datetime.now(UTC) + timedelta(seconds=10), limit=5
    )
    assert [r.id for r in due] == [run.id]
    none_due = await client.get_scheduled_flow_runs(
        [deployment_id], scheduled_before=datetime.now(UTC) - timedelta(hours=1), limit=5
    )
    assert none_due == []

    first = await client.set_flow_run_state(run.id, pending("claimed by A"), force=False)
    assert first.status is SetStateStatus.ACCEPT
    assert first.state is not None and first.state.type is StateType.PENDING

    async with client_for(prefect_server, transport=AsyncRetryingTransport()) as other:
        second = await other.set_flow_run_state(run.id, pending("claimed by B"), force=False)
    # Observed on 3.8.8: ABORT, "This run is in a PENDING state and cannot transition to a
    # PENDING state." (recorded in agent/api.py's docstring).
    assert second.status is SetStateStatus.ABORT, second
    assert "PENDING" in (second.details.reason or "")

    assert (
        await client.get_scheduled_flow_runs(
            [deployment_id], scheduled_before=datetime.now(UTC) + timedelta(seconds=10), limit=5
        )
        == []
    )

    crashed = {"type": "CRASHED", "name": "Crashed", "message": "Process exited with status 3"}
    result = await client.set_flow_run_state(run.id, crashed, force=True)
    assert result.status is SetStateStatus.ACCEPT

    current = await client.read_flow_run(run.id)
    assert current.state is not None and current.state.type is StateType.CRASHED
    assert current.state.type.is_final
    assert current.state.message == "Process exited with status 3"
    assert current.tags == ["t1"] and current.deployment_id == deployment_id

    history = await client.read_flow_run_states(run.id)
    ordered = sorted(history, key=lambda s: s.timestamp or datetime.min.replace(tzinfo=UTC))
    assert [s.type for s in ordered] == [StateType.SCHEDULED, StateType.PENDING, StateType.CRASHED]
    assert ordered[1].message == "claimed by A"
    transition_ids = {s.state_details.get("transition_id") for s in ordered[1:]}
    assert len(transition_ids) == 2 and None not in transition_ids

    runs = await client.filter_flow_runs(
        {"flow_runs": {"id": {"any_": [str(run.id)]}}, "limit": 10}
    )
    assert [r.id for r in runs] == [run.id]


async def test_unknown_run_is_a_404_api_error(client: PrefectClient) -> None:
    with pytest.raises(ApiError) as caught:
        await client.read_flow_run(uuid.uuid4())
    assert caught.value.status == 404


async def test_emitted_event_can_be_read_back(
    client: PrefectClient, prefect_ahttp: httpx.AsyncClient
) -> None:
    name = unique("runner-agent.test")
    event = {
        "id": str(uuid.uuid4()),
        "occurred": datetime.now(UTC).isoformat(),
        "event": name,
        "resource": {"prefect.resource.id": "prefect.runner.test-agent"},
        "related": [],
        "payload": {"host": "h"},
    }
    await client.emit_events([event])

    async def probe() -> list[dict[str, Any]] | None:
        response = await prefect_ahttp.post(
            "/events/filter", json={"filter": {"event": {"name": [name]}}}
        )
        response.raise_for_status()
        return response.json()["events"] or None

    events = await eventually(probe)
    assert [(e["id"], e["payload"]) for e in events] == [(event["id"], {"host": "h"})]


async def test_logs_are_stored(client: PrefectClient, prefect_ahttp: httpx.AsyncClient) -> None:
    deployment_id = await new_deployment(client)
    run = await client.create_flow_run(deployment_id)  # a duplicate made by a retry is harmless
    message = unique("agent says")
    await client.create_logs(
        [
            {
                "name": "runner-agent",
                "level": 20,
                "message": message,
                "timestamp": datetime.now(UTC).isoformat(),
                "flow_run_id": str(run.id),
            }
        ]
    )
    response = await prefect_ahttp.post(
        "/logs/filter", json={"logs": {"flow_run_id": {"any_": [str(run.id)]}}}
    )
    response.raise_for_status()
    assert [log["message"] for log in response.json()] == [message]


async def test_a_real_flow_runs_to_completed(
    prefect_server: PrefectServer, client: PrefectClient, tmp_path: Path
) -> None:
    """The fixture's interpreter runs a flow end to end, launched by hand as FACTS.md says."""
    flow_dir = make_flow_dir(
        tmp_path,
        """
        from prefect import flow

        @flow
        def hello(name: str = "world") -> str:
            print(f"hello {name}")
            return name
    """,
    )
    deployment_id = await new_deployment(
        client, path=str(flow_dir), entrypoint="flow.py:hello", parameters={"name": "live"}
    )
    run = await client.create_flow_run(deployment_id)
    claim = await client.set_flow_run_state(run.id, pending("by hand"), force=False)
    assert claim.status is SetStateStatus.ACCEPT

    env = prefect_server.env() | {"PREFECT__FLOW_RUN_ID": str(run.id)}
    proc = await asyncio.create_subprocess_exec(
        prefect_server.python,
        "-m",
        "prefect.engine",
        cwd=flow_dir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, output.decode(errors="replace")[-2000:]
    final = await client.read_flow_run(run.id)
    assert final.state is not None and final.state.type is StateType.COMPLETED, final.state


async def test_server_restart_keeps_data_and_client_reports_outage(
    prefect_server: PrefectServer, client: PrefectClient
) -> None:
    flow_name = unique("flow")
    flow_id = await client.upsert_flow(flow_name)
    prefect_server.stop()
    try:
        # No retrying transport under this one: it must see the outage as it is.
        async with client_for(prefect_server, max_attempts=2, backoff_base=0.01) as down:
            with pytest.raises(ApiUnavailable, match=r"GET /health failed after 2 attempt"):
                await down.health()
    finally:
        prefect_server.start()
    await client.health()
    assert await client.upsert_flow(flow_name) == flow_id  # same port, same database


async def test_basic_auth_against_a_server_with_an_auth_string(tmp_path: Path) -> None:
    """A second, self-hosted-with-auth server: the right auth_string works, others are refused."""
    server = PrefectServer(
        prefect_venv(os.environ),
        tmp_path / "home",
        extra_env={"PREFECT_SERVER_API_AUTH_STRING": "admin:s3cret"},
    )
    await asyncio.to_thread(server.start)
    try:
        config = StaticApiConfig(server.api_url, auth_string="admin:s3cret", key="ignored")
        async with PrefectClient(config, transport=AsyncRetryingTransport()) as good:
            await good.health()
            flow_id = await good.upsert_flow("guarded")
            assert await good.upsert_flow("guarded") == flow_id
        for wrong in (
            StaticApiConfig(server.api_url, auth_string="admin:wrong"),
            StaticApiConfig(server.api_url, key="pnu_cloud_key"),
            StaticApiConfig(server.api_url),
        ):
            async with PrefectClient(wrong, max_attempts=3) as bad:
                with pytest.raises(CredentialsRefused) as caught:
                    await bad.upsert_flow("guarded")
            message = str(caught.value)
            assert f"credentials were refused by {server.api_url}" in message
            assert "HTTP 401" in message and "wrong" not in message and "pnu_" not in message
    finally:
        await asyncio.to_thread(server.stop)
