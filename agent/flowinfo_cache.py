"""What a flow's parameter schema depends on (the cache key), and the cache on disk.

The key is a sha256 over everything that can change what Prefect computes:
- the helper script itself (an agent upgrade may change what it prints);
- the code: for git, the commit (and subdirectory); for a `path`, the entrypoint file's content
  and the size and mtime of every other `.py` file below the code directory (a parameter's type
  may be a model defined in another module; stat is cheap where hashing every file is not, and
  copying or pulling new code changes mtimes);
- the interpreter: its path, the file it resolves to, `pyvenv.cfg`, and the mtimes of its
  site-packages directories, which change on every `pip install`, upgrade or removal (so a new
  Prefect or pydantic version computes the schema afresh);
- the environment and user the helper runs with.

Entries are `<state_dir>/flowinfo/<key>.json` (0600), at most MAX_ENTRIES of them, the least
recently used removed first. Only successes are stored: a failure may be transient.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("agent.flowinfo")

MAX_ENTRIES = 64
MAX_SCANNED = 5000  # directory entries looked at below a `path` code directory
_SKIPPED_DIRS = frozenset({"__pycache__", "node_modules", "site-packages", "dist-packages"})


@dataclass(frozen=True)
class FlowInfo:
    """What the flow's own code says about it, as Prefect computes it."""

    flow_name: str
    description: str | None
    parameter_openapi_schema: dict[str, Any]
    # The git commit the info was computed at (a deployment's default version); not cached,
    # the cache key already holds it.
    commit: str | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "flow_name": self.flow_name,
            "description": self.description,
            "parameter_openapi_schema": self.parameter_openapi_schema,
        }

    @classmethod
    def from_json(cls, data: Any) -> FlowInfo | None:
        """None when `data` does not have the shape the helper prints."""
        if not isinstance(data, dict):
            return None
        name, description = data.get("flow_name"), data.get("description")
        schema = data.get("parameter_openapi_schema")
        if not isinstance(name, str) or not isinstance(schema, dict):
            return None
        if description is not None and not isinstance(description, str):
            return None
        return cls(name, description, schema)


def _file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        return f"unreadable: {exc.strerror}"


def _stat_mark(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def python_fingerprint(python: str, search_path: str) -> dict[str, Any]:
    """The interpreter and its installed packages, as far as a stat can tell."""
    found = shutil.which(python, path=search_path) if "/" not in python else python
    if found is None:
        return {"python": python, "missing": True}
    executable = Path(found)
    prefix = executable.parent.parent
    site_dirs = sorted(
        {
            *prefix.glob("lib/python3*/site-packages"),
            *prefix.glob("lib/python3*/dist-packages"),
            *prefix.glob("lib/python3/dist-packages"),
            *prefix.glob("local/lib/python3*/dist-packages"),
        }
    )
    config = prefix / "pyvenv.cfg"
    return {
        "python": python,
        "executable": str(executable),
        "resolved": [str(executable.resolve()), _stat_mark(executable.resolve())],
        "pyvenv.cfg": config.read_text(errors="replace") if config.is_file() else None,
        "site": [[str(d), _stat_mark(d)] for d in site_dirs],
    }


def code_tree_marks(root: Path, entry_file: str) -> list[Any]:
    """(path, size, mtime) of the `.py` files below `root`; the entry file by its content.

    Hidden directories, virtualenvs and caches are skipped; after MAX_SCANNED entries the scan
    stops and says so (a change beyond that point is then not noticed).
    """
    marks: list[Any] = [["entry", entry_file, _file_digest(root / entry_file)]]
    scanned = 0
    for directory, dirs, files in os.walk(root):
        here = Path(directory)
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".")
            and d not in _SKIPPED_DIRS
            and not (here / d / "pyvenv.cfg").exists()
        )
        for name in sorted(files):
            scanned += 1
            if scanned > MAX_SCANNED:
                marks.append(["truncated", MAX_SCANNED])
                return marks
            if name.endswith(".py"):
                path = here / name
                mark = _stat_mark(path)
                marks.append([str(path.relative_to(root)), mark[2:] if mark else None])
        scanned += len(dirs)
    return marks


def cache_key(parts: Mapping[str, Any]) -> str:
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class FlowInfoCache:
    """FlowInfo per key, on disk. Never raises: a cache that cannot be used is only slower."""

    def __init__(self, directory: Path, *, max_entries: int = MAX_ENTRIES) -> None:
        self.directory = directory
        self._max_entries = max_entries

    def get(self, key: str) -> FlowInfo | None:
        path = self.directory / f"{key}.json"
        try:
            info = FlowInfo.from_json(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable cache entry %s: %s", path, exc)
            info = None
        if info is None:
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # the least recently used go first
        return info

    def put(self, key: str, info: FlowInfo) -> None:
        path = self.directory / f"{key}.json"
        tmp = path.with_name(f".{key}.{os.getpid()}.tmp")
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                json.dump(info.to_json(), handle)
            tmp.replace(path)
            self._prune()
        except OSError as exc:
            log.warning("could not cache a parameter schema in %s: %s", self.directory, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _prune(self) -> None:
        entries = []
        for path in self.directory.glob("*.json"):
            with contextlib.suppress(OSError):
                entries.append((path.stat().st_mtime_ns, path))
        entries.sort()
        for _, path in entries[: max(len(entries) - self._max_entries, 0)]:
            with contextlib.suppress(OSError):
                path.unlink()
