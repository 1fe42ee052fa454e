"""The live viewer's web server (aiohttp): subscribes to an engine server's PUB stream, polls its
control socket, and pushes the newest frames and numbers to every browser over WebSocket.

Browser <-> viewer messages on ``/ws``:

- viewer -> browser, binary: one frame, see :func:`stream.viewer.latest.encode_frame`.
- viewer -> browser, text JSON: ``{"type": "keys", "keys": [...]}`` when a new key appears,
  ``{"type": "status", ...}`` about once a second (server numbers or why there are none).
- browser -> viewer, text JSON: ``{"select": KEY}`` and ``{"ack": "raw" | "enhanced"}`` once a
  frame is drawn; the next frame of that pane is sent only then (latest-frame-wins).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.typedefs import Handler
from pydantic import BaseModel, ConfigDict, Field

from calibration.errors import ScopecastError

from ..control import ControlError
from ..control import status as server_status
from ..endpoints import check_endpoint
from ..protocol import ProtocolError, decode_published
from ..security import curve_or_none
from ..status import ServerStatus
from .access import COOKIE, check_request, is_loopback_host, token_for
from .latest import PANES, LatestFrames, PaneSlots

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
FPS_WINDOW_S = 3.0  # frame rates over a few seconds: frames arrive in bursts on a busy machine
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; connect-src 'self'; img-src 'self' data:",
    "Referrer-Policy": "no-referrer",  # the token must not leak to other sites
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


class ViewerConfig(BaseModel):
    """What ``scopecast view`` is told."""

    model_config = ConfigDict(extra="forbid")

    publish: str = Field("tcp://127.0.0.1:5556", description="the engine server's PUB endpoint")
    control: str | None = Field("tcp://127.0.0.1:5557", description="its control endpoint")
    host: str = Field("127.0.0.1", description="interface the web page is served on")
    port: int = Field(8765, ge=0, le=65535, description="0: any free port")
    token: str | None = Field(None, description="required from browsers; generated off loopback")
    keys: Path | None = Field(None, description="CURVE key folder for the server's sockets")
    status_every_s: float = Field(1.0, gt=0)
    max_mb: float = Field(512.0, gt=0, description="newest frames held for all keys together")


class ViewerError(ScopecastError, RuntimeError):
    """The viewer cannot start as configured (port in use, bad token)."""


class _Client:
    """One connected browser: what it watches, what it was sent, what it is still owed."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.slots = PaneSlots()
        self.text: dict[str, str] = {}  # newest JSON message of each type not yet sent
        self.wake = asyncio.Event()


