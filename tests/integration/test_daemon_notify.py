"""The real `runner-agent run` process speaks sd_notify: readiness, watchdog pings, STATUS,
reload and stop, observed on a real AF_UNIX datagram socket given as NOTIFY_SOCKET."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.agent_process import AgentProcess

pytestmark = pytest.mark.integration

# Bound on each wait for the agent: a hang guard. Under load the agent takes seconds to start,
# reload or stop, never a minute.
PATIENCE = 60.0


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, str]] = []
        self.cursor = 0  # messages before it were matched already

    def collect(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                return
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def wait_for(self, message: str, timeout: float) -> float:
        return self.wait_until(lambda line: line == message, timeout, repr(message))

    def wait_until(self, matches: Callable[[str], bool], timeout: float, what: str) -> float:
        """When the first message after the cursor that `matches` arrived; moves the cursor."""
        deadline = time.monotonic() + timeout
        while True:
            for index in range(self.cursor, len(self.messages)):
                at, line = self.messages[index]
                if matches(line):
                    self.cursor = index + 1
                    return at
            if time.monotonic() > deadline:
                break
            self.collect(0.2)
        raise AssertionError(f"no {what} within {timeout}s; got {self.messages[-10:]}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def test_ready_watchdog_status_reload_and_stop(
    prefect_server: Any, tmp_path: Path, notify: NotifySocket
) -> None:
    flows = tmp_path / "flows"
    flows.mkdir()
    agent = AgentProcess(
        tmp_path / "agent",
        api_url=prefect_server.api_url,
        python=prefect_server.python,
        deployments=[
            {"name": "idle", "flow_name": "notify-idle", "entrypoint": "f.py:f", "path": str(flows)}
        ],
        name="notify-test",
        env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"},
    )
    started = time.monotonic()
    agent.start()
    try:
        ready_at = notify.wait_for("READY=1", PATIENCE)
        print(f"READY=1 after {ready_at - started:.2f}s")
        # WATCHDOG_USEC=1s: a ping every 0.5 s. Their cadence is unit-tested on a fake clock
        # (tests/unit/test_notify.py); here they must keep coming, however busy the machine.
        for _ in range(4):
            notify.wait_for("WATCHDOG=1", PATIENCE)
        notify.wait_until(
            lambda line: line.startswith("STATUS=") and "/4 runs;" in line and "API ok" in line,
            PATIENCE,
            "STATUS with the runs and 'API ok'",
        )

        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1", PATIENCE)
        notify.wait_for("READY=1", PATIENCE)

        # A broken config on reload is refused; the agent keeps running on the old one.
        good = agent.config_path.read_text()
        broken = good.replace("limit = 4", "limit = 0")
        assert broken != good, good
        agent.config_path.write_text(broken)
        agent.proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1", PATIENCE)
        notify.wait_for("READY=1", PATIENCE)
        time.sleep(0.5)
        assert agent.proc.poll() is None
        assert "reload failed, keeping the running config" in agent.log_text()
        assert "agent.limit: must be >= 1, got 0" in agent.log_text()
        agent.config_path.write_text(good)

        stop_sent = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1", PATIENCE)
        assert agent.proc.wait(timeout=PATIENCE) == 0
        print(f"stopped {time.monotonic() - stop_sent:.2f}s after SIGTERM")
    finally:
        agent.stop()
