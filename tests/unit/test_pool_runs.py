"""A work pool's run through the supervisor: where it starts (a fresh directory for pull steps,
the deployment's path, or a working_dir job variable), its job-variable layers (pool defaults <
deployment < run), the variables of a process pool that mean nothing here, and the runs that
cannot be started (each ends CRASHED naming why, and is never launched)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import uuid4

from agent.hooks import HookKind
from agent.launch.base import LaunchRequest
from agent.pools import RECORD_KEY, PoolRun, _deployment
from tests.unit.fakes import FakeHandle, FakeHooks, FakeLauncher, FakePrefect
from tests.unit.supervision import make_settings, proposed_types, supervise


class DirLauncher(FakeLauncher):
    """Notes whether the run's working directory existed when it was launched."""

    def __init__(self) -> None:
        super().__init__(status=0)
        self.existed: list[bool] = []

    async def launch(self, request: LaunchRequest) -> FakeHandle:
        self.existed.append(request.working_dir.is_dir())
        return await super().launch(request)


def pool_run(
    *,
    pull_steps: bool = True,
    pool_type: str = "runner-agent",
    pool_defaults: dict[str, Any] | None = None,
    job_variables: dict[str, Any] | None = None,
    problem: str | None = None,
) -> PoolRun:
    return PoolRun(
        pool="hosts",
        pool_type=pool_type,
        deployment=_deployment("hello", "hello-flow", "flows/hello.py:hello"),
        pool_defaults=pool_defaults or {},
        deployment_job_variables=job_variables or {},
        pull_steps=pull_steps,
        problem=problem,
    )


def messages(server: FakePrefect) -> list[str]:
    return [str(entry["message"]) for entry in server.logs]


def crash_message(server: FakePrefect) -> str:
    crashed = [p["state"] for p in server.proposals if p["state"]["type"] == "CRASHED"]
    assert len(crashed) == 1, proposed_types(server)
    return str(crashed[0]["message"])


