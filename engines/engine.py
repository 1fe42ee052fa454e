"""Run engine packages on frames: normalize, tile, infer, denormalize, and chain stages.

An :class:`Engine` is one package on one backend. An :class:`EngineChain` runs several in
order (tGAN's dual-resolution design: a temporal model at low resolution, then SR); only the
first stage may be temporal, each stage keeps its own previous output. No torch here.

An engine in electrons (``normalization.units``) gets the rig's ADU <-> electrons conversion
(``calibration.units``, from the server's calibration profile), or uses the camera its manifest
declares; an engine in ADU takes raw frames as they are. Either way a stage takes and returns
the rig's ADU.

A raw-io package (``manifest.io == "raw"``, made by ``engines.offline.raw_io``) does all of that
in its graph: the stage hands the raw frames, its previous written output and the rig's maps
(cached per frame shape) to the backend and takes the written frame back, so no per-pixel
arithmetic is left here. Only its bad pixels (few) are patched on a copy before the graph.
Tiles are cut and stitched in the frames' dtype: stitching takes each output pixel from one
tile (no blending), so integer tiles stitch exactly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from calibration.errors import ScopecastError
from calibration.units import Electrons

from .package import EnginePackage, Manifest, load_package
from .runtime import PlanRebuilder, open_backend
from .tiling import _pad, _regions, run_tiled, tile_starts


class EngineError(ScopecastError, RuntimeError):
    """An enhancement that could not be done; ``kind`` is the counter it is reported under."""

    kind: ClassVar[str] = "engine"


class EngineInputError(EngineError):
    """A frame this engine cannot take (shape, components)."""

    kind = "shape"


class NonFiniteInputError(EngineInputError):
    """An input frame (or the temporal state built from input frames) holds NaN or inf: the
    sender's data is at fault, not the engine."""

    kind = "input"


class EngineOutputError(EngineError):
    """An engine output that must not be shown or saved (NaN, inf)."""

    kind = "nonfinite"


@dataclass
class StageResult:
    """One chain stage's output, kept by the ring as that stage's previous output."""

    stage: int
    output: np.ndarray  # float32 (H, W) in raw units; a raw-io stage's: the written frame


@dataclass
class Enhanced:
    """The chain's result for one frame, with where the time went."""

    frame: np.ndarray
    stages: list[StageResult]
    timings_ms: dict[str, float] = field(default_factory=dict)


