"""Fast checks that the README's install steps are the ones the install test can follow.

tests/package/test_install.py runs the host steps word for word in a clean Debian 12; these
checks catch a README edit that would leave it nothing to run, without booting anything.
"""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

import pytest

from tests.package.debbuild import BUILD_DEB, REPO, debian_version, run
from tests.package.readme import README, ReadmeError, install_steps, section


def test_the_build_step_is_the_script_that_the_package_tests_build_with() -> None:
    # The package tests build with this script (fixture built_deb); lintian is test_deb_build's.
    (build,) = install_steps().build
    argv = build.split("#")[0].split()
    assert REPO / argv[0] == BUILD_DEB, build
    assert argv[-1] == "dist/", build


def test_the_host_steps_install_the_built_package_then_start_the_agent() -> None:
    host = install_steps().host
    assert host[0].split("#")[0].split()[:2] == ["apt", "install"], host
    pattern = host[0].split("#")[0].split()[2].removeprefix("./")
    arch = run(["dpkg", "--print-architecture"]).strip()
    assert fnmatch(f"runner-agent_{debian_version()}_{arch}.deb", pattern), host[0]
    assert any("systemctl enable --now runner-agent" in step for step in host[1:]), host


def test_a_readme_without_the_two_blocks_is_refused(tmp_path: Path) -> None:
    text = README.read_text()
    body = section(text, "## Install from the Debian package")
    broken = tmp_path / "README.md"
    broken.write_text(text.replace(body, "\nSee the wiki.\n"))
    with pytest.raises(ReadmeError, match="expected two sh blocks"):
        install_steps(broken)
