"""Tolerant models of the Prefect API's response bodies (Prefect 3.8 shapes).

Only the fields the agent reads are declared; everything else is ignored, so a newer server that
adds fields keeps working. `null` where a collection is expected reads as empty. A time without a
zone is UTC (comparing it with an aware one would raise). A WAIT's delay must be a finite number;
it is cut to [0, MAX_WAIT_SECONDS], so a hostile answer cannot park a claim for ever. Validation
errors are turned into `api.MalformedResponse` by the client; nothing here does I/O.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any
from uuid import UUID

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

# The longest WAIT the agent honours at once; the server can always say WAIT again.
MAX_WAIT_SECONDS = 3600.0
# The state name of a run waiting for a retry (Prefect's `AwaitingRetry`, a SCHEDULED type).
AWAITING_RETRY = "AwaitingRetry"


class StateType(StrEnum):
    SCHEDULED = "SCHEDULED"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    CRASHED = "CRASHED"
    PAUSED = "PAUSED"
    CANCELLING = "CANCELLING"

    @property
    def is_final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset({StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED})


class SetStateStatus(StrEnum):
    """The orchestration decision; a StrEnum, so `result.status == "ACCEPT"` holds."""

    ACCEPT = "ACCEPT"
    REJECT = "REJECT"
    ABORT = "ABORT"
    WAIT = "WAIT"


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


def _empty_dict(value: Any) -> Any:
    return {} if value is None else value


def _empty_list(value: Any) -> Any:
    return [] if value is None else value


def _empty_str(value: Any) -> Any:
    return "" if value is None else value


def _utc_if_naive(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _bounded_delay(value: float | None) -> float | None:
    return None if value is None else min(max(value, 0.0), MAX_WAIT_SECONDS)


Text = Annotated[str, BeforeValidator(_empty_str)]
Time = Annotated[datetime, AfterValidator(_utc_if_naive)]
Delay = Annotated[float | None, Field(allow_inf_nan=False), AfterValidator(_bounded_delay)]
AnyDict = Annotated[dict[str, Any], BeforeValidator(_empty_dict)]
StrList = Annotated[list[str], BeforeValidator(_empty_list)]
DictList = Annotated[list[dict[str, Any]], BeforeValidator(_empty_list)]


class State(_Model):
    id: UUID | None = None
    type: StateType
    name: str | None = None
    timestamp: Time | None = None
    message: str | None = None
    state_details: AnyDict = Field(default_factory=dict)


class FlowRun(_Model):
    id: UUID
    name: Text = ""
    flow_id: UUID | None = None
    deployment_id: UUID | None = None
    state: State | None = None
    tags: StrList = Field(default_factory=list)
    parameters: AnyDict = Field(default_factory=dict)
    expected_start_time: Time | None = None
    next_scheduled_start_time: Time | None = None
    start_time: Time | None = None
    end_time: Time | None = None
    work_queue_name: str | None = None
    run_count: int = 0
    infrastructure_pid: str | None = None
    empirical_policy: AnyDict = Field(default_factory=dict)
    job_variables: AnyDict = Field(default_factory=dict)
    work_pool_name: str | None = None

    @property
    def state_type(self) -> StateType | None:
        return self.state.type if self.state is not None else None

    @property
    def retrying_in_process(self) -> bool:
        """AwaitingRetry whose engine retries in its own process (Prefect's `retry_type`
        in_process): that engine, alive somewhere, runs it again, so nobody may claim it.
        Prefect's workers skip these too (PrefectHQ/prefect#15458).

        The state must say so as well: the server leaves `retry_type` in_process after the
        retry, also through a later suspension, so a run Resuming after a suspend would never
        be claimed by `retry_type` alone."""
        state = self.state
        return (
            state is not None
            and state.type is StateType.SCHEDULED
            and state.name == AWAITING_RETRY
            and self.empirical_policy.get("retry_type") == "in_process"
        )


class Deployment(_Model):
    id: UUID
    name: str
    flow_id: UUID
    paused: bool = False
    path: str | None = None
    entrypoint: str | None = None
    description: str | None = None
    parameters: AnyDict = Field(default_factory=dict)
    tags: StrList = Field(default_factory=list)
    schedules: DictList = Field(default_factory=list)
    work_queue_name: str | None = None
    status: str | None = None
    # What `prefect deploy` sets: the engine runs the pull steps itself.
    pull_steps: DictList = Field(default_factory=list)
    job_variables: AnyDict = Field(default_factory=dict)
    work_pool_name: str | None = None


class Flow(_Model):
    id: UUID
    name: str


class WorkPool(_Model):
    id: UUID
    name: str
    type: str
    status: str | None = None
    concurrency_limit: int | None = None
    base_job_template: AnyDict = Field(default_factory=dict)


class WorkerFlowRun(_Model):
    """One answer item of `POST /work_pools/{name}/get_scheduled_flow_runs`."""

    work_pool_id: UUID
    work_queue_id: UUID
    flow_run: FlowRun


class OrchestrationDetails(_Model):
    """The union of Prefect's accept/reject/abort/wait details: only what the agent reads."""

    type: str | None = None
    reason: str | None = None
    delay_seconds: Delay = None


class OrchestrationResult(_Model):
    status: SetStateStatus
    details: OrchestrationDetails = Field(default_factory=OrchestrationDetails)
    state: State | None = None

    @field_validator("details", mode="before")
    @classmethod
    def _no_details(cls, value: Any) -> Any:
        return OrchestrationDetails() if value is None else value


class Identified(_Model):
    """Any object of which only the id matters (an upserted flow or deployment)."""

    id: UUID
