"""Runs the real `runner-agent run` as a subprocess against the session's Prefect server."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.integration.server_http import server_client

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
# A claim's PENDING message (agent.claims.claim_message); group 1 is the agent's name.
CLAIM = re.compile(r"^Claimed by runner-agent '([^']+)'$")


def render_config(
    sections: Mapping[str, Mapping[str, Any]],
    deployments: Sequence[Mapping[str, Any]],
    work_pools: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The agent's TOML: one table per section, then one `[[deployment]]` per deployment and one
    `[[work_pool]]` per work pool."""
    # Imported here: the .deb build's unit tests import bench (which uses this module) in a venv
    # that has the runtime and packaging/test-requirements.txt only, not tomli_w.
    import tomli_w

    document: dict[str, Any] = {name: dict(values) for name, values in sections.items()}
    if deployments:
        document["deployment"] = [dict(deployment) for deployment in deployments]
    if work_pools:
        document["work_pool"] = [dict(pool) for pool in work_pools]
    return tomli_w.dumps(document)


class AgentProcess:
    def __init__(
        self,
        workdir: Path,
        *,
        api_url: str,
        python: str,
        deployments: Sequence[dict[str, Any]],
        name: str = "agent",
        agent: dict[str, Any] | None = None,
        flow_run: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        work_pools: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        self.workdir = workdir
        self.name = name
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "agent.toml"
        agent_section = {
            "name": name,
            "limit": 4,
            "poll_interval": "1s",
            "prefetch": "5s",
            "heartbeat_interval": "5s",
            "cancel_grace": "5s",
            "launcher": "process",
            "state_dir": str(workdir / "state"),
            "runtime_dir": str(workdir / "run"),
        }
        agent_section.update(agent or {})
        flow_run_section: dict[str, Any] = {"python": python}
        flow_run_section.update(flow_run or {})
        # `[flow_run] engine` (docs/warm-engine.md); "warm" runs need their templates ready.
        self.engine = str(flow_run_section.get("engine", "cold"))
        self.pythons = sorted({str(d.get("python", python)) for d in deployments})
        self.config_path.write_text(
            render_config(
                {
                    "api": {"url": api_url, "timeout": "10s"},
                    "agent": agent_section,
                    "flow_run": flow_run_section,
                },
                deployments,
                work_pools,
            )
        )
        self.config_path.chmod(0o600)
        self.log_path = workdir / "agent.log"
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RUNNER_AGENT_"))
        }
        self.env.pop("NOTIFY_SOCKET", None)
        self.env.pop("JOURNAL_STREAM", None)
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent",
                "--config",
                str(self.config_path),
                "--log-level",
                "debug",
                "run",
            ],
            stdout=log,
            stderr=log,
            env=self.env,
            start_new_session=True,
        )
        log.close()

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"agent {self.name} did not stop within {timeout}s") from None
        return self.proc.returncode

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def warm_ready(self, python: str) -> bool:
        """Whether the agent said that its warm template for `python` is ready; raises when it
        said that the template cannot serve (refused, could not start, exited)."""
        for record in self.records():
            message = str(record.get("message", ""))
            if not message.startswith("warm template ") or f" for {python} " not in message:
                continue
            if " is ready " in message:
                return True
            if any(w in message for w in ("refused to serve", "could not start", "exited")):
                raise AssertionError(f"the warm template of {python} cannot serve: {message}")
        return False

    def wait_warm(self, timeout: float = 240) -> None:
        """With engine "warm": until the templates of the deployments' pythons are ready.

        A run never waits for a template (one that is still importing means a cold start), so
        a test of warm runs creates them only after this. Pythons that do not exist have no
        template (their runs start cold and crash as they would). Cold: returns at once.
        """
        if self.engine != "warm":
            return
        pythons = [p for p in self.pythons if Path(p).exists()]
        try:
            wait_for(
                lambda: all(self.warm_ready(p) for p in pythons),
                timeout,
                interval=1.0,
                what=f"the warm templates of {pythons}",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the agent's log: {self.log_text()[-3000:]}") from None


@contextmanager
def running_agent(*args: Any, **kwargs: Any) -> Iterator[AgentProcess]:
    agent = AgentProcess(*args, **kwargs)
    agent.start()
    try:
        agent.wait_warm()
        yield agent
    finally:
        agent.stop()
        # Leave no flow process behind, whatever happened in the test.
        kill_process_groups_under(agent.workdir)


def kill_process_groups_under(workdir: Path) -> None:
    """Kill the processes of the test's directory, and all their descendants.

    A process is the test's when its cwd, its command line or its TMPDIR points into the
    directory, or when it holds a file there open: a warm run's supervisor holds its run
    directory open, and its engine, a descendant, shows the template's argv and environment
    (docs/warm-engine.md), so only the descendants rule finds it.
    """
    import psutil

    marker = str(workdir)
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline", "cwd", "environ"]):
        try:
            info = proc.info
            environ = info.get("environ") or {}
            mine = (
                marker in " ".join(info.get("cmdline") or [])
                or marker in (info.get("cwd") or "")
                or marker in environ.get("TMPDIR", "")
                or _holds_open_under(proc.pid, marker)
            )
            if mine and proc.pid != os.getpid():
                found[proc.pid] = proc
                found.update((child.pid, child) for child in proc.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in found.values():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.kill()


def _holds_open_under(pid: int, marker: str) -> bool:
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            link = str(fd.readlink())
            if link == marker or link.startswith(f"{marker}/"):
                return True
    return False


def wait_for(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.5, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


class Api:
    """Small synchronous helper for test assertions against the real server.

    Retries the server's transient answers (tests/integration/server_http.py); `retry=False`
    sees every answer as it comes, for a test that watches an outage.
    """

    def __init__(self, api_url: str, *, retry: bool = True) -> None:
        self.client = server_client(api_url, retry=retry)

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self.client.request(method, url, **kwargs)

    def deployment_id(self, flow_name: str, name: str) -> str | None:
        response = self.request("GET", f"/deployments/name/{flow_name}/{name}")
        return response.json()["id"] if response.status_code == 200 else None

    def wait_deployment(self, flow_name: str, name: str, timeout: float = 30) -> str:
        return str(
            wait_for(
                lambda: self.deployment_id(flow_name, name), timeout, what=f"deployment {name}"
            )
        )

    def pool_deployment(
        self,
        pool: str,
        flow_name: str,
        name: str,
        *,
        pool_type: str = "runner-agent",
        **fields: Any,
    ) -> str:
        """A deployment of work pool `pool` (made, of `pool_type`, when missing), as
        `prefect deploy` makes one; its id."""
        if self.request("GET", f"/work_pools/{pool}").status_code == 404:
            made = self.request("POST", "/work_pools/", json={"name": pool, "type": pool_type})
            made.raise_for_status()
        flow = self.request("POST", "/flows/", json={"name": flow_name})
        flow.raise_for_status()
        body = {"name": name, "flow_id": flow.json()["id"], "work_pool_name": pool, **fields}
        deployment = self.request("POST", "/deployments/", json=body)
        deployment.raise_for_status()
        return str(deployment.json()["id"])

    def create_run(self, deployment_id: str, **body: Any) -> str:
        """A new run of the deployment; the idempotency key makes a retried creation safe."""
        body.setdefault("idempotency_key", str(uuid.uuid4()))
        response = self.request("POST", f"/deployments/{deployment_id}/create_flow_run", json=body)
        response.raise_for_status()
        return str(response.json()["id"])

    def run(self, flow_run_id: str) -> dict[str, Any]:
        response = self.request("GET", f"/flow_runs/{flow_run_id}")
        response.raise_for_status()
        return dict(response.json())

    def state(self, flow_run_id: str) -> dict[str, Any]:
        return dict(self.run(flow_run_id)["state"] or {})

    def wait_final(self, flow_run_id: str, timeout: float = 90) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            state = self.state(flow_run_id)
            return state if state.get("type") in FINAL else None

        return dict(wait_for(final, timeout, what=f"run {flow_run_id} to finish"))

    def history(self, flow_run_id: str) -> list[dict[str, Any]]:
        response = self.request("GET", "/flow_run_states/", params={"flow_run_id": flow_run_id})
        response.raise_for_status()
        return sorted(response.json(), key=lambda s: s["timestamp"])

    def logs(self, flow_run_id: str) -> list[str]:
        response = self.request(
            "POST",
            "/logs/filter",
            json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200},
        )
        response.raise_for_status()
        return [entry["message"] for entry in response.json()]

    def wait_logs(self, flow_run_id: str, *texts: str, timeout: float = 20.0) -> list[str]:
        """The run's log messages once each of `texts` is in one of them.

        The agent ships its messages in batches (about a second) and a run can be final sooner.
        """
        seen: list[str] = []

        def found() -> bool:
            seen[:] = self.logs(flow_run_id)
            return all(any(text in m for m in seen) for text in texts)

        try:
            wait_for(found, timeout, interval=0.2, what=f"log messages {texts} of {flow_run_id}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; messages: {seen}") from None
        return list(seen)

    def close(self) -> None:
        self.client.close()
