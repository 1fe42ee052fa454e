"""Training from noisy recordings alone: blind spots (Noise2Void, N2V2's median replacement),
the next frame as target (Noise2Noise in time) and the frame's other scan lines
(Neighbor2Neighbor), on real TIFF time-lapses and run folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

torch = pytest.importorskip("torch", reason="training needs the train extra")

from engines.train import blind_spot, line_split  # noqa: E402
from engines.train.config import TrainConfig  # noqa: E402
from engines.train.data import DataConfig, build_datasets  # noqa: E402
from engines.train.loop import Trainer  # noqa: E402


def test_hide_replaces_one_pixel_per_block_of_the_newest_frame_by_its_neighbours_median():
    frames = torch.rand(2, 3, 37, 45)
    hidden, mask = blind_spot.hide(frames, torch.Generator().manual_seed(0))
    assert mask.shape == (2, 1, 37, 45) and mask.dtype == torch.bool
    per_block = mask[:, 0, :32, :40].reshape(2, 4, 8, 5, 8).sum(dim=(2, 4))
    assert (per_block == 1).all()  # stratified: one hidden pixel in every whole block
    assert torch.equal(hidden[:, :2], frames[:, :2])  # earlier frames as they were
    newest, out = frames[:, 2], hidden[:, 2]
    assert torch.equal(out[~mask[:, 0]], newest[~mask[:, 0]])
    b, r, c = (int(v) for v in mask[:, 0].nonzero()[len(mask.nonzero()) // 2])
    padded = np.pad(newest[b].numpy(), 2, mode="reflect")
    block = padded[r : r + 5, c : c + 5].ravel()
    around = np.delete(block, 12)  # the centre itself is never seen
    assert float(out[b, r, c]) in set(around.tolist())
    assert float(out[b, r, c]) == pytest.approx(np.sort(around)[11])  # torch: the lower median
    again, same = blind_spot.hide(frames, torch.Generator().manual_seed(0))
    assert torch.equal(same, mask) and torch.equal(again, hidden)


def test_scored_counts_the_hidden_pixels_only():
    target = torch.zeros(1, 1, 8, 8)
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[0, 0, 2, 3] = True
    output = torch.ones(1, 1, 8, 8)  # wrong everywhere
    blended = blind_spot.scored(output, target, mask)
    assert float(blended.sum()) == 1.0  # only the hidden pixel's error is left


def test_line_split_takes_one_pixel_of_each_line_of_every_2x2_cell():
    frames = torch.arange(2 * 2 * 6 * 8, dtype=torch.float32).view(2, 2, 6, 8)
    first, second = line_split.cells(frames.shape, torch.Generator().manual_seed(0))
    assert first.shape == second.shape == (2, 12)
    for idx_a, idx_b in zip(first.view(-1), second.view(-1), strict=True):
        (ra, ca), (rb, cb) = divmod(int(idx_a), 8), divmod(int(idx_b), 8)
        assert (ra // 2, ca // 2) == (rb // 2, cb // 2)  # the same cell
        assert ra != rb  # one pixel of each line
    rows = first.view(-1) // 8 % 2
    assert 0 < int(rows.sum()) < len(rows)  # either line goes first, at random
    half = line_split.take(frames, first)
    assert half.shape == (2, 2, 3, 4)
    # the same pixels in every channel: channel 1 is channel 0 plus one frame's size
    torch.testing.assert_close(half[:, 1] - half[:, 0], torch.full((2, 3, 4), 48.0))
    with pytest.raises(ValueError, match="even frame sides, got 5x8"):
        line_split.cells(torch.Size((1, 1, 5, 8)), torch.Generator())


def test_line_split_target_is_the_other_half_corrected_by_the_outputs_own_difference():
    g = torch.Generator().manual_seed(3)
    frames, output = torch.rand(1, 2, 8, 8), torch.rand(1, 1, 8, 8)
    target = frames[:, -1:]
    halves, corrected, first = line_split.pairs(frames, target, output, g)
    a, b = line_split.cells(frames.shape, torch.Generator().manual_seed(3))
    assert torch.equal(first, a)
    w = line_split.GAMMA / (1 + line_split.GAMMA)
    want = line_split.take(target, b) + w * (
        line_split.take(output, a) - line_split.take(output, b)
    )
    torch.testing.assert_close(corrected, want)
    torch.testing.assert_close(halves, line_split.take(frames, a))


def _write_stack(path: Path, frames: int = 6, side: int = 48, shift: float = 0.0,
                 seed: int = 0) -> np.ndarray:  # fmt: skip
    """A noisy time-lapse of blurred spots; ``shift`` moves the field raw px per frame."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    scene = ndimage.gaussian_filter((rng.random((side, side)) > 0.97) * 400.0, 2.0)
    stack = np.stack([rng.poisson(50 + ndimage.shift(scene, (0, shift * t), mode="wrap"))
                      for t in range(frames)]).astype(np.uint16)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, stack)
    return stack


