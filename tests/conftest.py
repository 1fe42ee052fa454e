from __future__ import annotations

import logging

import pytest

from stream.acquire import free_endpoint

logging.getLogger("pymmcore-plus").setLevel(logging.CRITICAL)


@pytest.fixture
def endpoint() -> str:
    return free_endpoint()


@pytest.fixture
def servers():
    """``servers(out, *args, **kw)`` starts a ``test_server.Server``; all are killed after the
    test. Shared here so that test_server_faults need not import (and shadow) a fixture."""
    from test_server import Server  # needs onnx (skips without it): only where servers are used

    started: list[Server] = []

    def start(*args, **kw) -> Server:
        started.append(Server(*args, **kw))
        return started[-1]

    yield start
    for s in started:
        s.kill()
