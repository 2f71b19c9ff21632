"""Work-pool pickup (runner-agent only): a pool deployment's runs beside a config deployment's.

One agent serves both: its config has the `[[deployment]]`s of the other scenarios and a
`[[work_pool]]` it creates. Once the pool exists, the benchmark makes a deployment of it through
the API, as `prefect deploy` would (no pull steps: the engine starts in its absolute `path`),
with the same flow and entrypoint as the config's no-op deployment. Then runs of the two are
created one at a time, alternating, so both see the same load, and measured as the sequential
scenario measures them (bench/scenarios.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench import scenarios
from bench.api import BenchApi, BenchError, wait_until
from bench.scenarios import Sequential, percentile
from bench.subjects import NOOP_FLOW, Contender

POOL = "bench-pool"
POOL_DEPLOYMENT = "pool-noop"
NOOP_ENTRYPOINT = "flows.py:noop"  # the config's `agent-noop` runs the same (bench/subjects.py)
POOL_TIMEOUT = 120.0

# tests/bench parses the table by this header and these labels.
TABLE_HEADER = (
    "| deployment | runs | created → PENDING, p50 | p95 | created → RUNNING, p50 | p95 "
    "| not COMPLETED |"
)
POOL_ROW = f"work pool `{POOL}`"
CONFIG_ROW = "config `[[deployment]]`"


@dataclass
class PoolPickup:
    pool: Sequential = field(default_factory=lambda: Sequential([]))
    config: Sequential = field(default_factory=lambda: Sequential([]))


def pool_exists(api: BenchApi, name: str) -> bool:
    try:
        api.request("GET", f"/work_pools/{name}")
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 404:
            return False
        raise
    return True


def create_deployment(api: BenchApi, pool: str, flows_dir: Path) -> str:
    """A deployment of `pool` without pull steps; both requests are upserts, safe to retry."""
    flow = api.request("POST", "/flows/", json={"name": NOOP_FLOW}).json()
    body = {
        "name": POOL_DEPLOYMENT,
        "flow_id": flow["id"],
        "work_pool_name": pool,
        "entrypoint": NOOP_ENTRYPOINT,
        "path": str(flows_dir.resolve()),
        "enforce_parameter_schema": False,
    }
    return str(api.request("POST", "/deployments/", json=body).json()["id"])


def measure(
    api: BenchApi,
    contender: Contender,
    flows_dir: Path,
    runs: int,
    result: PoolPickup,
    settle: float,
) -> None:
    """`runs` runs of each deployment, alternating; `result` fills as they end."""
    flow, name = contender.deployments["noop"]
    config_id = api.wait_deployment(flow, name, timeout=POOL_TIMEOUT)
    try:
        wait_until(
            lambda: pool_exists(api, POOL),
            POOL_TIMEOUT,
            interval=0.5,
            what=f"the agent to create work pool {POOL!r}",
        )
    except BenchError as exc:
        raise BenchError(f"{exc}; log tail:\n{contender.log_tail()}") from exc
    pool_id = create_deployment(api, POOL, flows_dir)
    time.sleep(settle)
    for _ in range(runs):
        for deployment_id, into in ((pool_id, result.pool), (config_id, result.config)):
            into.timelines.extend(scenarios.sequential(api, contender, deployment_id, 1).timelines)


def _figure(values: list[float], q: float) -> str:
    return f"{percentile(values, q):.2f} s" if values else "n/a"


def section(result: PoolPickup | None) -> list[str]:
    """The report's "Work-pool pickup" section; nothing when the scenario was not run."""
    if result is None:
        return []
    lines = [
        "",
        "## Work-pool pickup",
        "",
        f"runner-agent only, one agent serving a `[[work_pool]]` (`{POOL}`, `create = true`) and "
        "its config's `[[deployment]]`s. The pool's deployment was made through the API "
        f"(no pull steps, the flows' directory as `path`, `{NOOP_ENTRYPOINT}` as the config's "
        "no-op deployment); runs of the two were created one at a time, alternating, each after "
        "the previous one was final. Latencies by the server's state timestamps, as above.",
        "",
        TABLE_HEADER,
        "|---|---|---|---|---|---|---|",
    ]
    for label, seq in ((POOL_ROW, result.pool), (CONFIG_ROW, result.config)):
        pickup, start = seq.values("pickup"), seq.values("start")
        total = len(seq.timelines)
        lines.append(
            f"| {label} | {total} | {_figure(pickup, 50)} | {_figure(pickup, 95)} "
            f"| {_figure(start, 50)} | {_figure(start, 95)} | {total - seq.completed} of {total} |"
        )
    return lines
