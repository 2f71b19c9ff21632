"""The real agent as the real `runner-agent.service`, in a booted systemd 252 with enforced limits.

One container and one agent config serve the whole module. The agent runs the working tree
(install_agent), talks to the session's Prefect server on the host's loopback (the container
shares the host's network) and launches real flows, from a directory bound into the container,
as `runner-agent-run-<id>.scope` units in `runner-agent-flows.slice`.
Every test leaves the agent stopped and no run scope behind.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.agent_process import Api, render_config
from tests.integration.engines import argv_engine, launches
from tests.integration.prefect_server import PrefectServer
from tests.integration.test_cancellation_e2e import cancel
from tests.system.conftest import REPO
from tests.system.testbed import CACHE, Container, TestBedError, install_agent, install_units

SERVICE = "runner-agent.service"
SLICE = "runner-agent-flows.slice"
CONFIG = "/etc/runner-agent/agent.toml"
DROP_IN = "/etc/systemd/system/runner-agent.service.d/50-system-test.conf"
ENGINE_DROP_IN = "/etc/runner-agent/agent.d/50-engine.toml"
# What a test leaves behind is stopped: run scopes, and warm templates (they die with the agent).
STOP_SCOPES = "'runner-agent-run-*' 'runner-agent-warm-*'"
NOBODY = 65534

FLOWS = textwrap.dedent(
    """
    import os, subprocess, time
    from prefect import flow

    @flow
    def hello(word: str = "world"):
        print(f"hello {word} from the flow", flush=True)

    @flow
    def sleeper(seconds: float = 20.0):
        print(f"sleeping {seconds}s", flush=True)
        time.sleep(seconds)

    @flow
    def hog(megabytes: int = 400):
        print(f"allocating {megabytes} MB", flush=True)
        data = b"x" * (megabytes << 20)
        print(f"allocated {len(data)} bytes", flush=True)

    @flow
    def grandchild():
        child = subprocess.Popen(["sleep", "300"])
        print(f"started grandchild {child.pid}", flush=True)
        time.sleep(300)

    @flow
    def exit_later(seconds: float = 10.0):
        time.sleep(seconds)
        os._exit(3)

    @flow
    def whoami(seconds: float = 15.0):
        print(f"uid={os.getuid()} gid={os.getgid()}", flush=True)
        time.sleep(seconds)
    """
)

# The sleeper's own limits, checked on its scope (and enforced in its cgroup).
SLEEPER_LIMITS = {"memory_max": "768M", "cpu_quota": "150%", "tasks_max": 200, "runtime_max": "10m"}
HOG_MEMORY = "250M"  # the engine itself needs ~120 MB; the flow then asks for 400 MB more
SLOW_RUNTIME = "8s"


def deployments(flows: Path) -> list[dict[str, Any]]:
    def deployment(name: str, func: str, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "flow_name": f"sys-{name}",
            "entrypoint": f"flows.py:{func}",
            "path": str(flows),
            **extra,
        }

    return [
        deployment("hello", "hello"),
        deployment("sleeper", "sleeper", **SLEEPER_LIMITS),
        deployment("hog", "hog", memory_max=HOG_MEMORY),
        deployment("slow", "sleeper", runtime_max=SLOW_RUNTIME, parameters={"seconds": 120}),
        deployment("grandchild", "grandchild"),
        deployment("exit3", "exit_later"),
        deployment(
            "whoami", "whoami", user="nobody", env={"PREFECT_HOME": "/var/tmp/ra-prefect-nobody"}
        ),
    ]


@dataclass
class Bed:
    c: Container
    api: Api
    ids: dict[str, str]  # deployment name -> id
    engine: str = "cold"  # the agent's `[flow_run] engine` (docs/warm-engine.md)

    def run(self, deployment: str, **parameters: Any) -> str:
        return self.api.create_run(self.ids[deployment], parameters=parameters)

    def start_agent(self) -> float:
        """`systemctl start`; returns how long it took (it returns after READY=1). With engine
        "warm", then waits until the warm templates are ready (not counted)."""
        started = time.monotonic()
        self.c.systemctl("start", SERVICE)
        took = time.monotonic() - started
        self.wait_warm()
        return took

    def use_engine(self, engine: str) -> None:
        """Sets `[flow_run] engine` by a drop-in, from the next start of the agent on."""
        self.engine = engine
        if engine == "cold":
            self.c.exec(["rm", "-f", ENGINE_DROP_IN])
        else:
            self.c.write_file(ENGINE_DROP_IN, f'[flow_run]\nengine = "{engine}"\n', 0o600)

    def warm_templates(self) -> list[dict[str, Any]]:
        """The warm templates `runner-agent status --json` lists."""
        status = json.loads(self.c.exec(["runner-agent", "status", "--json"]).stdout)
        return list(status.get("warm_templates", []))

    def wait_warm(self, timeout: float = 180) -> None:
        """With engine "warm": until the agent's warm templates are ready (listed, alive).

        A run never waits for a template (one that is still importing means a cold start), so
        warm runs are created only after this. Cold: returns at once.
        """
        if self.engine != "warm":
            return
        try:
            self.c.wait_for(
                lambda: (found := self.warm_templates()) and all(t["alive"] for t in found),
                timeout,
                "the agent's warm templates to be ready",
            )
        except TestBedError as exc:
            journal = self.c.journal(SERVICE, "-o", "cat", "-n", "60")
            raise AssertionError(f"{exc}; the agent's journal:\n{journal}") from None

    def scope_engine(self, unit: str) -> str | None:
        """Which engine runs in the run's scope, by the argv of its processes ("cold": the sh
        wrapper and `python -m prefect.engine`; "warm": W and E, with the template's argv)."""
        kinds = {argv_engine(self.process(pid)[0]) for pid in self.scope_pids(unit)} - {None}
        return kinds.pop() if len(kinds) == 1 else None

    def service(self, *props: str) -> dict[str, str]:
        return self.c.show(SERVICE, *props)

    def active(self, unit: str) -> bool:
        return self.c.show(unit, "ActiveState")["ActiveState"] == "active"

    def wait_state(self, run_id: str, state: str, timeout: float = 60) -> None:
        def reached() -> bool:
            return self.api.state(run_id).get("type") == state

        self.c.wait_for(reached, timeout, f"run {run_id} to be {state}")

    def wait_crashed_naming(self, run_id: str, *words: str, timeout: float = 60) -> dict[str, Any]:
        """Until the run is CRASHED with a message naming all `words` (case-insensitive).

        The engine may report its own Crashed first; the agent's explanation may replace it.
        """

        def named() -> dict[str, Any]:
            state = self.api.state(run_id)
            message = (state.get("message") or "").lower()
            ok = state.get("type") == "CRASHED" and all(w.lower() in message for w in words)
            return state if ok else {}

        try:
            return self.c.wait_for(named, timeout, f"run {run_id} CRASHED naming {words}")
        except TestBedError:
            raise AssertionError(
                f"run {run_id} is not CRASHED naming {words}: {self.api.state(run_id)}"
            ) from None

    def wait_running(self, run_id: str, timeout: float = 60) -> str:
        """Until the engine reports RUNNING and the run's scope is active; the scope's name."""
        self.wait_state(run_id, "RUNNING", timeout)
        unit = scope(run_id)
        self.c.wait_for(lambda: self.active(unit), 10, f"{unit} active")
        return unit

    def scope_pids(self, unit: str) -> list[int]:
        group = self.c.show(unit, "ControlGroup")["ControlGroup"]
        if not group:
            return []
        out = self.c.exec(
            ["cat", f"/sys/fs/cgroup/systemd{group}/cgroup.procs"], check=False
        ).stdout
        return [int(p) for p in out.split()]

    def process(self, pid: int) -> tuple[str, dict[str, str]]:
        """(command line, /proc/<pid>/status fields) of a process in the container."""
        cmdline = self.c.exec(["cat", f"/proc/{pid}/cmdline"], check=False).stdout
        status = self.c.exec(["cat", f"/proc/{pid}/status"], check=False).stdout
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        return cmdline.replace("\0", " ").strip(), fields

    def run_scopes(self) -> list[str]:
        out = self.c.exec(
            ["systemctl", "list-units", "--all", "--plain", "--no-legend", "runner-agent-run-*"],
            check=False,
        ).stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    def journal_since(self, cursor_time: str, unit: str, *args: str) -> str:
        return self.c.journal(unit, "--since", cursor_time, *args)


