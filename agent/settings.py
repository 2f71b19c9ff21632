"""The config contract: the settings models, and load_settings, which fills them.

Values come from the sources of config_sources (in rising precedence: built-in defaults, the
PREFECT_* fallbacks, systemd credentials, the main TOML file, `agent.d/*.toml`, then
`RUNNER_AGENT_<SECTION>__<KEY>` variables), merged by pydantic-settings. Reading happens only at
load time, from the arguments given; the result is immutable. Every problem becomes one
ConfigError line that names the source, the key and the problem.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from agent import values
from agent.config_errors import ConfigError, from_validation_error
from agent.config_files import read_secret
from agent.config_sources import ConfigSources
from agent.deployment_settings import DeploymentSettings, GitSettings
from agent.pool_settings import WorkPoolSettings
from agent.run_settings import (
    DEFAULT_JOB_VARIABLES,
    FLOW_RUN_KEYS,
    AbsolutePath,
    ConfigModel,
    Duration,
    FlowRunSettings,
    JobVariable,
    Name,
    PositiveDuration,
    Secret,
    count,
)
from agent.schedules import KINDS as SCHEDULE_TAGS
from agent.schedules import CronSchedule, IntervalSchedule, RRuleSchedule, Schedule

__all__ = [
    "DEFAULT_JOB_VARIABLES",
    "FLOW_RUN_KEYS",
    "SCHEDULE_TAGS",
    "AgentSettings",
    "ApiSettings",
    "ConfigError",
    "CronSchedule",
    "DeploymentSettings",
    "FlowRunSettings",
    "GitSettings",
    "IntervalSchedule",
    "JobVariable",
    "RRuleSchedule",
    "Schedule",
    "Settings",
    "WorkPoolSettings",
    "load_settings",
]


class ApiSettings(ConfigModel):
    url: Annotated[str, BeforeValidator(values.validate_http_url)] = "http://127.0.0.1:4200/api"
    key: Secret | None = None
    key_file: AbsolutePath | None = None
    auth_string: Secret | None = None
    auth_string_file: AbsolutePath | None = None
    timeout: PositiveDuration = 30.0


class AgentSettings(ConfigModel):
    name: Name = Field(default_factory=socket.gethostname)
    limit: Annotated[int, count(1)] = 4
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
    work_pools: tuple[WorkPoolSettings, ...] = Field(default=(), alias="work_pool")
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
        # Prefect's identity of a deployment is FLOW/NAME: etl/prod and report/prod may coexist.
        seen: set[str] = set()
        for deployment in self.deployments:
            if deployment.key in seen:
                raise ValueError(
                    f"duplicate deployment name {deployment.name!r}: two [[deployment]]s of "
                    f"flow {deployment.flow_name!r} have it"
                )
            seen.add(deployment.key)
        return self

    @model_validator(mode="after")
    def _unique_pool_names(self) -> Settings:
        names = [pool.name for pool in self.work_pools]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate work pool {duplicates[0]!r}: two [[work_pool]]s name it")
        return self

    def deployment(self, key: str) -> DeploymentSettings | None:
        """The deployment `FLOW/NAME`; a bare NAME (records of older versions) when unique."""
        found = next((d for d in self.deployments if d.key == key), None)
        if found is None and "/" not in key:
            named = [d for d in self.deployments if d.name == key]
            found = named[0] if len(named) == 1 else None
        return found

    def redacted(self) -> dict[str, Any]:
        """The effective config as plain TOML-able data, secrets replaced by REDACTED."""
        data: dict[str, Any] = {
            section: _drop_none(getattr(self, section).model_dump(mode="json"))
            for section in ("api", "agent", "flow_run")
        }
        data["deployment"] = [
            _drop_none(d.model_dump(mode="json", exclude_unset=True)) for d in self.deployments
        ]
        data["work_pool"] = [p.model_dump(mode="json") for p in self.work_pools]
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
            union_tags={"schedule": SCHEDULE_TAGS, "schedules": SCHEDULE_TAGS},
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
