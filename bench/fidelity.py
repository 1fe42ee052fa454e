"""``scopecast bench fidelity``: what the live fidelity check sees, how often it cries wolf, and
what it costs.

Objects are planted into an enhanced frame (a perfect one, or any engine's output) of a scene,
and the raw frame is checked against it exactly as ``serve --profile`` checks it
(:func:`calibration.fidelity.fidelity`, the scan at the server's scales):

- ``invented``: a Gaussian blob the raw data do not hold, added to the output;
- ``removed``: a blob that is in the raw data (the raw frame is recorded with it) but taken out
  of the output;
- ``patch``: a patch of the scene's own structure (a nucleus, a cluster of puncta) copied onto
  another place of the output;
- ``shifted``: the output's structure inside a disc displaced by a few pixels (registration
  errors, a temporal engine's lag).

Each object's strength is its matched-filter SNR in the raw data, ``sqrt(sum(d**2 / var))``
over the raw grid, ``d`` the difference it makes to the raw frame's expectation and ``var``
the noise model's variance there under the output being checked (the check tests the raw frame
against that output's prediction; at a few photons per pixel an invented object raises the
variance it is tested with): the best any detector could do knowing the object's shape and
place. No detector searching a whole frame reaches that: at a per-frame false-alarm rate it
must pass a threshold ``u`` (about 4.4 at 64x64, 5.3 at 512x512 for 5%), so detection is
about 50% at SNR ``u`` and 95% at ``u + 1.65``. Blobs and patches are scaled to the asked
SNRs; a shift has the SNR the structure gives it (binned in the table). An object counts as
detected when a flagged region of the right sign (``invented``/``patch``: -1, the output shows
more than the data; ``removed``: +1; ``shifted``: either) lies within ``max(2 scale,
radius + 2)`` raw px of it.

The scan runs once per frame at the most permissive false-alarm rate asked; a region's peak
significance then tells whether it is past each stricter threshold, so every operating point
(the ROC) comes from the same frames. Honest frames (nothing planted) give the measured
per-frame false-alarm rate and the chi-square of a perfect output, with and without a camera
column pattern. Scenes: simulated specimens (:data:`calibration.sim.SPECIMEN_KINDS`) and the
real clean images of ``bench real-pairs`` (stardist, BBBC007), blurred by the preset's PSF and
recorded by its camera.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.optimize import brentq

from calibration.camera import CameraParams, photons_from_adu, record, variance_at_mean
from calibration.fidelity import (
    FALSE_ALARM,
    MAP_BIN,
    CheckSchedule,
    Scan,
    default_sigmas,
    fidelity,
    noise_ratio,
    predicted_raw,
    scan_threshold,
)
from calibration.optics import psf_sigma_um
from calibration.scan import ScanParams
from calibration.sim.pairs import bin_mean
from calibration.sim.presets import get_preset
from calibration.sim.scene import Preset
from calibration.sim.scene import Scene as SimScene
from calibration.sim.specimen import SPECIMEN_KINDS, View
from calibration.units import Electrons
from engines.engine import EngineChain

from .quality import _open, _run_chain

Progress = Callable[[str], None]
Output = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``output(raw, truth)``: a source's enhanced frame of a raw frame recorded from ``truth``."""

KINDS = ("invented", "removed", "patch", "shifted")
SIGN = {"invented": -1, "removed": 1, "patch": -1, "shifted": 0}
"""The region sign that detects each kind (0: either)."""
SNRS = (3.0, 4.0, 5.0, 6.0, 8.0)
RADII = (1.0, 2.0, 4.0, 8.0)
"""Object radii (the blob's Gaussian sigma, a patch's or a shift's disc) in PSF sigmas."""
FALSE_ALARMS = (0.01, 0.02, 0.05, 0.1, 0.2)
OPERATING_POINT = FALSE_ALARM
"""The server's per-frame false-alarm rate (nominal)."""
SHIFT_PX = 3.0
"""How far (raw px) a ``shifted`` object's structure moves."""
PEAK_PHOTONS = 20.0
"""Expected photons at a scene's brightest raw pixel (the confocal preset's order)."""
COST_SIDES = (512, 2048)
SPECIMENS = ("nuclei", "puncta", "filaments-and-nuclei")
WARMUP = 9
"""Frames an engine runs on before the checked one (a temporal engine's background ring)."""