def scope(run_id: str) -> str:
    return f"runner-agent-run-{run_id}.scope"


def container_time(c: Container) -> str:
    return c.exec(["date", "+%Y-%m-%d %H:%M:%S"]).stdout.strip()


@pytest.fixture(scope="module")
def bed(host_container: Container, prefect_server: PrefectServer) -> Iterator[Bed]:
    c = host_container
    # The flows must be visible inside: under the test cache, which is bound at the same path.
    flows = Path(tempfile.mkdtemp(prefix="system-agent-flows-", dir=CACHE))
    api = Api(prefect_server.api_url)
    try:
        flows.chmod(0o755)  # the `nobody` deployment reads it too
        (flows / "flows.py").write_text(FLOWS)
        install_units(c, REPO)
        install_agent(c, Path(sys.prefix))  # pytest runs from the agent venv
        config = render_config(
            {
                "api": {"url": prefect_server.api_url, "timeout": "10s"},
                "agent": {
                    "name": "system-test",
                    "limit": 6,
                    "poll_interval": "1s",
                    "prefetch": "5s",
                    "heartbeat_interval": "5s",
                    "cancel_grace": "3s",
                    "launcher": "systemd",
                },
                "flow_run": {
                    "python": prefect_server.python,
                    "memory_max": "1G",
                    "cpu_quota": "200%",
                    "tasks_max": 512,
                    "runtime_max": "10m",
                    "env": {"PREFECT_HOME": "/var/tmp/ra-prefect-root"},
                },
            },
            deployments(flows),
        )
        c.write_file(CONFIG, config, 0o600)
        c.exec(["runner-agent", "check-config"])  # fail early, with the one-line reason
        c.systemctl("start", SERVICE)
        ids = {
            d["name"]: api.wait_deployment(d["flow_name"], d["name"]) for d in deployments(flows)
        }
        c.systemctl("stop", SERVICE)
        yield Bed(c, api, ids)
    finally:
        c.systemctl("stop", SERVICE, check=False)
        c.exec(["sh", "-c", f"systemctl stop {STOP_SCOPES}; systemctl reset-failed"], check=False)
        c.exec(
            [
                "rm",
                "-rf",
                "/etc/runner-agent",
                "/etc/systemd/system/runner-agent.service",
                f"/etc/systemd/system/{SLICE}",
                "/etc/systemd/system/runner-agent.service.d",
                "/var/lib/runner-agent",
                "/run/runner-agent",
                "/usr/bin/runner-agent",
            ],
            check=False,
        )
        c.systemctl("daemon-reload", check=False)
        api.close()
        shutil.rmtree(flows, ignore_errors=True)


