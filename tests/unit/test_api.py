"""agent.api with httpx.MockTransport: exact requests, retries, error classes, tolerant parsing."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agent import __version__
from agent.api import (
    ApiError,
    ApiUnavailable,
    CredentialsRefused,
    MalformedResponse,
    PrefectApiError,
    PrefectClient,
)
from agent.http import API_VERSION, retry_after_seconds
from agent.schemas import FlowRun, OrchestrationResult, SetStateStatus, State, StateType
from tests.integration.prefect_server import StaticApiConfig
from tests.unit.test_schemas import ABORT, ACCEPT, DEPLOYMENT, FLOW_RUN, JSON

BASE = "http://prefect.test:4200/api"
RUN_ID = UUID(FLOW_RUN["id"])
DEP_ID = UUID(DEPLOYMENT["id"])


class Server:
    """Scripted replies (a Response, an exception or a callable), the last one repeating."""

    def __init__(self, *replies: Any) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []
        self.sleeps: list[float] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if isinstance(reply, Exception):
            raise reply
        if callable(reply):
            return reply(request)  # type: ignore[no-any-return]
        assert isinstance(reply, httpx.Response)
        return reply

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def client(self, config: StaticApiConfig | None = None, **kwargs: Any) -> PrefectClient:
        kwargs.setdefault("sleep", self.sleep)
        return PrefectClient(
            config or StaticApiConfig(BASE), transport=httpx.MockTransport(self.handle), **kwargs
        )

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]

    def body(self, index: int = -1) -> Any:
        return json.loads(self.requests[index].content)


def ok(data: Any, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=data)


def raw(status: int, text: str, **headers: str) -> httpx.Response:
    return httpx.Response(status, text=text, headers=headers)


# -- headers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "auth_string", "authorization"),
    [
        ("pnu_secret", None, "Bearer pnu_secret"),
        (None, "admin:pass", "Basic " + base64.b64encode(b"admin:pass").decode()),
        ("pnu_secret", "admin:pass", "Basic " + base64.b64encode(b"admin:pass").decode()),
        (None, None, None),
        ("", "", None),
    ],
)
async def test_headers(key: str | None, auth_string: str | None, authorization: str | None) -> None:
    server = Server(ok(True))
    async with server.client(StaticApiConfig(BASE, key=key, auth_string=auth_string)) as client:
        await client.health()
        assert client.auth_headers() == ({"Authorization": authorization} if authorization else {})
    request = server.last
    assert request.headers.get("Authorization") == authorization
    assert request.headers["X-PREFECT-API-VERSION"] == API_VERSION == "0.8.4"
    assert request.headers["User-Agent"] == f"runner-agent/{__version__}"
    assert (request.method, str(request.url)) == ("GET", f"{BASE}/health")


async def test_base_url_with_trailing_slash() -> None:
    server = Server(ok(True))
    async with server.client(StaticApiConfig(BASE + "/")) as client:
        await client.health()
    assert str(server.last.url) == f"{BASE}/health"


# -- every endpoint: exact request, parsed answer -----------------------------------------------


async def test_upsert_flow() -> None:
    flow_id = uuid4()
    server = Server(ok({"id": str(flow_id), "name": "etl", "created": "2026-01-01T00:00Z"}, 201))
    async with server.client() as client:
        assert await client.upsert_flow("etl") == flow_id
    assert (server.last.method, str(server.last.url)) == ("POST", f"{BASE}/flows/")
    assert server.body() == {"name": "etl"}
    assert server.last.headers["content-type"] == "application/json"


async def test_upsert_and_update_deployment() -> None:
    body = {
        "name": "d",
        "flow_id": str(uuid4()),
        "schedules": [{"schedule": {"cron": "0 1 * * *", "timezone": "UTC"}, "active": True}],
    }
    server = Server(ok(DEPLOYMENT, 201), httpx.Response(204))
    async with server.client() as client:
        assert await client.upsert_deployment(body) == DEP_ID
        await client.update_deployment(DEP_ID, {"paused": True})
    assert (server.requests[0].method, str(server.requests[0].url)) == (
        "POST",
        f"{BASE}/deployments/",
    )
    assert server.body(0) == body
    assert (server.last.method, str(server.last.url)) == ("PATCH", f"{BASE}/deployments/{DEP_ID}")
    assert server.body() == {"paused": True}


async def test_read_deployment_and_filter() -> None:
    server = Server(ok(DEPLOYMENT), ok([DEPLOYMENT]))
    async with server.client() as client:
        deployment = await client.read_deployment(DEP_ID)
        found = await client.filter_deployments({"deployments": {"id": {"any_": [str(DEP_ID)]}}})
    assert deployment.id == DEP_ID and deployment.name == "d"
    assert [d.id for d in found] == [DEP_ID]
    assert (server.requests[0].method, str(server.requests[0].url)) == (
        "GET",
        f"{BASE}/deployments/{DEP_ID}",
    )
    assert (server.last.method, str(server.last.url)) == ("POST", f"{BASE}/deployments/filter")
    assert server.body() == {"deployments": {"id": {"any_": [str(DEP_ID)]}}}


async def test_read_deployment_by_name_quotes_and_maps_404_to_none() -> None:
    server = Server(ok(DEPLOYMENT), ok({"detail": "Deployment not found"}, 404))
    async with server.client() as client:
        assert await client.read_deployment_by_name("my flow", "a/b") == DEPLOYMENT
        assert await client.read_deployment_by_name("f", "gone") is None
    assert server.requests[0].url.raw_path == b"/api/deployments/name/my%20flow/a%2Fb"
    assert len(server.requests) == 2  # the 404 was not retried


async def test_get_scheduled_flow_runs() -> None:
    other = uuid4()
    server = Server(ok([FLOW_RUN]))
    before = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    async with server.client() as client:
        runs = await client.get_scheduled_flow_runs([DEP_ID, other], before, 3)
        await client.get_scheduled_flow_runs([DEP_ID], before.replace(tzinfo=None), 1)
    assert [r.id for r in runs] == [RUN_ID]
    assert str(server.requests[0].url) == f"{BASE}/deployments/get_scheduled_flow_runs"
    assert server.body(0) == {
        "deployment_ids": [str(DEP_ID), str(other)],
        "scheduled_before": "2026-01-02T03:04:05+00:00",
        "limit": 3,
    }
    assert server.body(1)["scheduled_before"] == "2026-01-02T03:04:05+00:00"  # naive = UTC


async def test_create_read_and_filter_flow_runs() -> None:
    server = Server(ok(FLOW_RUN, 201), ok(FLOW_RUN), ok([FLOW_RUN, FLOW_RUN]))
    async with server.client() as client:
        created = await client.create_flow_run(
            DEP_ID, state={"type": "SCHEDULED"}, parameters={"n": 1}, tags=["x"], name="r"
        )
        read = await client.read_flow_run(RUN_ID)
        listed = await client.filter_flow_runs(
            {"flow_runs": {"state": {"type": {"any_": ["RUNNING"]}}}}
        )
    assert created == read and created.id == RUN_ID and len(listed) == 2
    assert str(server.requests[0].url) == f"{BASE}/deployments/{DEP_ID}/create_flow_run"
    assert server.body(0) == {
        "state": {"type": "SCHEDULED"},
        "parameters": {"n": 1},
        "tags": ["x"],
        "name": "r",
    }
    assert (server.requests[1].method, str(server.requests[1].url)) == (
        "GET",
        f"{BASE}/flow_runs/{RUN_ID}",
    )
    assert (server.last.method, str(server.last.url)) == ("POST", f"{BASE}/flow_runs/filter")
    assert server.body() == {"flow_runs": {"state": {"type": {"any_": ["RUNNING"]}}}}


async def test_set_flow_run_state_body_and_transition_ids() -> None:
    server = Server(ok(ACCEPT, 201), ok(ABORT), ok(ACCEPT))
    state = {"type": "PENDING", "name": "Pending", "message": "claimed by a1"}
    async with server.client() as client:
        first = await client.set_flow_run_state(RUN_ID, state, force=False)
        second = await client.set_flow_run_state(RUN_ID, state, force=False)
        given = {**state, "state_details": {"transition_id": "0" * 32, "x": 1}}
        await client.set_flow_run_state(RUN_ID, given, force=True)
    assert first.status is SetStateStatus.ACCEPT and first.state is not None
    assert first.state.type is StateType.PENDING
    assert second.status is SetStateStatus.ABORT and "PENDING" in (second.details.reason or "")
    assert str(server.last.url) == f"{BASE}/flow_runs/{RUN_ID}/set_state"
    bodies = [server.body(i) for i in range(3)]
    ids = [UUID(b["state"]["state_details"]["transition_id"]) for b in bodies[:2]]
    assert ids[0] != ids[1] and all(i.version == 4 for i in ids)
    assert bodies[0] == {
        "state": {**state, "state_details": {"transition_id": str(ids[0])}},
        "force": False,
    }
    assert bodies[2] == {"state": given, "force": True}
    assert "state_details" not in state  # the caller's dict is left alone


async def test_transition_id_is_kept_across_retries() -> None:
    server = Server(raw(503, "busy"), httpx.ConnectError("reset"), ok(ACCEPT))
    async with server.client() as client:
        await client.set_flow_run_state(RUN_ID, {"type": "PENDING"}, force=False)
    ids = {server.body(i)["state"]["state_details"]["transition_id"] for i in range(3)}
    assert len(server.requests) == 3 and len(ids) == 1


async def test_read_flow_run_states() -> None:
    states: list[dict[str, Any]] = [
        {
            "id": str(uuid4()),
            "type": t,
            "name": t.title(),
            "timestamp": f"2026-01-01T00:00:0{i}Z",
            "message": None,
            "state_details": {},
        }
        for i, t in enumerate(["SCHEDULED", "PENDING", "RUNNING", "COMPLETED"])
    ]
    server = Server(ok(states))
    async with server.client() as client:
        read = await client.read_flow_run_states(RUN_ID)
    assert [s.type for s in read] == [StateType(s["type"]) for s in states]
    assert read[-1].type.is_final
    assert (server.last.method, server.last.url.path) == ("GET", "/api/flow_run_states/")
    assert dict(server.last.url.params) == {"flow_run_id": str(RUN_ID)}


async def test_create_logs_and_emit_events() -> None:
    server = Server(httpx.Response(201), httpx.Response(204))
    logs = [
        {
            "name": "runner-agent",
            "level": 20,
            "message": "m",
            "timestamp": "2026-01-01T00:00:00+00:00",
            "flow_run_id": str(RUN_ID),
        }
    ]
    events = [
        {
            "id": str(uuid4()),
            "occurred": "2026-01-01T00:00:00+00:00",
            "event": "e",
            "resource": {"prefect.resource.id": "prefect.runner.a"},
            "related": [],
            "payload": {},
        }
    ]
    async with server.client() as client:
        await client.create_logs(logs)
        await client.emit_events(events)
        await client.create_logs([])
        await client.emit_events([])
    assert [(r.method, str(r.url)) for r in server.requests] == [
        ("POST", f"{BASE}/logs/"),
        ("POST", f"{BASE}/events"),
    ]
    assert (server.body(0), server.body(1)) == (logs, events)


async def test_health_false_is_unavailable() -> None:
    async with Server(ok(False)).client() as client:
        with pytest.raises(ApiUnavailable, match="GET /health"):
            await client.health()


# -- retries -------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
async def test_retryable_statuses_are_retried(status: int) -> None:
    server = Server(raw(status, "try later"), raw(status, "try later"), ok(FLOW_RUN))
    async with server.client(backoff_base=0.5, backoff_max=10.0) as client:
        run = await client.read_flow_run(RUN_ID)
    assert run.id == RUN_ID and len(server.requests) == 3
    assert len(server.sleeps) == 2
    assert 0 <= server.sleeps[0] <= 0.5 and 0 <= server.sleeps[1] <= 1.0


@pytest.mark.parametrize(
    "error",
    [
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
        httpx.RemoteProtocolError("peer closed connection"),
    ],
)
async def test_transport_errors_are_retried_then_unavailable(error: Exception) -> None:
    server = Server(error)
    async with server.client(max_attempts=4) as client:
        with pytest.raises(ApiUnavailable) as caught:
            await client.read_flow_run(RUN_ID)
    assert len(server.requests) == 4 and len(server.sleeps) == 3
    message = str(caught.value)
    assert f"GET /flow_runs/{RUN_ID} failed after 4 attempt(s)" in message
    assert type(error).__name__ in message and str(error) in message


async def test_last_http_error_is_named() -> None:
    server = Server(raw(502, "<html><body>Bad Gateway</body></html>"))
    async with server.client(max_attempts=2) as client:
        with pytest.raises(ApiUnavailable, match=r"POST /flows/ .*HTTP 502: <html><body>Bad"):
            await client.upsert_flow("f")


class SlowBody(httpx.AsyncByteStream):
    """Sends half a body, then the read times out."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'{"id": "c8dbbcbc-6aca'
        raise httpx.ReadTimeout("timed out mid-body")


