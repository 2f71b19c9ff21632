"""Hostile API answers in the running loop (issue 9, item 4: bad input).

A stateful fake Prefect server (httpx.MockTransport) answers like Prefect 3.8 until a generated
fault takes over one or more requests to one endpoint: wrong types, missing, extra or null fields,
huge strings, deep nesting, invalid or truncated JSON, HTML error pages, empty bodies, odd
content types and encodings, timeouts and connection resets (also mid-body). A fault may hit after
the server did the work (the answer was lost), as a proxy in front of a healthy server would.

The real components run against it: the Runner's poll loop with the DeploymentRegistry, the
supervisors' claim and report paths with a fake launcher (no processes), the CancellationWatcher,
the Reporter, the log and event shippers, the events subscription and `check-config --online`.
For every example: no exception escapes, the loop keeps polling after the bad answers, every
client error is logged as one WARNING/ERROR line naming the endpoint (no tracebacks), no run is
launched without a claim the server accepted, nothing is claimed or launched twice, and once the
server heals, nothing is lost: the due run ends exactly once, every log message and event arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import json
import logging
import re
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from uuid import UUID, uuid4

import httpx
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent import api as api_module
from agent.api import PrefectApiError, PrefectClient
from agent.cancellation import CancellationWatcher
from agent.claims import claim_message
from agent.deployments import EMPTY_SCHEMA, REGISTRY_FILE, DeploymentRegistry
from agent.emitter import EventEmitter
from agent.flowlogs import FlowRunLogs
from agent.launch.base import LaunchRequest
from agent.notify import Liveness
from agent.reporting import Reporter
from agent.runner import Runner
from agent.schemas import MAX_WAIT_SECONDS, OrchestrationResult
from agent.settings import Settings, load_settings
from agent.storage import Storage
from agent.supervisor import Phase as RunPhase
from agent.supervisor import Supervisor
from tests.unit.fakes import FakeEngines, FakeHooks

AGENT = "fuzz-agent"
SECRET = "pnu_fuzz-secret-4f1c2e"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
# No shrinking for the loop properties: an example that fails by never finishing takes the full
# wait (15 s) each time, so shrinking one would take many minutes. They print unshrunk.
LOOP_FUZZ = settings(
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
FUZZ = settings(LOOP_FUZZ, phases=list(Phase), max_examples=100)


def iso(when: datetime | None = None) -> str:
    return (when or datetime.now(UTC)).isoformat()


# -- the fake server -------------------------------------------------------------------------------

ROUTES: list[tuple[str, str, str]] = [
    ("GET", r"/health", "health"),
    ("POST", r"/flows/", "flows"),
    ("GET", r"/deployments/name/[^/]+/[^/]+", "deployment_by_name"),
    ("POST", r"/deployments/", "deployment_create"),
    ("POST", r"/deployments/filter", "deployments_filter"),
    ("POST", r"/deployments/get_scheduled_flow_runs", "scheduled"),
    ("PATCH", r"/deployments/[0-9a-f-]+", "deployment_update"),
    ("GET", r"/deployments/[0-9a-f-]+", "deployment_read"),
    ("POST", r"/flow_runs/filter", "flow_runs_filter"),
    ("POST", r"/flow_runs/[0-9a-f-]+/set_state", "set_state"),
    ("GET", r"/flow_runs/[0-9a-f-]+", "flow_run_read"),
    ("GET", r"/flow_run_states/", "flow_run_states"),
    ("POST", r"/logs/", "logs"),
    ("POST", r"/events", "events"),
    # A work pool that is always down (test_a_broken_work_pool_never_holds_up_the_configs_runs).
    ("GET", r"/work_pools/[^/]+", "work_pool_read"),
    ("POST", r"/work_pools/[^/]+/[a-z_/]+", "work_pool_call"),
]


def route(request: httpx.Request) -> tuple[str, str]:
    path = request.url.path.removeprefix("/api")
    for method, pattern, endpoint in ROUTES:
        if request.method == method and re.fullmatch(pattern, path):
            return endpoint, path
    raise AssertionError(f"the agent called an endpoint it should not: {request.method} {path}")


class FakePrefect:
    """Prefect 3.8's answers and orchestration rules, as far as the agent can tell them apart."""

    def __init__(self) -> None:
        self.flows: dict[str, str] = {}
        self.deployments: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.history: dict[str, list[dict[str, Any]]] = {}
        self.double_claims: list[str] = []
        self.faults: dict[str, list[Fault]] = {}
        self.hits: list[str] = []
        self.injected: list[tuple[int, str, Fault]] = []
        self.logs: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.deferred: list[Callable[[], httpx.Response]] = []

    # -- set-up and inspection -----------------------------------------------------------------

    def add_deployment(self, name: str, flow_name: str, **fields: Any) -> str:
        flow_id = self.flows.setdefault(flow_name, str(uuid4()))
        deployment_id = str(uuid4())
        self.deployments[deployment_id] = {
            "id": deployment_id,
            "created": iso(),
            "name": name,
            "flow_id": flow_id,
            "paused": False,
            "schedules": [],
            "parameters": {},
            "tags": [],
            "description": None,
            "path": None,
            "entrypoint": None,
            "status": "READY",
            **fields,
        }
        return deployment_id

    def add_run(self, deployment_id: str, state: str = "SCHEDULED") -> str:
        run_id = str(uuid4())
        due = iso(datetime.now(UTC) - timedelta(seconds=1))
        self.runs[run_id] = {
            "id": run_id,
            "name": f"run-{run_id[:8]}",
            "deployment_id": deployment_id,
            "flow_id": self.deployments[deployment_id]["flow_id"],
            "tags": ["fuzz"],
            "parameters": {},
            "expected_start_time": due,
            "next_scheduled_start_time": due,
            "run_count": 0,
            "state": self._state(run_id, state, None, None),
        }
        self.history[run_id] = [self.runs[run_id]["state"]]
        return run_id

    def state_of(self, run_id: str) -> str:
        return str(self.runs[run_id]["state"]["type"])

    def accepted(self, run_id: str, state_type: str) -> int:
        return sum(1 for s in self.history[run_id] if s["type"] == state_type)

    def engine_sets(self, run_id: str, state_type: str) -> None:
        """What the flow's own engine reports (it has its own, healthy connection)."""
        state = self._state(run_id, state_type, None, str(uuid4()))
        self.runs[run_id]["state"] = state
        self.history[run_id].append(state)

    def hits_after_faults(self, endpoint: str) -> int:
        last = max((index for index, _, _ in self.injected), default=-1)
        return self.hits[last + 1 :].count(endpoint)

    def pending_faults(self) -> int:
        return sum(len(queue) for queue in self.faults.values())

    # -- the transport ---------------------------------------------------------------------------

    async def handler(self, request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0)  # a real server lets other requests in meanwhile
        endpoint, path = route(request)
        self.hits.append(endpoint)
        queue = self.faults.get(endpoint)
        if queue:
            fault = queue.pop(0)
            self.injected.append((len(self.hits) - 1, endpoint, fault))
            if endpoint in NO_CONTENT and fault.kind == "body" and 200 <= fault.status < 300:
                # Success whose body nobody reads: the work was done, unless the body shows that
                # the answer came from something else (a proxy's HTML page).
                fault.applied = _is_json(fault.seen_body())
            if fault.late:
                self.deferred.append(lambda: self.answer(endpoint, path, request))
            return fault.answer(request, lambda: self.answer(endpoint, path, request))
        response = self.answer(endpoint, path, request)
        while self.deferred:
            self.deferred.pop(0)()
        return response

    def answer(self, endpoint: str, path: str, request: httpx.Request) -> httpx.Response:
        body: Any = json.loads(request.content) if request.content else None
        tail = path.rstrip("/").split("/")
        if endpoint.startswith("work_pool"):
            return httpx.Response(503, json={"detail": "pool service down"})
        if endpoint == "health":
            return httpx.Response(200, json=True)
        if endpoint == "flows":
            flow_id = self.flows.setdefault(body["name"], str(uuid4()))
            return httpx.Response(201, json={"id": flow_id, "name": body["name"]})
        if endpoint == "deployment_by_name":
            wanted = self.flows.get(_unquote(tail[-2]))
            for deployment in self.deployments.values():
                if deployment["flow_id"] == wanted and deployment["name"] == _unquote(tail[-1]):
                    return httpx.Response(200, json=deployment)
            return httpx.Response(404, json={"detail": "Deployment not found"})
        if endpoint == "deployment_create":
            match = next(
                (
                    d
                    for d in self.deployments.values()
                    if d["flow_id"] == body["flow_id"] and d["name"] == body["name"]
                ),
                None,
            )
            deployment_id = match["id"] if match else str(uuid4())
            self.deployments[deployment_id] = {**body, "id": deployment_id, "created": iso()}
            return httpx.Response(201, json=self.deployments[deployment_id])
        if endpoint == "deployment_update":
            self.deployments[tail[-1]].update(body)
            return httpx.Response(204)
        if endpoint == "deployment_read":
            return httpx.Response(200, json=self.deployments[tail[-1]])
        if endpoint == "deployments_filter":
            return httpx.Response(200, json=list(self.deployments.values())[: body.get("limit")])
        if endpoint == "scheduled":
            before = datetime.fromisoformat(body["scheduled_before"])
            due = [
                r
                for r in self.runs.values()
                if r["deployment_id"] in body["deployment_ids"]
                and r["state"]["type"] == "SCHEDULED"
                and _utc(r["next_scheduled_start_time"]) <= before
            ]
            return httpx.Response(200, json=due[: body["limit"]])
        if endpoint == "flow_run_read":
            run = self.runs.get(tail[-1])
            if run is None:
                return httpx.Response(404, json={"detail": "Flow run not found"})
            return httpx.Response(200, json=run)
        if endpoint == "flow_runs_filter":
            runs = self.runs.values()
            ids = body["flow_runs"]["id"]["any_"]
            types = body["flow_runs"]["state"]["type"]["any_"]
            found = [r for r in runs if r["id"] in ids and r["state"]["type"] in types]
            return httpx.Response(200, json=found[: body["limit"]])
        if endpoint == "set_state":
            return httpx.Response(201, json=self.set_state(tail[-2], body["state"], body["force"]))
        if endpoint == "flow_run_states":
            return httpx.Response(200, json=self.history[request.url.params["flow_run_id"]])
        if endpoint == "logs":
            self.logs.extend(body)
            return httpx.Response(201)
        self.events.extend(body)
        return httpx.Response(204)

    def set_state(self, run_id: str, proposed: dict[str, Any], force: bool) -> dict[str, Any]:
        """Prefect's PreventDuplicateTransitions, terminal-state and PENDING rules."""
        run = self.runs[run_id]
        current = run["state"]
        transition_id = (proposed.get("state_details") or {}).get("transition_id")
        if (
            proposed["type"] == "PENDING"
            and current["type"] != "SCHEDULED"
            and (current["state_details"].get("transition_id") != transition_id)
        ):
            self.double_claims.append(run_id)  # a fresh claim for a run that is not SCHEDULED
        if not force and transition_id == current["state_details"].get("transition_id"):
            return _decision("REJECT", "This run has already made this state transition.", current)
        if not force and current["type"] in FINAL:
            return _decision("ABORT", f"This run is already {current['type']}.", current)
        if not force and proposed["type"] == "PENDING" and current["type"] != "SCHEDULED":
            return _decision(
                "ABORT",
                f"This run is in a {current['type']} state and cannot transition to a "
                "PENDING state.",
                current,
            )
        state = self._state(run_id, proposed["type"], proposed.get("message"), transition_id)
        run["state"] = state
        self.history[run_id].append(state)
        return _decision("ACCEPT", None, state)

    @staticmethod
    def _state(
        run_id: str, state_type: str, message: str | None, transition_id: str | None
    ) -> dict[str, Any]:
        return {
            "id": str(uuid4()),
            "type": state_type,
            "name": state_type.title(),
            "timestamp": iso(),
            "message": message,
            "data": None,
            "state_details": {"flow_run_id": run_id, "transition_id": transition_id},
        }