@pytest.fixture
def agent(bed: Bed) -> Iterator[Bed]:
    """The agent started for one test; stopped, and every run scope gone, after it."""
    c = bed.c
    since = container_time(c)
    try:
        yield bed
    finally:
        # Shown by pytest only when the test failed: what the agent said meanwhile.
        print(f"--- agent journal since {since}:")
        print(bed.journal_since(since, SERVICE, "-o", "short-precise", "-n", "150"))
        c.systemctl("stop", SERVICE, check=False)
        c.exec(["sh", "-c", f"systemctl stop {STOP_SCOPES}"], check=False)
        c.wait_for(
            lambda: not [u for u in bed.run_scopes() if bed.active(u)], 30, "run scopes to go"
        )
        c.exec(["systemctl", "reset-failed"], check=False)
        bed.use_engine("cold")


@pytest.fixture
def engine_agent(agent: Bed, engine: str) -> Bed:
    """`agent` whose runs start with `engine` (once per engine): for the tests of a run's
    semantics. The drop-in goes with the test."""
    agent.use_engine(engine)
    return agent


# -- 1. readiness ------------------------------------------------------------------------------


def test_start_returns_after_ready_with_a_status(agent: Bed) -> None:
    took = agent.start_agent()
    props = agent.service("ActiveState", "SubState", "StatusText", "MainPID", "Type")
    print(f"systemctl start -> READY=1: {took:.2f}s; StatusText={props['StatusText']!r}")
    # Type=notify: `start` returns when the agent sent READY=1, never while still activating.
    assert props["Type"] == "notify"
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
    assert "runs;" in props["StatusText"], props
    assert int(props["MainPID"]) > 0
    started = agent.c.journal("runner-agent", "-o", "cat", "-n", "50")
    assert "started as 'system-test'" in started, started


