"""Cut frames into overlapping tiles, run an engine on batches of them, stitch without seams.

Stitching is "overlap-tile": between two neighbouring tiles the cut lies in the middle of
their overlap, and every output pixel is taken from the one tile whose interior holds it.
Each tile's outer margin (where the engine lacked context) is discarded, never blended, so an
engine whose receptive-field radius is at most ``overlap // 2`` gives the same output tiled
as untiled. Frames are padded at the bottom and right (reflect, or edge where a side is too
short to reflect) to a multiple of the engine's size granularity and at least one tile.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from typing import Literal

import numpy as np

from calibration.errors import ScopecastError

#: One engine call: a dict of float32 (N, C, h, w) batches -> (N, C_out, h*scale, w*scale).
InferFn = Callable[[dict[str, np.ndarray]], np.ndarray]


class TilingError(ScopecastError, ValueError):
    """Arguments, inputs or engine outputs that cannot be tiled as asked."""


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering [0, length) with tiles of `tile` px overlapping by >= `overlap`.

    The last tile is flush with the end, so it may overlap its neighbour by more than asked.
    """
    _check_tile(tile, overlap)
    if length < 1:
        raise TilingError(f"length {length} must be >= 1: there is nothing to tile")
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    starts.append(length - tile)
    return starts


def run_tiled(
    infer: InferFn,
    inputs: dict[str, tuple[np.ndarray, int]],
    *,
    scale: int = 1,
    tile: int | None = None,
    overlap: int = 0,
    multiple: int = 1,
    batch: int = 1,
) -> np.ndarray:
    """Run `infer` over `inputs` (name -> ((C, H*f, W*f) array, f)) and return (C_out, H*s, W*s).

    f is an input's resolution relative to the frame grid (1 for frames, `scale` for the
    engine's previous output); tiles of every input cover the same region of the specimen.
    """
    for name, value in (("scale", scale), ("multiple", multiple), ("batch", batch)):
        if value < 1:
            raise TilingError(f"{name}={value} must be >= 1")
    if tile is not None:
        _check_tile(tile, overlap)
        if tile % multiple:
            raise TilingError(
                f"tile {tile} is not a multiple of {multiple} (the engine's size granularity): "
                f"use tile={_round_up(tile, multiple)} or {tile - tile % multiple or multiple}"
            )
    arrays, height, width = _check_inputs(inputs)

    min_side = tile or 1
    padded_h = max(_round_up(height, multiple), min_side)
    padded_w = max(_round_up(width, multiple), min_side)
    padded = {
        name: (_pad(a, (padded_h - height) * f, (padded_w - width) * f), f)
        for name, (a, f) in arrays.items()
    }

    if tile is None or (padded_h <= tile and padded_w <= tile):
        batch_in = {name: a[None] for name, (a, _) in padded.items()}
        out = _call(infer, batch_in, 1, None, padded_h * scale, padded_w * scale)
        return np.ascontiguousarray(out[0, :, : height * scale, : width * scale], np.float32)

    rows = _regions(tile_starts(padded_h, tile, overlap), tile, height)
    cols = _regions(tile_starts(padded_w, tile, overlap), tile, width)
    jobs = [(r, c) for r in rows for c in cols]
    result: np.ndarray | None = None
    for first in range(0, len(jobs), batch):
        chunk = jobs[first : first + batch]
        batch_in = {
            name: np.stack(
                [a[:, r[0] * f : (r[0] + tile) * f, c[0] * f : (c[0] + tile) * f] for r, c in chunk]
            )
            for name, (a, f) in padded.items()
        }
        channels = None if result is None else result.shape[0]
        out = _call(infer, batch_in, len(chunk), channels, tile * scale, tile * scale)
        if result is None:
            result = np.empty((out.shape[1], height * scale, width * scale), np.float32)
        for k, ((ry, a0, a1), (cx, b0, b1)) in enumerate(chunk):
            result[:, a0 * scale : a1 * scale, b0 * scale : b1 * scale] = out[
                k, :, (a0 - ry) * scale : (a1 - ry) * scale, (b0 - cx) * scale : (b1 - cx) * scale
            ]
    assert result is not None  # jobs is never empty: the first tile's interior starts at 0
    return result


