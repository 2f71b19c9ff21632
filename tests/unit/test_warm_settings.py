"""`engine = "cold" | "warm"` in the config and as a job variable; how a warm run's supervisor W
is recognised as its run's wrapper (it holds the run directory open, since its argv is the
template's)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from agent import daemon
from agent.jobvars import JobVariablesError, Layer, apply_job_variables
from agent.processes import holds_open, wrapper_start_time
from agent.settings import (
    DEFAULT_JOB_VARIABLES,
    ConfigError,
    FlowRunSettings,
    load_settings,
)

DEPLOYMENT = '[[deployment]]\nname = "{name}"\nentrypoint = "f.py:f"\npath = "/srv/flows"\n'


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def error_of(path: Path, **environ: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ)
    return str(caught.value)


# -- settings ----------------------------------------------------------------------------------


def test_engine_is_cold_unless_configured(tmp_path: Path) -> None:
    assert FlowRunSettings().engine == "cold"
    settings = load_settings(config(tmp_path, DEPLOYMENT.format(name="a")), {})
    assert settings.flow_run.engine == "cold"
    assert [s.engine for s in daemon.warm_candidates(settings)] == ["cold"]


def test_a_deployment_overrides_the_engine_of_flow_run(tmp_path: Path) -> None:
    text = (
        '[flow_run]\nengine = "warm"\npython = "/opt/v/bin/python"\n'
        + DEPLOYMENT.format(name="stays-cold")
        + 'engine = "cold"\n'
        + DEPLOYMENT.format(name="inherits")
        + DEPLOYMENT.format(name="other-python")
        + 'python = "/opt/w/bin/python"\n'
    )
    settings = load_settings(config(tmp_path, text), {})
    assert settings.flow_run.engine == "warm"
    engines = [(s.engine, s.python) for s in daemon.warm_candidates(settings)]
    assert engines == [
        ("cold", "/opt/v/bin/python"),
        ("warm", "/opt/v/bin/python"),
        ("warm", "/opt/w/bin/python"),
    ]
    assert settings.deployments[1].engine is None  # unset: [flow_run]'s


def test_engine_from_the_environment(tmp_path: Path) -> None:
    path = config(tmp_path, "")
    assert load_settings(path, {"RUNNER_AGENT_FLOW_RUN__ENGINE": "warm"}).flow_run.engine == "warm"
    assert error_of(path, RUNNER_AGENT_FLOW_RUN__ENGINE="lukewarm") == (
        "environment (RUNNER_AGENT_FLOW_RUN__ENGINE): flow_run.engine: must be one of 'cold' "
        "or 'warm', got 'lukewarm'"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[flow_run]\nengine = "hot"\n',
            "flow_run.engine: must be one of 'cold' or 'warm', got 'hot'",
        ),
        (
            "[flow_run]\nengine = true\n",
            "flow_run.engine: must be one of 'cold' or 'warm', got True",
        ),
        (
            DEPLOYMENT.format(name="hello") + 'engine = "Warm"\n',
            "deployment[hello].engine: must be one of 'cold' or 'warm', got 'Warm'",
        ),
    ],
)
def test_an_invalid_engine_is_a_config_error_naming_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    path = config(tmp_path, text)
    assert error_of(path) == f"{path}: {message}"


def test_the_engine_job_variable_needs_the_host_to_allow_it(tmp_path: Path) -> None:
    base = FlowRunSettings()
    assert "engine" not in DEFAULT_JOB_VARIABLES
    with pytest.raises(JobVariablesError) as caught:
        apply_job_variables(
            base, [Layer("flow run", {"engine": "warm"})], allowed=DEFAULT_JOB_VARIABLES
        )
    assert str(caught.value) == (
        "job variable 'engine' (from the flow run): not allowed: this host does not allow it; "
        "add 'engine' to agent.job_variables ([agent] job_variables in the agent's config)"
    )
    allowed = (*DEFAULT_JOB_VARIABLES, "engine")
    layers = [Layer("deployment", {"engine": "warm"}), Layer("flow run", {"engine": "cold"})]
    assert apply_job_variables(base, layers[:1], allowed=allowed).engine == "warm"
    assert apply_job_variables(base, layers, allowed=allowed).engine == "cold"
    with pytest.raises(JobVariablesError) as caught:
        apply_job_variables(base, [Layer("deployment", {"engine": "hot"})], allowed=allowed)
    assert (caught.value.key, caught.value.origin) == ("engine", "deployment")
    assert "'cold' or 'warm'" in str(caught.value) and "'hot'" in str(caught.value)
    settings = load_settings(config(tmp_path, '[agent]\njob_variables = ["env", "engine"]\n'), {})
    assert settings.agent.job_variables == ("env", "engine")


# -- W is its run's wrapper ------------------------------------------------------------------

HOLD = (
    "import os, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDONLY | {flag})\n"
    "print('holding', flush=True)\n"
    "time.sleep(300)\n"
)


@contextlib.contextmanager
def holder(path: Path, *, directory: bool = True) -> Iterator[subprocess.Popen[str]]:
    flag = "os.O_DIRECTORY" if directory else "0"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(flag=flag), str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "holding\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    path = tmp_path / "runs" / "a"
    path.mkdir(parents=True)
    return path


def test_a_process_holding_the_run_directory_is_its_wrapper(tmp_path: Path, run_dir: Path) -> None:
    other = tmp_path / "runs" / "b"
    other.mkdir()
    link = tmp_path / "link"
    link.symlink_to(run_dir)
    with holder(run_dir) as proc:
        created = psutil.Process(proc.pid).create_time()
        assert holds_open(proc.pid, run_dir)
        assert holds_open(proc.pid, link)  # the same directory by another name
        assert not holds_open(proc.pid, other)
        assert wrapper_start_time(proc.pid, run_dir) == created
        assert wrapper_start_time(proc.pid, other) is None
    assert not holds_open(os.getpid(), run_dir)


def test_holding_a_file_inside_is_not_holding_the_directory(run_dir: Path) -> None:
    (run_dir / "output.log").write_text("")
    with holder(run_dir / "output.log", directory=False) as proc:
        assert not holds_open(proc.pid, run_dir)
        assert wrapper_start_time(proc.pid, run_dir) is None


def test_a_gone_or_zombie_process_is_no_wrapper(run_dir: Path) -> None:
    zombie = subprocess.Popen(["true"])
    try:
        while psutil.Process(zombie.pid).status() != psutil.STATUS_ZOMBIE:
            pass
        assert wrapper_start_time(zombie.pid, run_dir) is None
        assert not holds_open(zombie.pid, run_dir)
    finally:
        zombie.wait()
    assert wrapper_start_time(zombie.pid, run_dir) is None  # reaped: maybe no process at all
    assert not holds_open(zombie.pid, run_dir)


def test_a_cold_wrapper_is_still_recognised_by_its_argv(tmp_path: Path, run_dir: Path) -> None:
    other = tmp_path / "runs" / "b"
    other.mkdir()
    # The wrapper's argv (`sh -c WRAPPER runner-agent-run <run_dir> ...`), in one process.
    argv = [sys.executable, "-c", "import time; time.sleep(300)", "runner-agent-run", str(run_dir)]
    proc = subprocess.Popen(argv)
    try:
        while psutil.Process(proc.pid).cmdline() != argv:  # until the exec is done
            pass
        assert not holds_open(proc.pid, run_dir)
        assert wrapper_start_time(proc.pid, run_dir) == psutil.Process(proc.pid).create_time()
        assert wrapper_start_time(proc.pid, other) is None
    finally:
        proc.kill()
        proc.wait()
