"""Security of the real agent as the real `runner-agent.service` (issue 9, "Security").

One container, one agent config and one phase of real runs serve the whole module (the
`observed` fixture): the API key comes from the unit's credential (`/etc/credstore`), one git
deployment pulls with a token from a loopback `git http-backend` that refuses requests without
it, and flows run as root and as another user (`ra-flow`, with a supplementary group). While the
runs execute, a sampler on the host reads the command line of every process (and the environment
of every process in the container) every few milliseconds; meanwhile and afterwards the test
collects everything else an operator or another local user could see: `systemctl show` of every
unit involved, the journal, the agent's logs (journal and Prefect), `runner-agent status`,
`runner-agent logs`, `check-config`, and every file under the state and runtime directories.
The tests then assert on what was observed, each naming where a secret was found.

The secrets are random per session and searched for as is and in the encodings that carry them
on the wire (base64 at every alignment, so also inside `Basic base64(x-access-token:<token>)`,
base64url and hex).

The one place the API key is expected: the environment of a run's own processes (the engine
needs PREFECT_API_KEY; `/proc/<pid>/environ` is readable by root and the process's own user
only). With engine "warm" not even there: a warm run's W and E show their template's
environment, which holds no run's data (the key is in E's os.environ, its memory); the module
runs once per engine. The git token is expected in no process's environment at all: git's
askpass helper reads it from the token file.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.integration.agent_process import Api, render_config
from tests.integration.engines import argv_engine, launches
from tests.integration.gitserver import GitHttpServer, make_bare_repo
from tests.integration.prefect_server import PrefectServer
from tests.system.conftest import REPO
from tests.system.test_agent_service import STOP_SCOPES, Bed, container_time
from tests.system.testbed import CACHE, Container, install_agent, install_units

SERVICE = "runner-agent.service"
SLICE = "runner-agent-flows.slice"
CONFIG = "/etc/runner-agent/agent.toml"
KEY_CREDENTIAL = "/etc/credstore/runner-agent.api-key"  # the unit's LoadCredential=api-key:...
TOKEN_FILE = "/etc/runner-agent/git-token"
STATE = "/var/lib/runner-agent"
RUNTIME = "/run/runner-agent"
FLOW_USER, FLOW_UID, EXTRA_GROUP, EXTRA_GID = "ra-flow", 4201, "ra-extra", 4202
RELEASE = "/var/tmp/ra-security-release"  # the runs end once it exists

FLOWS = textwrap.dedent(
    """
    import os, time
    from prefect import flow

    @flow
    def probe(release: str, timeout: float = 120.0):
        # Fails the run when its private TMPDIR is unusable (Python would fall back to /tmp).
        with open(os.path.join(os.environ["TMPDIR"], "probe"), "w") as handle:
            handle.write("ok")
        print(f"ids={os.getresuid()} {os.getresgid()} groups={sorted(os.getgroups())}"
              f" cwd={os.getcwd()}", flush=True)
        deadline = time.monotonic() + timeout
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.2)  # runs until the test has seen everything it wants to see
    """
)


# -- secrets and where they were found ----------------------------------------------------------


@dataclass(frozen=True)
class Secret:
    name: str
    value: str

    def forms(self) -> dict[bytes, str]:
        """The value as is and the byte strings any base64/hex encoding of it must contain."""
        raw = self.value.encode()
        found = {raw: "as is", raw.hex().encode(): "hex"}
        for pad in (b"", b"x", b"xx"):  # the three alignments inside a longer base64 text
            data = pad + raw
            for label, encode in (
                ("base64", base64.b64encode),
                ("base64url", base64.urlsafe_b64encode),
            ):
                text = encode(data)
                # Skip the group shared with the padding and any group shared with what follows.
                found.setdefault(text[4 if pad else 0 : (len(data) // 3) * 4], label)
        return found


def hits(data: bytes | str, where: str, secrets_: list[Secret]) -> list[str]:
    """Every occurrence of a secret (in any form) in `data`, with its context, for the report."""
    blob = data.encode(errors="replace") if isinstance(data, str) else data
    found = []
    for secret in secrets_:
        for needle, form in secret.forms().items():
            at = blob.find(needle)
            if at >= 0:
                context = blob[max(0, at - 80) : at + len(needle) + 40].decode(errors="replace")
                found.append(f"{secret.name} ({form}) in {where}: ...{context!r}...")
    return found


def exec_bytes(c: Container, args: list[str], timeout: float = 120) -> bytes:
    """Like Container.exec, but stdout as bytes (the journal's export format is binary)."""
    argv = [
        "nsenter",
        "-t",
        str(c.leader),
        "-a",
        "--",
        "env",
        "-i",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        *args,
    ]
    return subprocess.run(
        argv, capture_output=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
    ).stdout


class ProcessSampler(threading.Thread):
    """Reads /proc/<pid>/cmdline of every process on the host (the container's included) and
    /proc/<pid>/environ of every process in the container, until stopped.

    `cmdline_hits` must stay empty; `environ_hits` lists (where, cgroup, cmdline) for the test to
    judge; `seen` keeps every distinct command line, and `in_runs` those of the processes in the
    runs' scopes, to prove the scan saw what it had to.
    """

    def __init__(self, secrets_: list[Secret], container: str, ignore_pids: set[int]) -> None:
        super().__init__(daemon=True)
        self.secrets = secrets_
        self.container = container
        self.ignore = ignore_pids
        self.stop_event = threading.Event()
        self.cmdline_hits: list[str] = []
        self.environ_hits: list[tuple[str, str, str]] = []
        self.seen: set[str] = set()
        self.in_runs: set[str] = set()
        self.passes = 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit() and int(entry.name) not in self.ignore:
                    self._sample(entry.name)
            self.passes += 1
            time.sleep(0.005)

    def _sample(self, pid: str) -> None:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            cgroup = Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            return  # gone meanwhile
        if self.container not in cgroup:
            self.cmdline_hits += hits(cmdline, f"cmdline of host pid {pid}", self.secrets)
            return
        shown = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
        if len(self.seen) < 20000:
            self.seen.add(shown[:300])
        if "/runner-agent-run-" in cgroup and len(self.in_runs) < 20000:
            self.in_runs.add(shown[:300])
        self.cmdline_hits += hits(cmdline, f"cmdline of pid {pid} ({shown[:120]!r})", self.secrets)
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return
        for hit in hits(environ, f"environ of pid {pid}", self.secrets):
            unit = next(
                (line.split(":", 2)[2] for line in cgroup.splitlines() if ":name=systemd:" in line),
                "?",
            )
            entry = (hit.split(":", 1)[0], unit, shown[:300])
            if entry not in self.environ_hits:
                self.environ_hits.append(entry)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)


