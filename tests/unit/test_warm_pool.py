"""WarmPool for real (templates run by a throwaway venv's python with a fake `prefect`): every
way a run falls back to a cold start, and says why; a template's life (refusal, death, venv
change, idleness, restarts)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.launch.base import LaunchRequest, SubprocessHandle
from agent.warm import pool as pool_module
from agent.warm.launcher import WarmHandle
from agent.warm.pool import IDLE_STOP, RETRY_AFTER, Template
from tests.unit.fakes.warm import (
    BLOCK,
    Clock,
    Warm,
    eventually,
    exit_with,
    gone,
    launch_warm,
    refusal,
    site_packages,
    template_of,
    templates,
    warm_setup,
    write_fake_packages,
)


@pytest.fixture
async def warm(tmp_path: Path, flow_python: Path, clock: Clock) -> AsyncIterator[Warm]:
    async with warm_setup(tmp_path, flow_python, clock=clock) as harness:
        yield harness


def cold_because(caplog: pytest.LogCaptureFixture, req: LaunchRequest) -> list[str]:
    """The reasons the agent logged for starting `req` cold."""
    prefix = f"warm start unavailable for run {req.flow_run_id}: "
    return [
        r.getMessage().removeprefix(prefix).removesuffix("; starting it cold")
        for r in caplog.records
        if r.getMessage().startswith(prefix)
    ]


async def launch_cold(warm: Warm, req: LaunchRequest, caplog: pytest.LogCaptureFixture) -> str:
    with caplog.at_level(logging.INFO, logger="agent.warm"):
        handle = await warm.launch(req)
    assert isinstance(handle, SubprocessHandle), "the run started warm"
    assert await handle.wait() == 0
    [reason] = cold_because(caplog, req)
    return reason


async def test_a_run_never_waits_for_a_template_that_is_still_importing(
    warm: Warm, caplog: pytest.LogCaptureFixture
) -> None:
    first = warm.request(exit_with(0))
    assert await launch_cold(warm, first, caplog) == "its template is still importing Prefect"
    await warm.ready(first)
    assert await launch_warm(warm, warm.request(exit_with(0))) == 0


@pytest.mark.parametrize(
    ("variable", "problem"),
    [
        ("PYTHON_TEST_THREAD", "threads after the imports: 2 tasks, ['MainThread', "),
        ("PYTHON_TEST_OPEN_FILE", "open files after the imports: [3, "),
    ],
)
async def test_a_template_that_is_unsafe_to_fork_refuses_and_runs_start_cold(
    warm: Warm, caplog: pytest.LogCaptureFixture, variable: str, problem: str
) -> None:
    req = warm.request(exit_with(0), **{variable: "1"})
    key = warm.key(req)
    with caplog.at_level(logging.INFO, logger="agent.warm"):
        warm.pool.ensure(key)
        template = template_of(warm.pool, key)
        assert template is not None
        await eventually(lambda: template.ended, "the template ended")
    why = refusal(warm.pool, key)
    assert why is not None and why.startswith(problem)
    assert template.process is not None and await template.process.wait() == 75
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"warm template for {req.python} refused to serve (its runs start cold until its "
        f"venv changes): {why}"
    ]
    assert await launch_cold(warm, req, caplog) == f"its template refused to serve: {why}"


async def test_a_refused_template_is_tried_again_only_when_its_venv_changed(
    warm: Warm, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    req = warm.request(exit_with(0), PYTHON_TEST_THREAD="1")
    key = warm.key(req)
    warm.pool.keep([key])  # kept: a template that died would come back after the pause
    first = template_of(warm.pool, key)
    assert first is not None
    await eventually(lambda: first.ended, "the template refused")
    clock.now += RETRY_AFTER + 1
    warm.pool.keep([key])
    assert (template_of(warm.pool, key), warm.pool._restarts) == (None, set())
    assert (await launch_cold(warm, req, caplog)).startswith("its template refused to serve")
    touch_site_packages(warm)  # pip changed the venv: worth another try
    caplog.clear()
    assert await launch_cold(warm, req, caplog) == "its template is still importing Prefect"
    second = template_of(warm.pool, key)
    assert second is not None and second.generation == first.generation + 1


def touch_site_packages(warm: Warm) -> None:
    site = site_packages(warm.python)
    mtime = site.stat().st_mtime_ns
    os.utime(site, ns=(mtime, mtime + 1_000_000_000))  # what a pip install does to it


async def test_an_unsafe_venv_is_refused_without_starting_a_template(
    tmp_path: Path, flow_python: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    checked: list[str] = []

    def unsafe(python: str) -> str:
        checked.append(python)
        return f"{python} is writable by its group or others (mode 775)"

    async with warm_setup(tmp_path, flow_python, venv_problem=unsafe, clock=clock) as harness:
        req = harness.request(exit_with(0))
        key = harness.key(req)
        harness.pool.ensure(key)
        await eventually(lambda: refusal(harness.pool, key), "refused")
        why = f"unsafe venv: {flow_python} is writable by its group or others (mode 775)"
        assert refusal(harness.pool, key) == why
        assert await launch_cold(harness, req, caplog) == f"its template refused to serve: {why}"
        assert checked == [str(flow_python)]  # once: not again for every run
        assert not (tmp_path / "warm" / f"{key.id}-1.sock").exists()


async def test_an_unsafe_venv_made_safe_is_looked_at_again_after_the_pause(
    tmp_path: Path, flow_python: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    problems = ["bin is writable by its group or others (mode 777)"]
    checked = 0

    def venv_problem(python: str) -> str | None:
        nonlocal checked
        checked += 1
        return problems[0] if problems else None

    async with warm_setup(tmp_path, flow_python, venv_problem=venv_problem, clock=clock) as harness:
        req = harness.request(exit_with(0))
        key = harness.key(req)
        harness.pool.ensure(key)
        await eventually(lambda: refusal(harness.pool, key), "refused")
        assert checked == 1
        clock.now += RETRY_AFTER  # still unsafe: looked at once more, then not for a while
        assert (await launch_cold(harness, req, caplog)).startswith("its template refused")
        caplog.clear()
        assert (await launch_cold(harness, req, caplog)).startswith("its template refused")
        assert checked == 2
        problems.clear()  # the admin's chmod: no stamp changes
        clock.now += RETRY_AFTER - 1
        caplog.clear()
        assert (await launch_cold(harness, req, caplog)).startswith("its template refused")
        assert checked == 2
        clock.now += 1
        caplog.clear()
        await harness.ready(req)
        assert refusal(harness.pool, key) is None
        assert await launch_warm(harness, harness.request(exit_with(0))) == 0


async def test_a_dead_template_means_cold_until_the_pause_is_over(
    warm: Warm, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    req = warm.request(exit_with(0))
    template = await warm.ready(req)
    assert template.pid is not None
    with caplog.at_level(logging.INFO, logger="agent.warm"):
        os.kill(template.pid, signal.SIGKILL)
        await eventually(lambda: template_of(warm.pool, warm.key(req)) is None, "noticed")
    assert f"warm template {template.key.id} for {req.python} exited with status -9" in caplog.text
    later = warm.request(exit_with(0))
    reason = await launch_cold(warm, later, caplog)
    assert reason == "its template failed a moment ago and is not restarted yet"
    clock.now += RETRY_AFTER + 1
    replacement = await warm.ready(req)
    assert replacement.generation == template.generation + 1
    assert await launch_warm(warm, warm.request(exit_with(0))) == 0


async def test_a_template_that_died_unnoticed_does_not_answer(
    warm: Warm, caplog: pytest.LogCaptureFixture
) -> None:
    req = warm.request(exit_with(0))
    template = await warm.ready(req)
    assert template.pid is not None
    os.kill(template.pid, signal.SIGKILL)
    while not gone(template.pid):  # without giving the pool a chance to notice
        pass
    assert template.ready
    reason = await launch_cold(warm, req, caplog)
    assert reason.startswith("its template did not answer: ConnectionRefusedError(")


async def test_a_changed_venv_replaces_the_template_and_spares_its_runs(
    warm: Warm, caplog: pytest.LogCaptureFixture
) -> None:
    running = warm.request(BLOCK)
    old = await warm.ready(running)
    assert old.pid is not None
    handle = await warm.launch(running)
    assert isinstance(handle, WarmHandle)
    await eventually((running.working_dir / "engine.pid").exists, "the run started")
    touch_site_packages(warm)
    req = warm.request(exit_with(0))
    reason = await launch_cold(warm, req, caplog)
    assert reason == "the flow's venv changed since its template started; a new one is starting"
    await eventually(lambda: gone(old.pid), "the old template stopped")  # type: ignore[arg-type]
    new = await warm.ready(req)
    assert (new.generation, new.pid != old.pid) == (old.generation + 1, True)
    assert await launch_warm(warm, warm.request(exit_with(0))) == 0
    (running.working_dir / "go").touch()  # the run outlived its template
    assert await handle.wait() == 0


async def test_a_python_with_a_user_site_directory_is_never_warm(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    packages = tmp_path / "packages"
    write_fake_packages(packages)
    python = Path(getattr(sys, "_base_executable", sys.executable))
    # Only the user site matters here, not who owns the system's python.
    async with warm_setup(tmp_path, python, venv_problem=lambda _: None) as harness:
        req = harness.request(exit_with(0), PYTHONPATH=str(packages))
        key = harness.key(req)
        harness.pool.ensure(key)
        await eventually(lambda: refusal(harness.pool, key), "refused")
        reason = await launch_cold(harness, req, caplog)
        assert reason == (
            "its template refused to serve: the flow's python has a user site directory"
        )


async def test_an_idle_template_is_stopped_unless_a_deployment_keeps_it(
    warm: Warm, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    idle, kept = warm.request(exit_with(0)), warm.request(exit_with(0), PYTHONUNBUFFERED="1")
    idle_template = await warm.ready(idle)
    warm.pool.keep([warm.key(kept)])
    kept_template = await warm.ready(kept)
    clock.now += IDLE_STOP + 1
    with caplog.at_level(logging.INFO, logger="agent.warm"):
        assert await launch_warm(warm, kept) == 0  # every take looks for idle templates
        assert templates(warm.pool) == [kept_template]
        await eventually(lambda: gone(idle_template.pid), "stopped")  # type: ignore[arg-type]
        clock.now += IDLE_STOP + 1
        warm.pool.keep([])  # no deployment wants it any more: idle, so stopped now
    assert templates(warm.pool) == []
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopping")] == [
        f"stopping warm template {t.key.id} for {warm.python}: no warm run for {IDLE_STOP:g}s"
        for t in (idle_template, kept_template)
    ]


async def test_a_kept_template_that_died_comes_back_by_itself(
    warm: Warm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool_module, "RETRY_AFTER", 0.0)
    req = warm.request(exit_with(0))
    warm.pool.keep([warm.key(req)])
    first = await warm.ready(req)
    assert first.pid is not None
    os.kill(first.pid, signal.SIGKILL)

    def replaced() -> Template | None:
        template = template_of(warm.pool, warm.key(req))
        return template if template is not None and template is not first else None

    await eventually(replaced, "a new template")
    assert (await warm.ready(req)).generation == first.generation + 1
