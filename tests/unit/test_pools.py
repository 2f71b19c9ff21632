"""The work-pool poller against a faked API: the exact requests of Prefect's worker protocol
(pool read and create, worker heartbeat, scheduled runs per queue), which runs it takes, what a
pool run is made of, and the pool type's base job template."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest

from agent import pool_template
from agent.api import PrefectClient
from agent.claims import SLOT_RETRY, hold_pool_slot, within_pool_limit
from agent.pools import PoolPoller
from agent.reporting import Reporter
from agent.schemas import FlowRun
from agent.settings import Settings, load_settings

URL = "http://127.0.0.1:9/api"


class PoolServer:
    """Work pools, their scheduled runs, deployments and flows, as Prefect 3.8 answers them."""

    def __init__(self) -> None:
        self.pools: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, list[dict[str, Any]]] = {}
        self.deployments: dict[str, dict[str, Any]] = {}
        self.flows: dict[str, str] = {}
        self.requests: list[tuple[str, str, Any]] = []
        self.missing_queue: set[str] = set()  # pools whose polls answer 404 (queue not found)

    def add_pool(self, name: str, pool_type: str, template: dict[str, Any] | None = None) -> None:
        self.pools[name] = {
            "id": str(uuid4()),
            "name": name,
            "type": pool_type,
            "status": "NOT_READY",
            "base_job_template": template or {},
        }

    def add_run(self, pool: str, deployment: dict[str, Any], **fields: Any) -> str:
        run_id = str(uuid4())
        self.deployments[deployment["id"]] = deployment
        flow_run = {
            "id": run_id,
            "deployment_id": deployment["id"],
            "state": {"type": "SCHEDULED", "name": "Scheduled", "state_details": {}},
            **fields,
        }
        item = {"work_pool_id": self.pools[pool]["id"], "work_queue_id": str(uuid4())}
        self.runs.setdefault(pool, []).append({**item, "flow_run": flow_run})
        return run_id

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/api")
        body: Any = json.loads(request.content) if request.content else None
        self.requests.append((request.method, path, body))
        parts = path.strip("/").split("/")
        if request.method == "GET" and parts[0] == "work_pools":
            pool = self.pools.get(parts[1])
            return httpx.Response(200 if pool else 404, json=pool or {"detail": "not found"})
        if request.method == "POST" and path == "/work_pools/":
            self.add_pool(body["name"], body["type"], body["base_job_template"])
            return httpx.Response(201, json=self.pools[body["name"]])
        if path.endswith("/get_scheduled_flow_runs") and parts[1] in self.missing_queue:
            detail = f"Work pool queue '{parts[1]}/missing' not found."
            return httpx.Response(404, json={"detail": detail})
        if path.endswith("/get_scheduled_flow_runs"):
            return httpx.Response(200, json=self.runs.get(parts[1], [])[: body["limit"]])
        if path.endswith("/workers/heartbeat"):
            return httpx.Response(204)
        if parts[0] == "deployments":
            found = self.deployments.get(parts[1])
            return httpx.Response(200 if found else 404, json=found or {"detail": "not found"})
        if parts[0] == "flows":
            return httpx.Response(200, json={"id": parts[1], "name": self.flows[parts[1]]})
        return httpx.Response(404, json={"detail": f"not faked: {path}"})

    def deployment(self, **fields: Any) -> dict[str, Any]:
        flow_id = str(uuid4())
        self.flows[flow_id] = "hello-flow"
        return {"id": str(uuid4()), "name": "hello", "flow_id": flow_id, **fields}

    def calls(self, suffix: str) -> list[Any]:
        return [body for _, path, body in self.requests if path.endswith(suffix)]


def settings_with(tmp_path: Path, pools: str, agent: str = "") -> Settings:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'{pools}\n[agent]\nname = "host-1"\nstate_dir = "{tmp_path}/state"\n{agent}\n'
    )
    config.chmod(0o600)
    return load_settings(config, {})


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def poll(
    server: PoolServer, settings: Settings, free: int, clock: Clock | None = None
) -> tuple[PoolPoller, list[Any]]:
    client = PrefectClient(
        settings.api, transport=httpx.MockTransport(server.handler), max_attempts=1
    )
    async with client:
        poller = PoolPoller(client, lambda: settings, monotonic=clock or Clock())
        found = await poller.runnable(free, skip=())
        return poller, found


async def test_a_missing_pool_is_created_with_this_hosts_template(tmp_path: Path) -> None:
    server = PoolServer()
    settings = settings_with(tmp_path, '[[work_pool]]\nname = "hosts"\ncreate = true\n')
    await poll(server, settings, free=4)
    (created,) = server.calls("/work_pools/")
    assert created == {
        "name": "hosts",
        "type": "runner-agent",
        "description": "Runs flows in systemd scopes with cgroup limits (runner-agent).",
        "base_job_template": pool_template.base_job_template(settings.agent.job_variables),
    }
    properties = created["base_job_template"]["variables"]["properties"]
    assert sorted(properties) == ["cpu_quota", "env", "memory_max", "runtime_max", "tasks_max"]
    assert created["base_job_template"]["job_configuration"]["memory_max"] == "{{ memory_max }}"
    assert server.calls("/get_scheduled_flow_runs") == [
        {
            "scheduled_before": server.calls("/get_scheduled_flow_runs")[0]["scheduled_before"],
            "limit": 4,
        }
    ]


def test_the_template_offers_privileged_variables_only_where_the_host_allows_them() -> None:
    allowed = ("env", "user", "working_dir")
    properties = pool_template.base_job_template(allowed)["variables"]["properties"]
    assert "user" in properties and "working_dir" in properties and "python" not in properties
    assert all("default" not in spec for spec in properties.values())  # unset: the host's


async def test_a_missing_pool_without_create_is_reported_once_and_not_polled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = PoolServer()
    settings = settings_with(tmp_path, '[[work_pool]]\nname = "hosts"\n')
    caplog.set_level(logging.INFO, logger="agent.pools")
    for _ in range(3):
        _, found = await poll(server, settings, free=4)
    assert found == [] and server.calls("/work_pools/") == []
    assert server.calls("/get_scheduled_flow_runs") == []
    assert _count(caplog, "does not exist; set create = true") == 3  # one poller per poll


async def test_queues_free_slots_and_in_process_retries(tmp_path: Path) -> None:
    server = PoolServer()
    server.add_pool("hosts", "runner-agent")
    deployment = server.deployment(entrypoint="flows/hello.py:hello", pull_steps=[{"x": {}}])
    taken = server.add_run("hosts", deployment)
    server.add_run(
        "hosts",
        deployment,
        state={"type": "SCHEDULED", "name": "AwaitingRetry", "state_details": {}},
        empirical_policy={"retry_type": "in_process"},
    )
    settings = settings_with(tmp_path, '[[work_pool]]\nname = "hosts"\nqueues = ["high", "low"]')
    _, found = await poll(server, settings, free=2)
    assert [str(run.id) for run, _ in found] == [taken]
    (body,) = server.calls("/get_scheduled_flow_runs")
    assert body["work_queue_names"] == ["high", "low"] and body["limit"] == 2
    before = datetime.fromisoformat(body["scheduled_before"])
    assert before.tzinfo is not None and before > datetime.now(UTC)  # prefetch ahead


async def test_a_full_host_still_polls_with_limit_zero(tmp_path: Path) -> None:
    """What keeps the pool's queues READY in the UI while this host is busy."""
    server = PoolServer()
    server.add_pool("hosts", "runner-agent")
    server.add_run("hosts", server.deployment(entrypoint="f.py:f"))
    settings = settings_with(tmp_path, '[[work_pool]]\nname = "hosts"\n')
    _, found = await poll(server, settings, free=0)
    assert found == [] and [b["limit"] for b in server.calls("/get_scheduled_flow_runs")] == [0]


