"""A `[[deployment]]` of the config: its code source, schedules and run-setting overrides."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    model_validator,
)

from agent import values
from agent.run_settings import (
    FLOW_RUN_KEYS,
    AbsolutePath,
    ConfigModel,
    CpuQuota,
    Duration,
    EnvName,
    FlowRunSettings,
    MemoryLimit,
    Name,
    NonEmpty,
    RuntimeLimit,
    TasksLimit,
    json_parameters,
)
from agent.schedules import AnySchedule, Schedule


class GitSettings(ConfigModel):
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


class DeploymentSettings(ConfigModel):
    name: Name
    flow_name: Name
    entrypoint: Annotated[str, BeforeValidator(values.validate_entrypoint)]
    path: AbsolutePath | None = None
    git: GitSettings | None = None
    parameters: Annotated[dict[str, Any], AfterValidator(json_parameters)] = Field(
        default_factory=dict
    )
    tags: tuple[str, ...] = ()
    description: str = ""
    # flow.serve's default (Prefect 3.8.8): the server checks run parameters against the schema.
    enforce_parameter_schema: Annotated[bool, Field(strict=True)] = True
    # `schedule` is the single-schedule spelling of earlier versions; set it or `schedules`.
    schedule: Schedule | None = None
    schedules: tuple[Schedule, ...] = ()
    paused: Annotated[bool, Field(strict=True)] = False
    concurrency_limit: Annotated[int, Field(strict=True, ge=1)] | None = None
    collision_strategy: Literal["ENQUEUE", "CANCEL_NEW"] | None = None
    # Unset: the git commit of a git source (as the code's version), else none.
    version: NonEmpty | None = None
    # Overrides of [flow_run]; only the keys a deployment sets (model_fields_set) apply.
    python: NonEmpty | None = None
    memory_max: MemoryLimit = None
    cpu_quota: CpuQuota = None
    tasks_max: TasksLimit = None
    runtime_max: RuntimeLimit = None
    user: Annotated[str, BeforeValidator(values.validate_user)] | None = None
    env: dict[EnvName, str] = Field(default_factory=dict)
    engine: Literal["cold", "warm"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_flow_name(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "flow_name" not in data and "name" in data:
            return {**data, "flow_name": data["name"]}
        return data

    @model_validator(mode="after")
    def _schedule_or_schedules(self) -> DeploymentSettings:
        if self.schedule is not None and self.schedules:
            raise ValueError("set either schedule or schedules, not both")
        if self.collision_strategy is not None and self.concurrency_limit is None:
            raise ValueError("collision_strategy needs a concurrency_limit")
        return self

    @property
    def key(self) -> str:
        """The deployment's identity: FLOW/NAME as Prefect names it, or just NAME when the flow
        has that name too (the default, and all earlier versions knew). Names hold no "/", so
        keys are unique; records, logs and storage directories use them."""
        return self.name if self.flow_name == self.name else f"{self.flow_name}/{self.name}"

    def all_schedules(self) -> tuple[AnySchedule, ...]:
        return (self.schedule,) if self.schedule is not None else self.schedules

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