def _decision(status: str, reason: str | None, state: dict[str, Any]) -> dict[str, Any]:
    details = {"type": f"{status.lower()}_details", "reason": reason}
    return {"status": status, "details": details, "state": copy.deepcopy(state)}


NO_CONTENT = ("deployment_update", "logs", "events")


def _utc(text: str) -> datetime:
    when = datetime.fromisoformat(text)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _is_json(content: bytes | None) -> bool:
    if content is None:
        return False
    try:
        json.loads(content or b"null")
    except (ValueError, RecursionError):
        return False
    return True


def _unquote(text: str) -> str:
    from urllib.parse import unquote

    return unquote(text)


# -- faults ----------------------------------------------------------------------------------------


class PartialBody(httpx.AsyncByteStream):
    """Sends part of a body, then the connection fails."""

    def __init__(self, prefix: bytes, error: Exception) -> None:
        self.prefix, self.error = prefix, error

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.prefix:
            yield self.prefix
        raise self.error


ERRORS: dict[str, Callable[[], Exception]] = {
    "read timeout": lambda: httpx.ReadTimeout("timed out"),
    "connect timeout": lambda: httpx.ConnectTimeout("timed out connecting"),
    "connection reset": lambda: httpx.ReadError("[Errno 104] Connection reset by peer"),
    "peer closed": lambda: httpx.RemoteProtocolError(
        "peer closed connection without sending complete message body"
    ),
    "refused": lambda: httpx.ConnectError("[Errno 111] Connection refused"),
}
SENT_ERRORS = ("read timeout", "connection reset", "peer closed")  # the request got through


@dataclass
class Fault:
    """One bad answer. `applied`: the server did the work before the answer went wrong."""

    kind: str  # "body", "raise" or "partial"
    label: str
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: Callable[[bytes], bytes] = lambda real: real
    error: str = "read timeout"
    cut: float = 0.5
    applied: bool = False
    # Applied, but only once the server has answered its next request (a busy server commits
    # a request the client has given up on, even after the client's next one).
    late: bool = False

    def __repr__(self) -> str:
        done = "applied, " if self.applied else ""
        return f"Fault({done}{self.kind} {self.label!r}, status {self.status}, {self.headers})"

    def seen_body(self) -> bytes | None:
        """The body as a client decodes it (None: it cannot), for a call that changed nothing."""
        try:
            return httpx.Response(self.status, content=self.body(b""), headers=self.headers).content
        except httpx.DecodingError:
            return None

    def answer(self, request: httpx.Request, real: Callable[[], httpx.Response]) -> httpx.Response:
        real_body = b""
        if self.applied:
            response = real()
            real_body = response.read()
        if self.kind == "raise":
            raise ERRORS[self.error]()
        content = self.body(real_body)
        if self.kind == "partial":
            prefix = content[: int(len(content) * self.cut)]
            return httpx.Response(self.status, stream=PartialBody(prefix, ERRORS[self.error]()))
        return httpx.Response(self.status, content=content, headers=self.headers)


