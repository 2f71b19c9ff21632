"""Security fixes, each with real files, real modes and owners (as root) and real processes:

- the config file, its drop-ins and every directory above them: nobody but root and the
  agent's own user may be able to change them (exit 78, one line naming the file and the mode);
- a config error never echoes a secret or a URL's credentials;
- the state and runtime directories and what the agent creates there are 0700/0600, with a
  pass-through (0711) only on the way to a flow's TMPDIR and code when it runs as another user;
- git's repositories are private, commit directories readable;
- with `user`, only the engine becomes the user (uid, gid, groups), the wrapper stays root;
- the log redactor also catches a secret in base64 (an `Authorization: Basic` header).

The system test (tests/system/test_security.py) proves the same against the real service.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import pwd
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pytest

from agent.gitstorage import PRIVATE_REPOSITORY, Git, make_dirs, publish
from agent.launch.base import LaunchRequest
from agent.launch.systemd import systemd_run_argv
from agent.launch.wrapper import privilege_drop
from agent.logs import configure_logging
from agent.redaction import REDACTED
from agent.settings import ConfigError, Settings, load_settings
from agent.storage import Storage
from agent.workspace import Workspaces, allow_pass_through, private_dirs

ROOT = os.geteuid() == 0
as_root = pytest.mark.skipif(not ROOT, reason="chown and other users need root")
NOBODY, NOGROUP = 65534, 65534
SECRET = "ra-s3cret-value-0123456789"
TAIL = "only root and the agent's user may write it"
RUN_ID = UUID("5b0e2c1a-3f44-4d8e-9a7b-0c1d2e3f4a5b")


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def write(path: Path, text: str = "", mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    text = str(caught.value)
    assert "\n" not in text
    return text


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    """A config directory as /etc/runner-agent is: root's, 0755."""
    directory = tmp_path / "etc" / "runner-agent"
    directory.mkdir(parents=True)
    directory.chmod(0o755)
    return directory


# -- the config file and what is above it ----------------------------------------------------


@as_root
@pytest.mark.parametrize(
    ("mode", "owner", "group", "problem"),
    [
        (0o664, 0, NOGROUP, "file is writable by group 'nogroup' (mode 0664)"),
        (0o666, 0, 0, "file is writable by everyone (mode 0666)"),
        (0o602, 0, 0, "file is writable by everyone (mode 0602)"),
        (0o644, NOBODY, 0, "file is owned by user 'nobody' (mode 0644)"),
        (0o600, NOBODY, NOGROUP, "file is owned by user 'nobody' (mode 0600)"),
    ],
)
@pytest.mark.parametrize("which", ["main", "drop-in"])
def test_a_config_file_others_can_change_is_refused(
    confdir: Path, which: str, mode: int, owner: int, group: int, problem: str
) -> None:
    main = write(confdir / "agent.toml")
    target = main if which == "main" else write(confdir / "agent.d" / "50-x.toml")
    target.chmod(mode)
    os.chown(target, owner, group)
    assert error_of(main) == f"{target}: {problem}; {TAIL}"


@as_root
def test_group_writable_by_root_or_our_own_group_is_fine(confdir: Path) -> None:
    main = write(confdir / "agent.toml", mode=0o664)
    load_settings(main, {})
    (confdir / "agent.d").mkdir(mode=0o775)
    os.chown(confdir / "agent.d", 0, os.getegid())
    load_settings(main, {})


@as_root
@pytest.mark.parametrize(
    ("mode", "owner", "group", "problem"),
    [
        (0o777, 0, 0, "is writable by everyone (mode 0777)"),
        (0o775, 0, NOGROUP, "is writable by group 'nogroup' (mode 0775)"),
        (0o755, NOBODY, 0, "is owned by user 'nobody' (mode 0755)"),
        (0o1777, NOBODY, 0, "is owned by user 'nobody' (mode 1777)"),
    ],
)
def test_a_directory_above_the_file_that_others_can_change_is_refused(
    confdir: Path, mode: int, owner: int, group: int, problem: str
) -> None:
    main = write(confdir / "agent.toml")
    for directory in (confdir, confdir.parent):  # the file's own directory, then one above
        directory.chmod(mode)
        os.chown(directory, owner, group)
        assert error_of(main) == f"{main}: directory {directory} {problem}; {TAIL}"
        directory.chmod(0o755)
        os.chown(directory, 0, 0)
    load_settings(main, {})