@dataclass(frozen=True)
class Scene:
    """A truth for the check: ``expected`` is the perfect enhanced frame (``scale`` x the raw
    grid, raw-equivalent ADU: its ``scale x scale`` block means are the raw frame's expected
    ADU); the raw frames are recorded from it by ``camera`` with ``offset_map`` (raw grid,
    None: the scalar offset) as their fixed pattern, through ``scan`` (a bidirectional scan's
    line phase; the output, like a learned engine's trained on slow-scan targets, has none)."""

    name: str
    expected: np.ndarray
    scale: int
    camera: CameraParams
    psf_sigma_px: float
    offset_map: np.ndarray | None = None
    scan: ScanParams | None = None

    @property
    def units(self) -> Electrons:
        """The scene's camera as ``serve --profile`` converts it (offset map included)."""
        return Electrons(self.camera.offset_adu, self.camera.gain_adu_per_electron,
                         offset_map=self.offset_map, source=self.name)  # fmt: skip

    @property
    def raw_shape(self) -> tuple[int, int]:
        return (self.expected.shape[0] // self.scale, self.expected.shape[1] // self.scale)

    def record(self, fine: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A raw frame (uint16) whose expectation is ``fine`` binned to the raw grid."""
        mean = self.raw_mean(fine)
        photons = np.maximum(photons_from_adu(mean, self.camera), 0)
        return record(photons, self.camera, rng, offset_map=self.offset_map)

    def raw_mean(self, fine: np.ndarray) -> np.ndarray:
        """The raw frame's expectation (ADU) of an output (or what a change of the output
        changes of it): binned, the line phase added."""
        return predicted_raw(fine, self.scale, self.scan)


def _photons_to_expected(image: np.ndarray, camera: CameraParams, scale: int,
                         psf_px: float, peak: float) -> np.ndarray:  # fmt: skip
    """A clean image (any units, on the fine grid) as the perfect output: its 0.5-99.5
    percentiles mapped to 0..``peak`` photons per raw pixel, blurred by the PSF (``psf_px``
    raw px), in raw-equivalent ADU."""
    x = np.asarray(image, np.float32)
    lo, hi = np.percentile(x, (0.5, 99.5))
    x = np.clip((x - lo) / max(float(hi - lo), 1e-6), 0, None) * np.float32(peak)
    x = ndimage.gaussian_filter(x, psf_px * scale)
    adu = np.float32(camera.gain_adu_per_electron * camera.quantum_efficiency) * x
    return (adu + np.float32(camera.offset_adu)).astype(np.float32)


def _psf_px(preset: Preset) -> float:
    """The PSF's Gaussian sigma (raw px) of the preset's first channel's fast scan."""
    fast = SimScene(preset, 0).forward_model(next(iter(preset.channels)))
    return psf_sigma_um(fast.optics) / preset.pixel_size_um


def simulated_scenes(preset_name: str, kinds: Sequence[str], side: int, scale: int,
                     seed: int = 0, peak: float = PEAK_PHOTONS) -> list[Scene]:  # fmt: skip
    """One scene per specimen kind, rendered at ``scale`` x the preset's pixel density."""
    preset = get_preset(preset_name)
    unknown = [k for k in kinds if k not in SPECIMEN_KINDS]
    if unknown:
        raise ValueError(f"unknown specimen(s) {unknown}: choose from {', '.join(SPECIMEN_KINDS)}")
    psf_px = _psf_px(preset)
    scenes = []
    for i, kind in enumerate(kinds):
        specimen = SPECIMEN_KINDS[kind].factory(seed + i)
        rng = np.random.default_rng(seed + i)
        for _ in range(50):  # a field with structure: between 5% and 70% of it bright
            xy = (float(rng.uniform(-500, 500)), float(rng.uniform(-500, 500)))
            image = specimen.render(0.0, View((side * scale,) * 2, preset.pixel_size_um / scale,
                                              xy))  # fmt: skip
            hi = float(image.max())
            if hi > 0 and 0.05 < float(np.mean(image > 0.2 * hi)) < 0.7:
                break
        expected = _photons_to_expected(image, preset.camera, scale, psf_px, peak)
        scenes.append(Scene(f"sim-{kind}", expected, scale, preset.camera, psf_px,
                            scan=preset.scan))  # fmt: skip
    return scenes


def real_scenes(images: dict[str, np.ndarray], preset_name: str, side: int, scale: int,
                peak: float = PEAK_PHOTONS) -> list[Scene]:  # fmt: skip
    """The central ``side * scale`` square of each real clean image (its pixels taken as the
    fine grid), blurred by the preset's PSF and recorded by its camera."""
    preset = get_preset(preset_name)
    psf_px = _psf_px(preset)
    n = side * scale
    scenes = []
    for name, image in images.items():
        img = np.asarray(image, np.float32)
        if img.ndim == 3:
            img = img.mean(axis=-1) if img.shape[-1] in (3, 4) else img[0]
        if min(img.shape) < n:
            continue
        y, x = ((s - n) // 2 for s in img.shape)
        expected = _photons_to_expected(img[y : y + n, x : x + n], preset.camera, scale,
                                        psf_px, peak)  # fmt: skip
        scenes.append(Scene(name, expected, scale, preset.camera, psf_px, scan=preset.scan))
    return scenes


def with_column_pattern(scene: Scene, sd_adu: float, seed: int = 7) -> Scene:
    """The same scene recorded by a camera with fixed per-column offsets (sd ``sd_adu``)."""
    rng = np.random.default_rng(seed)
    rows, cols = scene.raw_shape
    columns = rng.normal(0.0, sd_adu, cols).astype(np.float32)
    offset = np.float32(scene.camera.offset_adu) + np.broadcast_to(columns, (rows, cols))
    return Scene(f"{scene.name}+columns{sd_adu:g}", scene.expected, scene.scale, scene.camera,
                 scene.psf_sigma_px, np.maximum(offset, 0).astype(np.float32),
                 scene.scan)  # fmt: skip


# -- planting -----------------------------------------------------------------------------------


def _gaussian(shape: tuple[int, int], y: float, x: float, sigma: float) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma * sigma)).astype(np.float32)


