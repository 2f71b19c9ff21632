"""Install, run, upgrade and purge the .deb on a clean Debian 12 booted with systemd.

One container for the module, used in order: the README's install steps word for word -> a
flow run COMPLETED -> upgrade during a running flow -> purge. Each test states what it needs
from the previous one; a failure early makes the later ones fail on that state, which the
message names.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.agent_process import Api, render_config, wait_for
from tests.integration.prefect_server import PrefectServer
from tests.package.debbuild import build_deb, higher_version
from tests.package.guest import FLOWS, Guest, boot_guest
from tests.package.readme import install_steps

pytestmark = pytest.mark.system

DEB_DIR = "/srv/debs"
UPGRADE_DIR = "/srv/debs-upgrade"
FLOW_DIR = "/srv/flows"
# The operator's editor: it writes the test's config over the shipped agent.toml. Under /root,
# which the purge snapshot leaves out (it is the operator's, not the package's).
EDITOR = "/root/edit-agent-toml"
EDITED_CONFIG = "/root/agent.toml.edited"


@pytest.fixture(scope="module")
def upgrade_deb(built_deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tree rebuilt with a higher version, in a directory of its own (the README's
    `apt install ./runner-agent_*.deb` must find the first .deb alone)."""
    return build_deb(tmp_path_factory.mktemp("deb-upgrade"), version=higher_version(), nocheck=True)


@pytest.fixture(scope="module")
def guest(
    debian_root: Path,
    built_deb: Path,
    upgrade_deb: Path,
    prefect_server: PrefectServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Guest]:
    flows = tmp_path_factory.mktemp("pkg-flows")
    (flows / "flow.py").write_text(FLOWS)
    flows.chmod(0o755)
    with boot_guest(
        debian_root,
        binds={built_deb.parent: DEB_DIR, upgrade_deb.parent: UPGRADE_DIR, flows: FLOW_DIR},
        prefect_venv=Path(prefect_server.python).parent.parent,
    ) as booted:
        yield booted


@pytest.fixture(scope="module")
def clean_state(guest: Guest) -> tuple[set[str], set[str]]:
    """The container's files and packages before the install (for the purge test)."""
    return guest.snapshot(), guest.packages()


@pytest.fixture(scope="module")
def api(prefect_server: PrefectServer) -> Api:
    return Api(prefect_server.api_url)


def agent_config(prefect_server: PrefectServer) -> str:
    return render_config(
        {
            "api": {"url": prefect_server.api_url},
            "agent": {"name": "pkg-test", "poll_interval": "1s", "prefetch": "0s"},
            "flow_run": {"python": prefect_server.python},
        },
        [
            {
                "name": "pkg-hello",
                "flow_name": "pkg-hello",
                "entrypoint": "flow.py:hello",
                "path": FLOW_DIR,
            },
            {
                "name": "pkg-sleeper",
                "flow_name": "pkg-sleeper",
                "entrypoint": "flow.py:sleeper",
                "path": FLOW_DIR,
            },
        ],
    )


def main_pid(guest: Guest) -> int:
    return int(guest.sh("systemctl show -P MainPID runner-agent.service").strip())


def run_steps(guest: Guest, steps: tuple[str, ...]) -> str:
    """Each README step as written, from the .deb's directory, as root. The operator's answer
    to apt's "Do you want to continue?" is on stdin."""
    out = ""
    for step in steps:
        # The step on a line of its own: its trailing comment must not swallow anything.
        script = f"exec 2>&1\ncd {DEB_DIR} || exit 1\n{step}\n"
        out += guest.sh(script, env={"EDITOR": EDITOR}, input="Y\n")
    return out


def test_readme_install_steps_register_the_deployment_and_a_run_completes(
    guest: Guest,
    built_deb: Path,
    prefect_server: PrefectServer,
    api: Api,
    clean_state: tuple[set[str], set[str]],
) -> None:
    assert "/usr/bin/runner-agent" not in clean_state[0]
    steps = install_steps().host
    installs = [i for i, step in enumerate(steps) if step.startswith("apt install ./")]
    assert installs and installs[0] == 0, steps
    guest.write(EDITOR, f'#!/bin/sh\ncat {EDITED_CONFIG} > "$1"\n', mode=0o755)
    guest.write(EDITED_CONFIG, agent_config(prefect_server))

    out = run_steps(guest, steps[:1])
    assert "Setting up runner-agent" in out, out
    assert guest.sh("dpkg-query -W -f '${Status} ${Version}' runner-agent") == (
        f"install ok installed {built_deb.name.split('_')[1]}"
    )
    # Not started with the shipped config, and not enabled to start at boot with it.
    assert guest.active() == "inactive", guest.journal()
    assert guest.sh("systemctl is-enabled runner-agent.service || true").strip() == "disabled"
    assert guest.sh("getent passwd runner-agent | cut -d: -f6,7").strip() == (
        "/var/lib/runner-agent:/usr/sbin/nologin"
    )
    # postinst byte-compiled the venv, so root never writes stray byte-code into /usr/lib.
    assert guest.sh("ls /usr/lib/runner-agent/lib/python3.11/site-packages/agent/__pycache__")

    run_steps(guest, steps[1:])
    assert guest.active() == "active", guest.journal()
    assert guest.sh("systemctl is-enabled runner-agent.service").strip() == "enabled"
    deployment = api.wait_deployment("pkg-hello", "pkg-hello", timeout=60)
    run_id = api.create_run(deployment)
    state = api.wait_final(run_id, timeout=180)
    assert state["type"] == "COMPLETED", (state, guest.journal())


