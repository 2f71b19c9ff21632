"""How the pool starts and stops templates: leftovers stopped first, the prefix (systemd-run
--scope) and the template's own environment, the templates of warm deployments, the pool's
exit (also while a template is still being started, or waits to be restarted)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import psutil
import pytest

from agent.run_settings import FlowRunSettings
from agent.warm import pool as pool_module
from agent.warm.launcher import WarmHandle
from agent.warm.memory import read_state
from agent.warm.pool import Template, WarmPool
from tests.unit.fakes.warm import (
    Clock,
    eventually,
    exit_with,
    key_for,
    make_request,
    ready,
    template_of,
    templates,
    warm_pool,
    warm_setup,
)


async def test_the_pools_exit_cancels_a_pending_restart(
    tmp_path: Path, flow_python: Path, clock: Clock
) -> None:
    async with warm_pool(tmp_path / "warm", clock=clock) as pool:
        key = key_for(flow_python)
        pool.keep([key])
        template = await ready(pool, key)
        assert template.pid is not None
        os.kill(template.pid, signal.SIGKILL)
        await eventually(lambda: template_of(pool, key) is None, "noticed")
        assert len(pool._restarts) == 1  # sleeping RETRY_AFTER before the restart
    assert pool._restarts == set()
    assert templates(pool) == [] and read_state(tmp_path / "warm") == []


async def test_leftovers_are_stopped_once_before_the_first_template(
    tmp_path: Path,
    flow_python: Path,
) -> None:
    calls: list[str] = []
    gate = asyncio.Event()

    async def stop_leftovers() -> None:
        calls.append("stop")
        await gate.wait()

    async with warm_pool(tmp_path / "warm", before_first_start=stop_leftovers) as pool:
        one, two = key_for(flow_python), key_for(flow_python, PYTHONUNBUFFERED="1")
        pool.ensure(one)
        pool.ensure(two)
        await eventually(lambda: calls, "the leftovers are being stopped")
        assert [t.process for t in templates(pool)] == [None, None]  # nothing started yet
        gate.set()
        for key in (one, two):
            await ready(pool, key)
        assert calls == ["stop"]


async def test_the_template_runs_behind_the_prefix_with_only_its_environment(
    tmp_path: Path,
    flow_python: Path,
) -> None:
    seen: list[tuple[str, str]] = []

    def prefix(unit: str, what: str) -> list[str]:
        seen.append((unit, what))
        return ["/usr/bin/env", "FROM_THE_PREFIX=1"]

    options = {"prefix": prefix, "extra_env": {"XDG_RUNTIME_DIR": "/run/user/0"}}
    async with warm_pool(tmp_path / "warm", **options) as pool:
        key = key_for(flow_python, LC_ALL="C.UTF-8")
        template = await ready(pool, key)
        assert seen == [
            (
                f"runner-agent-warm-{key.id}-1.scope",
                f"runner-agent warm engine template for {flow_python}",
            )
        ]
        assert template.unit == seen[0][0]
        proc = psutil.Process(template.pid)
        assert proc.cmdline() == [
            str(flow_python),
            str(pool_module.PROGRAM),
            f"{key.id}-1.sock",
            str(os.getpid()),  # the agent it dies with
        ]
        assert proc.cwd() == str(tmp_path / "warm")
        assert proc.environ() == {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "PREFECT_HOME": str(tmp_path / "warm" / "prefect-home"),
            "XDG_RUNTIME_DIR": "/run/user/0",
            "FROM_THE_PREFIX": "1",
        }
        assert (tmp_path / "warm").stat().st_mode & 0o777 == 0o700
        assert template.socket_path.stat().st_mode & 0o777 == 0o600  # the agent's alone


async def test_keep_warm_starts_the_templates_of_warm_deployments(
    tmp_path: Path,
    flow_python: Path,
) -> None:
    env = {"PYTHONUNBUFFERED": "1", "OTHER": "x"}
    async with warm_setup(tmp_path, flow_python) as harness:
        harness.launcher.keep_warm(
            [
                FlowRunSettings(python=str(flow_python), engine="warm", env=env),
                FlowRunSettings(python=str(flow_python), engine="cold"),
                FlowRunSettings(python="relative/python", engine="warm"),
            ]
        )
        assert harness.pool._kept == {key_for(flow_python, **env)}
        req = make_request(harness.base, flow_python, exit_with(0), **env)
        await harness.ready(req)
        handle = await harness.launch(req)
        assert isinstance(handle, WarmHandle)  # its first run is warm already
        assert await handle.wait() == 0


@pytest.mark.parametrize("stage", ["spawning", "stopping-leftovers"])
async def test_the_pools_exit_stops_a_template_that_was_still_being_started(
    tmp_path: Path, flow_python: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    """The agent is told to stop right after keep_warm(): its templates are still starting."""
    signalled: list[int] = []
    terminate = asyncio.subprocess.Process.terminate

    def record(process: asyncio.subprocess.Process) -> None:
        signalled.append(process.pid)
        terminate(process)

    monkeypatch.setattr(asyncio.subprocess.Process, "terminate", record)
    gate = asyncio.Event()

    async def stop_leftovers() -> None:
        await gate.wait()

    options = {"before_first_start": stop_leftovers} if stage == "stopping-leftovers" else {}
    pool = WarmPool(tmp_path / "warm", **options)  # type: ignore[arg-type]
    await pool.__aenter__()
    key = key_for(flow_python)
    pool.ensure(key)
    template = template_of(pool, key)
    assert template is not None and spawned(template) is None
    leaving = asyncio.ensure_future(pool.__aexit__(None, None, None))
    try:
        await asyncio.sleep(0)  # the exit has begun
        gate.set()
        process = await eventually(
            lambda: spawned(template) or leaving.done(), "spawned, or the pool has left"
        )
        if isinstance(process, asyncio.subprocess.Process):
            # Spawned after the pool let go of it: only a signal from the pool ends it.
            await eventually(
                lambda: template.pid is not None or process.returncode is not None or signalled,
                "the template answered or ended",
            )
            assert process.pid in signalled
        await leaving
    finally:
        process = spawned(template)
        if process is not None and process.returncode is None:
            process.kill()
        await asyncio.wait_for(leaving, timeout=60)


def spawned(template: Template) -> asyncio.subprocess.Process | None:
    return template.process
