"""Build and inspect runner-agent's .deb for the package tests (wraps packaging/build-deb.sh)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from packaging.version import Version

import agent

REPO = Path(__file__).resolve().parents[2]
BUILD_DEB = REPO / "packaging" / "build-deb.sh"
CHECK_VERSION = REPO / "debian" / "check-version"
BUILD_TIMEOUT = 1800.0
VENV = "/usr/lib/runner-agent"


class DebBuildError(RuntimeError):
    pass


def build_deb(outdir: Path, *, version: str | None = None, nocheck: bool = False) -> Path:
    """Run packaging/build-deb.sh into `outdir`; return the .deb. The build log is kept there."""
    argv = [str(BUILD_DEB)]
    if version is not None:
        argv += ["--version", version]
    if nocheck:
        argv.append("--nocheck")
    argv.append(str(outdir))
    outdir.mkdir(parents=True, exist_ok=True)
    log = outdir / "build.log"
    with log.open("w") as stderr:
        proc = subprocess.run(
            argv, stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=BUILD_TIMEOUT
        )
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-60:])
        raise DebBuildError(f"{' '.join(argv)} exited {proc.returncode}; log {log}:\n{tail}")
    return Path(proc.stdout.strip().splitlines()[-1])


def debian_version(root: Path = REPO) -> str:
    """The Debian version that agent/__init__.py's __version__ maps to."""
    return run([str(CHECK_VERSION), "--root", str(root), "--print"]).strip()


def higher_version(version: str | None = None) -> str:
    """A release above `version` (default agent.__version__): micro + 1, for upgrade tests."""
    major, minor, micro = (*Version(version or agent.__version__).release, 0, 0)[:3]
    return f"{major}.{minor}.{micro + 1}"


def run(argv: list[str], *, cwd: Path | None = None) -> str:
    """stdout of a command that must succeed."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=cwd)
    if proc.returncode != 0:
        raise AssertionError(f"{argv} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@dataclass(frozen=True)
class Entry:
    kind: str  # first character of the mode: "-", "d", "l"
    mode: str
    link: str | None


def contents(deb: Path) -> dict[str, Entry]:
    """`dpkg-deb -c` as {"/usr/bin/runner-agent": Entry(...)} (leading "." dropped)."""
    entries: dict[str, Entry] = {}
    for line in run(["dpkg-deb", "-c", str(deb)]).splitlines():
        mode, _owner, _size, _date, _time, rest = line.split(maxsplit=5)
        name, _, link = rest.partition(" -> ")
        path = name.removeprefix(".").rstrip("/") or "/"
        entries[path] = Entry(mode[0], mode, link or None)
    return entries


def field(deb: Path, name: str) -> str:
    return run(["dpkg-deb", "-f", str(deb), name]).strip()


def control_file(deb: Path, name: str) -> str:
    """A control member (conffiles, postinst, ...) of the package."""
    return run(["dpkg-deb", "-I", str(deb), name])
