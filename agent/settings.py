"""The config contract: the settings models, where values come from, and how errors read.

Sources, in rising precedence: built-in defaults < the main TOML file < `agent.d/*.toml` next to
it (lexical order) < `RUNNER_AGENT_<SECTION>__<KEY>` environment variables. Tables deep-merge;
`[[deployment]]`s from drop-ins are appended, or replace an earlier deployment of the same name.
Reading happens only here, at load time, from the arguments given; the result is immutable.
Every problem becomes one ConfigError line that names the source, the key and the problem.
"""

from __future__ import annotations

import json
import math
import re
import socket
from collections.abc import Callable, Mapping
from datetime import date, datetime, time
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    SecretStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from agent import values
from agent.config_sources import (
    ConfigError,
    Loc,
    RawConfig,
    read_secret,
    read_sources,
    show,
)

__all__ = [
    "AgentSettings",
    "ApiSettings",
    "ConfigError",
    "CronSchedule",
    "DeploymentSettings",
    "FlowRunSettings",
    "GitSettings",
    "IntervalSchedule",
    "Settings",
    "load_settings",
]

REDACTED = "**********"


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


def _count(minimum: int) -> BeforeValidator:
    return _in_range(lambda value: values.parse_count(value, minimum=minimum))


def _json_parameters(value: Any, where: str = "") -> Any:
    """Parameters as the API's JSON: TOML dates and times as ISO text; NaN and inf refused."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where or 'value'}: {value!r} is not a JSON number")
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _json_parameters(v, f"{where}.{k}" if where else k) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_parameters(v, f"{where}[{i}]") for i, v in enumerate(value)]
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


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApiSettings(_Model):
    url: Annotated[str, BeforeValidator(values.validate_http_url)] = "http://127.0.0.1:4200/api"
    key: Secret | None = None
    key_file: AbsolutePath | None = None
    auth_string: Secret | None = None
    auth_string_file: AbsolutePath | None = None
    timeout: PositiveDuration = 30.0


class AgentSettings(_Model):
    name: Name = Field(default_factory=socket.gethostname)
    limit: Annotated[int, _count(1)] = 4
    poll_interval: PositiveDuration = 10.0
    prefetch: Duration = 10.0
    heartbeat_interval: PositiveDuration = 30.0
    cancel_grace: Duration = 30.0
    launcher: Literal["auto", "systemd", "process"] = "auto"
    slice: Annotated[str, BeforeValidator(values.validate_slice)] = "runner-agent-flows.slice"
    state_dir: AbsolutePath = Path("/var/lib/runner-agent")
    runtime_dir: AbsolutePath = Path("/run/runner-agent")
    # Off for networks whose proxies refuse websockets; polling then does the work, slower.
    events_websocket: bool = True


class FlowRunSettings(_Model):
    python: NonEmpty = "/usr/bin/python3"
    memory_max: MemoryLimit = 2 * 1024**3
    cpu_quota: CpuQuota = 200
    tasks_max: TasksLimit = 512
    runtime_max: RuntimeLimit = 6 * 3600.0
    user: Annotated[str, BeforeValidator(values.validate_user)] = ""
    env: dict[EnvName, str] = Field(default_factory=dict)


FLOW_RUN_KEYS = tuple(FlowRunSettings.model_fields)


class GitSettings(_Model):
    url: Annotated[str, BeforeValidator(values.validate_git_url)]
    branch: NonEmpty | None = None
    commit: Annotated[str, BeforeValidator(values.validate_commit)] | None = None
    token_file: AbsolutePath | None = None
    submodules: Annotated[bool, Field(strict=True)] = False
    subdirectory: Annotated[str, BeforeValidator(values.validate_relative_subdirectory)] = ""
    pull_interval: Duration = 60.0

    @model_validator(mode="before")
    @classmethod
    def _default_branch(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "branch" not in data and "commit" not in data:
            return {**data, "branch": "main"}
        return data

    @model_validator(mode="after")
    def _branch_or_commit(self) -> GitSettings:
        if self.branch is not None and self.commit is not None:
            raise ValueError("set either branch or commit, not both")
        return self


class CronSchedule(_Model):
    cron: Annotated[str, BeforeValidator(values.validate_cron)]
    timezone: Annotated[str, BeforeValidator(values.validate_timezone)] = "UTC"


class IntervalSchedule(_Model):
    interval: PositiveDuration


SCHEDULE_TAGS = ("cron", "interval")


def _schedule_kind(data: Any) -> str:
    if isinstance(data, Mapping):
        return "cron" if "cron" in data else "interval"
    return "cron" if isinstance(data, CronSchedule) else "interval"


Schedule = Annotated[
    Annotated[CronSchedule, Tag("cron")] | Annotated[IntervalSchedule, Tag("interval")],
    Discriminator(_schedule_kind),
]


class DeploymentSettings(_Model):
    name: Name
    flow_name: Name
    entrypoint: Annotated[str, BeforeValidator(values.validate_entrypoint)]
    path: AbsolutePath | None = None
    git: GitSettings | None = None
    parameters: Annotated[dict[str, Any], AfterValidator(_json_parameters)] = Field(
        default_factory=dict
    )
    tags: tuple[str, ...] = ()
    description: str = ""
    # flow.serve's default (Prefect 3.8.8): the server checks run parameters against the schema.
    enforce_parameter_schema: Annotated[bool, Field(strict=True)] = True
    schedule: Schedule | None = None
    # Overrides of [flow_run]; only the keys a deployment sets (model_fields_set) apply.
    python: NonEmpty | None = None
    memory_max: MemoryLimit = None
    cpu_quota: CpuQuota = None
    tasks_max: TasksLimit = None
    runtime_max: RuntimeLimit = None
    user: Annotated[str, BeforeValidator(values.validate_user)] | None = None
    env: dict[EnvName, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _default_flow_name(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "flow_name" not in data and "name" in data:
            return {**data, "flow_name": data["name"]}
        return data

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule_shape(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            if "cron" in data and "interval" in data:
                raise ValueError("set either cron or interval, not both")
            if "cron" not in data and "interval" not in data:
                raise ValueError('needs cron = "..." or interval = "..."')
        elif data is not None and not isinstance(data, CronSchedule | IntervalSchedule):
            raise ValueError(f'expected a table like {{ interval = "10m" }}, got {data!r}')
        return data

    @model_validator(mode="after")
    def _one_code_source(self) -> DeploymentSettings:
        if self.path is not None and self.git is not None:
            raise ValueError("set either path or git, not both")
        if self.path is None and self.git is None:
            raise ValueError("needs a code source: set path (a directory) or git (a repository)")
        return self

    def flow_run_settings(self, defaults: FlowRunSettings) -> FlowRunSettings:
        """The run settings for this deployment: [flow_run] with this deployment's overrides."""
        updates = {key: getattr(self, key) for key in FLOW_RUN_KEYS if key in self.model_fields_set}
        if "env" in updates:
            updates["env"] = {**defaults.env, **self.env}
        return defaults.model_copy(update=updates)