# -- the bed ------------------------------------------------------------------------------------


@dataclass
class SecurityBed:
    bed: Bed
    key: Secret
    token: Secret
    git: GitHttpServer

    @property
    def c(self) -> Container:
        return self.bed.c

    @property
    def secrets(self) -> list[Secret]:
        return [self.key, self.token]

    @property
    def engine(self) -> str:
        return self.bed.engine


def deployments(flows: Path, git_url: str) -> list[dict[str, Any]]:
    git = {"url": git_url, "branch": "main", "token_file": TOKEN_FILE, "pull_interval": "0s"}
    user_env = {"PREFECT_HOME": f"/var/tmp/ra-prefect-{FLOW_USER}"}
    return [
        {
            "name": "local",
            "flow_name": "sec-local",
            "entrypoint": "flows.py:probe",
            "path": str(flows),
        },
        {
            "name": "local-user",
            "flow_name": "sec-local-user",
            "entrypoint": "flows.py:probe",
            "path": str(flows),
            "user": FLOW_USER,
            "env": user_env,
        },
        {"name": "git", "flow_name": "sec-git", "entrypoint": "flows.py:probe", "git": git},
        {
            "name": "git-user",
            "flow_name": "sec-git-user",
            "entrypoint": "flows.py:probe",
            "git": git,
            "user": FLOW_USER,
            "env": user_env,
        },
    ]


def add_flow_user(c: Container) -> None:
    """A user with its own primary group and one supplementary group."""
    c.sh(
        f"echo '{FLOW_USER}:x:{FLOW_UID}:{FLOW_UID}::/nonexistent:/usr/sbin/nologin'"
        f" >> /etc/passwd && echo '{FLOW_USER}:x:{FLOW_UID}:' >> /etc/group"
        f" && echo '{EXTRA_GROUP}:x:{EXTRA_GID}:{FLOW_USER}' >> /etc/group"
    )


