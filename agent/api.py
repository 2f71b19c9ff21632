"""The Prefect REST client: one typed method per endpoint the agent uses.

The transport (auth, retries, errors, parsing) is agent.http; its error classes are re-exported
here, as every caller of the client handles them.

Claims. `set_flow_run_state` sends a fresh `state_details.transition_id` per proposal (kept
across the retries of that proposal). Observed against Prefect 3.8.8 (tests/integration/
test_api_live.py): when a second client proposes PENDING for a run that is already PENDING,
the server answers **ABORT** with the reason "This run is in a PENDING state and cannot
transition to a PENDING state." (it never answers ACCEPT twice), so only one claimant wins.
When an answer is lost after the server applied a proposal, the retry (same transition id) is
REJECTed with "This run has already made this state transition." and the current state, which
carries our transition id: the client reads that as the ACCEPT it was (Prefect's
PreventDuplicateTransitions rule), or the claimant would leave its own claim PENDING for good.
A read of one run that answers with another run is `MalformedResponse`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote
from uuid import UUID, uuid4

from agent.http import (
    ApiConfig,
    ApiError,
    ApiTransport,
    ApiUnavailable,
    CredentialsRefused,
    MalformedResponse,
    PrefectApiError,
    excerpt,
)
from agent.schemas import (
    Deployment,
    Flow,
    FlowRun,
    Identified,
    OrchestrationResult,
    SetStateStatus,
    State,
    WorkerFlowRun,
    WorkPool,
)

__all__ = [
    "ApiConfig",
    "ApiError",
    "ApiUnavailable",
    "CredentialsRefused",
    "MalformedResponse",
    "PrefectApiError",
    "PrefectClient",
]

log = logging.getLogger("agent.api")


class PrefectClient(ApiTransport):
    """The Prefect API, as the agent uses it. An async context manager."""

    async def health(self) -> None:
        response = await self._request("GET", "/health")
        if self._json(response) is not True:
            raise ApiUnavailable(f"GET /health on {self.url} answered {excerpt(response.text)!r}")

    async def upsert_flow(self, name: str) -> UUID:
        response = await self._request("POST", "/flows/", body={"name": name})
        return self._one(response, Identified).id

    async def upsert_deployment(self, body: dict[str, Any]) -> UUID:
        response = await self._request("POST", "/deployments/", body=body)
        return self._one(response, Identified).id

    async def update_deployment(self, deployment_id: UUID, patch: dict[str, Any]) -> None:
        self._no_content(await self._request("PATCH", f"/deployments/{deployment_id}", body=patch))

    async def read_deployment(self, deployment_id: UUID) -> Deployment:
        response = await self._request("GET", f"/deployments/{deployment_id}")
        return self._one(response, Deployment)

    async def read_deployment_by_name(
        self, flow_name: str, deployment_name: str
    ) -> dict[str, Any] | None:
        """The server's deployment as raw JSON (for comparing with a wanted body), or None."""
        path = f"/deployments/name/{quote(flow_name, safe='')}/{quote(deployment_name, safe='')}"
        try:
            response = await self._request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        data = self._json(response)
        self._one(response, Identified)  # it must at least carry an id
        if not isinstance(data, dict):  # pragma: no cover - Identified rejects non-objects
            raise self._malformed(response, "expected an object")
        return data

    async def filter_deployments(self, body: dict[str, Any]) -> list[Deployment]:
        response = await self._request("POST", "/deployments/filter", body=body)
        return self._many(response, Deployment)

    async def get_scheduled_flow_runs(
        self, deployment_ids: Iterable[UUID], scheduled_before: datetime, limit: int
    ) -> list[FlowRun]:
        """SCHEDULED runs of these deployments due before `scheduled_before`, soonest first."""
        if scheduled_before.tzinfo is None:
            scheduled_before = scheduled_before.replace(tzinfo=UTC)
        body = {
            "deployment_ids": [str(d) for d in deployment_ids],
            "scheduled_before": scheduled_before.isoformat(),
            "limit": limit,
        }
        response = await self._request("POST", "/deployments/get_scheduled_flow_runs", body=body)
        return self._many(response, FlowRun)

    async def read_flow(self, flow_id: UUID) -> Flow:
        return self._one(await self._request("GET", f"/flows/{flow_id}"), Flow)

    async def read_work_pool(self, name: str) -> WorkPool | None:
        try:
            response = await self._request("GET", f"/work_pools/{quote(name, safe='')}")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return self._one(response, WorkPool)

    async def create_work_pool(self, body: dict[str, Any]) -> WorkPool:
        return self._one(await self._request("POST", "/work_pools/", body=body), WorkPool)

    async def get_pool_scheduled_runs(
        self, pool: str, queues: Sequence[str], scheduled_before: datetime, limit: int
    ) -> list[FlowRun]:
        """SCHEDULED runs of the pool's queues (all when none are named), in the order the
        server gives them: by queue priority, then by start time, within the pool's and the
        queues' concurrency limits."""
        if scheduled_before.tzinfo is None:
            scheduled_before = scheduled_before.replace(tzinfo=UTC)
        body: dict[str, Any] = {"scheduled_before": scheduled_before.isoformat(), "limit": limit}
        if queues:
            body["work_queue_names"] = list(queues)
        path = f"/work_pools/{quote(pool, safe='')}/get_scheduled_flow_runs"
        answer = self._many(await self._request("POST", path, body=body), WorkerFlowRun)
        return [item.flow_run for item in answer]

    async def worker_heartbeat(self, pool: str, worker: str, interval: float) -> None:
        """Lists this host as an online worker of the pool, and makes the pool READY."""
        body = {"name": worker, "heartbeat_interval_seconds": max(1, round(interval))}
        path = f"/work_pools/{quote(pool, safe='')}/workers/heartbeat"
        self._no_content(await self._request("POST", path, body=body))

    async def create_flow_run(
        self,
        deployment_id: UUID,
        *,
        state: dict[str, Any] | None = None,
        parameters: dict[str, Any] | None = None,
        tags: Sequence[str] | None = None,
        name: str | None = None,
    ) -> FlowRun:
        """A run of a deployment (SCHEDULED for now unless `state` says otherwise)."""
        fields = {
            "state": state,
            "parameters": parameters,
            "name": name,
            "tags": list(tags) if tags is not None else None,
        }
        body = {key: value for key, value in fields.items() if value is not None}
        path = f"/deployments/{deployment_id}/create_flow_run"
        return self._one(await self._request("POST", path, body=body), FlowRun)

    async def read_flow_run(self, flow_run_id: UUID) -> FlowRun:
        response = await self._request("GET", f"/flow_runs/{flow_run_id}")
        flow_run = self._one(response, FlowRun)
        if flow_run.id != flow_run_id:  # acting on another run's state would be worse than none
            raise self._malformed(response, f"answered with another run, {flow_run.id}")
        return flow_run

    async def filter_flow_runs(self, body: dict[str, Any]) -> list[FlowRun]:
        response = await self._request("POST", "/flow_runs/filter", body=body)
        return self._many(response, FlowRun)

    async def set_flow_run_state(
        self, flow_run_id: UUID, state: dict[str, Any], *, force: bool
    ) -> OrchestrationResult:
        """Propose `state`; its transition_id is a fresh uuid4 unless the caller set one."""
        details = dict(state.get("state_details") or {})
        details.setdefault("transition_id", str(uuid4()))
        body = {"state": {**state, "state_details": details}, "force": force}
        response = await self._request("POST", f"/flow_runs/{flow_run_id}/set_state", body=body)
        result = self._one(response, OrchestrationResult)
        current = result.state
        if (
            result.status in (SetStateStatus.REJECT, SetStateStatus.ABORT)
            and current is not None
            and str(current.state_details.get("transition_id")) == str(details["transition_id"])
        ):
            # Our own proposal, applied on an earlier attempt whose answer was lost.
            log.info(
                "%s on run %s was already accepted (a retried proposal)",
                current.type.value,
                flow_run_id,
            )
            return result.model_copy(update={"status": SetStateStatus.ACCEPT})
        return result

    async def read_flow_run_states(self, flow_run_id: UUID) -> list[State]:
        response = await self._request(
            "GET", "/flow_run_states/", params={"flow_run_id": str(flow_run_id)}
        )
        return self._many(response, State)

    async def create_logs(self, logs: Sequence[dict[str, Any]]) -> None:
        if logs:
            self._no_content(await self._request("POST", "/logs/", body=list(logs)))

    async def emit_events(self, events: Sequence[dict[str, Any]]) -> None:
        if events:
            self._no_content(await self._request("POST", "/events", body=list(events)))
