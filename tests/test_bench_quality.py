"""bench.quality and bench.baselines: held-out pairs, every method scored, clear errors, plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from bench.baselines import (
    BASELINES,
    gat_forward,
    gat_inverse,
    gat_read_sigma_electrons,
    gaussian_psf,
    noise_sigma,
    run_baseline,
    upsample_cubic,
)
from bench.quality import (
    HELD_OUT_SEED,
    METRICS,
    Samples,
    _simulated,
    plot_quality,
    run_quality,
)
from calibration.metrics import psnr
from calibration.sim.pairs import match_intensity
from calibration.sim.presets import get_preset

FIELD = 96  # raw px per side: small, but large enough to hold specimen structure


@pytest.fixture(scope="module")
def x1() -> dict:
    return run_quality(engines=["identity", "gaussian"], simulated="confocal-20fps", pairs=2,
                       sequence=3, field=FIELD)  # fmt: skip


@pytest.fixture(scope="module")
def x2() -> dict:
    return run_quality(engines=["bicubic-x2"], simulated="confocal-20fps", pairs=2, sequence=3,
                       field=FIELD)  # fmt: skip


def _pairs_folder(root: Path, scale: int, n: int = 2, side: int = 64) -> Path:
    """low/ and high/ TIFFs: sparse blobs (high) and their binned, Poisson-noisy low images."""
    rng = np.random.default_rng(5)
    for sub in ("low", "high"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        spots = (rng.random((side * scale, side * scale)) > 0.995).astype(np.float64)
        high = 100 + 3000 * ndimage.gaussian_filter(spots, 2.0 * scale)
        binned = high.reshape(side, scale, side, scale).mean(axis=(1, 3))
        low = rng.poisson(binned).astype(np.uint16)
        tifffile.imwrite(root / "low" / f"cell{i}.tif", low)
        tifffile.imwrite(root / "high" / f"cell{i}.tif", high.astype(np.float32))
    return root


# -- simulated data ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["x1", "x2"])
def test_every_method_has_every_metric(which: str, request: pytest.FixtureRequest) -> None:
    result = request.getfixturevalue(which)
    scale = 1 if which == "x1" else 2
    engines = ["identity", "gaussian"] if scale == 1 else ["bicubic-x2"]
    assert result["kind"] == "quality" and result["scale"] == scale
    assert result["simulated"] == "confocal-20fps" and result["data"] is None
    assert result["pairs"] == 2 and result["engines"] == engines
    assert result["baselines"] == list(BASELINES)
    expected = ["raw", *BASELINES, *(f"engine:{e}" for e in engines)]
    assert list(result["methods"]) == expected
    for name, m in result["methods"].items():
        for metric in METRICS:
            assert metric in m, (name, metric)
        assert set(m["per_pair"]) == set(METRICS) - {"flicker"}
        assert all(len(v) == 2 for v in m["per_pair"].values())
        assert math.isfinite(m["psnr"]), name
        assert 0 < m["ssim"] <= 1 and m["nrmse"] > 0
        assert m["fidelity_chi2"] > 0 and m["flicker"] > 0
        assert m["decorrelation_px"] > 0 and m["decorrelation_um"] is not None
        # MS-SSIM needs 176 px per side: 96 px at x1 is too small, 192 px at x2 is not
        assert (m["ms_ssim"] is None) == (scale == 1)
    truth = result["truth"]
    assert truth["fidelity_chi2"] == pytest.approx(1.0, abs=0.5)  # the slow scan explains raw


def test_gaussian_engine_beats_raw_and_identity_engine_is_raw(x1: dict) -> None:
    methods = x1["methods"]
    assert methods["engine:gaussian"]["psnr"] > methods["raw"]["psnr"] + 3
    assert methods["engine:gaussian"]["ssim"] > methods["raw"]["ssim"]
    assert methods["engine:gaussian"]["flicker"] < methods["raw"]["flicker"]
    for name in ("engine:identity", "identity"):
        for metric in METRICS:
            assert methods[name][metric] == methods["raw"][metric], (name, metric)
        assert methods[name]["per_pair"] == methods["raw"]["per_pair"]
    assert methods["engine:gaussian"]["task"] == "denoise"
    assert x1["best_baseline"] in BASELINES


def test_x2_engine_beats_nearest_raw(x2: dict) -> None:
    methods = x2["methods"]
    assert methods["engine:bicubic-x2"]["psnr"] > methods["raw"]["psnr"]
    assert x2["pixel_size_um"] == pytest.approx(0.1)
    px = methods["raw"]["per_pair"]["decorrelation_px"][0]
    assert methods["raw"]["per_pair"]["decorrelation_um"][0] == pytest.approx(px * 0.1 / 2)


def test_held_out_pairs_are_raw_equivalent_and_unseen() -> None:
    preset = get_preset("confocal-20fps")
    data = _simulated(preset, scale=2, pairs=2, history=2, sequence=4, seed=3,
                      frame_field=FIELD, progress=None)  # fmt: skip
    assert data.info["scene_seed"] == 3 + HELD_OUT_SEED != 0
    # the sequence: one warm-up frame (history 2) before the 4 frames flicker scores
    assert data.sequence is not None and len(data.sequence) == 5 and data.warmup == 1
    for pair in data.pairs:
        low = pair.frames[-1]
        assert len(pair.frames) == 2 and low.shape == (FIELD, FIELD) and low.dtype == np.uint16
        assert pair.truth.shape == (2 * FIELD, 2 * FIELD)
        # raw-equivalent ADU: the truth's 2x2 block means have the raw frame's expected value
        binned = pair.truth.reshape(FIELD, 2, FIELD, 2).mean(axis=(1, 3))
        assert binned.mean() == pytest.approx(low.mean(), rel=0.02)
        assert np.corrcoef(binned.ravel(), low.ravel().astype(float))[0, 1] > 0.5


def test_intensity_fit_is_the_same_for_images_and_stacks() -> None:
    """Training fits stacks (T, H, W), the benchmark single images: one shared function."""
    rng = np.random.default_rng(1)
    high = ndimage.gaussian_filter(rng.random((64, 64)), 3) * 500 + 20
    low = rng.poisson(high.reshape(32, 2, 32, 2).mean(axis=(1, 3)) * 0.3 + 40).astype(np.uint16)
    a, b = match_intensity(low, high, 2, "p")
    assert (a, b) == pytest.approx(match_intensity(low[None], high[None], 2, "p"), rel=1e-9)
    assert a == pytest.approx(0.3, rel=0.1)


def _bright_celldiscoverer():
    """celldiscoverer with 16x the light: its truth (one noisy frame, dwell 1) then resolves the
    cells' 2-6% contrast, so blur shows in PSNR instead of drowning in the truth's noise."""
    preset = get_preset("celldiscoverer")
    spec = preset.channels["BF"]
    return preset.model_copy(
        update={"channels": {"BF": spec.model_copy(update={"photons_per_ms": 8.0})}}
    )


@pytest.mark.parametrize("seed", [1, 2, 7])  # seeds whose first field holds cells
def test_defocus_blurs_the_raw_frames_and_keeps_the_truth_in_focus(seed: int) -> None:
    preset = _bright_celldiscoverer()

    def first_pair(defocus):  # the first pair shows the same field whatever the defocus
        data = _simulated(preset, scale=1, pairs=1, history=2, sequence=3, seed=seed,
                          frame_field=64, progress=None, defocus_um=defocus,
                          truth="expected")  # fmt: skip
        return data, data.pairs[0]

    focused, p0 = first_pair((0.0, 0.0))
    blurred, p1 = first_pair((1.5, 3.0))
    assert focused.info["dz_um"] == [0.0] and focused.info["defocus_um"] == [0.0, 0.0]
    (dz,) = blurred.info["dz_um"]
    assert 1.5 <= abs(dz) <= 3.0 and blurred.info["defocus_um"] == [1.5, 3.0]
    assert 1.5 <= abs(blurred.info["sequence_dz_um"]) <= 3.0
    assert len(p1.frames) == 2 and p1.frames[-1].shape == p1.truth.shape == (64, 64)

    def score(pair):
        return psnr(pair.truth, pair.frames[-1].astype(np.float32),
                    data_range=float(np.ptp(pair.truth)))  # fmt: skip

    assert score(p1) < score(p0) - 0.3
    # the truth is the same in-focus field: defocus touches raw frames only
    t0, t1 = (ndimage.gaussian_filter(p.truth, 2).ravel() for p in (p0, p1))
    assert np.corrcoef(t0, t1)[0, 1] > 0.9


def test_defocus_in_run_quality_is_recorded() -> None:
    result = run_quality(engines=[], simulated="celldiscoverer", pairs=2, sequence=0, field=32,
                         baselines=[], defocus_um=(1.5, 3.0))  # fmt: skip
    info = result["info"]
    assert info["defocus_um"] == [1.5, 3.0] and len(info["dz_um"]) == 2
    assert all(1.5 <= abs(dz) <= 3.0 for dz in info["dz_um"])
    assert math.isfinite(result["methods"]["raw"]["psnr"])


@pytest.mark.parametrize(
    "defocus", [(3.0, 1.0), (-1.0, 2.0), (float("nan"), 1.0), (0.0, float("inf")), (1.0,), "ab"]
)
def test_bad_defocus_is_rejected(defocus) -> None:
    with pytest.raises(ValueError, match="defocus"):
        run_quality(engines=[], simulated="celldiscoverer", defocus_um=defocus)


def test_defocus_needs_simulated_pairs(tmp_path: Path) -> None:
    folder = _pairs_folder(tmp_path / "pairs", 1)
    with pytest.raises(ValueError, match=r"simulated pairs only.*real-pairs"):
        run_quality(engines=[], data=folder, defocus_um=(1.0, 2.0))


def test_cli_defocus_option(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from bench.cli import app

    runner = CliRunner(env={"COLUMNS": "300"})
    args = ["quality", "--engine", "identity", "--simulated", "celldiscoverer", "--out",
            str(tmp_path), "--defocus"]  # fmt: skip
    for value in ("3,1", "2", "1,x", "nan,1"):
        bad = runner.invoke(app, [*args, value])
        assert bad.exit_code == 2 and "LO,HI" in bad.output, (value, bad.output)
        assert not (tmp_path / "quality.json").exists()


def test_no_engines_runs_baselines_only() -> None:
    result = run_quality(engines=[], simulated="confocal-20fps", pairs=1, sequence=0,
                         field=FIELD, baselines=["gaussian"])  # fmt: skip
    assert list(result["methods"]) == ["raw", "gaussian"]
    assert result["scale"] == 1 and result["methods"]["gaussian"]["flicker"] is None


# -- folder data ------------------------------------------------------------------------------


@pytest.mark.parametrize(("scale", "engines"), [(1, ["identity", "gaussian"]), (2, ["bicubic-x2"])])
def test_folder_pairs(tmp_path: Path, scale: int, engines: list[str]) -> None:
    folder = _pairs_folder(tmp_path / "pairs", scale)
    result = run_quality(engines=engines, data=folder, baselines=["bicubic", "nlm"])
    assert result["data"] == str(folder) and result["simulated"] is None
    assert result["pairs"] == 2 and result["scale"] == scale
    assert result["pair_names"] == ["cell0", "cell1"]
    for name, m in result["methods"].items():
        assert set(METRICS) <= set(m)
        assert math.isfinite(m["psnr"]), name
        # no camera, no sequence, no pixel size for folder data
        assert m["fidelity_chi2"] is None and m["flicker"] is None
        assert m["decorrelation_um"] is None and m["decorrelation_px"] is not None
    if scale == 1:
        assert result["methods"]["engine:gaussian"]["psnr"] > result["methods"]["raw"]["psnr"]


def test_folder_low_stacks_are_history_frames(tmp_path: Path) -> None:
    """A (T, H, W) low TIFF: T exposures, oldest first, the last scored; they also give flicker."""
    folder = _pairs_folder(tmp_path / "pairs", 1)
    rng = np.random.default_rng(0)
    for i in range(2):
        high = tifffile.imread(folder / "high" / f"cell{i}.tif")
        stack = rng.poisson(np.stack([high] * 3)).astype(np.uint16)
        tifffile.imwrite(folder / "low" / f"cell{i}.tif", stack, photometric="minisblack")
    stacked = run_quality(engines=["gaussian"], data=folder, baselines=["gaussian"], match=False)
    assert stacked["info"]["history"] == [3] and stacked["sequence"] == 3
    assert stacked["info"]["sequence_from"] == "cell0"
    methods = stacked["methods"]
    assert methods["engine:gaussian"]["flicker"] < methods["raw"]["flicker"]
    for i in range(2):  # the last frame alone, as a 2-D TIFF, scores the same
        path = folder / "low" / f"cell{i}.tif"
        tifffile.imwrite(path, tifffile.imread(path)[-1])
    flat = run_quality(engines=[], data=folder, baselines=[], match=False)
    assert flat["sequence"] == 0 and flat["methods"]["raw"]["flicker"] is None
    assert flat["methods"]["raw"]["per_pair"]["psnr"] == methods["raw"]["per_pair"]["psnr"]
    tifffile.imwrite(folder / "low" / "cell0.tif", np.zeros((2, 2, 64, 64), np.uint16))
    with pytest.raises(ValueError, match=r"2-D image or a \(T, H, W\) stack"):
        run_quality(engines=[], data=folder)


def test_empty_folder_has_no_pairs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"no pairs in {tmp_path}"):
        run_quality(engines=["identity"], data=tmp_path)
    (tmp_path / "low").mkdir()
    (tmp_path / "high").mkdir()
    with pytest.raises(ValueError, match=r"no pairs in .*none matched"):
        run_quality(engines=["identity"], data=tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        run_quality(engines=["identity"], data=tmp_path / "missing")


def test_wrong_scale_engine_names_both(tmp_path: Path) -> None:
    folder = _pairs_folder(tmp_path / "pairs", 1)
    with pytest.raises(ValueError, match=r"'bicubic-x2' has scale 2.*have scale 1"):
        run_quality(engines=["bicubic-x2"], data=folder)
    with pytest.raises(ValueError, match=r"differ in scale \(identity x1, bicubic-x2 x2\)"):
        run_quality(engines=["identity", "bicubic-x2"], simulated="confocal-20fps")
    with pytest.raises(ValueError, match=r"scale 2, but preset 'celldiscoverer'.*scale 1"):
        run_quality(engines=["bicubic-x2"], simulated="celldiscoverer")


def test_bad_input_is_a_clear_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'no-such-engine'"):
        run_quality(engines=["no-such-engine"], simulated="confocal-20fps")
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        run_quality(engines=["identity"], simulated="nope")
    with pytest.raises(ValueError, match="exactly one of data"):
        run_quality(engines=["identity"])
    with pytest.raises(ValueError, match="exactly one of data"):
        run_quality(engines=["identity"], data=tmp_path, simulated="confocal-20fps")
    with pytest.raises(ValueError, match="unknown baseline"):
        run_quality(engines=[], simulated="confocal-20fps", baselines=["magic"])
    with pytest.raises(ValueError, match="sequence must be"):
        run_quality(engines=[], simulated="confocal-20fps", sequence=1)


# -- plots and JSON ---------------------------------------------------------------------------


def test_plot_quality_writes_pngs(x2: dict, tmp_path: Path) -> None:
    paths = plot_quality(x2, tmp_path / "plots")
    assert [p.name for p in paths] == ["quality_metrics.png", "quality_panels.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = x2["samples"]
    assert isinstance(samples, Samples) and len(samples.pairs) == 2
    assert set(samples.pairs[0]) == {"raw", "truth", x2["best_baseline"], "engine:bicubic-x2"}


def test_result_json_stays_small_and_replots(x1: dict, tmp_path: Path) -> None:
    from bench.report import write_result

    path = write_result(x1, tmp_path)
    assert path.stat().st_size < 100_000  # images are not written out
    loaded = json.loads(path.read_text())
    assert loaded["methods"]["raw"]["psnr"] == pytest.approx(x1["methods"]["raw"]["psnr"])
    assert [p.name for p in plot_quality(loaded, tmp_path)] == ["quality_metrics.png"]


# -- baselines --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BASELINES))
@pytest.mark.parametrize("scale", [1, 2])
def test_baseline_shape_and_units(name: str, scale: int) -> None:
    rng = np.random.default_rng(0)
    clean = 50 + 400 * ndimage.gaussian_filter((rng.random((48, 48)) > 0.97).astype(float), 1.5)
    raw = rng.poisson(clean).astype(np.uint16)
    out = BASELINES[name](raw, scale=scale, psf_sigma_px=1.0, offset=50.0)
    assert out.shape == (48 * scale, 48 * scale) and out.dtype == np.float64
    assert np.isfinite(out).all()
    assert out.mean() == pytest.approx(raw.mean(), rel=0.1)  # raw-equivalent ADU, not [0, 1]


def test_baselines_do_what_they_say() -> None:
    raw = np.arange(16.0).reshape(4, 4)
    assert np.array_equal(BASELINES["identity"](raw, scale=1, psf_sigma_px=1, offset=0), raw)
    up = BASELINES["identity"](raw, scale=2, psf_sigma_px=1, offset=0)
    assert np.array_equal(up.reshape(4, 2, 4, 2).mean(axis=(1, 3)), raw)
    ramp = np.tile(np.arange(8.0), (8, 1))
    means = upsample_cubic(ramp, 2).reshape(8, 2, 8, 2).mean(axis=(1, 3))
    assert means[:, 2:-2] == pytest.approx(ramp[:, 2:-2], abs=0.01)  # pixel areas aligned
    # Richardson-Lucy sharpens a blurred point source back towards a point
    point = np.zeros((33, 33))
    point[16, 16] = 1000.0
    blurred = 10 + ndimage.convolve(point, gaussian_psf(1.5))
    rl = BASELINES["richardson-lucy"](blurred, scale=1, psf_sigma_px=1.5, offset=10)
    assert rl[16, 16] - 10 > 2 * (blurred[16, 16] - 10)
    assert rl.sum() == pytest.approx(blurred.sum(), rel=0.01)
    assert noise_sigma(np.random.default_rng(0).normal(0, 3, (128, 128))) == pytest.approx(3, 0.1)


def test_baseline_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        BASELINES["gaussian"](np.zeros((2, 3, 4)), scale=1, psf_sigma_px=1.0, offset=0)
    with pytest.raises(ValueError, match="scale"):
        BASELINES["bicubic"](np.zeros((8, 8)), scale=0, psf_sigma_px=1.0, offset=0)
    with pytest.raises(ValueError, match="psf_sigma_px"):
        BASELINES["richardson-lucy"](np.zeros((8, 8)), scale=1, psf_sigma_px=0.0, offset=0)
    with pytest.raises(ValueError, match="NaN"):
        BASELINES["nlm"](np.full((8, 8), np.nan), scale=1, psf_sigma_px=1.0, offset=0)


def test_expected_truth_is_the_noise_free_slow_scan_of_the_same_raw_frames() -> None:
    kw = {"engines": [], "simulated": "confocal-20fps", "pairs": 2, "sequence": 0, "field": 128,
          "baselines": ["gaussian"]}  # fmt: skip
    recorded, expected = run_quality(**kw), run_quality(**kw, truth="expected")
    assert expected["info"]["truth"] == "expected"
    # the same raw frames; a smoother truth rewards the denoiser and not the raw frame
    gain = {r["info"]["truth"]: r["methods"]["gaussian"]["psnr"] - r["methods"]["raw"]["psnr"]
            for r in (recorded, expected)}  # fmt: skip
    assert gain["expected"] > gain["high-quality"]
    with pytest.raises(ValueError, match="truth 'clean' must be one of"):
        run_quality(**{**kw, "truth": "clean"})


# -- variance-stabilised NLM, the 2-frame baseline, the motion sweep --------------------------


def test_gat_inverse_round_trips_the_mean() -> None:
    """The unbiased inverse of the transform's mean gives back the mean signal, and the
    transformed noise has sigma 1, on Poisson-Gaussian ADU made as the camera makes them."""
    camera = get_preset("confocal-20fps").camera
    g, zero, sigma_e = (camera.gain_adu_per_electron, camera.offset_adu,
                        gat_read_sigma_electrons(camera))  # fmt: skip
    rng = np.random.default_rng(0)
    for electrons in (1.0, 2.0, 5.0, 20.0, 100.0):
        e = rng.poisson(electrons, 100_000) + rng.normal(0, camera.read_noise_electrons, 100_000)
        adu = np.round(g * e + zero)
        d = gat_forward(adu, gain=g, offset=zero, sigma_e=sigma_e)
        back = gat_inverse(np.array([d.mean()]), gain=g, offset=zero, sigma_e=sigma_e)[0]
        assert (back - zero) / g == pytest.approx(electrons, rel=0.05), electrons
        if electrons >= 2:
            assert d.std() == pytest.approx(1.0, abs=0.05), electrons
    # the algebraic inverse of the mean is biased low at low counts; the unbiased one is not
    level = np.full(4, 3.0)
    assert gat_inverse(gat_forward(level * g + zero, gain=g, offset=zero, sigma_e=sigma_e),
                       gain=g, offset=zero, sigma_e=sigma_e) == pytest.approx(
        level * g + zero, rel=0.05)  # fmt: skip


def test_vst_nlm_beats_gaussian_and_nlm_on_the_forward_model() -> None:
    """Raw frames through the simulated confocal camera (Poisson-Gaussian, gain 8, offset 50),
    scored against their noise-free expectation: stabilising the variance with the known camera
    lets NLM denoise the bright structure as much as the background."""
    preset = get_preset("confocal-20fps")
    data = _simulated(preset, scale=1, pairs=2, history=1, sequence=0, seed=0, frame_field=FIELD,
                      progress=None, truth="expected")  # fmt: skip
    score: dict[str, float] = {}
    for name in ("gaussian", "nlm", "vst-nlm"):
        values = [psnr(p.truth, run_baseline(name, p.frames, scale=1, offset=p.offset,
                                             psf_sigma_px=data.psf_sigma_px, camera=data.camera),
                       data_range=float(np.ptp(p.truth)))
                  for p in data.pairs]  # fmt: skip
        score[name] = float(np.mean(values))
    assert score["vst-nlm"] > score["gaussian"] and score["vst-nlm"] > score["nlm"], score


def test_mean2_gaussian_is_causal() -> None:
    rng = np.random.default_rng(2)
    frames = [rng.poisson(100, (32, 32)).astype(np.uint16) for _ in range(4)]
    kw = {"scale": 1, "psf_sigma_px": 1.0, "offset": 0.0}

    def stream(fs):
        return [run_baseline("mean2+gaussian", fs[: t + 1], **kw) for t in range(len(fs))]

    before = stream(frames)
    changed = [*frames[:3], frames[3] + np.uint16(50)]
    after = stream(changed)
    for t in range(3):  # changing frame 3 changes no output before it
        assert np.array_equal(before[t], after[t]), t
    assert not np.array_equal(before[3], after[3])
    # the first frame: the Gaussian alone; later ones: the Gaussian of the 2-frame mean
    assert np.array_equal(before[0], BASELINES["gaussian"](frames[0], **kw))
    mean = (frames[1].astype(float) + frames[2]) / 2
    assert np.allclose(before[2], BASELINES["gaussian"](mean, **kw))
    with pytest.raises(ValueError, match="differ in shape"):
        BASELINES["mean2+gaussian"](frames[0], previous=frames[0][:8], **kw)


def test_motion_moves_the_raw_frames_sub_pixel() -> None:
    """With 100x the light (noise negligible), the earlier frame is the scored one moved by
    ``v`` raw px along the sweep's direction: found by least squares over sub-pixel shifts
    (seed 3: a field with cells in it)."""
    preset = get_preset("confocal-20fps")
    channels = {name: spec.model_copy(update={"photons_per_ms": 100 * spec.photons_per_ms})
                for name, spec in preset.channels.items()}  # fmt: skip
    bright = preset.model_copy(update={"channels": channels})

    def best_shift(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        inner = (slice(8, -8), slice(8, -8))
        grid = [
            np.array([r, c]) for r in np.arange(-4, 4.01, 0.2) for c in np.arange(-4, 4.01, 0.2)
        ]
        errors = [float(np.mean((ndimage.shift(b, s, order=1)[inner] - a[inner]) ** 2))
                  for s in grid]  # fmt: skip
        return grid[int(np.argmin(errors))]

    for v in (0.0, 3.0):
        data = _simulated(bright, scale=1, pairs=1, history=2, sequence=0, seed=3,
                          frame_field=48, progress=None, motion_px=v)  # fmt: skip
        before, now = (f.astype(float) for f in data.pairs[0].frames)
        shift = best_shift(now, before)  # (rows, cols) moving the earlier frame onto this one
        assert float(np.hypot(*shift)) == pytest.approx(v, abs=0.3), (v, shift)
        if v:  # along the fixed direction (x, y) = (0.8, 0.6), up to the sign convention
            assert abs(shift[1]) / abs(shift[0]) == pytest.approx(0.8 / 0.6, rel=0.25), shift


def test_cli_motion_sweep_reports_every_speed(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from bench.cli import app

    runner = CliRunner(env={"COLUMNS": "300"})
    args = ["quality", "--engine", "gaussian", "--simulated", "confocal-20fps", "--pairs", "1",
            "--field", "32", "--sequence", "2", "--motion", "0", "--motion", "2",
            "--out", str(tmp_path)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "vst-nlm" in result.output and "mean2+gaussian" in result.output
    assert "(best baseline)" in result.output
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["motion_px_per_frame"] == [0.0, 2.0] and list(saved["by_motion"]) == ["0", "2"]
    expected = ["raw", *BASELINES, "engine:gaussian"]
    for speed, group in saved["by_motion"].items():
        assert list(group["methods"]) == expected, speed
        assert group["best_baseline"] in BASELINES
        assert all(math.isfinite(m["psnr"]) for m in group["methods"].values())
    assert saved["by_motion"]["2"]["info"]["motion_px_per_frame"] == 2.0
    # every speed scores the same frame against the same truth: only earlier frames move
    psnrs = {s: g["methods"]["raw"]["per_pair"]["psnr"] for s, g in saved["by_motion"].items()}
    assert psnrs["0"] == psnrs["2"]
    bad = runner.invoke(app, [*args[:-2], "--motion", "-1", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "motion" in bad.output


def test_motion_needs_simulated_pairs(tmp_path: Path) -> None:
    folder = _pairs_folder(tmp_path / "pairs", 1)
    with pytest.raises(ValueError, match=r"motion .* needs simulated pairs"):
        run_quality(engines=[], data=folder, motion=[0, 2])
    for bad in ([float("nan")], [1, 1], [], "2"):
        with pytest.raises(ValueError, match="motion"):
            run_quality(engines=[], simulated="confocal-20fps", motion=bad)


# -- the truth's own flicker ------------------------------------------------------------------


@pytest.fixture(scope="module")
def moving() -> dict:
    """Still and moving at 4 px/frame (seed 1: a 32 px field with cells in its sequence)."""
    return run_quality(engines=["gaussian"], simulated="confocal-20fps", pairs=1, sequence=3,
                       field=32, seed=1, baselines=["gaussian"], motion=[0, 4])  # fmt: skip


def test_truth_flicker_and_every_methods_ratio_to_it(moving: dict) -> None:
    from bench.quality import format_markdown, sections

    assert moving["truth_flicker"] == moving["by_motion"]["0"]["truth_flicker"]
    for section in sections(moving):
        truth = section["truth_flicker"]
        assert truth is not None and truth > 0, section["motion_px_per_frame"]
        assert section["info"]["truth"] == "high-quality"
        for name, m in section["methods"].items():
            assert m["flicker"] > 0, name
            assert m["flicker_ratio"] == pytest.approx(m["flicker"] / truth, rel=1e-12), name
    text = format_markdown(moving)
    assert "| flicker | flicker / truth |" in text
    assert "- 4 px/frame: truth's own flicker" in text and "high-quality truth" in text
    saved = json.loads(json.dumps(moving, default=str))  # JSON-safe, as write_result saves it
    assert saved["by_motion"]["4"]["truth_flicker"] == moving["by_motion"]["4"]["truth_flicker"]


def test_a_moving_truth_flickers_more_than_a_still_one(moving: dict) -> None:
    """The truth of every scored frame moves with the stage: not one truth, nor a constant."""
    by = moving["by_motion"]
    assert by["4"]["truth_flicker"] > 2 * by["0"]["truth_flicker"] > 0
    preset = get_preset("confocal-20fps")
    still, moved = (
        _simulated(preset, scale=1, pairs=1, history=2, sequence=3, seed=1, frame_field=32,
                   progress=None, motion_px=v, truth="expected").sequence_truth
        for v in (0.0, 4.0)
    )  # fmt: skip
    assert still is not None and moved is not None and len(still) == len(moved) == 3
    # the first scored frame is where both start; later ones moved 4 and 8 px
    assert np.array_equal(still[0], moved[0])
    assert not np.array_equal(still[1], moved[1]) and not np.array_equal(still[0], still[2])


def test_folder_data_has_no_truth_flicker(tmp_path: Path) -> None:
    folder = _pairs_folder(tmp_path / "pairs", 1, n=1)
    rng = np.random.default_rng(0)
    high = tifffile.imread(folder / "high" / "cell0.tif")
    stack = rng.poisson(np.stack([high] * 3)).astype(np.uint16)
    tifffile.imwrite(folder / "low" / "cell0.tif", stack, photometric="minisblack")
    result = run_quality(engines=[], data=folder, baselines=["gaussian"], match=False)
    assert result["sequence"] == 3 and result["truth_flicker"] is None
    for name, m in result["methods"].items():
        assert m["flicker"] is not None and m["flicker_ratio"] is None, name


# -- rig sweep and recording ------------------------------------------------------------------


def _electrons_gaussian(folder: Path) -> Path:
    """The zoo's Gaussian as an electrons engine (same ONNX): it smooths photo-electrons, so it
    only removes a camera's column offsets when it is fed through the rig's profile."""
    from engines.package import Manifest, load_package, write_package

    package = load_package("gaussian")
    norm = {"units": "electrons", "offset": 0.0, "scale": 1.0,
            "camera": {"offset_adu": 50.0, "gain_adu_per_electron": 8.0}}  # fmt: skip
    manifest = Manifest.model_validate(
        {**package.manifest.model_dump(), "name": "gaussian-e", "normalization": norm}
    )
    write_package(folder, manifest, {"model.onnx": package.read("model.onnx")})
    return folder


def test_rig_table_has_the_rigs_the_issue_asks_for() -> None:
    from calibration.sim.rigs import OWN_RIG, RIGS, resolve_rig

    assert len(RIGS) >= 3 and all(spec.doc for spec in RIGS.values())
    columns = [s for s in RIGS.values() if s.column_sd_adu > 0]
    assert columns and columns[0].gain_adu_per_electron != 8.0
    assert any((s.gain_adu_per_electron, s.offset_adu, s.read_noise_e) == (2.0, 100.0, 1.5)
               for s in RIGS.values())  # fmt: skip
    assert any(s.psf_scale > 1 and s.peak_photons for s in RIGS.values())
    assert resolve_rig(OWN_RIG) is None and resolve_rig("scmos-columns") is RIGS["scmos-columns"]
    with pytest.raises(ValueError, match=r"unknown rig 'nope'.*scmos-columns"):
        resolve_rig("nope")
    from typer.testing import CliRunner

    from bench.cli import app

    shown = CliRunner(env={"COLUMNS": "1000"}).invoke(app, ["quality", "--help"]).output
    assert all(name in shown for name in RIGS), "bench quality --rig's help names every rig"


def test_column_rig_records_its_column_offsets_and_its_profile_has_them() -> None:
    """The same held-out frames (same seeds) recorded with and without the sCMOS rig's column
    pattern differ by that pattern, column by column: sd as specified, constant down each
    column; the rig's profile (the engines' conversion) carries exactly the recorded map."""
    from dataclasses import replace

    from calibration.sim.rigs import RIGS

    spec = RIGS["scmos-columns"]
    flat = replace(spec, name="no-columns", column_sd_adu=0.0)
    kw = {"scale": 1, "pairs": 1, "history": 1, "sequence": 0, "seed": 0, "frame_field": 48,
          "progress": None}  # fmt: skip
    with_pattern = _simulated(get_preset("confocal-20fps"), rig_spec=spec, rig_name=spec.name,
                              **kw)  # fmt: skip
    without = _simulated(get_preset("confocal-20fps"), rig_spec=flat, rig_name=flat.name, **kw)
    raw = with_pattern.pairs[0].frames[-1].astype(np.float64)
    plain = without.pairs[0].frames[-1].astype(np.float64)
    diff = raw - plain
    assert np.abs(diff).max() > 5  # the pattern is there
    units = with_pattern.units
    assert units is not None and units.offset_map is not None and units.shape == (48, 48)
    assert units.gain_adu_per_electron == 1.5 and units.offset_adu == 200.0
    pattern = units.offset_map - 200.0
    assert np.array_equal(pattern, np.broadcast_to(pattern[0], pattern.shape))  # per column
    assert float(np.std(pattern[0])) == pytest.approx(6.0, rel=0.35)
    # rounding to whole ADU is all that separates the frames from the pattern
    assert np.abs(diff - pattern).max() <= 1.0
    assert np.abs(diff.mean(axis=0) - pattern[0]).max() < 0.6
    assert without.units is not None and without.units.offset_map is None
    # the truth is in the rig's ADU with its scalar offset: no pattern in it
    assert np.array_equal(with_pattern.pairs[0].truth, without.pairs[0].truth)
    assert with_pattern.info["rig_definition"]["column_sd_adu"] == 6.0


def test_rig_sweep_feeds_engines_through_each_rigs_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One section per rig. On the column-offset rig an electrons engine, fed through the rig's
    profile as serve --profile feeds it, smooths electrons and loses nothing to the pattern
    (it scores as the Gaussian baseline on corrected frames); the same network fed raw ADU
    smooths the pattern into the image."""
    import bench.quality as quality
    from calibration.units import Electrons
    from engines.engine import EngineChain

    opened: list[tuple[str, Electrons | None]] = []
    real_open = quality._open

    def spy(name: str, backend: str, units: Electrons | None = None) -> EngineChain:
        opened.append((name, units))
        return real_open(name, backend, units)

    monkeypatch.setattr(quality, "_open", spy)
    engine = str(_electrons_gaussian(tmp_path / "gaussian-e"))
    rigs = ["preset", "scmos-columns"]
    result = run_quality(engines=[engine, "gaussian"], simulated="confocal-20fps", pairs=2,
                         sequence=0, field=48, baselines=["gaussian", "vst-nlm"],
                         rigs=rigs)  # fmt: skip
    assert result["rigs"] == rigs and list(result["by_rig"]) == rigs
    listed = quality.sections(result)
    assert [s["rig"] for s in listed] == rigs
    for section in listed:
        assert list(section["methods"]) == ["raw", "gaussian", "vst-nlm", f"engine:{engine}",
                                            "engine:gaussian"]  # fmt: skip
        assert section["best_baseline"] in ("gaussian", "vst-nlm")
        assert section["info"]["rig"] == section["rig"]
    fed = {n: u for n, u in opened if u is not None and u.offset_map is not None}
    assert set(fed) == {engine, "gaussian"}  # both opened with the column rig's profile
    assert fed[engine].gain_adu_per_electron == 1.5 and fed[engine].shape == (48, 48)
    m = result["by_rig"]["scmos-columns"]["methods"]
    assert m[f"engine:{engine}"]["psnr"] == pytest.approx(m["gaussian"]["psnr"], abs=0.5)
    assert m["engine:gaussian"]["psnr"] < m[f"engine:{engine}"]["psnr"] - 3
    preset = result["by_rig"]["preset"]["methods"]  # no pattern: both see the same frames
    assert preset["engine:gaussian"]["psnr"] == pytest.approx(preset[f"engine:{engine}"]["psnr"],
                                                              abs=0.1)  # fmt: skip
    with pytest.raises(ValueError, match="repeat a rig"):
        run_quality(engines=[], simulated="confocal-20fps", rigs=["preset", "preset"])


