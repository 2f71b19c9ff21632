"""The agent's side of the warm-start prototype (issue 17): start templates, hand runs over.

Synchronous and stdlib-only on purpose: the measurement harness drives it from threads. The
design it demonstrates (pidfd + records, a spec that only the run's own process reads) carries
over to the asyncio agent unchanged; docs/warm-engine.md has the integration plan.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TEMPLATE = Path(__file__).with_name("template.py")
READY_TIMEOUT = 90.0
CONNECT_TIMEOUT = 5.0
REPLY_TIMEOUT = 10.0


class WarmRefused(Exception):
    """The warm path cannot take this run; nothing was started: start it cold."""


@dataclass(frozen=True)
class RunSpec:
    run_id: str
    env: Mapping[str, str]
    cwd: str
    run_dir: str
    umask: int = 0o022
    user: Mapping[str, Any] | None = None  # {"uid", "gid", "groups"}; None: the agent's own
    output: Mapping[str, str] = field(default_factory=dict)  # {"journal": id} | {"file": path}
    scope: str | None = None  # the run's scope: W waits until it has been moved there
    rusage: bool = False  # bench: W writes rusage.json
    phases: bool = False  # bench: E writes phases.json
    profile: bool = False  # bench: E writes profile.out (cProfile)

    def message(self) -> bytes:
        spec = asdict(self)
        spec["env"] = dict(self.env)
        return json.dumps({"spec": spec}).encode() + b"\n"


def template_environment(python_env: Mapping[str, str], prefect_home: Path) -> dict[str, str]:
    """What a template starts with: the runs' interpreter start-up variables (PYTHON*, LANG,
    LC_*), a private PREFECT_HOME for the settings Prefect reads at import, and nothing else:
    no API URL, no key, no run identity."""
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
    }
    env.update(
        {k: v for k, v in python_env.items() if k.startswith(("PYTHON", "LC_")) or k == "LANG"}
    )
    env["PREFECT_HOME"] = str(prefect_home)
    return env


class WarmHandle:
    """A started warm run. `pid` is W's, the process that records the run's exit status."""

    def __init__(
        self, run_id: str, pid: int, pidfd: int, engine: int, run_dir: Path, wait_child: bool
    ) -> None:
        self.run_id = run_id
        self.pid = pid
        self.engine = engine
        self.run_dir = run_dir
        self._wait_child = wait_child
        self._pidfd = pidfd
        self.rusage: Any = None

    def wait(self, timeout: float | None = None) -> int:
        """W's exit status: the record W wrote (137 without one: W was SIGKILLed)."""
        if self._wait_child:  # (b): W is our own child
            _, _, self.rusage = os.wait4(self.pid, 0)
        else:  # (a): W is the template's child; a pidfd says when it has ended
            ready, _, _ = select.select([self._pidfd], [], [], timeout)
            if not ready:
                raise TimeoutError(f"run {self.run_id} still running")
            os.close(self._pidfd)
        text = _read(self.run_dir / "exit-status")
        return int(text) if text is not None else 128 + signal.SIGKILL


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def start_transient_scope_argv(
    unit: str,
    pids: Sequence[int],
    *,
    slice: str,
    description: str,
    memory_max: int | None,
    tasks_max: int | None,
    cpu_quota: int | None,
    runtime_max: float | None,
) -> list[str]:
    """`busctl call ... StartTransientUnit` that moves existing `pids` into a new scope with the
    run's limits: what `systemd-run --scope` asks for, for processes it did not start. Limits
    in the D-Bus units: bytes, tasks, CPU microseconds per second, runtime microseconds."""
    props: list[str] = [
        "PIDs",
        "au",
        str(len(pids)),
        *map(str, pids),
        "Slice",
        "s",
        slice,
        "Description",
        "s",
        description,
        "CollectMode",
        "s",
        "inactive-or-failed",  # --collect
        "MemoryMax",
        "t",
        str(memory_max if memory_max is not None else 2**64 - 1),
        "TasksMax",
        "t",
        str(tasks_max if tasks_max is not None else 2**64 - 1),
    ]
    if cpu_quota is not None:
        props += ["CPUQuotaPerSecUSec", "t", str(cpu_quota * 10_000)]
    if runtime_max:
        props += ["RuntimeMaxUSec", "t", str(int(runtime_max * 1_000_000))]
    return [
        "busctl",
        "call",
        "--quiet",
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "StartTransientUnit",
        "ssa(sv)a(sa(sv))",
        unit,
        "fail",
        str(_count(props)),
        *props,
        "0",
    ]


def _count(props: Sequence[str]) -> int:
    """Number of (name, signature, value...) entries; `au` values take a count and items."""
    count, i = 0, 0
    while i < len(props):
        signature = props[i + 1]
        i += 3 + (int(props[i + 2]) if signature == "au" else 0)
        count += 1
    return count