@pytest.fixture(scope="module")
def sec(
    host_container: Container,
    prefect_server: PrefectServer,
    tmp_path_factory: pytest.TempPathFactory,
    engine: str,
) -> Iterator[SecurityBed]:
    """The bed, once per engine: every test of this module runs with each."""
    c = host_container
    key = Secret("API key", f"ra-apikey-{secrets.token_hex(20)}")
    token = Secret("git token", f"ra-gittoken-{secrets.token_hex(20)}")
    repos = tmp_path_factory.mktemp("security-git") / "repos"
    repos.mkdir()
    make_bare_repo(repos, "flows.git", {"flows.py": FLOWS})
    flows = Path(tempfile.mkdtemp(prefix="system-security-flows-", dir=CACHE))
    api = Api(prefect_server.api_url)
    try:
        flows.chmod(0o755)
        (flows / "flows.py").write_text(FLOWS)
        # Each git request waits a little, so the sampler sees git's processes at work.
        with GitHttpServer(repos, token=token.value, delay=0.3) as git:
            add_flow_user(c)
            install_units(c, REPO)
            install_agent(c, Path(sys.prefix))  # pytest runs from the agent venv
            c.write_file(KEY_CREDENTIAL, key.value + "\n", 0o400)
            c.write_file(TOKEN_FILE, token.value + "\n", 0o600)
            config = render_config(
                {
                    "api": {"url": prefect_server.api_url, "timeout": "10s"},
                    "agent": {
                        "name": "security-test",
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
                        "runtime_max": "10m",
                        "env": {"PREFECT_HOME": "/var/tmp/ra-prefect-root"},
                        "engine": engine,
                    },
                },
                deployments(flows, git.url("flows.git")),
            )
            c.write_file(CONFIG, config, 0o600)
            c.systemctl("start", SERVICE)
            ids = {
                d["name"]: api.wait_deployment(d["flow_name"], d["name"])
                for d in deployments(flows, git.url("flows.git"))
            }
            bed = Bed(c, api, ids, engine)
            bed.wait_warm()  # warm runs only once the template is ready (else they start cold)
            yield SecurityBed(bed, key, token, git)
    finally:
        c.systemctl("stop", SERVICE, check=False)
        c.exec(["sh", "-c", f"systemctl stop {STOP_SCOPES}; systemctl reset-failed"], check=False)
        c.exec(
            [
                "rm",
                "-rf",
                "/etc/runner-agent",
                "/etc/credstore",
                RELEASE,
                "/etc/systemd/system/runner-agent.service",
                f"/etc/systemd/system/{SLICE}",
                STATE,
                RUNTIME,
                "/usr/bin/runner-agent",
            ],
            check=False,
        )
        c.systemctl("daemon-reload", check=False)
        api.close()
        shutil.rmtree(flows, ignore_errors=True)


# -- one phase of runs, observed ----------------------------------------------------------------


@dataclass
class Observed:
    runs: dict[str, str]  # deployment -> flow run id
    final: dict[str, dict[str, Any]] = field(default_factory=dict)
    sampler: ProcessSampler | None = None
    texts: dict[str, bytes] = field(default_factory=dict)  # where -> what an operator sees
    modes: list[tuple[str, str, str, str, str]] = field(default_factory=list)  # mode u g type path
    # deployment -> (command line, /proc/<pid>/status) of every process in the run's scope
    processes: dict[str, list[tuple[str, dict[str, str]]]] = field(default_factory=dict)
    output: dict[str, str] = field(default_factory=dict)  # deployment -> the flow's output
    # deployment -> the pid its `<run_dir>/pid` record names (the sh wrapper, or a warm W)
    pid_records: dict[str, int] = field(default_factory=dict)


def show_all(c: Container, unit: str) -> bytes:
    return exec_bytes(c, ["systemctl", "show", "--all", "--no-pager", unit])


def scope_processes(bed: Bed, unit: str) -> list[tuple[str, dict[str, str]]]:
    found = [bed.process(pid) for pid in bed.scope_pids(unit)]
    return [(cmdline, status) for cmdline, status in found if cmdline]  # not ended meanwhile


