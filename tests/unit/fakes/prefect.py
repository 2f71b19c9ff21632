"""One in-memory Prefect server behind httpx.MockTransport, for every unit test that talks
to the API through `PrefectClient`: flows and deployments (the registry), one flow run with
state proposals (the supervisor), logs. Every request body is recorded for exact asserts."""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID, uuid4

import httpx

from agent.api import PrefectClient
from agent.settings import load_settings

URL = "http://127.0.0.1:9/api"


class FakePrefect:
    """Keeps flows, deployments and one flow run as the server would.

    `claim_answers` are the answers to the next PENDING proposals (ACCEPT, REJECT, ABORT,
    WAIT or APPLIED-BUT-ERROR: applied, then the answer is lost); every other proposal is
    accepted."""

    def __init__(
        self,
        run_id: UUID | None = None,
        *,
        state: str = "SCHEDULED",
        claim_answers: list[dict[str, Any]] | None = None,
        job_variables: dict[str, Any] | None = None,
    ) -> None:
        self.run_id = run_id or uuid4()
        self.job_variables = job_variables or {}
        self.state: dict[str, Any] = {"type": state, "name": state.title(), "message": None}
        self.claim_answers = list(claim_answers or [])
        self.proposals: list[dict[str, Any]] = []
        self.logs: list[dict[str, Any]] = []
        self.flows: dict[str, str] = {}
        self.deployments: dict[tuple[str, str], dict[str, Any]] = {}
        self.upserts: list[dict[str, Any]] = []

    def run_body(self) -> dict[str, Any]:
        return {
            "id": str(self.run_id),
            "name": "brave-otter",
            "flow_id": str(uuid4()),
            "deployment_id": str(uuid4()),
            "tags": [],
            "state": self.state,
            "job_variables": self.job_variables,
        }

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/api")
        method = request.method
        if method == "GET" and path == f"/flow_runs/{self.run_id}":
            return httpx.Response(200, json=self.run_body())
        if method == "POST" and path == f"/flow_runs/{self.run_id}/set_state":
            return self._set_state(json.loads(request.content))
        if method == "POST" and path == "/logs/":
            self.logs.extend(json.loads(request.content))
            return httpx.Response(201, json=None)
        if method == "POST" and path == "/flows/":
            name = json.loads(request.content)["name"]
            return httpx.Response(200, json={"id": self.flows.setdefault(name, str(uuid4()))})
        if method == "GET" and path.startswith("/deployments/name/"):
            return self._read_deployment(path.removeprefix("/deployments/name/"))
        if method == "POST" and path == "/deployments/":
            return self._upsert_deployment(json.loads(request.content))
        return httpx.Response(404, json={"detail": f"not faked: {method} {path}"})

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handler)

    def client(self, **kwargs: Any) -> PrefectClient:
        settings = load_settings(None, {"RUNNER_AGENT_API__URL": URL})
        return PrefectClient(settings.api, transport=self.transport(), **kwargs)

    def proposed_types(self) -> list[str]:
        return [p["state"]["type"] for p in self.proposals]

    def _set_state(self, body: dict[str, Any]) -> httpx.Response:
        self.proposals.append(body)
        proposed = body["state"]
        transition_id = proposed["state_details"]["transition_id"]
        if not body["force"] and transition_id == _transition_id(self.state):
            # Prefect's PreventDuplicateTransitions: the current state comes back.
            reason = "This run has already made this state transition."
            return httpx.Response(
                201, json={"status": "REJECT", "details": {"reason": reason}, "state": self.state}
            )
        if proposed["type"] == "PENDING" and self.claim_answers:
            answer = self.claim_answers.pop(0)
        else:
            answer = {"status": "ACCEPT", "details": {}}
        if answer["status"] in ("ACCEPT", "APPLIED-BUT-ERROR"):
            self.state = {k: proposed.get(k) for k in ("type", "name", "message", "state_details")}
        if answer["status"] == "APPLIED-BUT-ERROR":
            # The server applied it, the answer went wrong: the outcome must be re-read.
            return httpx.Response(409, json={"detail": "answer mangled on the way"})
        return httpx.Response(201, json={**answer, "state": self.state})

    def _read_deployment(self, names: str) -> httpx.Response:
        flow_name, name = names.split("/")
        found = self.deployments.get((self.flows.get(flow_name) or "", name))
        return httpx.Response(200, json=found) if found else httpx.Response(404, json={})

    def _upsert_deployment(self, body: dict[str, Any]) -> httpx.Response:
        self.upserts.append(body)
        key = (body["flow_id"], body["name"])
        stored = {**body, "id": self.deployments.get(key, {}).get("id", str(uuid4()))}
        if not stored["parameter_openapi_schema"]:  # as the server normalises it
            stored["parameter_openapi_schema"] = {"type": "object", "properties": {}}
        self.deployments[key] = stored
        return httpx.Response(201, json={"id": stored["id"]})


def _transition_id(state: dict[str, Any]) -> str | None:
    details = state.get("state_details") or {}
    return details.get("transition_id")