def _snr(scene: Scene, fine_difference: np.ndarray, checked: np.ndarray) -> float:
    """The matched-filter SNR of a change of the output in the raw data, against the noise
    the check assumes: the variance at the ``checked`` output's prediction."""
    d = scene.raw_mean(fine_difference)
    var = variance_at_mean(bin_mean(checked, scene.scale), scene.camera)
    return float(np.sqrt(np.sum(d * d / var)))


def _scaled(scene: Scene, d: np.ndarray, snr: float, base: np.ndarray, added: bool) -> np.ndarray:
    """``d`` scaled to ``snr`` (:func:`_snr`), the output checked being ``base + d`` when the
    change is ``added`` to it: its variance then grows with the scale ``a``, but ``a`` times
    the SNR of ``d`` still grows with ``a``, so a root finder gets it."""
    if snr <= 0:
        return d * np.float32(0)

    def excess(a: float) -> float:
        return a * _snr(scene, d, base + np.float32(a) * d if added else base) - snr

    a = snr / max(_snr(scene, d, base), 1e-12)  # the answer when the variance does not grow
    if not added:
        return d * np.float32(a)
    hi = a
    while excess(hi) < 0:
        hi *= 2
    return d * np.float32(brentq(excess, 0.0, hi, rtol=1e-6))


def _on_structure(scene: Scene, margin: float, rng: np.random.Generator) -> tuple[float, float]:
    """A raw position at least ``margin`` from the edge among the brightest tenth of the
    scene's pixels there (anywhere, if the scene is flat)."""
    rows, cols = scene.raw_shape
    m = math.ceil(margin)
    level = bin_mean(scene.expected, scene.scale)[m : rows - m, m : cols - m]
    ys, xs = np.nonzero(level >= np.percentile(level, 90))
    i = int(rng.integers(len(ys)))
    return float(ys[i] + m), float(xs[i] + m)


@dataclass(frozen=True)
class Plant:
    """One planted object: where (raw px), how big (raw px), its kind and its raw SNR; the
    output to check and the expectation the raw frame is recorded from (fine grid)."""

    kind: str
    y: float
    x: float
    radius_px: float
    snr: float
    output: np.ndarray
    recorded: np.ndarray