async def test_timeout_mid_body_is_retried() -> None:
    server = Server(lambda request: httpx.Response(200, stream=SlowBody()), ok(FLOW_RUN))
    async with server.client() as client:
        assert (await client.read_flow_run(RUN_ID)).id == RUN_ID
    assert len(server.requests) == 2 and len(server.sleeps) == 1


class Ceiling:
    """A Random whose uniform() returns the upper bound, to see the backoff caps."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_backoff_grows_exponentially_to_the_cap() -> None:
    client = Server(ok(True)).client(backoff_base=0.5, backoff_max=10.0, rng=Ceiling())
    assert [client.backoff(n, None) for n in range(1, 8)] == [0.5, 1, 2, 4, 8, 10, 10]
    jittered = Server(ok(True)).client(backoff_base=0.5, backoff_max=10.0)
    delays = [jittered.backoff(4, None) for _ in range(200)]
    assert all(2 <= d <= 4 for d in delays) and len(set(delays)) > 100  # equal jitter


@pytest.mark.parametrize(
    ("header", "expected"),
    [("7", 7.0), ("0", 0.0), ("1.5", 1.5), ("99999", 60.0), ("-3", 0.0)],
)
async def test_retry_after_seconds_is_honoured_and_capped(header: str, expected: float) -> None:
    server = Server(raw(429, "slow down", **{"Retry-After": header}), ok(True))
    async with server.client(retry_after_max=60.0) as client:
        await client.health()
    assert server.sleeps == [expected]


async def test_retry_after_http_date() -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    server = Server(
        raw(503, "maintenance", **{"Retry-After": format_datetime(when, usegmt=True)}), ok(True)
    )
    async with server.client() as client:
        await client.health()
    assert 27 <= server.sleeps[0] <= 30


def test_retry_after_parsing() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert retry_after_seconds("Thu, 01 Jan 2026 00:00:10 GMT", now) == 10
    assert retry_after_seconds("Wed, 31 Dec 2025 00:00:00 GMT", now) == 0
    for junk in (None, "", "  ", "soon", "nan", "inf", "Thu, 99 Foo"):
        assert retry_after_seconds(junk, now) is None


async def test_unreadable_retry_after_falls_back_to_backoff() -> None:
    server = Server(raw(503, "x", **{"Retry-After": "soon"}), ok(True))
    async with server.client(backoff_base=0.5) as client:
        await client.health()
    assert len(server.sleeps) == 1 and 0 <= server.sleeps[0] <= 0.5


# -- errors that must not be retried -------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
async def test_refused_credentials_fail_fast_without_leaking(status: int) -> None:
    config = StaticApiConfig(
        "http://user:hunter2@prefect.test/api", key="pnu_topsecret", auth_string="admin:s3cret"
    )
    server = Server(ok({"detail": "Unauthorized"}, status))
    async with server.client(config) as client:
        with pytest.raises(CredentialsRefused) as caught:
            await client.read_flow_run(RUN_ID)
    assert len(server.requests) == 1 and server.sleeps == []
    message = str(caught.value)
    assert "credentials were refused by http://prefect.test/api" in message
    assert str(status) in message
    token = base64.b64encode(b"admin:s3cret").decode()
    for secret in ("pnu_topsecret", "s3cret", "hunter2", token):
        assert secret not in message
    assert isinstance(caught.value, PrefectApiError)


@pytest.mark.parametrize(
    ("response", "status", "detail"),
    [
        (ok({"detail": "Flow run not found"}, 404), 404, "Flow run not found"),
        (
            ok({"detail": [{"loc": ["body", "limit"], "msg": "bad"}]}, 422),
            422,
            '[{"loc": ["body", "limit"], "msg": "bad"}]',
        ),
        (raw(409, "conflict!"), 409, "conflict!"),
        (raw(400, ""), 400, "Bad Request"),
    ],
)
async def test_other_4xx_are_api_errors(response: httpx.Response, status: int, detail: str) -> None:
    server = Server(response)
    async with server.client() as client:
        with pytest.raises(ApiError) as caught:
            await client.read_flow_run(RUN_ID)
    assert (caught.value.status, caught.value.detail) == (status, detail)
    assert f"GET /flow_runs/{RUN_ID}" in str(caught.value)
    assert len(server.requests) == 1 and server.sleeps == []


# -- malformed bodies ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "problem"),
    [
        (raw(200, '{"id": '), "not JSON"),
        (raw(200, "<!DOCTYPE html><html><title>Login</title></html>"), "not JSON"),
        (ok({"id": "not-a-uuid", "name": "x"}), "not a FlowRun: id"),
        (ok({"name": "no id"}), "not a FlowRun: id: Field required"),
        (ok([FLOW_RUN]), "not a FlowRun"),
        (ok({**FLOW_RUN, "state": {"type": "EXPLODED"}}), "not a FlowRun: state.type"),
        (httpx.Response(200, content=b"\xff\xfe garbage"), "not JSON"),
    ],
)
async def test_malformed_single_bodies(response: httpx.Response, problem: str) -> None:
    async with Server(response).client() as client:
        with pytest.raises(MalformedResponse) as caught:
            await client.read_flow_run(RUN_ID)
    error = caught.value
    assert (error.method, error.path, error.status) == ("GET", f"/flow_runs/{RUN_ID}", 200)
    assert problem in str(error)
    assert str(error).startswith(f"GET /flow_runs/{RUN_ID} answered HTTP 200")


async def test_malformed_excerpt_is_truncated() -> None:
    async with Server(raw(200, "<html>" + "x" * 100_000)).client() as client:
        with pytest.raises(MalformedResponse) as caught:
            await client.read_flow_run(RUN_ID)
    assert len(str(caught.value)) < 400 and "(100006 chars)" in str(caught.value)


async def test_undecodable_content_encoding() -> None:
    response = httpx.Response(
        200, stream=httpx.ByteStream(b"not gzip"), headers={"Content-Encoding": "gzip"}
    )
    async with Server(response).client() as client:
        with pytest.raises(MalformedResponse, match="undecodable"):
            await client.read_flow_run(RUN_ID)


async def test_orchestration_result_missing_status() -> None:
    async with Server(ok({"details": {}, "state": None})).client() as client:
        with pytest.raises(MalformedResponse, match="not a OrchestrationResult: status"):
            await client.set_flow_run_state(RUN_ID, {"type": "PENDING"}, force=False)


async def test_list_with_bad_items_keeps_the_good_ones(caplog: pytest.LogCaptureFixture) -> None:
    second = {**copy.deepcopy(FLOW_RUN), "id": str(uuid4())}
    bad = [{"id": 5}, "a string", {**FLOW_RUN, "id": "x" * 5000}, None]
    server = Server(ok([FLOW_RUN, *bad, second]))
    with caplog.at_level(logging.WARNING, logger="agent.api"):
        async with server.client() as client:
            runs = await client.filter_flow_runs({})
    assert [str(r.id) for r in runs] == [FLOW_RUN["id"], second["id"]]
    records = [r for r in caplog.records if r.name == "agent.api"]
    assert len(records) == 4
    assert "skipping malformed FlowRun #1" in records[0].getMessage()
    assert "POST /flow_runs/filter" in records[0].getMessage()
    assert all(len(r.getMessage()) < 600 for r in records)  # huge items are cut


@pytest.mark.parametrize("body", ['{"runs": []}', '"[]"', "null", "3"])
async def test_list_endpoint_with_a_non_list(body: str) -> None:
    async with Server(raw(200, body)).client() as client:
        with pytest.raises(MalformedResponse, match="expected a list of FlowRun"):
            await client.get_scheduled_flow_runs([DEP_ID], datetime.now(UTC), 1)


async def test_upsert_flow_without_id() -> None:
    async with Server(ok({"name": "etl"}, 201)).client() as client:
        with pytest.raises(MalformedResponse, match=r"POST /flows/ answered HTTP 201"):
            await client.upsert_flow("etl")


def test_max_attempts_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        PrefectClient(StaticApiConfig(BASE), max_attempts=0)


# -- fuzzing: parsed objects or a PrefectApiError, nothing else -----------------------------------

FIELD_VALUES = JSON | st.integers(0, 300_000).map(lambda n: "x" * n)


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(base)
    for key in draw(st.lists(st.sampled_from(sorted(base)), max_size=3)):
        if draw(st.booleans()):
            body[key] = draw(FIELD_VALUES)
        else:
            body.pop(key, None)
    return body


STATE = FLOW_RUN["state"]
SHAPES: dict[str, st.SearchStrategy[Any]] = {
    "read_flow_run": mutated(FLOW_RUN),
    "filter_flow_runs": st.lists(mutated(FLOW_RUN), max_size=4),
    "get_scheduled_flow_runs": st.lists(mutated(FLOW_RUN) | JSON, max_size=4),
    "set_flow_run_state": mutated(ACCEPT) | mutated(ABORT),
    "read_flow_run_states": st.lists(mutated(STATE), max_size=4),
    "upsert_flow": mutated({"id": FLOW_RUN["flow_id"], "name": "f"}),
    "read_deployment_by_name": mutated(DEPLOYMENT),
    "health": st.sampled_from([True, False, "true", None]),
}
OTHER_BODIES = st.one_of(
    JSON.map(json.dumps),
    st.text(max_size=200),
    st.binary(max_size=200),
    st.sampled_from(["<html><body><h1>502 Bad Gateway</h1></body></html>", '{"id": ', "[" * 5000]),
)
STATUSES = st.sampled_from([200] * 12 + [201, 204, 400, 401, 404, 408, 422, 429, 500, 503])


def fuzz_reply(kind: str, status: int, body: Any) -> Any:
    if kind == "timeout":
        return httpx.ReadTimeout("timed out")
    if kind == "mid-body":
        return lambda request: httpx.Response(status, stream=SlowBody())
    content = body.encode() if isinstance(body, str) else body
    return httpx.Response(status, content=content)


CALLS: dict[str, Any] = {
    "read_flow_run": (lambda c: c.read_flow_run(RUN_ID), FlowRun),
    "filter_flow_runs": (lambda c: c.filter_flow_runs({}), list),
    "get_scheduled_flow_runs": (
        lambda c: c.get_scheduled_flow_runs([DEP_ID], datetime.now(UTC), 2),
        list,
    ),
    "set_flow_run_state": (
        lambda c: c.set_flow_run_state(RUN_ID, {"type": "PENDING"}, force=False),
        OrchestrationResult,
    ),
    "read_flow_run_states": (lambda c: c.read_flow_run_states(RUN_ID), list),
    "upsert_flow": (lambda c: c.upsert_flow("f"), UUID),
    "read_deployment_by_name": (lambda c: c.read_deployment_by_name("f", "d"), dict | None),
    "health": (lambda c: c.health(), type(None)),
}
ITEM_TYPES = {
    "filter_flow_runs": FlowRun,
    "get_scheduled_flow_runs": FlowRun,
    "read_flow_run_states": State,
}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    call=st.sampled_from(sorted(CALLS)),
    kind=st.sampled_from(["body"] * 8 + ["timeout", "mid-body"]),
    status=STATUSES,
    data=st.data(),
)
def test_fuzzed_responses_parse_or_raise_prefect_api_error(
    call: str, kind: str, status: int, data: st.DataObject
) -> None:
    invoke, expected = CALLS[call]
    body = data.draw(SHAPES[call].map(json.dumps) | OTHER_BODIES, label="body")
    server = Server(fuzz_reply(kind, status, body))

    async def run() -> Any:
        async with server.client(max_attempts=2) as client:
            return await invoke(client)

    logging.getLogger("agent.api").disabled = True  # thousands of skipped items: keep quiet
    try:
        result = asyncio.run(run())
    except PrefectApiError as exc:
        event(f"{call}: {type(exc).__name__}")
        return
    finally:
        logging.getLogger("agent.api").disabled = False
    event(f"{call}: parsed")
    assert isinstance(result, expected)
    if call in ITEM_TYPES:
        assert all(isinstance(item, ITEM_TYPES[call]) for item in result)