def test_record_writes_held_out_metrics_that_load_back(tmp_path: Path) -> None:
    import shutil

    from bench.quality import record_held_out
    from engines.package import ZOO_DIR, load_package, manifest_json, verify_package

    copy = tmp_path / "identity"
    shutil.copytree(ZOO_DIR / "identity", copy)
    model = (copy / "model.onnx").read_bytes()
    result = run_quality(engines=[str(copy)], simulated="confocal-20fps", pairs=2, sequence=0,
                         field=32, baselines=["gaussian", "nlm"],
                         rigs=["gain2-offset100"])  # fmt: skip
    said = record_held_out(result, when="2026-01-02T03:04:05+0000")
    assert str(copy / "manifest.json") in said[str(copy)]
    package = load_package(copy)  # hashes still verify: only the manifest was rewritten
    assert verify_package(copy) == [] and (copy / "model.onnx").read_bytes() == model
    (entry,) = package.manifest.held_out
    section = result["by_rig"]["gain2-offset100"]
    engine, best = section["methods"][f"engine:{copy}"], section["best_baseline"]
    assert entry.data["simulated"] == "confocal-20fps" and entry.data["rig"] == "gain2-offset100"
    assert entry.data["pairs"] == 2 and entry.data["truth"] == "high-quality"
    assert entry.data["rig_definition"]["gain_adu_per_electron"] == 2.0
    assert entry.psnr == pytest.approx(engine["psnr"]) and entry.ssim == pytest.approx(
        engine["ssim"]
    )
    assert entry.best_baseline == best in ("gaussian", "nlm")
    assert entry.baseline_psnr == pytest.approx(section["methods"][best]["psnr"])
    assert entry.psnr is not None and entry.baseline_psnr is not None
    assert entry.margin_db == pytest.approx(entry.psnr - entry.baseline_psnr)
    assert entry.margin_db is not None and entry.margin_db < 0  # identity loses to a denoiser
    assert entry.date == "2026-01-02T03:04:05+0000" and entry.scopecast_version
    # the same data again replaces its entry; other data adds one
    record_held_out(result)
    assert len(load_package(copy).manifest.held_out) == 1
    other = json.loads(json.dumps({**result, "samples": None}, default=str))
    other["by_rig"]["gain2-offset100"]["info"]["field"] = [40, 40]
    record_held_out(other)
    assert len(load_package(copy).manifest.held_out) == 2
    # a failed scoring is never recorded
    before = (copy / "manifest.json").read_bytes()
    other["by_rig"]["gain2-offset100"]["methods"][f"engine:{copy}"]["psnr"] = None
    assert "not recorded" in record_held_out(other)[str(copy)]
    assert (copy / "manifest.json").read_bytes() == before
    # a manifest without held-out metrics is written as before the field existed
    shipped = load_package("identity")
    assert manifest_json(shipped.manifest) == (ZOO_DIR / "identity" / "manifest.json").read_text()


