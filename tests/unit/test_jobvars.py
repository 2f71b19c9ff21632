"""Job variables over the host's run settings: precedence, the allow-list, parsing, errors."""

from __future__ import annotations

import pytest

from agent.jobvars import JobVariablesError, Layer, apply_job_variables
from agent.settings import DEFAULT_JOB_VARIABLES, FlowRunSettings

BASE = FlowRunSettings(python="/opt/venv/bin/python", env={"A": "host", "B": "host"})
ALLOWED = DEFAULT_JOB_VARIABLES


def test_the_flow_run_wins_over_the_deployment_which_wins_over_the_host() -> None:
    merged = apply_job_variables(
        BASE,
        [
            Layer("deployment", {"memory_max": "1G", "env": {"B": "deployment", "C": "d"}}),
            Layer("flow run", {"memory_max": "300M", "cpu_quota": "150%", "env": {"C": "run"}}),
        ],
        allowed=ALLOWED,
    )
    assert merged.memory_max == 300 * 1024**2
    assert merged.cpu_quota == 150
    assert merged.env == {"A": "host", "B": "deployment", "C": "run"}
    assert merged.python == BASE.python  # untouched keys keep the host's value


def test_no_job_variables_is_the_base_itself() -> None:
    assert apply_job_variables(BASE, [Layer("flow run", {})], allowed=ALLOWED) is BASE


@pytest.mark.parametrize("key", ["user", "python"])
def test_privileged_keys_need_the_host_to_list_them(key: str) -> None:
    with pytest.raises(JobVariablesError) as caught:
        apply_job_variables(BASE, [Layer("flow run", {key: "root"})], allowed=ALLOWED)
    message = str(caught.value)
    assert message.startswith(f"job variable {key!r} (from the flow run): not allowed")
    assert "[agent] job_variables" in message
    allowed = apply_job_variables(BASE, [Layer("flow run", {key: "root"})], allowed=(*ALLOWED, key))
    assert getattr(allowed, key) == "root"


@pytest.mark.parametrize(
    ("values", "key", "problem"),
    [
        ({"memory_max": "lots"}, "memory_max", "not a size"),
        ({"runtime_max": "-3"}, "runtime_max", ""),
        ({"image": "python:3.12"}, "image", "unknown here"),
        ({"env": ["A=1"]}, "env", "expected a table"),
        ({"env": {"A": {"nested": 1}}}, "env", "expected names and string values"),
    ],
)
def test_an_invalid_value_names_the_key(values: dict[str, object], key: str, problem: str) -> None:
    with pytest.raises(JobVariablesError) as caught:
        apply_job_variables(BASE, [Layer("deployment", values)], allowed=ALLOWED)
    assert caught.value.key == key
    assert caught.value.origin == "deployment"
    assert problem in str(caught.value)


def test_ignored_keys_are_dropped() -> None:
    merged = apply_job_variables(
        BASE,
        [Layer("work pool", {"stream_output": True, "tasks_max": 7})],
        allowed=ALLOWED,
        ignored={"stream_output"},
    )
    assert merged.tasks_max == 7


@pytest.mark.parametrize(
    "name",
    [
        "PATH",
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "SYSTEMD_LOG_LEVEL",
        "DBUS_SYSTEM_BUS_ADDRESS",
        "BASH_ENV",
        "PREFECT__FLOW_RUN_ID",
        "GCONV_PATH",
    ],
)
def test_env_names_that_steer_the_agents_own_helpers_are_refused(name: str) -> None:
    """The run's environment reaches systemd-run, systemd-cat and the wrapper's shell, which run
    as the agent's user: a job variable must not choose what they load or talk to."""
    with pytest.raises(JobVariablesError) as error:
        apply_job_variables(
            FlowRunSettings(), [Layer("flow run", {"env": {name: "/tmp/x"}})], allowed=ALLOWED
        )
    assert (error.value.key, error.value.origin) == ("env", "flow run")
    assert repr(name) in str(error.value) and "[flow_run] env" in str(error.value)


def test_null_env_values_are_unset_and_ordinary_names_pass() -> None:
    base = FlowRunSettings(env={"KEEP": "1"})
    layer = Layer("work pool", {"env": {"A": "1", "GONE": None, "PYTHONPATH": "/srv/lib"}})
    merged = apply_job_variables(base, [layer], allowed=ALLOWED)
    assert merged.env == {"KEEP": "1", "A": "1", "PYTHONPATH": "/srv/lib"}
