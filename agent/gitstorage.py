"""Running git for storage.py: one subprocess at a time, with credentials, a timeout and errors.

Credentials never reach argv, `.git/config` or a log line. git asks for them through
`GIT_ASKPASS`, a tiny shell helper that prints the username and then reads the token from a file
(`token_file` or a systemd credential), so the token never even enters the agent's memory. A
password written into the URL is moved out of it into the helper's environment instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import SplitResult, unquote, urlsplit

from agent.redaction import hide_url_credentials

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
DEFAULT_USERNAME = "x-access-token"  # GitHub's name for token auth; most hosts accept any name

ASKPASS_SCRIPT = """#!/bin/sh
# Written by runner-agent. git runs this with its prompt as $1; it prints the answer.
case "$1" in
  Username*) printf '%s\\n' "${RUNNER_AGENT_GIT_USERNAME:-x-access-token}" ;;
  *)
    if [ -n "${RUNNER_AGENT_GIT_TOKEN_FILE:-}" ]; then
      head -n 1 "$RUNNER_AGENT_GIT_TOKEN_FILE" | tr -d '\\r'
    else
      printf '%s\\n' "${RUNNER_AGENT_GIT_PASSWORD:-}"
    fi ;;
esac
"""

# Checked in order; the first hit names the cause. Patterns match git's stderr (LC_ALL=C).
_CAUSES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "authentication failed",
        re.compile(
            r"Authentication failed|could not read (Username|Password)|terminal prompts disabled"
            r"|HTTP Basic: Access denied|requested URL returned error: 40[13]"
            r"|Permission denied \(publickey|Invalid username or password",
            re.I,
        ),
    ),
    (
        "repository not found",
        re.compile(
            r"repository '.*' not found|Repository not found|does not appear to be a git repository"
            r"|requested URL returned error: 404|not a git repository|No such file or directory",
            re.I,
        ),
    ),
    ("unknown branch", re.compile(r"couldn't find remote ref|Remote branch .* not found", re.I)),
    (
        "unknown commit",
        re.compile(
            r"not our ref|unadvertised object|no such remote ref|bad object|unknown revision", re.I
        ),
    ),
    (
        "could not connect",
        re.compile(
            r"Could not resolve host|Failed to connect|Couldn't connect|Connection refused"
            r"|Connection timed out|Connection reset|Network is unreachable|No route to host"
            r"|Operation timed out|ssh: connect to host|Could not read from remote repository"
            r"|SSL certificate problem|gnutls_handshake|unable to access",
            re.I,
        ),
    ),
    (
        "unsupported URL",
        re.compile(r"remote-\S+' is not a git command|Unable to find remote helper", re.I),
    ),
)

_PREFIX = re.compile(r"^(fatal|error|remote|warning):\s*", re.I)
_SHA = re.compile(r"[0-9a-f]{4,64}")
_BAD_BRANCH = re.compile(r"^-|\.\.|[\x00-\x20~^:?*\[\\\x7f]|@\{|\.lock$|/$|^/|//")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
_SAFE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def classify(stderr: str, *, ref_kind: str = "branch") -> str:
    """One short, credential-free reason for a failed git command."""
    for cause, pattern in _CAUSES:
        if pattern.search(stderr):
            if cause in ("unknown branch", "unknown commit"):
                return "unknown commit" if ref_kind == "commit" else "unknown branch"
            return cause
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if not lines:
        return "git failed without a message"
    return _PREFIX.sub("", hide_url_credentials(lines[-1]))[:300]


@dataclass(frozen=True)
class Remote:
    """A URL split into what git may see (`url`, in argv) and what it may not (`password`)."""

    url: str
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> Remote:
        if "://" not in url:
            return cls(url)  # a path or scp-like `user@host:path`
        parts = urlsplit(url)
        if parts.password is None:
            return cls(url, unquote(parts.username) if parts.username else None)
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"  # IPv6
        if parts.port is not None:
            netloc = f"{netloc}:{parts.port}"
        username = unquote(parts.username) if parts.username else None
        if username:
            netloc = f"{parts.username}@{netloc}"
        clean = SplitResult(parts.scheme, netloc, parts.path, parts.query, parts.fragment)
        return cls(clean.geturl(), username, unquote(parts.password))

    @property
    def display(self) -> str:
        """The URL as people see it: without a user name or password."""
        if "://" not in self.url:
            return self.url
        parts = urlsplit(self.url)
        host = parts.netloc.rpartition("@")[2]
        return SplitResult(parts.scheme, host, parts.path, parts.query, parts.fragment).geturl()


class GitFailed(Exception):
    """A git command failed; `reason` is already classified and sanitised."""

    def __init__(self, reason: str, stderr: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.stderr = stderr


@dataclass(frozen=True)
class Credentials:
    """Where the askpass helper finds the secret; neither value is the secret itself."""

    token_file: Path | None = None
    username: str | None = None
    password: str | None = None  # only from a URL with a password in it

    def environment(self, askpass: Path) -> dict[str, str]:
        env = {"GIT_ASKPASS": str(askpass)}
        if self.username:
            env["RUNNER_AGENT_GIT_USERNAME"] = self.username
        if self.token_file is not None:
            env["RUNNER_AGENT_GIT_TOKEN_FILE"] = str(self.token_file)
        elif self.password is not None:
            env["RUNNER_AGENT_GIT_PASSWORD"] = self.password
        return env


def base_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The agent's environment minus anything that would redirect or reconfigure git."""
    env = {k: v for k, v in environ.items() if not k.startswith(("GIT_", "RUNNER_AGENT_GIT_"))}
    env.pop("SSH_ASKPASS", None)
    env["LC_ALL"] = "C"  # stderr is classified by its English text
    env["GIT_TERMINAL_PROMPT"] = "0"  # never block on a prompt
    env["GIT_SSH_COMMAND"] = environ.get("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    return env


# `credential.helper=` empties the helper list, so a `store` helper in the user's gitconfig never
# writes our token to disk; gc.auto=0 keeps fetches predictable in time.
SAFE_CONFIG = ("-c", "credential.helper=", "-c", "gc.auto=0", "-c", "advice.detachedHead=false")
# Repositories are the agent's alone: git creates their files 0600 (0400 objects) and their
# directories 0700, whatever the umask. Work trees (the checkouts flows read) are not affected.
# Passed as GIT_CONFIG_* (git >= 2.31), which base_environment never lets in from outside.
PRIVATE_REPOSITORY = {
    "GIT_CONFIG_COUNT": "1",
    "GIT_CONFIG_KEY_0": "core.sharedRepository",
    "GIT_CONFIG_VALUE_0": "0600",
}
PRIVATE_DIR = 0o700
CODE_DIR = 0o755  # a commit's files: flows running as another user read them


@dataclass
class Git:
    """Runs one git binary with a fixed environment and a per-process timeout."""

    binary: str
    env: Mapping[str, str]
    timeout: float

    async def run(
        self,
        args: Sequence[str],
        *,
        cwd: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
        ref_kind: str = "branch",
        stdout: int | None = asyncio.subprocess.PIPE,
    ) -> str:
        """Run `git <SAFE_CONFIG> <args>`; return stdout or raise GitFailed."""
        env = {**self.env, **PRIVATE_REPOSITORY}
        if extra_env:
            env.update(extra_env)
        try:
            proc = await asyncio.create_subprocess_exec(
                self.binary,
                *SAFE_CONFIG,
                *args,
                cwd=cwd,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=stdout,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # so a timeout kills git's helpers too
            )
        except OSError as exc:
            raise GitFailed(f"cannot run {self.binary}: {exc.strerror or exc}") from exc
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.timeout)
        except (TimeoutError, asyncio.CancelledError) as exc:
            _kill_group(proc.pid)
            with contextlib.suppress(Exception):
                await asyncio.shield(proc.wait())
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise GitFailed(f"could not connect: timed out after {self.timeout:g}s") from None
        stderr = (err or b"").decode(errors="replace")
        if proc.returncode != 0:
            raise GitFailed(classify(stderr, ref_kind=ref_kind), hide_url_credentials(stderr))
        return (out or b"").decode(errors="replace")


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def install_askpass(path: Path) -> Path:
    """Write the helper (0700) unless an identical one is already there."""
    try:
        if path.read_text() == ASKPASS_SCRIPT and os.access(path, os.X_OK):
            return path
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
    with os.fdopen(fd, "w") as handle:
        handle.write(ASKPASS_SCRIPT)
    tmp.replace(path)
    return path


