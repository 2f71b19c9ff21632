"""The agent is SIGKILLed at each step of a run's life, then started again (issue #9, item 2).

A failpoint (agent/failpoints.py) makes the real agent process kill itself at one point; a new
agent process without it, on the same state directory, must finish the run's story: the right
final state exactly once, and the flow's body executed exactly once.
"""

from __future__ import annotations

import signal
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.agent_process import (
    FINAL,
    AgentProcess,
    Api,
    kill_process_groups_under,
    running_agent,
    wait_for,
)
from tests.integration.engines import WARM_NOTE, run_supervisor

pytestmark = pytest.mark.integration

FLOWS = textwrap.dedent(
    """
    import os, time
    from prefect import flow

    def mark(marker: str) -> None:
        with open(marker, "a") as out:
            out.write(os.environ["PREFECT__FLOW_RUN_ID"] + "\\n")

    @flow
    def once(marker: str, go: str):
        mark(marker)
        deadline = time.time() + 60
        while not os.path.exists(go) and time.time() < deadline:
            time.sleep(0.1)

    @flow
    def exit_three(marker: str):
        mark(marker)
        os._exit(3)
    """
)

# point -> (flow, the phase the record was left in, the final state, a phrase of the final
#           message, what the second agent says about the run)
CASES: dict[str, tuple[str, str, str, str, str]] = {
    "after-claim": ("once", "claiming", "COMPLETED", "", "Launching a run that was claimed before"),
    # `once` waits for the test's go, so it is alive when the second agent looks: it must be
    # adopted, not launched again.
    "during-launch": ("once", "launching", "COMPLETED", "", "Adopted the running flow run"),
    "while-running": ("once", "running", "COMPLETED", "", "Adopted the running flow run"),
    # A non-zero exit: the CRASHED report itself is what recovery has to deliver.
    "after-exit": ("exit_three", "exited", "CRASHED", "status 3", "Process exited with status 3"),
}


@pytest.fixture(scope="module")
def flow_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("kill-flows")
    (directory / "flows.py").write_text(FLOWS)
    return directory


# A work pool's run is rebuilt from its record, not from the config: the claim and a live run.
SOURCES = [(point, "deployment") for point in CASES] + [
    ("after-claim", "work pool"),
    ("while-running", "work pool"),
]
# Warm runs (docs/warm-engine.md) where the first agent launches the run: the second then adopts
# a warm supervisor that outlived its template (killed with the agent), or reads its records.
# Not after-claim: the second agent launches the claimed run at its start, before any template
# of its own is ready (a run never waits for one), so it would start cold; nor the pool runs,
# whose templates start at their first claim, not with the agent.
WARM = ["during-launch", "while-running", "after-exit"]
MATRIX = [(point, source, "cold") for point, source in SOURCES] + [
    (point, "deployment", "warm") for point in WARM
]


@pytest.mark.parametrize(("point", "source", "engine"), MATRIX)
def test_agent_killed_at_each_step_finishes_the_run_exactly_once(
    point: str,
    source: str,
    engine: str,
    prefect_server: Any,
    flow_dir: Path,
    api: Api,
    tmp_path: Path,
) -> None:
    func, phase, final, phrase, recovered_by = CASES[point]
    marker, go = tmp_path / "executions.txt", tmp_path / "go"
    name = f"kill-{point}" if source == "deployment" else f"kill-{point}-pool"
    deployment: dict[str, Any] = {
        "entrypoint": f"flows.py:{func}",
        "path": str(flow_dir),
        "parameters": {"marker": str(marker), "go": str(go)}
        if func == "once"
        else {"marker": str(marker)},
    }
    common: dict[str, Any] = dict(
        api_url=prefect_server.api_url,
        python=prefect_server.python,
        name=name,
        flow_run={"engine": engine},
    )
    if source == "deployment":
        common["deployments"] = [{"name": name, "flow_name": f"kill-{func}", **deployment}]
    else:
        common["deployments"] = []
        common["work_pools"] = [{"name": name}]
    workdir = tmp_path / "agent"
    started = time.monotonic()
    first = AgentProcess(workdir, env={"RUNNER_AGENT_FAILPOINTS": f"{point}=kill"}, **common)
    first.start()
    try:
        first.wait_warm()  # the first agent launches warm runs warm
        if source == "deployment":
            deployment_id = api.wait_deployment(f"kill-{func}", name)
        else:
            deployment_id = api.pool_deployment(name, f"kill-{func}", name, **deployment)
        run_id = api.create_run(deployment_id)
        assert first.proc is not None
        try:
            returncode = first.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the agent did not hit {point}: {first.log_text()[-3000:]}"
            ) from None
        assert returncode == -signal.SIGKILL, (returncode, first.log_text()[-3000:])
        assert f"failpoint {point}: SIGKILL" in first.log_text()
        killed_at = time.monotonic()

        with running_agent(workdir, **common) as second:
            wait_for(lambda: recovered_by in second.log_text(), 60, what=recovered_by)
            if func == "once":
                # The run waits for `go`: its live supervisor (the pid record's process, the
                # one the second agent adopted or launched) shows the engine that started it.
                run_dir = workdir / "run" / "runs" / run_id
                supervisor = wait_for(
                    lambda: run_supervisor(run_dir), 60, what=f"the supervisor of {run_id}"
                )
                assert supervisor[0] == engine, supervisor
            go.touch()
            state = api.wait_final(run_id, timeout=90)
            # The story is finished when the second agent forgets the run's record; a crash
            # first runs the flow's on_crashed hooks in a process that imports Prefect.
            record = workdir / "state" / "runs" / run_id
            wait_for(lambda: not record.exists(), 120, what=f"the record of {run_id} to go")
            log = second.log_text()
    finally:
        first.stop()
        kill_process_groups_under(workdir)
    print(
        f"{point}: killed {killed_at - started:.1f}s after start, "
        f"final {time.monotonic() - killed_at:.1f}s after the kill"
    )

    # Exactly once: one claim, at most one start, one final state, one execution of the body.
    types = [s["type"] for s in api.history(run_id)]
    assert types.count("PENDING") == 1, types
    assert types.count("RUNNING") <= 1, types
    assert len([t for t in types if t in FINAL]) == 1, types
    assert types[-1] == final, (types, state)
    assert marker.read_text().splitlines() == [run_id], log[-3000:]
    assert phrase in (state.get("message") or ""), state
    # ... and by the path this case is about.
    assert f"recovering run {run_id} (left in phase {phase})" in log, log[-3000:]
    assert recovered_by in log, log[-3000:]
    # ... and with the engine of the case: no cold fallback, and the launch note (logged before
    # the kill, except at during-launch) names a warm start exactly for warm.
    # (Both agents log into the same file, so `log` holds the first one's too.)
    assert f"warm start unavailable for run {run_id}" not in log, log[-3000:]
    if point != "during-launch":
        assert (WARM_NOTE in log) == (engine == "warm"), log[-3000:]
