"""Talk to a running server's control socket (``status``, ``stop``, ``swap``) — one request per
socket, so a server that does not answer never leaves a REQ socket stuck.

:func:`status` and :func:`stop` return the server's answer as a :class:`ServerStatus`;
:func:`swap` starts a hot swap of the engine and :func:`wait_swap` follows it to its end;
:func:`request` returns any answer as the JSON it was sent as."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq
from pydantic import ValidationError

from calibration.errors import ScopecastError

from .endpoints import check_endpoint
from .security import Curve
from .status import ServerStatus, SwapInfo


class ControlError(ScopecastError, RuntimeError):
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
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.REQ)
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
            # gone_at is only ever set when there is a process
            if process is not None and gone_at is not None and time.monotonic() - gone_at > 1.0:
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


def status(
    endpoint: str,
    *,
    timeout_s: float = 2.0,
    curve: Curve | None = None,
    process: subprocess.Popen | None = None,
) -> ServerStatus:
    """The server's status (see :func:`request` for ``process``)."""
    reply = request(endpoint, "status", timeout_s=timeout_s, curve=curve, process=process)
    return parse_status(reply, endpoint)


def stop(
    endpoint: str,
    *,
    expect: dict[str, int] | None = None,
    timeout_s: float = 600.0,
    curve: Curve | None = None,
    process: subprocess.Popen | None = None,
) -> ServerStatus:
    """Ask the server to finish once ``expect[stream]`` frames of each stream arrived (up to
    ``timeout_s``); its final summary."""
    reply = request(endpoint, "stop", timeout_s=timeout_s, curve=curve, process=process,
                    expect=expect or {})  # fmt: skip
    return parse_status(reply, endpoint)


def swap(
    endpoint: str,
    engines: Sequence[str],
    *,
    backend: str | None = None,
    threads: int | None = None,
    timeout_s: float = 10.0,
    curve: Curve | None = None,
) -> int:
    """Ask the server to hot-swap its engine for ``engines`` (``backend``, ``threads``: default
    the ones in force); return the swap's number once the server accepted it (ControlError if
    it refused: another swap under way, a stopping server)."""
    fields: dict[str, Any] = {"engines": list(engines)}
    if backend is not None:
        fields["backend"] = backend
    if threads is not None:
        fields["threads"] = threads
    reply = request(endpoint, "swap", timeout_s=timeout_s, curve=curve, **fields)
    if not isinstance(reply.get("number"), int) or reply.get("swap") != "loading":
        raise ControlError(
            f"{endpoint} answered the swap request with {reply!r}: is it a server of the same "
            "scopecast version?"
        )
    return int(reply["number"])


def wait_swap(
    endpoint: str,
    number: int,
    *,
    timeout_s: float = 120.0,
    curve: Curve | None = None,
    on_state: Callable[[SwapInfo], None] | None = None,
    poll_s: float = 0.25,
) -> SwapInfo:
    """Poll ``status`` until swap ``number`` is done or failed, or ``timeout_s`` passed (then
    its state is still loading or ready); ``on_state`` sees every state polled."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = status(endpoint, curve=curve).swap
        if info is None or info.number < number:
            raise ControlError(
                f"the server at {endpoint} knows no swap {number}: was it restarted?"
            )
        if info.number > number:
            raise ControlError(
                f"swap {number} ended and swap {info.number} was asked for before its outcome "
                f"was seen: the server now serves {info.previous!r} or swaps to {info.engine!r}"
            )
        if on_state is not None:
            on_state(info)
        if info.state in ("done", "failed"):
            return info
        if time.monotonic() > deadline:
            return info
        time.sleep(poll_s)


def parse_status(reply: Any, endpoint: str = "the server") -> ServerStatus:
    """``reply`` (a ``status`` or ``stop`` answer) as a ServerStatus; ControlError if it is
    not one (a server of another version, or not a scopecast server)."""
    try:
        return ServerStatus.model_validate(reply)
    except ValidationError as e:
        raise ControlError(
            f"{endpoint} answered something that is not a scopecast server status "
            f"({e.error_count()} problems, first: {e.errors()[0]['loc']} {e.errors()[0]['msg']}): "
            "is it a server of the same scopecast version?"
        ) from e


def wait_ready(
    endpoint: str,
    *,
    timeout_s: float = 30.0,
    curve: Curve | None = None,
    process: subprocess.Popen | None = None,
) -> ServerStatus:
    """Poll ``status`` until the server answers (its first status); fail early if ``process``
    exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            errors = process.stderr.read() if process.stderr else ""
            raise ControlError(
                f"the engine server exited with code {process.returncode} before it was ready:"
                f" {str(errors).strip()[-2000:]}"
            )
        try:
            reply = request(endpoint, "status", timeout_s=0.5, curve=curve)
        except ControlError:
            if time.monotonic() > deadline:
                raise
            continue
        return parse_status(reply, endpoint)