# -- 2. watchdog --------------------------------------------------------------------------------


def test_watchdog_restarts_a_hung_agent(agent: Bed) -> None:
    c = agent.c
    c.write_file(DROP_IN, "[Service]\nWatchdogSec=5\nTimeoutAbortSec=5\n")
    try:
        c.systemctl("daemon-reload")
        agent.start_agent()
        since = container_time(c)
        before = agent.service("MainPID", "NRestarts", "WatchdogUSec")
        assert before["WatchdogUSec"] == "5s", before
        stopped_at = time.monotonic()
        c.exec(["kill", "-STOP", before["MainPID"]])

        def restarted() -> dict[str, str]:
            now = agent.service("MainPID", "NRestarts", "ActiveState")
            fresh = now["MainPID"] not in ("0", before["MainPID"])
            return now if fresh and now["ActiveState"] == "active" else {}

        after: dict[str, str] = c.wait_for(restarted, 60, "the watchdog restart")
        took = time.monotonic() - stopped_at
        print(
            f"SIGSTOP -> watchdog restart -> active again: {took:.1f}s "
            f"(WatchdogSec=5, RestartSec=5)"
        )
        assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
        journal = agent.journal_since(since, SERVICE, "-o", "cat")
        assert "Watchdog timeout" in journal, journal
        assert "Failed with result 'watchdog'" in journal, journal
        # It keeps serving.
        run_id = agent.run("hello", word="after-watchdog")
        state = agent.api.wait_final(run_id)
        assert state["type"] == "COMPLETED", state
    finally:
        c.exec(["rm", "-rf", str(Path(DROP_IN).parent)])
        c.systemctl("daemon-reload")


# -- 3. scope properties, and `runner-agent status` ------------------------------------------


