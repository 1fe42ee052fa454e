"""ZeroMQ endpoints: parse them, and refuse to bind beyond this machine unless told to."""

from __future__ import annotations

import ipaddress
import logging
import re
import threading

from calibration.errors import ScopecastError

log = logging.getLogger(__name__)
_warned: set[str] = set()  # insecure binds already warned about, once per process
_warned_lock = threading.Lock()

_ENDPOINT = re.compile(r"^(?P<scheme>tcp|ipc|inproc)://(?P<rest>.+)$")
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "[::1]", "::1"}


class EndpointError(ScopecastError, ValueError):
    """An endpoint that is malformed, or that may not be used as asked."""


def check_endpoint(endpoint: str) -> str:
    """Return ``endpoint`` if it looks like tcp://HOST:PORT, ipc://PATH or inproc://NAME."""
    _parse(endpoint)
    return endpoint


def _parse(endpoint: str) -> re.Match[str]:
    """``endpoint`` split into ``scheme`` and ``rest``; EndpointError if it is malformed."""
    m = _ENDPOINT.match(endpoint)
    if not m or (m["scheme"] == "tcp" and not re.search(r":(\d+|\*)$", m["rest"])):
        raise EndpointError(
            f"endpoint {endpoint!r} is not tcp://HOST:PORT, ipc:///path or inproc://name "
            "(for example tcp://127.0.0.1:5555)"
        )
    return m


def is_loopback(endpoint: str) -> bool:
    """True for ipc/inproc endpoints and tcp endpoints on a loopback address."""
    m = _parse(endpoint)
    if m["scheme"] != "tcp":
        return True
    host = m["rest"].rsplit(":", 1)[0]
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(endpoint: str, *, insecure: bool = False, authenticated: bool = False) -> str:
    """Allow binding ``endpoint`` beyond loopback/ipc only with CURVE keys (``authenticated``)
    or an explicit ``insecure``, which warns."""
    if is_loopback(endpoint) or authenticated:
        return endpoint
    if not insecure:
        raise EndpointError(
            f"refusing to bind {endpoint}: it is reachable from other machines. Bind "
            "tcp://127.0.0.1:PORT, give CURVE keys with --keys DIR (make them with "
            "`scopecast keys DIR`), or pass --insecure to accept unauthenticated connections "
            "from the network"
        )
    with _warned_lock:
        first = endpoint not in _warned
        _warned.add(endpoint)
    if first:  # the server checks every endpoint first, its receiver checks its own again
        log.warning(
            "binding %s without authentication: anyone on the network can connect", endpoint
        )
    return endpoint
