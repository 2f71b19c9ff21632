"""Start and stop a real Prefect server for the test session (pins and recipe: FACTS.md).

The server runs from the Prefect venv that packaging/dev.sh builds and names in
RUNNER_AGENT_TEST_PREFECT_VENV. That venv's python is also the flows' interpreter. The server
gets its own PREFECT_HOME (so its own SQLite database), a free loopback port and its own process
group, so that `stop()` can take down everything it spawned and `start()` can bring it back on
the same port and database (outage tests).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path

import httpx
from pydantic import SecretStr

from tests.integration.server_http import server_client

VENV_ENV = "RUNNER_AGENT_TEST_PREFECT_VENV"
START_TIMEOUT = 90.0
STOP_TIMEOUT = 20.0
_PR_SET_PDEATHSIG = 1


class PrefectServerError(RuntimeError):
    pass


def prefect_venv(environ: Mapping[str, str]) -> Path:
    """The Prefect venv named by the environment, or a clear instruction to get one."""
    value = environ.get(VENV_ENV, "")
    if not value:
        raise PrefectServerError(
            f"{VENV_ENV} is not set: integration tests need the Prefect venv that "
            "packaging/dev.sh builds. Run them with `bash packaging/dev.sh test [pytest args]`, "
            "or export the PREFECT_VENV path that `bash packaging/dev.sh setup` prints as "
            f"{VENV_ENV}."
        )
    venv = Path(value)
    if not (venv / "bin" / "python").is_file() or not (venv / "bin" / "prefect").is_file():
        raise PrefectServerError(
            f"{VENV_ENV}={value} has no bin/python and bin/prefect; "
            "rebuild it with `bash packaging/dev.sh setup`"
        )
    return venv


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_flow_dir(tmp_path: Path, source: str, *, filename: str = "flow.py") -> Path:
    """Write `source` (dedented) as `<new dir>/<filename>` under tmp_path; return the directory."""
    for n in range(1000):
        directory = tmp_path / (f"flows-{n}" if n else "flows")
        try:
            directory.mkdir(parents=True)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - a thousand flow dirs in one test
        raise RuntimeError(f"no free flow directory name under {tmp_path}")
    (directory / filename).write_text(textwrap.dedent(source))
    return directory


def _die_with_parent() -> None:
    # If pytest itself is killed, the server must not outlive it.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class PrefectServer:
    """One real Prefect server: `start()`, `stop()`, and where to reach it."""

    def __init__(
        self,
        venv: Path,
        home: Path,
        *,
        port: int | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.venv = venv
        self.home = home
        self.port = port or free_port()
        self.extra_env = dict(extra_env or {})
        self.log_path = home / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def python(self) -> str:
        """The Prefect venv's interpreter (a str: configs and argv take it as is)."""
        return str(self.venv / "bin" / "python")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def env(self) -> dict[str, str]:
        """The environment for the server and for flows run by hand against it."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_API_URL=self.api_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_UI_ENABLED="false",
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = START_TIMEOUT) -> None:
        if self.running:
            return
        self.home.mkdir(parents=True, exist_ok=True)
        argv = [
            str(self.venv / "bin" / "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        with self.log_path.open("ab") as log:
            log.write(f"\n--- starting {' '.join(argv)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                argv,
                cwd=self.home,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # pytest starts it from its only thread
            )
        atexit.register(self.stop)
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        # No transport retries: this loop is the retry, and it watches the process between tries.
        with server_client(self.api_url, retry=False, timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self._proc is not None and self._proc.poll() is not None:
                    raise PrefectServerError(
                        f"Prefect server exited with status {self._proc.returncode} during "
                        f"start-up; log tail:\n{self.log_tail()}"
                    )
                try:
                    response = client.get("/health")
                    if response.status_code == 200 and response.json() is True:
                        return
                    last = f"HTTP {response.status_code}: {response.text[:200]}"
                except (httpx.HTTPError, ValueError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
                time.sleep(0.5)
        raise PrefectServerError(
            f"Prefect server at {self.api_url} not healthy after {timeout:.0f}s ({last}); "
            f"log tail:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Terminate the server's whole process group; SIGKILL what ignores SIGTERM."""
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # The leader may be gone while a child lingers in the group: make sure none does.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no server log: {exc})"


class StaticApiConfig:
    """The attributes `agent.api.PrefectClient` reads, for tests that build a client directly."""

    def __init__(
        self,
        url: str,
        *,
        key: str | None = None,
        auth_string: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.url = url
        self.key = SecretStr(key) if key is not None else None
        self.auth_string = SecretStr(auth_string) if auth_string is not None else None
        self.timeout = timeout
