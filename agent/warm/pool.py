"""Warm templates: one per flow python and interpreter start-up variables, started on demand.

A template (agent/warm/template.py, run by the flow's python) has imported Prefect's engine and
forks one supervisor W per run. The pool starts templates (in their own scope under systemd),
tells when one is ready, notices one that died or whose venv changed, and stops templates that
no configured deployment wants and that served no run for a while. A run never waits here: a
template that is not ready means a cold start (agent/warm/launcher.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.launch.base import DEFAULT_PATH

log = logging.getLogger("agent.warm")

PROGRAM = Path(__file__).with_name("template.py")
READY_TIMEOUT = 180.0  # imports beside busy runs; a slower template is stopped and retried
RETRY_AFTER = 60.0  # after a template died or failed to start
IDLE_STOP = 600.0  # a template no deployment keeps, unused this long, is stopped
STOP_GRACE = 5.0
STATE_FILE = "templates.json"
UNIT_PREFIX = "runner-agent-warm-"
# Read by the interpreter at start-up: a template serves runs with the same values only.
APPLIED_IN_CHILD = ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes


def startup_values(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The variables the interpreter reads once at start-up (template.startup_values)."""
    return tuple(
        sorted(
            (k, v)
            for k, v in env.items()
            if (k.startswith(("PYTHON", "LC_")) or k == "LANG") and k not in APPLIED_IN_CHILD
        )
    )


@dataclass(frozen=True)
class TemplateKey:
    python: str  # absolute, as configured (a venv's python is a symlink: not resolved)
    values: tuple[tuple[str, str], ...]

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
    return TemplateKey(python, startup_values(env))


def _fingerprint(paths: Iterable[str]) -> tuple[tuple[str, int, int], ...]:
    """Stats that move with the venv: pip adds and removes dist-info directories."""
    stamps = []
    for path in paths:
        try:
            st = Path(path).stat()
        except OSError:
            stamps.append((path, -1, -1))
        else:
            stamps.append((path, st.st_ino, st.st_mtime_ns))
    return tuple(stamps)


@dataclass
class Template:
    key: TemplateKey
    generation: int
    socket_path: Path
    started_at: float  # monotonic
    process: asyncio.subprocess.Process | None = None
    pid: int | None = None  # the template's pid once it said it is ready
    site: tuple[str, ...] = ()
    user_site: bool = False
    fingerprint: tuple[tuple[str, int, int], ...] = ()
    ready: bool = False
    ended: bool = False
    problem: str | None = None  # why it refused to serve (unsafe to fork)
    last_used: float = 0.0
    forks: int = 0
    output: list[str] = field(default_factory=list)

    @property
    def unit(self) -> str:
        return f"{UNIT_PREFIX}{self.key.id}-{self.generation}.scope"

    def state(self) -> dict[str, Any]:
        return {
            "key": self.key.id,
            "python": self.key.python,
            "pid": self.pid,
            "unit": self.unit,
            "ready": self.ready,
            "forks": self.forks,
        }


