"""The tests' retrying HTTP to the Prefect server (tests/integration/server_http.py), on fakes."""

from __future__ import annotations

import http.server
import json
import random
import threading

import httpx
import pytest

from tests.integration.server_http import (
    AsyncRetryingTransport,
    RetryingTransport,
    RetryPolicy,
    server_client,
)

POLICY = RetryPolicy(attempts=4, base=0.25, cap=1.0)


class Script:
    """Answers each request with the next scripted status, or raises the scripted error."""

    def __init__(self, *answers: int | Exception) -> None:
        self.answers = list(answers)
        self.bodies: list[bytes] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(request.read())
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return httpx.Response(answer, json={"status": answer})


def sync_client(script: Script, waits: list[float]) -> httpx.Client:
    transport = RetryingTransport(
        httpx.MockTransport(script), policy=POLICY, sleep=waits.append, rng=random.Random(7)
    )
    return httpx.Client(base_url="http://prefect.test/api", transport=transport)


def test_transient_answers_are_retried_with_the_same_body() -> None:
    script = Script(503, httpx.ConnectError("refused"), 502, 201)
    waits: list[float] = []
    with sync_client(script, waits) as client:
        response = client.post("/deployments/", json={"name": "x"})
    assert response.status_code == 201
    assert [json.loads(b) for b in script.bodies] == [{"name": "x"}] * 4
    # Backoff doubles from `base`, capped, each wait between half and all of its step.
    steps = [0.25, 0.5, 1.0]
    assert len(waits) == 3
    assert all(step / 2 <= wait <= step for wait, step in zip(waits, steps, strict=True))


@pytest.mark.parametrize(
    "error",
    [
        httpx.ReadTimeout("slow"),
        httpx.ConnectError("refused"),
        httpx.ReadError("connection reset by peer"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
    ],
)
def test_transport_errors_are_retried(error: Exception) -> None:
    script = Script(error, 200)
    with sync_client(script, []) as client:
        assert client.get("/health").status_code == 200
    assert len(script.bodies) == 2


def test_the_bound_holds_and_the_last_answer_is_returned_as_it_is() -> None:
    script = Script(503, 503, 503, 503)
    waits: list[float] = []
    with sync_client(script, waits) as client:
        response = client.get("/health")
    assert response.status_code == 503
    assert (len(script.bodies), len(waits)) == (4, 3)


def test_the_last_transport_error_is_raised() -> None:
    script = Script(*[httpx.ConnectError("refused")] * 4)
    with sync_client(script, []) as client, pytest.raises(httpx.ConnectError):
        client.get("/health")
    assert len(script.bodies) == 4


@pytest.mark.parametrize("status", [200, 404, 409, 422, 500])
def test_other_answers_are_final(status: int) -> None:
    script = Script(status)
    waits: list[float] = []
    with sync_client(script, waits) as client:
        assert client.get("/flows/x").status_code == status
    assert waits == []


def test_errors_a_retry_cannot_fix_are_raised_at_once() -> None:
    script = Script(httpx.UnsupportedProtocol("ftp"))
    with sync_client(script, []) as client, pytest.raises(httpx.UnsupportedProtocol):
        client.get("/health")
    assert len(script.bodies) == 1


async def test_async_twin_retries_the_same_way() -> None:
    script = Script(503, httpx.ReadTimeout("slow"), 200)
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    transport = AsyncRetryingTransport(
        httpx.MockTransport(script), policy=POLICY, sleep=sleep, rng=random.Random(7)
    )
    async with httpx.AsyncClient(base_url="http://prefect.test/api", transport=transport) as c:
        response = await c.post("/flow_runs/", json={"idempotency_key": "k"})
    assert response.status_code == 200
    assert [json.loads(b) for b in script.bodies] == [{"idempotency_key": "k"}] * 3
    assert len(waits) == 2


def test_without_retry_every_answer_comes_as_it_is() -> None:
    """`retry=False` (outage tests): a 503 comes back at the first attempt, through a real
    socket; counting the requests the server saw needs no clock."""
    seen: list[str] = []

    class Busy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            del format, args

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Busy) as server:
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/api"
            with server_client(url, retry=False, timeout=30) as client:
                response = client.get("/health")
        finally:
            server.shutdown()
            thread.join()
    assert response.status_code == 503
    assert seen == ["/api/health"]