def wait_all_running(bed: Bed, runs: dict[str, str], since: str) -> dict[str, str]:
    """Until every run is RUNNING in its active scope; fails with the states and the journal."""
    deadline = time.monotonic() + 120
    states: dict[str, Any] = {}
    while time.monotonic() < deadline:
        states = {name: bed.api.state(run_id) for name, run_id in runs.items()}
        if all(s.get("type") == "RUNNING" for s in states.values()):
            return {name: bed.wait_running(run_id, 10) for name, run_id in runs.items()}
        if any(
            s.get("type") in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
            for s in states.values()
        ):
            break
        time.sleep(0.3)
    journal = bed.c.journal(None, "--since", since, "-o", "short-precise", "-n", "300")
    raise AssertionError(f"not all runs are RUNNING: {json.dumps(states, indent=1)}\n{journal}")


@pytest.fixture(scope="module")
def observed(sec: SecurityBed) -> Observed:
    bed, c = sec.bed, sec.c
    since = container_time(c)
    # A canary proves the sampler finds what it looks for: its basic-auth form in an argv, and
    # itself in an environment.
    canary = Secret("canary", f"ra-canary-{secrets.token_hex(20)}")
    sampler = ProcessSampler([*sec.secrets, canary], c.name, ignore_pids={os.getpid()})
    sampler.start()
    seen = Observed({}, sampler=sampler)
    try:
        seen.runs = {name: bed.run(name, release=RELEASE) for name in bed.ids}
        units = wait_all_running(bed, seen.runs, since)
        basic = base64.b64encode(f"x-access-token:{canary.value}".encode()).decode()
        c.exec(
            [
                "systemd-run",
                "--quiet",
                "--collect",
                "--unit=ra-canary.service",
                f"--setenv=RA_CANARY={canary.value}",
                "--",
                "sh",
                "-c",
                "sleep 2",
                basic,
            ]
        )
        # While every run executes: modes, the engines' identities, files, units, status.
        listing = c.exec(["find", STATE, RUNTIME, "-printf", r"%m %u %g %y %p\n"]).stdout
        seen.modes = [tuple(line.split(" ", 4)) for line in listing.splitlines()]  # type: ignore[misc]
        seen.processes = {name: scope_processes(bed, unit) for name, unit in units.items()}
        seen.pid_records = {
            name: int(c.read_file(f"{RUNTIME}/runs/{run_id}/pid"))
            for name, run_id in seen.runs.items()
        }
        # Not what flows write into their own TMPDIR (their bytecode cache is most of it).
        seen.texts["files under the state and runtime directories"] = exec_bytes(
            c, ["tar", "-cf", "-", f"--exclude={STATE}/runs/*/tmp/*", STATE, RUNTIME]
        )
        for unit in [SERVICE, SLICE, "runner-agent.slice", "runner.slice", *units.values()]:
            seen.texts[f"systemctl show {unit}"] = show_all(c, unit)
        seen.texts["systemctl show (the manager)"] = exec_bytes(c, ["systemctl", "show", "--all"])
        seen.texts["systemctl show-environment"] = exec_bytes(c, ["systemctl", "show-environment"])
        seen.texts["systemctl status"] = exec_bytes(
            c,
            [
                "systemctl",
                "status",
                "--full",
                "--no-pager",
                "-n",
                "200",
                SERVICE,
                SLICE,
                *units.values(),
            ],
        )
        seen.texts["runner-agent status"] = exec_bytes(c, ["runner-agent", "status"])
        seen.texts["runner-agent status --json"] = exec_bytes(
            c, ["runner-agent", "status", "--json"]
        )
        c.exec(["touch", RELEASE])
        seen.final = {
            name: bed.api.wait_final(run_id, timeout=90) for name, run_id in seen.runs.items()
        }
    finally:
        sampler.stop()
        c.exec(["touch", RELEASE], check=False)
    # After the runs: the journal (everything in it, every field), the agent's logs, the flows'
    # output and what the agent told Prefect.
    c.exec(["journalctl", "--sync"], check=False)
    seen.texts["the journal (journalctl -o export)"] = exec_bytes(
        c, ["journalctl", "--no-pager", "-o", "export"]
    )
    seen.texts["the agent's journal (-u runner-agent -o json)"] = exec_bytes(
        c, ["journalctl", "--no-pager", "-o", "json", "-u", SERVICE]
    )
    for name, run_id in seen.runs.items():
        output = exec_bytes(c, ["runner-agent", "logs", run_id])
        seen.output[name] = output.decode(errors="replace")
        seen.texts[f"runner-agent logs {run_id}"] = output
        seen.texts[f"Prefect logs of run {run_id}"] = json.dumps(bed.api.logs(run_id)).encode()
        seen.texts[f"Prefect states of run {run_id}"] = json.dumps(bed.api.history(run_id)).encode()
    return seen