async def test_pull_steps_run_in_a_fresh_directory_removed_after_the_run(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    server = FakePrefect(uuid4(), job_variables={"cpu_quota": "75%"})
    launcher = DirLauncher()
    run = pool_run(
        pool_defaults={"memory_max": "1G", "tasks_max": 64},
        job_variables={"memory_max": "300M"},
    )
    supervisor, _ = await supervise(settings, server, launcher, pool_run=run)
    code = settings.agent.state_dir / "runs" / str(server.run_id) / "code"
    (request,) = launcher.requests
    assert request.working_dir == code and launcher.existed == [True]
    assert not code.exists()
    # Pool default < deployment < run; what nobody set is the host's.
    assert (request.memory_max, request.tasks_max) == (300 * 1024**2, 64)
    assert request.cpu_quota == 75
    assert request.python == "/opt/venv/bin/python"
    assert request.deployment_name == "hello"
    assert "Job variables applied: cpu_quota, memory_max, tasks_max" in messages(server)
    layers = supervisor.record.extra["job_variables"]
    assert list(layers) == ["work pool", "deployment", "flow run"]
    assert supervisor.record.extra[RECORD_KEY]["pool"] == "hosts"


async def test_without_pull_steps_the_run_still_starts_in_a_fresh_directory(
    tmp_path: Path,
) -> None:
    """The engine copies the deployment's `path` in, as under Prefect's process worker: the
    server's `path` never chooses where the run starts (that is the privileged working_dir)."""
    settings = make_settings(tmp_path)
    server = FakePrefect(uuid4())
    launcher = DirLauncher()
    await supervise(settings, server, launcher, pool_run=pool_run(pull_steps=False))
    code = settings.agent.state_dir / "runs" / str(server.run_id) / "code"
    assert [r.working_dir for r in launcher.requests] == [code] and launcher.existed == [True]


async def test_a_process_pools_own_variables_are_ignored_and_its_env_applies(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path)
    server = FakePrefect(uuid4())
    launcher = DirLauncher()
    run = pool_run(
        pool_type="process",
        pool_defaults={"stream_output": True, "command": "python -m x"},
        job_variables={"env": {"GREETING": "hi"}, "labels": {"a": "b"}},
    )
    await supervise(settings, server, launcher, pool_run=run)
    (request,) = launcher.requests
    assert request.env["GREETING"] == "hi"
    assert "Job variables applied: env" in messages(server)


async def test_working_dir_from_a_deployment_needs_the_hosts_allowance(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    server = FakePrefect(uuid4())
    launcher = DirLauncher()
    run = pool_run(job_variables={"working_dir": str(tmp_path)})
    await supervise(settings, server, launcher, pool_run=run)
    assert launcher.requests == []
    message = crash_message(server)
    assert "'working_dir' (from the deployment)" in message
    assert "agent.job_variables" in message


async def test_a_pool_default_working_dir_the_host_does_not_allow_is_ignored(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path)
    server = FakePrefect(uuid4())
    launcher = DirLauncher()
    run = pool_run(pool_defaults={"working_dir": str(tmp_path)})
    await supervise(settings, server, launcher, pool_run=run)
    (request,) = launcher.requests
    assert request.working_dir == settings.agent.state_dir / "runs" / str(server.run_id) / "code"
    assert any("default working_dir is ignored" in m for m in messages(server))


async def test_an_allowed_working_dir_is_where_the_run_starts(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, 'job_variables = ["env", "working_dir"]')
    server = FakePrefect(uuid4(), job_variables={"working_dir": f"{tmp_path}/"})
    launcher = DirLauncher()
    await supervise(settings, server, launcher, pool_run=pool_run())
    assert [r.working_dir for r in launcher.requests] == [tmp_path]


async def test_a_working_dir_that_is_not_a_normalised_absolute_path_is_refused(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, 'job_variables = ["working_dir"]')
    for value in ("relative/dir", f"{tmp_path}/../etc", "//srv", 7):
        server = FakePrefect(uuid4(), job_variables={"working_dir": value})
        launcher = DirLauncher()
        await supervise(settings, server, launcher, pool_run=pool_run())
        assert launcher.requests == [], value
        assert "'working_dir' (from the flow run)" in crash_message(server), value


async def test_working_dir_is_for_pool_runs_and_never_the_agents_own_directories(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, 'job_variables = ["working_dir"]')
    cases = [
        (None, str(tmp_path), "applies to work-pool runs only"),
        (pool_run(), str(settings.agent.state_dir / "storage"), "state or runtime directory"),
        (pool_run(), str(settings.agent.runtime_dir), "state or runtime directory"),
    ]
    for run, value, problem in cases:
        server = FakePrefect(uuid4(), job_variables={"working_dir": value})
        launcher = DirLauncher()
        await supervise(settings, server, launcher, pool_run=run)
        assert launcher.requests == [], value
        assert problem in crash_message(server), value


async def test_a_pool_run_with_a_problem_is_claimed_crashed_and_never_launched(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path)
    server = FakePrefect(uuid4())
    launcher = DirLauncher()
    run = pool_run(problem="deployment 'hello' has no entrypoint, so no flow to run")
    await supervise(settings, server, launcher, pool_run=run)
    assert launcher.requests == []
    assert proposed_types(server) == ["PENDING", "CRASHED"]
    assert "has no entrypoint" in crash_message(server)


def test_a_pool_run_survives_its_record() -> None:
    run = pool_run(
        pull_steps=False,
        pool_type="process",
        pool_defaults={"env": {"A": "1"}},
        job_variables={"memory_max": "1G"},
    )
    back = PoolRun.from_record(run.to_record())
    assert back is not None and back.to_record() == run.to_record()
    assert back.deployment.key == "hello-flow/hello" and back.ignored == run.ignored
    junks: list[Any] = [None, [], {"pool": "x"}, {**run.to_record(), "pool_defaults": 7}]
    for junk in junks:
        assert PoolRun.from_record(junk) is None, junk


async def test_a_pool_runs_crash_hooks_load_the_flow_as_its_engine_does(tmp_path: Path) -> None:
    """Through the deployment and its pull steps (no entrypoint given), in the run's directory,
    as Prefect's Runner loads the flow for its hooks."""
    settings = make_settings(tmp_path)
    server = FakePrefect(uuid4())
    hooks = FakeHooks()

    def engine() -> None:
        server.state = {"type": "RUNNING", "name": "Running", "message": None}

    launcher = FakeLauncher(status=3, engine=engine)
    await supervise(settings, server, launcher, hooks=hooks, pool_run=pool_run())
    assert hooks.kinds() == [HookKind.CRASHED]
    _, request, entrypoint = hooks.ran[0]
    assert entrypoint is None
    assert request.working_dir == settings.agent.state_dir / "runs" / str(server.run_id) / "code"
