"""The config contract: the settings models, and load_settings, which fills them.

Values come from the sources of config_sources (in rising precedence: built-in defaults, the
PREFECT_* fallbacks, systemd credentials, the main TOML file, `agent.d/*.toml`, then
`RUNNER_AGENT_<SECTION>__<KEY>` variables), merged by pydantic-settings. Reading happens only at
load time, from the arguments given; the result is immutable. Every problem becomes one
ConfigError line that names the source, the key and the problem.
"""

from __future__ import annotations

import math
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
from agent.config_errors import ConfigError, from_validation_error, show
from agent.config_files import read_secret
from agent.config_sources import ConfigSources

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


JobVariable = Literal[
    "env", "memory_max", "cpu_quota", "tasks_max", "runtime_max", "user", "python"
]
DEFAULT_JOB_VARIABLES: tuple[JobVariable, ...] = (
    "env",
    "memory_max",
    "cpu_quota",
    "tasks_max",
    "runtime_max",
)


class AgentSettings(_Model):
    name: Name = Field(default_factory=socket.gethostname)
    limit: Annotated[int, _count(1)] = 4
    poll_interval: PositiveDuration = 10.0
    prefetch: Duration = 10.0
    heartbeat_interval: PositiveDuration = 30.0
    cancel_grace: Duration = 30.0
    # A flow's on_cancellation / on_crashed hooks that the agent runs are killed after this.
    hook_timeout: PositiveDuration = 300.0
    # The run settings a deployment's or a flow run's job variables may set (jobvars.py).
    job_variables: tuple[JobVariable, ...] = DEFAULT_JOB_VARIABLES
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
        # Settings built in code take their arguments only: no implicit reads of os.environ,
        # .env or secrets dirs. load_settings passes its own sources (config_sources).
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
    sources = ConfigSources(Settings, config_path, environ)
    try:
        # settings_customise_sources cannot see the path and environment given: hand the
        # sources over as built. (mypy sees only the fields' __init__, not BaseSettings'.)
        settings = Settings(_build_sources=(sources.by_precedence, {}))  # type: ignore[call-arg]
    except ValidationError as exc:
        raise from_validation_error(
            exc,
            origin=sources.origin,
            deployments=sources.files.deployments,
            default_source=sources.files.main_file,
            union_tags={"schedule": SCHEDULE_TAGS},
        ) from None
    return _resolve_secrets(settings, sources)


def _resolve_secrets(settings: Settings, sources: ConfigSources) -> Settings:
    """Secrets: the key itself > its *_file > systemd credential > PREFECT_* variable.

    The sources have placed all but the *_file, which is read only now that its path is known
    to be valid; so is a credential's read error raised, after any problem of the config itself.
    """
    api = settings.api
    secrets: dict[str, SecretStr] = {}
    found: dict[str, str] = {}
    for key in ("key", "auth_string"):
        failure = sources.credentials.failures.get(key)
        if failure is not None:
            raise failure
        value: SecretStr | None = getattr(api, key)
        file: Path | None = getattr(api, f"{key}_file")
        if value is not None:
            found[f"api.{key}"] = sources.origin(("api", key)) or "config"
        elif file is not None:
            source = sources.origin(("api", f"{key}_file")) or "config"
            secrets[key] = SecretStr(read_secret(file, source, f"api.{key}_file"))
            found[f"api.{key}"] = f"{file} (api.{key}_file)"
    return settings.model_copy(
        update={
            "api": api.model_copy(update=secrets),
            "sources": tuple(sources.files.files),
            "secret_sources": found,
        }
    )