@as_root
def test_a_sticky_directory_like_tmp_is_fine_above_a_safe_one(confdir: Path) -> None:
    # Nobody can rename or remove another user's entry in a sticky directory.
    confdir.parent.chmod(0o1777)
    load_settings(write(confdir / "agent.toml"), {})
    assert (Path("/tmp").stat().st_mode & 0o1777) == 0o1777  # the case of every pytest tmp_path


@as_root
def test_a_symlinked_config_is_checked_where_it_really_lives(confdir: Path, tmp_path: Path) -> None:
    real = write(tmp_path / "shared" / "conf" / "agent.toml")
    (confdir / "agent.toml").symlink_to(real)
    load_settings(confdir / "agent.toml", {})
    real.parent.chmod(0o777)
    assert error_of(confdir / "agent.toml") == (
        f"{confdir / 'agent.toml'}: directory {real.parent} is writable by everyone "
        f"(mode 0777); {TAIL}"
    )


def test_a_fifo_in_place_of_the_config_is_refused_without_hanging(confdir: Path) -> None:
    os.mkfifo(confdir / "agent.toml", 0o600)
    assert error_of(confdir / "agent.toml") == f"{confdir / 'agent.toml'}: not a regular file"


@as_root
def test_check_config_refuses_a_writable_config_directory_in_one_line(confdir: Path) -> None:
    main = write(confdir / "agent.toml", "[agent]\nlimit = 2\n")
    ok = subprocess.run(
        [sys.executable, "-m", "agent", "check-config", "--config", str(main)],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"]},
        check=False,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    confdir.chmod(0o777)
    refused = subprocess.run(
        [sys.executable, "-m", "agent", "check-config", "--config", str(main)],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"]},
        check=False,
        timeout=60,
    )
    assert refused.returncode == 78
    assert refused.stdout == ""
    assert refused.stderr == (
        f"runner-agent: {main}: directory {confdir} is writable by everyone (mode 0777); {TAIL}\n"
    )


# -- config errors never echo a secret ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f'[api]\nkey = ["{SECRET}"]\n', "api.key: expected a string"),
        (f'[api]\nauth_string = {{ a = "{SECRET}" }}\n', "api.auth_string: expected a string"),
        (
            f'[api]\nurl = "http://admin:{SECRET}@127.0.0.1:99999/api"\n',
            "api.url: not a URL: 'http://***@127.0.0.1:99999/api'",
        ),
        (
            f'[api]\nurl = "ftp://admin:{SECRET}@host/api"\n',
            "api.url: not an http(s) URL: 'ftp://***@host/api'",
        ),
        (
            '[[deployment]]\nname = "x"\nentrypoint = "a.py:f"\n'
            f'git = {{ url = "htps://u:{SECRET}/x@host/r.git" }}\n',
            "deployment[x].git.url: unsupported git URL scheme 'htps' in 'htps://***@host/r.git'",
        ),
    ],
)
def test_a_config_error_never_shows_a_secret(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path / "agent.toml", text)
    message = error_of(path)
    assert SECRET not in message
    assert message.startswith(f"{path}: {expected}"), message


# -- the redactor --------------------------------------------------------------------------------


def test_the_redactor_also_removes_a_secret_in_base64() -> None:
    stream = io.StringIO()
    setup = configure_logging("info", environ={}, stream=stream)
    try:
        setup.set_secrets(["admin:" + SECRET])
        header = "Basic " + base64.b64encode(f"admin:{SECRET}".encode()).decode()
        logging.getLogger("agent.test").info("sent Authorization: %s", header)
    finally:
        logging.getLogger().handlers.clear()
    line = stream.getvalue()
    assert SECRET not in line and header.split()[1] not in line
    assert f"Authorization: Basic {REDACTED}" in line, line


# -- the state and runtime directories -------------------------------------------------------


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    state, runtime = tmp_path / "state", tmp_path / "run"
    state.mkdir(mode=0o700)
    runtime.mkdir(mode=0o700)
    yield state, runtime


def settings_for(state: Path, runtime: Path, flows: Path, user: str = "") -> Settings:
    config = state.parent / "agent.toml"
    write(
        config,
        f'[agent]\nstate_dir = "{state}"\nruntime_dir = "{runtime}"\n'
        f'[flow_run]\nuser = "{user}"\n'
        f'[[deployment]]\nname = "d"\nentrypoint = "f.py:f"\npath = "{flows}"\n',
    )
    return load_settings(config, {})


async def prepare(state: Path, runtime: Path, user: str = "") -> tuple[Workspaces, Path, Path]:
    settings = settings_for(state, runtime, state.parent, user)
    workspaces = Workspaces(lambda: settings, Storage(state))
    ws = await workspaces.prepare(
        RUN_ID,
        settings.deployments[0],
        settings.deployments[0].flow_run_settings(settings.flow_run),
        lambda message, level: None,
    )
    return workspaces, ws.tmpdir, ws.run_dir


