"""Fakes for the warm engine's unit tests (tests/unit/test_warm_*.py).

A fake `prefect` (and the two other packages the template preloads, `anyio` and `rich`): every
module of `template.PRELOAD` exists and is empty, except what E's turn touches
(`prefect.context`, `prefect.logging.configuration`, `prefect.settings.constants`) and
`prefect.engine`, which, run as `__main__` with a run's environment, executes the Python code in
its TEST_ENGINE variable (nothing at the template's import: its environment has none). It is
installed into a throwaway venv (no user site directory, no system site packages), so the whole
warm path runs fast and deterministically on the venv's python, without the real Prefect.

Two interpreter start-up variables (part of a template's key) make the fake misbehave at import:
PYTHON_TEST_THREAD starts a thread, PYTHON_TEST_OPEN_FILE leaves a file open.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import psutil

from agent.launch.base import Launcher, LaunchRequest, RunHandle, base_environment
from agent.launch.process import ProcessLauncher
from agent.warm.keys import TemplateKey, connect_path, template_key
from agent.warm.launcher import WarmHandle, WarmLauncher
from agent.warm.pool import Template, WarmPool
from agent.warm.template import PRELOAD

FAKE_PACKAGES = ("prefect", "anyio", "rich")
SECRET = "pnu_warm_secret_that_must_not_reach_the_template"
WITHIN = 120.0  # a guard against hangs only: nothing asserts how long anything took

SOURCES = {
    "prefect/__init__.py": """
        # What Prefect's own imports do too: multiprocessing, a cached temporary directory,
        # its settings' constants (with the default PREFECT_HOME).
        import multiprocessing, os, tempfile, threading, time
        import prefect.settings.constants
        tempfile.gettempdir()
        if os.environ.get("PYTHON_TEST_THREAD"):
            threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
        if os.environ.get("PYTHON_TEST_OPEN_FILE"):
            _kept = open(os.devnull)
    """,
    "prefect/context.py": """
        import os
        # Built at import from the environment, as Prefect's global settings context is.
        GLOBAL_SETTINGS_CONTEXT = {"built_from": dict(os.environ)}
        def refresh_global_settings_context():
            global GLOBAL_SETTINGS_CONTEXT
            assert "GLOBAL_SETTINGS_CONTEXT" not in globals(), "not deleted before the rebuild"
            GLOBAL_SETTINGS_CONTEXT = {"built_from": dict(os.environ)}
    """,
    "prefect/logging/configuration.py": """
        import os
        PROCESS_LOGGING_CONFIG = {}
        def setup_logging():
            PROCESS_LOGGING_CONFIG["level"] = os.environ.get("PREFECT_LOGGING_LEVEL", "INFO")
            PROCESS_LOGGING_CONFIG["setups"] = PROCESS_LOGGING_CONFIG.get("setups", 0) + 1
        setup_logging()
    """,
    "prefect/settings/constants.py": """
        import os, pathlib
        DEFAULT_PREFECT_HOME = pathlib.Path(os.path.expanduser("~")) / ".prefect"
    """,
    "prefect/engine.py": """
        import os
        exec(compile(os.environ.get("TEST_ENGINE", ""), "<TEST_ENGINE>", "exec"))
    """,
}

# The engine: everything a run's process is, as JSON in facts.json of its working directory.
FACTS = """
import ctypes, json, multiprocessing, os, signal, sys, tempfile, time
import prefect.context, prefect.logging.configuration, prefect.settings.constants
mask = os.umask(0); os.umask(mask)
facts = {
    "env": dict(os.environ),
    "cwd": os.getcwd(),
    "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), sorted(os.getgroups())],
    "umask": mask,
    "tmp": tempfile.gettempdir(),
    "path0": sys.path[0],
    "argv": sys.argv,
    "main": sys.modules["__main__"].__file__,
    "engine_module": "prefect.engine" in sys.modules,
    "context": prefect.context.GLOBAL_SETTINGS_CONTEXT["built_from"],
    "logging": prefect.logging.configuration.PROCESS_LOGGING_CONFIG,
    "prefect_home": str(prefect.settings.constants.DEFAULT_PREFECT_HOME),
    "dont_write_bytecode": sys.dont_write_bytecode,
    "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
    "stdin": os.readlink("/proc/self/fd/0"),
    "signals": [str(signal.getsignal(s)) for s in (signal.SIGTERM, signal.SIGINT)],
    "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
    "session_leader": os.getsid(0) == os.getppid(),
    "dumpable": ctypes.CDLL(None).prctl(3, 0, 0, 0, 0),  # PR_GET_DUMPABLE
    "cwd_on_path": os.getcwd() in sys.path,
    "tz": list(time.tzname),
    "authkey": multiprocessing.current_process().authkey.hex(),
}
with open("facts.json", "w") as f:
    json.dump(facts, f)
