"""What a warm template is for, and whether it may serve: its key (the flow's python and the
interpreter's start-up variables), the venv stamps that tell it went stale, and the ownership
check that keeps a template, which runs as the agent's user, from executing code that a flow's
user could have written."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.launch.base import DEFAULT_PATH
from agent.warm.supervise import startup_values

Stamps = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class TemplateKey:
    python: str  # absolute, as configured (a venv's python is a symlink: not resolved)
    values: tuple[tuple[str, str], ...]  # the start-up variables (supervise.startup_values)

    @property
    def id(self) -> str:
        text = json.dumps([self.python, self.values])
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def environment(self, prefect_home: Path, extra: Mapping[str, str]) -> dict[str, str]:
        """What a template starts with: the start-up variables, a private PREFECT_HOME for
        what Prefect reads at import, and nothing of any run (no API URL, no key, no id)."""
        return {
            "PATH": DEFAULT_PATH,
            "LANG": "C.UTF-8",
            **dict(self.values),
            "PREFECT_HOME": str(prefect_home),
            **extra,
        }


def template_key(python: str, env: Mapping[str, str]) -> TemplateKey:
    return TemplateKey(python, tuple(sorted(startup_values(env).items())))


def same_startup(env: Mapping[str, str], other: Mapping[str, str]) -> bool:
    """Whether two run environments could share a template."""
    return startup_values(env) == startup_values(other)


def stamp(paths: Iterable[str]) -> Stamps:
    """The template's own stamps are taken the same way (template.stamps), before its imports."""
    found = []
    for path in paths:
        try:
            st = Path(path).stat()
        except OSError:
            continue
        found.append((path, st.st_ino, st.st_mtime_ns))
    return tuple(found)


def parse_stamps(value: object) -> Stamps:
    if not isinstance(value, list):
        return ()
    return tuple(
        (str(item[0]), int(item[1]), int(item[2]))
        for item in value
        if isinstance(item, list) and len(item) == 3
    )


def still_fresh(stamps: Stamps) -> bool:
    return bool(stamps) and stamp(path for path, _, _ in stamps) == stamps


def unsafe_venv(python: str, *, euid: int | None = None) -> str | None:
    """Why a template of `python` must not run as this (root) agent, or None.

    A template imports the venv as the agent's user, where a cold engine imports it as the
    flow's. So with a root agent, the interpreter, the venv's directories and what sits in its
    site-packages must be root's and writable by nobody else (as `pip install` as root leaves
    them); otherwise a flow's user could plant code (a .pth file, a module) that root runs.
    """
    if (os.geteuid() if euid is None else euid) != 0:
        return None  # the template is the agent's own user: nothing to gain
    exe = Path(python)
    prefix = exe.parent.parent
    # pyvenv.cfg names the base interpreter. Files below a site-packages entry are not walked
    # (tens of thousands): a writable one there passes; docs/warm-engine.md says so.
    candidates: list[Path] = [exe, exe.resolve(), exe.parent, prefix, prefix / "pyvenv.cfg"]
    candidates.append(prefix / "lib")
    for lib in sorted(prefix.glob("lib/python3*")):
        candidates.append(lib)
        for packages in (lib / "site-packages", lib / "dist-packages"):
            if packages.is_dir():
                candidates += [packages, *sorted(packages.iterdir())]
    return _writable_by_others(candidates)


def _writable_by_others(paths: Sequence[Path]) -> str | None:
    for path in paths:
        try:
            st = path.lstat()
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode):
            continue  # a link's own mode means nothing; its target is checked where it matters
        if st.st_uid != 0:
            return f"{path} belongs to uid {st.st_uid}, not root"
        if st.st_mode & 0o022:
            return f"{path} is writable by its group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def connect_path(socket_path: Path, directory_fd: int | None) -> str:
    """A path short enough for sun_path (108 bytes): through the directory's fd if need be."""
    text = str(socket_path)
    if len(text) <= 100 or directory_fd is None:
        return text
    return f"/proc/self/fd/{directory_fd}/{socket_path.name}"
