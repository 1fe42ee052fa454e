"""`scopecast calibrate` on the simulated microscope (real pymmcore-plus) recovers the
parameters it was built with, and the server uses the profile for live fidelity."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tifffile
import useq

from calibration.optics import defocus_sigma_um, psf_sigma_um
from calibration.profile import CalibrationProfile
from stream.acquire import free_endpoint
from stream.calibrate import measure_camera, measure_defocus
from stream.control import request, wait_ready
from stream.hook import FrameHook
from stream.simulated import SimulatedMicroscope
from stream.sinks.index import read_index


def scopecast(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stream", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    """One profile measured step by step through the CLI on the confocal preset."""
    path = tmp_path_factory.mktemp("profile")
    for step in (["camera", "--frames", "8", "--levels", "5"], ["bidir"],
                 ["optics", "--z-range", "0"]):  # fmt: skip
        run = scopecast("calibrate", *step, "--profile", str(path), "--yes")
        assert run.returncode == 0, run.stderr
    return path


@pytest.mark.slow
def test_calibration_recovers_the_simulated_rig(profile):
    preset = SimulatedMicroscope("confocal-20fps").preset
    p = CalibrationProfile.load(profile)
    truth = preset.camera
    assert p.camera.gain_adu_per_electron == pytest.approx(truth.gain_adu_per_electron, rel=0.05)
    assert abs(p.camera.offset_adu - truth.offset_adu) < 1
    assert p.camera.read_noise_electrons == pytest.approx(truth.read_noise_electrons, rel=0.10)
    assert abs(p.scan.phase_px - preset.scan.phase_px) < 0.1 and p.scan.bidirectional
    optics = preset.optics.model_copy(
        update={"wavelength_nm": preset.channels["FITC"].wavelength_nm}
    )
    assert p.psf_sigma_um == pytest.approx(psf_sigma_um(optics), rel=0.10)
    assert p.array("offset_map").shape == preset.shape
    assert (profile / "ptc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    show = scopecast("calibrate", "show", str(profile))
    assert show.returncode == 0 and "offset_map: (256, 256)" in show.stdout


@pytest.mark.slow
def test_defocus_series_finds_the_focus():
    """Celldiscoverer optics (NA 0.35): a bead z-series through pymmcore-plus's focus drive."""
    scope = SimulatedMicroscope("celldiscoverer")
    scope.core.setPosition(0.5)  # focus lies 0.5 um below where we start
    d = measure_defocus(scope.core, range_um=3, steps=9, frames=1)
    assert abs(d.focus_z_um - 0.0) < 0.2
    assert d.slope == pytest.approx(defocus_sigma_um(scope.preset.optics, 1.0), rel=0.35)
    assert scope.core.getPosition() == 0.5  # the focus drive is put back


def test_saturating_flats_are_refused_with_what_to_change():
    scope = SimulatedMicroscope("confocal-20fps")
    from calibration.errors import CalibrationError

    with pytest.raises(CalibrationError, match="lower the exposure"):
        measure_camera(scope.core, frames=2, exposures_ms=[10, 100, 1500], bit_depth=12)