def test_run_executes_in_its_scope_with_the_configured_limits(engine_agent: Bed) -> None:
    agent = engine_agent
    c = agent.c
    agent.start_agent()
    run_id = agent.run("sleeper", seconds=15)
    unit = agent.wait_running(run_id)
    props = c.show(
        unit,
        "Slice",
        "ControlGroup",
        "MemoryMax",
        "CPUQuotaPerSecUSec",
        "TasksMax",
        "RuntimeMaxUSec",
    )
    print(f"{unit}: {props}")
    assert props["Slice"] == SLICE
    # A dash in a slice's name nests it: runner.slice/runner-agent.slice/runner-agent-flows.slice.
    assert props["ControlGroup"].endswith(f"/{SLICE}/{unit}"), props
    assert props["MemoryMax"] == str(768 << 20)
    assert props["CPUQuotaPerSecUSec"] == "1.500000s"
    assert props["TasksMax"] == "200"
    assert props["RuntimeMaxUSec"] == "10min"
    # Enforced, not only recorded: the kernel's own knobs of the scope's cgroups.
    group = props["ControlGroup"]
    assert int((c.cgroup_dir("memory", group) / "memory.limit_in_bytes").read_text()) == 768 << 20
    assert (c.cgroup_dir("cpu", group) / "cpu.cfs_quota_us").read_text().strip() == "150000"
    assert (c.cgroup_dir("pids", group) / "pids.max").read_text().strip() == "200"
    # The run's processes are the configured engine's (their argv says which).
    pids = agent.scope_pids(unit)
    assert agent.scope_engine(unit) == agent.engine, [agent.process(pid)[0] for pid in pids]

    status = json.loads(c.exec(["runner-agent", "status", "--json"]).stdout)["runs"]
    mine = [r for r in status if r["flow_run_id"] == run_id]
    assert len(mine) == 1, status
    row = mine[0]
    print(f"runner-agent status: {row}")
    assert (row["deployment"], row["unit"], row["phase"], row["alive"]) == (
        "sys-sleeper/sleeper",
        unit,
        "running",
        True,
    )
    # A warm engine imported Prefect in its template: the run itself used far less CPU
    # (docs/warm-engine.md: 0.46 CPU-s for a whole no-op run).
    busy = 0.5 if agent.engine == "cold" else 0.1
    assert row["rss_bytes"] > 20 << 20 and row["cpu_seconds"] > busy, row
    assert row["limits"] == {
        "memory_max": "768M",
        "cpu_quota": "150%",
        "tasks_max": 200,
        "runtime_max": "10m",
        "user": None,
        "configured": True,
    }
    table = c.exec(["runner-agent", "status"]).stdout
    assert run_id in table and "mem=768M cpu=150% tasks=200 runtime=10m" in table, table
    assert agent.api.wait_final(run_id)["type"] == "COMPLETED"
    assert launches(agent.api, run_id) == [agent.engine]


# -- 4. memory limit ---------------------------------------------------------------------------


def test_memory_hog_is_killed_and_its_neighbour_completes(agent: Bed) -> None:
    agent.start_agent()
    hog = agent.run("hog", megabytes=400)
    neighbour = agent.run("sleeper", seconds=5)
    hog_state = agent.wait_crashed_naming(hog, "memory", HOG_MEMORY)
    print(f"memory hog: {hog_state['type']}: {hog_state['message']}")
    assert agent.api.wait_final(neighbour)["type"] == "COMPLETED"


# -- 5. runtime limit --------------------------------------------------------------------------


def test_run_past_its_runtime_max_is_crashed(agent: Bed) -> None:
    agent.start_agent()
    run_id = agent.run("slow")
    started = time.monotonic()
    state = agent.api.wait_final(run_id, timeout=60)
    print(
        f"runtime limit {SLOW_RUNTIME}: {state['type']} after {time.monotonic() - started:.1f}s:"
        f" {state['message']}"
    )
    state = agent.wait_crashed_naming(run_id, "runtime", SLOW_RUNTIME, timeout=20)
    print(f"final: {state['message']}")


# -- 6. cancellation kills the whole scope -----------------------------------------------------


def test_cancellation_kills_the_scope_with_its_grandchildren(agent: Bed) -> None:
    c = agent.c
    agent.start_agent()
    run_id = agent.run("grandchild")
    unit = agent.wait_running(run_id)

    def grandchild() -> list[int]:
        return [p for p in agent.scope_pids(unit) if agent.process(p)[0] == "sleep 300"]

    c.wait_for(grandchild, 30, "the flow to start `sleep 300`")
    cancel(agent.api, run_id)
    # The engine may answer the SIGTERM with its own Crashed first; the agent replaces it.
    agent.wait_state(run_id, "CANCELLED", timeout=60)
    assert agent.api.state(run_id)["message"] == "Flow run was cancelled successfully."
    c.wait_for(lambda: not agent.active(unit), 15, f"{unit} to go")
    left = c.exec(["pgrep", "-f", "^sleep 300$"], check=False)
    assert left.returncode == 1 and not left.stdout.strip(), left.stdout


