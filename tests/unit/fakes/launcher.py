"""One fake launcher for the unit tests: records every LaunchRequest, hands out handles whose
exit the test releases, and records terminate/kill."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from agent.launch.base import LaunchError, LaunchRequest


@dataclass
class FakeHandle:
    flow_run_id: UUID
    unit: str | None
    pid: int | None
    status: int = 0
    released: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait(self) -> int:
        await self.released.wait()
        return self.status


class FakeLauncher:
    name = "fake"

    def __init__(
        self,
        *,
        status: int = 0,
        result: str | None = None,
        fail: str | None = None,
        finish_at_once: bool = True,
        engine: Any = None,
    ) -> None:
        self.engine = engine  # what the fake engine reports to the server while it runs
        self.status = status
        self.result = result
        self.fail = fail
        self.finish_at_once = finish_at_once
        self.requests: list[LaunchRequest] = []
        self.calls: list[str] = []
        self.handle: FakeHandle | None = None

    async def launch(self, request: LaunchRequest) -> FakeHandle:
        self.requests.append(request)
        if self.fail:
            raise LaunchError(self.fail)
        if self.engine is not None:
            self.engine()
        self.handle = FakeHandle(
            request.flow_run_id, f"unit-{request.flow_run_id}", None, self.status
        )
        if self.finish_at_once:
            self.handle.released.set()
        return self.handle

    async def terminate(self, handle: Any) -> None:
        self.calls.append("terminate")
        handle.status = 143
        handle.released.set()

    async def kill(self, handle: Any) -> None:
        self.calls.append("kill")

    async def unit_result(self, handle: Any) -> str | None:
        return self.result

    def read_exit_record(self, run_dir: Path) -> int | None:
        path = run_dir / "exit-status"
        return int(path.read_text()) if path.exists() else None
