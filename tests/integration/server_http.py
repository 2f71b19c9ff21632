"""HTTP to the test Prefect server that rides out its transient answers, as the agent does.

A SQLite-backed server answers 502/503/504 when it is busy (database locked), and on a loaded
machine a connection can be reset or a read can time out. Every helper in tests/ and bench/
that talks to the test server gets its client from here, so one bounded retry policy covers
them all: `server_client` and `async_server_client` for plain httpx clients, and
`AsyncRetryingTransport` to put under the agent's own `PrefectClient` where a test uses it as a
helper.

A transient answer may come after the server did the work (seen: a 503 whose run was created),
so every creation a test retries must be idempotent:
- `POST /deployments/{id}/create_flow_run` and `POST /flow_runs/` take an `idempotency_key`
  (the same key returns the run already made); callers pass a fresh one per intended run;
- `POST /flows/` and `POST /deployments/` are upserts (on the flow name, on flow and name);
- `POST /events` is keyed by each event's id.
A forced `set_state` retried after it was applied records the same state twice, which no test
reads as a second transition.

A test that must see an outage as it is (a stopped server) asks for `retry=False`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

log = logging.getLogger("tests.server_http")

RETRY_STATUSES = frozenset({502, 503, 504})
# Timeouts, resets, refused connections, a connection closed without an answer. Not errors a
# retry cannot fix (an unsupported scheme, a request httpx itself could not build).
RETRY_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)
REQUEST_TIMEOUT = 30.0


@dataclass(frozen=True)
class RetryPolicy:
    """At most `attempts` tries; exponential backoff from `base`, capped at `cap`, jittered.

    With the defaults the waits add up to at most 0.25+0.5+1+2+4*5 = 23.75 s: longer than a
    busy SQLite server's hiccup, short enough that a server that is really gone fails the test.
    """

    attempts: int = 10
    base: float = 0.25
    cap: float = 4.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after failed `attempt` (1-based): between half and all of the step."""
        step = min(self.cap, self.base * 2 ** (attempt - 1))
        return rng.uniform(step / 2, step)


def _transient(request: httpx.Request, attempt: int, policy: RetryPolicy, what: str) -> None:
    log.info(
        "%s %s: %s (attempt %d/%d); retrying",
        request.method,
        request.url,
        what,
        attempt,
        policy.attempts,
    )


class RetryingTransport(httpx.BaseTransport):
    """Retries a request on RETRY_STATUSES and RETRY_ERRORS, up to the policy's bound.

    After the last attempt the server's answer is returned (or the error raised) as it is.
    """

    def __init__(
        self,
        inner: httpx.BaseTransport | None = None,
        *,
        policy: RetryPolicy = RetryPolicy(),
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._inner = inner or httpx.HTTPTransport()
        self._policy = policy
        self._sleep = sleep
        self._rng = rng or random.Random()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        policy = self._policy
        for attempt in range(1, policy.attempts):
            try:
                response = self._inner.handle_request(request)
            except RETRY_ERRORS as exc:
                _transient(request, attempt, policy, f"{type(exc).__name__}: {exc}")
            else:
                if response.status_code not in RETRY_STATUSES:
                    return response
                response.close()
                _transient(request, attempt, policy, f"HTTP {response.status_code}")
            self._sleep(policy.delay(attempt, self._rng))
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()


class AsyncRetryingTransport(httpx.AsyncBaseTransport):
    """The asynchronous twin of `RetryingTransport`."""

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport | None = None,
        *,
        policy: RetryPolicy = RetryPolicy(),
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._inner = inner or httpx.AsyncHTTPTransport()
        self._policy = policy
        self._sleep = sleep
        self._rng = rng or random.Random()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        policy = self._policy
        for attempt in range(1, policy.attempts):
            try:
                response = await self._inner.handle_async_request(request)
            except RETRY_ERRORS as exc:
                _transient(request, attempt, policy, f"{type(exc).__name__}: {exc}")
            else:
                if response.status_code not in RETRY_STATUSES:
                    return response
                await response.aclose()
                _transient(request, attempt, policy, f"HTTP {response.status_code}")
            await self._sleep(policy.delay(attempt, self._rng))
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def server_client(
    api_url: str, *, retry: bool = True, timeout: float = REQUEST_TIMEOUT
) -> httpx.Client:
    """A sync client on the server's API (`retry=False`: every answer as it comes)."""
    transport = RetryingTransport() if retry else None
    return httpx.Client(base_url=api_url, timeout=timeout, transport=transport)


def async_server_client(
    api_url: str, *, retry: bool = True, timeout: float = REQUEST_TIMEOUT
) -> httpx.AsyncClient:
    """An async client on the server's API (`retry=False`: every answer as it comes)."""
    transport = AsyncRetryingTransport() if retry else None
    return httpx.AsyncClient(base_url=api_url, timeout=timeout, transport=transport)
