"""The pure pieces of warm starts (the spec, which runs want warm, the python, the umask, the
socket path, template keys, venv stamps, the venv ownership rule) and WarmHandle's wait on a
pidfd of W."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import sys
from dataclasses import replace
from pathlib import Path
from uuid import uuid4

import pytest

from agent.launch.base import base_environment
from agent.launch.process import ProcessLauncher
from agent.launch.systemd import SystemdLauncher
from agent.launch.wrapper import user_ids
from agent.warm.keys import (
    TemplateKey,
    connect_path,
    parse_stamps,
    same_startup,
    stamp,
    still_fresh,
    template_key,
    unsafe_venv,
)
from agent.warm.launcher import (
    WarmHandle,
    WarmLauncher,
    current_umask,
    resolve_python,
    wants_warm,
)
from agent.warm.pool import WarmPool
from agent.warm.supervise import APPLIED_IN_CHILD, startup_values
from tests.unit.fakes.warm import make_request

SLICE = "runner-agent-flows.slice"


def test_the_spec_under_each_launcher(tmp_path: Path) -> None:
    req = make_request(tmp_path, Path(sys.executable), "x")
    pool = WarmPool(tmp_path / "warm")
    systemd = WarmLauncher(
        SystemdLauncher(slice=SLICE, user_manager=True, manager_env={"XDG_RUNTIME_DIR": "/x"}),
        pool,
    )
    plain = WarmLauncher(ProcessLauncher(), pool)
    # What the wrapped launcher gives a cold run: its manager's bus too, under systemd.
    assert plain._environment(req) == base_environment("", extra=req.env)
    env = systemd._environment(req)
    assert env == {**base_environment("", extra=req.env), "XDG_RUNTIME_DIR": "/x"}
    own = replace(req, env={**req.env, "XDG_RUNTIME_DIR": "/run/user/9"})
    assert systemd._environment(own)["XDG_RUNTIME_DIR"] == "/run/user/9"  # the run's wins
    common = {
        "env": env,
        "cwd": str(req.working_dir),
        "run_dir": str(req.run_dir),
        "umask": current_umask(),
        "user": None,
    }
    assert systemd._spec(req, env) == {
        **common,
        "output": {"journal": f"runner-agent-run-{req.flow_run_id}"},
        "scope": f"runner-agent-run-{req.flow_run_id}.scope",
    }
    assert plain._spec(req, env) == {
        **common,
        "output": {"file": str(req.run_dir / "output.log")},
        "scope": None,
    }
    if os.geteuid() == 0:
        uid, gid, groups = user_ids(pwd.getpwnam("nobody"))
        spec = plain._spec(replace(req, user="nobody"), env)
        assert spec["user"] == {"uid": uid, "gid": gid, "groups": groups}


def test_which_requests_want_warm(tmp_path: Path) -> None:
    req = make_request(tmp_path, Path(sys.executable), "")
    assert wants_warm(req)
    assert not wants_warm(replace(req, engine="cold"))
    assert not wants_warm(replace(req, kind="hook"))
    assert not wants_warm(replace(req, capture_output=True))
    assert not wants_warm(replace(req, args=("-m", "other.engine")))


def test_resolve_python() -> None:
    assert resolve_python("/opt/v/bin/python", {}) == "/opt/v/bin/python"
    assert resolve_python("v/bin/python", {}) is None
    assert resolve_python("sh", {"PATH": "/nonexistent:/bin"}) == "/bin/sh"
    assert resolve_python("no-such-python-here", {"PATH": "/bin"}) is None


def test_current_umask_reads_without_changing_it() -> None:
    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        assert current_umask() == 0o027
    finally:
        os.umask(old)


def test_connect_path_stays_within_sun_path(tmp_path: Path) -> None:
    short = Path("/run/w/abc-1.sock")
    assert connect_path(short, 7) == str(short)
    long = Path("/" + "d" * 120) / "abc-1.sock"
    assert connect_path(long, 7) == "/proc/self/fd/7/abc-1.sock"
    assert connect_path(long, None) == str(long)


def test_start_up_values_are_what_the_interpreter_reads_once() -> None:
    env = {
        "PYTHONPATH": "/p",
        "PYTHONHASHSEED": "1",
        "PYTHONSAFEPATH": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONPYCACHEPREFIX": "/c",
        "LC_ALL": "C",
        "LANG": "C.UTF-8",
        "LANGUAGE": "de",
        "PATH": "/bin",
        "PREFECT_API_KEY": "k",
    }
    assert startup_values(env) == {
        "PYTHONPATH": "/p",
        "PYTHONHASHSEED": "1",
        "PYTHONSAFEPATH": "1",
        "LC_ALL": "C",
        "LANG": "C.UTF-8",
    }
    assert APPLIED_IN_CHILD == ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")  # set in E
    assert same_startup(env, {**env, "PYTHONDONTWRITEBYTECODE": "", "PREFECT_API_KEY": "x"})
    assert not same_startup(env, {**env, "PYTHONPATH": "/q"})
    assert not same_startup(env, {k: v for k, v in env.items() if k != "LC_ALL"})


def test_a_template_key_is_the_python_and_its_start_up_values() -> None:
    key = template_key("/v/bin/python", {"LANG": "C.UTF-8", "PREFECT_API_KEY": "secret"})
    assert key == TemplateKey("/v/bin/python", (("LANG", "C.UTF-8"),))
    both = template_key("/v/bin/python", {"PYTHONPATH": "/p", "LANG": "C"})
    assert both.values == (("LANG", "C"), ("PYTHONPATH", "/p"))  # sorted: one key per set
    assert len(key.id) == 12 and key.id == template_key("/v/bin/python", {"LANG": "C.UTF-8"}).id
    assert key.id != template_key("/w/bin/python", {"LANG": "C.UTF-8"}).id
    assert key.id != template_key("/v/bin/python", {"LANG": "C"}).id
    assert key.environment(Path("/h"), {"XDG_RUNTIME_DIR": "/x"}) == {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "PREFECT_HOME": "/h",
        "XDG_RUNTIME_DIR": "/x",
    }


def test_stamps_tell_a_changed_venv(tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    site.mkdir()
    stamps = stamp([str(tmp_path / "python-missing"), str(site)])
    assert [path for path, _, _ in stamps] == [str(site)]  # what does not exist is left out
    assert still_fresh(stamps)
    assert parse_stamps([list(s) for s in stamps]) == stamps  # as the template reports them
    assert parse_stamps("junk") == parse_stamps([["short"]]) == ()
    assert not still_fresh(())  # nothing known: never fresh
    (site / "new-1.0.dist-info").mkdir()  # what pip install does
    assert not still_fresh(stamps)
    site.rename(tmp_path / "old")
    site.mkdir()  # replaced: another inode, even with the old mtime
    os.utime(site, ns=(stamps[0][2], stamps[0][2]))
    assert not still_fresh(stamps)


def fake_venv(root: Path) -> Path:
    site = root / "lib" / "python3.11" / "site-packages"
    (site / "pkg").mkdir(parents=True)
    (site / "pkg" / "mod.py").write_text("")
    (site / "extra.pth").write_text("")
    (root / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (root / "bin").mkdir()
    python = root / "bin" / "python"
    python.write_text("")
    python.chmod(0o755)
    return python


@pytest.mark.parametrize(
    ("path", "mode", "problem"),
    [
        ("", None, None),
        ("lib/python3.11/site-packages/extra.pth", 0o666, "writable by its group or others"),
        ("lib/python3.11/site-packages", 0o775, "writable by its group or others"),
        ("lib/python3.11/site-packages/pkg", 0o757, "writable by its group or others"),
        ("bin", 0o777, "writable by its group or others"),
        ("bin/python", 0o775, "writable by its group or others"),
        ("lib", 0o770, "writable by its group or others"),
        ("pyvenv.cfg", 0o646, "writable by its group or others"),
    ],
)
def test_a_root_agent_refuses_a_venv_others_could_write(
    tmp_path: Path, path: str, mode: int | None, problem: str | None
) -> None:
    python = fake_venv(tmp_path / "venv")
    target = tmp_path / "venv" / path
    if mode is not None:
        target.chmod(mode)
    if os.geteuid() != 0:  # not root's files here: refused for that, whatever the mode
        assert "not root" in (unsafe_venv(str(python), euid=0) or "")
    elif problem is None:
        assert unsafe_venv(str(python), euid=0) is None
    else:
        assert unsafe_venv(str(python), euid=0) == f"{target} is {problem} (mode {mode:o})"
    assert unsafe_venv(str(python), euid=1000) is None  # the agent's own user: nothing to gain


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away needs root")
def test_a_root_agent_refuses_a_venv_with_an_entry_of_another_user(tmp_path: Path) -> None:
    python = fake_venv(tmp_path / "venv")
    planted = python.parent.parent / "lib" / "python3.11" / "site-packages" / "extra.pth"
    os.chown(planted, 65534, 65534)
    assert unsafe_venv(str(python), euid=0) == f"{planted} belongs to uid 65534, not root"


async def test_warm_handle_waits_on_the_pidfd_then_reads_the_record(tmp_path: Path) -> None:
    for record, status in (("5\n", 5), (None, 137)):
        run_dir = tmp_path / str(status)
        run_dir.mkdir()
        child = await asyncio.create_subprocess_exec("sleep", "300")
        handle = WarmHandle(uuid4(), None, child.pid, os.pidfd_open(child.pid), run_dir)
        try:
            waiting = asyncio.ensure_future(handle.wait())
            await asyncio.sleep(0)
            assert not waiting.done()
            if record is not None:
                (run_dir / "exit-status").write_text(record)
            child.kill()
            assert await waiting == status
            (run_dir / "exit-status").unlink(missing_ok=True)
            assert await handle.wait() == status  # the status it saw, once and for all
        finally:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            await child.wait()
            handle.close()


async def test_warm_handle_can_be_waited_for_again_after_a_cancelled_wait(tmp_path: Path) -> None:
    child = await asyncio.create_subprocess_exec("sleep", "300")
    try:
        handle = WarmHandle(uuid4(), None, child.pid, os.pidfd_open(child.pid), tmp_path)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(handle.wait(), timeout=0.01)
        again = asyncio.ensure_future(handle.wait())
        await asyncio.sleep(0)
        assert not again.done(), "wait() returned while the process runs"
        (tmp_path / "exit-status").write_text("0\n")
        child.kill()
        assert await again == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        await child.wait()