def dir_name(deployment_name: str) -> str:
    """A deployment name as one safe, unique directory name (also used for credential names)."""
    if not deployment_name:
        raise ValueError("a deployment name must not be empty")
    if _SAFE_NAME.fullmatch(deployment_name):
        return deployment_name
    escaped = "".join(
        chr(b) if chr(b) in _SAFE_CHARS else f"%{b:02X}" for b in deployment_name.encode()
    )
    if escaped.startswith("."):
        escaped = "%2E" + escaped[1:]
    if len(escaped) > 100:  # `~` appears in no other form, so names stay unique
        digest = hashlib.sha256(deployment_name.encode()).hexdigest()[:16]
        escaped = f"{escaped[:80]}~{digest}"
    return escaped


def ref_problem(branch: str | None, commit: str | None) -> str | None:
    """Why git could misread this ref (as an option or a refspec), checked before running it."""
    if commit:
        if not _SHA.fullmatch(commit.lower()):
            return "a commit must be a hexadecimal sha (4 to 64 digits)"
    elif _BAD_BRANCH.search(branch or "main"):
        return f"invalid branch name {branch!r}"
    return None


def subdirectory_parts(subdirectory: str) -> tuple[str, ...]:
    """The parts of a relative subdirectory; ValueError for one that leaves the checkout."""
    pure = PurePosixPath(subdirectory.strip() or ".")
    if pure.is_absolute() or ".." in pure.parts:
        raise ValueError(f"subdirectory {subdirectory!r} must be relative, without '..'")
    return tuple(part for part in pure.parts if part != ".")