# -- 1. no secret anywhere ----------------------------------------------------------------------


def test_runs_completed_with_code_from_git_behind_the_token(
    sec: SecurityBed, observed: Observed
) -> None:
    for name, state in observed.final.items():
        assert state["type"] == "COMPLETED", (name, state, observed.output.get(name))
        assert launches(sec.bed.api, observed.runs[name]) == [sec.engine], name
    # The git server refused anonymous requests and served the agent's authenticated ones.
    log = sec.git.requests()
    assert any(line.endswith(" 401") for line in log), log
    assert sec.git.fetches("flows.git") >= 2, log


def test_no_secret_in_any_command_line_during_the_runs(
    sec: SecurityBed, observed: Observed
) -> None:
    sampler = observed.sampler
    assert sampler is not None
    print(
        f"sampler: {sampler.passes} passes over /proc, {len(sampler.seen)} distinct command "
        f"lines in the container"
    )
    # The scan saw what it had to see: git talking to the server, and the engines (in the runs'
    # scopes, with the argv of the configured engine: a warm one shows its template's).
    assert any("git" in line and "fetch" in line for line in sampler.seen), sorted(sampler.seen)
    assert any("remote-http" in line for line in sampler.seen), sorted(sampler.seen)
    assert any(argv_engine(line) == sec.engine for line in sampler.in_runs), sorted(sampler.in_runs)
    canaries = [hit for hit in sampler.cmdline_hits if hit.startswith("canary ")]
    assert any(
        hit.startswith("canary (base64) in cmdline of pid") and "sh -c sleep 2" in hit
        for hit in canaries
    ), canaries
    leaks = [hit for hit in sampler.cmdline_hits if not hit.startswith("canary ")]
    assert not leaks, "\n".join(leaks)


def test_only_the_runs_own_processes_hold_the_api_key_in_their_environment(
    sec: SecurityBed, observed: Observed
) -> None:
    sampler = observed.sampler
    assert sampler is not None
    run_scope = re.compile(r"/runner-agent-run-[0-9a-f-]{36}\.scope$")
    launching = re.compile(r"^(/usr/bin/setpriv .*)?systemd-run .*--unit=runner-agent-run-")
    pid_of = re.compile(r" environ of pid (\d+)$")

    def becomes_a_run(unit: str, cmdline: str) -> bool:
        return bool(run_scope.search(unit) or launching.match(cmdline))

    # A sample can catch the launching process inside execve, its argv not readable yet (empty
    # cmdline); it is allowed when the same pid is seen as systemd-run or inside the run's scope.
    # The canary's service proves the scan reads environments (checked below).
    canaries = [hit for hit in sampler.environ_hits if hit[0].startswith("canary ")]
    found = [hit for hit in sampler.environ_hits if not hit[0].startswith("canary ")]
    run_pids = {
        match.group(1)
        for what, unit, cmdline in found
        if becomes_a_run(unit, cmdline) and (match := pid_of.search(what))
    }
    unexpected = [
        (what, unit, cmdline)
        for what, unit, cmdline in found
        if not (
            what.startswith(f"{sec.key.name} (as is)")
            and (
                becomes_a_run(unit, cmdline)
                or (
                    cmdline == ""
                    and (match := pid_of.search(what)) is not None
                    and match.group(1) in run_pids
                )
            )
        )
    ]
    print("environments holding a secret:\n" + "\n".join(map(str, sampler.environ_hits)))
    assert not unexpected, "\n".join(map(str, unexpected))
    assert any(
        what.startswith("canary (as is) in environ of pid") and "sleep 2" in cmdline
        for what, _u, cmdline in canaries
    ), canaries
    if sec.engine == "cold":
        # The cold engines do hold it, where they were seen.
        assert any("prefect.engine" in cmdline for _w, _u, cmdline in found), found
    else:
        # A warm engine has it in its memory only: its /proc/<pid>/environ (and W's) is the
        # template's, which never saw a run. So no process at all shows it.
        assert not found, found


