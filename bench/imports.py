"""Import footprint: what the interpreter and each mandated dependency cost before any work.

One fresh interpreter of the agent's venv imports the steps cumulatively and reports its memory
after each, from /proc/self/smaps_rollup (read without imports of its own, so the probe does not
weigh on what it measures).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

# (label, modules imported at this step), cumulative: each step includes the ones before.
STEPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("interpreter alone (site, no imports)", ()),
    ("+ asyncio, ssl", ("asyncio", "ssl")),
    ("+ uvloop", ("uvloop",)),
    ("+ httpx", ("httpx",)),
    ("+ websockets (asyncio client)", ("websockets.asyncio.client",)),
    ("+ psutil", ("psutil",)),
    ("+ pydantic, pydantic_settings", ("pydantic", "pydantic_settings")),
    ("+ python-json-logger, croniter", ("pythonjsonlogger.json", "croniter")),
    ("+ agent (agent.cli, agent.daemon and what they import)", ("agent.cli", "agent.daemon")),
)

# The probe. Keep it free of imports: it runs before (and between) the measured ones.
PROBE = """
import sys
def mem():
    out = {}
    f = open('/proc/self/smaps_rollup')
    for line in f:
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            out[parts[0].rstrip(':')] = int(parts[1])
    f.close()
    return out
def report(i):
    m = mem()
    uss = m.get('Private_Clean', 0) + m.get('Private_Dirty', 0)
    sys.stdout.write('%d %d %d %d\\n' % (i, m.get('Rss', 0), m.get('Pss', 0), uss))
    sys.stdout.flush()
steps = sys.argv[1:]
for i, step in enumerate(steps):
    for name in step.split(','):
        if name:
            __import__(name)
    report(i)
"""


@dataclass(frozen=True)
class ImportStep:
    label: str
    rss: int  # bytes
    pss: int
    uss: int


def measure(python: Path, cwd: Path) -> list[ImportStep]:
    """Run the probe in `python` (the agent venv's) from `cwd` (the repository root)."""
    argv = [str(python), "-c", PROBE, *(",".join(mods) for _, mods in STEPS)]
    out = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"import probe failed ({out.returncode}): {out.stderr[-2000:]}")
    steps = []
    for line in out.stdout.splitlines():
        index, rss, pss, uss = (int(x) for x in line.split())
        steps.append(ImportStep(STEPS[index][0], rss * 1024, pss * 1024, uss * 1024))
    if len(steps) != len(STEPS):
        raise RuntimeError(f"import probe reported {len(steps)} of {len(STEPS)} steps")
    return steps
