"""Which warm templates run and what they cost, for `runner-agent status`: the pool writes a
state file, and status reads it with /proc, so it answers while the agent is down."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from agent.processes import process_alive

WARM_DIRECTORY = "warm"  # under the agent's runtime directory
STATE_FILE = "templates.json"


def write_state(directory: Path, templates: Sequence[dict[str, Any]]) -> None:
    """Atomic and 0600, like every file of the agent's runtime directory."""
    path = directory / STATE_FILE
    with contextlib.suppress(OSError):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(list(templates)))
        tmp.replace(path)


def read_state(directory: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads((directory / STATE_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []


@dataclass(frozen=True)
class TemplateStatus:
    key: str
    python: str
    pid: int | None
    unit: str
    forks: int
    alive: bool
    rss_bytes: int | None
    pss_bytes: int | None  # its share of the pages it shares with the runs it forked
    uss_bytes: int | None  # what stopping it would free


def collect_templates(runtime_dir: Path) -> list[TemplateStatus]:
    found = []
    for item in read_state(runtime_dir / WARM_DIRECTORY):
        pid = item.get("pid") if isinstance(item.get("pid"), int) else None
        created = item.get("create_time")
        rss = pss = uss = None
        # The pid with its start time: after an agent crash, a recycled pid is not the template.
        alive = process_alive(pid, created if isinstance(created, float) else None)
        if alive and pid is not None:
            try:
                info = psutil.Process(pid).memory_full_info()
                rss, pss, uss = info.rss, getattr(info, "pss", None), info.uss
            except psutil.Error:
                alive = False
        found.append(
            TemplateStatus(
                key=str(item.get("key", "?")),
                python=str(item.get("python", "?")),
                pid=pid,
                unit=str(item.get("unit", "-")),
                forks=int(item.get("forks", 0)),
                alive=alive,
                rss_bytes=rss,
                pss_bytes=pss,
                uss_bytes=uss,
            )
        )
    return found
