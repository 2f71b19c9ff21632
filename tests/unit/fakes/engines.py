"""Fakes of the engine probe and the hook runner."""

from __future__ import annotations

from collections.abc import Mapping

from agent.engines import EngineInfo
from agent.hooks import HookKind, HookOutcome, HookResult
from agent.launch.base import LaunchRequest

MODERN = EngineInfo(
    "python", "3.8.8", "/venv/prefect", control_channel=True, engine_heartbeats=True
)
LEGACY = EngineInfo(
    "python", "3.6.0", "/venv/prefect", control_channel=False, engine_heartbeats=False
)


class FakeEngines:
    """Answers every probe with one EngineInfo; counts the probes."""

    def __init__(self, info: EngineInfo = MODERN) -> None:
        self.info_value = info
        self.probes: list[str] = []

    async def info(self, python: str, env: Mapping[str, str] | None = None) -> EngineInfo:
        self.probes.append(python)
        return self.info_value

    def cached(self, python: str) -> EngineInfo | None:
        return self.info_value


class FakeHooks:
    """Records which hooks ran for which run, and answers with `result`."""

    def __init__(self, result: HookResult = HookResult.RAN) -> None:
        self.result = result
        self.ran: list[tuple[HookKind, LaunchRequest, str | None]] = []

    async def run(
        self, kind: HookKind, run: LaunchRequest, *, entrypoint: str | None
    ) -> HookOutcome:
        self.ran.append((kind, run, entrypoint))
        return HookOutcome(self.result, "" if self.result is HookResult.RAN else "fake failure")

    def kinds(self) -> list[HookKind]:
        return [kind for kind, _, _ in self.ran]