class Engine:
    """One engine package opened on one backend."""

    def __init__(
        self,
        package: EnginePackage,
        backend: str = "auto",
        threads: int | None = None,
        *,
        rebuild: PlanRebuilder | None = None,
        units: Electrons | None = None,
    ):
        """``rebuild`` rebuilds a TensorRT plan missing for this GPU (the commands pass
        ``engines.offline.build.rebuild_plan``; the live code never imports it). ``units`` is
        the rig's ADU <-> electrons conversion (from its calibration profile): an electrons
        engine uses it, else the camera its manifest declares; an ADU engine ignores it."""
        self.package = package
        self.manifest: Manifest = package.manifest
        self.units = _conversion(self.manifest, units)
        self.input_scale = 1
        """The grid of this stage's input, relative to the chain's input (set by the chain)."""
        self.chained = False
        """Whether this stage takes an earlier stage's output (set by the chain)."""
        self.backend, self.reason = open_backend(package, backend, threads, rebuild=rebuild)
        self._raw_cache: dict[Any, Any] = {}
        if self.manifest.io == "raw" and not hasattr(self.backend, "infer_outputs"):
            name = self.backend.name
            self.backend.close()
            raise EngineError(
                f"engine {self.name!r} is a raw-io package ({self.manifest.raw_dtype} frames), "
                f"which backend {name!r} cannot run: use --backend onnxruntime or openvino, or "
                "serve the float package it was made from"
            )

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def assumption(self) -> str:
        """The units this engine takes and where their conversion comes from, in one line."""
        norm = self.manifest.normalization
        raw = (
            f" (in the graph: io raw, {self.manifest.raw_dtype})"
            if self.manifest.io == "raw"
            else ""
        )
        if self.units is None:
            return f"adu: raw frames as (raw - {norm.offset:g}) / {norm.scale:g}{raw}"
        return f"electrons: {self.units.describe()}{raw}"

    def check(self, shape: tuple[int, ...]) -> None:
        """Raise EngineInputError if frames of ``shape`` cannot go through this engine."""
        if len(shape) != 2 or self.manifest.channels != 1:
            raise EngineInputError(
                f"engine {self.name!r} takes 2-D single-channel frames, got shape {shape}: "
                "send one channel per frame"
            )

    def run(
        self,
        frames: Sequence[np.ndarray],
        previous: np.ndarray | None,
        background: np.ndarray | None,
        timings: dict[str, float],
    ) -> np.ndarray:
        """Enhance the newest of ``frames`` (oldest first); return float32 in raw units (a
        raw-io engine: the written frame, in its dtype)."""
        m = self.manifest
        if m.io == "raw":
            return self._run_raw(frames, previous, background, timings)
        t0 = time.perf_counter()
        norm = m.normalization
        window = list(frames[-m.temporal.window :])
        window = [window[0]] * (m.temporal.window - len(window)) + window  # later chain stages
        stack = np.empty((len(window), *window[-1].shape), np.float32)
        for i, f in enumerate(window):
            stack[i] = f  # one pass: copy and convert to float32
        floats = any(f.dtype.kind not in "biu" for f in window)  # integers hold no NaN/inf
        if floats:
            _check_finite_input(self.name, stack[-1], "the input frame")
            _check_finite_input(self.name, stack[:-1], "an earlier frame of the temporal window")
        stack = self._model_units(stack, 1)
        inputs: dict[str, tuple[np.ndarray, int]] = {"frames": (stack, 1)}
        if m.temporal.previous_output:
            # first frame of a key: the current frame as the model sees it, upsampled (as in
            # training; it is in model units already, so it is not converted again)
            if previous is None:
                model_prev = np.repeat(np.repeat(stack[-1:], m.scale, 1), m.scale, 2)
            else:  # finite: outputs are checked before a ring keeps them
                model_prev = self._model_units(previous[None].astype(np.float32), m.scale)
            inputs["previous"] = (model_prev, m.scale)
        if m.temporal.background:
            if background is None:
                model_bg = stack[-1:].copy()
            else:
                bg = background[None].astype(np.float32)
                if floats:
                    _check_finite_input(self.name, bg, "the background (from earlier inputs)")
                model_bg = self._model_units(bg, 1)
            inputs["background"] = (model_bg, 1)
        spent = [0.0]

        def infer(batch: dict[str, np.ndarray]) -> np.ndarray:
            t = time.perf_counter()
            y = self.backend.infer(batch)
            spent[0] += time.perf_counter() - t
            return y

        t1 = time.perf_counter()
        tile = m.tile
        y = run_tiled(
            infer,
            inputs,
            scale=m.scale,
            tile=tile.size,
            overlap=tile.overlap,
            multiple=tile.multiple,
            batch=tile.batch,
        )
        t2 = time.perf_counter()
        out = y[0]
        if norm.scale != 1:
            out *= np.float32(norm.scale)
        if norm.offset:
            out += np.float32(norm.offset)
        if self.units is not None:
            out = self.units.to_adu(out, scale=self.input_scale * m.scale)
        if bad := _nonfinite(out):
            raise EngineOutputError(
                f"engine {self.name!r} produced {bad} NaN/inf values: output discarded "
                "(check the package's normalization, or rebuild it in fp32)"
            )
        _add_stage_times(timings, t0, t1, t2, spent[0])
        return out

    # -- raw-io packages: the graph converts; here the inputs are only gathered --------------

    def _run_raw(
        self,
        frames: Sequence[np.ndarray],
        previous: np.ndarray | None,
        background: np.ndarray | None,
        timings: dict[str, float],
    ) -> np.ndarray:
        """``run`` for a raw-io package: raw frames in, the written frame out."""
        m = self.manifest
        t0 = time.perf_counter()
        types = m.io_dtypes
        window = list(frames[-m.temporal.window :])
        window = [window[0]] * (m.temporal.window - len(window)) + window
        window = [self._raw_input(f, np.dtype(types["frames"]), "frame") for f in window]
        grid = self.input_scale
        if self._bad(grid) is not None:
            window = [self._patch(f, grid) for f in window]
        stack = window[0][None] if len(window) == 1 else np.stack(window)
        inputs: dict[str, tuple[np.ndarray, int]] = {"frames": (stack, 1)}
        if m.temporal.previous_output:
            if previous is None:  # first frame of a key: the current frame, upsampled
                previous = np.repeat(np.repeat(window[-1], m.scale, 0), m.scale, 1)
            previous = self._raw_input(previous, np.dtype(types["previous"]), "previous output")
            if self._bad(grid * m.scale) is not None:
                previous = self._patch(previous, grid * m.scale)
            inputs["previous"] = (previous[None], m.scale)
        if m.temporal.background:
            bg = window[-1] if background is None else background
            bg = np.asarray(bg, np.float32)
            if background is not None and self._bad(grid) is not None:
                bg = self._patch(bg, grid)
            inputs["background"] = (bg[None], 1)
        consts = self._maps(stack.shape[-2:])
        spent = [0.0]
        t1 = time.perf_counter()
        out, checksums = self._tiled_raw(inputs, consts, spent)
        t2 = time.perf_counter()
        total = float(np.sum(checksums, dtype=np.float64))
        if not np.isfinite(total):
            raise EngineOutputError(
                f"engine {self.name!r} produced NaN/inf values (its checksum is {total}): output "
                "discarded (check the package's normalization, or rebuild it in fp32)"
            )
        _add_stage_times(timings, t0, t1, t2, spent[0])
        return out

    def _raw_input(self, x: np.ndarray, dtype: np.dtype[Any], what: str) -> np.ndarray:
        """``x`` in the dtype the raw graph takes: as it is, or (a float stage's output earlier
        in the chain, a previous output from before a swap) rounded and clipped to it."""
        if x.dtype == dtype:
            return x
        if x.dtype.kind == "f" and (self.chained or what != "frame"):
            if bad := _nonfinite(x):
                raise NonFiniteInputError(
                    f"the {what} holds {bad} NaN/inf values: not enhanced by {self.name!r}"
                )
            return to_dtype(x, dtype, "input") if dtype.kind in "iu" else x.astype(dtype)
        raise EngineInputError(
            f"engine {self.name!r} is a raw-io package taking {dtype} frames, got a {x.dtype} "
            f"{what}: send {dtype} frames, serve the float package it was made from, or make a "
            f"{x.dtype} one with `scopecast engines raw-io SOURCE --dtype {x.dtype}`"
        )

    def _maps(self, shape: tuple[int, ...]) -> dict[str, tuple[np.ndarray, int]]:
        """The rig's conversion as graph inputs for frames of ``shape`` (cached): (1, H, W)
        maps, or (1, 1, 1) scalars the graph broadcasts."""
        if self.units is None:
            return {}
        key = ("maps", tuple(shape))
        if (got := self._raw_cache.get(key)) is not None:
            return dict(got)
        u, m, grid = self.units, self.manifest, self.input_scale
        own = u.shape
        if own is not None and tuple(shape) != (own[0] * grid, own[1] * grid):
            raise EngineInputError(
                f"engine {self.name!r}: frame of shape {tuple(shape)} does not fit the calibration "
                f"maps {own} (x{grid}): calibrate the camera at this ROI and binning, or serve "
                "without --profile"
            )
        maps = {}
        for suffix, f in [("", 1), *([("_out", m.scale)] if m.scale > 1 else [])]:
            offset, gain = _conversion_maps(u, grid * f)
            maps[f"offset_map{suffix}"] = (offset, f)
            maps[f"gain_map{suffix}"] = (gain, f)
        self._raw_cache.clear()  # one frame shape at a time: a new one replaces the old
        self._raw_cache[key] = maps
        return dict(maps)

    def _bad(self, grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Bad-pixel neighbourhoods (as ``calibration.units`` replaces them: recorded grid only)."""
        u = self.units
        if u is None or u.bad_pixels is None or grid != 1:
            return None
        if (got := self._raw_cache.get("bad")) is None:
            got = self._raw_cache["bad"] = _neighbourhoods(u.bad_pixels)
        return got

    def _patch(self, x: np.ndarray, grid: int) -> np.ndarray:
        """A copy of ``x`` (raw units) whose bad pixels hold the median of their good
        neighbours, taken in electrons as ``calibration.units`` does (rounded for integers)."""
        bad = self._bad(grid)
        assert bad is not None and self.units is not None
        where, neighbours, ok = bad
        offset, gain = _conversion_maps(self.units, grid)
        off, per_e = offset.reshape(-1), gain.reshape(-1)

        def electrons(idx: np.ndarray) -> np.ndarray:
            o = off[idx] if off.size > 1 else off[0]
            g = per_e[idx] if per_e.size > 1 else per_e[0]
            return (plane[idx].astype(np.float32) - o) / g

        out = x.copy()
        plane = x.reshape(-1)
        values = np.where(ok, electrons(neighbours), np.nan)
        none = ~ok.any(axis=1)
        if none.any():  # no good neighbour: the frame's median, as calibration.units does
            values[none, 0] = np.median(electrons(np.arange(plane.size)))
        med = np.nanmedian(values, axis=1).astype(np.float32)
        o = off[where] if off.size > 1 else off[0]
        g = per_e[where] if per_e.size > 1 else per_e[0]
        adu = med * g + o
        if out.dtype.kind in "iu":
            info = np.iinfo(out.dtype)
            adu = np.clip(np.rint(adu), info.min, info.max)
        out.reshape(-1)[where] = adu
        return out

    def _tiled_raw(
        self,
        inputs: dict[str, tuple[np.ndarray, int]],
        consts: dict[str, tuple[np.ndarray, int]],
        spent: list[float],
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """``tiling.run_tiled`` in the inputs' own dtypes (the same tiles, cuts and padding):
        the written frame (H*s, W*s) and each call's checksum. ``consts`` (the maps) are
        padded and cut once per frame shape, within :data:`MAP_CACHE_BYTES`."""
        m, t = self.manifest, self.manifest.tile
        s = m.scale
        height, width = inputs["frames"][0].shape[1:]
        ph = max(-(-height // t.multiple) * t.multiple, t.size or 1)
        pw = max(-(-width // t.multiple) * t.multiple, t.size or 1)
        cache = self._raw_cache

        def pad(name: str, a: np.ndarray, f: int) -> np.ndarray:
            if _broadcast(name, a, consts) or (ph, pw) == (height, width):
                return a
            if name not in consts:
                return _pad(a, (ph - height) * f, (pw - width) * f)
            key = ("pad", name, height, width)
            if (got := cache.get(key)) is None:
                got = cache[key] = _pad(a, (ph - height) * f, (pw - width) * f)
            return got

        padded = {n: (pad(n, a, f), f) for n, (a, f) in {**inputs, **consts}.items()}

        def infer(batch: dict[str, np.ndarray]) -> list[np.ndarray]:
            t_start = time.perf_counter()
            got = self.backend.infer_outputs(batch)  # type: ignore[attr-defined]
            spent[0] += time.perf_counter() - t_start
            return list(got)

        if t.size is None or (ph <= t.size and pw <= t.size):
            out, *sums = infer({n: a[None] for n, (a, _) in padded.items()})
            _check_out(self.name, out, (1, 1, ph * s, pw * s))
            y = out[0, 0, : height * s, : width * s]
            return np.ascontiguousarray(y), sums
        tile = t.size
        rows = _regions(tile_starts(ph, tile, t.overlap), tile, height)
        cols = _regions(tile_starts(pw, tile, t.overlap), tile, width)
        jobs = [(r, c) for r in rows for c in cols]
        result: np.ndarray | None = None
        checksums: list[np.ndarray] = []
        for first in range(0, len(jobs), t.batch):
            chunk = jobs[first : first + t.batch]
            batch = {}
            for name, (a, f) in padded.items():
                if _broadcast(name, a, consts):
                    batch[name] = a[None]
                    continue
                key = ("tiles", name, height, width, first)
                if name in consts and (got := cache.get(key)) is not None:
                    batch[name] = got
                    continue
                cut = np.stack([a[:, r[0] * f : (r[0] + tile) * f, c[0] * f : (c[0] + tile) * f]
                                for r, c in chunk])  # fmt: skip
                if name in consts and _cached_bytes(cache) + cut.nbytes <= MAP_CACHE_BYTES:
                    cache[key] = cut
                batch[name] = cut
            out, *sums = infer(batch)
            checksums += sums
            _check_out(self.name, out, (len(chunk), 1, tile * s, tile * s))
            if result is None:
                result = np.empty((height * s, width * s), out.dtype)
            for k, ((ry, a0, a1), (cx, b0, b1)) in enumerate(chunk):
                result[a0 * s : a1 * s, b0 * s : b1 * s] = out[
                    k, 0, (a0 - ry) * s : (a1 - ry) * s, (b0 - cx) * s : (b1 - cx) * s
                ]
        assert result is not None
        return result, checksums

    def _model_units(self, x: np.ndarray, scale: int) -> np.ndarray:
        """``x`` (float32, this stage's input units, on a grid ``scale`` times the input's) in
        model units: to electrons for an electrons engine, then normalized. May reuse ``x``."""
        if self.units is not None:
            try:
                x = self.units.to_electrons(x, scale=self.input_scale * scale)
            except ValueError as e:
                raise EngineInputError(f"engine {self.name!r}: {e}") from None
        return _normalize(x, self.manifest.normalization)

    def close(self) -> None:
        self.backend.close()


MAP_CACHE_BYTES = 64 << 20
"""Most bytes of padded and tiled calibration maps a raw-io engine keeps (one frame shape)."""


def _cached_bytes(cache: dict[Any, Any]) -> int:
    return sum(
        v.nbytes for k, v in cache.items() if isinstance(k, tuple) and k[0] in ("pad", "tiles")
    )


def _broadcast(name: str, a: np.ndarray, consts: dict[str, Any]) -> bool:
    """Whether input ``name`` is a scalar map the graph broadcasts (never cut into tiles)."""
    return name in consts and a.shape[1:] == (1, 1)


def _conversion_maps(units: Electrons, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """The offset (ADU) and ADU-per-electron maps of ``units`` on a grid ``grid`` times finer,
    as (1, H, W) float32, or (1, 1, 1) where the conversion is scalar (the graph broadcasts)."""

    def up(a: np.ndarray) -> np.ndarray:
        return a if grid == 1 else np.repeat(np.repeat(a, grid, 0), grid, 1)

    gain = np.float32(units.gain_adu_per_electron)
    if units.offset_map is None:
        offset = np.full((1, 1, 1), units.offset_adu, np.float32)
    else:
        offset = np.ascontiguousarray(up(units.offset_map)[None], np.float32)
    if units.flat_field is None:
        per_e = np.full((1, 1, 1), gain, np.float32)
    else:
        per_e = np.ascontiguousarray((up(units.flat_field) * gain)[None], np.float32)
    return offset, per_e


def _neighbourhoods(bad: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every bad pixel: its flat index, its 8 neighbours' flat indices, which are usable."""
    h, w = bad.shape
    ys, xs = np.nonzero(bad)
    dy = np.array([-1, -1, -1, 0, 0, 1, 1, 1])
    dx = np.array([-1, 0, 1, -1, 1, -1, 0, 1])
    ny, nx = ys[:, None] + dy, xs[:, None] + dx
    inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
    ny, nx = np.clip(ny, 0, h - 1), np.clip(nx, 0, w - 1)
    return ys * w + xs, ny * w + nx, inside & ~bad[ny, nx]


def _check_out(engine: str, out: np.ndarray, want: tuple[int, ...]) -> None:
    """A raw-io engine's output must have the shape its inputs imply (-1: any)."""
    if out.ndim != len(want) or any(w not in (-1, g) for w, g in zip(want, out.shape, strict=True)):
        raise EngineError(
            f"engine {engine!r} returned shape {out.shape}, expected {want}: check the "
            "package's scale and that its model keeps the batch size and one channel"
        )


def _conversion(manifest: Manifest, units: Electrons | None) -> Electrons | None:
    """The conversion an engine uses: none for ADU engines, the rig's, else the manifest's."""
    norm = manifest.normalization
    if norm.units == "adu":
        return None
    if units is not None:
        return units
    if norm.camera is None:  # refused by the manifest's validation
        raise ValueError(f"electrons engine {manifest.name!r} declares no camera")
    return Electrons.from_camera(
        norm.camera.offset_adu,
        norm.camera.gain_adu_per_electron,
        source=f"no profile, assuming {manifest.name}'s manifest camera",
    )


class EngineChain:
    """Engines run one after another; the first may be temporal, the rest image-to-image."""

    def __init__(self, engines: Sequence[Engine]):
        if not engines:
            raise ValueError("an engine chain needs at least one engine")
        for e in engines[1:]:
            t = e.manifest.temporal
            if t.window > 1 or t.background:
                raise ValueError(
                    f"engine {e.name!r} is temporal (window {t.window}, background "
                    f"{t.background}); only the first engine of a chain may be: put it first"
                )
        self.engines = list(engines)
        grid = 1
        for i, e in enumerate(self.engines):
            e.input_scale = grid
            e.chained = i > 0
            grid *= e.manifest.scale

    @classmethod
    def open(
        cls,
        names: Sequence[str | Path],
        backend: str = "auto",
        threads: int | None = None,
        *,
        rebuild: PlanRebuilder | None = None,
        units: Electrons | None = None,
    ) -> EngineChain:
        """Load and verify each package, open it on ``backend`` (``rebuild``, ``units``: see
        Engine)."""
        return cls(
            [Engine(load_package(n), backend, threads, rebuild=rebuild, units=units) for n in names]
        )

    @property
    def name(self) -> str:
        return "+".join(e.name for e in self.engines)

    @property
    def scale(self) -> int:
        return int(np.prod([e.manifest.scale for e in self.engines]))

    @property
    def window(self) -> int:
        return self.engines[0].manifest.temporal.window

    @property
    def background(self) -> bool:
        return self.engines[0].manifest.temporal.background

    @property
    def output_dtype(self) -> str:
        return self.engines[-1].manifest.output_dtype

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "scale": self.scale,
            "window": self.window,
            "backend": [e.backend.describe() for e in self.engines],
            "reason": [e.reason for e in self.engines],
            "units": [e.assumption for e in self.engines],
        }

    def check(self, shape: tuple[int, ...]) -> None:
        self.engines[0].check(shape)

    def enhance(
        self,
        frames: Sequence[np.ndarray],
        previous: dict[int, np.ndarray],
        background: np.ndarray | None,
    ) -> Enhanced:
        """Run every stage on the newest frame of ``frames``; the result has the raw dtype
        (rounded, clipped) unless the last engine asks for float32."""
        timings: dict[str, float] = {}
        stages: list[StageResult] = []
        current: Sequence[np.ndarray] = frames
        for i, engine in enumerate(self.engines):
            y = engine.run(current, previous.get(i), background if i == 0 else None, timings)
            stages.append(StageResult(i, y))
            current = [y]
        t = time.perf_counter()
        out = to_dtype(stages[-1].output, frames[-1].dtype, self.output_dtype)
        _add(timings, "postprocess", time.perf_counter() - t)
        return Enhanced(out, stages, {k: v * 1e3 for k, v in timings.items()})

    def close(self) -> None:
        for e in self.engines:
            e.close()


