"""The `agent.launcher` choice: `auto` is systemd when systemd is running, else process."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from agent.launch.base import Launcher
from agent.launch.process import ProcessLauncher
from agent.launch.systemd import SystemdLauncher

log = logging.getLogger("agent.launch")


def systemd_booted() -> bool:
    return Path("/run/systemd/system").exists()


def select_launcher(
    choice: Literal["auto", "systemd", "process"],
    *,
    slice: str,
    is_root: bool,
    systemd_present: Callable[[], bool] = systemd_booted,
) -> Launcher:
    """The configured launcher; `auto` is systemd when /run/systemd/system exists."""
    present = systemd_present()
    if choice == "process" or (choice == "auto" and not present):
        why = (
            "configured"
            if choice == "process"
            else "auto: /run/systemd/system does not exist (systemd is not running)"
        )
        log.info("launcher: process (%s)", why)
        return ProcessLauncher()
    manager = "system manager" if is_root else "user manager (--user)"
    if choice == "systemd" and not present:
        log.warning(
            "launcher: systemd (configured), but /run/systemd/system does not exist; "
            "launches will fail"
        )
    else:
        why = "configured" if choice == "systemd" else "auto: /run/systemd/system exists"
        log.info("launcher: systemd via the %s, slice %s (%s)", manager, slice, why)
    return SystemdLauncher(slice=slice, user_manager=not is_root)
