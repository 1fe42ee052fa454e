"""Real pymmcore-plus MDAs through the hook to a receiver in another process."""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import useq
from scipy import ndimage

from calibration.sim.presets import PRESETS
from stream import acquire
from stream.hook import FrameHook
from stream.simulated import SimulatedMicroscope


class Recorder:
    """A second output handler: what the acquisition produced, on the acquisition side."""

    def __init__(self) -> None:
        self.frames: list[dict] = []

    def frameReady(self, img: np.ndarray, event: useq.MDAEvent, meta: dict) -> None:
        self.frames.append(
            {
                "t": time.monotonic(),
                "crc32": zlib.crc32(img),
                "index": {k.value if hasattr(k, "value") else k: v for k, v in event.index.items()},
                "channel": event.channel.config if event.channel else None,
            }
        )


def run_to_receiver(core, seq: useq.MDASequence, tmp_path: Path):
    headers = tmp_path / "headers.jsonl"
    rec = Recorder()
    sent, summary = acquire.run_with_receiver(core, seq, stream="test", headers=headers, also=[rec])
    received = [json.loads(line) for line in headers.read_text().splitlines()]
    return sent, rec, summary, received


def assert_all_frames_arrived_in_order(sent, rec, summary, received, total: int) -> None:
    assert sent["frames_seen"] == total and sent["frames_not_handed_over"] == 0, sent
    assert summary["frames_received"] == total
    assert summary["frames_missing"] == 0 and summary["frames_out_of_order"] == 0
    assert [h["seq"] for h in received] == list(range(total))
    assert [h["index"] for h in received] == [f["index"] for f in rec.frames]
    assert [h["crc32"] for h in received] == [f["crc32"] for f in rec.frames]
    assert [h.get("channel") for h in received] == [f["channel"] for f in rec.frames]


@pytest.mark.slow
def test_20fps_mda_every_frame_arrives_in_order(tmp_path: Path) -> None:
    scope = SimulatedMicroscope("confocal-20fps")
    seq = scope.preset.sequence(duration_s=2.5)  # 50 frames at 20 fps
    total = sum(1 for _ in seq)
    assert total == 50
    sent, rec, summary, received = run_to_receiver(scope.core, seq, tmp_path)
    assert_all_frames_arrived_in_order(sent, rec, summary, received, total)
    events = list(seq)
    for h, ev in zip(received, events, strict=True):
        assert h["shape"] == [256, 256] and h["dtype"] == "uint16"
        assert h["pixel_size_um"] == pytest.approx(0.1)
        assert h["exposure_ms"] == pytest.approx(ev.exposure)
        assert h["stream"] == "test" and h["acquisition"] == str(seq.uid)
    intervals = np.diff([f["t"] for f in rec.frames])
    assert np.median(intervals) == pytest.approx(0.05, rel=0.15)


@pytest.mark.slow
def test_any_useq_sequence_positions_grid_z_channels(tmp_path: Path) -> None:
    scope = SimulatedMicroscope("confocal-20fps")
    seq = useq.MDASequence(
        stage_positions=[(0, 0, 0), (40, -30, 1.0)],
        grid_plan={"rows": 1, "columns": 2},
        z_plan={"range": 1.0, "step": 0.5},
        channels=[{"config": "FITC", "exposure": 5}, {"config": "DAPI", "exposure": 5}],
        time_plan={"interval": 0, "loops": 2},
        axis_order="tpgcz",
    )
    total = sum(1 for _ in seq)
    sent, rec, summary, received = run_to_receiver(scope.core, seq, tmp_path)
    assert_all_frames_arrived_in_order(sent, rec, summary, received, total)
    stages = {(h["index"]["p"], h["index"]["g"], h["index"]["z"]): h["stage"] for h in received}
    assert len({(s["x"], s["y"], s["z"]) for s in stages.values()}) == len(stages)


@pytest.mark.slow
def test_acquisition_keeps_its_pace_when_nobody_receives(endpoint: str) -> None:
    scope = SimulatedMicroscope("confocal-20fps")
    seq = scope.preset.sequence(duration_s=2.0)
    hook = FrameHook(endpoint)  # nothing listens there
    rec = Recorder()
    t0 = time.monotonic()
    scope.core.run_mda(seq, output=[hook, rec]).join()
    elapsed = time.monotonic() - t0
    hook.close()
    assert hook.stats.frames_seen == 40
    assert hook.stats.not_handed_over == {"no_receiver_or_hwm": 40}
    assert np.median(np.diff([f["t"] for f in rec.frames])) == pytest.approx(0.05, rel=0.15)
    assert elapsed < 2.0 * 1.5