def test_cli_rig_and_motion_sweep_with_record(tmp_path: Path) -> None:
    import shutil

    from typer.testing import CliRunner

    from bench.cli import app
    from engines.package import ZOO_DIR, load_package

    copy = tmp_path / "gaussian"
    shutil.copytree(ZOO_DIR / "gaussian", copy)
    runner = CliRunner(env={"COLUMNS": "300"})
    args = ["quality", "--engine", str(copy), "--simulated", "confocal-20fps", "--pairs", "1",
            "--field", "32", "--sequence", "2", "--motion", "0", "--motion", "2",
            "--rig", "scmos-columns", "--rig", "wide-psf-dim", "--record", "--markdown",
            "--out", str(tmp_path / "out")]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "| rig | px/frame | method |" in result.output
    assert "| scmos-columns | 2 | raw |" in result.output
    assert "| wide-psf-dim | 0 |" in result.output and "(best baseline)" in result.output
    assert "recorded 4 held-out entries" in result.output
    saved = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert list(saved["by_rig"]) == ["scmos-columns", "wide-psf-dim"]
    assert list(saved["by_rig"]["wide-psf-dim"]["by_motion"]) == ["0", "2"]
    held = load_package(copy).manifest.held_out
    assert [(h.data["rig"], h.data["motion_px_per_frame"]) for h in held] == [
        ("scmos-columns", 0.0), ("scmos-columns", 2.0), ("wide-psf-dim", 0.0),
        ("wide-psf-dim", 2.0)]  # fmt: skip
    rich = runner.invoke(app, [*args[:17], "--out", str(tmp_path / "b")])
    assert rich.exit_code == 0, rich.output
    assert "scmos-columns" in rich.output and "px/frame" in rich.output
    bad = runner.invoke(app, [*args[:15], "--rig", "nope", "--out", str(tmp_path / "c")])
    assert bad.exit_code == 2 and "unknown rig 'nope'" in bad.output


