"""Who may open the viewer: anyone on this machine when it listens on loopback; only holders of
its token when it listens beyond (a token is generated when none is given)."""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from urllib.parse import urlsplit

COOKIE = "scopecast_token"
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_loopback_host(host: str) -> bool:
    """True for 'localhost' and loopback addresses (127.0.0.0/8, ::1)."""
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_for(host: str, token: str | None) -> str | None:
    """The token the viewer requires: the given one; a new random one when ``host`` is not
    loopback and none was given, so the viewer never serves the network without one."""
    if token is not None and len(token) < 8:
        raise ValueError(f"--token {token!r} is too short: use at least 8 characters")
    if token is None and not is_loopback_host(host):
        return secrets.token_urlsafe(18)
    return token


def _host_of(value: str) -> str:
    """'example.org' from a Host header 'example.org:8765' or an Origin 'http://example.org'."""
    netloc = urlsplit(value).netloc if "//" in value else value
    return urlsplit(f"//{netloc}").hostname or ""


def check_request(
    *,
    token: str | None,
    given: str | None,
    host_header: str | None,
    origin: str | None,
) -> str | None:
    """None when a request may proceed, else why it may not.

    ``given`` is the token from the URL or the cookie. Without a token (loopback only) the Host
    header must name a loopback host, which defeats DNS rebinding; a WebSocket whose Origin is
    another site than the page's is refused either way (cross-site WebSocket hijacking).
    """
    if origin and host_header and urlsplit(origin).netloc != host_header:
        return f"origin {origin} is not this viewer ({host_header})"
    if token is None:
        if host_header and not is_loopback_host(_host_of(host_header)):
            return f"host {host_header} is not loopback: this viewer serves this machine only"
        return None
    if given is None or not hmac.compare_digest(given.encode(), token.encode()):
        return (
            "a valid token is required: open the URL with ?token=... that `scopecast view` printed"
        )
    return None