JSON_LEAVES = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
)
JSON = st.recursive(
    JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
HUGE = st.integers(1, 3).map(lambda n: "\u00e9x" * (n * 400_000))  # 1.6 to 4.8 MB of UTF-8
DEEP = st.integers(50, 300).map(
    lambda depth: functools.reduce(lambda v, _: [v], range(depth), cast(Any, 0))
)
HOSTILE = st.one_of(
    JSON,
    HUGE,
    DEEP,
    st.sampled_from([None, "", 0, -1, 1e308, True, [], {}, "not-a-uuid", "2020-13-45T99:99"]),
)
HTML = (
    "<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
    "<body><h1>Bad Gateway</h1><p>nginx</p></body></html>"
)


@st.composite
def json_edit(draw: st.DrawFn) -> Callable[[Any], Any]:
    """A change to a JSON value: a field (or a list item's field) wrong, missing, null or extra."""
    action = draw(st.sampled_from(["set", "drop", "extra", "null-all", "duplicate", "wrap"]))
    choice = draw(st.integers(0, 10_000))
    value = draw(HOSTILE)

    def edit(data: Any) -> Any:
        target = data
        if isinstance(data, list):
            if action == "duplicate" and data:
                return [*data, copy.deepcopy(data[choice % len(data)])]
            if not data:
                return [value]
            target = data[choice % len(data)]
        if action == "wrap":
            return {"data": data}
        if not isinstance(target, dict) or not target:
            return value
        keys = sorted(target)
        key = keys[choice % len(keys)]
        nested = target[key]
        if isinstance(nested, dict) and nested and choice % 3 == 0:  # e.g. state.type
            target, key = nested, sorted(nested)[choice % len(nested)]
        if action == "set":
            target[key] = value
        elif action == "drop":
            del target[key]
        elif action == "extra":
            target[f"unexpected_{choice}"] = value
        else:
            for name in list(target):
                target[name] = None
        return data

    return edit


def mutated(edits: list[Callable[[Any], Any]], real: bytes) -> bytes:
    data: Any = json.loads(real) if real else {}
    for edit in edits:
        data = edit(data)
    return json.dumps(data).encode()


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, Callable[[bytes], bytes]]:
    kind = draw(
        st.sampled_from(
            [
                "mutated",
                "mutated",
                "mutated",
                "json",
                "huge",
                "deep",
                "invalid",
                "truncated",
                "html",
                "empty",
                "bad utf-8",
                "nan",
            ]
        )
    )
    if kind == "mutated":
        edits = draw(st.lists(json_edit(), min_size=1, max_size=3))
        return kind, functools.partial(mutated, edits)
    if kind == "json":
        value = draw(HOSTILE)
        return kind, lambda real: json.dumps(value).encode()
    if kind == "huge":
        text = draw(HUGE)
        return kind, lambda real: json.dumps({"id": text, "detail": text}).encode()
    if kind == "deep":
        depth = draw(st.sampled_from([500, 2_000, 100_000]))
        return kind, lambda real: b"[" * depth + b"]" * depth
    if kind == "invalid":
        text = draw(st.text(min_size=1, max_size=50))
        return kind, lambda real: ("{" + text).encode()
    if kind == "truncated":
        cut = draw(st.floats(0.05, 0.95))
        return kind, lambda real: (real or b'{"id": "c8dbb')[: max(1, int(len(real) * cut))]
    if kind == "html":
        return kind, lambda real: HTML.encode()
    if kind == "empty":
        return kind, lambda real: b""
    if kind == "bad utf-8":
        return kind, lambda real: b'{"id": "\xff\xfe\xfd"}'
    return kind, lambda real: b'{"status": NaN, "id": Infinity, "details": {"delay_seconds": NaN}}'


CONTENT_TYPES = st.sampled_from(
    [
        {},
        {"Content-Type": "application/json"},
        {"Content-Type": "text/html; charset=utf-8"},
        {"Content-Type": "text/plain"},
        {"Content-Type": "application/json; charset=bogus-8"},
        {"Content-Type": "application/json", "Content-Encoding": "gzip"},
    ]
)


@st.composite
def faults(draw: st.DrawFn, statuses: list[int], appliable: bool = True) -> Fault:
    kind = draw(st.sampled_from(["body"] * 6 + ["raise", "raise", "partial"]))
    if kind == "raise":
        error = draw(st.sampled_from(sorted(ERRORS)))
        applied = appliable and error in SENT_ERRORS and draw(st.booleans())
        return Fault("raise", error, error=error, applied=applied)
    label, body = draw(bodies())
    status = draw(st.sampled_from(statuses))
    applied = appliable and (status < 300 or status >= 500) and draw(st.booleans())
    if kind == "partial":
        error = draw(st.sampled_from(SENT_ERRORS))
        return Fault(
            "partial",
            f"{label}, then {error}",
            status,
            body=body,
            error=error,
            cut=draw(st.floats(0, 0.95)),
            applied=applied,
        )
    return Fault("body", label, status, draw(CONTENT_TYPES), body, applied=applied)


TRANSIENT = [200, 200, 200, 201, 204, 302, 408, 429, 500, 502, 503, 504]
ANY_STATUS = [*TRANSIENT, 400, 401, 403, 404, 405, 409, 422]


def plan(endpoints: list[str], statuses: list[int]) -> st.SearchStrategy[dict[str, list[Fault]]]:
    """Up to three consecutive faults for each of some of `endpoints`."""
    return st.dictionaries(
        st.sampled_from(endpoints),
        st.lists(faults(statuses), min_size=1, max_size=3),
        min_size=1,
        max_size=len(endpoints),
    )


# -- logs, spies and the checks every example makes ------------------------------------------------


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def problems(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.WARNING]


@contextlib.contextmanager
def captured() -> Iterator[Capture]:
    logger = logging.getLogger("agent")
    capture, level = Capture(), logger.level
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    try:
        yield capture
    finally:
        logger.removeHandler(capture)
        logger.setLevel(level)


SPIED = (
    "upsert_flow",
    "read_deployment_by_name",
    "upsert_deployment",
    "update_deployment",
    "get_scheduled_flow_runs",
    "read_flow_run",
    "filter_flow_runs",
    "set_flow_run_state",
    "create_logs",
    "emit_events",
    "health",
    "filter_deployments",
)


def spy_on(client: PrefectClient, errors: list[PrefectApiError]) -> None:
    """Record every error the client raises, to check that each one was logged."""
    for name in SPIED:
        method = getattr(client, name)

        async def spied(*args: Any, _method: Any = method, **kwargs: Any) -> Any:
            try:
                return await _method(*args, **kwargs)
            except PrefectApiError as exc:
                errors.append(exc)
                raise

        setattr(client, name, spied)


def where(error: PrefectApiError) -> str:
    """The `METHOD /path` every client error names."""
    match = re.search(r"\b(GET|POST|PATCH) (/\S*)", str(error))
    assert match, f"error does not name its endpoint: {error}"
    return match[2]


