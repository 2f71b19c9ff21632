"""The demo behind `packaging/dev.sh demo`.

It starts a local Prefect server (SQLite, in a temporary PREFECT_HOME), writes a demo flow and an
agent config with one deployment, starts `runner-agent run`, asks the server for a run of the demo
deployment and waits for it to end COMPLETED. Everything it started is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.integration.prefect_server import PrefectServer  # noqa: E402

FLOW = """
from prefect import flow, get_run_logger


@flow(log_prints=True)
def hello(name: str = "runner-agent"):
    get_run_logger().info("running under %s", __import__("os").environ.get("TMPDIR"))
    print(f"Hello from {name}!")
    return f"hello {name}"
"""


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def write_config(workdir: Path, api_url: str, python: str, flow_dir: Path) -> Path:
    config = workdir / "agent.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [api]
            url = "{api_url}"

            [agent]
            name = "demo"
            poll_interval = "2s"
            state_dir = "{workdir / "state"}"
            runtime_dir = "{workdir / "run"}"

            [flow_run]
            python = "{python}"
            memory_max = "1G"
            runtime_max = "10m"

            [[deployment]]
            name = "demo-hello"
            flow_name = "hello"
            entrypoint = "hello.py:hello"
            path = "{flow_dir}"
            parameters = {{ name = "the demo" }}
            tags = ["demo"]
            description = "The runner-agent demo deployment"
            """
        )
    )
    config.chmod(0o600)
    return config


def wait_for_deployment(api: httpx.Client, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = api.get("/deployments/name/hello/demo-hello")
        if response.status_code == 200:
            return str(response.json()["id"])
        time.sleep(0.5)
    raise SystemExit("[demo] the agent did not register the deployment in time")


def wait_for_final(api: httpx.Client, flow_run_id: str, timeout: float = 120) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        state = api.get(f"/flow_runs/{flow_run_id}").json()["state"]
        if state["type"] != last:
            say(f"flow run is {state['type']}")
            last = state["type"]
        if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return dict(state)
        time.sleep(0.5)
    raise SystemExit("[demo] the flow run did not finish in time")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prefect-venv", type=Path, required=True)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="runner-agent-demo-"))
    flow_dir = workdir / "flows"
    flow_dir.mkdir()
    (flow_dir / "hello.py").write_text(FLOW)
    server = PrefectServer(args.prefect_venv, workdir / "prefect-home")
    agent: subprocess.Popen[bytes] | None = None
    agent_log = workdir / "agent.log"
    try:
        say(f"starting a Prefect server (SQLite) on {server.api_url}; first start takes ~20 s")
        server.start()
        config = write_config(workdir, server.api_url, server.python, flow_dir)
        say(f"starting runner-agent with {config}")
        with agent_log.open("wb") as log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "agent", "--config", str(config), "run"],
                stdout=log,
                stderr=log,
                cwd=REPO,
                env={k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
            )
        with httpx.Client(base_url=server.api_url, timeout=30) as api:
            deployment_id = wait_for_deployment(api)
            say(f"deployment demo-hello registered ({deployment_id}); creating a flow run")
            response = api.post(f"/deployments/{deployment_id}/create_flow_run", json={})
            response.raise_for_status()
            flow_run_id = response.json()["id"]
            state = wait_for_final(api, flow_run_id)
            logs = api.post(
                "/logs/filter",
                json={
                    "logs": {"flow_run_id": {"any_": [flow_run_id]}},
                    "limit": 50,
                },
            ).json()
            for entry in logs:
                say(f"  run log: {entry['message']}")
        if state["type"] != "COMPLETED":
            say(f"flow run ended {state['type']}: {state.get('message')}")
            say("agent log tail:\n" + agent_log.read_text(errors="replace")[-3000:])
            return 1
        say(f"flow run {flow_run_id} COMPLETED through runner-agent")
        return 0
    finally:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(timeout=20)
            except subprocess.TimeoutExpired:
                agent.kill()
        server.stop()
        if args.keep:
            say(f"kept {workdir}")
        else:
            subprocess.run(["rm", "-rf", str(workdir)], check=False)


if __name__ == "__main__":
    raise SystemExit(main())