@pytest.mark.slow
def test_server_publishes_and_indexes_fidelity_with_a_profile(profile, tmp_path):
    listen, control = free_endpoint(), free_endpoint()
    server = subprocess.Popen(
        [sys.executable, "-m", "stream", "serve", "--engine", "identity", "--mode", "complete",
         "--profile", str(profile), "--correct-bidir", "--fidelity-every", "1",  # every frame
         "--listen", listen, "--publish", "none",
         "--control", control, "--out", str(tmp_path), "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        run_dir = wait_ready(control, process=server, timeout_s=60).out_dir
        scope = SimulatedMicroscope("confocal-20fps")
        hook = FrameHook(listen)
        hook.wait_for_receiver(10)
        seq = useq.MDASequence(time_plan={"interval": 0.05, "loops": 6})
        scope.core.run_mda(seq, output=hook).join()
        hook.close()
        summary = request(control, "stop", expect={"scope": 6}, timeout_s=60)
    finally:
        server.wait(60)
    assert summary["frames_enhanced"] == 6
    records = [r for r in read_index(f"{run_dir}/index.jsonl") if r["kind"] == "enhanced"]
    chi2 = [r["fidelity"]["chi2"] for r in records]
    # identity after undoing the line phase, modelled back with it: the raw frame's own noise
    # is not in the prediction, so chi2 stays near 0-1, far below an invented object's
    assert all(0 <= c < 1.5 for c in chi2), chi2
    enhanced = tifffile.imread(f"{run_dir}/scope_p000_identity.ome.tif").reshape(-1, 256, 256)
    raw = tifffile.imread(f"{run_dir}/scope_p000_raw.ome.tif").reshape(-1, 256, 256)
    assert not np.array_equal(enhanced[0][1::2], raw[0][1::2])  # odd lines were shifted back
    assert np.array_equal(enhanced[0][0::2], raw[0][0::2])


def test_register_writes_aligned_training_pairs(tmp_path):
    """A fast 256x256 scan and a slow 512x512 scan of the same field, the slow one rotated
    by 5 degrees as if taken on a second system."""
    from scipy import ndimage

    scope = SimulatedMicroscope("confocal-20fps", seed=2)
    scene, t = scope.scene, 4.0
    model = scene.forward_model("FITC")
    fine = scene.fine_photons(t, "FITC", 30 * 8, (0.0, 0.0))
    low = model.record(fine, np.random.default_rng(0))
    high = scope.high_quality(t, "FITC", seed=1).astype(np.float32)
    high = ndimage.rotate(high, 5.0, reshape=False, order=3, mode="nearest")
    tifffile.imwrite(tmp_path / "low.tif", low)
    tifffile.imwrite(tmp_path / "high.tif", high)
    (tmp_path / "lo").mkdir(), (tmp_path / "hi").mkdir()
    (tmp_path / "low.tif").rename(tmp_path / "lo" / "field1.tif")
    (tmp_path / "high.tif").rename(tmp_path / "hi" / "field1.tif")
    run = scopecast("calibrate", "register", str(tmp_path / "lo"), str(tmp_path / "hi"),
                    "--out", str(tmp_path / "pairs"), "--scale-hint", "2",
                    "--upsample", "2")  # fmt: skip
    assert run.returncode == 0, run.stderr
    line = run.stdout.splitlines()[0]
    rotation = float(line.split("rotation ")[1].split(" deg")[0])
    scale = float(line.split("scale ")[1].split(",")[0])
    assert abs(abs(rotation) - 5.0) < 0.2 and scale == pytest.approx(2.0, rel=0.01), line
    lo = tifffile.imread(tmp_path / "pairs" / "low" / "field1.tif")
    hi = tifffile.imread(tmp_path / "pairs" / "high" / "field1.tif")
    assert hi.shape == (2 * lo.shape[0], 2 * lo.shape[1]) and min(lo.shape) > 150
    # registered: the high target binned back correlates with the low input
    binned = hi.reshape(lo.shape[0], 2, lo.shape[1], 2).mean(axis=(1, 3))
    assert np.corrcoef(binned.ravel(), lo.astype(float).ravel())[0, 1] > 0.8


@pytest.mark.parametrize(
    "preset", ["confocal-20fps", pytest.param("celldiscoverer", marks=pytest.mark.slow)]
)
def test_calibrate_optics_defaults_work_on_every_preset(tmp_path, preset):
    """No --z-range: the z-series spans what the measured PSF says, so the high-NA confocal
    (blur 1 um per um of defocus) fits as well as the NA 0.35 brightfield rig."""
    run = scopecast("calibrate", "optics", "--profile", str(tmp_path), "--preset", preset,
                    "--yes")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "focus at z" in run.stdout and "z-series +-" in run.stdout
    p = CalibrationProfile.load(tmp_path)
    optics = SimulatedMicroscope(preset).preset.optics
    assert p.defocus_slope == pytest.approx(defocus_sigma_um(optics, 1.0), rel=0.35)
    assert abs(p.focus_z_um) < 0.2


def test_calibrate_optics_with_a_bad_z_range_says_what_to_change(tmp_path):
    run = scopecast("calibrate", "optics", "--profile", str(tmp_path), "--preset",
                    "confocal-20fps", "--yes", "--z-range", "3")  # fmt: skip
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and len(lines[0]) < 300, lines
    assert "the z-series over +-3 um failed" in lines[0] and "try --z-range 0." in lines[0]
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: tifffile.imwrite(p, np.zeros((256, 256), np.uint16)), "too little structure"),
        (lambda p: tifffile.imwrite(p, np.full((256, 256), 0.1)), "too little structure"),
        (lambda p: tifffile.imwrite(p, np.zeros((16, 16), np.uint16)), "at least 32x32"),
        (lambda p: tifffile.imwrite(p, np.zeros((64, 64, 3), np.uint8)), "one 2-D plane"),
        (lambda p: p.write_bytes(b""), "not a readable TIFF"),
    ],
)
def test_register_a_blank_or_broken_image_is_one_clear_line(tmp_path, make, message):
    yy, xx = np.mgrid[:256, :256]
    tifffile.imwrite(tmp_path / "high.tif", (1000 + 300 * np.sin(yy / 5) * np.cos(xx / 7)))
    make(tmp_path / "low.tif")
    run = scopecast("calibrate", "register", str(tmp_path / "low.tif"),
                    str(tmp_path / "high.tif"), "--out", str(tmp_path / "pairs"))  # fmt: skip
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], run.stderr
    assert not (tmp_path / "pairs").exists()
