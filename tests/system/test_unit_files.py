"""systemd/runner-agent.service and runner-agent-flows.slice, installed into a booted systemd 252.

The agent daemon is replaced by a tiny Type=notify stand-in at /usr/bin/runner-agent (the
container's /usr is a throw-away overlay), so the unit file is tested exactly as shipped: its
hardening must still let the service create scopes in the slice, also for another user.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import agent
from tests.system.conftest import REPO
from tests.system.testbed import Container, install_agent, install_units

UNITS = ("runner-agent.service", "runner-agent-flows.slice")
FLOW_SCOPE = "runner-agent-run-standin.scope"
USER_SCOPE = "runner-agent-run-standin-user.scope"

# Does what the agent does with systemd: READY=1 with a status, watchdog pings, SIGHUP reload,
# a flow-run scope in the slice (one as root, one as another user) that outlives the agent.
STANDIN = r"""#!/usr/bin/python3
import json, os, signal, socket, subprocess, sys, time

def notify(message):
    address = os.environ["NOTIFY_SOCKET"]
    address = "\0" + address[1:] if address.startswith("@") else address
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())

reloads = 0
def on_hup(signum, frame):
    global reloads
    reloads += 1
    notify("RELOADING=1")
    notify(f"READY=1\nSTATUS=stand-in reloaded {reloads}")
signal.signal(signal.SIGHUP, on_hup)
signal.signal(signal.SIGTERM, lambda *args: sys.exit(0))

run = "/run/runner-agent"
report = {"argv": sys.argv[1:], "pid": os.getpid()}
with open("/proc/self/status") as status:
    report["no_new_privs"] = [l.split()[1] for l in status if l.startswith("NoNewPrivs")][0]
credentials = os.environ.get("CREDENTIALS_DIRECTORY")
report["api_key"] = (open(f"{credentials}/api-key").read().strip()
                     if credentials and os.path.exists(f"{credentials}/api-key") else None)
if subprocess.run(["systemctl", "is-active", "--quiet", "FLOW_SCOPE"]).returncode != 0:
    subprocess.Popen(
        ["systemd-run", "--quiet", "--scope", "--unit=FLOW_SCOPE",
         "--slice=runner-agent-flows.slice", "-p", "MemoryMax=64M", "-p", "TasksMax=16",
         "--", "sh", "-c", f"echo $$ > {run}/flow.pid; exec sleep 600"],
        stdin=subprocess.DEVNULL, start_new_session=True)
user = subprocess.run(
    ["systemd-run", "--quiet", "--scope", "--unit=USER_SCOPE", "--uid=nobody",
     "--slice=runner-agent-flows.slice", "--", "id", "-u"],
    capture_output=True, text=True)
report["user_scope"] = [user.returncode, user.stdout.strip(), user.stderr.strip()]
with open(f"{run}/standin.json", "w") as out:
    json.dump(report, out)
notify("READY=1\nSTATUS=stand-in ready")
while True:
    notify("WATCHDOG=1")
    time.sleep(5)
