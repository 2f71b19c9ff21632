"""What the warm templates of this host cost, for `runner-agent status` (read from the pool's
state file and /proc, so it answers while the agent is down)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil

from agent.warm.pool import read_state

WARM_DIRECTORY = "warm"  # under the agent's runtime directory


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
        pid = item.get("pid")
        rss = pss = uss = None
        alive = False
        if isinstance(pid, int):
            try:
                info = psutil.Process(pid).memory_full_info()
                rss, pss, uss = info.rss, getattr(info, "pss", None), info.uss
                alive = True
            except psutil.Error:
                pass
        found.append(
            TemplateStatus(
                key=str(item.get("key", "?")),
                python=str(item.get("python", "?")),
                pid=pid if isinstance(pid, int) else None,
                unit=str(item.get("unit", "-")),
                forks=int(item.get("forks", 0)),
                alive=alive,
                rss_bytes=rss,
                pss_bytes=pss,
                uss_bytes=uss,
            )
        )
    return found