# -- 7. journal ---------------------------------------------------------------------------------


def test_journal_has_structured_agent_records_and_the_flow_output(engine_agent: Bed) -> None:
    agent = engine_agent
    c = agent.c
    agent.start_agent()
    run_id = agent.run("hello", word="journal")
    assert agent.api.wait_final(run_id)["type"] == "COMPLETED"
    # The documented query: `journalctl -u runner-agent FLOW_RUN_ID=<id>`.
    c.wait_for(
        lambda: (
            "Process exited with status 0"
            in c.journal(SERVICE, f"FLOW_RUN_ID={run_id}", "-o", "cat")
        ),
        20,
        "the agent's exit note",
    )
    records = [
        json.loads(line)
        for line in c.journal(SERVICE, "-o", "json").splitlines()
        if line.startswith("{")
    ]
    agent_records = [r for r in records if r.get("SYSLOG_IDENTIFIER") == "runner-agent"]
    levels = {"DEBUG": "7", "INFO": "6", "WARNING": "4", "ERROR": "3", "CRITICAL": "2"}
    for record in agent_records:
        body = json.loads(record["MESSAGE"])  # the agent's MESSAGEs are JSON objects
        assert record["PRIORITY"] == levels[body["level"]], record
        assert record["_SYSTEMD_UNIT"] == SERVICE, record
    per_run = [r for r in agent_records if r.get("FLOW_RUN_ID") == run_id]
    messages = [json.loads(r["MESSAGE"])["message"] for r in per_run]
    print(
        f"agent journal: {len(agent_records)} agent records, "
        f"{sum(r['PRIORITY'] == '4' for r in agent_records)} warnings; run {run_id}: {messages}"
    )
    assert any(m.startswith("Claimed by runner-agent 'system-test'") for m in messages), messages
    launched = [r for r in per_run if "Launched in" in r["MESSAGE"]]
    assert len(launched) == 1 and launched[0]["PRIORITY"] == "6", messages
    assert launched[0]["UNIT"] == scope(run_id)
    assert launched[0]["DEPLOYMENT"] == "sys-hello/hello"  # FLOW/NAME
    assert json.loads(launched[0]["MESSAGE"])["flow_run_id"] == run_id
    assert launches(agent.api, run_id) == [agent.engine]
    # The flow's own output, through the run scope's journal, after the run has ended (a warm
    # run's supervisor opens its stream to the journal itself, from inside the scope).
    c.exec(["journalctl", "--sync"], check=False)
    output = c.exec(["runner-agent", "logs", run_id]).stdout
    assert "hello journal from the flow" in output, output
    scope_journal = c.journal(scope(run_id), "-o", "cat")
    assert "hello journal from the flow" in scope_journal, scope_journal


# -- 8. restart adoption -----------------------------------------------------------------------


