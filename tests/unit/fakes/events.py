"""A fake Prefect events server: the server side of /api/events/out over real websockets."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.asyncio.server import Server, ServerConnection

Script = Callable[[ServerConnection, int], Awaitable[None]]


class FakeEventsServer:
    """Speaks the server side of /api/events/out; `script(ws, n)` drives connection n."""

    def __init__(self) -> None:
        self.auths: list[dict[str, Any]] = []
        self.filters: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.subprotocols: list[str | None] = []
        self.paths: list[str] = []
        self.refuse_auth = False
        self.script: Script = self.hold
        self.connections = 0
        self.closed = 0
        self.server: Server | None = None
        self.port = 0

    @staticmethod
    async def hold(ws: ServerConnection, n: int) -> None:
        await ws.wait_closed()

    async def handler(self, ws: ServerConnection) -> None:
        n = self.connections
        self.connections += 1
        assert ws.request is not None
        self.paths.append(ws.request.path)
        self.headers.append(dict(ws.request.headers.raw_items()))
        self.subprotocols.append(ws.subprotocol)
        try:
            auth = json.loads(await ws.recv())
            self.auths.append(auth)
            if self.refuse_auth:
                await ws.close(1008, "Invalid token")
                return
            await ws.send(json.dumps({"type": "auth_success"}))
            self.filters.append(json.loads(await ws.recv()))
            await self.script(ws, n)
        finally:
            self.closed += 1

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"