class _Process:
    """A template (fork) or a waiting process (handover): one socket, one log."""

    def __init__(
        self,
        mode: str,
        python: str,
        env: Mapping[str, str],
        workdir: Path,
        name: str,
        prefix: Sequence[str] = (),
    ) -> None:
        self.mode = mode
        self.socket_path = workdir / f"{name}.sock"
        self.log_path = workdir / f"{name}.log"
        self.started = time.monotonic()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*prefix, python, str(TEMPLATE), mode, str(self.socket_path)],
                env=dict(env),
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self.ready_info: dict[str, Any] | None = None

    def poll_ready(self) -> bool:
        if self.ready_info is not None:
            return True
        if self.proc.poll() is not None:
            raise WarmRefused(
                f"template exited with {self.proc.returncode}: {self.log_path.read_text()[-500:]}"
            )
        for line in self.log_path.read_text().splitlines():
            if line.startswith('{"ready"'):
                self.ready_info = json.loads(line)
                self.ready_info["ready_after"] = time.monotonic() - self.started
                return True
        return False

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.poll_ready():
            if time.monotonic() > deadline:
                raise WarmRefused(f"template not ready within {timeout:g}s")
            time.sleep(0.02)

    def hand_over(
        self, spec: RunSpec, move: Callable[[int], None] | None, wait_child: bool
    ) -> WarmHandle:
        """Connect, send the spec, (move W into its scope), and return the started run."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        pidfd = -1
        try:
            sock.connect(str(self.socket_path))
            sock.settimeout(REPLY_TIMEOUT)
            sock.sendall(spec.message())
            reader = sock.makefile("rb")
            reply = json.loads(reader.readline() or b"{}")
            if "pid" not in reply:
                raise WarmRefused(reply.get("error", "no answer from the template"))
            pid = int(reply["pid"])
            # W waits for `go`, so it is alive now and its pid cannot be reused under the pidfd.
            if not wait_child:
                pidfd = os.pidfd_open(pid)
            if spec.scope:
                if move is None:
                    raise WarmRefused("a scope needs a move function")
                move(pid)
            sock.sendall(b'{"go": true}\n')
            started = json.loads(reader.readline() or b"{}")
            if "engine" not in started:
                raise WarmRefused(f"W {pid} did not start the engine")
            return WarmHandle(
                spec.run_id, pid, pidfd, int(started["engine"]), Path(spec.run_dir), wait_child
            )
        except BaseException as exc:
            if pidfd >= 0:
                os.close(pidfd)
            if isinstance(exc, OSError):
                raise WarmRefused(f"template unreachable: {exc}") from exc
            raise
        finally:
            sock.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()


class ForkTemplate:
    """(a) One template per flow python; every run is a fork of it."""

    def __init__(
        self, python: str, env: Mapping[str, str], workdir: Path, prefix: Sequence[str] = ()
    ) -> None:
        """`prefix`: e.g. `systemd-run --scope --unit=runner-agent-warm-<hash>.scope --`."""
        self.process = _Process("fork", python, env, workdir, "template", prefix)

    @property
    def pid(self) -> int:
        return self.process.proc.pid

    def wait_ready(self) -> None:
        self.process.wait_ready()

    def launch(self, spec: RunSpec, move: Callable[[int], None] | None = None) -> WarmHandle:
        return self.process.hand_over(spec, move, wait_child=False)

    def stop(self) -> None:
        self.process.stop()


class HandoverPool:
    """(b) `size` pre-started processes; each takes one run, and is replaced at once."""

    def __init__(self, python: str, env: Mapping[str, str], workdir: Path, size: int) -> None:
        self._python, self._env, self._workdir = python, dict(env), workdir
        self._count = 0
        self._lock = threading.Lock()
        self.taken_cold = 0
        self.waiting: list[_Process] = []
        self.used: list[_Process] = []
        for _ in range(size):
            self._refill()

    def _refill(self) -> None:
        self._count += 1
        self.waiting.append(
            _Process("handover", self._python, self._env, self._workdir, f"waiting-{self._count}")
        )

    def wait_ready(self) -> None:
        for process in self.waiting:
            process.wait_ready()

    def take(self, wait: bool) -> _Process:
        """A ready process (the oldest). None ready: WarmRefused (the agent starts the run
        cold), or with `wait` (measurement only) the oldest, once it is ready."""
        with self._lock:
            chosen = next((p for p in self.waiting if p.poll_ready()), None)
            if chosen is None and wait:
                chosen = self.waiting[0]
            if chosen is None:
                raise WarmRefused("no pre-started process is ready")
            self.waiting.remove(chosen)
            self.used.append(chosen)
            self._refill()
        chosen.wait_ready()
        return chosen

    def launch(
        self, spec: RunSpec, move: Callable[[int], None] | None = None, *, wait: bool = False
    ) -> WarmHandle:
        return self.take(wait).hand_over(spec, move, wait_child=True)

    def stop(self) -> None:
        for process in self.waiting + self.used:
            process.stop()