def test_runs_survive_agent_restarts_and_their_outcome_is_reported(engine_agent: Bed) -> None:
    agent = engine_agent
    c = agent.c
    agent.start_agent()
    sleepers = [agent.run("sleeper", seconds=30) for _ in range(3)]
    exit3 = agent.run("exit3", seconds=15)
    units = {run_id: agent.wait_running(run_id, timeout=90) for run_id in [*sleepers, exit3]}
    pids = {run_id: agent.scope_pids(unit) for run_id, unit in units.items()}
    engines = {run_id: agent.scope_engine(unit) for run_id, unit in units.items()}
    assert set(engines.values()) == {agent.engine}, engines

    started = time.monotonic()
    c.systemctl("restart", SERVICE)
    print(f"systemctl restart with 4 runs in flight: {time.monotonic() - started:.2f}s")
    for run_id, unit in units.items():
        assert agent.active(unit), unit
        assert agent.scope_pids(unit) == pids[run_id]  # not restarted, not touched
    assert c.wait_for(
        lambda: "4/6 runs" in agent.service("StatusText")["StatusText"],
        20,
        "the adopted runs to count against the limit",
    )

    # The fourth run exits (status 3) while no agent is there to see it.
    c.systemctl("stop", SERVICE)
    c.wait_for(lambda: not agent.active(units[exit3]), 40, "the exit-3 run to end")
    assert agent.api.state(exit3)["type"] == "RUNNING"  # nobody has reported it yet
    took = agent.start_agent()
    print(f"agent back after the exit-3 run ended: start took {took:.2f}s")

    state = agent.api.wait_final(exit3, timeout=60)
    assert state["type"] == "CRASHED", state
    assert "status 3" in state["message"], state
    for run_id in sleepers:
        final = agent.api.wait_final(run_id, timeout=90)
        assert final["type"] == "COMPLETED", (run_id, final)
        types = [s["type"] for s in agent.api.history(run_id)]
        assert types.count("PENDING") == 1 and types.count("RUNNING") == 1, types
        assert launches(agent.api, run_id) == [agent.engine]


# -- 9. clean stop -----------------------------------------------------------------------------


def test_stop_returns_quickly_and_leaves_runs_alone(agent: Bed) -> None:
    c = agent.c
    agent.start_agent()
    run_id = agent.run("sleeper", seconds=15)
    unit = agent.wait_running(run_id)
    pids = agent.scope_pids(unit)
    started = time.monotonic()
    c.systemctl("stop", SERVICE)
    took = time.monotonic() - started
    print(f"systemctl stop with a run in flight: {took:.2f}s")
    # A hang guard, below TimeoutStopSec=30 (a stop that timed out); that the stop did not wait
    # for the run (15 s) is shown by the run still going below, not by the clock.
    assert took < 25
    assert agent.service("ActiveState")["ActiveState"] == "inactive"
    assert agent.active(unit) and agent.scope_pids(unit) == pids
    agent.start_agent()  # adopts it and reports nothing over the engine's own final state
    assert agent.api.wait_final(run_id, timeout=60)["type"] == "COMPLETED"


# -- flows as another user (issue 9) ------------------------------------------------------------


def test_flow_processes_run_as_the_configured_user(engine_agent: Bed) -> None:
    agent = engine_agent
    agent.start_agent()
    run_id = agent.run("whoami", seconds=10)
    unit = agent.wait_running(run_id)
    found = {pid: agent.process(pid) for pid in agent.scope_pids(unit)}
    processes = {pid: (cmd, st) for pid, (cmd, st) in found.items() if cmd}  # not ended meanwhile
    # The supervisor (the sh wrapper, or a warm run's W) stays root to write its records; the
    # engine is its child (setpriv execs the cold engine at once). A warm run's W and E both
    # show the template's argv, so they are told apart by who is whose parent.
    supervisors = [pid for pid, (_cmd, st) in processes.items() if int(st["PPid"]) not in found]
    engines = [pid for pid, (_cmd, st) in processes.items() if int(st["PPid"]) in supervisors]
    seen = [(cmd[:50], st["Uid"].split(), st["Gid"].split()) for cmd, st in processes.values()]
    print(f"processes of {unit}: {seen}")
    assert len(supervisors) == 1 and len(engines) == 1, seen
    assert agent.scope_engine(unit) == agent.engine, seen
    supervisor, engine = processes[supervisors[0]][1], processes[engines[0]][1]
    assert set(supervisor["Uid"].split()) == {"0"}, supervisor
    assert set(engine["Uid"].split()) == {str(NOBODY)}, engine
    assert set(engine["Gid"].split()) == {str(NOBODY)}, engine
    assert agent.api.wait_final(run_id)["type"] == "COMPLETED"
    assert launches(agent.api, run_id) == [agent.engine]
    output = agent.c.exec(["runner-agent", "logs", run_id]).stdout
    assert f"uid={NOBODY} gid={NOBODY}" in output, output
