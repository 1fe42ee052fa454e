"""Talk to a running server's control socket (``status``, ``stop``) — one request per socket,
so a server that does not answer never leaves a REQ socket stuck."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import zmq

from .endpoints import check_endpoint
from .security import Curve


class ControlError(RuntimeError):
    """No answer, or an error answer, from a server's control socket."""


class ServerGone(ControlError):
    """The server process ended without answering (see ``request``'s ``process``)."""


def request(
    endpoint: str,
    cmd: str,
    *,
    timeout_s: float = 2.0,
    curve: Curve | None = None,
    process: subprocess.Popen | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Send ``{"cmd": cmd, **fields}`` and return the server's JSON answer.

    With ``process`` (the server's), stop waiting a second after it ended (ServerGone)
    instead of waiting out ``timeout_s``."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        curve.client(sock)
    try:
        sock.connect(check_endpoint(endpoint))
        sock.send(json.dumps({"cmd": cmd, **fields}).encode())
        deadline = time.monotonic() + timeout_s
        gone_at = None
        while not sock.poll(int(min(0.2, timeout_s) * 1000)):
            if process is not None and gone_at is None and process.poll() is not None:
                gone_at = time.monotonic()  # a reply already on its way still gets a second
            if gone_at is not None and time.monotonic() - gone_at > 1.0:
                raise ServerGone(
                    f"the engine server at {endpoint} exited (code {process.returncode}) "
                    f"without answering {cmd!r}"
                )
            if time.monotonic() > deadline:
                raise ControlError(
                    f"no engine server answered on {endpoint} within {timeout_s:g} s: is "
                    "`scopecast serve` running there (see its --control option)?"
                )
        reply = json.loads(sock.recv())
    finally:
        sock.close(0)
    if isinstance(reply, dict) and "error" in reply:
        raise ControlError(f"server at {endpoint} refused {cmd!r}: {reply['error']}")
    return reply


def wait_ready(
    endpoint: str,
    *,
    timeout_s: float = 30.0,
    curve: Curve | None = None,
    process: subprocess.Popen | None = None,
) -> dict[str, Any]:
    """Poll ``status`` until the server answers; fail early if ``process`` exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            errors = process.stderr.read() if process.stderr else ""
            raise ControlError(
                f"the engine server exited with code {process.returncode} before it was ready:"
                f" {str(errors).strip()[-2000:]}"
            )
        try:
            return request(endpoint, "status", timeout_s=0.5, curve=curve)
        except ControlError:
            if time.monotonic() > deadline:
                raise