class WarmPool:
    """The templates of this agent process. Entered as an async context: templates live in
    its task group and are stopped when it exits."""

    def __init__(
        self,
        directory: Path,
        *,
        prefix: Callable[[str, str], list[str]] = lambda unit, what: [],
        extra_env: Mapping[str, str] | None = None,
        before_first_start: Callable[[], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        program: Path = PROGRAM,
    ) -> None:
        """`prefix(unit, description)`: argv in front of the template's (systemd-run --scope);
        `before_first_start`: run once before the first template starts (stops leftovers)."""
        self.directory = directory
        self._prefix = prefix
        self._extra_env = dict(extra_env or {})
        self._before_first_start = before_first_start
        self._clock = clock
        self._program = program
        self._templates: dict[TemplateKey, Template] = {}
        self._retry_at: dict[TemplateKey, float] = {}
        self._kept: set[TemplateKey] = set()
        self._generation = 0
        self._group: asyncio.TaskGroup | None = None
        self._first_start: asyncio.Future[Any] | None = None
        self._restarts: set[asyncio.Task[None]] = set()
        self._closing = False

    async def __aenter__(self) -> WarmPool:
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing = True
        for template in list(self._templates.values()):
            self._terminate(template)
        for task in self._restarts:
            task.cancel()
        group, self._group = self._group, None
        if group is not None:
            await group.__aexit__(None, None, None)
        self._templates.clear()
        self._write_state()

    # -- what the launcher asks ----------------------------------------------------------------

    def keep(self, keys: Iterable[TemplateKey]) -> None:
        """The templates configured deployments want: started now, never stopped as idle."""
        self._kept = set(keys)
        for key in self._kept:
            self.ensure(key)
        for key, template in list(self._templates.items()):
            if key not in self._kept and self._idle(template):
                self._stop(template, "no deployment uses it")

    def ensure(self, key: TemplateKey) -> None:
        """Start a template for `key` unless one runs or one failed a moment ago."""
        if self._group is None or key in self._templates:
            return
        if self._clock() < self._retry_at.get(key, 0.0):
            return
        self._generation += 1
        template = Template(
            key,
            self._generation,
            self._socket_path(key, self._generation),
            started_at=self._clock(),
        )
        self._templates[key] = template
        self._group.create_task(self._life(template), name=f"warm-template-{key.id}")

    def take(self, key: TemplateKey) -> Template | str:
        """The ready template for `key`, or why there is none (the run starts cold)."""
        self.ensure(key)
        self._stop_idle()
        template = self._templates.get(key)
        if template is None:
            return "its template failed a moment ago and is not restarted yet"
        if template.problem:
            return f"the template refused to serve: {template.problem}"
        if not template.ready:
            if self._clock() - template.started_at > READY_TIMEOUT:
                self._stop(template, f"not ready within {READY_TIMEOUT:g}s")
            return "its template is still importing Prefect"
        if template.user_site:
            return "the flow's python has a user site directory, which depends on the run's user"
        if _fingerprint([key.python, *template.site]) != template.fingerprint:
            self._stop(template, "the flow's venv changed")
            self.ensure(key)
            return "the flow's venv changed since its template started; a new one is starting"
        template.last_used = self._clock()
        template.forks += 1
        return template

    # -- a template's life ---------------------------------------------------------------------

    def _socket_path(self, key: TemplateKey, generation: int) -> Path:
        return self.directory / f"{key.id}-{generation}.sock"

    async def _life(self, template: Template) -> None:
        key = template.key
        try:
            await self._start(template)
            process = template.process
            assert process is not None and process.stderr is not None
            while line := await _readline(process.stderr):
                self._heard(template, line)
            status = await process.wait()
            if template.problem is None and not template.ended:
                log.warning(
                    "warm template %s for %s exited with status %s%s",
                    key.id,
                    key.python,
                    status,
                    f": {template.output[-1]}" if template.output else "",
                )
        except OSError as exc:
            log.warning("warm template for %s could not start: %s", key.python, exc)
        finally:
            ended_by_us = template.ended
            template.ready = False
            template.ended = True
            if self._templates.get(key) is template:
                del self._templates[key]
                if not ended_by_us:
                    self._retry_at[key] = self._clock() + RETRY_AFTER
                    if key in self._kept and self._group is not None and not self._closing:
                        restart = self._group.create_task(self._restart_later(key))
                        self._restarts.add(restart)
                        restart.add_done_callback(self._restarts.discard)
            with contextlib.suppress(OSError):
                template.socket_path.unlink()
            self._write_state()

    async def _restart_later(self, key: TemplateKey) -> None:
        """A kept template that died comes back after the pause, not at the next run."""
        await asyncio.sleep(RETRY_AFTER)
        if key in self._kept:
            self.ensure(key)

    async def _start(self, template: Template) -> None:
        if self._before_first_start is not None and self._first_start is None:
            self._first_start = asyncio.ensure_future(self._before_first_start())
        if self._first_start is not None:
            await asyncio.shield(self._first_start)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        home = self.directory / "prefect-home"
        home.mkdir(mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            template.socket_path.unlink()
        what = f"runner-agent warm engine template for {template.key.python}"
        argv = [
            *self._prefix(template.unit, what),
            template.key.python,
            str(self._program),
            template.socket_path.name,
        ]
        # Its working directory is the sockets' directory: the socket is bound by a short name.
        template.process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=template.key.environment(home, self._extra_env),
            cwd=self.directory,
        )
        log.info("starting a warm template for %s (%s)", template.key.python, template.unit)

    def _heard(self, template: Template, line: str) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if isinstance(message, dict) and "ready" in message:
            template.pid = int(message["ready"])
            template.site = tuple(str(p) for p in message.get("site", ()))
            template.user_site = bool(message.get("user_site"))
            template.fingerprint = _fingerprint([template.key.python, *template.site])
            template.ready = True
            waited = self._clock() - template.started_at
            log.info(
                "warm template %s for %s is ready (pid %d, %.1fs)",
                template.key.id,
                template.key.python,
                template.pid,
                waited,
            )
            self._write_state()
        elif isinstance(message, dict) and "refused" in message:
            template.problem = str(message["refused"])
            log.warning(
                "warm template for %s refused to serve (runs start cold): %s",
                template.key.python,
                template.problem,
            )
        else:
            template.output = [*template.output[-19:], line]
            log.warning("warm template %s: %s", template.key.id, line)

    def _idle(self, template: Template) -> bool:
        last = max(template.last_used, template.started_at)
        return self._clock() - last > IDLE_STOP

    def _stop_idle(self) -> None:
        for key, template in list(self._templates.items()):
            if key not in self._kept and self._idle(template):
                self._stop(template, f"no warm run for {IDLE_STOP:g}s")

    def _stop(self, template: Template, why: str) -> None:
        log.info("stopping warm template %s for %s: %s", template.key.id, template.key.python, why)
        if self._templates.get(template.key) is template:
            del self._templates[template.key]
        self._terminate(template)
        self._write_state()

    def _terminate(self, template: Template) -> None:
        """SIGTERM: the template exits; runs it forked live on (they are in their own scopes
        and sessions). SIGKILL after a grace, from the template's own task."""
        template.ended = True
        template.ready = False
        process = template.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        if self._group is not None:
            self._group.create_task(_kill_after(process, STOP_GRACE))

    def _write_state(self) -> None:
        """For `runner-agent status`: which templates run, and where."""
        path = self.directory / STATE_FILE
        data = [t.state() for t in self._templates.values() if t.pid is not None]
        with contextlib.suppress(OSError):
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(json.dumps(data))
            tmp.replace(path)


async def _kill_after(process: asyncio.subprocess.Process, grace: float) -> None:
    try:
        await asyncio.wait_for(process.wait(), timeout=grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()


async def _readline(stream: asyncio.StreamReader) -> str:
    """A line of the template's stderr ("" at EOF); an overlong line is cut, not fatal."""
    try:
        raw = await stream.readline()
    except ValueError:
        raw = await stream.read(64 * 1024)
    if not raw:
        return ""
    return raw.decode(errors="replace").rstrip("\n") or " "


def connect_path(socket_path: Path, directory_fd: int | None) -> str:
    """A path short enough for sun_path: through the directory's fd when the real one is long."""
    text = str(socket_path)
    if len(text) <= MAX_SOCKET_PATH or directory_fd is None:
        return text
    return f"/proc/self/fd/{directory_fd}/{socket_path.name}"


def read_state(directory: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads((directory / STATE_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []
