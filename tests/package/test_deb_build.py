"""The .deb as built by packaging/build-deb.sh: name, contents, dependencies, lintian, version.

The package is built once per session (fixture `built_deb`), with the unit tests run against
its venv, exactly as a release build; these tests only inspect the result.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

import agent
from tests.package.debbuild import (
    REPO,
    VENV,
    contents,
    control_file,
    debian_version,
    field,
    run,
)

pytestmark = pytest.mark.system

# Every package the .deb may depend on: the interpreter its venv links to, systemd, passwd
# (userdel in postrm purge), procps (/bin/kill of the unit's ExecReload; minbase lacks it) and
# the C libraries the bundled wheels' extensions link against.
ALLOWED_DEPENDS = {"python3", "python3.11", "systemd", "passwd", "procps", "libc6", "libgcc-s1"}


def arch() -> str:
    return run(["dpkg", "--print-architecture"]).strip()


def test_file_name_and_version_come_from_agent_version(built_deb: Path) -> None:
    version = debian_version()
    assert built_deb.name == f"runner-agent_{version}_{arch()}.deb"
    assert field(built_deb, "Package") == "runner-agent"
    assert field(built_deb, "Version") == version
    if re.fullmatch(r"\d+(\.\d+)*", agent.__version__):
        assert version == agent.__version__


def test_contents(built_deb: Path) -> None:
    files = contents(built_deb)
    expected = {
        "/usr/bin/runner-agent": "-",
        "/lib/systemd/system/runner-agent.service": "-",
        "/lib/systemd/system/runner-agent-flows.slice": "-",
        "/etc/runner-agent/agent.toml": "-",
        "/etc/runner-agent/agent.d": "d",
        "/usr/share/man/man8/runner-agent.8.gz": "-",
        "/usr/lib/sysusers.d/runner-agent.conf": "-",
        "/usr/share/doc/runner-agent/troubleshooting.md.gz": "-",
        "/usr/share/doc/runner-agent/migrating.md.gz": "-",
        "/usr/share/doc/runner-agent/config.md.gz": "-",
        f"{VENV}/pyvenv.cfg": "-",
        f"{VENV}/bin/python3": "l",
    }
    found = {path: files[path].kind for path in expected if path in files}
    assert found == expected
    assert files["/usr/bin/runner-agent"].mode == "-rwxr-xr-x"
    # The venv links to the system interpreter (that is why Depends pins its minor version).
    assert files[f"{VENV}/bin/python3.11"].link == "../../../bin/python3.11"
    site = f"{VENV}/lib/python3.11/site-packages"
    for module in ("agent/cli.py", "pydantic_core", "uvloop", "httpx", "psutil"):
        assert f"{site}/{module}" in files, module
    # No byte-code (postinst compiles it), no pip, no build-machine leftovers, no /opt.
    unwanted = [
        p
        for p in files
        if "__pycache__" in p
        or p.endswith((".pyc", ".pyo"))
        or p.startswith((f"{site}/pip", f"{site}/setuptools", "/opt", "/usr/lib/debug"))
    ]
    assert unwanted == []


def test_conffiles_and_installed_files_match_the_tree(built_deb: Path, tmp_path: Path) -> None:
    assert control_file(built_deb, "conffiles").split() == ["/etc/runner-agent/agent.toml"]
    run(["dpkg-deb", "-x", str(built_deb), str(tmp_path)])
    for unit in ("runner-agent.service", "runner-agent-flows.slice"):
        installed = tmp_path / "lib/systemd/system" / unit
        assert installed.read_bytes() == (REPO / "systemd" / unit).read_bytes(), unit
    agent_toml = tmp_path / "etc/runner-agent/agent.toml"
    assert agent_toml.read_bytes() == (REPO / "packaging/agent.toml").read_bytes()
    wrapper = (tmp_path / "usr/bin/runner-agent").read_text()
    assert f'exec {VENV}/bin/python3 -I -m agent "$@"' in wrapper
    sysusers = (tmp_path / "usr/lib/sysusers.d/runner-agent.conf").read_text()
    assert re.search(r"^u runner-agent ", sysusers, re.MULTILINE)


def test_bundled_venv_runs_the_agent(built_deb: Path, tmp_path: Path) -> None:
    """The venv from the package, not the dev venv or the source tree, runs `-m agent version`."""
    root = tmp_path / "root"
    run(["dpkg-deb", "-x", str(built_deb), str(root)])
    # bin/python3.11 -> ../../../bin/python3.11 resolves to /usr/bin/python3.11 once installed;
    # give the extracted tree the same interpreter.
    (root / "usr/bin/python3.11").symlink_to("/usr/bin/python3.11")
    python = root / VENV.lstrip("/") / "bin/python3"
    out = run([str(python), "-I", "-m", "agent", "version"], cwd=tmp_path)
    assert out.splitlines()[0] == f"runner-agent {agent.__version__}"
    # The compiled wheels survived dh_strip, and everything is imported from the extracted venv.
    probe = (
        "import sys, agent, agent.cli, pydantic_core, uvloop, psutil, websockets.speedups;"
        "mods = [agent, pydantic_core, uvloop, psutil];"
        "print(all(m.__file__.startswith(sys.prefix + '/') for m in mods), sys.prefix)"
    )
    out = run([str(python), "-I", "-c", probe], cwd=tmp_path)
    assert out.split() == ["True", str(root / VENV.lstrip("/"))]


def test_depends(built_deb: Path) -> None:
    depends = [d.strip() for d in field(built_deb, "Depends").split(",")]
    for needed in ("python3 (>= 3.11)", "python3 (<< 3.12)", "systemd", "procps"):
        assert needed in depends
    names = {re.split(r"[\s(:]", d, maxsplit=1)[0] for d in depends}
    assert names <= ALLOWED_DEPENDS, names - ALLOWED_DEPENDS
    # git only for deployments with [deployment.git]; not needed otherwise.
    assert field(built_deb, "Suggests") == "git"


def test_maintainer_scripts_restart_the_service_but_never_touch_the_slice(
    built_deb: Path,
) -> None:
    postinst = control_file(built_deb, "postinst")
    prerm = control_file(built_deb, "prerm")
    postrm = control_file(built_deb, "postrm")
    assert 'systemd-sysusers ${DPKG_ROOT:+--root="$DPKG_ROOT"} runner-agent.conf' in postinst
    # A fresh install neither enables nor starts the agent (the operator does, once it is
    # configured); an upgrade ($2 = old version) keeps it enabled if it was, and restarts it
    # if it is running.
    assert "deb-systemd-helper --quiet was-enabled 'runner-agent.service'" in postinst
    assert "deb-systemd-invoke start" not in postinst and "_dh_action=start" not in postinst
    restart = postinst[postinst.index('if [ -n "$2" ]; then') :]
    assert restart.split("\n")[1].strip() == (
        "deb-systemd-invoke try-restart 'runner-agent.service' >/dev/null || true"
    )
    # The old version is stopped only on removal, never before an upgrade.
    stops = [line for line in prerm.splitlines() if "deb-systemd-invoke stop" in line]
    assert stops and all("runner-agent.service" in line for line in stops)
    assert 'if [ -z "${DPKG_ROOT:-}" ] && [ "$1" = remove ]' in prerm
    # Stopping or restarting the slice kills every flow run: only a purge may (the agent is
    # gone for good then), never an install, upgrade or remove.
    for script in (postinst, prerm):
        assert "runner-agent-flows.slice" not in script
    purge = postrm[postrm.index("    purge)") : postrm.index(";;", postrm.index("    purge)"))]
    assert postrm.count("runner-agent-flows.slice") == purge.count("runner-agent-flows.slice") > 0
    assert "userdel runner-agent" in postrm
    assert "rm -rf /var/lib/runner-agent /run/runner-agent /etc/runner-agent" in postrm


def test_lintian_reports_no_errors_or_warnings(built_deb: Path) -> None:
    proc = subprocess.run(
        ["lintian", "--fail-on", "error,warning", str(built_deb)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    tags = [line for line in proc.stdout.splitlines() if line.startswith(("E:", "W:"))]
    assert tags == []
    assert proc.returncode == 0, proc.stdout + proc.stderr