@pytest.mark.slow
def test_real_cmmcoreplus_with_demo_config(tmp_path: Path) -> None:
    """The same hook on a real CMMCorePlus running Micro-Manager's C++ DemoCamera."""
    mm_test_adapters = pytest.importorskip("mm_test_adapters")
    cfg = Path(mm_test_adapters.device_adapter_path()) / "MMConfig_demo.cfg"
    core = acquire.load_config(cfg)
    core.setProperty("Camera", "Mode", "Noise")  # content changes every frame
    seq = useq.MDASequence(time_plan={"interval": 0, "loops": 12}, channels=["DAPI", "FITC"])
    sent, rec, summary, received = run_to_receiver(core, seq, tmp_path)
    assert_all_frames_arrived_in_order(sent, rec, summary, received, 24)
    assert len({h["crc32"] for h in received}) == 24


def test_presets_are_the_two_rigs() -> None:
    cd, cf = PRESETS["celldiscoverer"], PRESETS["confocal-20fps"]
    assert cf.shape == (256, 256) and cf.frame_interval_s == 0.05 and cf.scan.bidirectional
    assert cd.shape == (2048, 2048) and len(cd.positions) > 1


def test_confocal_high_quality_scan_is_the_same_scene_at_twice_the_sampling() -> None:
    scope = SimulatedMicroscope("confocal-20fps")
    fast = scope.scene.forward_model("FITC")
    slow = scope.scene.forward_model("FITC", high_quality=True)
    t = 3.0
    lo = fast.expected_photons(scope.scene.fine_photons(t, "FITC", 30, (0, 0)))
    hi_fine = scope.scene.fine_photons(t, "FITC", 30, (0, 0), high_quality=True)
    hi = slow.expected_photons(hi_fine)
    assert lo.shape == (256, 256) and hi.shape == (512, 512)
    # same structure: the slow scan binned 2x2 matches the fast one (16x the dwell)
    hi_binned = hi.reshape(256, 2, 256, 2).sum(axis=(1, 3)) / 16
    r = np.corrcoef(lo.ravel(), hi_binned.ravel())[0, 1]
    assert r > 0.9, r
    frame = scope.high_quality(t, seed=1)
    assert frame.shape == (512, 512) and frame.dtype == np.uint16


@pytest.mark.parametrize("preset", list(PRESETS))
def test_simulated_noise_matches_the_forward_model(preset: str) -> None:
    """Photon transfer on frames of a frozen scene and a dark series, through the core: the
    fitted gain, offset and read noise are the forward model's parameters."""
    from bench.sim_noise import measure

    m = measure(preset)
    assert m["gain"] == pytest.approx(m["gain_model"], rel=0.08)
    assert m["offset"] == pytest.approx(m["offset_model"], abs=0.2)
    assert m["read_noise_e"] == pytest.approx(m["read_noise_model"], rel=0.1)


def test_celldiscoverer_focus_drifts_so_frames_go_out_of_focus() -> None:
    preset = PRESETS["celldiscoverer"].model_copy(update={"shape": (512, 512)})
    scope = SimulatedMicroscope(preset)

    def sharpness(z: float) -> float:
        img = np.zeros((512, 512), np.uint16)
        scope.scene.record(img, t_s=0.0, channel="BF", exposure_ms=10, xyz_um=(0, 0, z))
        gy, gx = np.gradient(ndimage.gaussian_filter(img.astype(float), 2))  # not the noise
        return float(np.mean(gx**2 + gy**2))

    focus0 = preset.focus.focus_z(0.0, 0, 0)
    s0, s5, s15 = (sharpness(focus0 + dz) for dz in (0, 5, 15))
    assert s0 > s5 > s15 and s0 > 2 * s15, (s0, s5, s15)
    zs = [preset.focus.focus_z(t, 0, 0) for t in np.linspace(0, 86400, 50)]
    assert max(zs) - min(zs) > 5  # over a day the focal plane wanders by several um
