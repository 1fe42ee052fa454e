"""Run engine packages on frames: normalize, tile, infer, denormalize, and chain stages.

An :class:`Engine` is one package on one backend. An :class:`EngineChain` runs several in
order (tGAN's dual-resolution design: a temporal model at low resolution, then SR); only the
first stage may be temporal, each stage keeps its own previous output. No torch here.

An engine in electrons (``normalization.units``) gets the rig's ADU <-> electrons conversion
(``calibration.units``, from the server's calibration profile), or uses the camera its manifest
declares; an engine in ADU takes raw frames as they are. Either way a stage takes and returns
the rig's ADU.
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
from .tiling import run_tiled


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
    output: np.ndarray  # float32 (H, W) in raw units


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
        self.backend, self.reason = open_backend(package, backend, threads, rebuild=rebuild)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def assumption(self) -> str:
        """The units this engine takes and where their conversion comes from, in one line."""
        norm = self.manifest.normalization
        if self.units is None:
            return f"adu: raw frames as (raw - {norm.offset:g}) / {norm.scale:g}"
        return f"electrons: {self.units.describe()}"

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
        """Enhance the newest of ``frames`` (oldest first); return float32 in raw units."""
        m = self.manifest
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
            if previous is None:  # first frame of a key: the current frame, upsampled
                previous = np.repeat(np.repeat(stack[-1], m.scale, 0), m.scale, 1)
            # finite: outputs are checked before a ring keeps them, the first one is the frame
            prev = previous[None].astype(np.float32)
            inputs["previous"] = (self._model_units(prev, m.scale), m.scale)
        if m.temporal.background:
            if background is None:
                background = stack[-1]
            background = background[None].astype(np.float32)
            if floats:
                _check_finite_input(self.name, background, "the background (from earlier inputs)")
            inputs["background"] = (self._model_units(background, 1), 1)
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
        t3 = time.perf_counter()
        _add(timings, "preprocess", (t1 - t0) + (t2 - t1 - spent[0]))
        _add(timings, "inference", spent[0])
        _add(timings, "postprocess", t3 - t2)
        return out

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
        for e in self.engines:
            e.input_scale = grid
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
    info = np.iinfo(raw_dtype)
    r = np.rint(y)  # a new array: y stays the stage's previous output
    return np.clip(r, info.min, info.max, out=r).astype(raw_dtype)


def _add(timings: dict[str, float], stage: str, seconds: float) -> None:
    timings[stage] = timings.get(stage, 0.0) + seconds
