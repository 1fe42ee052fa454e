from __future__ import annotations

import io
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage

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


def stand_in_cells(side: int = 100, seed: int = 0) -> np.ndarray:
    """Blurred bright nuclei on a dark background, 8-bit like BBBC007."""
    rng = np.random.default_rng(seed)
    spots = (rng.random((side, side)) > 0.992).astype(np.float64)
    return np.clip(5 + 4000 * ndimage.gaussian_filter(spots, 2.5), 0, 255).astype(np.uint8)


def tiff_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, array)
    return buf.getvalue()


def stand_in_wheel(path: Path, members: dict[str, np.ndarray | bytes]) -> Path:
    """A minimal wheel at ``path``: a .dist-info and the members (arrays written as TIFFs)."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("fakepkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fakepkg\n")
        for name, data in members.items():
            z.writestr(name, data if isinstance(data, bytes) else tiff_bytes(data))
    return path


@pytest.fixture
def stand_in_wheels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``$SCOPECAST_CACHE`` (returned) whose wheels/ hold a stand-in wheel of every real-image
    source (calibration.sim.wheels.SOURCES) with two 8-bit cell images each: no network."""
    from calibration.sim.wheels import SOURCES

    root = tmp_path / "scopecast-cache"
    (root / "wheels").mkdir(parents=True)
    for i, src in enumerate(SOURCES.values()):
        release = src.version or "0.0.1"
        wheel = root / "wheels" / f"{src.package.replace('-', '_')}-{release}-py3-none-any.whl"
        members = [src.members.replace("*", f"x{k}", 1).replace("*", "cells") for k in range(2)]
        stand_in_wheel(wheel, {m: stand_in_cells(128, 10 * i + k) for k, m in enumerate(members)})
    monkeypatch.setenv("SCOPECAST_CACHE", str(root))
    return root