def test_reload_keeps_the_agent_process(guest: Guest) -> None:
    # SIGHUP through ExecReload (/bin/kill from procps) works on a minimal system.
    pid = main_pid(guest)
    guest.systemctl("reload", "runner-agent.service")
    assert main_pid(guest) == pid
    assert guest.active() == "active", guest.journal()


def test_upgrade_restarts_the_agent_without_killing_a_running_flow(
    guest: Guest, api: Api, upgrade_deb: Path
) -> None:
    deployment = api.wait_deployment("pkg-sleeper", "pkg-sleeper", timeout=60)
    # Long enough to outlast the upgrade (unpack, byte-compile, restart) with a wide margin.
    run_id = api.create_run(deployment, parameters={"seconds": 90})
    wait_for(lambda: api.state(run_id).get("type") == "RUNNING", 120, what="the sleeper to run")
    scope = f"runner-agent-run-{run_id}.scope"
    scope_pid = guest.sh(f"systemctl show -P MainPID {scope} || true").strip()
    before = main_pid(guest)

    # The README's steps edited agent.toml, a conffile: if the new package ships a changed one,
    # dpkg asks; keep the operator's, as an unattended upgrade does.
    out = guest.sh(
        "apt-get install -y -o Dpkg::Options::=--force-confold "
        f"{UPGRADE_DIR}/{upgrade_deb.name} 2>&1"
    )
    assert "Unpacking runner-agent" in out and "Setting up runner-agent" in out, out

    new_version = upgrade_deb.name.split("_")[1]
    assert guest.sh("runner-agent version").splitlines()[0] == f"runner-agent {new_version}"
    assert guest.active() == "active", guest.journal()
    assert main_pid(guest) not in (0, before), "the upgrade did not restart the agent"
    # The run's scope lived through the restart, and the adopted run finishes normally.
    assert guest.active(scope) == "active", guest.journal(scope)
    if scope_pid not in ("", "0"):
        assert guest.sh(f"systemctl show -P MainPID {scope}").strip() == scope_pid
    state = api.wait_final(run_id, timeout=240)
    assert state["type"] == "COMPLETED", (state, guest.journal())


def test_purge_leaves_no_files_user_or_units(
    guest: Guest, clean_state: tuple[set[str], set[str]]
) -> None:
    files_before, packages_before = clean_state
    # Nothing may still run in the slice (a flow would keep its unit loaded).
    wait_for(
        lambda: not guest.sh("systemctl list-units --plain --no-legend 'runner-agent-run-*'"),
        60,
        what="flow scopes to finish",
    )
    out = guest.sh("apt-get purge -y runner-agent 2>&1")
    assert "Purging configuration files for runner-agent" in out, out
    assert "not empty so not removed" not in out, out
    # The dependencies apt installed with it (procps on minbase) go as an admin would remove
    # them; then every path the install, the runs, the upgrade and the purge left is a leftover.
    guest.sh("apt-get autoremove --purge -y 2>&1")
    assert guest.packages() == packages_before
    assert sorted(guest.snapshot() - files_before) == []
    assert guest.sh("ls -d /run/runner-agent 2>/dev/null || true").strip() == ""
    assert guest.sh("getent passwd runner-agent || true").strip() == ""
    assert guest.sh("getent group runner-agent || true").strip() == ""
    assert guest.sh("systemctl list-unit-files --no-legend 'runner-agent*' || true").strip() == ""
    # runner-agent-flows.slice nests in runner-agent.slice and runner.slice (dashes).
    units = guest.sh(
        "systemctl list-units --all --plain --no-legend 'runner-agent*' runner.slice || true"
    )
    assert units.strip() == ""
    assert "no packages found" in guest.sh("dpkg-query -W runner-agent 2>&1 || true")
