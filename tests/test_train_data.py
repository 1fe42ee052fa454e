"""Training data: simulated true pairs in raw-equivalent units, paired folders and stacks,
synthetic pairs through the forward model, and celldiscoverer deblur pairs (all tiny)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from scipy import ndimage

torch = pytest.importorskip("torch", reason="training data needs the train extra")

from calibration.camera import CameraParams  # noqa: E402
from calibration.optics import psf_sigma_um  # noqa: E402
from calibration.profile import CalibrationProfile  # noqa: E402
from calibration.sim.presets import get_preset  # noqa: E402
from calibration.sim.scene import Scene  # noqa: E402
from calibration.sim.specimen import View  # noqa: E402
from engines.package import Normalization  # noqa: E402
from engines.train.data import DataConfig, build_datasets  # noqa: E402

TINY = {"pairs": 4, "val_pairs": 4, "patch": 32, "field": 64}
CONFOCAL = get_preset("confocal-20fps")


def build(scale: int = 2, window: int = 1, previous: bool = False, background: bool = False,
          **cfg):  # fmt: skip
    return build_datasets(DataConfig(**cfg), scale=scale, window=window, previous=previous,
                          background=background)  # fmt: skip


def expected_low(t_s: float, xy_um: tuple[float, float], field: int) -> np.ndarray:
    """The fast scan's noiseless ADU of a field, straight from the simulated microscope's scene."""
    scene = Scene(CONFOCAL, 0)
    model = scene.forward_model("FITC")
    d = model.scan.downsample
    view = View((field * d, field * d), model.fine_pixel_size_um, xy_um)
    photons = scene.specimen("FITC").render(t_s, view) * np.float32(CONFOCAL.exposure_ms)
    return model.expected_adu(photons)


def normalized(a: np.ndarray, norm: Normalization) -> np.ndarray:
    return (np.asarray(a, np.float32) - np.float32(norm.offset)) / np.float32(norm.scale)


def centre(h: int, w: int, p: int) -> tuple[slice, slice]:
    r, c = (h - p) // 2 // 2 * 2, (w - p) // 2
    return slice(r, r + p), slice(c, c + p)


@pytest.mark.parametrize("scale", [2, 1])
def test_simulated_items_shapes_and_normalization(scale):
    train, val, norm = build(scale, window=3, previous=True, background=True, kind="simulated",
                             **TINY)  # fmt: skip
    assert len(train) == 4 and len(val) == 4
    assert norm.offset == CONFOCAL.camera.offset_adu
    assert norm.scale > 0 and norm.scale == float(f"{norm.scale:.3g}")
    q = 32 * scale
    shapes = {"frames": (3, 32, 32), "target": (1, q, q), "previous": (1, q, q),
              "background": (1, 32, 32), "frames_prev": (3, 32, 32),
              "previous_prev": (1, q, q)}  # fmt: skip
    for ds in (train, val):
        for i in range(len(ds)):
            item = ds[i]
            assert {k: tuple(v.shape) for k, v in item.items()} == shapes
            assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in item.values())

    # validation items are fixed crops; training crops move from read to read
    a, b = val[1], val[1]
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(0)
    assert not torch.equal(train[0]["frames"], train[0]["frames"])

    # a validation item is the normalized centre crop of its pair: frames oldest first,
    # "previous" the target one time point earlier, "background" the median of the history
    s_idx, t = val.items[1]
    s = val.series[s_idx]
    assert list(s.meta["t_s"]) == sorted(s.meta["t_s"]) and len(s.low) == 9 and t == 8
    lo = centre(64, 64, 32)
    hi = tuple(slice(x.start * scale, x.stop * scale) for x in lo)
    item = val[1]
    np.testing.assert_allclose(item["frames"], normalized(s.low[6:9, 0, lo[0], lo[1]], norm))
    np.testing.assert_allclose(item["target"], normalized(s.targets[8][:, hi[0], hi[1]], norm))
    np.testing.assert_allclose(item["previous"], normalized(s.targets[7][:, hi[0], hi[1]], norm))
    # the rollout's step before: the window ending one frame earlier, its newest frame upsampled
    np.testing.assert_allclose(item["frames_prev"], normalized(s.low[5:8, 0, lo[0], lo[1]], norm))
    up = np.repeat(np.repeat(s.low[7, :, lo[0], lo[1]], scale, -2), scale, -1)
    np.testing.assert_allclose(item["previous_prev"], normalized(up, norm))
    median = np.median(s.low[:, :, lo[0], lo[1]], axis=0)
    np.testing.assert_allclose(item["background"].numpy(), normalized(median, norm), atol=1e-6)


def test_a_quarter_of_training_backgrounds_are_a_key_starts():
    """Live, a key's first frames have a background of fewer frames than BACKGROUND_FRAMES;
    the share data.key_starts of training items gets such a background, validation never (and
    none by default, so the shipped engines' data stay as they were)."""
    from engines.package import BACKGROUND_FRAMES

    train, val, _ = build(1, background=True, kind="simulated", pairs=2, val_pairs=1,
                          field=48, patch=32, key_starts=0.25)  # fmt: skip
    torch.manual_seed(0)
    counts = [train._background_frames() for _ in range(800)]
    short = [c for c in counts if c < BACKGROUND_FRAMES]
    assert abs(len(short) / len(counts) - 0.25) < 0.05
    assert set(short) == set(range(1, BACKGROUND_FRAMES))
    assert {val._background_frames() for _ in range(50)} == {BACKGROUND_FRAMES}
    default, _, _ = build(1, background=True, kind="simulated", pairs=2, val_pairs=1, field=48,
                          patch=32)  # fmt: skip
    assert {default._background_frames() for _ in range(50)} == {BACKGROUND_FRAMES}


def test_simulated_rollout_items_hold_every_earlier_window():
    """rollout=3 with window 2: the windows ending at t-3, t-2, t-1 oldest first, and the
    first-frame rule's previous for the step at t-3."""
    _, val, norm = build_datasets(DataConfig(kind="simulated", **TINY), scale=2, window=2,
                                  previous=True, background=False, rollout=3)  # fmt: skip
    s_idx, t = val.items[0]
    s = val.series[s_idx]
    assert len(s.low) == 5 and t == 4
    item = val[0]
    lo = centre(64, 64, 32)
    windows = s.low[[0, 1, 1, 2, 2, 3], 0][:, lo[0], lo[1]]
    assert item["frames_prev"].shape == (6, 32, 32)
    np.testing.assert_allclose(item["frames_prev"], normalized(windows, norm))
    up = np.repeat(np.repeat(s.low[1, :, lo[0], lo[1]], 2, -2), 2, -1)
    np.testing.assert_allclose(item["previous_prev"], normalized(up, norm))
    np.testing.assert_allclose(item["frames"], normalized(s.low[3:5, 0, lo[0], lo[1]], norm))
    with pytest.raises(ValueError, match="rollout=0"):
        build_datasets(DataConfig(kind="simulated", **TINY), scale=2, window=2, previous=True,
                       background=False, rollout=0)  # fmt: skip


@pytest.mark.parametrize("scale", [2, 1])
@pytest.mark.parametrize("target", ["high-quality", "clean"])
def test_simulated_targets_are_raw_equivalent(scale, target):
    """Binned by the scale, a target has the expected ADU of the raw frame of the same instant."""
    train, val, _ = build(scale, kind="simulated", target=target, **TINY)
    ratios = []
    for s_idx, t in train.items + val.items:
        s = train.series[s_idx]
        expected = expected_low(s.meta["t_s"][t], s.meta["xy_um"], 64)
        binned = s.targets[t][0].reshape(64, scale, 64, scale).mean(axis=(1, 3))
        inner = (slice(8, -8, 2), slice(8, -8))  # even rows: no bidirectional line phase
        e, b = expected[inner] - 50, binned[inner] - 50
        ratios.append(b.mean() / e.mean())
        if target == "clean":  # noiseless: equal pixel by pixel
            np.testing.assert_allclose(b, e, atol=0.01 * e.max() + 1e-3)
    assert np.mean(ratios) == pytest.approx(1.0, abs=0.02)
    assert all(abs(r - 1) < 0.05 for r in ratios)
    assert train.info["target_gain"] == (0.25 if target == "high-quality" else scale**2)


def test_simulated_window_holds_consecutive_time_points_oldest_first():
    train, _, _ = build(2, window=3, kind="simulated", dt_s=2.0, **TINY)
    checked = 0
    for s_idx, _t in train.items:
        s = train.series[s_idx]
        times = s.meta["t_s"]
        assert np.allclose(np.diff(times), 2.0)
        assert not np.array_equal(s.low[0], s.low[-1])
        expected = [expected_low(t, s.meta["xy_um"], 64).ravel() for t in times]
        for i, frame in enumerate(s.low[:, 0]):
            if any(e.std() == 0 for e in expected):
                continue  # an empty field: nothing moves
            corr = [np.corrcoef(frame.ravel().astype(np.float64), e)[0, 1] for e in expected]
            assert int(np.argmax(corr)) == i  # each frame shows its own instant
            checked += 1
    assert checked >= 6


def test_simulated_errors():
    with pytest.raises(ValueError, match="target='clean'"):
        build(4, kind="simulated", **TINY)
    with pytest.raises(ValueError, match="channel 'GFP'"):
        build(2, kind="simulated", channel="GFP", **TINY)
    with pytest.raises(ValueError, match="smaller than patch=32"):
        build(2, kind="simulated", **{**TINY, "field": 16})
    with pytest.raises(ValueError, match="folder"):
        DataConfig(kind="paired")
    with pytest.raises(ValueError, match="defocus_um"):
        DataConfig(kind="simulated", defocus_um=(3.0, 1.0))


def structure(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Smooth random blobs in [0, 1]."""
    image = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 3.0)
    return (image - image.min()) / (image.max() - image.min())


def write_pairs(root, names, scale=2, low_side=48, high_side=None, gain=3.0, bias=7.0):
    (root / "low").mkdir(parents=True)
    (root / "high").mkdir()
    rng = np.random.default_rng(1)
    truth = {}
    for i, name in enumerate(names):
        hi = 100 + 400 * structure((low_side * scale,) * 2, i)
        lo = hi.reshape(low_side, scale, low_side, scale).mean(axis=(1, 3))
        lo = rng.poisson(lo).astype(np.uint16)
        side = high_side or low_side * scale
        tifffile.imwrite(root / "low" / f"{name}.tif", lo)
        tifffile.imwrite(root / "high" / f"{name}.tif",
                         (gain * hi[:side, :side] + bias).astype(np.float32))  # fmt: skip
        truth[name] = hi
    return truth


def test_paired_folder_matched_by_name_split_and_raw_equivalent(tmp_path):
    names = ["a", "b", "c", "d"]
    truth = write_pairs(tmp_path, names)
    train, val, norm = build(2, previous=True, background=True, kind="paired",
                             folder=tmp_path, val_fraction=0.25, patch=32)  # fmt: skip
    held = {val.series[i].meta["name"] for i, _ in val.items}
    used = {train.series[i].meta["name"] for i, _ in train.items}
    assert len(held) == 1 and len(used) == 3 and held | used == set(names)
    assert norm.offset == pytest.approx(np.percentile(
        np.concatenate([tifffile.imread(tmp_path / "low" / f"{n}.tif").ravel() for n in used]), 0.1
    ), rel=1e-3)  # fmt: skip
    fits = train.info["intensity_fit"]
    assert set(fits) == set(names)
    for name, (a, _) in fits.items():  # high = 3 * truth + 7
        assert a == pytest.approx(1 / 3, rel=0.05)
        s = next(s for s in train.series if s.meta["name"] == name)
        target = s.targets[0][0]
        assert target.mean() == pytest.approx(s.low.mean(), rel=1e-4)  # raw-equivalent
        np.testing.assert_allclose(target, truth[name], rtol=0.05, atol=5.0)
    item = val[0]
    assert tuple(item["frames"].shape) == (1, 32, 32) and tuple(item["target"].shape) == (1, 64, 64)
    # single images are first frames: "previous" is the current frame, upsampled
    up = item["frames"][0].repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(item["previous"][0], up)
    assert torch.equal(item["background"], item["frames"])


def test_paired_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="low/ and high/"):
        build(2, kind="paired", folder=tmp_path, patch=32)
    write_pairs(tmp_path / "names", ["a", "b"])
    (tmp_path / "names" / "high" / "b.tif").rename(tmp_path / "names" / "high" / "x.tif")
    with pytest.raises(ValueError, match=r"low/ only has \[b\], high/ only has \[x\]"):
        build(2, kind="paired", folder=tmp_path / "names", patch=32)
    write_pairs(tmp_path / "shape", ["a", "b"], high_side=90)
    with pytest.raises(ValueError, match="must be 96x96"):
        build(2, kind="paired", folder=tmp_path / "shape", patch=32)
    write_pairs(tmp_path / "small", ["a", "b"], low_side=24)
    with pytest.raises(ValueError, match="smaller than patch=32"):
        build(2, kind="paired", folder=tmp_path / "small", patch=32)


def test_stacks_teacher_forcing_and_errors(tmp_path):
    (tmp_path / "low").mkdir()
    (tmp_path / "high").mkdir()
    hi = 100 + 400 * np.stack([structure((64, 64), t) for t in range(5)])
    lo = hi.reshape(5, 32, 2, 32, 2).mean(axis=(2, 4)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "low" / "s.tif", lo, photometric="minisblack")
    tifffile.imwrite(tmp_path / "high" / "s.tif", hi.astype(np.float32), photometric="minisblack")
    train, val, norm = build(2, window=2, previous=True, kind="stacks", folder=tmp_path,
                             patch=32, val_fraction=0.2, match_intensity=False)  # fmt: skip
    assert [t for _, t in train.items] == [0, 1, 2, 3] and [t for _, t in val.items] == [4]
    first, later = train[0], train[2]
    assert torch.equal(first["frames"][0], first["frames"][1])  # padded with the oldest frame
    np.testing.assert_allclose(later["frames"].numpy(), normalized(lo[1:3], norm))
    np.testing.assert_allclose(later["previous"][0].numpy(), normalized(hi[1], norm), rtol=1e-6)
    up = first["frames"][1].repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(first["previous"][0], up)
    tifffile.imwrite(
        tmp_path / "high" / "s.tif", hi[:4].astype(np.float32), photometric="minisblack"
    )
    with pytest.raises(ValueError, match="low has 5 frames, high has 4"):
        build(2, kind="stacks", folder=tmp_path, patch=32)


def test_stacks_with_a_profile_convert_their_low_frames_and_export_in_electrons(tmp_path):
    from calibration.camera import CameraParams
    from calibration.profile import CalibrationProfile
    from engines.offline.export import in_electrons
    from engines.package import Normalization
    from engines.train.config import TrainConfig

    (tmp_path / "low").mkdir()
    (tmp_path / "high").mkdir()
    hi = 300 + 400 * np.stack([structure((64, 64), t) for t in range(3)])
    columns = np.linspace(-20, 30, 32, dtype=np.float32)  # a column pattern on the low frames
    lo = (hi.reshape(3, 32, 2, 32, 2).mean(axis=(2, 4)) + columns).astype(np.uint16)
    tifffile.imwrite(tmp_path / "low" / "s.tif", lo, photometric="minisblack")
    tifffile.imwrite(tmp_path / "high" / "s.tif", hi.astype(np.float32), photometric="minisblack")
    camera = CameraParams(gain_adu_per_electron=2.0, offset_adu=300.0)
    offset_map = np.broadcast_to(300.0 + columns, (32, 32)).astype(np.float32)
    profile = CalibrationProfile(rig="cols", pixel_size_um=0.1, camera=camera).with_arrays(
        offset_map=offset_map
    ).save(tmp_path / "profile")  # fmt: skip
    train, _, _ = build(2, kind="stacks", folder=tmp_path, patch=32, val_fraction=0,
                        match_intensity=False, profile=profile)  # fmt: skip
    # the column pattern is gone: the low frames are the block means of the high ones
    want = hi.reshape(3, 32, 2, 32, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(train.series[0].low[:, 0], want, atol=1.0)
    cfg = TrainConfig.model_validate({
        "name": "cols", "task": "super-resolution", "scale": 2, "generator": {"arch": "unet"},
        "data": {"kind": "stacks", "folder": str(tmp_path), "profile": str(profile)},
    })  # fmt: skip
    norm = in_electrons(Normalization(offset=300.0, scale=100.0), cfg)
    assert norm.units == "electrons" and norm.scale == 50.0 and norm.camera is not None
    without = cfg.model_copy(update={"data": cfg.data.model_copy(update={"profile": None})})
    assert in_electrons(Normalization(offset=300.0, scale=100.0), without).units == "adu"


def test_synthetic_clean_images_move_between_frames_with_motion(tmp_path):
    """With motion, each sample's earlier frames show its clean image shifted by lag steps at a
    drawn speed and heading; the scored frame and its target are the still ones, and data
    without motion stay as they were."""
    from calibration.sim.randomize import MotionRanges

    offset = CONFOCAL.camera.offset_adu
    tifffile.imwrite(tmp_path / "clean0.tif",
                     (offset + 4000 * structure((128, 128), 0)).astype(np.float32))  # fmt: skip
    kw = {"kind": "synthetic", "folder": tmp_path, "pairs": 3, "val_pairs": 0,
          "val_fraction": 0, "patch": 32}  # fmt: skip
    ranges = MotionRanges(max_speed_px=6, max_rotation_deg=0)
    moving, _, _ = build_datasets(DataConfig(**kw), scale=2, window=3, previous=False,
                                  background=False, motion=ranges)  # fmt: skip
    still, _, _ = build(2, window=3, **kw)
    for s, s0 in zip(moving.series, still.series, strict=True):
        np.testing.assert_array_equal(s.targets[2], s0.targets[2])  # the scored target
        m = s.meta["motion"]
        assert 0 <= m["px_per_frame"] <= 6 and m["turn_deg"] == 0
        clean = s.targets[2][0]
        dx, dy = (2 * m["px_per_frame"] * d for d in m["direction"])  # two frames before
        want = ndimage.shift(clean, (dy, dx), order=1, mode="mirror")
        inner = (slice(16, -16), slice(16, -16))
        early = s.low[0, 0].astype(np.float64) - offset
        binned_want = want.reshape(64, 2, 64, 2).sum((1, 3)) - 4 * offset
        binned_still = clean.reshape(64, 2, 64, 2).sum((1, 3)) - 4 * offset
        c_want = np.corrcoef(early[8:-8, 8:-8].ravel(), binned_want[8:-8, 8:-8].ravel())[0, 1]
        c_still = np.corrcoef(early[8:-8, 8:-8].ravel(), binned_still[8:-8, 8:-8].ravel())[0, 1]
        if m["px_per_frame"] > 1:
            assert c_want > c_still, (m, c_want, c_still)
        assert inner  # the comparison above stays inside the mirrored edges
    assert "motion" not in still.series[0].meta


def test_synthetic_from_clean_tiffs(tmp_path):
    offset = CONFOCAL.camera.offset_adu
    for i in range(3):
        tifffile.imwrite(tmp_path / f"clean{i}.tif",
                         (offset + 2000 * structure((128, 128), i)).astype(np.float32))  # fmt: skip
    train, val, norm = build(2, window=3, kind="synthetic", folder=tmp_path, pairs=4, val_pairs=2,
                             patch=32)  # fmt: skip
    assert norm.offset == offset
    sigma = psf_sigma_um(CONFOCAL.optics) / (CONFOCAL.pixel_size_um / 2)  # target pixels
    for s_idx, t in train.items + val.items:
        s = train.series[s_idx]
        clean = tifffile.imread(tmp_path / f"{s.meta['source']}.tif")
        np.testing.assert_array_equal(s.targets[t][0], clean)  # the target is the clean image
        blurred = ndimage.gaussian_filter(clean - offset, sigma).reshape(64, 2, 64, 2).sum((1, 3))
        for frame in s.low[:, 0]:  # independent noisy, blurred, binned exposures
            assert np.corrcoef(frame.ravel(), blurred.ravel())[0, 1] > 0.8
            assert frame.mean() - offset == pytest.approx((clean - offset).mean(), rel=0.05)
        assert not np.array_equal(s.low[0], s.low[1])
    held = {train.series[i].meta["source"] for i, _ in val.items}
    assert held.isdisjoint(train.series[i].meta["source"] for i, _ in train.items)
    item = val[0]
    s = val.series[val.items[0][0]]
    clean = tifffile.imread(tmp_path / f"{s.meta['source']}.tif")
    np.testing.assert_allclose(item["target"][0].numpy(), normalized(clean[32:96, 32:96], norm))


def test_synthetic_from_simulated_specimens_with_a_profile(tmp_path):
    camera = CameraParams(offset_adu=300, gain_adu_per_electron=2.0, read_noise_electrons=1.0,
                          quantum_efficiency=0.7, bit_depth=16)  # fmt: skip
    CalibrationProfile(pixel_size_um=0.1, camera=camera).save(tmp_path)
    train, _, norm = build(2, previous=True, kind="synthetic", profile=tmp_path, dt_s=1.0, **TINY)
    assert norm.offset == 300
    for s_idx, t in train.items:
        s = train.series[s_idx]
        assert s.low.shape == (2, 1, 64, 64) and s.targets[t].shape == (1, 128, 128)
        assert not np.array_equal(s.targets[t], s.targets[t - 1])  # the specimen moved
        target = s.targets[t][0].reshape(64, 2, 64, 2).mean(axis=(1, 3))
        assert s.low[t, 0].mean() == pytest.approx(target.mean(), rel=0.02)  # same ADU scale


def focus(image: np.ndarray) -> float:
    """Gradient energy after light smoothing: falls as an image blurs."""
    g = ndimage.gaussian_filter(np.asarray(image, np.float64), 1.0)
    return float(np.mean(ndimage.sobel(g, 0) ** 2 + ndimage.sobel(g, 1) ** 2))


def test_celldiscoverer_deblur_pairs_blur_the_low_frames():
    calls: list[tuple[int, int]] = []
    cfg = DataConfig(kind="simulated", preset="celldiscoverer", pairs=4, val_pairs=2, patch=32,
                     field=128, defocus_um=(1.0, 3.0))  # fmt: skip
    train, val, norm = build_datasets(
        cfg,
        scale=1,
        window=1,
        previous=False,
        background=False,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(i, 6) for i in range(1, 7)]
    assert norm.offset == get_preset("celldiscoverer").camera.offset_adu
    for s_idx, t in train.items + val.items:
        s = train.series[s_idx]
        assert s.low.shape == (1, 1, 128, 128) and 1.0 <= abs(s.meta["dz_um"]) <= 3.0
        assert focus(s.low[t, 0]) < focus(s.targets[t][0])
    assert tuple(train[0]["target"].shape) == (1, 32, 32)


def test_video_augment_moves_the_rollout_inputs_with_the_rest():
    from engines.train.loop import VideoAugmented

    g = torch.Generator().manual_seed(0)
    frames, previous = torch.rand(2, 8, 8, generator=g), torch.rand(1, 16, 16, generator=g)
    item = {"frames": frames, "target": torch.rand(1, 16, 16, generator=g), "previous": previous,
            "background": torch.rand(1, 8, 8, generator=g), "frames_prev": frames.clone(),
            "previous_prev": previous.clone()}  # fmt: skip
    data = VideoAugmented([item], np.random.default_rng(3))
    for _ in range(8):
        out = data[0]
        assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in item.items()}
        assert torch.equal(out["frames_prev"], out["frames"])
        assert torch.equal(out["previous_prev"], out["previous"])


# -- opt-in rig and motion randomization --------------------------------------------------------

#: sha256 of the data the shipped configs give (tiny sizes; see _data_digest) with their rig,
#: motion and specimens sections taken out, computed with the code before those existed: without
#: them the data stay bit-identical
SHIPPED_DATA_SHA256 = {
    "confocal-denoise": "2811c10193f77efe4d5da9437c2c9f1e1048fed7dc68bd48dec7c3e88473156e",
}
"""Shipped configs without randomization: the data they trained on before it existed."""
RANDOMIZED_DATA_SHA256 = {
    "confocal-denoise": "78407c5382f5b1ef31e34fece6ec60d4a5b01ba68978ef2d7db67d4c72da01c5",
    "confocal-denoise-sr2x": "55d8e30c2597fc73ef676a743e35812df51917e15d37a3b97285476c2601f5da",
}
"""Shipped configs with ``rig:`` (and ``motion:``, ``specimens``): their (tiny) data, pinned as
trained."""


def _shipped(name: str, **data):
    from pathlib import Path

    from engines.train.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "engines/zoo/configs" / f"{name}.yaml")
    tiny = {"pairs": 2, "val_pairs": 1, "field": 32, "patch": 16, **data}
    return cfg, cfg.data.model_copy(update=tiny)


def _data_digest(cfg, data, **kw) -> tuple[str, list]:
    import hashlib

    kw = {"rig": cfg.rig, "motion": cfg.motion, **kw}
    train, val, norm = build_datasets(data, scale=cfg.scale, window=cfg.window,
                                      previous=cfg.previous, background=cfg.background,
                                      rollout=cfg.rollout, **kw)  # fmt: skip
    h = hashlib.sha256()
    for s in train.series:
        h.update(np.ascontiguousarray(s.low).tobytes())
        for t in sorted(s.targets):
            h.update(np.ascontiguousarray(s.targets[t]).tobytes())
    torch.manual_seed(0)
    for ds in (train, val):
        for i in range(len(ds)):
            for k, v in sorted(ds[i].items()):
                h.update(k.encode())
                h.update(v.numpy().tobytes())
    h.update(norm.model_dump_json().encode())
    return h.hexdigest(), train.series


@pytest.mark.parametrize("name", sorted(SHIPPED_DATA_SHA256))
def test_shipped_configs_give_the_same_data_as_before_randomization(name):
    cfg, data = _shipped(name, specimens=None)
    cfg = cfg.model_copy(update={"rig": None, "motion": None})
    assert _data_digest(cfg, data)[0] == SHIPPED_DATA_SHA256[name]


@pytest.mark.parametrize("name", sorted(RANDOMIZED_DATA_SHA256))
def test_randomized_shipped_configs_give_the_data_they_trained_on(name, stand_in_wheels):
    """Their real-image specimens (wheel-*) come from stand-in wheels here (no network): the pin
    holds the code path, the drawn rigs, motions and specimen picks."""
    cfg, data = _shipped(name)
    assert cfg.rig is not None
    assert _data_digest(cfg, data)[0] == RANDOMIZED_DATA_SHA256[name]


def test_motion_moves_the_field_between_frames():
    from calibration.sim.randomize import MotionRanges

    cfg, data = _shipped("confocal-denoise-sr2x", target="clean", pairs=3, field=64,
                         specimens=None)  # fmt: skip
    motion = MotionRanges(max_speed_px=6, max_rotation_deg=0)
    _, series = _data_digest(cfg, data, motion=motion, rig=None)  # the preset's own rig
    _, still = _data_digest(cfg, data, motion=MotionRanges(max_speed_px=0, max_rotation_deg=0),
                            rig=None)  # fmt: skip
    for s, s0 in zip(series, still, strict=True):
        last = max(s.targets)
        assert s.meta["t_s"] == s0.meta["t_s"] and s.meta["xy_um"] == s0.meta["xy_um"]
        np.testing.assert_array_equal(s.targets[last], s0.targets[last])  # scored: unmoved
        np.testing.assert_array_equal(s.low[-1], s0.low[-1])
        assert np.abs(s.low[0].astype(float) - s0.low[0]).mean() > 1  # earlier: moved
        m = s.meta["motion"]
        px = CONFOCAL.pixel_size_um / cfg.scale  # output px
        a, b = s.targets[last][0], s.targets[last - 1][0]
        # the field moved step_um along direction (row: y, column: x), so the image content
        # moves the other way in the newer frame; the specimen drifts a little itself
        want = -np.array(m["direction"][::-1]) * m["step_um"] / px
        inner = (slice(12, -12), slice(12, -12))
        moved_back = ndimage.shift(b, want, order=1)[inner]
        assert np.abs(moved_back - a[inner]).mean() < 0.6 * np.abs(b - a)[inner].mean()
        assert 0 <= m["step_um"] / px <= 6


def test_motion_ranges_can_stand_still():
    from calibration.sim.randomize import MotionRanges, StageMotion

    moving, half = MotionRanges(), MotionRanges(still=0.5)
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    assert [moving.draw(a, 0.1, 2) for _ in range(5)] == [
        MotionRanges(still=0.0).draw(b, 0.1, 2) for _ in range(5)
    ]  # still=0 draws nothing more: existing configs' data stay bit-identical
    rng = np.random.default_rng(4)
    draws = [half.draw(rng, 0.1, 2) for _ in range(400)]
    n = sum(d == StageMotion() for d in draws)
    assert 160 < n < 240 and all(d.step_um > 0 for d in draws if d != StageMotion())


def test_rig_randomization_is_seeded_and_in_one_set_of_units():
    from calibration.sim.randomize import RigRanges

    cfg, data = _shipped("confocal-denoise", pairs=6, val_pairs=1, specimens=None)
    rig = RigRanges(gain_adu_per_electron=(0.5, 10.0), peak_photons=(100.0, 100.0),
                    column_offset_sd_adu=(3.0, 3.0), read_noise_e=(0.3, 0.3))  # fmt: skip
    digest, series = _data_digest(cfg, data, rig=rig)
    assert digest == _data_digest(cfg, data, rig=rig)[0]  # seeded: reproducible
    assert digest != SHIPPED_DATA_SHA256["confocal-denoise"]
    gains = [s.meta["rig"]["gain_adu_per_electron"] for s in series]
    assert len(set(gains)) == len(gains) and all(0.5 <= g <= 10 for g in gains)
    cam = CONFOCAL.camera  # every sample in the preset camera's ADU, whatever its rig's gain
    peaks = []
    for s in series:
        assert s.low.dtype == np.float32
        electrons = (s.low[-1, 0] - cam.offset_adu) / cam.gain_adu_per_electron
        smooth = ndimage.uniform_filter(electrons, 3)
        peaks.append(float(smooth.max()))
    # 100 photons at the brightest pixel (qe x), smoothed a little: same level for every gain
    assert max(peaks) < 2.5 * min(peaks)
    assert 0.2 * 100 * cam.quantum_efficiency < np.median(peaks) < 1.5 * 100


def test_a_drawn_rigs_conversion_removes_its_column_pattern():
    from calibration.camera import record
    from calibration.sim.randomize import RigRanges

    drawn = RigRanges(column_offset_sd_adu=(4.0, 4.0), read_noise_e=(0.0, 0.0)).draw(
        np.random.default_rng(0), CONFOCAL.camera
    )
    dark = record(np.zeros((8, 16), np.float32), drawn.camera, np.random.default_rng(1),
                  offset_map=drawn.offset_map((8, 16)))  # fmt: skip
    assert np.ptp(dark[0].astype(float)) > 3  # a column pattern ...
    electrons = drawn.electrons((8, 16)).to_electrons(dark)
    assert np.abs(electrons).max() <= 0.5 / drawn.camera.gain_adu_per_electron + 1e-6  # ... gone
    # a field rendered with a margin and cropped (PairRig.low) has the field's own pattern, the
    # one training converts with
    padded = drawn.offset_map((8 + 2 * 6, 16 + 2 * 6))
    np.testing.assert_array_equal(padded[6:-6, 6:-6], drawn.offset_map((8, 16)))


def test_randomization_needs_simulated_data(tmp_path):
    from calibration.sim.randomize import RigRanges

    with pytest.raises(ValueError, match="kind='simulated'"):
        build_datasets(DataConfig(kind="synthetic", **TINY), scale=1, window=1, previous=False,
                       background=False, rig=RigRanges())  # fmt: skip


def test_specimens_mix_kinds_per_sample(stand_in_wheels):
    """data.specimens: each sample images one of the kinds, drawn from a stream of its own (the
    rest of the data keeps its draws), real images (wheel kinds) among them."""
    from calibration.sim.randomize import RigRanges

    def build_rigs(kinds):  # a drawn rig gives every frame a noise stream of its own
        cfg = DataConfig(kind="simulated", specimens=kinds, **{**TINY, "pairs": 8})
        return build_datasets(cfg, scale=2, window=1, previous=False, background=False,
                              rig=RigRanges(read_noise_e=(0.5, 2.0)))[0]  # fmt: skip

    kinds = ("puncta", "wheel-bbbc007")
    train = build_rigs(kinds)
    drawn = [s.meta["specimen"] for s in train.series]
    assert set(drawn) == set(kinds)
    assert train.info["specimens"] == list(kinds)
    # a sample of one kind is what a config of that kind alone renders at the same instant
    alone = build_rigs(("puncta",))
    for mixed, single in zip(train.series, alone.series, strict=True):
        assert mixed.meta["t_s"] == single.meta["t_s"]  # the same instants and fields
        if mixed.meta["specimen"] == "puncta":
            np.testing.assert_array_equal(mixed.low, single.low)
        else:
            assert not np.array_equal(mixed.low, single.low)


@pytest.mark.parametrize(
    ("cfg", "needle"),
    [
        ({"kind": "synthetic", "specimens": ["puncta"]}, "not kind='synthetic'"),
        ({"kind": "simulated", "specimens": []}, "specimens is empty"),
        ({"kind": "simulated", "specimens": ["nope"]}, "unknown specimen kind 'nope'"),
        ({"kind": "simulated", "specimens": ["brightfield-cells"]}, "not seen in fluorescence"),
        ({"kind": "simulated", "preset": "celldiscoverer", "specimens": ["puncta"]},
         "not seen in transmitted light"),
    ],
)  # fmt: skip
def test_specimens_errors(cfg, needle):
    with pytest.raises(ValueError, match=needle):
        DataConfig(**cfg)