def _check_tile(tile: int, overlap: int) -> None:
    if not 0 <= overlap < tile:
        raise TilingError(
            f"tile {tile} and overlap {overlap}: need tile > overlap >= 0; "
            "lower the overlap or raise the tile size"
        )


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _check_inputs(
    inputs: dict[str, tuple[np.ndarray, int]],
) -> tuple[dict[str, tuple[np.ndarray, int]], int, int]:
    """Return the inputs as float32 (C, H*f, W*f) arrays plus the frame grid (H, W)."""
    if not inputs:
        raise TilingError("no inputs: pass at least {'frames': (array, 1)}")
    arrays: dict[str, tuple[np.ndarray, int]] = {}
    for name, (given, f) in inputs.items():
        a = np.asarray(given)
        if a.ndim != 3:
            raise TilingError(f"input {name!r} has shape {a.shape}: expected (C, H, W)")
        if not (isinstance(f, int | np.integer) and f >= 1):
            raise TilingError(f"input {name!r} has resolution factor {f!r}: expected an int >= 1")
        arrays[name] = (a.astype(np.float32, copy=False), int(f))
    ref_name, (ref, ref_f) = min(arrays.items(), key=lambda item: item[1][1])
    if ref.shape[1] % ref_f or ref.shape[2] % ref_f:
        raise TilingError(
            f"input {ref_name!r} has shape {ref.shape}, not divisible by its factor {ref_f}"
        )
    height, width = ref.shape[1] // ref_f, ref.shape[2] // ref_f
    for name, (a, f) in arrays.items():
        if a.shape[1:] != (height * f, width * f):
            shapes = {n: (arr.shape, fac) for n, (arr, fac) in arrays.items()}
            raise TilingError(
                f"input {name!r} has shape {a.shape} but the frame grid is {height}x{width} "
                f"(from {ref_name!r}), so factor {f} needs (C, {height * f}, {width * f}); "
                f"all inputs (shape, factor): {shapes}"
            )
    return arrays, height, width


def _pad(a: np.ndarray, pad_h: int, pad_w: int) -> np.ndarray:
    """Pad (C, H, W) at the bottom/right; reflect where the side allows it, else edge."""
    for axis, amount in ((1, pad_h), (2, pad_w)):
        if amount:
            widths = [(0, 0)] * 3
            widths[axis] = (0, amount)
            mode: Literal["reflect", "edge"] = "reflect" if amount <= a.shape[axis] - 1 else "edge"
            a = np.pad(a, widths, mode=mode)
    return a


def _regions(starts: list[int], tile: int, limit: int) -> list[tuple[int, int, int]]:
    """(start, keep_from, keep_to) per tile: the cut is mid-overlap; clipped to [0, limit)."""
    cuts = [(nxt + cur + tile) // 2 for cur, nxt in pairwise(starts)]
    lows = [0, *cuts]
    highs = [*cuts, limit]
    return [
        (s, lo, min(hi, limit)) for s, lo, hi in zip(starts, lows, highs, strict=True) if lo < limit
    ]


def _call(
    infer: InferFn,
    batch_in: dict[str, np.ndarray],
    n: int,
    channels: int | None,
    out_h: int,
    out_w: int,
) -> np.ndarray:
    """Call the engine and check its output is (n, C_out, out_h, out_w) with a stable C_out."""
    out = np.asarray(infer(batch_in))
    if out.ndim == 4 and channels is None:
        channels = out.shape[1]
    if out.shape != (n, channels, out_h, out_w):
        expected = f"({n}, {'C_out' if channels is None else channels}, {out_h}, {out_w})"
        raise TilingError(
            f"engine returned shape {out.shape}, expected {expected} for input tiles "
            f"{ {k: v.shape for k, v in batch_in.items()} }: check the engine's scale and "
            "that it keeps the batch size and channel count"
        )
    return out
