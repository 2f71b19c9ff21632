"""A real systemd 252, booted with systemd-nspawn, with cgroup limits that are enforced.

Used by the system and package tests (see docs/systemd.md, "The test bed"):

    with Container.host() as c:            # the host's own OS, volatile root (~2 s)
        c.exec(["systemd-run", "--scope", "-p", "MemoryMax=50M", "--", "true"])
    with Container.debian(build_debian_root()) as c:   # a clean, cached debootstrapped bookworm

How limits are enforced on this hybrid-cgroup host (no systemd as PID 1): the container gets
its own child cgroup under the launching process's cgroup in every v1 controller hierarchy (and
in the name=systemd and cgroup2 trees, so that nspawn's `supervisor`/`payload` cgroups are ours
and never shared with another engineer's container). Once booted, the controllers nspawn mounted
read-only are remounted read-write inside the container's mount and cgroup namespaces and the
container's systemd is re-executed, so it writes memory.limit_in_bytes, pids.max, cfs quotas.

Every name we create starts with PREFIX and carries the creating process's pid, so leftovers of
a crashed session are recognisable (and are removed at the next start only when their creator is
gone). Cleanup runs on context exit, at interpreter exit, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, TypeVar

log = logging.getLogger(__name__)

PREFIX = "ratb"
CACHE = Path(os.environ.get("RUNNER_AGENT_TEST_CACHE", "/var/cache/runner-agent-tests"))
CGROUP_ROOT = Path("/sys/fs/cgroup")
# cpu needs cpuacct writable too, or systemd skips CPUQuota (FACTS.md).
LIMIT_CONTROLLERS = frozenset({"memory", "cpu", "cpuacct", "pids"})
V1_CONTROLLERS = frozenset(
    {
        "cpu",
        "cpuacct",
        "memory",
        "pids",
        "blkio",
        "devices",
        "freezer",
        "cpuset",
        "net_cls",
        "net_prio",
        "perf_event",
        "hugetlb",
        "rdma",
        "misc",
    }
)
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEBOOTSTRAP_INCLUDE = "systemd,systemd-sysv,dbus,python3,ca-certificates"

T = TypeVar("T")


class TestBedError(RuntimeError):
    """The test bed could not be set up, or a command inside it failed."""

    __test__ = False  # not a pytest test class


# ---------------------------------------------------------------------------------------------
# cgroups


@dataclasses.dataclass(frozen=True)
class Hierarchy:
    """One cgroup hierarchy as this process sees it."""

    key: str  # the /proc/self/cgroup controller field: "memory", "cpu,cpuacct", "name=systemd", ""
    mountpoint: Path
    own: str  # this process's cgroup in it, e.g. "/process_api/abc"

    @property
    def controllers(self) -> frozenset[str]:
        return frozenset(self.key.split(",")) if self.key else frozenset()

    @property
    def own_dir(self) -> Path:
        return self.mountpoint / self.own.lstrip("/")


def _cgroup_mounts() -> dict[str, Path]:
    """Controller key (as in /proc/self/cgroup) -> mount point, from /proc/self/mountinfo."""
    mounts: dict[str, Path] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        fstype, _source, options = post.split(" ")[:3]
        mountpoint = Path(pre.split(" ")[4].replace("\\040", " "))
        if fstype == "cgroup2":
            mounts.setdefault("", mountpoint)
        elif fstype == "cgroup":
            names = [o for o in options.split(",") if o in V1_CONTROLLERS or o.startswith("name=")]
            mounts.setdefault(",".join(sorted(names)), mountpoint)
    return mounts


def hierarchies_for(pid: int | str = "self") -> list[Hierarchy]:
    """The hierarchies a container needs: the limit controllers plus both tracking trees."""
    mounts = _cgroup_mounts()
    found: list[Hierarchy] = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _id, key, path = line.split(":", 2)
        wanted = not key or key == "name=systemd" or bool(set(key.split(",")) & LIMIT_CONTROLLERS)
        mountpoint = mounts.get(",".join(sorted(key.split(","))) if key else "")
        if wanted and mountpoint is not None:
            found.append(Hierarchy(key, mountpoint, path))
    missing = LIMIT_CONTROLLERS - set().union(*(h.controllers for h in found))
    if missing:
        raise TestBedError(f"cgroup v1 controllers not mounted: {sorted(missing)}")
    return found


def _walk_up(top: Path) -> list[Path]:
    """Every directory of a cgroup tree, deepest first."""
    dirs = [Path(d) for d, _subdirs, _files in os.walk(top)]
    return sorted(dirs, key=lambda p: len(p.parts), reverse=True)


def cgroup_pids(top: Path) -> set[int]:
    """All processes anywhere in a cgroup tree."""
    pids: set[int] = set()
    for directory in _walk_up(top):
        with contextlib.suppress(OSError):
            pids.update(int(p) for p in (directory / "cgroup.procs").read_text().split())
    return pids


def remove_cgroup_tree(top: Path) -> None:
    """rmdir depth-first; the kernel refuses (EBUSY) while a process is in it."""
    for directory in _walk_up(top):
        try:
            directory.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise TestBedError(f"cannot remove cgroup {directory}: {exc}") from exc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_NAME = re.compile(rf"^{PREFIX}-(\d+)-[0-9a-f]+$")


def _creator_alive(name: str) -> bool:
    match = _NAME.match(name)
    return match is None or _pid_alive(int(match.group(1)))


def _nspawn_pids() -> dict[int, str]:
    """Running systemd-nspawn processes with our prefix: pid -> machine name."""
    found: dict[int, str] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not argv[0].endswith(b"systemd-nspawn"):
            continue
        for arg in argv:
            if arg.startswith(f"--machine={PREFIX}-".encode()):
                found[int(proc.name)] = arg.split(b"=", 1)[1].decode()
    return found


def clean_stale() -> list[str]:
    """Remove what crashed sessions left: only our prefix, only when the creator pid is gone.

    A leftover container is powered off (SIGKILL after a grace); a leftover cgroup tree is
    removed only if no process is in it. Returns what was cleaned, for the log.
    """
    cleaned: list[str] = []
    for pid, name in _nspawn_pids().items():
        if _creator_alive(name):
            continue
        cleaned.append(f"container {name} (nspawn {pid})")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # nspawn forwards it to the container as a poweroff
        deadline = time.monotonic() + 15
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for hierarchy in hierarchies_for():
        # Siblings of other sessions live at different depths (memory is per-session here).
        for directory in hierarchy.mountpoint.glob(f"**/{PREFIX}-*"):
            if not directory.is_dir() or _creator_alive(directory.name):
                continue
            # A container just powered off above may need a moment to empty its cgroups.
            deadline = time.monotonic() + 5
            while cgroup_pids(directory) and time.monotonic() < deadline:
                time.sleep(0.2)
            if cgroup_pids(directory):
                log.warning("stale cgroup %s still has processes; left alone", directory)
                continue
            with contextlib.suppress(TestBedError):
                remove_cgroup_tree(directory)
                cleaned.append(f"cgroup {directory}")
    # nspawn leaves an empty directory per machine here ("we can't allow that" in its log).
    for directory in Path("/run/systemd/nspawn/propagate").glob(f"{PREFIX}-*"):
        if not _creator_alive(directory.name):
            with contextlib.suppress(OSError):
                directory.rmdir()
    for directory in Path(tempfile.gettempdir()).glob(f"{PREFIX}-*.*"):  # console logs
        if _NAME.match(directory.name.split(".")[0]) and not _creator_alive(
            directory.name.split(".")[0]
        ):
            shutil.rmtree(directory, ignore_errors=True)
            cleaned.append(f"console log {directory}")
    return cleaned


# ---------------------------------------------------------------------------------------------
# Process-wide cleanup. Signal handlers and atexit are process-wide by nature, so the set of
# live containers is too; it is only touched by Container.start/close.


class _Reaper:
    def __init__(self) -> None:
        self.live: set[Container] = set()
        self.installed = False

    def add(self, container: Container) -> None:
        if not self.installed:
            atexit.register(self.close_all)
            with contextlib.suppress(ValueError):  # not the main thread: atexit still covers us
                previous = signal.getsignal(signal.SIGTERM)
                signal.signal(signal.SIGTERM, self._make_handler(previous))
            self.installed = True
        self.live.add(container)

    def close_all(self) -> None:
        for container in list(self.live):
            with contextlib.suppress(Exception):
                container.close()

    def _make_handler(self, previous: signal._HANDLER) -> Callable[[int, FrameType | None], None]:
        def handler(signum: int, frame: FrameType | None) -> None:
            self.close_all()
            # Re-raise: the previous disposition (by default: die of SIGTERM) takes over.
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            os.kill(os.getpid(), signum)

        return handler


_REAPER = _Reaper()


# ---------------------------------------------------------------------------------------------
# The container


def _wait(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TestBedError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Container:
    """A booted systemd container; use as a context manager (or start()/close())."""

    def __init__(
        self,
        root: Path,
        *,
        volatile: str,
        binds: Sequence[str] = (),
        binds_ro: Sequence[str] = (),
        setenv: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        boot_timeout: float = 90.0,
        enforce_limits: bool = True,
        name: str | None = None,
    ) -> None:
        self.root = root
        self.volatile = volatile
        self.binds = tuple(binds)
        self.binds_ro = tuple(binds_ro)
        self.setenv = dict(setenv or {})
        self.extra_args = tuple(extra_args)
        self.boot_timeout = boot_timeout
        self.enforce_limits = enforce_limits
        self.name = name or f"{PREFIX}-{os.getpid()}-{secrets.token_hex(4)}"
        self.hierarchies: list[tuple[Hierarchy, Path]] = []  # with our child cgroup in each
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.leader = 0  # the container's PID 1, as seen from the host
        self._logdir: Path | None = None
        self._closed = False

    @classmethod
    def host(cls, *, writable_usr: bool = False, **kwargs: Any) -> Container:
        """The host's own OS: tmpfs root, the host's /usr read-only (FACTS.md).

        `writable_usr` puts a tmpfs overlay on /usr (e.g. to install /usr/bin/runner-agent);
        the host's /usr is never written.
        """
        extra = ["--overlay=/usr::/usr"] if writable_usr else []
        extra += kwargs.pop("extra_args", ())
        return cls(Path("/"), volatile="yes", extra_args=extra, **kwargs)

    @classmethod
    def debian(cls, root: Path, **kwargs: Any) -> Container:
        """A debootstrapped root; writes go to a tmpfs overlay, the cached root stays pristine."""
        return cls(root, volatile="overlay", **kwargs)

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Container:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def nspawn_argv(self) -> list[str]:
        argv = [
            "systemd-nspawn",
            "--quiet",
            "--keep-unit",
            "--register=no",
            f"--machine={self.name}",
            f"--directory={self.root}",
            f"--volatile={self.volatile}",
        ]
        argv += [f"--bind={b}" for b in self.binds]
        argv += [f"--bind-ro={b}" for b in self.binds_ro]
        argv += [f"--setenv={k}={v}" for k, v in self.setenv.items()]
        # tmp.mount would hide binds under /tmp (a checkout in /tmp, as CI may use); the volatile
        # root is a tmpfs already, so /tmp stays in memory without it.
        argv += [
            *self.extra_args,
            "--boot",
            "--",
            "systemd.firstboot=off",
            "systemd.mask=tmp.mount",
        ]
        return argv

    def start(self) -> None:
        if shutil.which("systemd-nspawn") is None:
            raise TestBedError("systemd-nspawn is missing: apt-get install systemd-container")
        for what in clean_stale():
            log.info("removed stale %s", what)
        _REAPER.add(self)
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        for hierarchy in hierarchies_for():
            path = hierarchy.own_dir / self.name
            path.mkdir()
            self.hierarchies.append((hierarchy, path))
        # Only the wrapper (and so nspawn and the container) joins the child cgroups, never us.
        script = (
            'while [ "$1" != -- ]; do echo $$ > "$1/cgroup.procs" || exit 97; shift; done;'
            ' shift; exec "$@"'
        )
        cgroups = [str(path) for _hierarchy, path in self.hierarchies]
        argv = ["sh", "-c", script, "sh", *cgroups, "--", *self.nspawn_argv()]
        log.info("booting %s: %s", self.name, shlex.join(self.nspawn_argv()))
        self._logdir = Path(tempfile.mkdtemp(prefix=f"{self.name}."))
        with self.console_log.open("wb") as console:
            # A session of its own: a Ctrl-C in the terminal reaches pytest, which powers off.
            self.nspawn = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.leader = _wait(self._find_leader, 30, f"{self.name}'s PID 1")
        self.wait_running()
        if self.setenv:
            # nspawn's --setenv reaches PID 1 only; services get the manager's environment.
            self.systemctl("set-environment", *(f"{k}={v}" for k, v in self.setenv.items()))
        if self.enforce_limits:
            self._make_controllers_writable()
            self.verify_limits_enforced()

    def _find_leader(self) -> int:
        assert self.nspawn is not None
        if self.nspawn.poll() is not None:
            raise TestBedError(
                f"systemd-nspawn exited with {self.nspawn.returncode}:\n{self.console_tail()}"
            )
        try:
            children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
            for child in children.read_text().split():
                nspid = [
                    ln
                    for ln in Path(f"/proc/{child}/status").read_text().splitlines()
                    if ln.startswith("NSpid:")
                ]
                if nspid and nspid[0].split()[-1] == "1":
                    return int(child)
        except OSError:
            pass
        return 0

    def system_state(self) -> str:
        result = self.exec(["systemctl", "is-system-running"], check=False, timeout=30)
        return result.stdout.strip()

    def wait_running(self, timeout: float | None = None) -> str:
        """Until `is-system-running` is running (or degraded: failed units are logged)."""

        def settled() -> str:
            self._check_alive()
            state = self.system_state()
            return state if state in ("running", "degraded") else ""

        try:
            state = _wait(settled, timeout or self.boot_timeout, f"{self.name} to boot", 0.3)
        except TestBedError as exc:
            jobs = self.exec(["systemctl", "list-jobs", "--no-legend"], check=False).stdout
            raise TestBedError(
                f"{exc}; pending jobs:\n{jobs}\nconsole:\n{self.console_tail()}"
            ) from None
        if state == "degraded":
            failed = self.exec(["systemctl", "--failed", "--no-legend", "--plain"], check=False)
            log.warning("%s is degraded; failed units:\n%s", self.name, failed.stdout)
        return state

    def _check_alive(self) -> None:
        if self.nspawn is None or self.nspawn.poll() is not None:
            raise TestBedError(f"container {self.name} is gone:\n{self.console_tail()}")

    def _make_controllers_writable(self) -> None:
        remounts: list[str] = []
        for line in Path(f"/proc/{self.leader}/mountinfo").read_text().splitlines():
            pre, _, post = line.partition(" - ")
            fstype, _source, options = post.split(" ")[:3]
            controllers = [o for o in options.split(",") if o in LIMIT_CONTROLLERS]
            if fstype == "cgroup" and controllers:
                mountpoint = shlex.quote(pre.split(" ")[4])
                remounts.append(
                    f"umount {mountpoint} && mount -t cgroup -o nosuid,nodev,noexec,"
                    f"{','.join(controllers)} cgroup {mountpoint}"
                )
        if not remounts:
            raise TestBedError(f"no v1 controller mounts found in {self.name}")
        # Mount and cgroup namespaces only: the new mounts are rooted at the container's cgroup.
        subprocess.run(
            [
                "nsenter",
                "-t",
                str(self.leader),
                "-m",
                "-C",
                "--",
                "sh",
                "-ec",
                " && ".join(remounts),
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        self.exec(["systemctl", "daemon-reexec"], timeout=60)
        self.wait_running()

    def close(self) -> None:
        """Power off, wait, SIGKILL what is left, remove our cgroups. Idempotent."""
        if self._closed:
            return
        self._closed = True
        problems: list[str] = []
        try:
            if self.nspawn is not None and self.nspawn.poll() is None:
                self._power_off()
            for _hierarchy, path in self.hierarchies:
                self._kill_tree(path)
            for _hierarchy, path in reversed(self.hierarchies):
                try:
                    remove_cgroup_tree(path)
                except TestBedError as exc:
                    problems.append(str(exc))
            with contextlib.suppress(OSError):
                Path("/run/systemd/nspawn/propagate", self.name).rmdir()
            if self._logdir is not None:
                shutil.rmtree(self._logdir, ignore_errors=True)
        finally:
            _REAPER.live.discard(self)
        if problems:
            raise TestBedError("; ".join(problems))

    def _power_off(self) -> None:
        assert self.nspawn is not None
        if self.leader:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.exec(["systemctl", "poweroff", "--no-block"], check=False, timeout=10)
        else:
            self.nspawn.terminate()  # nspawn turns SIGTERM into a poweroff of the container
        try:
            self.nspawn.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log.warning("%s did not power off in 30 s; killing it", self.name)
            self.nspawn.kill()
            self.nspawn.wait(timeout=10)

    @staticmethod
    def _kill_tree(path: Path) -> None:
        for _attempt in range(50):
            pids = cgroup_pids(path)
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        raise TestBedError(f"processes survive SIGKILL in {path}: {sorted(cgroup_pids(path))}")

    @property
    def console_log(self) -> Path:
        """The container's console output (removed by close())."""
        if self._logdir is None:
            raise TestBedError(f"container {self.name} was never started")
        return self._logdir / "console.log"

    def console_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError, TestBedError):
            text = self.console_log.read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    # -- inside the container -----------------------------------------------------------------

    def exec(
        self,
        args: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 120,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in all of the container's namespaces, with a clean environment.

        A command killed by signal N returns 128+N (shell convention), as `exit 137` for SIGKILL.
        """
        if not self.leader:
            raise TestBedError(f"container {self.name} is not running")
        clean = {"PATH": CONTAINER_PATH, "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "TERM": "dumb"}
        clean.update(env or {})
        argv = [
            "nsenter",
            "-t",
            str(self.leader),
            "-a",
            "--",
            "env",
            "-i",
            *(f"{k}={v}" for k, v in clean.items()),
            *args,
        ]
        stdin = None if input is not None else subprocess.DEVNULL
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=stdin,
            check=False,
        )
        if result.returncode < 0:  # nsenter re-raises its child's signal on itself
            result.returncode = 128 - result.returncode
        if check and result.returncode != 0:
            raise TestBedError(
                f"{shlex.join(args)} exited {result.returncode} in {self.name}:\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def sh(self, script: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.exec(["sh", "-c", script], **kwargs)

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.exec(["systemctl", *args], check=check)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        argv = ["systemctl", "show", unit]
        if props:
            argv.append("--property=" + ",".join(props))
        out = self.exec(argv).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str | None = None, *args: str) -> str:
        """The journal (of one unit), after a sync so that recent lines are in."""
        self.exec(["journalctl", "--sync"], check=False)
        argv = ["journalctl", "--no-pager", "-q", *(["-u", unit] if unit else []), *args]
        return self.exec(argv, check=False).stdout

    def wait_for(
        self, predicate: Callable[[], T], timeout: float = 30, what: str = "condition"
    ) -> T:
        return _wait(predicate, timeout, what)

    def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        self.exec(
            [
                "sh",
                "-c",
                'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"',
                "sh",
                path,
                f"{mode:o}",
            ],
            input=text,
        )

    def read_file(self, path: str) -> str:
        return self.exec(["cat", path]).stdout

    def copy_in(self, src: Path, dst: str) -> None:
        """Copy a host file or directory tree into the container (tar through the pipe)."""
        src = Path(src)
        tar = subprocess.run(
            ["tar", "-C", str(src.parent), "-cf", "-", src.name], capture_output=True, check=True
        )
        argv = [
            "nsenter",
            "-t",
            str(self.leader),
            "-a",
            "--",
            "sh",
            "-c",
            'set -e; t=$(mktemp -d); tar -C "$t" -xf -; mkdir -p "$(dirname "$1")";'
            ' rm -rf "$1"; mv "$t/$2" "$1"; rmdir "$t"',
            "sh",
            dst,
            src.name,
        ]
        subprocess.run(argv, input=tar.stdout, check=True, capture_output=True, timeout=120)

    def start_scope(
        self,
        unit: str,
        command: str,
        *properties: str,
        slice_: str | None = None,
        timeout: float = 30,
    ) -> None:
        """Start a long-lived `systemd-run --scope` in the background; returns once active.

        `unit` is the full name (`x.scope`); stop it with `systemctl stop`.
        """
        argv = ["systemd-run", "--quiet", "--scope", f"--unit={unit}"]
        argv += [f"--slice={slice_}"] if slice_ else []
        for prop in properties:
            argv += ["-p", prop]
        argv += ["--", "sh", "-c", command]
        self.exec(["sh", "-c", '"$@" </dev/null >/dev/null 2>&1 &', "sh", *argv])
        self.wait_for(
            lambda: self.show(unit, "ActiveState")["ActiveState"] == "active",
            timeout,
            f"{unit} to be active",
        )

    def cgroup_dir(self, controller: str, unit_path: str = "/") -> Path:
        """Host path of a cgroup of the container, e.g. ("memory", "/system.slice/x.scope")."""
        for hierarchy, path in self.hierarchies:
            if controller in hierarchy.controllers or controller == hierarchy.key:
                return path / unit_path.lstrip("/")
        raise TestBedError(f"no {controller} hierarchy")

    def verify_limits_enforced(self) -> None:
        """Fail loudly when the bed records limits but does not enforce them."""
        probe = f"{PREFIX}-probe-{secrets.token_hex(3)}"
        result = self.exec(
            [
                "systemd-run",
                "--quiet",
                "--scope",
                f"--unit={probe}",
                "-p",
                "MemoryMax=50M",
                "--",
                "python3",
                "-c",
                "x = 'x' * (200 << 20); print(len(x))",
            ],
            check=False,
            timeout=60,
        )
        if result.returncode != 137:
            raise TestBedError(
                f"MemoryMax=50M is not enforced in {self.name}: a 200 MB "
                f"allocation exited {result.returncode}: {result.stderr}"
            )


def install_units(container: Container, repo: Path) -> None:
    """The working tree's systemd/ units into the container's /etc/systemd/system."""
    for unit in sorted((repo / "systemd").iterdir()):
        if unit.suffix in (".service", ".slice"):
            container.write_file(f"/etc/systemd/system/{unit.name}", unit.read_text())
    container.systemctl("daemon-reload")


def install_agent(container: Container, venv: Path) -> None:
    """/usr/bin/runner-agent running the working tree through the dev venv (as the package's).

    Needs a writable /usr (`Container.host(writable_usr=True)`) and the venv and the checkout
    bound in at their own paths (the venv's install is editable).
    """
    container.write_file(
        "/usr/bin/runner-agent", f'#!/bin/sh\nexec {venv}/bin/python3 -I -m agent "$@"\n', 0o755
    )


# ---------------------------------------------------------------------------------------------
# A clean debootstrapped bookworm, cached


def debootstrap_argv(
    target: Path, suite: str = "bookworm", mirror: str = "http://deb.debian.org/debian"
) -> list[str]:
    return [
        "debootstrap",
        "--variant=minbase",
        f"--include={DEBOOTSTRAP_INCLUDE}",
        suite,
        str(target),
        mirror,
    ]


def debian_root_path(
    cache: Path = CACHE, suite: str = "bookworm", mirror: str = "http://deb.debian.org/debian"
) -> Path:
    key = hashlib.sha256(" ".join(debootstrap_argv(Path("-"), suite, mirror)).encode())
    return cache / f"debian-{suite}-{key.hexdigest()[:12]}"


def _unmount_below(path: Path) -> None:
    """debootstrap mounts /proc and /sys into its target; an interrupted one leaves them."""
    mounts = [ln.split(" ")[4] for ln in Path("/proc/self/mountinfo").read_text().splitlines()]
    for mountpoint in sorted((m for m in mounts if m.startswith(f"{path}/")), reverse=True):
        subprocess.run(["umount", "-l", mountpoint], check=False)


def build_debian_root(
    cache: Path = CACHE,
    suite: str = "bookworm",
    mirror: str = "http://deb.debian.org/debian",
    timeout: float = 900,
) -> Path:
    """The cached root (built on first use, ~70 s). Built aside and renamed when complete.

    A lock serialises parallel sessions; a temp dir of a dead builder is removed first.
    """
    final = debian_root_path(cache, suite, mirror)
    if final.is_dir():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / f"{final.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():
            return final
        for stale in cache.glob(f".{final.name}.tmp-*"):
            if not _pid_alive(int(stale.name.rsplit("-", 1)[1])):
                _unmount_below(stale)
                subprocess.run(["rm", "-rf", "--one-file-system", str(stale)], check=False)
        tmp = cache / f".{final.name}.tmp-{os.getpid()}"
        log.info("debootstrapping %s (about 70 s)", final)
        try:
            result = subprocess.run(
                debootstrap_argv(tmp, suite, mirror),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            if result.returncode != 0:
                raise TestBedError(
                    f"debootstrap failed ({result.returncode}):\n"
                    f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
                )
            tmp.rename(final)
        finally:
            if tmp.exists():
                _unmount_below(tmp)
                subprocess.run(["rm", "-rf", "--one-file-system", str(tmp)], check=False)
    return final
