"""Fast checks of the packaging sources (no build): one version, complete pins and licenses."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import agent
from tests.package.debbuild import CHECK_VERSION, REPO


def check_version(root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CHECK_VERSION), "--root", str(root), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


def fake_tree(tmp_path: Path, version: str) -> Path:
    """agent/__init__.py with `version`, and the checkout's debian/changelog."""
    (tmp_path / "agent").mkdir()
    (tmp_path / "agent" / "__init__.py").write_text(f'"""x."""\n\n__version__ = "{version}"\n')
    (tmp_path / "debian").mkdir()
    shutil.copy(REPO / "debian" / "changelog", tmp_path / "debian" / "changelog")
    return tmp_path


def test_changelog_agrees_with_agent_version() -> None:
    proc = check_version(REPO)
    assert proc.returncode == 0, proc.stderr
    changelog = subprocess.run(
        ["dpkg-parsechangelog", "-l", str(REPO / "debian/changelog"), "-S", "Version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert check_version(REPO, "--print").stdout.strip() == changelog
    assert Version(changelog.replace("~", "")) == Version(agent.__version__)


def test_a_version_bump_without_a_changelog_entry_fails(tmp_path: Path) -> None:
    bumped = str(Version(agent.__version__).major + 1) + ".0.0"
    proc = check_version(fake_tree(tmp_path, bumped))
    assert proc.returncode == 1
    assert f"__version__ gives '{bumped}'" in proc.stderr
    assert f"dch -v {bumped}" in proc.stderr


@pytest.mark.parametrize(
    ("pep440", "debian"),
    [
        ("1.2.0", "1.2.0"),
        ("1.2.0rc1", "1.2.0~rc1"),
        ("1.2.0b2", "1.2.0~b2"),
        ("1.2.0.dev3", "1.2.0~~dev3"),
        ("1.2.0rc1.dev1", "1.2.0~rc1~dev1"),
        ("1.2.0.post1", "1.2.0+post1"),
    ],
)
def test_pep440_versions_map_to_debian_versions(tmp_path: Path, pep440: str, debian: str) -> None:
    proc = check_version(fake_tree(tmp_path, pep440), "--print")
    assert proc.stdout.strip() == debian


def test_mapped_versions_sort_like_pep440() -> None:
    # dpkg must order the mapped versions as pip orders the originals, or upgrades go backwards.
    ordered = ["1.2.0~~dev3", "1.2.0~b2", "1.2.0~rc1~dev1", "1.2.0~rc1", "1.2.0", "1.2.0+post1"]
    for older, newer in itertools.pairwise(ordered):
        subprocess.run(["dpkg", "--compare-versions", older, "lt", newer], check=True)


def pins(path: Path) -> dict[str, str]:
    found = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", path.read_text(), re.M)
    return {canonicalize_name(name): version for name, version in found}


def test_requirements_pin_every_dependency_of_pyproject_with_hashes() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pinned = pins(REPO / "packaging" / "requirements.txt")
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} not pinned: run packaging/lock-requirements.sh"
        assert req.specifier.contains(pinned[name], prereleases=True), (req, pinned[name])
    # Every requirement line carries at least one hash (pip --require-hashes needs all of them).
    blocks = re.split(r"\n(?=[A-Za-z0-9])", (REPO / "packaging" / "requirements.txt").read_text())
    for block in blocks:
        if re.match(r"[A-Za-z0-9]", block):
            assert "--hash=sha256:" in block, block.splitlines()[0]


def test_copyright_names_every_bundled_package() -> None:
    copyright_text = (REPO / "debian" / "copyright").read_text()
    listed = {
        canonicalize_name(name) for name in re.findall(r"([A-Za-z0-9._-]+) \(", copyright_text)
    }
    missing = set(pins(REPO / "packaging" / "requirements.txt")) - listed
    assert missing == set()
