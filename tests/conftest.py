from __future__ import annotations

import logging
import socket

import pytest

logging.getLogger("pymmcore-plus").setLevel(logging.CRITICAL)


def free_endpoint() -> str:
    """A tcp endpoint on loopback with a port nobody is using."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def endpoint() -> str:
    return free_endpoint()