# Directory metadata operations are single fast syscalls, so they run inline in the loop;
# only the recursive deletion (which may touch many files) goes to a subprocess.


def make_dirs(path: Path) -> None:
    """A private directory (0700), also when an older agent made it 0755. The workspace adds
    search permission (0711) for flows of another user; that grant is kept."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True, mode=PRIVATE_DIR)
    if path.stat().st_mode & 0o066:
        path.chmod(PRIVATE_DIR)


def list_dir(path: Path) -> list[Path]:
    return list(path.iterdir())


def publish(tmp: Path, final: Path) -> None:
    """Make a finished build visible under its final name in one atomic step.

    A commit directory is readable by all (CODE_DIR); a hidden one (the `.repo` cache, with
    every commit ever fetched) stays the agent's alone.
    """
    tmp.chmod(PRIVATE_DIR if final.name.startswith(".") else CODE_DIR)
    tmp.rename(final)


def _to_trash(path: Path) -> Path | None:
    if not path.exists():
        return None
    if path.name.startswith(TRASH_PREFIX):
        return path
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{os.urandom(4).hex()}")
    path.rename(trash)
    return trash


async def remove_tree(path: Path) -> None:
    """Rename out of the way at once (never half-deleted under its name), then delete."""
    trash = _to_trash(path)
    if trash is None:
        return
    # A flow may leave read-only directories, which rm -rf cannot empty when not root.
    await _run_quiet("chmod", "-R", "u+rwX", str(trash))
    await _run_quiet("rm", "-rf", "--", str(trash))
    if _exists(trash):
        logging.getLogger("agent.storage").warning("could not remove %s", trash)


def _exists(path: Path) -> bool:
    return path.exists()


async def _run_quiet(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await proc.wait()