def plant(scene: Scene, kind: str, radius_px: float, snr: float | None, base: np.ndarray,
          rng: np.random.Generator) -> Plant | None:  # fmt: skip
    """Plant one object of ``kind`` into ``base`` (the output that would be honest) at least
    ``3 radius + 4`` raw px from the edge, at a random place (blobs) or on the scene's
    structure (patches, shifts); blobs and patches scaled to ``snr``. None when the frame is
    too small for the object or there is nothing to copy."""
    s = scene.scale
    rows, cols = scene.raw_shape
    margin = 3 * radius_px + 4
    if min(rows, cols) <= 2 * margin:
        return None
    if kind in ("patch", "shifted"):
        y, x = _on_structure(scene, margin, rng)
    else:
        y, x = (float(rng.uniform(margin, n - margin)) for n in (rows, cols))
    fy, fx = (v * s + (s - 1) / 2 for v in (y, x))  # on the fine grid
    shape = scene.expected.shape
    window = _gaussian(shape, fy, fx, radius_px * s)  # the blob, or a soft disc of its size
    if kind == "invented":
        blob = _scaled(scene, window, float(snr or 0), base, added=True)
        return Plant(kind, y, x, radius_px, float(snr or 0), base + blob, scene.expected)
    if kind == "removed":
        blob = _scaled(scene, window, float(snr or 0), base, added=False)
        return Plant(kind, y, x, radius_px, float(snr or 0), base, scene.expected + blob)
    if kind == "patch":  # structure from a bright place elsewhere, above the background
        sy, sx = (v * s + (s - 1) / 2 for v in _on_structure(scene, margin, rng))
        src = np.maximum(scene.expected - np.float32(np.median(scene.expected)), 0)
        d = ndimage.shift(src, (fy - sy, fx - sx), order=1, mode="constant") * window
        if not d.any():
            return None
        d = _scaled(scene, d, float(snr or 0), base, added=True)
        return Plant(kind, y, x, radius_px, float(snr or 0), base + d, scene.expected)
    if kind == "shifted":
        angle = float(rng.uniform(0, 2 * math.pi))
        step = (SHIFT_PX * s * math.sin(angle), SHIFT_PX * s * math.cos(angle))
        d = (ndimage.shift(base, step, order=1, mode="nearest") - base) * window
        return Plant(kind, y, x, radius_px, _snr(scene, d, base + d), base + d, scene.expected)
    raise ValueError(f"unknown object kind {kind!r}: choose from {', '.join(KINDS)}")


def _matching_z(scan: Scan, p: Plant, scale: int) -> float:
    """The largest peak significance of a region that detects ``p`` (its sign, within
    ``max(2 scale, radius + 2)`` raw px or twice the region's scale); 0 when none does."""
    sign = SIGN[p.kind]
    reach = max(2.0 * scale, p.radius_px + 2.0)
    return max((g.z for g in scan.regions
                if (sign == 0 or g.sign == sign)
                and math.hypot(g.y - p.y, g.x - p.x) <= max(reach, 2 * g.scale_px)),
               default=0.0)  # fmt: skip


def _check(scene: Scene, output: np.ndarray, raw: np.ndarray, loosest: float,
           pattern_in_output: bool = False) -> Any:  # fmt: skip
    """The server's check (every region kept, at the loosest false-alarm rate asked), the line
    phase put back into the prediction; ``pattern_in_output``: the output carries the camera's
    offset map (an engine's, converted back with the scene's units), a perfect output not."""
    return fidelity(output, raw, scene.camera, scale=scene.scale, scan=scene.scan,
                    offset_map=scene.offset_map, pattern_in_output=pattern_in_output,
                    sigmas=default_sigmas(scene.psf_sigma_px), false_alarm=loosest,
                    max_regions=10_000)  # fmt: skip


def _engine_output(chain: EngineChain, scene: Scene) -> Output:
    """``output(raw, truth)``: the engine's output of a raw frame after a warm-up on frames of
    the scene (a static field: the ring and the previous output settle, as live)."""
    warm = [scene.record(scene.expected, np.random.default_rng(i)) for i in range(WARMUP)]
    return lambda raw, truth: np.asarray(_run_chain(chain, [*warm, raw])[-1][1], np.float32)


