"""Session fixtures of the package tests: the .deb (built once) and the clean Debian root."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.package.debbuild import DebBuildError, build_deb
from tests.system.testbed import TestBedError, build_debian_root


@pytest.fixture(scope="session")
def built_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runner-agent_<version>_<arch>.deb of the working tree, built exactly as a release is."""
    outdir = tmp_path_factory.mktemp("deb")
    try:
        return build_deb(outdir)
    except DebBuildError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def debian_root() -> Path:
    """The cached clean bookworm root of the test bed (debootstrapped on first use, ~70 s)."""
    try:
        return build_debian_root()
    except TestBedError as exc:
        pytest.fail(str(exc), pytrace=False)