class Settings(BaseSettings):
    """The whole config. Built only by load_settings, which passes every value in explicitly."""

    # `deployments=` works too, for code and tests that build Settings directly; config files
    # can't use that spelling, as their top-level keys are checked before validation.
    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        validate_default=False,
        validate_by_name=True,
        validate_by_alias=True,
    )

    api: ApiSettings = Field(default_factory=ApiSettings)
    agent: AgentSettings = Field(default_factory=AgentSettings)
    flow_run: FlowRunSettings = Field(default_factory=FlowRunSettings)
    deployments: tuple[DeploymentSettings, ...] = Field(default=(), alias="deployment")
    # Filled in by load_settings, never from a config source (top-level keys are checked first).
    sources: tuple[str, ...] = ()
    secret_sources: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only what load_settings merged: no implicit reads of os.environ, .env or secrets dirs.
        return (init_settings,)

    @model_validator(mode="after")
    def _unique_deployment_names(self) -> Settings:
        seen: set[str] = set()
        for deployment in self.deployments:
            if deployment.name in seen:
                raise ValueError(f"duplicate deployment name {deployment.name!r}")
            seen.add(deployment.name)
        return self

    def deployment(self, name: str) -> DeploymentSettings | None:
        return next((d for d in self.deployments if d.name == name), None)

    def redacted(self) -> dict[str, Any]:
        """The effective config as plain TOML-able data, secrets replaced by REDACTED."""
        data: dict[str, Any] = {
            section: _drop_none(getattr(self, section).model_dump(mode="json"))
            for section in ("api", "agent", "flow_run")
        }
        data["deployment"] = [
            _drop_none(d.model_dump(mode="json", exclude_unset=True)) for d in self.deployments
        ]
        return data


