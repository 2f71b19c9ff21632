"""Fixtures for tests against the session's real Prefect server (see tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.agent_process import Api
from tests.integration.prefect_server import PrefectServer, make_flow_dir
from tests.integration.server_http import async_server_client

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything under tests/integration is an integration test, marked or not.
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
async def prefect_ahttp(prefect_server: PrefectServer) -> AsyncIterator[httpx.AsyncClient]:
    """An async client on the server's API, for assertions independent of agent.api.

    It retries the server's transient answers (tests/integration/server_http.py).
    """
    async with async_server_client(prefect_server.api_url) as client:
        yield client


@pytest.fixture
def api(prefect_server: PrefectServer) -> Iterator[Api]:
    """The test helper client on the session's server (retries its transient answers)."""
    client = Api(prefect_server.api_url)
    yield client
    client.close()


@pytest.fixture
def flow_dir_factory(tmp_path: Path) -> Callable[[str], Path]:
    """`flow_dir_factory(source)` writes `flow.py` into a fresh directory under tmp_path."""
    return lambda source: make_flow_dir(tmp_path, source)
