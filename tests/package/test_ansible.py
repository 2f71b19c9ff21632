"""The Ansible role, run with `ansible-playbook -c local` inside a clean Debian 12 container.

The role's own example playbook (packaging/ansible/playbook.yml, with `serial:`) runs against an
inventory of one host, `localhost`, with a local connection. First run: converges. Second run:
changed=0. Third run, with one more deployment in the vars: the agent is reloaded (not restarted)
and the new deployment appears in the Prefect server.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.agent_process import Api
from tests.integration.prefect_server import PrefectServer
from tests.package.debbuild import REPO
from tests.package.guest import FLOWS, Guest, boot_guest

pytestmark = pytest.mark.system

DEB_DIR = "/debs"
FLOW_DIR = "/srv/flows"
ANSIBLE_DIR = "/ansible"
WORK = "/root/ansible-test"


@pytest.fixture(scope="module")
def guest(
    debian_root: Path,
    built_deb: Path,
    prefect_server: PrefectServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Guest]:
    flows = tmp_path_factory.mktemp("ansible-flows")
    (flows / "flow.py").write_text(FLOWS)
    flows.chmod(0o755)
    with boot_guest(
        debian_root,
        binds={built_deb.parent: DEB_DIR, flows: FLOW_DIR, REPO / "packaging/ansible": ANSIBLE_DIR},
        prefect_venv=Path(prefect_server.python).parent.parent,
    ) as booted:
        booted.sh(
            "export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && "
            "apt-get install -y -qq --no-install-recommends ansible-core >/dev/null",
            timeout=900,
        )
        booted.sh(f"mkdir -p {WORK}")
        booted.write(
            f"{WORK}/inventory.ini", "[runner_agents]\nlocalhost ansible_connection=local\n"
        )
        yield booted


def vars_yaml(prefect_server: PrefectServer, deb: str, deployments: list[str]) -> str:
    items = "".join(
        f"  - {{name: {name}, flow_name: {name}, entrypoint: 'flow.py:hello', path: {FLOW_DIR}}}\n"
        for name in deployments
    )
    return (
        f"runner_agent_deb: {DEB_DIR}/{deb}\n"
        f"runner_agent_api_url: {prefect_server.api_url}\n"
        # The open-source server ignores the key; the role must still install it properly.
        "runner_agent_api_key: test-key-not-secret\n"
        "runner_agent_name: ansible-test\n"
        "runner_agent_limit: 2\n"
        f"runner_agent_flow_run: {{python: {prefect_server.python}}}\n"
        "runner_agent_agent: {poll_interval: 2s}\n"
        f"runner_agent_deployments:\n{items}"
    )


def play(guest: Guest, vars_text: str) -> tuple[dict[str, int], str]:
    """Run the example playbook; return the recap of localhost and the whole output."""
    guest.write(f"{WORK}/vars.yml", vars_text)
    out = guest.sh(
        f"cd {ANSIBLE_DIR} && ANSIBLE_FORCE_COLOR=0 ANSIBLE_NOCOLOR=1 "
        f"ansible-playbook -i {WORK}/inventory.ini -e @{WORK}/vars.yml playbook.yml 2>&1",
        timeout=900,
    )
    match = re.search(r"^localhost\s+:\s+(.*)$", out, re.MULTILINE)
    assert match, out
    recap = {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", match.group(1))}
    return recap, out


def main_pid(guest: Guest) -> int:
    return int(guest.sh("systemctl show -P MainPID runner-agent.service").strip())


def test_role_converges_is_idempotent_and_reloads_on_a_new_deployment(
    guest: Guest, built_deb: Path, prefect_server: PrefectServer
) -> None:
    api = Api(prefect_server.api_url)

    recap, out = play(guest, vars_yaml(prefect_server, built_deb.name, ["ansible-one"]))
    assert recap["failed"] == 0 and recap["unreachable"] == 0, out
    assert recap["changed"] > 0, out
    assert guest.sh("systemctl is-active runner-agent.service").strip() == "active"
    assert guest.sh("systemctl is-enabled runner-agent.service").strip() == "enabled"
    assert guest.sh("stat -c '%a %U %G' /etc/runner-agent/api-key").strip() == (
        "640 root runner-agent"
    )
    api.wait_deployment("ansible-one", "ansible-one", timeout=60)

    recap, out = play(guest, vars_yaml(prefect_server, built_deb.name, ["ansible-one"]))
    assert recap["failed"] == 0, out
    assert recap["changed"] == 0, out

    pid = main_pid(guest)
    recap, out = play(
        guest, vars_yaml(prefect_server, built_deb.name, ["ansible-one", "ansible-two"])
    )
    assert recap["failed"] == 0 and recap["changed"] > 0, out
    assert "RUNNING HANDLER [runner_agent : Reload runner-agent]" in out, out
    assert "RUNNING HANDLER [runner_agent : Restart runner-agent]" not in out, out
    api.wait_deployment("ansible-two", "ansible-two", timeout=60)
    assert main_pid(guest) == pid, "a config change must reload the agent, not restart it"
    assert guest.sh("systemctl is-active runner-agent.service").strip() == "active"


def test_a_config_that_fails_check_config_is_not_installed(
    guest: Guest, built_deb: Path, prefect_server: PrefectServer
) -> None:
    before = guest.sh("cat /etc/runner-agent/agent.toml")
    bad = vars_yaml(prefect_server, built_deb.name, ["ansible-one", "ansible-two"]).replace(
        "runner_agent_limit: 2", "runner_agent_limit: 0"
    )
    guest.write(f"{WORK}/vars.yml", bad)
    proc_out = guest.sh(
        f"cd {ANSIBLE_DIR} && ANSIBLE_NOCOLOR=1 ansible-playbook -i {WORK}/inventory.ini "
        f"-e @{WORK}/vars.yml playbook.yml 2>&1; echo rc=$?",
        timeout=900,
    )
    assert "rc=0" not in proc_out, proc_out
    assert "agent.limit" in proc_out, proc_out
    assert guest.sh("cat /etc/runner-agent/agent.toml") == before
    assert guest.sh("systemctl is-active runner-agent.service").strip() == "active"
