"""System-test fixtures: a booted systemd 252 with enforced limits (tests/system/testbed.py).

`host_container` (module scope) boots the host's own OS with the test cache and this checkout
bound in at the same paths, so the agent venv (editable install) and the Prefect venv work
inside. `debian_root` is the cached debootstrapped bookworm for `Container.debian(...)`.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.testbed import CACHE, Container, TestBedError, build_debian_root

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
VENV_VARIABLES = ("RUNNER_AGENT_TEST_AGENT_VENV", "RUNNER_AGENT_TEST_PREFECT_VENV")

log = logging.getLogger(__name__)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything under tests/system is a system test, marked or not.
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.system)


def require_test_bed(*extra_tools: tuple[str, str]) -> None:
    """Fail in CI, skip (with the reason) elsewhere, when the bed cannot run here.

    `extra_tools` are more (command, Debian package) pairs that the caller needs.
    """
    tools = (("systemd-nspawn", "systemd-container"), ("nsenter", "util-linux"), *extra_tools)
    problems = [
        f"{tool} is missing (apt-get install {package})"
        for tool, package in tools
        if shutil.which(tool) is None
    ]
    if os.geteuid() != 0:
        problems.append("the system tests need root (cgroups, systemd-nspawn)")
    if not problems:
        return
    reason = "; ".join(problems)
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"system test bed unavailable in CI: {reason}", pytrace=False)
    pytest.skip(f"system test bed unavailable: {reason}")


def container_binds() -> list[str]:
    """Read-only binds at the same paths: the test cache, this checkout, the venvs."""
    paths = [CACHE, REPO]
    for variable in VENV_VARIABLES:
        value = os.environ.get(variable)
        if value and not any(Path(value).is_relative_to(p) for p in paths):
            paths.append(Path(value))
    return [str(p) for p in paths if p.exists()]


@pytest.fixture(scope="module")
def host_container() -> Iterator[Container]:
    """The host's OS booted with enforced limits; /usr is a writable overlay (host untouched)."""
    require_test_bed()
    container = Container.host(writable_usr=True, binds_ro=container_binds())
    try:
        container.start()
    except TestBedError as exc:
        pytest.fail(f"test bed did not boot: {exc}", pytrace=False)
    try:
        yield container
    finally:
        container.close()


@pytest.fixture(scope="session")
def debian_root() -> Path:
    """The cached debootstrapped bookworm root (built on first use, about 70 s)."""
    require_test_bed(("debootstrap", "debootstrap"))
    try:
        return build_debian_root()
    except TestBedError as exc:
        pytest.fail(str(exc), pytrace=False)
