from __future__ import annotations

import logging

import pytest

from stream.acquire import free_endpoint

logging.getLogger("pymmcore-plus").setLevel(logging.CRITICAL)


@pytest.fixture
def endpoint() -> str:
    return free_endpoint()
