"""A leased checkout of flow code from git, and what storage reads from a deployment's source."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Protocol

from agent.gitstorage import Remote

__all__ = ["Checkout", "GitSource", "StorageError", "describe_source"]


class GitSource(Protocol):
    """What storage reads from a deployment's `git` table (settings.GitSettings)."""

    @property
    def url(self) -> str: ...
    @property
    def branch(self) -> str | None: ...
    @property
    def commit(self) -> str | None: ...
    @property
    def token_file(self) -> Path | None: ...
    @property
    def submodules(self) -> bool: ...
    @property
    def subdirectory(self) -> str: ...
    @property
    def pull_interval(self) -> float: ...


class StorageError(Exception):
    """The code could not be provided; `str()` is the one-line message for the CRASHED state."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"Could not pull flow code from {source}: {reason}")
        self.source = source
        self.reason = reason


@dataclass(eq=False)
class Checkout:
    """A leased commit directory. `path` is where the flow runs (commit dir + subdirectory)."""

    deployment: str
    commit: str
    root: Path
    path: Path
    source: str
    warning: str | None = None
    _release: Callable[[Path], None] | None = field(default=None, repr=False)

    def describe(self) -> str:
        """The line for the run's logs in the Prefect UI."""
        return f"Flow code: commit {self.commit} from {self.source}, in {self.path}"

    def release(self) -> None:
        """Give the lease back (idempotent)."""
        release, self._release = self._release, None
        if release is not None:
            release(self.root)

    def __enter__(self) -> Checkout:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def describe_source(git: GitSource) -> str:
    ref = f"commit {git.commit}" if git.commit else f"branch {git.branch or 'main'}"
    return f"{Remote.parse(git.url).display} ({ref})"
