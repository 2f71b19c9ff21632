"""A clean Debian 12 booted with systemd, as the package tests use it: shell in, write files.

The container itself (debootstrapped root, nspawn, clean-up) is the system tests' test bed;
this is only the thin interface the package tests need on top of it.
"""

from __future__ import annotations

import contextlib
import subprocess
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path

from tests.system.testbed import Container

FLOWS = textwrap.dedent(
    """
    import time
    from prefect import flow

    @flow(log_prints=True)
    def hello():
        print("hello from the packaged agent")

    @flow(log_prints=True)
    def sleeper(seconds: float = 20):
        time.sleep(seconds)
        print(f"slept {seconds}s")
    """
)


SNAPSHOT_PRUNE = (
    "/proc",
    "/sys",
    "/var/cache/apt",
    "/var/lib/apt",
    "/var/log",
    "/root",
    "/tmp",
    "/var/tmp",
)


class GuestCommandFailed(AssertionError):
    pass


class Guest:
    """Commands in the booted container, as root, through `sh -c`; stdout as text."""

    def __init__(self, container: Container) -> None:
        self.container = container

    def sh(
        self,
        script: str,
        *,
        check: bool = True,
        timeout: float = 600,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
    ) -> str:
        proc: subprocess.CompletedProcess[str] = self.container.exec(
            ["sh", "-c", script], check=False, timeout=timeout, env=env, input=input
        )
        if check and proc.returncode != 0:
            raise GuestCommandFailed(
                f"in the container: {script!r} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc.stdout

    def systemctl(self, *args: str) -> None:
        """`systemctl ARGS` that must succeed; a failure carries the agent's journal."""
        proc = self.container.exec(["systemctl", *args], check=False, timeout=300)
        if proc.returncode != 0:
            raise GuestCommandFailed(
                f"systemctl {' '.join(args)} exited {proc.returncode}: {proc.stderr}\n"
                f"journal of runner-agent.service:\n{self.journal()}"
            )

    def active(self, unit: str = "runner-agent.service") -> str:
        return self.sh(f"systemctl is-active {unit} || true").strip()

    def snapshot(self) -> set[str]:
        """Every path of the container's root file system, except apt's and the logs' own
        bookkeeping and home/tmp directories (which flows, not packages, write to)."""
        pruned = " -o ".join(f"-path {p}" for p in SNAPSHOT_PRUNE)
        return set(self.sh(f"find / -xdev \\( {pruned} \\) -prune -o -print").split("\n")) - {""}

    def packages(self) -> set[str]:
        """Installed packages (for telling dependencies' files from leftovers)."""
        out = self.sh("dpkg-query -W -f '${db:Status-Status} ${Package}\\n'")
        return {line.split()[1] for line in out.splitlines() if line.startswith("installed ")}

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        self.container.write_file(path, text, mode)

    def journal(self, unit: str = "runner-agent.service", lines: int = 80) -> str:
        return "\n".join(self.container.journal(unit, "-o", "cat").splitlines()[-lines:])


@contextlib.contextmanager
def boot_guest(root: Path, *, binds: Mapping[Path, str], prefect_venv: Path) -> Iterator[Guest]:
    """A clean bookworm (overlay over the cached root) with `binds` and the flows' venv mounted.

    The Prefect venv is bound at its own path: it is the flows' interpreter and its scripts
    carry absolute shebangs. Limits need not be enforced for the package tests.
    """
    binds_ro = [f"{src}:{dst}" for src, dst in binds.items()]
    binds_ro.append(f"{prefect_venv}:{prefect_venv}")
    with Container.debian(root, binds_ro=binds_ro, enforce_limits=False) as container:
        yield Guest(container)