print("engine out"); print("engine err", file=sys.stderr)
"""

# The engine waits until the test creates `go` in its working directory, then exits 0.
BLOCK = """
import os, pathlib, time
pathlib.Path("engine.pid").write_text(str(os.getpid()))
while not os.path.exists("go"):
    time.sleep(0.02)
"""


def exit_with(status: int) -> str:
    return f"import os; os._exit({status})"


def write_fake_packages(site: Path) -> None:
    files = dict(SOURCES)
    for name in PRELOAD:
        parts = name.split(".")
        if parts[0] not in FAKE_PACKAGES:
            continue  # the standard library's own
        for depth in range(1, len(parts)):
            files.setdefault("/".join(parts[:depth]) + "/__init__.py", "")
        files.setdefault("/".join(parts) + ".py", "")
    for relative, text in files.items():
        path = site / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def make_flow_venv(root: Path) -> Path:
    """A venv without pip, with the fake packages in its site-packages; returns its python.
    Writable by its owner only, as a root agent requires of a venv it runs a template of."""
    old = os.umask(0o022)
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120
        )
        [site] = root.glob("lib/python3*/site-packages")
        write_fake_packages(site)
    finally:
        os.umask(old)
    return root / "bin" / "python"


def site_packages(python: Path) -> Path:
    [site] = python.parent.parent.glob("lib/python3*/site-packages")
    return site


def make_request(tmp_path: Path, python: Path, engine: str, **env: str) -> LaunchRequest:
    """A warm-eligible request of a fresh run: its own working and run directories."""
    run_id = uuid4()
    base = tmp_path / str(run_id)
    code = base / "code"
    run_dir = base / "run"
    tmp = base / "tmp"
    for directory in (code, run_dir, tmp):
        directory.mkdir(parents=True)
    run_dir.chmod(0o700)
    return LaunchRequest(
        flow_run_id=run_id,
        flow_run_name="brave-otter",
        deployment_name="hello",
        working_dir=code,
        python=str(python),
        memory_max=None,
        cpu_quota=None,
        tasks_max=None,
        runtime_max=None,
        user="",
        env={
            "PREFECT__FLOW_RUN_ID": str(run_id),
            "PREFECT_API_URL": "http://127.0.0.1:9/api",
            "PREFECT_API_KEY": SECRET,
            "TMPDIR": str(tmp),
            "PYTHONDONTWRITEBYTECODE": "1",
            "TEST_ENGINE": engine,
            **env,
        },
        run_dir=run_dir,
        slice="runner-agent-flows.slice",
        engine="warm",
    )


async def eventually(predicate: Callable[[], Any], what: str, within: float = WITHIN) -> Any:
    """Wait for something a real process does; the limit only guards against a hang."""
    deadline = time.monotonic() + within
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.02)
    return value


def templates(pool: WarmPool) -> list[Template]:
    """The templates the pool has now (starting, ready or refusing)."""
    return list(pool._templates.values())


def refusal(pool: WarmPool, key: TemplateKey) -> str | None:
    """Why the template of `key` refused to serve, if it did."""
    refused = pool._refused.get(key)
    return refused[0] if refused is not None else None


def template_of(pool: WarmPool, key: TemplateKey) -> Template | None:
    return next((t for t in templates(pool) if t.key == key), None)


async def ready(pool: WarmPool, key: TemplateKey) -> Template:
    """Start the template of `key` (if needed) and wait until it serves."""
    pool.ensure(key)

    def serving() -> Template | None:
        refused = refusal(pool, key)
        if refused:
            raise AssertionError(f"the template refused: {refused}")
        template = template_of(pool, key)
        return template if template is not None and template.ready else None

    found: Template = await eventually(serving, f"a ready template for {key}")
    return found


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


@contextlib.contextmanager
def adopting_orphans() -> Iterator[None]:
    """Processes orphaned meanwhile (the supervisors of a stopped template, an engine whose W
    was killed) become this process's children instead of PID 1's (which, in a container, may
    never reap them), and are reaped at the end."""
    libc = ctypes.CDLL(None, use_errno=True)
    before = ctypes.c_int(0)
    libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(before))
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1)
    try:
        yield
    finally:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, before.value)
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.Error, ChildProcessError):
                if child.status() == psutil.STATUS_ZOMBIE:
                    os.waitpid(child.pid, os.WNOHANG)


@contextlib.asynccontextmanager
async def warm_pool(directory: Path, **options: Any) -> AsyncIterator[WarmPool]:
    """A WarmPool whose templates are all gone when it is left (SIGKILL if one lingers), and
    whose runs' processes are reaped."""
    pids: set[int] = set()
    with adopting_orphans():
        async with WarmPool(directory, **options) as pool:
            try:
                yield pool
            finally:
                pids = {t.pid for t in templates(pool) if t.pid is not None}
                for template in templates(pool):
                    if template.process is not None and template.process.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            template.process.kill()
        for pid in pids:
            await eventually(lambda pid=pid: gone(pid), f"template {pid} gone")  # type: ignore[misc]