async def test_a_pool_run_is_made_from_its_deployment(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = PoolServer()
    template = {"variables": {"properties": {"env": {"default": {"A": "1"}}, "name": {}}}}
    server.add_pool("hosts", "process", template)
    with_steps = server.deployment(
        entrypoint="flows/hello.py:hello",
        pull_steps=[{"prefect.deployments.steps.git_clone": {"repository": "x"}}],
        job_variables={"memory_max": "300M", "command": "x"},
    )
    with_path = server.deployment(entrypoint="flow.py:f", path="/srv/code")
    relative = server.deployment(entrypoint="flow.py:f", path="code")
    no_entrypoint = server.deployment(path="/srv/code")
    for deployment in (with_steps, with_path, relative, no_entrypoint):
        server.add_run("hosts", deployment)
    settings = settings_with(tmp_path, '[[work_pool]]\nname = "hosts"\n')
    caplog.set_level(logging.INFO, logger="agent.pools")
    poller, found = await poll(server, settings, free=10)
    runs = [pool_run for _, pool_run in found]
    assert set(poller.flow_names().values()) == {"hello-flow"}  # for heartbeat events
    # Every pool run starts in a fresh directory of its own; the engine pulls or copies.
    assert [(r.pull_steps, r.deployment.path) for r in runs] == [
        (True, None),
        (False, None),
        (False, None),
        (False, None),
    ]
    assert runs[0].deployment.key == "hello-flow/hello"
    assert runs[0].pool_defaults == {"env": {"A": "1"}}
    assert runs[0].deployment_job_variables == {"memory_max": "300M", "command": "x"}
    assert runs[0].ignored == pool_template.PROCESS_ONLY
    assert [r.problem for r in runs][:3] == [None, None, None]
    assert runs[3].problem == "deployment 'hello' has no entrypoint, so no flow to run"
    assert _count(caplog, "job variable command has no meaning here and is ignored") == 1


async def test_pools_of_other_types_are_not_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = PoolServer()
    server.add_pool("k8s", "kubernetes")
    settings = settings_with(tmp_path, '[[work_pool]]\nname = "k8s"\n')
    caplog.set_level(logging.INFO, logger="agent.pools")
    _, found = await poll(server, settings, free=4)
    assert found == [] and server.calls("/get_scheduled_flow_runs") == []
    assert _count(caplog, "is of type 'kubernetes'") == 1


async def test_heartbeats_and_the_pool_is_reread_once_per_heartbeat_interval(
    tmp_path: Path,
) -> None:
    server = PoolServer()
    server.add_pool("hosts", "runner-agent")
    settings = settings_with(
        tmp_path, '[[work_pool]]\nname = "hosts"\n', agent='heartbeat_interval = "30s"'
    )
    clock = Clock()
    client = PrefectClient(
        settings.api, transport=httpx.MockTransport(server.handler), max_attempts=1
    )
    async with client:
        poller = PoolPoller(client, lambda: settings, monotonic=clock)
        await poller.heartbeat(every=30.0)  # the pool has not been read yet: nothing to beat for
        assert server.calls("/workers/heartbeat") == []
        await poller.runnable(4, skip=())
        await poller.heartbeat(every=30.0)
        for step in (10.0, 10.0, 15.0):
            clock.now += step
            await poller.runnable(4, skip=())
    assert server.calls("/workers/heartbeat") == [
        {"name": "host-1", "heartbeat_interval_seconds": 30}
    ]
    reads = [p for m, p, _ in server.requests if m == "GET" and p.startswith("/work_pools/")]
    assert len(reads) == 2  # at 100 s and at 135 s
    assert len(server.calls("/get_scheduled_flow_runs")) == 4


@pytest.mark.parametrize(
    ("pools", "problem"),
    [
        ('[[work_pool]]\nname = "a"\n[[work_pool]]\nname = "a"\n', "duplicate work pool 'a'"),
        ('[[work_pool]]\nname = "a"\nqueues = ["q", "q"]\n', "queue 'q' is listed twice"),
        ('[[work_pool]]\nname = "a"\ncreate = "yes"\n', "work_pool"),
        ('[[work_pool]]\nqueues = ["q"]\n', "name"),
        ("work_pool = 3\n", "expected [[work_pool]] tables"),
    ],
)
def test_bad_work_pool_config_names_the_problem(tmp_path: Path, pools: str, problem: str) -> None:
    from agent.settings import ConfigError

    with pytest.raises(ConfigError) as error:
        settings_with(tmp_path, pools)
    assert problem in str(error.value)


async def hold(
    tmp_path: Path,
    handler: Callable[[httpx.Request], httpx.Response],
    flow_run_id: UUID,
    limits: list[int],
) -> list[bool]:
    """`hold_pool_slot` for agent 'a' in pool "hosts" against `handler`, once per limit."""
    settings = settings_with(tmp_path, "")
    client = PrefectClient(settings.api, transport=httpx.MockTransport(handler), max_attempts=1)
    log = logging.LoggerAdapter(logging.getLogger("test"))
    async with client:
        return [
            await hold_pool_slot(
                client,
                Reporter(client),
                flow_run_id,
                pool="hosts",
                limit=limit,
                agent_name="a",
                log=log,
            )
            for limit in limits
        ]


def _count(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in record.getMessage() for record in caplog.records)


async def test_a_pool_dropped_by_a_reload_is_neither_watched_nor_beaten_for(
    tmp_path: Path,
) -> None:
    server = PoolServer()
    server.add_pool("hosts", "runner-agent")
    current = [settings_with(tmp_path, '[[work_pool]]\nname = "hosts"\n')]
    client = PrefectClient(
        current[0].api, transport=httpx.MockTransport(server.handler), max_attempts=1
    )
    async with client:
        poller = PoolPoller(client, lambda: current[0], monotonic=Clock())
        await poller.runnable(4, skip=())
        assert list(poller.pools()) == ["hosts"]
        current[0] = settings_with(tmp_path, "")
        await poller.heartbeat(every=30.0)
        assert poller.pools() == {} and server.calls("/workers/heartbeat") == []


def _active(run_id: str, state_type: str, second: int) -> FlowRun:
    when = datetime(2026, 12, 5, 8, 0, second, tzinfo=UTC).isoformat()
    return FlowRun.model_validate({"id": run_id, "state": {"type": state_type, "timestamp": when}})


def test_claims_within_a_pool_limit_are_ranked_alike_by_every_claimant() -> None:
    ids = [str(uuid4()) for _ in range(5)]
    active = [
        _active(ids[0], "PENDING", 9),  # the latest claim
        _active(ids[1], "RUNNING", 30),  # running: counted first, whatever its time
        _active(ids[2], "PENDING", 1),
        _active(ids[3], "RUNNING", 40),
        _active(ids[4], "PENDING", 5),
    ]
    kept = [run_id for run_id in ids if within_pool_limit(active, UUID(run_id), 4)]
    assert kept == ids[1:]  # the two RUNNING, then the claims at :01 and :05
    assert within_pool_limit(active, uuid4(), 1)  # a claim the read missed is kept
    assert not within_pool_limit(list(reversed(active)), UUID(ids[0]), 4)  # order-free


async def test_a_claim_over_the_pool_limit_is_given_back_as_awaiting_a_slot(
    tmp_path: Path,
) -> None:
    ours = str(uuid4())
    others = [_active(str(uuid4()), "RUNNING", 1), _active(str(uuid4()), "PENDING", 2)]
    seen: list[tuple[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((request.url.path, body))
        if request.url.path.endswith("/flow_runs/filter"):
            mine = _active(ours, "PENDING", 3).model_dump(mode="json")
            return httpx.Response(200, json=[*(o.model_dump(mode="json") for o in others), mine])
        return httpx.Response(201, json={"status": "ACCEPT", "state": body["state"]})

    assert await hold(tmp_path, handler, UUID(ours), [2, 3]) == [False, True]
    query = seen[0][1]
    assert query == {
        "work_pools": {"name": {"any_": ["hosts"]}},
        "flow_runs": {"state": {"type": {"any_": ["PENDING", "RUNNING"]}}},
        "limit": 200,
    }
    path, proposal = seen[1]
    assert path.endswith(f"/flow_runs/{ours}/set_state") and proposal["force"] is False
    state = proposal["state"]
    assert (state["type"], state["name"]) == ("SCHEDULED", "AwaitingConcurrencySlot")
    assert "concurrency limit (2)" in state["message"]
    due = datetime.fromisoformat(state["state_details"]["scheduled_time"])
    assert datetime.now(UTC) < due <= datetime.now(UTC) + SLOT_RETRY
    assert len(seen) == 3  # the second check kept the claim: no proposal


async def test_one_pools_trouble_holds_up_no_other_pool(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A queue not created yet (404) in the first pool: the second is polled all the same, and
    the problem is said once, not at every poll."""
    server = PoolServer()
    server.add_pool("broken", "runner-agent")
    server.add_pool("fine", "runner-agent")
    server.missing_queue.add("broken")
    run_id = server.add_run("fine", server.deployment(entrypoint="f.py:f"))
    pools = '[[work_pool]]\nname = "broken"\nqueues = ["missing"]\n[[work_pool]]\nname = "fine"\n'
    settings = settings_with(tmp_path, pools)
    caplog.set_level(logging.INFO, logger="agent.pools")
    client = PrefectClient(
        settings.api, transport=httpx.MockTransport(server.handler), max_attempts=1
    )
    async with client:
        poller = PoolPoller(client, lambda: settings, monotonic=Clock())
        for _ in range(3):
            found = await poller.runnable(4, skip=())
            assert [str(run.id) for run, _ in found] == [run_id]
        await poller.heartbeat(every=30.0)
    # Both exist: both hear from their worker (Prefect's workers heartbeat whatever the poll).
    heartbeats = [p for _, p, _ in server.requests if p.endswith("/workers/heartbeat")]
    assert heartbeats == [
        "/work_pools/broken/workers/heartbeat",
        "/work_pools/fine/workers/heartbeat",
    ]
    assert _count(caplog, "queue 'broken/missing' not found") == 1


@pytest.mark.parametrize(
    ("now", "kept", "proposed"),
    [
        ({"type": "PENDING", "message": "Claimed by runner-agent 'a'"}, True, ["SCHEDULED"]),
        ({"type": "PENDING", "message": "Claimed by runner-agent 'b'"}, False, ["SCHEDULED"]),
        ({"type": "CANCELLING", "message": None}, False, ["SCHEDULED", "CANCELLED"]),
    ],
)
async def test_a_refused_give_back_is_settled_by_the_run_as_the_server_has_it(
    tmp_path: Path, now: dict[str, Any], kept: bool, proposed: list[str]
) -> None:
    ours = str(uuid4())
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/flow_runs/filter"):
            full = [_active(str(uuid4()), "RUNNING", 1), _active(ours, "PENDING", 3)]
            return httpx.Response(200, json=[r.model_dump(mode="json") for r in full])
        if path.endswith("/set_state"):
            body = json.loads(request.content)
            seen.append(body)
            if body["state"]["type"] == "SCHEDULED":  # a cancellation came first
                return httpx.Response(201, json={"status": "REJECT", "state": now})
            return httpx.Response(201, json={"status": "ACCEPT", "state": body["state"]})
        return httpx.Response(200, json={"id": ours, "state": now})

    assert await hold(tmp_path, handler, UUID(ours), [1]) == [kept]
    assert [b["state"]["type"] for b in seen] == proposed
    assert all(b["force"] is (b["state"]["type"] == "CANCELLED") for b in seen)


async def test_a_run_whose_deployment_is_gone_is_taken_to_be_crashed_not_left_blocking(
    tmp_path: Path,
) -> None:
    """As under Prefect's workers: a run at the head of the queue that cannot be run must not
    hold up the runs behind it for ever. Listed twice, it is taken once."""
    server = PoolServer()
    server.add_pool("hosts", "runner-agent")
    gone = server.deployment(entrypoint="f.py:f")
    orphan = server.add_run("hosts", gone)
    del server.deployments[gone["id"]]
    server.runs["hosts"].append(server.runs["hosts"][0])  # a hostile answer lists it twice
    fine = server.add_run("hosts", server.deployment(entrypoint="f.py:f"))
    settings = settings_with(tmp_path, '[[work_pool]]\nname = "hosts"\n')
    _, found = await poll(server, settings, free=4)
    assert [str(run.id) for run, _ in found] == [orphan, fine]
    problem = found[0][1].problem
    assert problem is not None and "does not exist (deleted?)" in problem
    assert found[1][1].problem is None
