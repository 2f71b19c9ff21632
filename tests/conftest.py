"""Session-wide fixtures: the real Prefect server and the older-engine venv; the `engine`
parameter of the run-semantics tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.engines import ENGINES
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


OLD_VENV_ENV = "RUNNER_AGENT_TEST_PREFECT_OLD_VENV"


@pytest.fixture(scope="session")
def prefect_old_venv() -> Path:
    """The venv of the newest Prefect 3 release without the engine's control channel.

    packaging/dev.sh builds it (`prefect-old-<key>` in the test cache) and exports its path as
    RUNNER_AGENT_TEST_PREFECT_OLD_VENV. Missing, it fails the test in CI and skips it elsewhere.
    """
    value = os.environ.get(OLD_VENV_ENV, "")
    venv = Path(value)
    packages = sorted(venv.glob("lib/python3*/site-packages/prefect")) if value else []
    if not value:
        problem = f"{OLD_VENV_ENV} is not set; `bash packaging/dev.sh setup` builds that venv"
    elif not (venv / "bin" / "python").is_file() or not packages:
        problem = f"{OLD_VENV_ENV}={value} has no bin/python with prefect installed"
    elif (packages[0] / "_internal" / "control_listener.py").exists():
        problem = f"{OLD_VENV_ENV}={value} is not an older engine: it has the control channel"
    else:
        return venv
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(problem, pytrace=False)
    pytest.skip(problem)


@pytest.fixture(scope="module", params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """`[flow_run] engine` of the agent a run-semantics test runs: each test (or module-scoped
    fixture) that asks for it runs once per engine, with the ids `cold` and `warm`
    (docs/warm-engine.md). Module scope, so module-scoped agents and beds can take it too."""
    return str(request.param)
