"""``serve --adapt-after S``: a running server learns an engine from its own first seconds of
frames in a niced child process (``scopecast adapt``) and swaps to it when its gate passes,
while the old engine serves every frame."""

from __future__ import annotations

import time

import numpy as np
import pytest
from test_server import send_frame, started_hook

pytest.importorskip("torch", reason="adaptation needs the train extra")

from calibration.sim.pairs import PairRig
from calibration.sim.presets import get_preset
from stream.control import request
from stream.server import EngineServer, ServerConfig, ServerError


def still_frames(n: int, side: int = 64) -> list[np.ndarray]:
    """Noisy fast-scan frames of one still field of the simulated confocal rig."""
    rig = PairRig(get_preset("confocal-20fps"), field=side)
    rng = np.random.default_rng(3)
    return [rig.low(0.0, (5.0, -5.0), rng) for _ in range(n)]


def test_adapt_after_adapts_in_a_child_process_and_swaps(tmp_path, servers):
    srv = servers(tmp_path, "--engine", "confocal-denoise", "--mode", "complete",
                  "--adapt-after", "0.1", "--adapt-steps", "4")  # fmt: skip
    frames = still_frames(24)
    hook = started_hook(srv.listen)
    for t in range(11):
        send_frame(hook, frames[t], t)
    time.sleep(0.3)
    send_frame(hook, frames[11], 11)  # 0.1 s after the first: these 12 are the recording
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        status = request(srv.control, "status")
        adapt, swap = status.get("adapt") or {}, status.get("swap") or {}
        if adapt.get("state") in ("refused", "failed") or swap.get("state") in ("done", "failed"):
            break
        time.sleep(0.5)
    assert adapt["base"] == "confocal-denoise" and adapt["frames"] == 12, adapt
    log = srv.run_dir / "adapt" / "adapt.log"
    assert adapt["state"] in ("swapping", "refused"), (adapt, log.is_file() and log.read_text())
    for t in range(12, 24):  # the server went on serving throughout
        send_frame(hook, frames[t], t)
    hook.close()
    summary = srv.stop({"scope": 24})
    assert summary["frames_enhanced"] == summary["frames_written"]["enhanced"] == 24
    if adapt["state"] == "swapping":  # the gate passed: the adapted engine serves
        assert summary["swap"]["state"] == "done", summary["swap"]
        assert summary["engine"]["engine"] == "confocal-denoise-adapted"
    else:  # refused: the base engine serves on, and status says why
        assert adapt["error"] and summary["engine"]["engine"] == "confocal-denoise"


def test_adapt_after_needs_a_single_denoiser(tmp_path):
    cfg = ServerConfig(engines=["bicubic-x2"], out_dir=tmp_path, adapt_after_s=5.0)
    with pytest.raises(ServerError, match="adapts a single denoiser"):
        EngineServer(cfg)
