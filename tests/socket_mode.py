"""A fake of Slack's Socket Mode, speaking its real protocol to the real slack_sdk client.

`SocketModeSlack` is the fake Web API plus `apps.connections.open`, which answers (for an
app-level token) a `ws://` URL of its own WebSocket server (aiohttp, on a thread). Each
`rotor serve` that connects says hello and gets a connection of its own, numbered in the
order they connected. `send(n, type, payload)` pushes an envelope down connection n, as Slack
does for a slash command (`slash_commands`) or a click (`interactive`), and `ack(id)` waits
for the client's acknowledgement: a message carrying the envelope_id (and the response
payload, if any).
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from demo.slack_api import FakeSlack
from tests.waiting import wait_for


@dataclass
class SocketModeSlack(FakeSlack):
    opened: int = 0  # apps.connections.open calls
    acks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # envelope -> acks
    _sockets: list[web.WebSocketResponse] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None
    _ws_port: int = 0

    def start(self) -> SocketModeSlack:
        super().start()
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), name="fake-socket-mode",
                         daemon=True).start()
        if not ready.wait(30):
            raise RuntimeError("the fake Socket Mode server did not start")
        return self

    def _serve(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        app = web.Application()
        app.router.add_get("/link", self._link)
        self._runner = web.AppRunner(app)
        loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        server = site._server
        assert server is not None
        self._ws_port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        ready.set()
        loop.run_forever()

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
        super().stop()

    async def _link(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        with self._lock:
            self._sockets.append(ws)
            count = len(self._sockets)
        await ws.send_str(json.dumps({"type": "hello", "num_connections": count,
                                      "connection_info": {"app_id": "A0ROTOR"},
                                      "debug_info": {"host": "fake-socket-mode"}}))
        async for message in ws:
            if message.type != WSMsgType.TEXT:
                continue
            data = json.loads(message.data)
            if "envelope_id" in data:
                with self._lock:
                    self.acks.setdefault(str(data["envelope_id"]), []).append(data)
        return ws

    def _api(self, method: str, p: dict[str, Any]) -> dict[str, Any]:
        if method == "apps.connections.open":
            self.opened += 1
            return {"ok": True, "url": f"ws://127.0.0.1:{self._ws_port}/link?n={self.opened}"}
        return super()._api(method, p)

    @property
    def connections(self) -> int:
        with self._lock:
            return sum(1 for ws in self._sockets if not ws.closed)

    def send(self, n: int, kind: str, payload: dict[str, Any]) -> str:
        """Push an envelope down the n-th connection (0: the first to connect)."""
        envelope = str(uuid.uuid4())
        body = json.dumps({"envelope_id": envelope, "type": kind, "payload": payload,
                           "accepts_response_payload": kind != "events_api",
                           "retry_attempt": 0, "retry_reason": ""})
        assert self._loop is not None
        with self._lock:
            ws = self._sockets[n]
        asyncio.run_coroutine_threadsafe(ws.send_str(body), self._loop).result(10)
        return envelope

    def ack(self, envelope: str, timeout: float | None = None) -> list[dict[str, Any]]:
        """Every acknowledgement of the envelope, once there is one."""
        def got() -> list[dict[str, Any]]:
            with self._lock:
                return list(self.acks.get(envelope, []))
        return list(wait_for(got, what=f"an ack of envelope {envelope}", timeout=timeout))
