"""What a flow run is executed with (`[flow_run]`, a deployment's overrides, job variables),
and the config's value types that every settings model shares.

The types parse the config's spellings ("30s", "2G", "150%") and render them back in JSON mode,
so a model dumped with `model_dump(mode="json")` validates again to the same values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import date, datetime, time
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
)

from agent import values
from agent.config_errors import show


def _in_range(parse: Callable[[Any], Any]) -> BeforeValidator:
    """`parse`, with arithmetic overflow ("9" * 400 + "s" as a float) as a validation error."""

    def checked(value: Any) -> Any:
        try:
            result = parse(value)
        except ArithmeticError:
            raise ValueError(f"out of range: {show(value)}") from None
        if isinstance(result, int) and result >= 2**63:  # systemd and Prefect take 64 bits
            raise ValueError(f"out of range: {show(value)}")
        return result

    return BeforeValidator(checked)


def count(minimum: int) -> BeforeValidator:
    return _in_range(lambda value: values.parse_count(value, minimum=minimum))


def json_parameters(value: Any, where: str = "") -> Any:
    """Parameters as the API's JSON: TOML dates and times as ISO text; NaN and inf refused."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where or 'value'}: {value!r} is not a JSON number")
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: json_parameters(v, f"{where}.{k}" if where else k) for k, v in value.items()}
    if isinstance(value, list):
        return [json_parameters(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _non_empty_secret(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        raise ValueError("must not be empty")
    return value


Duration = Annotated[
    float,
    _in_range(values.parse_duration),
    PlainSerializer(values.format_duration, when_used="json"),
]
PositiveDuration = Annotated[
    float,
    _in_range(values.positive_duration),
    PlainSerializer(values.format_duration, when_used="json"),
]
RuntimeLimit = Annotated[
    float | None,
    _in_range(values.limit_duration),
    PlainSerializer(values.format_duration, when_used="json"),
]
MemoryLimit = Annotated[
    int | None,
    _in_range(values.limit_size),
    PlainSerializer(values.format_size, when_used="json"),
]
CpuQuota = Annotated[
    int | None,
    _in_range(values.limit_cpu_quota),
    PlainSerializer(values.format_cpu_quota, when_used="json"),
]
TasksLimit = Annotated[
    int | None,
    _in_range(values.limit_count),
    PlainSerializer(values.format_count, when_used="json"),
]
AbsolutePath = Annotated[Path, BeforeValidator(values.validate_absolute_path)]
Name = Annotated[str, BeforeValidator(values.validate_name)]
Secret = Annotated[SecretStr, BeforeValidator(_non_empty_secret)]
EnvName = Annotated[str, BeforeValidator(values.validate_env_name)]
NonEmpty = Annotated[str, Field(min_length=1)]


class ConfigModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


JobVariable = Literal[
    "env",
    "memory_max",
    "cpu_quota",
    "tasks_max",
    "runtime_max",
    "user",
    "python",
    "working_dir",
    "engine",
]
DEFAULT_JOB_VARIABLES: tuple[JobVariable, ...] = (
    "env",
    "memory_max",
    "cpu_quota",
    "tasks_max",
    "runtime_max",
)


class FlowRunSettings(ConfigModel):
    python: NonEmpty = "/usr/bin/python3"
    memory_max: MemoryLimit = 2 * 1024**3
    cpu_quota: CpuQuota = 200
    tasks_max: TasksLimit = 512
    runtime_max: RuntimeLimit = 6 * 3600.0
    user: Annotated[str, BeforeValidator(values.validate_user)] = ""
    env: dict[EnvName, str] = Field(default_factory=dict)
    # "warm": fork the engine from a template that has imported Prefect (docs/warm-engine.md).
    engine: Literal["cold", "warm"] = "cold"


FLOW_RUN_KEYS = tuple(FlowRunSettings.model_fields)
