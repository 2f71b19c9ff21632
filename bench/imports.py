"""Import footprint: what the interpreter and each mandated dependency cost before any work.

One fresh interpreter of the agent's venv imports the steps cumulatively and reports its memory
after each, from /proc/self/smaps_rollup (read without imports of its own, so the probe does not
weigh on what it measures).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.procs import MIB

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


def imports_table(steps: list[ImportStep]) -> list[str]:
    lines = ["| import step (cumulative) | RSS | PSS | USS | +RSS |", "|---|---|---|---|---|"]
    previous = 0
    for step in steps:
        lines.append(
            f"| {step.label} | {step.rss / MIB:.1f} MiB | {step.pss / MIB:.1f} MiB "
            f"| {step.uss / MIB:.1f} MiB | {(step.rss - previous) / MIB:+.1f} MiB |"
        )
        previous = step.rss
    return lines


def floor(steps: list[ImportStep], idle_rss: float | None) -> list[str]:
    """What the mandated dependencies alone take, against the running agent's idle RSS."""
    if len(steps) < 2:
        return []
    deps, agent = steps[-2], steps[-1]
    idle_text = f"; the running agent's idle RSS is {idle_rss / MIB:.1f} MiB" if idle_rss else ""
    return [
        "",
        f"The mandated dependencies alone, before any of the agent's own modules, take "
        f"**{deps.rss / MIB:.1f} MiB RSS** ({deps.pss / MIB:.1f} MiB PSS, {deps.uss / MIB:.1f} MiB "
        f"USS) in a fresh interpreter, the interpreter by itself "
        f"{steps[0].rss / MIB:.1f} MiB. The 25 MiB idle RSS target is therefore below "
        f"the floor of the dependency set, whatever the agent does. The agent's own modules add "
        f"{(agent.rss - deps.rss) / MIB:.1f} MiB{idle_text}.",
    ]
