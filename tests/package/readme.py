"""The README's install steps, read from README.md so that the install test cannot drift from them.

The section "Install from the Debian package" has two `sh` blocks: the build (on a build
machine) and the install (on the host, as root, in the directory holding the .deb). A step is
one line of a block; blank and comment-only lines are not steps, and a trailing comment stays
on its step (the shell ignores it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tests.package.debbuild import REPO

README = REPO / "README.md"
SECTION = "## Install from the Debian package"
BLOCK = re.compile(r"^```sh\n(.*?)^```$", re.MULTILINE | re.DOTALL)


class ReadmeError(AssertionError):
    pass


@dataclass(frozen=True)
class InstallSteps:
    build: tuple[str, ...]
    host: tuple[str, ...]


def section(text: str, heading: str) -> str:
    """The body of a `## ` section, up to the next heading of the same level."""
    start = text.find(f"\n{heading}\n")
    if start < 0:
        raise ReadmeError(f"README.md has no section {heading!r}")
    body = text[start + len(heading) + 2 :]
    end = body.find("\n## ")
    return body if end < 0 else body[:end]


def steps_of(block: str) -> tuple[str, ...]:
    steps = tuple(
        line.strip()
        for line in block.splitlines()
        if line.strip() and not line.strip().startswith("#")
    )
    for step in steps:
        if step.endswith("\\"):
            raise ReadmeError(f"README step continues on the next line; keep one per line: {step}")
    return steps


def install_steps(readme: Path = README) -> InstallSteps:
    blocks = BLOCK.findall(section(readme.read_text(), SECTION))
    if len(blocks) != 2:
        raise ReadmeError(
            f"README.md {SECTION!r}: expected two sh blocks (build, install), found {len(blocks)}"
        )
    return InstallSteps(build=steps_of(blocks[0]), host=steps_of(blocks[1]))