def _perfect_output(raw: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """The perfect output of a raw frame recorded from ``truth``: ``truth``, whatever the
    noise."""
    return truth


def _trial(scene: Scene, output: Output, kind: str,
           radius_px: float, snr: float | None, rng: np.random.Generator,
           loosest: float, pattern: bool) -> tuple[float, float] | None:  # fmt: skip
    """One planted object: (its raw SNR, the significance the check gave it), or None when
    it could not be planted. ``removed``: the raw frame holds the object, the source's output
    of it has the object taken out."""
    raw = scene.record(scene.expected, rng)
    p = plant(scene, kind, radius_px, snr, output(raw, scene.expected), rng)
    if p is None:
        return None
    if kind == "removed":
        raw = scene.record(p.recorded, rng)
        taken_out = output(raw, p.recorded) - (p.recorded - scene.expected)
        p = Plant(kind, p.y, p.x, p.radius_px, p.snr, taken_out, p.recorded)
    f = _check(scene, p.output, raw, loosest, pattern)
    return p.snr, _matching_z(f.scan, p, scene.scale)


# -- the run -----------------------------------------------------------------------------------


def run_fidelity(*, engines: Sequence[str] = (), preset: str = "confocal-20fps",
                 specimens: Sequence[str] = SPECIMENS, real: dict[str, np.ndarray] | None = None,
                 side: int = 128, scale: int | None = None, frames: int = 10,
                 kinds: Sequence[str] = KINDS, snrs: Sequence[float] = SNRS,
                 radii: Sequence[float] = RADII,
                 false_alarms: Sequence[float] = FALSE_ALARMS, column_sd_adu: float = 4.0,
                 cost_sides: Sequence[int] = COST_SIDES, backend: str = "auto", seed: int = 0,
                 peak_photons: float = PEAK_PHOTONS,
                 progress: Progress | None = None) -> dict[str, Any]:  # fmt: skip
    """Plant, check, count; see the module's docstring. ``frames``: honest frames and planted
    objects per (source, kind, radius, SNR) per scene. ``column_sd_adu`` > 0 adds each scene
    once more, recorded by a camera with that column pattern. Engines are opened for each
    scene with its camera's units, as ``serve --profile`` opens them."""
    _check_args(kinds, snrs, radii, false_alarms, frames, side, cost_sides)
    if not (math.isfinite(peak_photons) and peak_photons > 0):
        raise ValueError(f"peak photons {peak_photons} must be > 0")
    scales = set()
    for name in engines:
        with closing(_open(name, backend, Electrons.from_camera(get_preset(preset).camera))) as c:
            scales.add(c.scale)
    if len(scales) > 1:
        raise ValueError(f"the engines have different scales {sorted(scales)}: bench one scale "
                         "at a time")  # fmt: skip
    if scale is not None and scales and scale not in scales:
        raise ValueError(f"--scale {scale} differs from the engines' scale {scales.pop()}")
    scale = scale or (scales.pop() if scales else 2)
    scenes = simulated_scenes(preset, specimens, side, scale, seed, peak_photons)
    if real:
        scenes += real_scenes(real, preset, side, scale, peak_photons)
    if not scenes:
        raise ValueError("no scene: name a specimen or a real image at least --side x scale")
    if column_sd_adu > 0:
        scenes += [with_column_pattern(s, column_sd_adu) for s in scenes]
    loosest = max(false_alarms)
    sigmas = default_sigmas(scenes[0].psf_sigma_px)
    thresholds = {f"{fa:g}": scan_threshold(scenes[0].raw_shape, sigmas, fa)
                  for fa in false_alarms}  # fmt: skip
    sources = ["perfect", *engines]
    honest: dict[str, dict[str, Any]] = {}
    trials: list[dict[str, Any]] = []
    rng = np.random.default_rng(seed)
    for si, scene in enumerate(scenes):
        for source in sources:
            if progress is not None:
                progress(f"scene {si + 1}/{len(scenes)} {scene.name}: {source}")
            with ExitStack() as stack:
                if source == "perfect":
                    output, pattern = _perfect_output, False
                else:  # its output carries the offset map, converted back with the units
                    chain = stack.enter_context(closing(_open(source, backend, scene.units)))
                    output, pattern = _engine_output(chain, scene), True
                chi2, max_z = [], []
                for _ in range(frames):
                    raw = scene.record(scene.expected, rng)
                    f = _check(scene, output(raw, scene.expected), raw, loosest, pattern)
                    chi2.append(f.chi2)
                    max_z.append(max((g.z for g in f.scan.regions), default=0.0))
                h = honest.setdefault(source, {"chi2": {}, "max_z": []})
                h["chi2"][scene.name] = float(np.median(chi2))
                h["max_z"] += max_z
                for kind, k, snr in _cases(kinds, radii, snrs):
                    for _ in range(frames):
                        z = _trial(scene, output, kind, k * scene.psf_sigma_px, snr, rng,
                                   loosest, pattern)  # fmt: skip
                        if z is not None:
                            trials.append({"source": source, "scene": scene.name, "kind": kind,
                                           "radius_psf": k, "snr": z[0], "z": z[1]})  # fmt: skip
    result = _summarize(honest, trials, thresholds, kinds, snrs, radii)
    result.update({
        "kind": "fidelity", "preset": preset, "scale": scale, "side_raw_px": side,
        "frames": frames, "scenes": [s.name for s in scenes], "sources": sources,
        "psf_sigma_px": scenes[0].psf_sigma_px, "scan_scales_px": list(sigmas),
        "thresholds": thresholds, "operating_point": OPERATING_POINT,
        "column_sd_adu": column_sd_adu, "peak_photons": peak_photons,
        "cost_ms": measure_cost(cost_sides, progress),
    })  # fmt: skip
    return result


def _cases(kinds: Sequence[str], radii: Sequence[float],
           snrs: Sequence[float]) -> list[tuple[str, float, float | None]]:  # fmt: skip
    """(kind, radius in PSF sigmas, SNR) of every planted case; a shift has no asked SNR."""
    return [(kind, k, snr) for kind in kinds for k in radii
            for snr in (snrs if kind != "shifted" else [None])]  # fmt: skip


def _check_args(kinds: Sequence[str], snrs: Sequence[float], radii: Sequence[float],
                false_alarms: Sequence[float], frames: int, side: int,
                cost_sides: Sequence[int]) -> None:  # fmt: skip
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"object kind(s) {bad or kinds}: choose from {', '.join(KINDS)}")
    if not snrs or any(not (math.isfinite(v) and v > 0) for v in snrs):
        raise ValueError(f"SNRs {list(snrs)} must be finite and > 0, e.g. --snr 3 --snr 5")
    if not radii or any(not (math.isfinite(v) and v > 0) for v in radii):
        raise ValueError(f"radii {list(radii)} (x the PSF sigma) must be > 0, e.g. --radius 2")
    if not false_alarms or any(not 0 < v < 1 for v in false_alarms):
        raise ValueError(f"false-alarm rates {list(false_alarms)} must be in (0, 1)")
    if frames < 1:
        raise ValueError(f"frames {frames} must be >= 1")
    if side < 32:
        raise ValueError(f"side {side} raw px is too small for the scan: use 32 or more")
    if any(n < 32 for n in cost_sides):
        raise ValueError(f"cost sides {list(cost_sides)} must be >= 32 raw px (or none)")