def _build(folder: Path, **data):
    cfg = DataConfig(kind="recording", folder=folder, patch=32, **data)
    return build_datasets(cfg, scale=1, window=1, previous=False, background=False)


def test_next_frame_targets_are_the_following_raw_frame(tmp_path):
    a = _write_stack(tmp_path / "rec" / "a.tif", seed=1)
    _write_stack(tmp_path / "rec" / "b.tif", seed=2)
    train, val, norm = _build(tmp_path / "rec", target="next-frame", val_fraction=0.5)
    assert train.info["kind"] == "recording" and train.info["dropped_for_motion"] == {
        "a.tif": 0, "b.tif": 0}  # fmt: skip
    series = {s.meta["name"]: s for s in train.series}["a"]
    for t, target in series.targets.items():
        np.testing.assert_array_equal(target[0], a[t + 1])
    assert len(train) == 5 and len(val) == 5  # split by file: one trains, one validates
    assert norm.offset > 0


def test_next_frame_leaves_out_frames_whose_field_moved(tmp_path):
    _write_stack(tmp_path / "still.tif", frames=5)
    _write_stack(tmp_path / "moving" / "m.tif", frames=5, shift=3.0)
    with pytest.raises(ValueError, match=r"moved more than max_shift_px=0.5"):
        _build(tmp_path / "moving", target="next-frame")
    train, _, _ = _build(tmp_path / "moving", target="next-frame", max_shift_px=4.0)
    assert train.info["dropped_for_motion"] == {"m.tif": 0}
    # one file: split in time, the last pairs held out
    train, val, _ = _build(tmp_path / "still.tif", target="next-frame", val_fraction=0.25)
    assert [t for _, t in train.items] == [0, 1, 2] and [t for _, t in val.items] == [3]


def test_blind_spot_targets_are_the_frame_itself_and_a_run_folder_gives_its_raw_files(tmp_path):
    run = tmp_path / "run-1"
    raw = _write_stack(run / "demo_p000_raw.ome.tif", frames=4)
    _write_stack(run / "demo_p000_confocal-denoise.ome.tif", frames=4, seed=3)  # enhanced
    (run / "index.jsonl").write_text(json.dumps({"kind": "raw"}) + "\n")
    train, val, _ = _build(run, target="blind-spot", val_fraction=0.25, frames=3)
    assert train.info["files"] == ["demo_p000_raw.ome.tif"] and train.info["frames"] == [3]
    s = train.series[0]
    for t, target in s.targets.items():
        np.testing.assert_array_equal(target[0], raw[t])
    assert len(train) + len(val) == 3


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"kind": "recording", "folder": "x"}, "kind='recording' with target='high-quality'"),
        ({"kind": "simulated", "target": "blind-spot"}, "kind='simulated' with target="),
        ({"kind": "recording", "target": "next-frame"}, "needs folder"),
    ],
)
def test_recording_config_errors(data, needle):
    with pytest.raises(ValueError, match=needle):
        DataConfig(**data)


def test_recordings_train_denoisers_only(tmp_path):
    _write_stack(tmp_path / "a.tif")
    cfg = DataConfig(kind="recording", folder=tmp_path / "a.tif", target="blind-spot", patch=32)
    with pytest.raises(ValueError, match="not scale=2"):
        build_datasets(cfg, scale=2, window=1, previous=False, background=False)


def _config(folder: Path, target: str, **over) -> TrainConfig:
    overrides = {"features": 8, "depth": 2, "residual": target != "blind-spot"}
    return TrainConfig.model_validate({
        "name": "ss", "task": "denoise",
        "generator": {"arch": "unet", "size": "small", "overrides": overrides},
        "data": {"kind": "recording", "folder": str(folder), "target": target, "patch": 32,
                 "val_fraction": 0.5},
        "losses": {"mse": 1.0}, "schedule": {"pretrain_steps": 20}, "batch": 4, "lr": 2e-3,
        "validate_every": 10, "log_every": 5, **over,
    })  # fmt: skip


