"""Fixtures over the shared fakes in tests/unit/fakes/."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from websockets.asyncio.server import serve
from websockets.typing import Subprotocol

from tests.unit.fakes import FakeEngines, FakeEventsServer, FakeHooks, FakeLauncher, FakePrefect
from tests.unit.fakes.warm import Clock, Warm, flow_venv, warm_setup


@pytest.fixture
def fake_prefect() -> FakePrefect:
    """An in-memory Prefect server; `.client()` talks to it through httpx.MockTransport."""
    return FakePrefect()


@pytest.fixture
def fake_launcher() -> FakeLauncher:
    """A launcher whose runs exit 0 at once; set its attributes to change that."""
    return FakeLauncher()


@pytest.fixture
def fake_engines() -> FakeEngines:
    return FakeEngines()


@pytest.fixture
def fake_hooks() -> FakeHooks:
    return FakeHooks()


@pytest.fixture
async def fake_events() -> AsyncIterator[FakeEventsServer]:
    """A fake events websocket server on a loopback port; `.script` drives each connection."""
    fake = FakeEventsServer()
    async with serve(fake.handler, "127.0.0.1", 0, subprotocols=[Subprotocol("prefect")]) as srv:
        fake.server = srv
        fake.port = next(iter(srv.sockets)).getsockname()[1]
        yield fake


@pytest.fixture(scope="module")
def flow_python() -> Iterator[Path]:
    """A throwaway venv (fake `prefect`) per test module, for warm templates to run under."""
    yield from flow_venv()


@pytest.fixture
async def warm(tmp_path: Path, flow_python: Path) -> AsyncIterator[Warm]:
    """A warm pool and launcher; runs and templates are gone when the test ends."""
    async with warm_setup(tmp_path, flow_python) as harness:
        yield harness


@pytest.fixture
def clock() -> Clock:
    return Clock()