def _add_stage_times(timings: dict[str, float], t0: float, t1: float, t2: float,
                     inference_s: float) -> None:  # fmt: skip
    """A stage's timings: gathering inputs (``t0``..``t1``) and the tiling around the backend's
    calls (``t1``..``t2`` less ``inference_s``) as preprocess, then postprocess until now."""
    _add(timings, "preprocess", (t1 - t0) + (t2 - t1 - inference_s))
    _add(timings, "inference", inference_s)
    _add(timings, "postprocess", time.perf_counter() - t2)


def _nonfinite(x: np.ndarray) -> int:
    """How many NaN/inf values ``x`` holds; one pass when none (they survive a sum)."""
    if np.isfinite(x.sum(dtype=np.float64)):
        return 0
    return int(np.size(x) - np.count_nonzero(np.isfinite(x)))


def _check_finite_input(engine: str, x: np.ndarray, what: str) -> None:
    """Raise NonFiniteInputError when ``x`` holds NaN or inf."""
    if not (bad := _nonfinite(x)):
        return
    raise NonFiniteInputError(
        f"{what} holds {bad} NaN/inf values: not enhanced by {engine!r} (the input is at fault, "
        "not the engine); send finite pixels"
    )


def _normalize(x: np.ndarray, norm: Any) -> np.ndarray:
    if norm.offset:
        x -= np.float32(norm.offset)
    if norm.scale != 1:
        x *= np.float32(1.0 / norm.scale)
    return x


def to_dtype(y: np.ndarray, raw_dtype: np.dtype, output_dtype: str) -> np.ndarray:
    """An engine output (float32, raw units) as delivered: float32 when ``output_dtype`` is
    "float32" or the raw frames are floats, else rounded and clipped to ``raw_dtype``'s range.
    ``y`` is not changed."""
    if output_dtype == "float32" or raw_dtype.kind == "f":
        return np.ascontiguousarray(y, dtype=np.float32)
    if y.dtype == raw_dtype:  # a raw-io engine's output: rounded and clipped by its graph
        return np.ascontiguousarray(y)
    info = np.iinfo(raw_dtype)
    r = np.rint(y)  # a new array: y stays the stage's previous output
    return np.clip(r, info.min, info.max, out=r).astype(raw_dtype)


def _add(timings: dict[str, float], stage: str, seconds: float) -> None:
    timings[stage] = timings.get(stage, 0.0) + seconds