def _bin(snr: float, snrs: Sequence[float]) -> str:
    """The SNR bin a trial falls in: the largest asked SNR at or below it, or ``<lowest``."""
    below = [v for v in sorted(snrs) if v <= snr * (1 + 1e-6)]
    return f"{below[-1]:g}" if below else f"<{min(snrs):g}"


def _rate(hits: Sequence[bool]) -> float | None:
    return float(np.mean(hits)) if len(hits) else None


def _summarize(honest: dict[str, dict[str, Any]], trials: list[dict[str, Any]],
               thresholds: dict[str, float], kinds: Sequence[str], snrs: Sequence[float],
               radii: Sequence[float]) -> dict[str, Any]:  # fmt: skip
    """Per source: honest chi-square and measured false alarms at each threshold; detection by
    kind, radius and SNR bin at the operating point; the ROC (detection of objects of SNR >= 5
    against the measured false-alarm rate); detection against SNR at the operating point."""
    op = thresholds.get(f"{OPERATING_POINT:g}")
    sources: dict[str, Any] = {}
    for source, h in honest.items():
        mine = [t for t in trials if t["source"] == source]
        strong = [t for t in mine if t["snr"] >= 5.0]
        chi2 = list(h["chi2"].values())
        s: dict[str, Any] = {
            "honest_frames": len(h["max_z"]),
            "chi2": h["chi2"],
            "chi2_range": [min(chi2), max(chi2)],
            "roc": [
                {"nominal": float(fa), "threshold": u,
                 "false_alarm": _rate([z > u for z in h["max_z"]]),
                 "detection_snr5": _rate([t["z"] > u for t in strong])}
                for fa, u in sorted(thresholds.items(), key=lambda kv: -kv[1])
            ],
        }  # fmt: skip
        if op is not None:
            s["false_alarm"] = _rate([z > op for z in h["max_z"]])
            s["detection"] = {
                kind: {
                    f"{k:g}": {
                        b: _rate([t["z"] > op for t in mine if t["kind"] == kind
                                  and t["radius_psf"] == k and _bin(t["snr"], snrs) == b])
                        for b in sorted({_bin(t["snr"], snrs) for t in mine
                                         if t["kind"] == kind and t["radius_psf"] == k},
                                        key=_bin_order)
                    }
                    for k in radii
                }
                for kind in kinds
            }  # fmt: skip
            s["detection_vs_snr"] = {
                b: _rate([t["z"] > op for t in mine if _bin(t["snr"], snrs) == b])
                for b in sorted({_bin(t["snr"], snrs) for t in mine}, key=_bin_order)
            }
            by_kind = {kind: _rate([t["z"] > op for t in strong if t["kind"] == kind])
                       for kind in kinds}  # fmt: skip
            s["detection_snr5_by_kind"] = by_kind
            s["worst_snr5"] = min((v for v in by_kind.values() if v is not None), default=None)
        sources[source] = s
    return {"by_source": sources, "trials": len(trials)}


