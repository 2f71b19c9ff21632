"""The work pool type `runner-agent`: its base job template, and how a pool's template and a
deployment's job variables become the layers of a run's job variables.

The template exposes the run settings as job variables, so that the UI's pool and deployment
forms and `prefect deploy` (`work_pool.job_variables`) offer them. A variable left unset means
the host's own `[flow_run]` setting: hosts of a fleet may differ, and the pool does not
override them unless its admin sets a default in the pool's template.

An existing pool of type `process` is served too: its `env` and `working_dir` mean what they
mean to Prefect's process worker; its other variables have no meaning here and are ignored.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

POOL_TYPE = "runner-agent"
PROCESS_TYPE = "process"
# The working directory a run starts in: a job variable of the pool, not a run setting.
WORKING_DIR = "working_dir"
# A process pool's variables that mean nothing under a scope (it names, labels and streams a
# bare subprocess; `command` would replace the engine the agent supervises).
PROCESS_ONLY = frozenset({"command", "stream_output", "labels", "name"})

_VARIABLES: dict[str, dict[str, Any]] = {
    "env": {
        "title": "Environment variables",
        "description": "Set for the flow's engine, over the host's [flow_run] env.",
        "type": "object",
        "additionalProperties": {"type": "string"},
    },
    "memory_max": {
        "title": "Memory limit",
        "description": "MemoryMax= of the run's scope, e.g. 512M or 2G. Unset: the host's.",
        "type": "string",
    },
    "cpu_quota": {
        "title": "CPU quota",
        "description": "CPUQuota= of the run's scope, e.g. 150% (1.5 cores). Unset: the host's.",
        "type": "string",
    },
    "tasks_max": {
        "title": "Tasks limit",
        "description": "TasksMax= of the run's scope (processes and threads). Unset: the host's.",
        "type": "integer",
    },
    "runtime_max": {
        "title": "Run time limit",
        "description": "RuntimeMaxSec= of the run's scope, e.g. 30m or 6h. Unset: the host's.",
        "type": "string",
    },
    "python": {
        "title": "Python",
        "description": "The interpreter of the flow's venv. Unset: the host's.",
        "type": "string",
    },
    "user": {
        "title": "User",
        "description": "The user the flow runs as. Unset: the host's.",
        "type": "string",
    },
    WORKING_DIR: {
        "title": "Working directory",
        "description": "Absolute directory the run starts in. Unset: a fresh directory per run "
        "(for pull steps) or the deployment's path.",
        "type": "string",
    },
}
# Offered on every pool, whatever the creating host allows; the others only where it allows them.
_ALWAYS = ("env", "memory_max", "cpu_quota", "tasks_max", "runtime_max")


def base_job_template(allowed: Collection[str]) -> dict[str, Any]:
    """The template of a pool this host creates: the variables it would honour."""
    names = [name for name in _VARIABLES if name in _ALWAYS or name in allowed]
    return {
        "job_configuration": {name: f"{{{{ {name} }}}}" for name in names},
        "variables": {
            "type": "object",
            "properties": {name: dict(_VARIABLES[name]) for name in names},
        },
    }


def template_defaults(template: Mapping[str, Any]) -> dict[str, Any]:
    """The defaults the pool's admin set in its template's variables (null means unset)."""
    variables = template.get("variables")
    properties = variables.get("properties") if isinstance(variables, Mapping) else None
    if not isinstance(properties, Mapping):
        return {}
    return {
        name: spec["default"]
        for name, spec in properties.items()
        if isinstance(spec, Mapping) and spec.get("default") is not None
    }


def meaningless(pool_type: str) -> frozenset[str]:
    """Job variables of this pool type that the agent drops without a word per run."""
    return PROCESS_ONLY if pool_type == PROCESS_TYPE else frozenset()
