"""Job variables: run settings that a deployment or a flow run may set through the API.

Prefect lets a deployment (`job_variables`) and each flow run (the UI's "Custom run",
`prefect deployment run --job-variable`, `run_deployment(job_variables=...)`) override how the
run is executed. The agent merges them, in rising precedence, over the run settings the host's
config gives ([flow_run] and the deployment's own keys): host config < deployment < flow run.

Anyone who can write to the API can set job variables, so the host's admin decides which keys
are honoured: `[agent] job_variables`, by default the limits and `env`. `user` and `python`
change who runs what and are honoured only when listed. A run that asks for a key the host does
not allow, or gives an invalid value, is not started: it ends CRASHED with a message that names
the key and the config that would allow it. Values are parsed like the config's ("1G", "30m",
"150%"); `env` is merged key by key.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.config_errors import show
from agent.run_settings import FLOW_RUN_KEYS, FlowRunSettings

# Keys that change who runs the flow, with which interpreter or from which code: never
# honoured by default.
PRIVILEGED = frozenset({"user", "python", "working_dir"})
ALLOW_KEY = "agent.job_variables"
# Environment names a job variable may not set: the run's environment also reaches processes
# that run as the agent's user before the privilege drop (systemd-run, systemd-cat, the wrapper's
# shell, setpriv), and these change what those load or whom they talk to. The host's own
# [flow_run] env may set them.
LOADER_VARIABLES = frozenset(
    {
        "PATH",
        "IFS",
        "ENV",
        "BASH_ENV",
        "SHELLOPTS",
        "PS4",
        "GCONV_PATH",
        "LOCPATH",
        "NLSPATH",
        "HOSTALIASES",
        "RES_OPTIONS",
        "TMPDIR",
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "PYTHONINSPECT",
    }
)
LOADER_PREFIXES = ("LD_", "MALLOC_", "SYSTEMD_", "DBUS_", "PREFECT__", "GLIBC_")
# The directory a run starts in (work pools): a workspace matter, not a run setting.
WORKING_DIR = "working_dir"
# The layer of a work pool's template defaults: set by the pool's admin for the whole fleet.
POOL_ORIGIN = "work pool"


class JobVariablesError(Exception):
    """A run's job variables cannot be honoured; str() is the Crashed state's message."""

    def __init__(self, key: str, problem: str, origin: str) -> None:
        super().__init__(key, problem, origin)
        self.key = key
        self.problem = problem
        self.origin = origin

    def __str__(self) -> str:
        return f"job variable {self.key!r} (from the {self.origin}): {self.problem}"


@dataclass(frozen=True)
class Layer:
    """One source of job variables: `origin` names it in errors ("deployment", "flow run")."""

    origin: str
    values: Mapping[str, Any]


def apply_job_variables(
    base: FlowRunSettings,
    layers: Collection[Layer],
    *,
    allowed: Collection[str],
    ignored: Collection[str] = (),
) -> FlowRunSettings:
    """`base` with the layers' job variables applied in order; raises JobVariablesError.

    `ignored` keys are dropped without a word (a work pool's own variables that mean nothing
    here, already logged once by whoever knows why).
    """
    merged: dict[str, Any] = {}
    env: dict[str, str] = dict(base.env)
    origins: dict[str, str] = {}
    for layer in layers:
        for key, value in layer.values.items():
            if key in ignored:
                continue
            if key not in FLOW_RUN_KEYS:
                raise JobVariablesError(
                    key, f"unknown here (known: {', '.join(FLOW_RUN_KEYS)})", layer.origin
                )
            if key not in allowed:
                raise JobVariablesError(key, _not_allowed(key), layer.origin)
            origins[key] = layer.origin
            if key == "env":
                env.update(_env_table(value, layer.origin))
            else:
                merged[key] = value
    if not merged and env == base.env:
        return base
    # The config's own spelling ("2G", "200%"), which validation reads back exactly.
    data = {**base.model_dump(mode="json"), **merged, "env": env}
    try:
        return FlowRunSettings.model_validate(data)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        key = str(error["loc"][0]) if error["loc"] else "?"
        problem = _problem(error)
        raise JobVariablesError(key, problem, origins.get(key, "flow run")) from None


def take_working_dir(
    layers: Collection[Layer], *, allowed: Collection[str]
) -> tuple[list[Layer], Path | None, list[str]]:
    """Split `working_dir` off the layers: (the other layers, the directory, warnings).

    The last layer that sets it wins. A work pool's default that the host does not allow is
    dropped with a warning (it applies to every run of the pool); a deployment or a run that
    asks for it raises JobVariablesError, as for any key the host does not allow.
    """
    rest: list[Layer] = []
    working_dir: Path | None = None
    warnings: list[str] = []
    for layer in layers:
        values = dict(layer.values)
        value = values.pop(WORKING_DIR, None)
        rest.append(Layer(layer.origin, values))
        if value is None:
            continue
        if WORKING_DIR not in allowed:
            if layer.origin == POOL_ORIGIN:
                warnings.append(
                    f"the work pool's default working_dir is ignored: {_not_allowed(WORKING_DIR)}"
                )
                continue
            raise JobVariablesError(WORKING_DIR, _not_allowed(WORKING_DIR), layer.origin)
        working_dir = _directory(value, layer.origin)
    return rest, working_dir, warnings


def _directory(value: Any, origin: str) -> Path:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise JobVariablesError(
            WORKING_DIR, f"expected an absolute path, got {show(value)}", origin
        )
    trimmed = value.rstrip("/") or "/"
    if "//" in value or os.path.normpath(trimmed) != trimmed:
        problem = f"expected a normalised path (no '.', '..' or '//'), got {show(value)}"
        raise JobVariablesError(WORKING_DIR, problem, origin)
    return Path(trimmed)


def recorded_layers(extra: Mapping[str, Any]) -> list[Layer]:
    """The layers a run record keeps (`extra["job_variables"]`: origin -> values), in order."""
    layers = extra.get("job_variables")
    if not isinstance(layers, Mapping):
        return []
    return [
        Layer(str(origin), values)
        for origin, values in layers.items()
        if isinstance(values, Mapping) and values
    ]


def _not_allowed(key: str) -> str:
    hint = (
        "it changes who or what runs the flow, so only a host that lists it allows it"
        if key in PRIVILEGED
        else "this host does not allow it"
    )
    return (
        f"not allowed: {hint}; add {key!r} to {ALLOW_KEY} "
        "([agent] job_variables in the agent's config)"
    )


def _env_table(value: Any, origin: str) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise JobVariablesError(
            "env", f"expected a table of names to strings, got {show(value)}", origin
        )
    table: dict[str, str] = {}
    for name, item in value.items():
        if item is None:
            continue  # unset, as a process pool's template has it (Prefect drops it too)
        if not isinstance(name, str) or not isinstance(item, str | int | float | bool):
            raise JobVariablesError(
                "env", f"expected names and string values, got {show({name: item})}", origin
            )
        if name in LOADER_VARIABLES or name.startswith(LOADER_PREFIXES):
            raise JobVariablesError(
                "env",
                f"{name!r} is not allowed: it changes which programs and libraries the agent's "
                "own helpers (systemd-run, the run's wrapper, which run as the agent's user) "
                "load; set it in [flow_run] env on the host if the flow needs it",
                origin,
            )
        table[name] = str(item).lower() if isinstance(item, bool) else str(item)
    return table


def _problem(error: Any) -> str:
    ctx = error.get("ctx") or {}
    if error.get("type") == "value_error" and "error" in ctx:
        return str(ctx["error"])
    return f"{error['msg']}, got {show(error.get('input'))}"