def test_no_secret_in_units_journal_logs_status_or_files(
    sec: SecurityBed, observed: Observed
) -> None:
    found = []
    for where, data in observed.texts.items():
        if where.startswith("files under"):
            found += file_hits(data, sec.secrets)
        else:
            found += hits(data, where, sec.secrets)
    sizes = {where: len(data) for where, data in observed.texts.items()}
    print(f"scanned: {json.dumps(sizes, indent=1)}")
    assert not found, "\n".join(found)
    # Sanity: the scanned texts are the real ones.
    assert b"ControlGroup=" in observed.texts[f"systemctl show {SERVICE}"]
    assert b"LoadCredential" in observed.texts[f"systemctl show {SERVICE}"]
    assert b"Launched in" in observed.texts["the agent's journal (-u runner-agent -o json)"]


def file_hits(tar: bytes, secrets_: list[Secret]) -> list[str]:
    found = []
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        for member in archive:
            handle = archive.extractfile(member) if member.isfile() else None
            data = handle.read() if handle is not None else b""
            found += hits(member.name.encode() + b"\n" + data, f"/{member.name}", secrets_)
    return found


# -- 2. check-config ----------------------------------------------------------------------------


def test_check_config_never_shows_a_secret(sec: SecurityBed) -> None:
    """However the key reaches check-config, and also when a secret's value is invalid."""
    c = sec.c
    dropin = "/etc/runner-agent/agent.d/90-key.toml"
    bad = "/etc/runner-agent-bad/agent.toml"
    credential = [
        "systemd-run",
        "--quiet",
        "--wait",
        "--pipe",
        "--collect",
        "-p",
        "LoadCredential=api-key:runner-agent.api-key",
        "--",
    ]
    outputs: dict[str, subprocess.CompletedProcess[str]] = {}

    def run(label: str, *argv: str) -> None:
        outputs[label] = c.exec(list(argv), check=False)

    run("plain", "runner-agent", "check-config")
    run("the unit's credential", *credential, "/usr/bin/runner-agent", "check-config", "--json")
    run(
        "the unit's credential, --online",
        *credential,
        "/usr/bin/runner-agent",
        "check-config",
        "--online",
    )
    run(
        "PREFECT_API_KEY",
        "sh",
        "-c",
        f"PREFECT_API_KEY=$(cat {KEY_CREDENTIAL}) exec runner-agent check-config",
    )
    run(
        "api.key_file",
        "sh",
        "-c",
        f"RUNNER_AGENT_API__KEY_FILE={KEY_CREDENTIAL} exec runner-agent check-config --json",
    )
    c.sh(
        f"mkdir -p {Path(dropin).parent} && printf '[api]\\nkey = \"%s\"\\n' "
        f'"$(cat {KEY_CREDENTIAL})" > {dropin} && chmod 0600 {dropin}'
    )
    try:
        run("api.key in a drop-in", "runner-agent", "check-config")
    finally:
        c.exec(["rm", "-rf", str(Path(dropin).parent)])
    # Invalid values: the one error line must not echo them.
    invalid = {
        "api.key of the wrong type": f'[api]\nkey = ["{sec.key.value}"]\n',
        "api.url with credentials and a bad port": f'[api]\nurl = "http://u:{sec.key.value}@127.0.0.1:99999/api"\n',
        "a git URL with a token and a bad scheme": (
            '[[deployment]]\nname = "x"\nentrypoint = "a.py:f"\n'
            f'git = {{ url = "htps://u:{sec.token.value}@127.0.0.1/x.git" }}\n'
        ),
    }
    for label, text in invalid.items():
        c.write_file(bad, text, 0o600)
        run(label, "runner-agent", "check-config", "--config", bad)
    c.exec(["rm", "-rf", str(Path(bad).parent)])

    found = []
    for label, result in outputs.items():
        print(
            f"--- check-config, {label}: exit {result.returncode}\n{result.stdout}{result.stderr}"
        )
        found += hits(result.stdout + result.stderr, f"check-config ({label})", sec.secrets)
    assert not found, "\n".join(found)
    for label in (
        "plain",
        "the unit's credential",
        "the unit's credential, --online",
        "PREFECT_API_KEY",
        "api.key_file",
        "api.key in a drop-in",
    ):
        assert outputs[label].returncode == 0, (label, outputs[label].stderr)
    # The key was found (and redacted) each time it was given.
    for label in ("PREFECT_API_KEY", "api.key in a drop-in"):
        assert 'key = "**********"' in outputs[label].stdout, outputs[label].stdout
    for label, source in (
        ("the unit's credential", "systemd credential 'api-key'"),
        ("api.key_file", f"{KEY_CREDENTIAL} (api.key_file)"),
    ):
        document = json.loads(outputs[label].stdout)
        assert document["secret_sources"]["api.key"] == source, document
        assert document["config"]["api"]["key"] == "**********", document
    assert "accepted the credentials" in outputs["the unit's credential, --online"].stderr
    for label in invalid:
        result = outputs[label]
        assert result.returncode == 78 and result.stdout == "", (label, result)
        assert len(result.stderr.strip().splitlines()) == 1, (label, result.stderr)


