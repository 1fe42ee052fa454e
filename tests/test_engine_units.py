"""Engines in physical units: the shipped learned engines work in electrons, give exactly what
their ADU manifests gave on the rig they were trained on, and take another camera's units from
its calibration profile (offset, column offsets, gain) instead of being fed out-of-range data."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

from calibration.camera import CameraParams, record
from calibration.metrics import psnr
from calibration.profile import CalibrationProfile
from calibration.sim.pairs import PairRig
from calibration.sim.presets import get_preset
from calibration.units import Electrons
from engines.engine import EngineChain
from engines.package import Manifest, Normalization, load_package, write_package
from stream.acquire import free_endpoint
from stream.server import EngineServer, ServerConfig

TRAINED_ON = {
    "confocal-denoise": "confocal-20fps",
    "confocal-denoise-sr2x": "confocal-20fps",
    "brightfield-deblur": "celldiscoverer",
}


def _adu_twin(name: str, tmp_path) -> EngineChain:
    """The same model with the ADU normalization its manifest had before units existed."""
    package = load_package(name)
    m = package.manifest
    n, cam = m.normalization, m.normalization.camera
    assert n.units == "electrons" and cam is not None
    trained = get_preset(TRAINED_ON[name]).camera  # the manifest assumes the training camera
    assert (cam.offset_adu, cam.gain_adu_per_electron) == (
        trained.offset_adu,
        trained.gain_adu_per_electron,
    )
    g = cam.gain_adu_per_electron
    adu = Normalization(offset=n.offset * g + cam.offset_adu, scale=n.scale * g)
    twin = Manifest.model_validate({**m.model_dump(), "normalization": adu.model_dump()})
    write_package(tmp_path / name, twin, {"model.onnx": package.read("model.onnx")})
    return EngineChain.open([tmp_path / name], "onnxruntime-cpu")


@pytest.mark.parametrize("name", sorted(TRAINED_ON))
def test_electrons_engine_matches_its_adu_past_on_the_training_rig(name: str, tmp_path) -> None:
    camera = get_preset(TRAINED_ON[name]).camera
    old = _adu_twin(name, tmp_path)
    new = EngineChain.open([name], "onnxruntime-cpu")
    assert old.engines[0].units is None and new.engines[0].units is not None
    assert "no profile, assuming" in new.describe()["units"][0]
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    photons = 20 + 15 * np.sin(yy / 5.0) * np.cos(xx / 7.0) + rng.gamma(2.0, 10.0, (64, 64))
    frames = [record(photons * (1 + 0.1 * i), camera, rng) for i in range(3)]
    prev_old: dict[int, np.ndarray] = {}
    prev_new: dict[int, np.ndarray] = {}
    for i in range(1, len(frames) + 1):
        a = old.enhance(frames[:i], prev_old, frames[0])
        b = new.enhance(frames[:i], prev_new, frames[0])
        ya, yb = a.stages[-1].output, b.stages[-1].output
        np.testing.assert_allclose(yb, ya, rtol=1e-6, atol=1e-3 * camera.gain_adu_per_electron)
        assert np.mean(a.frame != b.frame) < 1e-3  # rounding ties at most
        prev_old, prev_new = {0: ya}, {0: yb}
    old.close()
    new.close()


OTHER = CameraParams(offset_adu=300, gain_adu_per_electron=3.0, read_noise_electrons=0.3,
                     quantum_efficiency=0.45, bit_depth=16)  # fmt: skip


def _psnr_e(truth_e: np.ndarray, out: np.ndarray, conv: Electrons) -> float:
    return psnr(truth_e, conv.to_electrons(out), data_range=float(np.ptp(truth_e)))


def test_a_profile_brings_another_cameras_frames_back_in_range(tmp_path) -> None:
    """confocal-denoise on a camera with another offset, gain and sCMOS column offsets: with
    the rig's profile the output is much closer to the truth than with the manifest's camera,
    and about as close as on the camera it was trained on."""
    preset = get_preset("confocal-20fps")
    train_rig = PairRig(preset, field=64, seed=0)
    other_rig = PairRig(preset.model_copy(update={"camera": OTHER}), field=64, seed=0)
    columns = np.random.default_rng(7).integers(-25, 40, 64).astype(np.float32)
    offset_map = np.broadcast_to(OTHER.offset_adu + columns, (64, 64)).astype(np.float32)
    profile = CalibrationProfile(rig="other", pixel_size_um=preset.pixel_size_um,
                                 camera=OTHER).with_arrays(offset_map=offset_map)  # fmt: skip
    rig_units = Electrons.from_profile(profile)
    trained_units = Electrons.from_camera(preset.camera)
    plain = EngineChain.open(["confocal-denoise"], "onnxruntime-cpu")
    calibrated = EngineChain.open(["confocal-denoise"], "onnxruntime-cpu", units=rig_units)
    no_map = Electrons.from_camera(OTHER)  # offset and gain, not the column offsets
    scalar = EngineChain.open(["confocal-denoise"], "onnxruntime-cpu", units=no_map)
    scores: dict[str, list[float]] = {"trained": [], "none": [], "no-map": [], "profile": []}
    rng = np.random.default_rng(1)
    for _ in range(3):
        t, xy = float(rng.uniform(0, 5)), (float(rng.uniform(-20, 20)), float(rng.uniform(-20, 20)))
        truth_e = trained_units.to_electrons(train_rig.target(t, xy, 1, "expected", rng))
        own = train_rig.low(t, xy, rng)
        other = (other_rig.low(t, xy, rng) + columns).astype(np.uint16)  # column offsets
        out = plain.enhance([own], {}, None).frame
        scores["trained"].append(_psnr_e(truth_e, out, trained_units))
        out = plain.enhance([other], {}, None).frame
        scores["none"].append(_psnr_e(truth_e, out, rig_units))
        out = scalar.enhance([other], {}, None).frame
        scores["no-map"].append(_psnr_e(truth_e, out, rig_units))
        out = calibrated.enhance([other], {}, None).frame
        scores["profile"].append(_psnr_e(truth_e, out, rig_units))
    mean = {k: float(np.mean(v)) for k, v in scores.items()}
    print("PSNR (dB) vs truth, in electrons:", mean)
    assert mean["profile"] > mean["none"] + 10.0  # offset 300 read as 50: far out of range
    assert mean["profile"] > mean["no-map"] + 1.0  # the column offsets matter too
    assert mean["profile"] > mean["trained"] - 1.5
    for chain in (plain, scalar, calibrated):
        chain.close()


def test_the_server_says_which_units_it_assumes(tmp_path, caplog) -> None:
    profile = CalibrationProfile(rig="bench-rig", pixel_size_um=0.1, camera=OTHER)
    profile.save(tmp_path / "profile")
    for given in (None, tmp_path / "profile"):
        config = ServerConfig(engines=["confocal-denoise"], out_dir=tmp_path / "runs",
                              listen=free_endpoint(), publish=None, control=free_endpoint(),
                              backend="onnxruntime-cpu", profile=given)  # fmt: skip
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="stream.server"):
            server = EngineServer(config)
        runner = threading.Thread(target=server.run)
        runner.start()
        try:
            (units,) = server.status().engine.units
        finally:
            server.stop()
            runner.join(60)
        if given is None:
            assert units.startswith("electrons: no profile, assuming confocal-denoise's")
            assert "offset 50 ADU, gain 8 ADU/e-" in units
            assert any("no --profile" in r.getMessage() for r in caplog.records)
        else:
            assert units.startswith("electrons: profile 'bench-rig'")
            assert "offset 300 ADU, gain 3 ADU/e-" in units