def test_blind_spot_training_takes_pixel_losses_and_no_global_residual(tmp_path):
    with pytest.raises(ValueError, match=r"l1, mse, poisson_gaussian only, without \[.ssim.\]"):
        _config(tmp_path, "blind-spot", losses={"mse": 1.0, "ssim": 0.2})
    unet = {"arch": "unet", "size": "small"}
    with pytest.raises(ValueError, match="without the global residual"):
        _config(tmp_path, "blind-spot", generator=unet)


def test_line_split_training_takes_pixel_losses_and_the_recorded_orientation(tmp_path):
    with pytest.raises(ValueError, match=r"line-split training scores half-size.*\['ssim'\]"):
        _config(tmp_path, "line-split", losses={"mse": 1.0, "ssim": 0.2}, video_augment=False)
    with pytest.raises(ValueError, match="set video_augment: false"):
        _config(tmp_path, "line-split")


def test_line_split_data_undo_a_bidirectional_profiles_line_phase(tmp_path):
    from calibration.bidir import correct_phase
    from calibration.camera import CameraParams
    from calibration.profile import CalibrationProfile
    from calibration.scan import ScanParams

    raw = _write_stack(tmp_path / "rec" / "a.tif", frames=5)
    camera = CameraParams()
    profile = CalibrationProfile(
        rig="bidir", pixel_size_um=0.1, camera=camera,
        scan=ScanParams(bidirectional=True, phase_px=1.5),
    ).save(tmp_path / "profile")  # fmt: skip
    split, _, _ = _build(tmp_path / "rec", target="line-split", profile=profile, val_fraction=0)
    blind, _, _ = _build(tmp_path / "rec", target="blind-spot", profile=profile, val_fraction=0)
    for t in range(3):
        np.testing.assert_array_equal(blind.series[0].targets[t][0], raw[t].astype(np.float32))
        want = correct_phase(raw[t].astype(np.float32), 1.5)
        np.testing.assert_allclose(split.series[0].targets[t][0], want, rtol=1e-6)
    assert not np.array_equal(split.series[0].targets[0][0], raw[0])


def test_poisson_gaussian_needs_one_known_camera(tmp_path):
    from engines.train.loop import noise_model

    def cfg(**over):
        return TrainConfig.model_validate({
            "name": "pg", "task": "denoise", "generator": {"arch": "unet"},
            "losses": {"poisson_gaussian": 1.0}, **over,
        })  # fmt: skip

    from engines.package import Normalization

    norm = Normalization(offset=50.0, scale=100.0)
    simulated = noise_model(cfg(data={"kind": "simulated"}), norm)
    assert simulated.slope == pytest.approx(8.0 / 100.0)  # confocal-20fps: 8 ADU/e-
    with pytest.raises(ValueError, match="rig randomization draws a camera per sample"):
        noise_model(cfg(data={"kind": "simulated"}, rig={}), norm)
    with pytest.raises(ValueError, match=r"kind='stacks' pairs without data\.profile come"):
        noise_model(cfg(data={"kind": "stacks", "folder": str(tmp_path)}), norm)


def test_a_unet_without_residual_records_it_and_outputs_its_own_image():
    from engines.models import GENERATORS

    plain = GENERATORS["unet"](features=8, depth=2)
    bare = GENERATORS["unet"](features=8, depth=2, residual=False)
    assert "residual" not in plain.config() and bare.config()["residual"] is False
    assert type(bare).from_config(bare.config()).residual is False
    bare.load_state_dict(plain.state_dict())  # the same weights: they differ by the input
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(plain(x) - bare(x), x)


@pytest.mark.parametrize("target", ["blind-spot", "next-frame", "line-split"])
def test_a_short_self_supervised_run_trains_and_validates(tmp_path, target):
    for j in range(2):
        _write_stack(tmp_path / "rec" / f"r{j}.tif", frames=8, seed=j)
    over: dict = {"video_augment": False} if target == "line-split" else {}
    if target == "next-frame":  # and the camera's Poisson-Gaussian likelihood (the preset's)
        over["losses"] = {"poisson_gaussian": 1.0}
    summary = Trainer(_config(tmp_path / "rec", target, **over), tmp_path / "run").run()
    assert summary["steps"] == 20
    scores = [
        json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    ]
    psnrs = [r["val_psnr"] for r in scores if "val_psnr" in r]
    assert len(psnrs) == 3 and all(np.isfinite(psnrs))
    assert psnrs[-1] > psnrs[0]  # the scored loss falls