# -- 3. modes of the state and runtime directories ----------------------------------------------


COMMIT = re.compile(r"^/var/lib/runner-agent/storage/(?P<dep>[^/]+)/[0-9a-f]{40}(/|$)")
# The git-user deployment's storage directory: its FLOW/NAME key, quoted.
GIT_USER_DIR = "sec-git-user%2Fgit-user"
RUN_TMP = re.compile(r"^/var/lib/runner-agent/runs/[0-9a-f-]{36}/tmp(?P<below>/.*)?$")


def test_state_and_runtime_files_are_the_agents_alone(observed: Observed) -> None:
    """0700 directories and 0600 files, owned by root (the agent's user), with two documented
    exceptions for flows that run as another user: search permission (0711, never list or
    write) on the directories that lead to such a run's TMPDIR and git checkout, and the
    checkout itself (0755, the flow's code). Checked as modes, and as what another local user
    can actually read."""
    entries = {
        path: (int(mode, 8), user, group, kind) for mode, user, group, kind, path in observed.modes
    }
    print(
        "\n".join(
            f"{m:04o} {u}:{g} {k} {p}"
            for p, (m, u, g, k) in sorted(entries.items())
            if not ((tmp := RUN_TMP.match(p)) and tmp["below"]) and "/.repo/" not in p
        )
    )
    assert entries[STATE][0] in (0o700, 0o711) and entries[RUNTIME][0] == 0o700, entries
    user_tmps = [
        p
        for p, (_m, u, _g, k) in entries.items()
        if k == "d" and (tmp := RUN_TMP.match(p)) and not tmp["below"] and u == FLOW_USER
    ]
    user_code = [
        p
        for p in entries
        if (m := COMMIT.match(p)) and m["dep"] == GIT_USER_DIR and p.count("/") == 6
    ]
    runs = [p for p in entries if re.fullmatch(rf"{RUNTIME}/runs/[0-9a-f-]{{36}}", p)]
    records = [p for p in entries if p.endswith("/record.json")]
    assert len(runs) == 4 and len(records) == 4, (runs, records)  # every run was seen
    assert len(user_tmps) == 2 and len(user_code) == 1, (user_tmps, user_code)
    granted = {
        str(parent)
        for path in [*user_tmps, *user_code]
        for parent in Path(path).parents
        if str(parent).startswith(STATE)
    }

    problems = []
    for path, (mode, user, group, kind) in sorted(entries.items()):
        tmp = RUN_TMP.match(path)
        if tmp and tmp["below"]:
            continue  # what the flow itself wrote into its TMPDIR
        where = f"{mode:04o} {user}:{group} {path}"
        if mode & 0o022:
            problems.append(f"writable by others: {where}")
        if tmp:
            expected_owner = FLOW_USER if path in user_tmps else "root"
            if (mode, user) != (0o700, expected_owner):
                problems.append(f"a TMPDIR must be 0700 and its run's user's: {where}")
            continue
        if user != "root" or group != "root":
            problems.append(f"not the agent's: {where}")
        if COMMIT.match(path):
            if path.count("/") == 6 and mode != 0o755:
                problems.append(f"a commit directory must be 0755: {where}")
            continue
        name = path.rsplit("/", 1)[1]
        if kind == "d":
            allowed = (0o700, 0o711) if path in granted else (0o700,)
            if mode not in allowed:
                problems.append(
                    f"directory must be {' or '.join(f'{a:04o}' for a in allowed)}: {where}"
                )
        elif name in ("pid", "exit-status"):
            # Written by the wrapper under the flows' umask, in a 0700 directory of root's.
            parent = entries[str(Path(path).parent)]
            if mode & 0o033 or parent[:2] != (0o700, "root"):
                problems.append(f"wrapper record: {where} in {parent}")
        elif mode & 0o077:
            problems.append(f"file must be 0600 (0700 for a program, 0400 for git): {where}")
    assert not problems, "\n".join(problems)

    # What a local user (neither root nor the flows' user) can read: only the flows' code.
    def reachable(path: str) -> bool:
        return all(entries[str(p)][0] & 0o001 for p in Path(path).parents if str(p) in entries)

    readable = [p for p, (m, _u, _g, _k) in entries.items() if m & 0o004 and reachable(p)]
    outside = [
        p for p in readable if not ((code := COMMIT.match(p)) and code["dep"] == GIT_USER_DIR)
    ]
    assert not outside, outside
    assert user_code[0] in readable