def test_a_saved_calibration_profile_is_a_rig(tmp_path: Path) -> None:
    """``--rig PATH``: the profile's camera and offset map (its centre, cut to the field)
    record the frames and convert them; a flat field it cannot simulate is left out of both."""
    from calibration.camera import CameraParams
    from calibration.profile import CalibrationProfile
    from calibration.sim.rigs import resolve_rig

    columns = np.random.default_rng(3).normal(0, 8, 128)
    offsets = (300 + np.tile(columns, (128, 1))).astype(np.float32)
    camera = CameraParams(offset_adu=300, gain_adu_per_electron=3, read_noise_electrons=1.2)
    profile = CalibrationProfile(rig="lab-scmos", pixel_size_um=0.1, camera=camera)
    profile.with_arrays(offset_map=offsets, flat_field=np.ones((128, 128))).save(tmp_path / "p")
    spec = resolve_rig(str(tmp_path / "p"))
    assert spec is not None and spec.name == "lab-scmos" and "left out: flat_field" in spec.doc
    data = _simulated(get_preset("confocal-20fps"), scale=1, pairs=1, history=1, sequence=0,
                      seed=0, frame_field=32, progress=None, rig_spec=spec,
                      rig_name=spec.name)  # fmt: skip
    units = data.units
    assert units is not None and units.flat_field is None and units.gain_adu_per_electron == 3
    assert units.offset_map is not None
    assert np.array_equal(units.offset_map, offsets[48:80, 48:80])  # the centre of the map
    assert data.camera == camera and data.info["rig_definition"]["offset_map"] == [128, 128]
    raw = data.pairs[0].frames[-1].astype(np.float64)
    assert np.corrcoef(np.median(raw, axis=0), columns[48:80])[0, 1] > 0.8