async def test_a_runs_directories_are_private_also_below_a_umask_made_one(
    dirs: tuple[Path, Path],
) -> None:
    state, runtime = dirs
    (state / "runs" / str(RUN_ID)).mkdir(parents=True, mode=0o755)  # as a 022 umask makes it
    (state / "runs").chmod(0o755)
    _ws, tmpdir, run_dir = await prepare(state, runtime)
    for path in (
        state,
        state / "runs",
        state / "runs" / str(RUN_ID),
        tmpdir,
        runtime,
        runtime / "runs",
        run_dir,
    ):
        assert (mode_of(path), path.stat().st_uid) == (0o700, os.geteuid()), path


@pytest.fixture
def open_dirs() -> Iterator[tuple[Path, Path]]:
    """As `dirs`, under /tmp in a 0755 directory: pytest's tmp_path is below a 0700 one."""
    base = Path(tempfile.mkdtemp(prefix="ra-sec-"))
    try:
        base.chmod(0o755)
        (base / "state").mkdir(mode=0o700)
        (base / "run").mkdir(mode=0o700)
        yield base / "state", base / "run"
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)


def as_nobody(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--",
            "sh",
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


@as_root
async def test_a_run_as_another_user_gets_only_a_way_through(open_dirs: tuple[Path, Path]) -> None:
    state, runtime = open_dirs
    workspaces, tmpdir, run_dir = await prepare(state, runtime, user="nobody")
    assert (mode_of(tmpdir), tmpdir.stat().st_uid, tmpdir.stat().st_gid) == (0o700, NOBODY, NOGROUP)
    for path in (state, state / "runs", tmpdir.parent):
        assert mode_of(path) == 0o711, path  # pass through, never list or write
    # The run directory stays the agent's: the wrapper (root) writes the exit status there.
    for path in (runtime, runtime / "runs", run_dir):
        assert (mode_of(path), path.stat().st_uid) == (0o700, 0), path
    # The user can really write its TMPDIR by name, and cannot list what is above it.
    probe = as_nobody(
        f"echo ok > {tmpdir}/probe && cat {tmpdir}/probe; ls {state}/runs; ls {run_dir}"
    )
    assert probe.stdout == "ok\n", probe
    assert probe.stderr.count("Permission denied") == 2, probe.stderr
    # systemd resets the state directory to 0700 at every start; adoption gives the way back.
    state.chmod(0o700)
    workspaces.adopt(RUN_ID, None)
    assert mode_of(state) == 0o711


def test_pass_through_and_private_dirs_touch_nothing_outside_the_top(tmp_path: Path) -> None:
    top = tmp_path / "state"
    private_dirs(top, top / "a" / "b")
    assert [mode_of(p) for p in (top, top / "a", top / "a" / "b")] == [0o700] * 3
    outside = tmp_path / "elsewhere" / "code"
    outside.mkdir(parents=True, mode=0o700)
    (tmp_path / "elsewhere").chmod(0o700)
    allow_pass_through(top, outside)
    assert mode_of(tmp_path / "elsewhere") == 0o700
    allow_pass_through(top, top / "a" / "b" / "c")
    assert [mode_of(p) for p in (top, top / "a", top / "a" / "b")] == [0o711] * 3
    private_dirs(top, top / "a" / "b")  # a grant (x only) is kept; a 0755 would not be
    assert [mode_of(p) for p in (top, top / "a", top / "a" / "b")] == [0o711] * 3


# -- git storage -------------------------------------------------------------------------------


def test_storage_directories_are_private_and_commit_directories_readable(tmp_path: Path) -> None:
    make_dirs(tmp_path / "storage" / "d")
    assert mode_of(tmp_path / "storage") == mode_of(tmp_path / "storage" / "d") == 0o700
    (tmp_path / "storage").chmod(0o755)  # an older agent's
    (tmp_path / "storage" / "d").chmod(0o711)  # a pass-through grant
    make_dirs(tmp_path / "storage")
    make_dirs(tmp_path / "storage" / "d")
    assert mode_of(tmp_path / "storage") == 0o700
    assert mode_of(tmp_path / "storage" / "d") == 0o711
    for name, mode in ((".repo", 0o700), ("a" * 40, 0o755)):
        build = Path(tempfile.mkdtemp(dir=tmp_path / "storage" / "d"))
        publish(build, tmp_path / "storage" / "d" / name)
        assert mode_of(tmp_path / "storage" / "d" / name) == mode, name


def source_repository(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    env = {
        "PATH": os.environ["PATH"],
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "HOME": str(tmp_path),
    }
    subprocess.run(["git", "init", "-q", "-b", "main", str(source)], check=True, env=env)
    (source / "f.py").write_text("x = 1\n")
    subprocess.run(["git", "-C", str(source), "add", "."], check=True, env=env)
    subprocess.run(["git", "-C", str(source), "commit", "-qm", "x"], check=True, env=env)
    return source


async def test_git_keeps_its_repositories_private_whatever_the_umask(tmp_path: Path) -> None:
    source = source_repository(tmp_path)
    old = os.umask(0o022)
    try:
        git = Git("git", {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}, timeout=60)
        repo = tmp_path / "repo"
        await git.run(["init", "--quiet", "--bare", str(repo)])
        await git.run(
            [
                "--git-dir",
                str(repo),
                "fetch",
                "--quiet",
                "--no-write-fetch-head",
                str(source),
                "+refs/heads/main:refs/heads/main",
            ]
        )
    finally:
        os.umask(old)
    modes = {p: mode_of(p) for p in [repo, *repo.rglob("*")]}
    loose = {
        p: m for p, m in modes.items() if (p.is_dir() and m != 0o700) or (p.is_file() and m & 0o077)
    }
    assert not loose, loose
    assert PRIVATE_REPOSITORY["GIT_CONFIG_VALUE_0"] == "0600"


# -- a flow as another user --------------------------------------------------------------------


def request(tmp: Path, user: str, python: str) -> LaunchRequest:
    return LaunchRequest(
        flow_run_id=RUN_ID,
        flow_run_name="n",
        deployment_name="d",
        working_dir=tmp,
        python=python,
        memory_max=None,
        cpu_quota=None,
        tasks_max=None,
        runtime_max=None,
        user=user,
        env={"PREFECT_API_KEY": SECRET},
        run_dir=tmp / "run",
        slice="s.slice",
    )


def test_only_the_engine_drops_to_the_user(tmp_path: Path) -> None:
    req = request(tmp_path, "flows", "/usr/bin/python3")
    flows = pwd.struct_passwd(("flows", "x", 1500, 998, "", "/home/flows", "/bin/sh"))
    argv = systemd_run_argv(req, user_manager=False, privilege_drop=privilege_drop(flows))
    assert argv[0] == "systemd-run"
    assert not any(a.startswith(("--uid", "--gid")) for a in argv)
    assert not any(SECRET in a for a in argv)
    at = argv.index(str(req.run_dir))  # the wrapper's argument; the engine follows it
    # An unknown user name has only its primary group (getgrouplist).
    assert argv[at + 1 :] == [
        "/usr/bin/setpriv",
        "--reuid=1500",
        "--regid=998",
        "--groups=998",
        "--",
        "/usr/bin/python3",
        "-m",
        "prefect.engine",
    ]
    root = systemd_run_argv(request(tmp_path, "", "/usr/bin/python3"), user_manager=False)
    assert "/usr/bin/setpriv" not in root


@as_root
def test_the_wrapper_records_as_root_while_the_engine_runs_as_the_user() -> None:
    """The exact command the scope execs (after systemd-run and systemd-cat), run for real."""
    # Under /tmp, which `nobody` can traverse (pytest's tmp_path is in a 0700 directory).
    base = Path(tempfile.mkdtemp(prefix="ra-sec-"))
    try:
        base.chmod(0o755)
        engine = base / "engine"
        engine.write_text("#!/bin/sh\ngrep -E '^(Uid|Gid|Groups|CapEff):' /proc/self/status\n")
        engine.chmod(0o755)
        req = request(base, "nobody", str(engine))
        (base / "run").mkdir(mode=0o700)  # root's, as the workspace makes it
        argv = systemd_run_argv(
            req, user_manager=False, privilege_drop=privilege_drop(pwd.getpwnam("nobody"))
        )
        command = argv[argv.index("/bin/sh") :]
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=30)
        assert done.returncode == 0, done.stderr
        fields = dict(line.split(":", 1) for line in done.stdout.splitlines())
        assert fields["Uid"].split() == [str(NOBODY)] * 4
        assert fields["Gid"].split() == [str(NOGROUP)] * 4
        assert fields["Groups"].split() == [str(NOGROUP)]
        assert int(fields["CapEff"], 16) == 0
        for record in ("pid", "exit-status"):
            path = base / "run" / record
            assert path.stat().st_uid == 0, record
        assert (base / "run" / "exit-status").read_text() == "0\n"
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)
