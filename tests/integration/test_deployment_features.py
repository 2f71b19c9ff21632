"""Deployments as complete as `flow.serve` makes them (issue 14), against a real Prefect server.

This module has a Prefect server of its own: its scheduler runs every 2 s (the default is 60 s)
and a run over a deployment's concurrency limit waits 2 s (default 30 s) before it is due again,
so schedules and ENQUEUE are seen in seconds. Both are the server's own settings; the agent is
the same.

- Several schedules (cron with a timezone, rrule with per-schedule parameters, interval with an
  anchor) create upcoming runs at the times each schedule says; a paused deployment gets none.
- `concurrency_limit = 1`: three runs due at once never overlap and all complete; with
  `collision_strategy = "CANCEL_NEW"` the runs over the limit end CANCELLED.
- A deployment first created with a pull step, then adopted by the agent: its next run executes
  no pull step.
- `etl/prod` and `report/prod` (one name, two flows) both register and run.
"""

from __future__ import annotations

import itertools
import json
import os
import textwrap
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.integration.agent_process import AgentProcess, Api, running_agent, wait_for
from tests.integration.prefect_server import PrefectServer, prefect_venv

pytestmark = pytest.mark.integration

FLOWS = textwrap.dedent(
    """
    import json, os, pathlib, time
    from prefect import flow

    @flow(name="feat-sched")
    def scheduled(who: str = "default"):
        pass

    @flow(name="feat-held")
    def held(out: str, gate: str = "", seconds: float = 0.0):
        started = time.time()
        while gate and not os.path.exists(gate):
            time.sleep(0.1)
        time.sleep(seconds)
        record = {"run": os.environ["PREFECT__FLOW_RUN_ID"], "start": started, "end": time.time()}
        with open(out, "a") as handle:
            handle.write(json.dumps(record) + "\\n")

    @flow(name="etl")
    def etl(out: str):
        pathlib.Path(out, "etl").write_text(os.environ["PREFECT__FLOW_RUN_ID"])

    @flow(name="report")
    def report(out: str):
        pathlib.Path(out, "report").write_text(os.environ["PREFECT__FLOW_RUN_ID"])
    """
)

