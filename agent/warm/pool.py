"""Warm templates: one per flow python and interpreter start-up variables, started on demand.

A template (agent/warm/template.py, run by the flow's python) has imported Prefect's engine and
forks one supervisor W per run. The pool starts templates (in their own scope under systemd),
tells when one is ready, notices one that died, refused or whose venv changed, and stops the
ones no configured deployment keeps after a while without runs. A run never waits here: no
ready template means a cold start (agent/warm/launcher.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.processes import process_create_time
from agent.warm.keys import Stamps, TemplateKey, parse_stamps, still_fresh, unsafe_venv
from agent.warm.memory import write_state

log = logging.getLogger("agent.warm")

PROGRAM = Path(__file__).with_name("template.py")
READY_TIMEOUT = 180.0  # imports beside busy runs; a slower template is stopped and retried
RETRY_AFTER = 60.0  # after a template died or could not start
IDLE_STOP = 600.0  # a template no deployment keeps, unused this long, is stopped
STOP_GRACE = 5.0
UNIT_PREFIX = "runner-agent-warm-"


@dataclass
class Template:
    key: TemplateKey
    generation: int
    socket_path: Path
    started_at: float  # monotonic
    process: asyncio.subprocess.Process | None = None
    pid: int | None = None  # once it said it is ready
    stamps: Stamps = ()  # the venv before its imports
    ready: bool = False
    ended: bool = False
    last_used: float = 0.0
    forks: int = 0
    last_line: str = ""

    @property
    def unit(self) -> str:
        return f"{UNIT_PREFIX}{self.key.id}-{self.generation}.scope"

    def state(self) -> dict[str, Any]:
        return {
            "key": self.key.id,
            "python": self.key.python,
            "pid": self.pid,
            "create_time": process_create_time(self.pid),
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
        before_first_start: Callable[[], Coroutine[Any, Any, None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        program: Path = PROGRAM,
        venv_problem: Callable[[str], str | None] = unsafe_venv,
    ) -> None:
        """`prefix(unit, description)`: argv in front of the template's (systemd-run --scope);
        `before_first_start`: run once before the first template starts (stops leftovers)."""
        self.directory = directory
        self._prefix = prefix
        self._extra_env = dict(extra_env or {})
        self._before_first_start = before_first_start
        self._clock = clock
        self._program = program
        self._venv_problem = venv_problem
        self._templates: dict[TemplateKey, Template] = {}
        self._retry_at: dict[TemplateKey, float] = {}
        # Refused (unsafe to fork, a user site, an unsafe venv): not again while the venv stays.
        self._refused: dict[TemplateKey, tuple[str, Stamps]] = {}
        self._unsafe_since: dict[TemplateKey, float] = {}
        self._kept: set[TemplateKey] = set()
        self._generation = 0
        self._group: asyncio.TaskGroup | None = None
        self._first_start: asyncio.Task[None] | None = None
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
        write_state(self.directory, [])

    # -- what the launcher asks ----------------------------------------------------------------

    def keep(self, keys: Iterable[TemplateKey]) -> None:
        """The templates configured deployments want: started now, never stopped as idle."""
        self._kept = set(keys)
        for key in self._kept:
            self.ensure(key)
        self._stop_idle()

    def ensure(self, key: TemplateKey) -> None:
        """Start a template for `key` unless one runs, failed a moment ago, or was refused."""
        if self._group is None or self._closing or key in self._templates:
            return
        if self._clock() < self._retry_at.get(key, 0.0) or self._refusal(key):
            return
        self._generation += 1
        template = Template(
            key,
            self._generation,
            self.directory / f"{key.id}-{self._generation}.sock",
            started_at=self._clock(),
        )
        self._templates[key] = template
        self._group.create_task(self._life(template), name=f"warm-template-{key.id}")

    def take(self, key: TemplateKey) -> Template | str:
        """The ready template for `key`, or why there is none (the run starts cold)."""
        self.ensure(key)
        self._stop_idle()
        refusal = self._refusal(key)
        if refusal:
            return refusal
        template = self._templates.get(key)
        if template is None:
            return "its template failed a moment ago and is not restarted yet"
        if not template.ready:
            if self._clock() - template.started_at > READY_TIMEOUT:
                self._stop(template, f"not ready within {READY_TIMEOUT:g}s")
            return "its template is still importing Prefect"
        if not still_fresh(template.stamps):
            self._stop(template, "the flow's venv changed")
            self.ensure(key)
            return "the flow's venv changed since its template started; a new one is starting"
        template.last_used = self._clock()
        template.forks += 1
        self._write_state()
        return template

    def _refusal(self, key: TemplateKey) -> str | None:
        refused = self._refused.get(key)
        if refused is None:
            return None
        reason, stamps = refused
        if stamps and not still_fresh(stamps):
            del self._refused[key]  # the venv changed: worth another try
            return None
        since = self._unsafe_since.get(key)
        # A chmod/chown that makes the venv safe changes no stamp: look again after the pause.
        if since is not None and self._clock() >= since + RETRY_AFTER:
            if self._venv_problem(key.python) is None:
                del self._refused[key], self._unsafe_since[key]
                return None
            self._unsafe_since[key] = self._clock()
        return f"its template refused to serve: {reason}"

    # -- a template's life ---------------------------------------------------------------------

    async def _life(self, template: Template) -> None:
        key = template.key
        try:
            await self._start(template)
            process = template.process
            if process is not None and process.stderr is not None:
                while line := await _readline(process.stderr):
                    self._heard(template, line)
                status = await process.wait()
                if key not in self._refused and not template.ended:
                    tail = f": {template.last_line}" if template.last_line else ""
                    log.warning(
                        "warm template %s for %s exited with status %s%s",
                        key.id,
                        key.python,
                        status,
                        tail,
                    )
        except Exception as exc:  # the template's trouble is never the agent's
            log.warning("warm template for %s could not start: %s", key.python, exc)
        finally:
            self._ended(template)

    def _ended(self, template: Template) -> None:
        key = template.key
        ended_by_us = template.ended
        template.ready = False
        template.ended = True
        if self._templates.get(key) is template:
            del self._templates[key]
            if not ended_by_us and key not in self._refused:
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
        key = template.key
        if self._before_first_start is not None and self._group is not None:
            if self._first_start is None:
                self._first_start = self._group.create_task(self._before_first_start())
            await asyncio.shield(self._first_start)
        problem = self._venv_problem(key.python)
        if problem:
            self._refuse(template, f"unsafe venv: {problem}", ())
            self._unsafe_since[key] = self._clock()
            return
        if template.ended:
            return  # stopped (the agent is stopping) before it was even spawned
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        home = self.directory / "prefect-home"
        home.mkdir(mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            template.socket_path.unlink()
        what = f"runner-agent warm engine template for {key.python}"
        argv = [
            *self._prefix(template.unit, what),
            key.python,
            str(self._program),
            template.socket_path.name,
            str(os.getpid()),
        ]
        # Its working directory is the sockets' directory: the socket is bound by a short name.
        template.process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=key.environment(home, self._extra_env),
            cwd=self.directory,
        )
        log.info("starting a warm template for %s (%s)", key.python, template.unit)
        if _stopped(template):  # while it was being spawned
            self._terminate(template)

    def _heard(self, template: Template, line: str) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if isinstance(message, dict) and "ready" in message:
            template.pid = int(message["ready"])
            template.stamps = parse_stamps(message.get("stamps"))
            template.ready = not template.ended
            log.info(
                "warm template %s for %s is ready (pid %d, %.1fs)",
                template.key.id,
                template.key.python,
                template.pid,
                self._clock() - template.started_at,
            )
            self._write_state()
        elif isinstance(message, dict) and "refused" in message:
            stamps = parse_stamps(message.get("stamps"))
            self._refuse(template, str(message["refused"]), stamps)
        else:
            template.last_line = line[:500]
            log.warning("warm template %s: %s", template.key.id, template.last_line)

    def _refuse(self, template: Template, reason: str, stamps: Stamps) -> None:
        self._refused[template.key] = (reason, stamps)
        log.warning(
            "warm template for %s refused to serve (its runs start cold until its venv "
            "changes): %s",
            template.key.python,
            reason,
        )

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
        """SIGTERM: the template exits; runs it forked live on (their own scopes and sessions).
        SIGKILL after a grace."""
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
        states = [t.state() for t in self._templates.values() if t.pid is not None]
        write_state(self.directory, states)


def _stopped(template: Template) -> bool:
    return template.ended


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