def _drop_none(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _drop_none(v) for k, v in data.items() if v is not None}
    if isinstance(data, list):
        return [_drop_none(v) for v in data]
    return data


def load_settings(config_path: Path | None, environ: Mapping[str, str]) -> Settings:
    """Read, merge and validate every source; raises ConfigError."""
    merged, main_source = read_sources(config_path, environ)
    try:
        settings = Settings(**merged.data)
    except ValidationError as exc:
        raise _translate(exc, merged, main_source) from None
    return _resolve_secrets(settings, merged, environ)


def _translate(exc: ValidationError, merged: RawConfig, default_source: str) -> ConfigError:
    errors = exc.errors(include_url=False)
    error = errors[0]
    raw = error["loc"]
    # Drop the union tag pydantic puts after `schedule`, and the `[key]` marker of dict keys.
    loc: Loc = tuple(
        part
        for i, part in enumerate(raw)
        if part != "[key]" and not (i and raw[i - 1] == "schedule" and part in SCHEDULE_TAGS)
    )
    source = merged.origin(loc) or default_source
    return ConfigError(
        source, _key_name(loc, merged.data) or None, _problem(error), more=len(errors) - 1
    )


def _key_name(loc: Loc, data: Mapping[str, Any]) -> str:
    parts: list[str] = []
    for i, part in enumerate(loc):
        if isinstance(part, int) and i and loc[i - 1] == "deployment":
            items = data.get("deployment") or []
            name = items[part].get("name") if part < len(items) else None
            label = name if isinstance(name, str) else f"#{part + 1}"
            parts[-1] = f"deployment[{label}]"
        elif isinstance(part, int):
            parts[-1] += f"[{part}]"
        else:
            parts.append(part if re.fullmatch(r"[\w-]+", part) else json.dumps(part))
    return ".".join(parts)


_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "string": "a string",
    "bool": "true or false",
    "dict": "a table",
    "model": "a table",
    "model_attributes": "a table",
    "list": "an array",
    "tuple": "an array",
    "path": "a path",
}


def _problem(error: Any) -> str:
    kind: str = error["type"]
    ctx = error.get("ctx") or {}
    got = show(error.get("input"))
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {got}"
    if kind in ("greater_than_equal", "greater_than"):
        bound = ctx.get("ge", ctx.get("gt"))
        return f"must be {'>=' if kind.endswith('equal') else '>'} {bound}, got {got}"
    for prefix, expected in _EXPECTED.items():
        if kind.startswith(f"{prefix}_"):
            return f"expected {expected}, got {got}"
    return f"{error['msg']}, got {got}"


def _resolve_secrets(settings: Settings, merged: RawConfig, environ: Mapping[str, str]) -> Settings:
    """Secrets: the key itself > its *_file > systemd credential > PREFECT_* variable."""
    api = settings.api
    key, key_from = _secret(
        api.key, api.key_file, "key", "api-key", "PREFECT_API_KEY", merged, environ
    )
    auth, auth_from = _secret(
        api.auth_string,
        api.auth_string_file,
        "auth_string",
        "auth-string",
        "PREFECT_API_AUTH_STRING",
        merged,
        environ,
    )
    found = {"api.key": key_from, "api.auth_string": auth_from}
    return settings.model_copy(
        update={
            "api": api.model_copy(update={"key": key, "auth_string": auth}),
            "sources": tuple(merged.files),
            "secret_sources": {k: v for k, v in found.items() if v is not None},
        }
    )


def _secret(
    value: SecretStr | None,
    file: Path | None,
    key: str,
    credential: str,
    variable: str,
    merged: RawConfig,
    environ: Mapping[str, str],
) -> tuple[SecretStr | None, str | None]:
    if value is not None:
        return value, merged.origin(("api", key)) or "config"
    if file is not None:
        source = merged.origin(("api", f"{key}_file")) or "config"
        text = read_secret(file, source, f"api.{key}_file")
        return SecretStr(text), f"{file} (api.{key}_file)"
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if directory and (Path(directory) / credential).exists():
        path = Path(directory) / credential
        text = read_secret(path, str(path), None)
        return SecretStr(text), f"systemd credential {credential!r}"
    if environ.get(variable, "").strip():
        return SecretStr(environ[variable].strip()), f"environment ({variable})"
    return None, None
