"""What the Prefect engine in a flow's venv can do, found without importing Prefect.

A short probe run by the flow's own python locates the installed `prefect` package (without
importing it, which would take seconds) and reports its version and the features the agent
depends on, by the files that implement them:

- `control_channel`: `prefect/_internal/control_listener.py`, the engine side of the attempt
  control session (control.py). Without it, cancellation falls back to SIGTERM.
- `engine_heartbeats`: the engine sends `prefect.flow-run.heartbeat` itself when
  `PREFECT_FLOWS_HEARTBEAT_FREQUENCY` is set (`settings/models/flows.py` has it). Without it,
  the agent sends them for the run.

Results are cached per interpreter and re-probed when the package's directory changes (a
`pip install -U prefect` replaces it), so a venv upgrade is seen at the next launch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("agent.engines")

PROBE_TIMEOUT = 30.0
# How long a failed probe's answer is kept before the interpreter is probed again.
FAILURE_MEMORY = 300.0
BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
MAX_OUTPUT = 64 * 1024

# Run by the flow's python with -I (no user site, no PYTHON* variables, no cwd on sys.path).
PROBE = """\
import importlib.metadata, importlib.util, json, os, sys
spec = importlib.util.find_spec("prefect")
if spec is None or not spec.submodule_search_locations:
    print(json.dumps({"error": "prefect is not installed for " + sys.executable}))
    raise SystemExit(0)
root = list(spec.submodule_search_locations)[0]
def has(path, text=None):
    full = os.path.join(root, *path.split("/"))
    if text is None:
        return os.path.exists(full)
    try:
        with open(full, encoding="utf-8") as handle:
            return text in handle.read()
    except OSError:
        return False
print(json.dumps({
    "version": importlib.metadata.version("prefect"),
    "root": root,
    "control_channel": has("_internal/control_listener.py"),
    "engine_heartbeats": has("settings/models/flows.py", "heartbeat_frequency"),
}))
"""


@dataclass(frozen=True)
class EngineInfo:
    python: str
    version: str | None  # None: the probe failed (then every capability is assumed absent)
    root: str | None = None
    control_channel: bool = False
    engine_heartbeats: bool = False
    problem: str | None = None

    def describe(self) -> str:
        if self.version is None:
            return f"Prefect engine of {self.python}: unknown ({self.problem})"
        features = [
            name
            for name, present in (
                ("control channel", self.control_channel),
                ("engine heartbeats", self.engine_heartbeats),
            )
            if present
        ]
        return f"Prefect {self.version} ({', '.join(features) or 'no control channel'})"


def _mtime(path: str | None) -> float | None:
    if path is None:
        return None
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return None


class Engines:
    """The probe results per flow python, kept while the prefect package stays the same."""

    def __init__(self, *, timeout: float = PROBE_TIMEOUT) -> None:
        self._timeout = timeout
        self._known: dict[str, tuple[EngineInfo, float | None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def cached(self, python: str) -> EngineInfo | None:
        known = self._known.get(python)
        return known[0] if known is not None else None

    async def info(self, python: str, env: Mapping[str, str] | None = None) -> EngineInfo:
        """`env`: the run's own variables (a PYTHONPATH may matter), over a minimal base."""
        lock = self._locks.setdefault(python, asyncio.Lock())
        async with lock:
            known = self._known.get(python)
            if known is not None:
                info, stamp = known
                if info.version is not None and _mtime(info.root) == stamp:
                    return info
                # A failed probe is not repeated at every launch (it may take the timeout).
                if info.version is None and stamp is not None and time.monotonic() < stamp:
                    return info
            info = await self._probe(python, {**BASE_ENV, **(env or {})})
            if info.version is None:
                log.warning("%s", info.describe())
            elif known is None or known[0].version != info.version:
                log.info("flow python %s: %s", python, info.describe())
            stamp = _mtime(info.root) if info.version else time.monotonic() + FAILURE_MEMORY
            self._known[python] = (info, stamp)
            return info

    async def _probe(self, python: str, env: dict[str, str]) -> EngineInfo:
        try:
            process = await asyncio.create_subprocess_exec(
                python,
                "-I",
                "-c",
                PROBE,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd="/",
            )
        except OSError as exc:
            return EngineInfo(python, None, problem=f"cannot run it: {exc.strerror or exc}")
        try:
            out, err = await asyncio.wait_for(process.communicate(), timeout=self._timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            return EngineInfo(python, None, problem=f"the probe took over {self._timeout:g}s")
        return parse_probe(python, process.returncode, out[:MAX_OUTPUT], err[:MAX_OUTPUT])


def parse_probe(python: str, returncode: int | None, out: bytes, err: bytes) -> EngineInfo:
    lines = out.decode(errors="replace").strip().splitlines()
    try:
        data = json.loads(lines[-1]) if lines else None
    except ValueError:
        data = None
    if returncode != 0 or not isinstance(data, dict):
        tail = err.decode(errors="replace").strip().splitlines()
        why = tail[-1] if tail else f"exit status {returncode}"
        return EngineInfo(python, None, problem=why[:300])
    if "error" in data:
        return EngineInfo(python, None, problem=str(data["error"])[:300])
    version, root = data.get("version"), data.get("root")
    if not isinstance(version, str) or not isinstance(root, str) or not Path(root).is_absolute():
        return EngineInfo(python, None, problem="the probe's answer was malformed")
    return EngineInfo(
        python,
        version,
        root,
        control_channel=data.get("control_channel") is True,
        engine_heartbeats=data.get("engine_heartbeats") is True,
    )
