"""engines.tiling: overlap-tile stitching is exact for identity and local engines, seam-free."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import gaussian_filter

from engines.tiling import TilingError, run_tiled, tile_starts

RNG = np.random.default_rng(0)


def identity(batch: dict[str, np.ndarray]) -> np.ndarray:
    return batch["frames"].copy()


def blur(radius: int, sigma: float = 1.5):
    """A local engine: Gaussian blur whose receptive-field radius is exactly `radius`."""
    truncate = radius / sigma

    def infer(batch: dict[str, np.ndarray]) -> np.ndarray:
        sigmas = (0, 0, sigma, sigma)
        return gaussian_filter(batch["frames"], sigmas, mode="reflect", truncate=truncate)

    return infer


def upsample2(a: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(a, 2, axis=-2), 2, axis=-1)


class Recorder:
    """Wrap an engine and keep the input shapes of every call."""

    def __init__(self, infer):
        self.infer = infer
        self.calls: list[dict[str, tuple[int, ...]]] = []

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        self.calls.append({k: v.shape for k, v in batch.items()})
        assert all(v.dtype == np.float32 for v in batch.values())
        return self.infer(batch)


# --- tile_starts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "tile", "overlap", "expected"),
    [
        (10, 16, 4, [0]),
        (16, 16, 4, [0]),
        (17, 16, 4, [0, 1]),
        (40, 16, 4, [0, 12, 24]),
        (41, 16, 4, [0, 12, 24, 25]),
        (64, 16, 0, [0, 16, 32, 48]),
    ],
)
def test_tile_starts_examples(length, tile, overlap, expected):
    assert tile_starts(length, tile, overlap) == expected


@given(st.integers(1, 300), st.integers(2, 64), st.data())
def test_tile_starts_cover_with_enough_overlap(length, tile, data):
    overlap = data.draw(st.integers(0, tile - 1))
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0
    assert starts == sorted(set(starts))
    if length > tile:
        assert starts[-1] + tile == length
        assert all(b - a <= tile - overlap for a, b in pairwise(starts))


@pytest.mark.parametrize(("tile", "overlap"), [(8, 8), (8, 9), (8, -1)])
def test_tile_starts_rejects_bad_overlap(tile, overlap):
    with pytest.raises(TilingError, match=rf"tile {tile} and overlap {overlap}"):
        tile_starts(50, tile, overlap)


# --- (a) identity is exact ------------------------------------------------------------------


@settings(deadline=None, max_examples=60)
@given(
    h=st.integers(1, 70),
    w=st.integers(1, 70),
    channels=st.integers(1, 3),
    multiple=st.sampled_from([1, 2, 4, 8]),
    batch=st.integers(1, 5),
    data=st.data(),
)
def test_identity_engine_gives_back_the_frame_exactly(h, w, channels, multiple, batch, data):
    tile = data.draw(st.integers(8, 32).filter(lambda t: t % multiple == 0), label="tile")
    overlap = data.draw(st.integers(0, tile - 1), label="overlap")
    frame = RNG.standard_normal((channels, h, w)).astype(np.float32)
    engine = Recorder(identity)
    out = run_tiled(
        engine, {"frames": (frame, 1)}, tile=tile, overlap=overlap, multiple=multiple, batch=batch
    )
    assert out.dtype == np.float32
    assert np.array_equal(out, frame)
    # every call sees whole tiles (a static-shape engine works) and at most `batch` of them
    for call in engine.calls:
        n, c, th, tw = call["frames"]
        assert 1 <= n <= batch and c == channels
        assert th % multiple == 0 and tw % multiple == 0
        if len(engine.calls) > 1:
            assert (th, tw) == (tile, tile)


def test_identity_untiled_with_padding_to_multiple():
    frame = RNG.standard_normal((2, 13, 21)).astype(np.float32)
    engine = Recorder(identity)
    out = run_tiled(engine, {"frames": (frame, 1)}, multiple=8)
    assert engine.calls == [{"frames": (1, 2, 16, 24)}]
    assert np.array_equal(out, frame)


def test_batches_hold_at_most_batch_tiles():
    frame = RNG.standard_normal((1, 40, 40)).astype(np.float32)  # 3 x 3 tiles
    engine = Recorder(identity)
    run_tiled(engine, {"frames": (frame, 1)}, tile=16, overlap=4, batch=4)
    assert [c["frames"][0] for c in engine.calls] == [4, 4, 1]


def test_padding_reflects_where_it_can_and_repeats_the_edge_where_it_cannot():
    seen: list[np.ndarray] = []

    def keep(batch):
        seen.append(batch["frames"][0, 0].copy())
        return batch["frames"]

    ramp = np.arange(10, dtype=np.float32)[None, :, None] * np.ones((1, 1, 3), np.float32)
    run_tiled(keep, {"frames": (ramp, 1)}, multiple=16)
    assert seen[-1].shape == (16, 16)
    np.testing.assert_array_equal(seen[-1][:, 0], [*range(10), 8, 7, 6, 5, 4, 3])  # rows: reflect
    np.testing.assert_array_equal(seen[-1][0, 3:], 0.0)  # 3 columns cannot reflect 13: edge


# --- (b) local engines: same as untiled, no seams -------------------------------------------


@pytest.mark.parametrize(
    ("h", "w", "tile", "overlap", "batch"), [(64, 96, 24, 8, 3), (48, 80, 16, 8, 1)]
)
def test_local_engine_tiled_equals_untiled(h, w, tile, overlap, batch):
    radius = overlap // 2
    frame = RNG.standard_normal((2, h, w)).astype(np.float32)
    engine = blur(radius)
    whole = run_tiled(engine, {"frames": (frame, 1)})
    tiled = run_tiled(engine, {"frames": (frame, 1)}, tile=tile, overlap=overlap, batch=batch)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)


def test_local_engine_with_padding_matches_direct_filter_in_the_interior():
    radius, overlap = 4, 8
    frame = RNG.standard_normal((1, 61, 75)).astype(np.float32)
    engine = blur(radius)
    tiled = run_tiled(engine, {"frames": (frame, 1)}, tile=24, overlap=overlap, multiple=8)
    direct = engine({"frames": frame[None]})[0]
    inner = (slice(None), slice(radius, -radius), slice(radius, -radius))
    np.testing.assert_allclose(tiled[inner], direct[inner], atol=1e-5)


def _column_steps(out: np.ndarray, cuts: list[int], margin: int) -> tuple[float, float]:
    """Worst deviation of the column-to-column difference at tile cuts vs elsewhere (a ramp)."""
    diff = np.diff(out[0, margin:-margin], axis=1)  # diff[:, j] = col j+1 - col j
    typical = np.median(diff)
    at_cuts = max(np.abs(diff[:, c - 1] - typical).max() for c in cuts)
    others = [j for j in range(margin, diff.shape[1] - margin) if j + 1 not in cuts]
    elsewhere = np.abs(diff[:, others] - typical).max()
    return float(at_cuts), float(elsewhere)


def _cuts(length: int, tile: int, overlap: int) -> list[int]:
    s = tile_starts(length, tile, overlap)
    return [(a + b + tile) // 2 for a, b in pairwise(s)]


def test_no_step_across_tile_borders_on_a_smooth_ramp():
    h, w, tile, overlap = 40, 100, 24, 8
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = (0.3 * xx + 0.1 * yy)[None]
    out = run_tiled(blur(overlap // 2), {"frames": (ramp, 1)}, tile=tile, overlap=overlap)
    at_cuts, elsewhere = _column_steps(out, _cuts(w, tile, overlap), margin=overlap)
    assert at_cuts < 1e-4 and elsewhere < 1e-4


def test_seam_check_sees_a_seam_when_the_receptive_field_exceeds_the_margin():
    """Control for the test above: with too little overlap for the blur, the step shows."""
    h, w, tile, overlap = 40, 100, 24, 2
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = (0.3 * xx + 0.1 * yy)[None]
    out = run_tiled(blur(4), {"frames": (ramp, 1)}, tile=tile, overlap=overlap)
    at_cuts, _ = _column_steps(out, _cuts(w, tile, overlap), margin=8)
    assert at_cuts > 1e-2  # 100x the tolerance the seam test allows


# --- (c) scale 2 with the previous output and a background ----------------------------------


@pytest.mark.parametrize(("h", "w", "tile", "multiple"), [(37, 53, 16, 4), (20, 20, None, 8)])
def test_scale2_engine_with_previous_and_background(h, w, tile, multiple):
    frames = RNG.standard_normal((2, h, w)).astype(np.float32)
    background = RNG.standard_normal((1, h, w)).astype(np.float32)
    previous = RNG.standard_normal((1, 2 * h, 2 * w)).astype(np.float32)

    def engine(batch):
        low = batch["frames"][:, :1] - batch["background"]
        return upsample2(low) + 0.5 * batch["previous"]

    out = run_tiled(
        Recorder(engine),
        {"frames": (frames, 1), "background": (background, 1), "previous": (previous, 2)},
        scale=2,
        tile=tile,
        overlap=6,
        multiple=multiple,
        batch=2,
    )
    expected = upsample2(frames[:1] - background) + 0.5 * previous
    assert out.shape == (1, 2 * h, 2 * w)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_previous_tiles_cover_the_same_region_as_frame_tiles():
    h, w = 30, 45
    frames = RNG.standard_normal((1, h, w)).astype(np.float32)
    engine = Recorder(lambda b: np.concatenate([upsample2(b["frames"]), b["previous"]], axis=1))
    out = run_tiled(
        engine,
        {"frames": (frames, 1), "previous": (upsample2(frames), 2)},
        scale=2,
        tile=16,
        overlap=4,
    )
    assert {c["previous"][2:] for c in engine.calls} == {(32, 32)}
    np.testing.assert_array_equal(out[0], out[1])


# --- validation -----------------------------------------------------------------------------


def test_tile_must_be_a_multiple_of_the_granularity():
    frame = np.zeros((1, 40, 40), np.float32)
    with pytest.raises(TilingError, match=r"tile 20 is not a multiple of 8.*tile=24 or 16"):
        run_tiled(identity, {"frames": (frame, 1)}, tile=20, overlap=4, multiple=8)


def test_tile_must_exceed_overlap():
    frame = np.zeros((1, 40, 40), np.float32)
    with pytest.raises(TilingError, match="tile 16 and overlap 16"):
        run_tiled(identity, {"frames": (frame, 1)}, tile=16, overlap=16)


def test_mismatched_inputs_name_their_shapes():
    frames = np.zeros((2, 32, 32), np.float32)
    previous = np.zeros((1, 32, 32), np.float32)
    with pytest.raises(TilingError, match=r"'previous' has shape \(1, 32, 32\).*\(C, 64, 64\)"):
        run_tiled(identity, {"frames": (frames, 1), "previous": (previous, 2)}, scale=2)


def test_wrong_engine_output_shape_names_expected_and_got():
    frame = np.zeros((1, 40, 40), np.float32)
    with pytest.raises(TilingError, match=r"shape \(2, 1, 16, 16\), expected \(2, 1, 32, 32\)"):
        run_tiled(identity, {"frames": (frame, 1)}, scale=2, tile=16, overlap=4, batch=2)
    with pytest.raises(TilingError, match=r"shape \(1, 1, 40, 40\), expected \(1, 1, 80, 80\)"):
        run_tiled(identity, {"frames": (frame, 1)}, scale=2)
    with pytest.raises(TilingError, match=r"shape \(40, 40\), expected \(1, C_out, 40, 40\)"):
        run_tiled(lambda b: b["frames"][0, 0], {"frames": (frame, 1)})


def test_channel_count_must_not_change_between_batches():
    frame = np.zeros((3, 40, 40), np.float32)
    calls = iter(range(100))

    def fickle(batch):
        n = batch["frames"].shape[0]
        return np.zeros((n, 1 + next(calls) % 2, 16, 16), np.float32)

    with pytest.raises(TilingError, match=r"expected \(1, 1, 16, 16\)"):
        run_tiled(fickle, {"frames": (frame, 1)}, tile=16, overlap=4)