class Runs:
    """The runs a test started: each process group (W's session, or the cold wrapper's) is
    SIGKILLed and waited for at the end, also when the test failed."""

    def __init__(self) -> None:
        self.handles: list[RunHandle] = []

    def add(self, handle: RunHandle) -> RunHandle:
        self.handles.append(handle)
        return handle

    async def close(self) -> None:
        for handle in self.handles:
            if handle.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(handle.pid, signal.SIGKILL)
            await asyncio.wait_for(handle.wait(), timeout=WITHIN)


def tree(pid: int) -> Iterator[int]:
    with contextlib.suppress(psutil.Error):
        for proc in psutil.Process(pid).children(recursive=True):
            yield proc.pid


def flow_venv() -> Iterator[Path]:
    """For a test module's `flow_python` fixture: the python of a throwaway venv with the fake
    packages, in a directory every user can read (for runs that become another user)."""
    root = Path(tempfile.mkdtemp(prefix="runner-agent-warm-"))
    try:
        root.chmod(0o755)
        yield make_flow_venv(root / "venv")
    finally:
        shutil.rmtree(root, ignore_errors=True)


class Clock:
    """The pool's clock, moved by hand: pauses (RETRY_AFTER, IDLE_STOP) pass at once."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Warm:
    """A pool and a WarmLauncher around `inner`, and the runs of one test."""

    pool: WarmPool
    launcher: WarmLauncher
    python: Path
    base: Path
    runs: Runs

    def request(self, engine: str, **env: str) -> LaunchRequest:
        return make_request(self.base, self.python, engine, **env)

    def key(self, req: LaunchRequest) -> TemplateKey:
        return template_key(req.python, self.launcher._environment(req))

    async def ready(self, req: LaunchRequest) -> Template:
        return await ready(self.pool, self.key(req))

    async def launch(self, req: LaunchRequest) -> RunHandle:
        return self.runs.add(await self.launcher.launch(req))


@contextlib.asynccontextmanager
async def warm_setup(
    directory: Path, python: Path, inner: Launcher | None = None, **options: Any
) -> AsyncIterator[Warm]:
    """Runs are killed first, then the pool stops its templates; nothing is left running."""
    base = directory / "runs"
    base.mkdir(parents=True, exist_ok=True)
    async with warm_pool(directory / "warm", **options) as pool:
        launcher = WarmLauncher(inner or ProcessLauncher(), pool)
        runs = Runs()
        try:
            yield Warm(pool, launcher, python, base, runs)
        finally:
            await runs.close()


def key_for(python: Path, **env: str) -> TemplateKey:
    return template_key(str(python), base_environment("", extra=env))


@contextlib.asynccontextmanager
async def connection(
    template: Template,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A connection to a template, as the agent makes it (also from a deep directory)."""
    directory = os.open(template.socket_path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        reader, writer = await asyncio.open_unix_connection(
            connect_path(template.socket_path, directory)
        )
    finally:
        os.close(directory)
    try:
        yield reader, writer
    finally:
        writer.close()


async def launch_warm(warm: Warm, req: LaunchRequest) -> int:
    """Launch `req`, which must start warm; its exit status."""
    handle = await warm.launch(req)
    assert isinstance(handle, WarmHandle), "the run started cold"
    return await handle.wait()