def _bin_order(b: str) -> float:
    return -1.0 if b.startswith("<") else float(b)


def measure_cost(sides: Sequence[int], progress: Progress | None = None,
                 runs: int = 7) -> dict[str, Any]:  # fmt: skip
    """Median time of the server's full check (chi-square, noise, scan, significance map) and of
    the noise-only check, per raw frame side, on a simulated nuclei frame (a x2 output up to
    512x512, the confocal case; x1 above, a 2048x2048 deblur); the automatic schedule
    (``serve --fidelity-every 0``) those costs give."""

    out: dict[str, Any] = {}
    for n in sides:
        if progress is not None:
            progress(f"cost at {n}x{n}")
        scale = 2 if n <= 512 else 1  # the confocal preset's x2, a 2048x2048 deblur's x1
        scene = simulated_scenes("confocal-20fps", ["nuclei"], n, scale)[0]
        rng = np.random.default_rng(0)
        raw = scene.record(scene.expected, rng)
        sigmas = default_sigmas(scene.psf_sigma_px)
        full = partial(fidelity, scene.expected, raw, scene.camera, scale=scale, noise=True,
                       sigmas=sigmas, map_bin=MAP_BIN, pattern_in_output=True)  # fmt: skip
        noise = partial(noise_ratio, raw, raw, scene.camera)
        row: dict[str, float] = {"scale": scale}
        for name, fn in (("full_ms", full), ("noise_only_ms", noise)):
            fn()  # warm (the threshold's cache, the thread pool)
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
            row[name] = float(np.median(times))
        schedule = CheckSchedule()
        schedule.record(row["full_ms"], n * n)
        schedule.due("cost", n * n)
        row["auto_every"] = schedule.every
        row["per_frame_ms"] = (row["full_ms"] + (schedule.every - 1) * row["noise_only_ms"]) / (
            schedule.every
        )
        out[f"{n}"] = row
    return out


def plot_fidelity(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """fidelity-roc.png (detection of SNR >= 5 objects against measured false alarms) and
    fidelity-snr.png (detection against the raw SNR at the operating point), per source."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(5, 4))
    for source, s in result["by_source"].items():
        pts = [(r["false_alarm"], r["detection_snr5"]) for r in s["roc"]
               if r["false_alarm"] is not None and r["detection_snr5"] is not None]  # fmt: skip
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", label=source)
    ax.axvline(OPERATING_POINT, color="grey", ls=":")
    ax.set(xlabel="measured false alarms per frame", ylabel="detection (raw SNR >= 5)",
           title="fidelity scan ROC", xlim=(0, None), ylim=(0, 1.02))  # fmt: skip
    ax.legend()
    paths.append(out_dir / "fidelity-roc.png")
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 4))
    for source, s in result["by_source"].items():
        d = s.get("detection_vs_snr") or {}
        xs = [k for k in d if not k.startswith("<") and d[k] is not None]
        ax.plot([float(k) for k in xs], [d[k] for k in xs], "o-", label=source)
    ax.set(
        xlabel="object's matched-filter SNR in the raw frame",
        ylabel=f"detection at {OPERATING_POINT:g} false alarms/frame",
        ylim=(0, 1.02),
    )
    ax.legend()
    paths.append(out_dir / "fidelity-snr.png")
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    return paths
