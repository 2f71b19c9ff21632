"""Fault: the Prefect API goes away for 60 s while runs execute and more become due.

A Prefect server of its own (this test stops it; the session's server is left alone) is stopped
and started again on the same port and SQLite database. The real agent process keeps running
throughout, with NOTIFY_SOCKET on a datagram socket that a thread here reads for the whole test.

The flow bodies append their run id to one file, then wait for a gate file that the test
creates, so each run ends exactly when the test wants it to:
- `crash` exits 3 right after the server stops: the agent must report CRASHED with the status
  once the API is back;
- `giveup` ends right after the stop too, but its engine retries the API only once
  (PREFECT_CLIENT_MAX_RETRIES=1), so it gives up reporting its own outcome and exits; the agent
  must not leave that run RUNNING;
- `done` completes 45 s into the outage: the engine's own retries of its final state
  (PREFECT_CLIENT_MAX_RETRIES=5 by default, backing off from 2 s to 32 s: about a minute in
  all) outlast the outage's last 15 s, so the engine reports COMPLETED itself;
- `late-1`, `late-2` become due during the outage and must run after it.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.integration.agent_process import AgentProcess, Api, kill_process_groups_under, wait_for
from tests.integration.prefect_server import PrefectServer, prefect_venv

pytestmark = pytest.mark.integration

OUTAGE = 60.0
# systemd's deadline. The agent pings at half of it (unit-tested on a fake clock); 6 s leaves a
# busy machine room to be late with a ping without the test calling the watchdog starved.
WATCHDOG_USEC = 6_000_000
WATCHDOG_DEADLINE = WATCHDOG_USEC / 1e6
PING_EVERY = WATCHDOG_DEADLINE / 2
AGENT_NAME = "outage-agent"
EVENT_CAP = 5_000  # EventEmitter's max_buffered default, as the STATUS line shows it

FLOWS = textwrap.dedent(
    """
    import os, time
    from prefect import flow

    @flow
    def held(out: str, gate: str, exit_code: int = 0):
        with open(out, "a") as f:
            f.write(os.environ["PREFECT__FLOW_RUN_ID"] + "\\n")
        while not os.path.exists(gate):
            time.sleep(0.1)
        if exit_code:
            os._exit(exit_code)
    """
)


class NotifyRecorder:
    """Reads every sd_notify datagram on a thread, so the agent's queue never fills up."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self._lock = threading.Lock()
        self._messages: list[tuple[float, float, str]] = []  # (monotonic, wall, line)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify-recorder", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            mono, wall = time.monotonic(), time.time()
            with self._lock:
                self._messages += [(mono, wall, line) for line in data.decode().splitlines()]

    def messages(self) -> list[tuple[float, float, str]]:
        with self._lock:
            return list(self._messages)

    def pings(self, start: float, end: float) -> list[tuple[float, float]]:
        return [
            (m, w) for m, w, line in self.messages() if line == "WATCHDOG=1" and start <= m <= end
        ]

    def statuses(self, start: float, end: float = float("inf")) -> list[str]:
        return [
            line.removeprefix("STATUS=")
            for m, _, line in self.messages()
            if line.startswith("STATUS=") and start <= m <= end
        ]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def outage_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    server = PrefectServer(prefect_venv(os.environ), tmp_path_factory.mktemp("outage-prefect"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


def held_deployment(name: str, flow_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "flow_name": "outage-flow",
        "entrypoint": "flows.py:held",
        "path": str(flow_dir),
        **extra,
    }


def agent_messages(agent: AgentProcess, flow_run_id: str) -> list[str]:
    return [
        str(r.get("message", ""))
        for r in agent.records()
        if r.get("flow_run_id") == flow_run_id and r.get("logger") == "agent.supervisor"
    ]


def queued(statuses: list[str], kind: str) -> list[tuple[int, int]]:
    """(queued, cap) pairs from STATUS lines such as `...; 52/5000 events queued`."""
    pattern = re.compile(rf"(\d+)/(\d+) {re.escape(kind)} queued")
    return [(int(m[1]), int(m[2])) for s in statuses for m in pattern.finditer(s)]


def count_events(api: Api, name: str, resource: str, since: datetime, until: datetime) -> int:
    body = {
        "filter": {
            "occurred": {"since": since.isoformat(), "until": until.isoformat()},
            "event": {"name": [name]},
            "resource": {"id": [resource]},
        },
        "limit": 1,
    }
    response = api.request("POST", "/events/filter", json=body)
    response.raise_for_status()
    return int(response.json()["total"])


def scheduled_at(when: datetime) -> dict[str, Any]:
    return {
        "type": "SCHEDULED",
        "name": "Scheduled",
        "state_details": {"scheduled_time": when.isoformat()},
    }


def test_api_outage(outage_server: PrefectServer, tmp_path: Path) -> None:
    began = time.monotonic()
    began_wall = datetime.now(UTC)
    server = outage_server
    flow_dir = tmp_path / "flows"
    flow_dir.mkdir()
    (flow_dir / "flows.py").write_text(FLOWS)
    gates = tmp_path / "gates"
    gates.mkdir()
    (gates / "open").touch()
    executions = tmp_path / "executions.log"
    executions.touch()
    notify = NotifyRecorder(tmp_path / "notify.sock")
    api = Api(server.api_url)
    agent = AgentProcess(
        tmp_path / "agent",
        api_url=server.api_url,
        python=server.python,
        deployments=[
            held_deployment("outage", flow_dir),
            held_deployment("outage-giveup", flow_dir, env={"PREFECT_CLIENT_MAX_RETRIES": "1"}),
        ],
        name=AGENT_NAME,
        agent={"limit": 6},
        env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)},
    )
    agent.start()
    try:
        assert agent.proc is not None
        pid = agent.proc.pid
        deployment = api.wait_deployment("outage-flow", "outage")
        giveup_deployment = api.wait_deployment("outage-flow", "outage-giveup")

        def params(gate: str, **extra: Any) -> dict[str, Any]:
            return {"out": str(executions), "gate": str(gates / gate), **extra}

        runs = {
            "crash": api.create_run(deployment, parameters=params("crash", exit_code=3)),
            "done": api.create_run(deployment, parameters=params("done")),
            "giveup": api.create_run(giveup_deployment, parameters=params("giveup")),
        }
        executing = set(runs.values())
        wait_for(
            lambda: (
                executing <= set(executions.read_text().split())
                and all(api.state(r).get("type") == "RUNNING" for r in executing)
            ),
            60,
            what="three runs executing",
        )
        # Due 20 s from now: during the outage, and beyond the agent's 5 s prefetch before it.
        due = datetime.now(UTC) + timedelta(seconds=20)
        for label in ("late-1", "late-2"):
            runs[label] = api.create_run(
                deployment, parameters=params("open"), state=scheduled_at(due)
            )
        run_label = {run_id: label for label, run_id in runs.items()}

        server.stop()
        t0 = time.monotonic()
        t0_wall = datetime.now(UTC)
        (gates / "crash").touch()
        (gates / "giveup").touch()

        # During the outage: the agent sees both exits and says the API is unreachable.
        for label in ("crash", "giveup"):

            def exited(label: str = label) -> bool:
                return any(
                    m.startswith("Process exited with status")
                    for m in agent_messages(agent, runs[label])
                )

            wait_for(
                exited,
                30,
                what=f"the agent to see {label} exit during the outage",
            )
        wait_for(
            lambda: any("API unreachable for" in s for s in notify.statuses(t0)),
            30,
            what="STATUS saying the API is unreachable",
        )
        wait_for(lambda: time.monotonic() >= t0 + 45, 50, interval=0.2, what="mid-outage")
        (gates / "done").touch()
        wait_for(lambda: time.monotonic() >= t0 + OUTAGE, 40, interval=0.2, what="outage end")
        assert agent.proc.poll() is None, f"the agent died:\n{agent.log_text()[-3000:]}"
        t1 = time.monotonic()
        server.start()
        t1_wall = datetime.now(UTC)
        back = time.monotonic()
        print(f"server down {t1 - t0:.1f}s; back and healthy after {back - t1:.1f}s")

        # After the outage: every run reaches its final state, the late ones run now.
        final = {label: api.wait_final(run_id, timeout=90) for label, run_id in runs.items()}
        recovered = time.monotonic()
        summary = {label: (s["type"], s.get("message")) for label, s in final.items()}
        print(f"final states {recovered - back:.1f}s after the API came back: {summary}")
        tail = agent.log_text()[-4000:]
        assert final["crash"]["type"] == "CRASHED", (summary, tail)
        assert "Process exited with status 3" in final["crash"]["message"], summary
        assert final["done"]["type"] == "COMPLETED", (summary, tail)
        assert final["giveup"]["type"] == "CRASHED", (summary, tail)
        assert "Process exited with status 1" in final["giveup"]["message"], summary
        for label in ("late-1", "late-2"):
            assert final[label]["type"] == "COMPLETED", (summary, tail)

        # Nothing launched twice: one PENDING, one RUNNING each; each body ran once.
        histories = {label: api.history(run_id) for label, run_id in runs.items()}
        for label, history in histories.items():
            types = [s["type"] for s in history]
            assert types.count("PENDING") == 1, (label, types)
            assert types.count("RUNNING") == 1, (label, types)
        lines = executions.read_text().split()
        assert sorted(lines) == sorted(runs.values()), [run_label.get(x, x) for x in lines]

        # The runs that fell due during the outage ran after it.
        for label in ("late-1", "late-2"):
            running = next(s for s in histories[label] if s["type"] == "RUNNING")
            started = datetime.fromisoformat(running["timestamp"])
            assert started > t1_wall, (label, started, t1_wall)

        # The agent's run messages from before and during the outage were delivered.
        for label in ("crash", "done", "giveup"):

            def messages_delivered(label: str = label) -> bool:
                return all(
                    any(needle in m for m in api.logs(runs[label]))
                    for needle in (
                        f"Claimed by runner-agent '{AGENT_NAME}'",
                        "Launched in process",
                        "Process exited with status",
                    )
                )

            wait_for(
                messages_delivered,
                60,
                what=f"the agent's messages for {label} in /logs/filter",
            )
        logs_delivered = time.monotonic()

        # Buffers drained: a STATUS after recovery with nothing queued.
        wait_for(
            lambda: any(
                "API ok" in s and "queued" not in s for s in notify.statuses(logs_delivered)
            ),
            30,
            what="a STATUS with the API ok and nothing queued",
        )

        # The watchdog was fed throughout; STATUS said what was going on.
        pings = notify.pings(t0, back)
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(pings)]
        max_gap = max(gaps)
        print(
            f"watchdog: {len(pings)} pings during the outage, max gap {max_gap:.3f}s "
            f"(WATCHDOG_USEC={WATCHDOG_USEC / 1e6:.0f}s, ping every {PING_EVERY:.1f}s)"
        )
        # Fed throughout: no gap (the stop and the restart included) reached the deadline.
        assert pings[0][0] - t0 < WATCHDOG_DEADLINE and back - pings[-1][0] < WATCHDOG_DEADLINE
        assert max_gap < WATCHDOG_DEADLINE, gaps
        outage_statuses = notify.statuses(t0, back)
        assert any(re.search(r"API unreachable for \d+s", s) for s in outage_statuses)
        events_queued = queued(outage_statuses, "events")
        assert events_queued, outage_statuses[-5:]
        peak = max(q for q, _ in events_queued)
        print(
            f"event buffer during the outage: peak {peak} queued "
            f"(cap {events_queued[0][1]}); last STATUS: {outage_statuses[-1]!r}"
        )
        assert all(q <= cap == EVENT_CAP for q, cap in events_queued), events_queued
        # Heartbeats kept coming: one queued per tick while the server was down (the STATUS of
        # a tick is sent before its heartbeat, and the last tick's STATUS may fall after t1).
        ticks_down = len(notify.pings(t0, t1))
        assert peak >= ticks_down - 2, (ticks_down, events_queued[-5:])
        assert queued(outage_statuses, "flow-run log messages"), outage_statuses[-5:]
        assert not any("dropped" in s for s in notify.statuses(0)), "nothing may be dropped"

        # Heartbeats produced during the outage reached the server: one agent heartbeat per
        # watchdog tick, and the `done` run's heartbeats while it ran.
        inner = [w for _, w in notify.pings(t0 + 2, t1 - 2)]
        since = datetime.fromtimestamp(inner[0], UTC) - timedelta(seconds=0.25)
        until = datetime.fromtimestamp(inner[-1], UTC) + timedelta(seconds=0.25)
        runner_resource = f"prefect.runner.{AGENT_NAME}"
        delivered = wait_for(
            lambda: (
                n
                if (n := count_events(api, "runner-agent.heartbeat", runner_resource, since, until))
                >= len(inner)
                else None
            ),
            60,
            what="the agent heartbeats from the outage on the server",
        )
        print(f"agent heartbeats during the outage: {len(inner)} ticks, {delivered} on the server")
        assert delivered == len(inner)

        # The `done` run's heartbeats are its engine's (Prefect 3.8.8 sends them itself, at
        # PREFECT_FLOWS_HEARTBEAT_FREQUENCY = max(30, heartbeat_interval)): the first one when it
        # began RUNNING, before the outage. The agent adds none at its own 5 s interval, so the
        # outage's 43 s hold at most the engine's two (those the engine could not deliver are
        # lost, as under Prefect's Runner).
        def done_beats(since: datetime, until: datetime) -> int:
            resource = f"prefect.flow-run.{runs['done']}"
            return count_events(api, "prefect.flow-run.heartbeat", resource, since, until)

        before_outage = done_beats(began_wall, t0_wall)
        during_outage = done_beats(t0_wall, t0_wall + timedelta(seconds=43))
        print(f"`done` heartbeats: {before_outage} before the outage, {during_outage} during it")
        assert before_outage >= 1
        assert during_outage <= 2

        assert agent.proc.pid == pid and agent.proc.poll() is None
        assert agent.stop() == 0
        shutdown = [
            r
            for r in agent.records()
            if str(r.get("message", "")).startswith("flow-run log messages:")
        ]
        assert shutdown and "0 dropped" in shutdown[-1]["message"], shutdown
        assert "0 not delivered" in shutdown[-1]["message"], shutdown
        print(f"{shutdown[-1]['message']}; test wall time {time.monotonic() - began:.0f}s")
    finally:
        agent.stop()
        kill_process_groups_under(tmp_path)
        notify.close()
        api.close()
