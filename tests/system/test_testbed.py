"""The test bed itself: a real systemd boots, limits are enforced, nothing is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from tests.system.conftest import REPO, require_test_bed
from tests.system.testbed import (
    CGROUP_ROOT,
    PREFIX,
    Container,
    _nspawn_pids,
    clean_stale,
    hierarchies_for,
)

ALLOCATE = "x = 'x' * ({mb} << 20); print(len(x) >> 20)"


def own_cgroup_file(controller: str, name: str) -> str:
    """Shell that prints a file of the calling process's own v1 cgroup."""
    return (
        f'p=$(sed -n "s/^[0-9]*:[a-z,]*\\b{controller}\\b[a-z,]*://p" /proc/self/cgroup);'
        f" cat /sys/fs/cgroup/{controller}$p/{name}"
    )


def leftovers(name: str) -> list[str]:
    """Every trace of a container on the host: nspawn processes and cgroup directories."""
    found = [f"nspawn pid {pid}" for pid, machine in _nspawn_pids().items() if machine == name]
    for hierarchy in hierarchies_for():
        found += [str(p) for p in hierarchy.mountpoint.glob(f"**/{name}")]
    if Path("/run/systemd/nspawn/propagate", name).exists():
        found.append(f"/run/systemd/nspawn/propagate/{name}")
    found += [str(p) for p in Path(tempfile.gettempdir()).glob(f"{name}.*")]
    return found


