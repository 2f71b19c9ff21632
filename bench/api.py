"""The benchmark's view of the Prefect server: create runs, cancel them, read their timelines.

Every figure the benchmark reports about latency comes from here, from the server's own state
timestamps, so both contenders are measured by the same clock and the same rules.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from tests.integration.server_http import server_client

FINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})


class BenchError(RuntimeError):
    """A scenario could not be measured (timeout, a run that never started, ...)."""


def parse_ts(value: str) -> float:
    """Server timestamp (ISO 8601, with offset) as POSIX seconds."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def wait_until(
    predicate: Callable[[], Any], timeout: float, *, interval: float = 0.2, what: str
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass(frozen=True)
class Timeline:
    """One run's life in server time: seconds since `created`, None when never reached."""

    run_id: str
    created: float
    final_type: str | None
    pickup: float | None  # created -> first PENDING
    start: float | None  # created -> first RUNNING
    total: float | None  # created -> the final state
    cancel: float | None  # last CANCELLING -> CANCELLED
    final_at: float | None  # POSIX time of the final state
    states: tuple[tuple[float, str], ...]  # (POSIX time, type), in order


class BenchApi:
    def __init__(self, api_url: str) -> None:
        # Rides out the busy server's 503s and resets (tests/integration/server_http.py).
        self.client = server_client(api_url)

    def close(self) -> None:
        self.client.close()

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        response = self.client.request(method, url, **kwargs)
        response.raise_for_status()
        return response

    def deployment_id(self, flow_name: str, name: str) -> str | None:
        try:
            response = self.request("GET", f"/deployments/name/{flow_name}/{name}")
        except httpx.HTTPStatusError:
            return None
        return str(response.json()["id"])

    def wait_deployment(self, flow_name: str, name: str, timeout: float) -> str:
        return str(
            wait_until(
                lambda: self.deployment_id(flow_name, name),
                timeout,
                interval=0.5,
                what=f"deployment {flow_name}/{name} to be registered",
            )
        )

    def create_run(self, deployment_id: str) -> str:
        # The key makes a creation retried after a 503 that did the write return the same run.
        body = {"idempotency_key": str(uuid.uuid4())}
        response = self.request("POST", f"/deployments/{deployment_id}/create_flow_run", json=body)
        return str(response.json()["id"])

    def set_cancelling(self, run_id: str) -> None:
        self.request(
            "POST",
            f"/flow_runs/{run_id}/set_state",
            json={"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True},
        )

    def log_messages(self, run_id: str, limit: int = 200) -> list[str]:
        """The run's log messages in the server (the engine's, and the agent's mirrored ones)."""
        response = self.request(
            "POST",
            "/logs/filter",
            json={"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": limit},
        )
        return [str(entry["message"]) for entry in response.json()]

    def state_types(self, run_ids: Iterable[str]) -> dict[str, str | None]:
        """Current state type of each run, one request for all of them."""
        ids = list(run_ids)
        states: dict[str, str | None] = {}
        for offset in range(0, len(ids), 200):
            chunk = ids[offset : offset + 200]
            response = self.request(
                "POST",
                "/flow_runs/filter",
                json={"flow_runs": {"id": {"any_": chunk}}, "limit": len(chunk)},
            )
            for run in response.json():
                states[str(run["id"])] = (run.get("state") or {}).get("type")
        return states

    def wait_states(
        self, run_ids: Iterable[str], wanted: frozenset[str], timeout: float, *, what: str
    ) -> dict[str, str | None]:
        ids = list(run_ids)

        def reached() -> dict[str, str | None] | None:
            states = self.state_types(ids)
            done = all(states.get(i) in wanted for i in ids)
            return states if done else None

        return dict(wait_until(reached, timeout, what=what))

    def wait_final(self, run_ids: Iterable[str], timeout: float) -> dict[str, str | None]:
        ids = list(run_ids)
        return self.wait_states(ids, FINAL, timeout, what=f"{len(ids)} run(s) to finish")

    def timeline(self, run_id: str) -> Timeline:
        run = self.request("GET", f"/flow_runs/{run_id}").json()
        history = self.request("GET", "/flow_run_states/", params={"flow_run_id": run_id}).json()
        states = sorted(
            ((parse_ts(s["timestamp"]), str(s["type"])) for s in history), key=lambda s: s[0]
        )
        created = parse_ts(run["created"])

        def first(state_type: str) -> float | None:
            return next((ts for ts, t in states if t == state_type), None)

        final = next(((ts, t) for ts, t in reversed(states) if t in FINAL), None)
        cancelled = first("CANCELLED")
        cancelling = None
        if cancelled is not None:
            cancelling = max(
                (ts for ts, t in states if t == "CANCELLING" and ts <= cancelled), default=None
            )
        pending, running = first("PENDING"), first("RUNNING")
        return Timeline(
            run_id=run_id,
            created=created,
            final_type=final[1] if final else None,
            pickup=pending - created if pending is not None else None,
            start=running - created if running is not None else None,
            total=final[0] - created if final else None,
            cancel=(
                cancelled - cancelling if cancelled is not None and cancelling is not None else None
            ),
            final_at=final[0] if final else None,
            states=tuple(states),
        )