# -- 4. flows as another user -------------------------------------------------------------------


def test_flows_run_as_the_configured_user_with_exactly_its_groups(
    sec: SecurityBed, observed: Observed
) -> None:
    """Real, effective, saved and file-system uid and gid are the user's, the supplementary
    groups exactly its own, no capability is left; only the wrapper (a warm run's W) stays the
    agent's."""
    for name in ("local-user", "git-user", "local", "git"):
        processes = observed.processes[name]
        print(
            f"{name}: "
            + "; ".join(
                f"{cmd[:60]!r} Pid={st['Pid']} PPid={st['PPid']} Uid={st['Uid']} "
                f"Gid={st['Gid']} Groups={st['Groups']!r} CapEff={st['CapEff']}"
                for cmd, st in processes
            )
        )
        # The wrapper is the process the run's pid record names; the engine is its child. A
        # warm run's W and E both show the template's argv: who is whose parent tells them apart.
        wrappers = [st for _cmd, st in processes if int(st["Pid"]) == observed.pid_records[name]]
        engines = [st for _cmd, st in processes if wrappers and st["PPid"] == wrappers[0]["Pid"]]
        assert len(engines) == 1 and len(wrappers) == 1 and len(processes) == 2, processes
        [wrapper_cmd] = [cmd for cmd, st in processes if st is wrappers[0]]
        [engine_cmd] = [cmd for cmd, st in processes if st is engines[0]]
        if sec.engine == "cold":
            assert wrapper_cmd.startswith("/bin/sh -c "), processes
            assert " -m prefect.engine" in engine_cmd, processes
            assert not engine_cmd.startswith("/bin/sh"), processes
        else:
            assert argv_engine(wrapper_cmd) == argv_engine(engine_cmd) == "warm", processes
        engine, wrapper = engines[0], wrappers[0]
        if name.endswith("-user"):
            assert engine["Uid"].split() == [str(FLOW_UID)] * 4, engine
            assert engine["Gid"].split() == [str(FLOW_UID)] * 4, engine
            assert sorted(engine["Groups"].split()) == [str(FLOW_UID), str(EXTRA_GID)], engine
            for caps in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
                assert int(engine[caps], 16) == 0, (caps, engine)
            assert engine["NoNewPrivs"] == "1", engine
            # The wrapper, which records the exit status in the agent's run directory.
            assert wrapper["Uid"].split() == ["0"] * 4, wrapper
            expected = (
                f"ids=({FLOW_UID}, {FLOW_UID}, {FLOW_UID}) ({FLOW_UID}, {FLOW_UID},"
                f" {FLOW_UID}) groups=[{FLOW_UID}, {EXTRA_GID}]"
            )
        else:
            assert engine["Uid"].split() == ["0"] * 4, engine
            expected = "ids=(0, 0, 0) (0, 0, 0) groups="
        assert expected in observed.output[name], observed.output[name]