def test_boots_systemd_252_to_running(host_container: Container) -> None:
    assert host_container.system_state() in ("running", "degraded")
    version = host_container.exec(["systemctl", "--version"]).stdout
    assert version.startswith("systemd 252"), version
    assert host_container.exec(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"


def test_memory_max_kills_a_big_allocation_and_spares_a_small_one(
    host_container: Container,
) -> None:
    def run(mb: int) -> subprocess.CompletedProcess[str]:
        return host_container.exec(
            [
                "systemd-run",
                "--quiet",
                "--scope",
                f"--unit={PREFIX}-mem-{mb}",
                "-p",
                "MemoryMax=50M",
                "--",
                "python3",
                "-c",
                ALLOCATE.format(mb=mb),
            ],
            check=False,
        )

    big, small = run(200), run(20)
    assert big.returncode == 137, big
    assert (small.returncode, small.stdout.strip()) == (0, "20"), small


def test_tasks_max_sets_and_enforces_pids_max(host_container: Container) -> None:
    result = host_container.exec(
        [
            "systemd-run",
            "--quiet",
            "--scope",
            f"--unit={PREFIX}-tasks",
            "-p",
            "TasksMax=5",
            "--",
            "sh",
            "-c",
            own_cgroup_file("pids", "pids.max")
            + "; for i in 1 2 3 4 5 6 7 8; do sleep 3 & done 2>&1; wait",
        ],
        check=False,
    )
    assert result.stdout.splitlines()[0] == "5", result
    assert "fork" in (result.stdout + result.stderr).lower(), result  # "Cannot fork"


def test_cpu_quota_sets_cfs_quota(host_container: Container) -> None:
    result = host_container.exec(
        [
            "systemd-run",
            "--quiet",
            "--scope",
            f"--unit={PREFIX}-cpu",
            "-p",
            "CPUQuota=20%",
            "--",
            "sh",
            "-c",
            own_cgroup_file("cpu", "cpu.cfs_quota_us"),
        ]
    )
    assert result.stdout.strip() == "20000"


def test_scope_in_a_custom_slice_is_under_that_slice(host_container: Container) -> None:
    unit = f"{PREFIX}-sliced.scope"
    host_container.start_scope(unit, "sleep 120", "MemoryMax=30M", slice_="ratbtest.slice")
    try:
        props = host_container.show(unit, "Slice", "ControlGroup", "MemoryMax")
        assert props["Slice"] == "ratbtest.slice"
        assert props["ControlGroup"] == f"/ratbtest.slice/{unit}"
        assert props["MemoryMax"] == str(30 << 20)
        # Enforced, not just recorded: the kernel's own limit file, read from the host.
        limit = host_container.cgroup_dir("memory", props["ControlGroup"]) / "memory.limit_in_bytes"
        assert int(limit.read_text()) == 30 << 20
    finally:
        host_container.systemctl("stop", unit, check=False)


def test_journal_attributes_a_long_lived_scope_output(host_container: Container) -> None:
    unit = f"{PREFIX}-journal.scope"
    marker = f"marker-{os.getpid()}-{time.monotonic_ns()}"
    host_container.start_scope(unit, f"systemd-cat -t ratbtest sh -c 'echo {marker}; sleep 60'")
    try:
        host_container.wait_for(
            lambda: marker in host_container.journal(unit, "-o", "cat"),
            timeout=20,
            what=f"{marker} in journalctl -u {unit}",
        )
    finally:
        host_container.systemctl("stop", unit, check=False)


def test_binds_and_setenv_reach_the_units(tmp_path: Path) -> None:
    require_test_bed()
    (tmp_path / "seen").write_text("from the host")
    with Container.host(
        setenv={"RATB_FOO": "bar baz"}, binds_ro=[f"{tmp_path}:/mnt/ratb"], enforce_limits=False
    ) as container:
        result = container.exec(
            [
                "systemd-run",
                "--quiet",
                "--wait",
                "--pipe",
                "--",
                "sh",
                "-c",
                'echo "$RATB_FOO"; cat /mnt/ratb/seen',
            ]
        )
        assert result.stdout.splitlines() == ["bar baz", "from the host"]
        denied = container.exec(["touch", "/mnt/ratb/x"], check=False)
        assert denied.returncode != 0  # read-only bind


def test_teardown_leaves_no_process_and_no_cgroup() -> None:
    require_test_bed()
    container = Container.host()
    with pytest.raises(RuntimeError, match="boom"), container:
        assert leftovers(container.name), "a running container must be visible"
        nspawn = container.nspawn
        raise RuntimeError("boom")  # teardown must happen on exceptions too
    assert nspawn is not None and nspawn.returncode is not None
    assert leftovers(container.name) == []
    assert not any(p.exists() for _h, p in container.hierarchies)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_to_the_test_process_cleans_up(signum: signal.Signals) -> None:
    require_test_bed()
    script = textwrap.dedent("""
        import signal, time
        from tests.system.testbed import Container
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
        c = Container.host(enforce_limits=False)
        c.start()
        print(c.name, flush=True)
        time.sleep(120)
    """)
    child = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        name = child.stdout.readline().strip()
        assert name.startswith(f"{PREFIX}-"), name
        assert leftovers(name)
        child.send_signal(signum)
        assert child.wait(timeout=60) == -signum  # the signal is re-raised after clean-up
    finally:
        child.kill()
        child.wait()
    assert leftovers(name) == []


def test_stale_cgroups_of_dead_creators_are_removed_and_live_ones_kept() -> None:
    require_test_bed()
    dead = _a_dead_pid()
    pids_root = CGROUP_ROOT / "pids"
    stale = pids_root / f"{PREFIX}-{dead}-0bad"
    mine = pids_root / f"{PREFIX}-{os.getpid()}-0aaa"
    for path in (stale, mine, stale / "payload"):
        path.mkdir()
    try:
        cleaned = clean_stale()
        assert f"cgroup {stale}" in cleaned
        assert not stale.exists()
        assert mine.exists()
    finally:
        for path in (stale / "payload", stale, mine):
            if path.exists():
                path.rmdir()


def _a_dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_debootstrapped_bookworm_boots_and_runs_python(debian_root: Path) -> None:
    assert (debian_root / "usr/bin/python3").exists()
    with Container.debian(debian_root) as container:
        release = container.read_file("/etc/os-release")
        assert "VERSION_CODENAME=bookworm" in release
        result = container.exec(["python3", "-c", "import sys; print(sys.version_info[:2])"])
        assert result.stdout.strip() == "(3, 11)"
        # The cached root stays pristine: writes go to the overlay.
        container.write_file("/etc/ratb-written", "x")
    assert not (debian_root / "etc/ratb-written").exists()


def test_a_crashed_session_container_is_cleaned_at_the_next_start() -> None:
    require_test_bed()
    script = textwrap.dedent("""
        import time
        from tests.system.testbed import Container
        c = Container.host(enforce_limits=False)
        c.start()
        print(c.name, flush=True)
        time.sleep(120)
    """)
    child = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    name = child.stdout.readline().strip()
    child.kill()  # no clean-up can run: the container and its cgroups stay behind
    child.wait()
    try:
        assert any("nspawn pid" in trace for trace in leftovers(name))
        cleaned = clean_stale()
        assert any(name in what for what in cleaned), cleaned
        assert leftovers(name) == []
    finally:
        clean_stale()