""".replace("FLOW_SCOPE", FLOW_SCOPE).replace("USER_SCOPE", USER_SCOPE)


@pytest.fixture(scope="module")
def installed(host_container: Container) -> Iterator[Container]:
    """The shipped units in /etc/systemd/system, the stand-in as /usr/bin/runner-agent."""
    c = host_container
    c.write_file("/usr/bin/runner-agent", STANDIN, 0o755)
    # Documentation=man:runner-agent(8) is checked by systemd-analyze verify; the package ships it.
    # (The volatile root's /etc is nearly empty; man needs its config from the host.)
    c.write_file("/usr/share/man/man8/runner-agent.8", (REPO / "debian/runner-agent.8").read_text())
    c.copy_in(Path("/etc/manpath.config"), "/etc/manpath.config")
    install_units(c, REPO)
    try:
        yield c
    finally:
        c.systemctl("stop", "runner-agent.service", FLOW_SCOPE, check=False)
        c.exec(
            [
                "rm",
                "-rf",
                "/etc/systemd/system/runner-agent.service",
                "/etc/systemd/system/runner-agent-flows.slice",
                "/etc/systemd/system/runner-agent-flows.slice.d",
                "/etc/credstore",
                "/usr/bin/runner-agent",
                "/usr/share/man/man8/runner-agent.8",
                "/etc/manpath.config",
                "/run/runner-agent",
            ]
        )
        c.systemctl("daemon-reload", check=False)


def report(c: Container) -> dict[str, object]:
    result: dict[str, object] = json.loads(c.read_file("/run/runner-agent/standin.json"))
    return result


def test_systemd_analyze_verify_is_clean(installed: Container) -> None:
    result = installed.exec(
        ["systemd-analyze", "verify", *(f"/etc/systemd/system/{u}" for u in UNITS)], check=False
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), result.stderr


def test_service_with_its_hardening_creates_scopes_in_the_slice(installed: Container) -> None:
    c = installed
    c.exec(["rm", "-f", "/run/runner-agent/standin.json"])
    c.systemctl("restart", "runner-agent.service")  # returns only after READY=1
    service = c.show(
        "runner-agent.service",
        "ActiveState",
        "StatusText",
        "ProtectSystem",
        "NoNewPrivileges",
        "SystemCallFilter",
    )
    assert service["ActiveState"] == "active"
    assert service["StatusText"] == "stand-in ready"
    assert (service["ProtectSystem"], service["NoNewPrivileges"]) == ("full", "yes")
    assert service["SystemCallFilter"].startswith("~"), service  # a deny list is in force
    seen = report(c)
    assert seen["argv"] == ["run"]
    assert seen["no_new_privs"] == "1"  # the hardening really applies to the agent
    # A scope as another user (systemd-run --uid) works from inside the hardened service.
    assert seen["user_scope"] == [0, "65534", ""], seen
    flow = c.show(FLOW_SCOPE, "ActiveState", "Slice", "ControlGroup", "MemoryMax", "TasksMax")
    assert flow["ActiveState"] == "active"
    assert flow["Slice"] == "runner-agent-flows.slice"
    assert flow["ControlGroup"].endswith(f"/runner-agent-flows.slice/{FLOW_SCOPE}")
    assert (flow["MemoryMax"], flow["TasksMax"]) == (str(64 << 20), "16")
    limit = c.cgroup_dir("memory", flow["ControlGroup"]) / "memory.limit_in_bytes"
    assert int(limit.read_text()) == 64 << 20
    # Why the hardening is chosen with care: a scope's process is forked by the agent and keeps
    # its sandbox (docs/systemd.md). The flow runs with NoNewPrivs and the seccomp filter too.
    c.wait_for(
        lambda: c.exec(["test", "-s", "/run/runner-agent/flow.pid"], check=False).returncode == 0,
        10,
        "flow.pid",
    )
    flow_pid = c.read_file("/run/runner-agent/flow.pid").strip()
    status = c.read_file(f"/proc/{flow_pid}/status")
    assert "NoNewPrivs:\t1" in status and "Seccomp:\t2" in status, status


def test_reload_sends_sighup_and_stays_active(installed: Container) -> None:
    c = installed
    c.systemctl("restart", "runner-agent.service")
    c.systemctl("reload", "runner-agent.service")
    c.wait_for(
        lambda: c.show("runner-agent.service", "StatusText")["StatusText"] == "stand-in reloaded 1",
        10,
        "the reload status",
    )
    assert c.show("runner-agent.service", "ActiveState")["ActiveState"] == "active"


def test_stop_and_restart_leave_the_flow_scope_and_its_records_alone(
    installed: Container,
) -> None:
    c = installed
    c.systemctl("start", "runner-agent.service")
    c.wait_for(
        lambda: c.show(FLOW_SCOPE, "ActiveState")["ActiveState"] == "active",
        10,
        f"{FLOW_SCOPE} active",
    )
    flow_pid = c.read_file("/run/runner-agent/flow.pid").strip()
    started = time.monotonic()
    c.systemctl("stop", "runner-agent.service")
    # A hang guard: a clean stop takes about a second, one that hits TimeoutStopSec=30 takes 30 s.
    assert time.monotonic() - started < 25
    assert c.show("runner-agent.service", "ActiveState")["ActiveState"] == "inactive"
    # The run goes on, and /run/runner-agent (RuntimeDirectoryPreserve=yes) keeps its record.
    assert c.show(FLOW_SCOPE, "ActiveState")["ActiveState"] == "active"
    assert c.show("runner-agent-flows.slice", "ActiveState")["ActiveState"] == "active"
    assert c.read_file("/run/runner-agent/flow.pid").strip() == flow_pid
    assert c.exec(["kill", "-0", flow_pid], check=False).returncode == 0
    c.systemctl("restart", "runner-agent.service")
    assert c.show(FLOW_SCOPE, "ActiveState")["ActiveState"] == "active"
    assert c.exec(["kill", "-0", flow_pid], check=False).returncode == 0


def test_api_key_credential_is_optional_and_loaded_from_the_credstore(
    installed: Container,
) -> None:
    c = installed
    c.exec(["rm", "-rf", "/etc/credstore"])
    c.systemctl("restart", "runner-agent.service")  # no credential: still starts
    assert report(c)["api_key"] is None
    c.write_file("/etc/credstore/runner-agent.api-key", "pnu_from_credstore\n", 0o400)
    c.systemctl("restart", "runner-agent.service")
    assert report(c)["api_key"] == "pnu_from_credstore"
    # The operator's other choice: a drop-in naming a path (then the file is required).
    c.write_file("/etc/runner-agent/api-key", "pnu_from_path\n", 0o600)
    c.write_file(
        "/etc/systemd/system/runner-agent.service.d/key.conf",
        "[Service]\nLoadCredential=api-key:/etc/runner-agent/api-key\n",
    )
    try:
        c.systemctl("daemon-reload")
        c.systemctl("restart", "runner-agent.service")
        assert report(c)["api_key"] == "pnu_from_path"
    finally:
        c.exec(["rm", "-rf", "/etc/systemd/system/runner-agent.service.d", "/etc/runner-agent"])
        c.systemctl("daemon-reload")


def test_slice_carries_aggregate_limits_tunable_by_drop_in(installed: Container) -> None:
    c = installed
    c.systemctl("start", "runner-agent-flows.slice")
    mem_total = int(c.read_file("/proc/meminfo").split("MemTotal:")[1].split()[0]) * 1024
    props = c.show(
        "runner-agent-flows.slice",
        "MemoryMax",
        "TasksMax",
        "CPUWeight",
        "CPUQuotaPerSecUSec",
        "ControlGroup",
    )
    assert 0.79 * mem_total <= int(props["MemoryMax"]) <= 0.81 * mem_total, props
    assert (props["TasksMax"], props["CPUWeight"]) == ("8192", "50")
    assert props["CPUQuotaPerSecUSec"] == "infinity"
    group = props["ControlGroup"]
    assert int((c.cgroup_dir("memory", group) / "memory.limit_in_bytes").read_text()) == int(
        props["MemoryMax"]
    )
    assert (c.cgroup_dir("pids", group) / "pids.max").read_text().strip() == "8192"
    c.write_file(
        "/etc/systemd/system/runner-agent-flows.slice.d/limits.conf",
        "[Slice]\nCPUQuota=150%\nTasksMax=512\n",
    )
    try:
        c.systemctl("daemon-reload")
        tuned = c.show("runner-agent-flows.slice", "CPUQuotaPerSecUSec", "TasksMax")
        assert tuned == {"CPUQuotaPerSecUSec": "1.500000s", "TasksMax": "512"}
        quota = c.cgroup_dir("cpu", group) / "cpu.cfs_quota_us"
        assert quota.read_text().strip() == "150000"
    finally:
        c.exec(["rm", "-rf", "/etc/systemd/system/runner-agent-flows.slice.d"])
        c.systemctl("daemon-reload")


def test_the_working_tree_agent_runs_inside(installed: Container) -> None:
    """install_agent: what the agent's own system tests start from."""
    c = installed
    install_agent(c, Path(sys.prefix))  # pytest runs from the agent venv
    try:
        result = c.exec(["runner-agent", "version"], check=False)
        assert result.returncode == 0, result
        assert result.stdout.splitlines()[0] == f"runner-agent {agent.__version__}", result
    finally:
        c.write_file("/usr/bin/runner-agent", STANDIN, 0o755)