CRON = "0 9 * * *"
CRON_ZONE = "Europe/Berlin"
RRULE = "FREQ=WEEKLY;BYDAY=MO,TH;BYHOUR=6;BYMINUTE=30"
ANCHOR = datetime(2026, 1, 1, 0, 17, tzinfo=UTC)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    server = PrefectServer(
        prefect_venv(os.environ),
        tmp_path_factory.mktemp("features-prefect"),
        extra_env={
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
            "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
        },
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def features_api(server: PrefectServer) -> Iterator[Api]:
    api = Api(server.api_url)
    try:
        yield api
    finally:
        api.close()


@pytest.fixture(scope="module")
def code(tmp_path_factory: pytest.TempPathFactory) -> Path:
    code = tmp_path_factory.mktemp("features-code")
    (code / "flows.py").write_text(FLOWS)
    return code


def deployment(code: Path, name: str, flow_name: str, func: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "flow_name": flow_name,
        "entrypoint": f"flows.py:{func}",
        "path": str(code),
        **extra,
    }


def features_agent(
    server: PrefectServer, tmp_path: Path, deployments: list[dict[str, Any]], name: str
) -> AbstractContextManager[AgentProcess]:
    """An agent of this module's server serving `deployments`, stopped at the block's end."""
    return running_agent(
        tmp_path / "agent",
        api_url=server.api_url,
        python=server.python,
        deployments=deployments,
        name=name,
    )


def runs_of(api: Api, deployment_id: str) -> list[dict[str, Any]]:
    response = api.request(
        "POST",
        "/flow_runs/filter",
        json={"flow_runs": {"deployment_id": {"any_": [deployment_id]}}, "limit": 200},
    )
    response.raise_for_status()
    return list(response.json())


def started_at(run: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(run["expected_start_time"])


def test_schedules_create_their_runs_and_a_paused_deployment_none(
    server: PrefectServer, features_api: Api, code: Path, tmp_path: Path
) -> None:
    api = features_api
    schedules = [
        {"cron": CRON, "timezone": CRON_ZONE},
        {"rrule": RRULE, "timezone": "UTC", "parameters": {"who": "rrule"}},
        {"interval": "1h", "anchor_date": ANCHOR},
    ]
    deployments = [
        deployment(code, "scheduled", "feat-sched", "scheduled", schedules=schedules),
        deployment(
            code,
            "paused",
            "feat-sched",
            "scheduled",
            schedules=[{"interval": "1h", "anchor_date": ANCHOR}],
            paused=True,
        ),
    ]
    with features_agent(server, tmp_path, deployments, "feat-sched") as process:
        scheduled_id = api.wait_deployment("feat-sched", "scheduled")
        paused_id = api.wait_deployment("feat-sched", "paused")
        registered = api.request("GET", f"/deployments/{scheduled_id}").json()
        kinds = sorted(next(iter(s["schedule"])) for s in registered["schedules"])
        assert kinds == ["cron", "interval", "rrule"], registered["schedules"]
        assert api.request("GET", f"/deployments/{paused_id}").json()["paused"] is True

        def by_kind() -> dict[str, list[dict[str, Any]]] | None:
            runs = [r for r in runs_of(api, scheduled_id) if r["auto_scheduled"]]
            kinds: dict[str, list[dict[str, Any]]] = {"cron": [], "rrule": [], "interval": []}
            for run in runs:
                local = started_at(run).astimezone(ZoneInfo(CRON_ZONE))
                utc = started_at(run).astimezone(UTC)
                if run["parameters"].get("who") == "rrule":
                    kinds["rrule"].append(run)
                elif (local.hour, local.minute) == (9, 0):
                    kinds["cron"].append(run)
                elif utc.minute == ANCHOR.minute:
                    kinds["interval"].append(run)
                else:
                    raise AssertionError(f"a run no schedule makes: {run['expected_start_time']}")
            return kinds if all(len(found) >= 3 for found in kinds.values()) else None

        kinds_found = wait_for(by_kind, 60, what="three upcoming runs of each schedule")
        for run in kinds_found["rrule"]:
            when = started_at(run).astimezone(UTC)
            assert (when.strftime("%a"), when.hour, when.minute) in {
                ("Mon", 6, 30),
                ("Thu", 6, 30),
            }, run["expected_start_time"]
            assert run["parameters"] == {"who": "rrule"}
        for run in kinds_found["cron"] + kinds_found["interval"]:
            assert run["parameters"] == {}, run
        interval_times = sorted(started_at(r) for r in kinds_found["interval"])
        assert all(b - a == timedelta(hours=1) for a, b in itertools.pairwise(interval_times))
        print({kind: len(found) for kind, found in kinds_found.items()})

        # The scheduler visited the server's deployments several times since: none for paused.
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            assert runs_of(api, paused_id) == []
            time.sleep(1)
        # A restarted agent finds the server's copies (its echo of every schedule kind, of
        # `paused`) up to date and writes nothing: an upsert would replace the upcoming runs.
        process.stop()
        process.start()
        lines = [
            f"deployment '{key}' is up to date"
            for key in ("feat-sched/scheduled", "feat-sched/paused")
        ]
        wait_for(
            lambda: all(line in process.log_text() for line in lines),
            60,
            what="both deployments up to date on restart",
        )
        assert process.log_text().count("registered deployment 'feat-sched/scheduled'") == 1


def held_runs(out: Path) -> list[dict[str, Any]]:
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_concurrency_limit_one_never_overlaps_and_all_complete(
    server: PrefectServer, features_api: Api, code: Path, tmp_path: Path
) -> None:
    api = features_api
    out = tmp_path / "runs.jsonl"
    deployments = [
        deployment(
            code,
            "one-at-a-time",
            "feat-held",
            "held",
            concurrency_limit=1,
            parameters={"out": str(out), "seconds": 2.0},
        )
    ]
    with features_agent(server, tmp_path, deployments, "feat-enqueue") as process:
        deployment_id = api.wait_deployment("feat-held", "one-at-a-time")
        limit = api.request("GET", f"/deployments/{deployment_id}").json()
        assert limit["global_concurrency_limit"]["limit"] == 1, limit
        runs = [api.create_run(deployment_id) for _ in range(3)]
        states = {run: api.wait_final(run, timeout=240) for run in runs}
        assert {s["type"] for s in states.values()} == {"COMPLETED"}, (
            states,
            process.log_text()[-3000:],
        )
        intervals = sorted((r["start"], r["end"]) for r in held_runs(out))
        assert len(intervals) == 3, intervals
        for (_, end), (start, _) in itertools.pairwise(intervals):
            assert start >= end, intervals  # never two running at once
        waited = [s["name"] for run in runs for s in api.history(run) if s["type"] == "SCHEDULED"]
        print(f"history names of the SCHEDULED states: {waited}")
        assert "AwaitingConcurrencySlot" in waited


def test_cancel_new_cancels_the_runs_over_the_limit(
    server: PrefectServer, features_api: Api, code: Path, tmp_path: Path
) -> None:
    api = features_api
    out = tmp_path / "runs.jsonl"
    gate = tmp_path / "gate"
    deployments = [
        deployment(
            code,
            "cancel-new",
            "feat-held",
            "held",
            concurrency_limit=1,
            collision_strategy="CANCEL_NEW",
            parameters={"out": str(out), "gate": str(gate)},
        )
    ]
    with features_agent(server, tmp_path, deployments, "feat-cancel-new") as process:
        deployment_id = api.wait_deployment("feat-held", "cancel-new")
        first = api.create_run(deployment_id)
        wait_for(lambda: api.state(first).get("type") == "RUNNING", 90, what="the first run")
        extra = [api.create_run(deployment_id) for _ in range(2)]
        for run in extra:
            state = api.wait_final(run, timeout=60)
            assert state["type"] == "CANCELLED", (state, process.log_text()[-3000:])
            assert "RUNNING" not in [s["type"] for s in api.history(run)]
        gate.touch()
        assert api.wait_final(first)["type"] == "COMPLETED"
        assert [r["run"] for r in held_runs(out)] == [first]


PULL_STEP_FLOW = "feat-adopt"


def test_an_adopted_deployment_runs_no_pull_step(
    server: PrefectServer, features_api: Api, code: Path, tmp_path: Path
) -> None:
    api = features_api
    marker = tmp_path / "pull-step-ran"
    flow = api.request("POST", "/flows/", json={"name": PULL_STEP_FLOW})
    flow.raise_for_status()
    created = api.request(
        "POST",
        "/deployments/",
        json={
            "name": "adopted",
            "flow_id": flow.json()["id"],
            "entrypoint": "flows.py:held",
            "path": str(code),
            "pull_steps": [
                {
                    "prefect.deployments.steps.run_shell_script": {
                        "script": f"touch {marker}",
                    }
                }
            ],
            "job_variables": {"env": {"FROM_BEFORE": "1"}},
        },
    )
    created.raise_for_status()
    assert created.json()["pull_steps"], created.json()
    out = tmp_path / "runs.jsonl"
    deployments = [
        deployment(code, "adopted", PULL_STEP_FLOW, "held", parameters={"out": str(out)})
    ]
    with features_agent(server, tmp_path, deployments, "feat-adopt") as process:

        def adopted() -> dict[str, Any] | None:
            body = dict(api.request("GET", f"/deployments/{created.json()['id']}").json())
            return body if not body["pull_steps"] and not body["job_variables"] else None

        wait_for(adopted, 60, what="the adoption to clear pull_steps and job_variables")
        run = api.create_run(created.json()["id"])
        state = api.wait_final(run)
        assert state["type"] == "COMPLETED", (state, process.log_text()[-3000:])
        assert [r["run"] for r in held_runs(out)] == [run]
        assert not marker.exists(), "the pull step ran"
        assert "pull_steps" in process.log_text()


def test_one_name_under_two_flows_both_register_and_run(
    server: PrefectServer, features_api: Api, code: Path, tmp_path: Path
) -> None:
    api = features_api
    out = tmp_path / "out"
    out.mkdir()
    deployments = [
        deployment(code, "prod", "etl", "etl", parameters={"out": str(out)}),
        deployment(code, "prod", "report", "report", parameters={"out": str(out)}),
    ]
    with features_agent(server, tmp_path, deployments, "feat-names") as process:
        ids = {flow: api.wait_deployment(flow, "prod") for flow in ("etl", "report")}
        assert ids["etl"] != ids["report"]
        runs = {flow: api.create_run(deployment_id) for flow, deployment_id in ids.items()}
        for flow, run in runs.items():
            state = api.wait_final(run)
            assert state["type"] == "COMPLETED", (flow, state, process.log_text()[-3000:])
            assert (out / flow).read_text() == run
        # The agent names each run's deployment as Prefect does, FLOW/NAME.
        for flow, run in runs.items():
            named = {r.get("deployment") for r in process.records() if r.get("flow_run_id") == run}
            assert named - {None} == {f"{flow}/prod"}, named