def check_logs(capture: Capture, errors: list[PrefectApiError], injected: int) -> None:
    records = capture.records
    tracebacks = [r.getMessage() for r in records if r.exc_info]
    assert not tracebacks, f"tracebacks logged for bad API answers: {tracebacks[:3]}"
    problems = capture.problems()
    for error in errors:
        path = where(error)
        assert any(path in line for line in problems), f"not logged: {error}"
    assert all(SECRET not in r.getMessage() for r in records)
    assert all(len(line) < 2_000 for line in problems), "a huge answer was logged whole"
    # One line per failed call, not a flood: bounded by the calls the faults broke.
    assert len(problems) <= 6 * injected + 6, problems


async def eventually(check: Callable[[], bool], what: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def no_sleep(_: float) -> None:
    await asyncio.sleep(0)


# -- the agent under test --------------------------------------------------------------------------

CONFIG = """
[api]
url = "http://prefect.test/api"
key = "{secret}"
timeout = "2s"

[agent]
name = "{agent}"
limit = 2
poll_interval = "10ms"
prefetch = "0s"
state_dir = "{root}/state"
runtime_dir = "{root}/run"
cancel_grace = "100ms"

[[deployment]]
name = "hello"
flow_name = "hello-flow"
entrypoint = "flow.py:hello"
path = "{root}"
schedule = {{ interval = "1h" }}
"""


@dataclass
class FakeHandle:
    flow_run_id: UUID
    unit: str | None
    pid: int | None
    status: int

    async def wait(self) -> int:
        return self.status


class FakeLauncher:
    """Starts nothing; the 'engine' reports to the fake server as a real one would."""

    name = "fake"

    def __init__(self, server: FakePrefect, *, engine_completes: bool) -> None:
        self.server = server
        self.engine_completes = engine_completes
        self.launched: list[str] = []
        self.launch_states: list[dict[str, Any]] = []

    async def launch(self, request: LaunchRequest) -> FakeHandle:
        run_id = str(request.flow_run_id)
        self.launched.append(run_id)
        self.launch_states.append(copy.deepcopy(self.server.runs[run_id]["state"]))
        self.server.engine_sets(run_id, "RUNNING")
        if self.engine_completes:
            self.server.engine_sets(run_id, "COMPLETED")
        return FakeHandle(
            request.flow_run_id, f"unit-{run_id}", None, 0 if self.engine_completes else 1
        )

    async def terminate(self, handle: Any) -> None: ...

    async def kill(self, handle: Any) -> None: ...

    async def unit_result(self, handle: Any) -> str | None:
        return None

    def read_exit_record(self, run_dir: Path) -> int | None:
        return None


@contextlib.asynccontextmanager
async def agent_env(
    root: Path, server: FakePrefect, *, engine_completes: bool = True
) -> AsyncIterator[tuple[Settings, PrefectClient, FakeLauncher, list[PrefectApiError]]]:
    config = root / "agent.toml"
    config.write_text(CONFIG.format(secret=SECRET, agent=AGENT, root=root))
    config.chmod(0o600)
    cfg = load_settings(config, {})
    cfg.agent.state_dir.mkdir(mode=0o700)
    errors: list[PrefectApiError] = []
    client = PrefectClient(
        cfg.api, transport=httpx.MockTransport(server.handler), max_attempts=2, sleep=no_sleep
    )
    spy_on(client, errors)
    async with client:
        yield cfg, client, FakeLauncher(server, engine_completes=engine_completes), errors


def make_runner(
    cfg: Settings, client: PrefectClient, launcher: FakeLauncher, logs: FlowRunLogs
) -> Runner:
    return Runner(
        cfg,
        client=client,
        launcher=launcher,  # type: ignore[arg-type]
        flow_logs=logs,
        liveness=Liveness(),
        registry=DeploymentRegistry(client, cfg.agent.state_dir),
        storage=Storage(cfg.agent.state_dir),
        reporter=Reporter(client, sleep=no_sleep),
        engines=FakeEngines(),  # type: ignore[arg-type]
        hooks=FakeHooks(),  # type: ignore[arg-type]
    )


async def run_agent_until(
    runner: Runner, server: FakePrefect, done: Callable[[], bool], what: str
) -> None:
    """Run the loop until `done()` and two more polls went out after the last bad answer.

    A fault queued for a call that never comes again (the claim was settled) stays unused.
    """
    task = asyncio.create_task(runner.run(), name="runner")
    try:
        await eventually(
            lambda: task.done() or (done() and server.hits_after_faults("scheduled") >= 2), what
        )
        assert not task.done(), "the poll loop ended by itself"
    finally:
        runner.stop()
        await asyncio.wait_for(task, timeout=20)  # any exception of the loop fails the test here


def check_runs(server: FakePrefect, launcher: FakeLauncher, claimant: str) -> None:
    """Nothing launched without an accepted claim, nothing claimed or launched twice."""
    assert not server.double_claims, f"claimed again: {server.double_claims}"
    assert len(launcher.launched) == len(set(launcher.launched)), launcher.launched
    for state in launcher.launch_states:
        assert (state["type"], state["message"]) == ("PENDING", claimant), state
    for run_id in server.runs:
        assert server.accepted(run_id, "PENDING") <= 1
        assert server.accepted(run_id, "RUNNING") <= 1
        assert sum(server.accepted(run_id, t) for t in FINAL) <= 1


# -- 1. the poll loop and deployment sync ----------------------------------------------------------

SYNC_ENDPOINTS = [
    "flows",
    "deployment_by_name",
    "deployment_create",
    "deployment_update",
    "scheduled",
]


@LOOP_FUZZ
@given(faults_by_endpoint=plan(SYNC_ENDPOINTS, ANY_STATUS), registered=st.booleans())
def test_poll_loop_and_sync_survive_hostile_answers(
    faults_by_endpoint: dict[str, list[Fault]], registered: bool
) -> None:
    """Registration, pausing a removed deployment and polling, each answered badly."""
    server = FakePrefect()
    gone = server.add_deployment("gone", "old-flow")
    with tempfile.TemporaryDirectory() as tmp, captured() as capture:
        root = Path(tmp)
        if registered:  # a previous agent process registered it: the server's copy is compared
            _registered(server, root)
        server.faults = copy.deepcopy(faults_by_endpoint)
        state = {"ran": ""}

        async def example() -> None:
            async with agent_env(root, server) as (cfg, client, launcher, errors):
                (cfg.agent.state_dir / REGISTRY_FILE).write_text(json.dumps({"gone": gone}))
                async with FlowRunLogs(client.create_logs, flush_interval=0.01) as logs:
                    runner = make_runner(cfg, client, launcher, logs)
                    await run_agent_until(
                        runner,
                        server,
                        lambda: bool(launcher.launched),
                        "a due run to be launched after the faults",
                    )
                    assert runner.api_ok is True and runner.supervisors == {}
                state["ran"] = launcher.launched[0]
                check_runs(server, launcher, claim_message(AGENT))
                check_logs(capture, errors, len(server.injected))
                # Nothing lost: the removed deployment is paused, or still on the books.
                remembered = json.loads((cfg.agent.state_dir / REGISTRY_FILE).read_text())
                assert server.deployments[gone]["paused"] or remembered.get("gone") == gone

        with _deployment_added(server):
            asyncio.run(example())
        assert server.state_of(state["ran"]) == "COMPLETED"
    for _, endpoint, fault in server.injected:
        event(f"{endpoint}: {fault.kind} {fault.label.split(',')[0]}")


@contextlib.contextmanager
def _deployment_added(server: FakePrefect) -> Iterator[None]:
    """Once 'hello' exists on the server, it has one due run (as its schedule would make)."""
    original = server.answer

    def answer(endpoint: str, path: str, request: httpx.Request) -> httpx.Response:
        response = original(endpoint, path, request)
        if not server.runs:
            for deployment_id, deployment in server.deployments.items():
                if deployment["name"] == "hello":
                    server.add_run(deployment_id)
        return response

    server.answer = answer  # type: ignore[method-assign]
    yield


# -- 2. the claim, the launch and the report -------------------------------------------------------

CLAIM_ENDPOINTS = ["flow_run_read", "set_state", "logs", "scheduled"]


@LOOP_FUZZ
@given(
    faults_by_endpoint=plan(CLAIM_ENDPOINTS, TRANSIENT),
    engine_completes=st.booleans(),
)
def test_claim_launch_and_report_survive_hostile_answers(
    faults_by_endpoint: dict[str, list[Fault]], engine_completes: bool
) -> None:
    """A due run is claimed, launched and reported exactly once, whatever the answers."""
    server = FakePrefect()
    emitted: list[str] = []
    with tempfile.TemporaryDirectory() as tmp, captured() as capture:
        root = Path(tmp)
        run_id = server.add_run(_registered(server, root))
        server.faults = copy.deepcopy(faults_by_endpoint)

        async def example() -> None:
            async with agent_env(root, server, engine_completes=engine_completes) as (
                cfg,
                client,
                launcher,
                errors,
            ):
                async with FlowRunLogs(
                    client.create_logs, flush_interval=0.01, max_backoff=0.02
                ) as logs:
                    emit = logs.emit

                    def spied_emit(flow_run_id: UUID, message: str, level: int = 20) -> None:
                        emitted.append(message)
                        emit(flow_run_id, message, level)

                    logs.emit = spied_emit  # type: ignore[method-assign]
                    runner = make_runner(cfg, client, launcher, logs)
                    await run_agent_until(
                        runner,
                        server,
                        lambda: server.state_of(run_id) in FINAL and not runner.supervisors,
                        "the run to end",
                    )
                    await eventually(
                        lambda: set(emitted) <= {e["message"] for e in server.logs},
                        "the run's log messages to arrive",
                    )
                    # A duplicate batch may still be in flight; if its last try fails at
                    # shutdown, that is logged at debug (all of it had arrived already).
                    while_running = list(errors)
                check_runs(server, launcher, claim_message(AGENT))
                check_logs(capture, while_running, len(server.injected))
                assert launcher.launched == [run_id]
                assert not list((cfg.agent.state_dir / "runs").glob("*/record.json"))

        asyncio.run(example())
    # Nothing lost: the run ended once, in the right state, and its log view got every message.
    assert server.state_of(run_id) == ("COMPLETED" if engine_completes else "CRASHED")
    assert any(m.startswith("Launched in unit-") for m in emitted)
    assert {entry["message"] for entry in server.logs} == set(emitted)
    for _, endpoint, fault in server.injected:
        event(f"{endpoint}: {fault.kind} {fault.label.split(',')[0]}")


# -- 3. the cancellation watcher -------------------------------------------------------------------


@dataclass
class FakeSupervisor:
    phase: RunPhase = RunPhase.RUNNING
    cancels: int = 0

    @property
    def cancel_requested(self) -> bool:
        return self.cancels > 0

    def request_cancel(self) -> None:
        self.cancels += 1


def ignore_the_filter(server: FakePrefect) -> Fault:
    """A server (or a proxy's cache) that answers the filter with every run, whatever its state."""
    return Fault(
        "body",
        "filter ignored",
        200,
        body=lambda real: json.dumps(list(server.runs.values())).encode(),
    )


@LOOP_FUZZ
@given(
    bad=st.lists(faults(ANY_STATUS, appliable=False), min_size=1, max_size=4),
    unfiltered=st.integers(0, 2),
)
def test_cancellation_watcher_survives_hostile_answers(bad: list[Fault], unfiltered: int) -> None:
    server = FakePrefect()
    deployment_id = server.add_deployment("hello", "hello-flow")
    doomed, healthy = (
        server.add_run(deployment_id, "RUNNING"),
        server.add_run(deployment_id, "RUNNING"),
    )
    supervisors = {UUID(doomed): FakeSupervisor(), UUID(healthy): FakeSupervisor()}
    server.faults["flow_runs_filter"] = [ignore_the_filter(server)] * unfiltered + bad

    async def example() -> None:
        errors: list[PrefectApiError] = []
        client = PrefectClient(
            _api(), transport=httpx.MockTransport(server.handler), max_attempts=2, sleep=no_sleep
        )
        spy_on(client, errors)
        async with client:
            watcher = CancellationWatcher(
                client=client,
                supervisors=lambda: cast(Mapping[UUID, Supervisor], supervisors),
                poll_interval=lambda: 0.005,
                websocket_connected=lambda: False,
                liveness=Liveness(),
            )
            with captured() as capture:
                task = asyncio.create_task(watcher.run())
                await eventually(lambda: task.done() or server.pending_faults() == 0, "faults")
                server.engine_sets(doomed, "CANCELLING")
                await eventually(
                    lambda: task.done() or supervisors[UUID(doomed)].cancels > 0,
                    "the cancellation to be noticed",
                )
                await eventually(
                    lambda: server.hits_after_faults("flow_runs_filter") >= 3, "more polls"
                )
                assert not task.done(), "the cancellation watcher died"
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            check_logs(capture, errors, len(server.injected))
        assert supervisors[UUID(doomed)].cancels == 1
        assert supervisors[UUID(healthy)].cancels == 0, "cancelled a run that is not CANCELLING"

    asyncio.run(example())


def _api() -> Any:
    from tests.integration.prefect_server import StaticApiConfig

    return StaticApiConfig("http://prefect.test/api", key=SECRET, timeout=2.0)


# -- 4. the reporter: final states through bad answers ---------------------------------------------


@FUZZ
@given(faults_by_endpoint=plan(["flow_run_read", "set_state"], TRANSIENT), replace=st.booleans())
def test_reporter_delivers_the_final_state_exactly_once(
    faults_by_endpoint: dict[str, list[Fault]], replace: bool
) -> None:
    server = FakePrefect()
    run_id = server.add_run(server.add_deployment("hello", "hello-flow"), "RUNNING")
    server.faults = copy.deepcopy(faults_by_endpoint)

    async def example() -> None:
        errors: list[PrefectApiError] = []
        client = PrefectClient(
            _api(), transport=httpx.MockTransport(server.handler), max_attempts=2, sleep=no_sleep
        )
        spy_on(client, errors)
        async with client:
            with captured() as capture:
                reporter = Reporter(client, sleep=no_sleep)
                await asyncio.wait_for(
                    reporter.crash_if_running(UUID(run_id), "boom", replace_crashed=replace),
                    timeout=10,
                )
            check_logs(capture, errors, len(server.injected))

    asyncio.run(example())
    assert server.state_of(run_id) == "CRASHED"
    assert server.accepted(run_id, "CRASHED") == 1
    assert server.runs[run_id]["state"]["message"] == "boom"


# -- 5. the log and event shippers -----------------------------------------------------------------


@LOOP_FUZZ
@given(faults_by_endpoint=plan(["logs", "events"], [*TRANSIENT, 404, 405]))
def test_logs_and_events_arrive_through_hostile_answers(
    faults_by_endpoint: dict[str, list[Fault]],
) -> None:
    server = FakePrefect()
    server.faults = copy.deepcopy(faults_by_endpoint)
    run_id = uuid4()

    async def example() -> None:
        errors: list[PrefectApiError] = []
        client = PrefectClient(
            _api(), transport=httpx.MockTransport(server.handler), max_attempts=2, sleep=no_sleep
        )
        spy_on(client, errors)
        with captured() as capture:
            async with (
                client,
                FlowRunLogs(client.create_logs, flush_interval=0.005, max_backoff=0.01) as logs,
                EventEmitter(client.emit_events, flush_interval=0.005, max_backoff=0.01) as emitter,
            ):
                for n in range(5):
                    logs.emit(run_id, f"message {n}")
                    emitter.emit({"id": f"event-{n}", "event": "fuzz"})
                await eventually(
                    lambda: (
                        len({e["message"] for e in server.logs}) == 5
                        and len({e["id"] for e in server.events}) == 5
                    ),
                    "delivery",
                )
                while_running = list(errors)  # not the bounded last flush at shutdown
        check_logs(capture, while_running, len(server.injected))

    asyncio.run(example())
    # At least once: an answer lost after the server stored the batch makes a duplicate.
    assert {e["message"] for e in server.logs} == {f"message {n}" for n in range(5)}
    assert {e["id"] for e in server.events} == {f"event-{n}" for n in range(5)}


# -- 6. the events subscription: hostile websocket messages ----------------------------------------

CANCELLING = "prefect.flow-run.Cancelling"


def event_message(n: int, **changes: Any) -> dict[str, Any]:
    return {
        "type": "event",
        "event": {
            "id": f"00000000-0000-0000-0000-{n:012d}",
            "occurred": iso(),
            "event": CANCELLING,
            "resource": {"prefect.resource.id": f"prefect.flow-run.{uuid4()}"},
            "related": [{"prefect.resource.id": "prefect.deployment.mine"}],
            "payload": {},
            **changes,
        },
    }


@st.composite
def ws_messages(draw: st.DrawFn) -> str | bytes:
    kind = draw(st.sampled_from(["edited", "edited", "json", "deep", "invalid", "binary", "huge"]))
    if kind == "edited":
        message: Any = event_message(draw(st.integers(0, 5)))
        for edit in draw(st.lists(json_edit(), min_size=1, max_size=3)):
            message = (
                edit(message)
                if draw(st.booleans())
                else {
                    **message,
                    "event": edit(message.get("event") if isinstance(message, dict) else message),
                }
            )
        return json.dumps(message)
    if kind == "json":
        return json.dumps(draw(HOSTILE))
    if kind == "deep":
        return "[" * 100_000 + "]" * 100_000
    if kind == "invalid":
        return "{" + draw(st.text(max_size=30))
    if kind == "binary":
        return draw(st.binary(max_size=50))
    return json.dumps(event_message(9, id="x" * 900_000))


@FUZZ
@given(messages=st.lists(ws_messages(), min_size=1, max_size=6), related=st.booleans())
def test_subscription_routes_or_skips_every_hostile_message(
    messages: list[str | bytes], related: bool
) -> None:
    from agent.subscription import EventSubscription

    seen: list[dict[str, Any]] = []
    sub = EventSubscription("http://prefect.test/api")
    sub.subscribe(CANCELLING, seen.append)
    if related:
        sub.set_related(CANCELLING, ["prefect.deployment.mine"])

    async def example() -> None:
        with captured() as capture:
            for raw in [*messages, json.dumps(event_message(99))]:
                await sub._on_message(raw)
        assert not [r for r in capture.records if r.exc_info]
        assert all(len(line) < 1_000 for line in capture.problems())

    asyncio.run(example())
    assert all(isinstance(e, dict) and e.get("event") == CANCELLING for e in seen)
    assert seen[-1]["id"] == "00000000-0000-0000-0000-000000000099"  # the good one still arrives
    assert all(len(event_id) <= 100 for event_id in sub._seen)  # no megabyte ids kept


async def test_websocket_stays_up_through_hostile_frames() -> None:
    """Frames that are not events are skipped on a live connection; one over the size limit
    costs a reconnect, after which events flow again."""
    from websockets.asyncio.server import serve
    from websockets.typing import Subprotocol

    from agent.subscription import EventSubscription
    from tests.unit.fakes import FakeEventsServer

    good: list[str] = []
    server = FakeEventsServer()

    async def script(ws: Any, n: int) -> None:
        if n == 0:
            for frame in [
                "[" * 100_000 + "]" * 100_000,
                b"\xff\xfe",
                "{",
                HTML,
                json.dumps(event_message(1, related=5)),
                json.dumps(event_message(2)),
            ]:
                await ws.send(frame)
            await ws.send("x" * (2**20 + 10))  # over websockets' 1 MiB default: closes
        await ws.send(json.dumps(event_message(3)))
        await ws.wait_closed()

    async with serve(server.handler, "127.0.0.1", 0, subprotocols=[Subprotocol("prefect")]) as ws:
        server.port = next(iter(ws.sockets)).getsockname()[1]
        server.script = script
        sub = EventSubscription(server.api_url, initial_backoff=0.01, max_backoff=0.05)
        sub.subscribe(CANCELLING, lambda e: good.append(e["id"]))
        with captured() as capture:
            async with sub:
                await eventually(lambda: len(good) == 3, "the good events")
        assert good[-1].endswith("3") and server.connections == 2
        assert not [r for r in capture.records if r.exc_info]
        assert sum("skipped" in line for line in capture.problems()) == 4


# -- 7. check-config --online: hostile health and filter answers -----------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(faults_by_endpoint=plan(["health", "deployments_filter"], ANY_STATUS))
def test_online_check_reports_one_line_for_any_answer(
    faults_by_endpoint: dict[str, list[Fault]],
) -> None:
    from agent.cli import check_online

    server = FakePrefect()
    server.add_deployment("hello", "hello-flow")
    server.faults = copy.deepcopy(faults_by_endpoint)
    config = Settings.model_validate({"api": {"url": "http://prefect.test/api", "key": SECRET}})
    client = functools.partial(
        PrefectClient, transport=httpx.MockTransport(server.handler), sleep=no_sleep
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(api_module, "PrefectClient", client)
        problem = asyncio.run(check_online(config))
    health = [f for _, e, f in server.injected if e == "health"]
    if problem is None:  # only when GET /health was answered `true` at last
        answered = server.hits.count("health") > len(health) or any(
            f.kind == "body" and f.status < 300 and f.seen_body() == b"true" for f in health
        )
        assert answered, health
    else:
        assert "\n" not in problem and len(problem) < 600 and SECRET not in problem
        assert problem.startswith("http://prefect.test/api") or "http://prefect.test/api" in problem


# -- 8. endpoints the agent does not call (yet): parsed or a PrefectApiError -----------------------


@FUZZ
@given(fault=faults(ANY_STATUS), which=st.sampled_from(["deployment_read", "flow_run_states"]))
def test_unused_endpoints_parse_or_raise_prefect_api_error(fault: Fault, which: str) -> None:
    server = FakePrefect()
    deployment_id = server.add_deployment("hello", "hello-flow")
    run_id = server.add_run(deployment_id)
    server.faults[which] = [fault, fault]

    async def example() -> Any:
        async with PrefectClient(
            _api(), transport=httpx.MockTransport(server.handler), max_attempts=2, sleep=no_sleep
        ) as client:
            if which == "deployment_read":
                return await client.read_deployment(UUID(deployment_id))
            return await client.read_flow_run_states(UUID(run_id))

    try:
        asyncio.run(example())
    except PrefectApiError as exc:
        assert SECRET not in str(exc) and len(str(exc)) < 1_000
        where(exc)


# -- regression tests for what the fuzzing found ---------------------------------------------------


async def _run_once(
    server: FakePrefect, root: Path, *, until: Callable[[FakeLauncher], bool], what: str
) -> tuple[FakeLauncher, Capture, list[PrefectApiError]]:
    with captured() as capture:
        async with (
            agent_env(root, server) as (cfg, client, launcher, errors),
            FlowRunLogs(client.create_logs, flush_interval=0.01) as logs,
        ):
            runner = make_runner(cfg, client, launcher, logs)
            await run_agent_until(runner, server, lambda: until(launcher), what)
    return launcher, capture, errors


def _registered(server: FakePrefect, root: Path, name: str = "hello") -> str:
    """'hello' as this config registers it (so the server's copy is up to date)."""
    return server.add_deployment(
        name,
        "hello-flow",
        schedules=[{"schedule": {"interval": 3600.0}, "active": True}],
        parameters={},
        tags=[],
        path=str(root),
        entrypoint="flow.py:hello",
        enforce_parameter_schema=True,
        parameter_openapi_schema=EMPTY_SCHEMA,
    )


async def test_claim_whose_answer_was_lost_is_not_left_pending(tmp_path: Path) -> None:
    """The claim reached the server, its answer did not; the retry (same transition id) is
    REJECTed as a duplicate. Read as the ACCEPT it was, else the run stays PENDING for good."""
    server = FakePrefect()
    run_id = server.add_run(_registered(server, tmp_path))
    server.faults["set_state"] = [Fault("raise", "read timeout", applied=True)]
    launcher, capture, _ = await _run_once(
        server, tmp_path, until=lambda lc: bool(lc.launched), what="the launch"
    )
    assert launcher.launched == [run_id] and server.accepted(run_id, "PENDING") == 1
    assert server.state_of(run_id) == "COMPLETED"
    assert any("already accepted" in r.getMessage() for r in capture.records)


async def test_claim_committed_after_its_read_back_is_not_left_pending(tmp_path: Path) -> None:
    """Every attempt of the claim timed out, and the server committed the first one only after
    it had answered the agent's read-back (SCHEDULED). A claim settled by that read-back is
    given up while the run turns PENDING, and no agent ever launches it (seen in a fleet test
    on a busy machine). Proposed again, the same transition is decided for good."""
    server = FakePrefect()
    run_id = server.add_run(_registered(server, tmp_path))
    server.faults["set_state"] = [
        Fault("raise", "read timeout", late=True),
        Fault("raise", "read timeout"),  # the client's second and last attempt
    ]
    launcher, capture, _ = await _run_once(
        server, tmp_path, until=lambda lc: bool(lc.launched), what="the launch"
    )
    assert launcher.launched == [run_id] and server.accepted(run_id, "PENDING") == 1
    assert server.state_of(run_id) == "COMPLETED" and not server.deferred
    assert any("claim unanswered" in r.getMessage() for r in capture.records)


async def test_a_broken_work_pool_never_holds_up_the_configs_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.modules[__name__], "CONFIG", CONFIG + '[[work_pool]]\nname = "down"\n')
    server = FakePrefect()
    run_id = server.add_run(_registered(server, tmp_path))
    launcher, capture, _ = await _run_once(
        server, tmp_path, until=lambda lc: bool(lc.launched), what="the launch"
    )
    assert launcher.launched == [run_id] and server.state_of(run_id) == "COMPLETED"
    assert "work_pool_read" in server.hits  # the pool was tried, every poll
    assert any(r.getMessage().startswith("work pool 'down' poll failed") for r in capture.records)


async def test_up_to_date_deployment_is_left_alone(tmp_path: Path) -> None:
    """The control for the next tests: the registered copy matches the config exactly."""
    server = FakePrefect()
    run_id = server.add_run(_registered(server, tmp_path))
    launcher, _, _ = await _run_once(
        server, tmp_path, until=lambda lc: bool(lc.launched), what="the launch"
    )
    assert launcher.launched == [run_id] and "deployment_create" not in server.hits


@pytest.mark.parametrize(
    "junk",
    [
        {"schedules": "hourly"},
        {"schedules": ["x"]},
        {"schedules": [{"schedule": [1, 2]}]},
        {"schedules": [{"schedule": {"interval": "1h"}}]},
        {"schedules": [{"schedule": "ab"}]},
        {"schedules": [{"schedule": {"interval": {"h": 1}}}]},
        {"tags": [1, "a", None]},
        {"tags": 7},
        {"tags": True},
        {"schedules": [{"schedule": {"interval": 10**400}}]},
        {"schedules": [{"schedule": {"interval": 1e308 * 10}}]},
    ],
)
async def test_odd_server_copy_of_a_deployment_is_overwritten_not_fatal(
    tmp_path: Path, junk: dict[str, Any]
) -> None:
    server = FakePrefect()
    deployment_id = _registered(server, tmp_path)  # up to date but for the junk in the answer
    run_id = server.add_run(deployment_id)
    server.faults["deployment_by_name"] = [
        Fault(
            "body",
            "odd copy",
            200,
            applied=True,
            body=lambda real: json.dumps({**json.loads(real), **junk}, default=str).encode(),
        )
    ]
    launcher, capture, _ = await _run_once(
        server, tmp_path, until=lambda lc: bool(lc.launched), what="the launch"
    )
    assert launcher.launched == [run_id]
    assert server.hits.count("deployment_create") == 1  # re-registered from the config
    assert "poll failed unexpectedly" not in [r.msg for r in capture.records]


async def test_another_deployment_in_the_by_name_answer_is_not_adopted(tmp_path: Path) -> None:
    """An answer naming another deployment (a proxy's cache, a buggy server) that otherwise looks
    like ours: adopting its id would run that deployment's runs with this config."""
    server = FakePrefect()
    ours = server.add_run(_registered(server, tmp_path))
    foreign = _registered(server, tmp_path, name="someone-else")
    theirs = server.add_run(foreign)
    server.faults["deployment_by_name"] = [
        Fault(
            "body",
            "another deployment",
            200,
            body=lambda real: json.dumps(server.deployments[foreign]).encode(),
        )
    ]
    launcher, _, _ = await _run_once(
        server, tmp_path, until=lambda lc: bool(lc.launched), what="the launch"
    )
    assert launcher.launched == [ours] and server.state_of(theirs) == "SCHEDULED"


async def test_run_listed_twice_is_claimed_and_launched_once(tmp_path: Path) -> None:
    server = FakePrefect()
    run_id = server.add_run(_registered(server, tmp_path))
    server.faults["scheduled"] = [
        Fault("body", "run listed twice", 200, body=lambda real: real, applied=True)
    ]
    server.faults["scheduled"][0].body = lambda real: json.dumps(json.loads(real) * 2).encode()
    launcher, _, _ = await _run_once(
        server, tmp_path, until=lambda lc: bool(lc.launched), what="the launch"
    )
    assert launcher.launched == [run_id] and not server.double_claims


async def test_start_time_without_a_zone_reads_as_utc(tmp_path: Path) -> None:
    server = FakePrefect()
    run_id = server.add_run(_registered(server, tmp_path))
    naive = (datetime.now(UTC) - timedelta(seconds=5)).replace(tzinfo=None).isoformat()
    server.runs[run_id].update(expected_start_time=naive, next_scheduled_start_time=naive)
    launcher, capture, _ = await _run_once(
        server, tmp_path, until=lambda lc: bool(lc.launched), what="the launch"
    )
    assert launcher.launched == [run_id]
    assert not [r for r in capture.records if r.exc_info]


def test_wait_without_a_finite_delay_does_not_crash_a_claim_under_uvloop(tmp_path: Path) -> None:
    """`{"status": "WAIT", "details": {"delay_seconds": NaN}}`: uvloop's sleep(nan) raises."""
    import uvloop

    server = FakePrefect()
    run_id = server.add_run(_registered(server, tmp_path))
    wait = b'{"status": "WAIT", "details": {"type": "wait_details", "delay_seconds": NaN}}'
    server.faults["set_state"] = [Fault("body", "WAIT NaN", 201, body=lambda real: wait)]

    async def example() -> tuple[FakeLauncher, Capture, list[PrefectApiError]]:
        return await _run_once(
            server, tmp_path, until=lambda lc: bool(lc.launched), what="the launch"
        )

    launcher, capture, errors = uvloop.run(example())
    assert launcher.launched == [run_id]
    assert not [r for r in capture.records if r.exc_info]
    assert any("delay_seconds" in str(e) for e in errors)


@pytest.mark.parametrize(
    ("literal", "parsed"),
    [
        ("5", 5.0),
        ("-3", 0.0),
        ("1e308", MAX_WAIT_SECONDS),
        ("null", None),
        ("NaN", "refused"),
        ("Infinity", "refused"),
        ("-Infinity", "refused"),
    ],
)
def test_wait_delay_is_a_finite_bounded_number(literal: str, parsed: Any) -> None:
    """A WAIT parks a claim for its delay: never for ever, never negative."""
    # Read as the client reads bodies: Python's json takes NaN and Infinity.
    data = json.loads(f'{{"status": "WAIT", "details": {{"delay_seconds": {literal}}}}}')
    if parsed == "refused":
        with pytest.raises(ValidationError):
            OrchestrationResult.model_validate(data)
    else:
        assert OrchestrationResult.model_validate(data).details.delay_seconds == parsed


async def test_cancellation_poll_does_not_trust_a_filter_it_did_not_get() -> None:
    server = FakePrefect()
    running = server.add_run(server.add_deployment("hello", "hello-flow"), "RUNNING")
    server.faults["flow_runs_filter"] = [ignore_the_filter(server)]
    supervisor = FakeSupervisor()
    async with PrefectClient(_api(), transport=httpx.MockTransport(server.handler)) as client:
        watcher = CancellationWatcher(
            client=client,
            supervisors=lambda: cast(Mapping[UUID, Supervisor], {UUID(running): supervisor}),
            poll_interval=lambda: 1.0,
            websocket_connected=lambda: False,
            liveness=Liveness(),
        )
        with captured() as capture:
            await watcher.poll_once()
    assert supervisor.cancels == 0
    assert any("not CANCELLING" in line for line in capture.problems())


async def _answer(
    response: httpx.Response,
    call: Callable[[PrefectClient], Awaitable[Any]],
    *,
    key: str | None = SECRET,
    auth: str | None = None,
) -> Any:
    from tests.integration.prefect_server import StaticApiConfig

    config = StaticApiConfig("http://prefect.test/api", key=key, auth_string=auth)
    transport = httpx.MockTransport(lambda request: response)
    async with PrefectClient(config, transport=transport, max_attempts=1) as client:
        return await call(client)


async def test_read_answered_with_another_run_is_malformed() -> None:
    other = {"id": str(uuid4()), "state": {"type": "SCHEDULED"}}
    with pytest.raises(api_module.MalformedResponse, match="another run"):
        await _answer(httpx.Response(200, json=other), lambda c: c.read_flow_run(uuid4()))


@pytest.mark.parametrize("call", ["create_logs", "emit_events", "update_deployment"])
async def test_html_page_with_200_is_not_a_delivery(call: str) -> None:
    calls = {
        "create_logs": lambda c: c.create_logs([{"message": "x"}]),
        "emit_events": lambda c: c.emit_events([{"id": "e"}]),
        "update_deployment": lambda c: c.update_deployment(uuid4(), {"paused": True}),
    }
    with pytest.raises(api_module.MalformedResponse, match="not JSON"):
        await _answer(httpx.Response(200, text=HTML), calls[call])
    for fine in (httpx.Response(204), httpx.Response(201, json=None), httpx.Response(200, json={})):
        await _answer(fine, calls[call])


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_redirect_is_not_success_and_names_the_target(status: int) -> None:
    response = httpx.Response(status, headers={"Location": "https://prefect.test/api/logs/"})
    with pytest.raises(api_module.ApiUnavailable) as caught:
        await _answer(response, lambda c: c.create_logs([{"message": "x"}]))
    assert f"redirected (HTTP {status}) to 'https://prefect.test/api/logs/'" in str(caught.value)
    assert "set api.url" in str(caught.value)


@pytest.mark.parametrize("status", [200, 404, 422, 502])
async def test_credentials_echoed_by_a_proxy_never_reach_an_error(status: int) -> None:
    import base64

    auth = "admin:s3cret-pass"
    token = base64.b64encode(auth.encode()).decode()
    for key, auth_string, echoed in (
        (SECRET, None, f"Bearer {SECRET}"),
        (None, auth, f"Basic {token} user {auth}"),
    ):
        body = f"<html>upstream said no; your headers: Authorization: {echoed}</html>"
        response = httpx.Response(status, text=body)
        with pytest.raises(PrefectApiError) as caught:
            await _answer(response, lambda c: c.read_flow_run(uuid4()), key=key, auth=auth_string)
        text = str(caught.value)
        assert "Authorization: " in text or "HTTP 502" in text
        for secret in (SECRET, auth, token, "s3cret-pass"):
            assert secret not in text


async def test_a_hung_answer_times_the_poll_out_and_the_loop_goes_on(tmp_path: Path) -> None:
    """An answer that never comes (a stalled proxy): the poll's own deadline ends it."""
    server = FakePrefect()
    run_id = server.add_run(_registered(server, tmp_path))
    stall = asyncio.Event()
    real_handler = server.handler
    hung = {"left": 1}

    async def handler(request: httpx.Request) -> httpx.Response:
        if route(request)[0] == "scheduled" and hung["left"]:
            hung["left"] -= 1
            server.hits.append("scheduled")
            server.injected.append((len(server.hits) - 1, "scheduled", Fault("raise", "hang")))
            await stall.wait()
        return await real_handler(request)

    server.handler = handler  # type: ignore[method-assign]
    config = tmp_path / "agent.toml"
    with captured() as capture:
        async with agent_env(tmp_path, server) as (cfg, _, launcher, _):
            cfg = cfg.model_copy(update={"api": cfg.api.model_copy(update={"timeout": 0.05})})
            client = PrefectClient(
                cfg.api, transport=httpx.MockTransport(handler), max_attempts=1, sleep=no_sleep
            )
            async with client, FlowRunLogs(client.create_logs, flush_interval=0.01) as logs:
                runner = make_runner(cfg, client, launcher, logs)
                await run_agent_until(
                    runner,
                    server,
                    lambda: bool(launcher.launched),
                    "the launch after the stalled poll",
                )
    assert launcher.launched == [run_id] and config.exists()
    assert "poll timed out" in capture.problems()
