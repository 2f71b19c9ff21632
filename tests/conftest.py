"""Session-wide fixtures. Only the real Prefect server lives here (integration and system tests)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.integration.prefect_server import PrefectServer, PrefectServerError, prefect_venv


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A real Prefect server (SQLite, loopback, free port) for the whole session.

    `.api_url`, `.python` (the flows' interpreter), `.home`, `.stop()` and `.start()` (same port
    and database). The process group is always terminated at the end of the session.
    """
    try:
        venv = prefect_venv(os.environ)
    except PrefectServerError as exc:
        problem = str(exc)
    else:
        problem = ""
    if problem:
        pytest.fail(problem, pytrace=False)
    server = PrefectServer(venv, tmp_path_factory.mktemp("prefect-home"))
    try:
        server.start()
        yield server
    finally:
        server.stop()
