"""agent.schemas: real Prefect 3.8 bodies parse, odd-but-legal ones too, junk fails cleanly."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.schemas import (
    Deployment,
    FlowRun,
    OrchestrationResult,
    SetStateStatus,
    State,
    StateType,
)

# Captured from a real Prefect 3.8.8 server (the deployment without fields the agent never reads).
FLOW_RUN: dict[str, Any] = {
    "id": "c8dbbcbc-6aca-4d92-9332-f8b38ebd60c5",
    "created": "2026-11-23T21:25:59.370469Z",
    "updated": "2026-11-23T21:25:59.386000Z",
    "name": "notorious-markhor",
    "flow_id": "906bf042-fd33-40d6-827c-5ff11bd9535e",
    "state_id": "01a20a4d-2bca-7d35-b5b2-c29f7c9969d8",
    "deployment_id": "188f7091-f0d3-4ad8-8898-cf849e6832ba",
    "deployment_version": None,
    "work_queue_id": None,
    "work_queue_name": None,
    "flow_version": None,
    "parameters": {},
    "idempotency_key": None,
    "context": {},
    "empirical_policy": {
        "max_retries": 0,
        "retry_delay_seconds": 0.0,
        "retries": None,
        "retry_delay": None,
        "pause_keys": [],
        "resuming": False,
        "retry_type": None,
    },
    "tags": [],
    "labels": {
        "prefect.flow.id": "906bf042-fd33-40d6-827c-5ff11bd9535e",
        "prefect.deployment.id": "188f7091-f0d3-4ad8-8898-cf849e6832ba",
    },
    "parent_task_run_id": None,
    "state_type": "SCHEDULED",
    "state_name": "Scheduled",
    "run_count": 0,
    "expected_start_time": "2026-11-23T21:25:59.370264Z",
    "next_scheduled_start_time": "2026-11-23T21:25:59.370264Z",
    "start_time": None,
    "end_time": None,
    "total_run_time": 0.0,
    "estimated_run_time": 0.0,
    "estimated_start_time_delta": 0.018818,
    "auto_scheduled": False,
    "infrastructure_document_id": None,
    "infrastructure_pid": None,
    "created_by": None,
    "work_pool_id": None,
    "work_pool_name": None,
    "state": {
        "id": "01a20a4d-2bca-7d35-b5b2-c29f7c9969d8",
        "type": "SCHEDULED",
        "name": "Scheduled",
        "timestamp": "2026-11-23T21:25:59.370294Z",
        "message": None,
        "data": None,
        "state_details": {
            "flow_run_id": "c8dbbcbc-6aca-4d92-9332-f8b38ebd60c5",
            "task_run_id": None,
            "child_flow_run_id": None,
            "scheduled_time": "2026-11-23T21:25:59.370264Z",
            "cache_key": None,
            "cache_expiration": None,
            "deferred": False,
            "untrackable_result": False,
            "pause_timeout": None,
            "pause_reschedule": False,
            "pause_key": None,
            "run_input_keyset": None,
            "refresh_cache": None,
            "retriable": None,
            "transition_id": None,
            "task_parameters_id": None,
            "traceparent": None,
            "deployment_concurrency_lease_id": None,
        },
    },
    "job_variables": {},
}

DEPLOYMENT: dict[str, Any] = {
    "id": "188f7091-f0d3-4ad8-8898-cf849e6832ba",
    "created": "2026-11-23T21:25:59.304575Z",
    "updated": "2026-11-23T21:25:59.301613Z",
    "name": "d",
    "version": None,
    "description": None,
    "flow_id": "906bf042-fd33-40d6-827c-5ff11bd9535e",
    "paused": False,
    "schedules": [
        {
            "id": "bd3b8452-b4ac-4492-a058-7351715e74d2",
            "created": "2026-11-23T21:25:59.323105Z",
            "updated": "2026-11-23T21:25:59.323115Z",
            "deployment_id": "188f7091-f0d3-4ad8-8898-cf849e6832ba",
            "schedule": {"cron": "0 1 * * *", "timezone": "UTC", "day_or": True},
            "active": True,
            "max_scheduled_runs": None,
            "parameters": {},
            "slug": None,
        }
    ],
    "parameters": {},
    "tags": [],
    "path": None,
    "entrypoint": None,
    "work_queue_name": None,
    "status": "NOT_READY",
    "enforce_parameter_schema": True,
    "labels": {"prefect.flow.id": "906bf042-fd33-40d6-827c-5ff11bd9535e"},
    "job_variables": {},
}

ACCEPT: dict[str, Any] = {
    "state": {
        "id": "01a20a4d-2be6-724c-aa28-fde34d5852a7",
        "type": "PENDING",
        "name": "Pending",
        "timestamp": "2026-11-23T21:25:59.398379Z",
        "message": None,
        "data": None,
        "state_details": {
            "flow_run_id": "c8dbbcbc-6aca-4d92-9332-f8b38ebd60c5",
            "task_run_id": None,
            "child_flow_run_id": None,
            "scheduled_time": "2026-11-23T21:25:59.370264Z",
            "cache_key": None,
            "cache_expiration": None,
            "deferred": False,
            "untrackable_result": False,
            "pause_timeout": None,
            "pause_reschedule": False,
            "pause_key": None,
            "run_input_keyset": None,
            "refresh_cache": None,
            "retriable": None,
            "transition_id": None,
            "task_parameters_id": None,
            "traceparent": None,
            "deployment_concurrency_lease_id": None,
        },
    },
    "status": "ACCEPT",
    "details": {"type": "accept_details"},
}

ABORT: dict[str, Any] = {
    "state": {
        "id": "01a20a4d-2be6-724c-aa28-fde34d5852a7",
        "type": "PENDING",
        "name": "Pending",
        "timestamp": "2026-11-23T21:25:59.398379Z",
        "message": None,
        "data": None,
        "state_details": {
            "flow_run_id": "c8dbbcbc-6aca-4d92-9332-f8b38ebd60c5",
            "task_run_id": None,
            "child_flow_run_id": None,
            "scheduled_time": "2026-11-23T21:25:59.370264Z",
            "cache_key": None,
            "cache_expiration": None,
            "deferred": False,
            "untrackable_result": False,
            "pause_timeout": None,
            "pause_reschedule": False,
            "pause_key": None,
            "run_input_keyset": None,
            "refresh_cache": None,
            "retriable": None,
            "transition_id": None,
            "task_parameters_id": None,
            "traceparent": None,
            "deployment_concurrency_lease_id": None,
        },
    },
    "status": "ABORT",
    "details": {
        "type": "abort_details",
        "reason": "This run is in a PENDING state and cannot transition to a PENDING state.",
    },
}

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def test_final_state_types() -> None:
    final = {t for t in StateType if t.is_final}
    assert final == {StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED}
    assert StateType.CANCELLING.is_final is False
    assert StateType("PAUSED") is StateType.PAUSED


def test_real_flow_run_parses() -> None:
    run = FlowRun.model_validate(FLOW_RUN)
    assert run.id == UUID("c8dbbcbc-6aca-4d92-9332-f8b38ebd60c5")
    assert run.name == "notorious-markhor"
    assert run.deployment_id == UUID("188f7091-f0d3-4ad8-8898-cf849e6832ba")
    assert run.state is not None and run.state.type is StateType.SCHEDULED
    assert run.state_type is StateType.SCHEDULED
    assert run.state.state_details["flow_run_id"] == FLOW_RUN["id"]
    assert run.expected_start_time == datetime(2026, 11, 23, 21, 25, 59, 370264, tzinfo=UTC)
    assert run.tags == [] and run.parameters == {} and run.work_queue_name is None


def test_flow_run_tolerates_nulls_and_unknown_fields() -> None:
    body = copy.deepcopy(FLOW_RUN)
    body.update(tags=None, parameters=None, name=None, state=None, brand_new_field={"x": 1})
    run = FlowRun.model_validate(body)
    assert (run.tags, run.parameters, run.name) == ([], {}, "")
    assert (run.state, run.state_type) == (None, None)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", "not-a-uuid"),
        ("id", None),
        ("tags", "a,b"),
        ("state", {"type": "EXPLODED"}),
        ("expected_start_time", "yesterday"),
        ("parameters", [1, 2]),
    ],
)
def test_flow_run_rejects_wrong_types(field: str, value: Any) -> None:
    body = copy.deepcopy(FLOW_RUN)
    body[field] = value
    with pytest.raises(ValidationError):
        FlowRun.model_validate(body)


def test_flow_run_needs_an_id() -> None:
    body = copy.deepcopy(FLOW_RUN)
    del body["id"]
    with pytest.raises(ValidationError):
        FlowRun.model_validate(body)


def test_real_deployment_parses() -> None:
    deployment = Deployment.model_validate(DEPLOYMENT)
    assert deployment.name == "d" and deployment.paused is False
    assert deployment.schedules[0]["schedule"] == {
        "cron": "0 1 * * *",
        "timezone": "UTC",
        "day_or": True,
    }


def test_real_orchestration_results_parse() -> None:
    accept = OrchestrationResult.model_validate(ACCEPT)
    assert accept.status is SetStateStatus.ACCEPT and accept.status == "ACCEPT"
    assert accept.details.type == "accept_details" and accept.details.reason is None
    assert accept.state is not None and accept.state.type is StateType.PENDING

    abort = OrchestrationResult.model_validate(ABORT)
    assert abort.status is SetStateStatus.ABORT
    assert abort.details.reason == (
        "This run is in a PENDING state and cannot transition to a PENDING state."
    )


@pytest.mark.parametrize(
    ("body", "status", "reason", "delay"),
    [
        (
            {
                "status": "REJECT",
                "details": {"type": "reject_details", "reason": "no"},
                "state": None,
            },
            SetStateStatus.REJECT,
            "no",
            None,
        ),
        (
            {
                "status": "WAIT",
                "details": {"type": "wait_details", "delay_seconds": 5},
                "state": None,
            },
            SetStateStatus.WAIT,
            None,
            5.0,
        ),
        ({"status": "ACCEPT", "details": None}, SetStateStatus.ACCEPT, None, None),
        ({"status": "ACCEPT"}, SetStateStatus.ACCEPT, None, None),
    ],
)
def test_orchestration_result_variants(
    body: dict[str, Any], status: SetStateStatus, reason: str | None, delay: float | None
) -> None:
    result = OrchestrationResult.model_validate(body)
    assert (result.status, result.details.reason, result.details.delay_seconds, result.state) == (
        status,
        reason,
        delay,
        None,
    )


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"status": "MAYBE"},
        {"status": None},
        {"status": "ACCEPT", "details": "x"},
        {"status": "WAIT", "details": {"delay_seconds": "soon"}},
        [],
        "ACCEPT",
        None,
    ],
)
def test_orchestration_result_rejects_junk(body: Any) -> None:
    with pytest.raises(ValidationError):
        OrchestrationResult.model_validate(body)


def test_state_details_null_reads_as_empty() -> None:
    state = State.model_validate({"type": "RUNNING", "state_details": None})
    assert state.state_details == {} and state.name is None


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=JSON, field=st.sampled_from(sorted(FLOW_RUN)))
def test_fuzzed_bodies_parse_or_raise_validation_error_only(data: Any, field: str) -> None:
    mutated = copy.deepcopy(FLOW_RUN)
    mutated[field] = data
    for model, body in (
        (FlowRun, data),
        (FlowRun, mutated),
        (OrchestrationResult, data),
        (State, data),
        (Deployment, data),
    ):
        try:
            parsed = model.model_validate(body)
        except ValidationError:
            continue
        assert isinstance(parsed, model)


@pytest.mark.parametrize(
    ("state", "retry_type", "retrying"),
    [
        (("SCHEDULED", "AwaitingRetry"), "in_process", True),
        (("SCHEDULED", "AwaitingRetry"), "reschedule", False),
        (("SCHEDULED", "AwaitingRetry"), None, False),
        # The server leaves `retry_type` in_process after the retry: the run's later states
        # are nobody's in-process retry (a resume after a suspend must be claimed).
        (("SCHEDULED", "Resuming"), "in_process", False),
        (("SCHEDULED", "Scheduled"), "in_process", False),
        (("RUNNING", "Running"), "in_process", False),
        (None, "in_process", False),
    ],
)
def test_retrying_in_process_needs_the_awaiting_retry_state(
    state: tuple[str, str] | None, retry_type: str | None, retrying: bool
) -> None:
    body = copy.deepcopy(FLOW_RUN)
    body["state"] = {"type": state[0], "name": state[1]} if state else None
    body["empirical_policy"]["retry_type"] = retry_type
    assert FlowRun.model_validate(body).retrying_in_process is retrying