class Viewer:
    """A running viewer: ``await start()`` returns the URL to open; ``await stop()`` ends it."""

    def __init__(self, config: ViewerConfig) -> None:
        self.config = c = config
        check_endpoint(c.publish)
        if c.control:
            check_endpoint(c.control)
        try:
            self.token = token_for(c.host, c.token)
        except ValueError as e:
            raise ViewerError(str(e)) from e
        self.curve = curve_or_none(c.keys)
        self.latest = LatestFrames(int(c.max_mb * 2**20))
        self.clients: set[_Client] = set()
        self.rejected: Counter[str] = Counter()
        self.url = ""
        self._status: dict[str, Any] = {"ok": False, "error": "waiting for the first status"}
        self._fps: dict[str, float] = {}
        self._tasks: list[asyncio.Task] = []
        self._runner: web.AppRunner | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._sub: zmq.asyncio.Socket | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> str:
        """Listen for browsers and subscribe to the server; return the page's URL."""
        c = self.config
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/", self._index)
        app.router.add_get("/ws", self._websocket)
        app.router.add_static("/static", STATIC)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, c.host, c.port).start()
        except OSError as e:
            await self._runner.cleanup()
            raise ViewerError(
                f"cannot serve the viewer on {c.host}:{c.port}: {e.strerror or e}; choose "
                "another --port (0 picks a free one)"
            ) from e
        port = self._runner.addresses[0][1]
        self._ctx = zmq.asyncio.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.RCVHWM, 16)
        if self.curve is not None:
            self.curve.client(self._sub)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(c.publish)  # reconnects by itself when the server restarts
        self._tasks = [asyncio.create_task(self._subscribe()), asyncio.create_task(self._poll())]
        self.url = _url(c.host, port, self.token)
        return self.url

    async def stop(self) -> None:
        """Close every browser's connection, the web server and the ZeroMQ sockets."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        closing = [c.ws.close(code=WSCloseCode.GOING_AWAY, message=b"viewer stopped")
                   for c in self.clients]  # fmt: skip
        if closing:  # a browser that does not answer the close is not waited for long
            await asyncio.wait([asyncio.ensure_future(c) for c in closing], timeout=2.0)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._sub is not None:
            self._sub.close(0)
        if self._ctx is not None:
            self._ctx.term()

    # -- ZeroMQ side ----------------------------------------------------------------------

    async def _subscribe(self) -> None:
        assert self._sub is not None
        while True:
            frames = await self._sub.recv_multipart(copy=False)
            try:
                header, pixels = decode_published(frames)
            except ProtocolError as e:
                if not self.rejected[e.kind]:
                    log.warning("rejected a published message (%s): %s", e.kind, e)
                self.rejected[e.kind] += 1
                continue
            watched = set().union(*(cl.slots.topics for cl in self.clients))
            if self.latest.put(header, pixels, watched):
                self._broadcast("keys", self._keys_message())
            for client in self.clients:
                if header.key == client.slots.key:
                    client.wake.set()

    async def _poll(self) -> None:
        """Ask the server for its status about once a period; say so when it does not answer."""
        c = self.config
        history: deque[tuple[float, dict[str, int]]] = deque()  # (time, frames per topic)
        while True:
            started = time.monotonic()
            if c.control is None:
                self._status = {
                    "ok": False,
                    "error": "no control endpoint given: no server numbers",
                }
            else:
                try:
                    reply = await asyncio.to_thread(
                        server_status, c.control, timeout_s=max(c.status_every_s, 1.0),
                        curve=self.curve,
                    )  # fmt: skip
                    self._status = {"ok": True, "server": _brief(reply)}
                except (ControlError, zmq.ZMQError, ValueError) as e:
                    self._status = {"ok": False, "error": f"server not answering on {c.control}",
                                    "detail": str(e)}  # fmt: skip
            now = time.monotonic()
            history.append((now, dict(self.latest.counts)))
            while now - history[0][0] > FPS_WINDOW_S:
                history.popleft()
            then, counts = history[0]
            if now > then:
                self._fps = {
                    t: (n - counts.get(t, 0)) / (now - then) for t, n in history[-1][1].items()
                }
            for client in self.clients:
                client.text["status"] = self._status_message(client)
                client.wake.set()
            await asyncio.sleep(max(0.0, c.status_every_s - (time.monotonic() - started)))

    # -- browser side ---------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # aiohttp's Middleware protocol calls it with these parameter names
        why = check_request(
            token=self.token,
            given=request.query.get("token") or request.cookies.get(COOKIE),
            host_header=request.host,
            origin=request.headers.get("Origin") if request.path == "/ws" else None,
        )
        if why:
            return web.Response(status=403, text=f"scopecast viewer: {why}\n")
        resp = await handler(request)
        if not resp.prepared:  # a WebSocket is prepared (and already upgraded) by now
            resp.headers.update(HEADERS)
        return resp

    async def _index(self, req: web.Request) -> web.StreamResponse:
        resp = web.FileResponse(STATIC / "index.html")
        if self.token is not None:  # later requests (script, WebSocket) carry it as a cookie
            resp.set_cookie(COOKIE, self.token, httponly=True, samesite="Strict")
        return resp

    async def _websocket(self, req: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=10.0, max_msg_size=4096, compress=False)
        await ws.prepare(req)
        client = _Client(ws)
        self.clients.add(client)
        client.text["keys"] = self._keys_message()
        client.text["status"] = self._status_message(client)
        client.wake.set()
        sender = asyncio.create_task(self._send(client))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    self._on_message(client, msg.data)
        finally:
            self.clients.discard(client)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        return ws

    def _on_message(self, client: _Client, text: str) -> None:
        try:
            msg = json.loads(text)
        except ValueError:
            return
        if not isinstance(msg, dict):
            return
        if "select" in msg:
            key = msg["select"]
            client.slots.select(key if isinstance(key, str) and key in self.latest.keys else None)
        if msg.get("ack") in PANES:
            client.slots.ack(msg["ack"])
        client.wake.set()

    async def _send(self, client: _Client) -> None:
        """The only writer of one browser's socket: text first, then the frames now due."""
        ws = client.ws
        try:
            while not ws.closed:
                await client.wake.wait()
                client.wake.clear()
                while client.text:
                    await ws.send_str(client.text.pop(next(iter(client.text))))
                for frame in client.slots.due(self.latest):
                    await ws.send_bytes(frame.message)
        except (ConnectionError, RuntimeError) as e:  # the browser went away mid-send
            log.debug("browser connection closed: %s", e)

    def _broadcast(self, kind: str, message: str) -> None:
        for client in self.clients:
            client.text[kind] = message
            client.wake.set()

    def _keys_message(self) -> str:
        keys = [asdict(k) for k in sorted(self.latest.keys.values(), key=lambda k: k.key)]
        return json.dumps({"type": "keys", "keys": keys})

    def _status_message(self, client: _Client) -> str:
        key = client.slots.key
        return json.dumps({
            "type": "status",
            **self._status,
            "fps": {p: self._fps.get(f"{key}/{p}") for p in PANES},
            "not_shown": client.slots.not_shown,
            "viewer": {"browsers": len(self.clients), "rejected": dict(self.rejected),
                       "publish": self.config.publish, "control": self.config.control},
        })  # fmt: skip


#: ServerStatus fields the page shows as they are (see status.schema.json beside viewer.js).
SHOWN = {"healthy", "failure", "mode", "uptime_s", "frames_received", "frames_enhanced",
         "frames_skipped", "frames_missing", "engine_errors", "stage_errors",
         "fidelity_mismatch", "frames_flagged"}  # fmt: skip


def _brief(status: ServerStatus) -> dict[str, Any]:
    """The part of a server status the page shows: the engine's name and scale, each backend
    as "name device", p50 and p99 of each stage, and the :data:`SHOWN` fields."""
    engine = status.engine
    return {
        "engine": engine.engine,
        "scale": engine.scale,
        "backend": [" ".join(x for x in (b.name, b.device) if x) for b in engine.backend],
        "latency_ms": {s: {"p50": v.p50, "p99": v.p99} for s, v in status.latency_ms.items()},
        **status.model_dump(mode="json", include=SHOWN),
    }


def _url(host: str, port: int, token: str | None) -> str:
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/" + (f"?token={token}" if token else "")


def serve(config: ViewerConfig, on_ready: Callable[[str], None]) -> None:
    """Run a viewer until SIGINT or SIGTERM; ``on_ready`` gets its URL once it listens."""

    async def main() -> None:
        viewer = Viewer(config)
        on_ready(await viewer.start())
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        try:
            await stopping.wait()
        finally:
            await viewer.stop()

    asyncio.run(main())


__all__ = ["Viewer", "ViewerConfig", "ViewerError", "is_loopback_host", "serve"]
