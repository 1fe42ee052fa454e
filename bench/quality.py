"""Image quality: engines against classical baselines on held-out true pairs.

    result = run_quality(engines=["gaussian"], simulated="confocal-20fps", pairs=8)

Every method (the raw frame itself, each baseline of :mod:`bench.baselines` at the engines'
scale, each engine run through an :class:`EngineChain` fed from a :class:`stream.ring.Ring` as
the server feeds it) is scored per pair against the truth: PSNR, SSIM, MS-SSIM, NRMSE, its own
decorrelation resolution, the fidelity residual against the raw frame, and flicker over a short
sequence of one position. Every method first runs on the frames a temporal engine needs before
that sequence (its window, background and previous output: the engines' longest history less
one), which flicker does not score: it measures the steady state an engine has live, not its
ring filling up. Decorrelation analysis assumes white noise (Descloux et al. 2019):
smoothed or interpolated outputs (nearest-upsampled raw included) can show a spurious cut-off,
so read it beside the truth's own value (``result["truth"]``). The fidelity chi-square is about
1 for an output that explains the raw frame within the noise; the raw frame itself scores below
1 (it reproduces its own noise), an output that invents or removes structure far above 1.
Flicker is read beside the truth's own (``result["truth_flicker"]``; simulated data, and
``bench real-pairs`` folders with several frames per pair): the truth of every scored sequence
frame, moving and changing as the specimen does, its flicker (with ``truth="high-quality"`` the
slow scan's noise included; real pairs: the clean image moved as the field moves, 0 for a still
field), and each method's ``flicker_ratio``, its flicker over the truth's (1: as steady as the
truth; none for a still truth).

Pairs come from a folder (``low/`` and ``high/`` TIFFs matched by name, the high image fitted
linearly onto the low image's ADU as training does) or from a simulated preset: the fast scan
and the slow high-quality scan of one instant, in raw-equivalent ADU exactly as
``engines.train.data`` makes them (see its docstring for the units), but held out: a different
specimen (scene seed ``seed + 1000``; training uses 0), instants after the training time span
and stage positions outside the region training draws from. With ``defocus_um=(lo, hi)`` the
raw frames of each pair (and of the flicker sequence) are recorded at one defocus ``dz`` drawn
as training draws it (``|dz|`` uniform in the range, random sign); the truth stays in focus.
A folder's low TIFF may be a (T, H, W) stack: T history frames, oldest first, the last scored
(what ``bench real-pairs --history`` writes). No torch needed.

A rig sweep (``rigs=[...]``: names of :data:`calibration.sim.rigs.RIGS`, ``"preset"`` or saved
calibration profiles) records the same held-out instants and positions with each rig's camera
(gain, offset, read noise, column offsets), PSF width and photon budget, and scores every method
per rig. Each rig comes with the calibration profile of what was simulated, and the engines get
that profile's ADU <-> electrons conversion exactly as ``serve --profile`` gives it to them
(``Electrons.from_profile``). Every method is scored where the truth is, in the rig's ADU with its
scalar offset: the baselines take the raw frames with the profile's offset map (and flat field)
corrected, as a classical pipeline with that calibration would, and outputs that carry the
camera's fixed pattern back (an engine's conversion adds the offset map again, the raw frame
has it) are corrected the same way; fidelity puts the offset map into its prediction.
:func:`record_held_out` writes an engine's held-out numbers into its package's manifest.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tifffile

from calibration.camera import CameraParams
from calibration.errors import ScopecastError
from calibration.fidelity import fidelity
from calibration.metrics import (
    MS_SSIM_WEIGHTS,
    decorrelation_resolution,
    flicker,
    ms_ssim,
    nrmse,
    psnr,
    ssim,
)
from calibration.optics import psf_sigma_um
from calibration.pairfolder import pair_files, read_pair
from calibration.profile import CalibrationProfile
from calibration.scan import ScanParams
from calibration.sim.pairs import TRAIN_SPAN_S, PairRig, match_intensity
from calibration.sim.presets import get_preset
from calibration.sim.randomize import RigDraw, StageMotion
from calibration.sim.rigs import (
    OWN_RIG,
    RIG_PROFILE,
    RigSpec,
    describe_rig,
    recorded_offset_map,
    resolve_rig,
    rig_profile,
)
from calibration.sim.scene import Preset
from calibration.units import Electrons
from engines.engine import EngineChain, EngineError
from engines.package import (
    BACKGROUND_FRAMES,
    MANIFEST,
    HeldOutScore,
    Manifest,
    PackageError,
    load_package,
    manifest_json,
)
from stream.protocol import DTYPES, FrameHeader
from stream.ring import Ring

from .baselines import BASELINES, baseline_history, run_baseline, upsample_nearest
from .report import fmt

Progress = Callable[[str], None]
"""``progress(message)``, called as pairs are made and methods scored."""

METRICS = (
    "psnr", "ssim", "ms_ssim", "nrmse", "decorrelation_px", "decorrelation_um",
    "fidelity_chi2", "fidelity_worst_block", "flicker",
)  # fmt: skip
"""Every method's metrics; a metric that cannot be computed for the data is None."""

Truth = Literal["high-quality", "expected"]
TRUTHS: tuple[Truth, ...] = ("high-quality", "expected")
"""Simulated truth: the slow scan as recorded, or its noise-free expectation."""
HELD_OUT_SEED = 1000
"""Added to ``seed`` for the held-out scene and noise: training's default seed is 0."""
PANEL_PAIRS = 3
MOTION_DIRECTION = (0.8, 0.6)
"""Unit (x, y) direction the specimen moves in a motion sweep: off both axes, so each frame's
shift is sub-pixel on rows and columns alike."""
_EXTRA_HISTORY_STREAM = 6  # rng stream of frames only temporal baselines use
_SEQUENCE_TRUTH_STREAM = 7  # rng stream of the flicker sequence's truths (their slow-scan noise)
"""Pairs whose images are kept for :func:`plot_quality`."""
DEFAULT_PSF_SIGMA_PX = 1.0
"""Richardson-Lucy's PSF sigma (raw px) for folder data, when none is given."""

_SSIM_WINDOW_PX = 11  # Wang et al.'s Gaussian window, as calibration.metrics sizes it
_MS_SSIM_MIN_SIDE = _SSIM_WINDOW_PX * 2 ** (len(MS_SSIM_WEIGHTS) - 1)
_DECORRELATION_MIN_SIDE = 32
_MIN_FIELD = 16


@dataclass
class _Pair:
    """One held-out pair: raw frames (oldest first, the last is scored) and its truth."""

    name: str
    frames: list[np.ndarray]
    truth: np.ndarray
    offset: float


@dataclass
class _Data:
    """Pairs and what is known about the rig that recorded them."""

    pairs: list[_Pair]
    scale: int
    camera: CameraParams | None = None
    scan: ScanParams | None = None
    pixel_size_um: float | None = None
    psf_sigma_px: float = DEFAULT_PSF_SIGMA_PX
    sequence: list[np.ndarray] | None = None
    warmup: int = 0
    """Leading frames of ``sequence`` every method runs on but flicker does not score: a
    temporal engine's ring fills and its previous output settles, as it has live."""
    sequence_truth: list[np.ndarray] | None = None
    """The truth of every scored frame of ``sequence`` (those after ``warmup``), for the
    truth's own flicker; None when unknown (folder data)."""
    info: dict[str, Any] = field(default_factory=dict)
    units: Electrons | None = None
    """The rig's ADU <-> electrons conversion from its calibration profile, as ``serve
    --profile`` builds it (engines get it); None: no profile (engines assume their manifest's
    camera, and the camera's scalar offset is all there is)."""

    def flatten(self, x: np.ndarray, scale: int) -> np.ndarray:
        """``x`` (on a grid ``scale`` x the raw one) in the camera's ADU with its scalar offset
        and uniform sensitivity: the profile's offset map and flat field taken out through the
        one conversion (``units`` to electrons, the camera's scalar one back). ``x`` itself
        when the profile has no maps."""
        if self.units is None or self.units.shape is None or self.camera is None:
            return x
        scalar = Electrons.from_camera(self.camera)
        return scalar.to_adu(self.units.to_electrons(x, scale=scale))

    @property
    def maps(self) -> dict[str, np.ndarray | None]:
        """The profile's offset map and flat field, for the fidelity prediction."""
        if self.units is None:
            return {"offset_map": None, "flat_field": None}
        return {"offset_map": self.units.offset_map, "flat_field": self.units.flat_field}


@dataclass
class Samples:
    """Images of the first pairs for :func:`plot_quality`: raw, truth and every method's output.

    Not a dict or array on purpose: a result written as JSON shows this as one short string.
    """

    pairs: list[dict[str, np.ndarray]]

    def __str__(self) -> str:
        return f"<{len(self.pairs)} sample pairs of images, for plots only>"


# -- simulated held-out pairs -----------------------------------------------------------------


class _HeldOutRig(PairRig):
    """The simulated rig training renders pairs with, on a specimen, instants and positions
    training never draws."""

    def __init__(self, preset: Preset, seed: int, frame_field: int | None,
                 max_defocus_um: float = 0.0, max_psf_scale: float = 1.0,
                 max_phase_px: float = 0.0) -> None:  # fmt: skip
        super().__init__(preset, seed=seed + HELD_OUT_SEED, field=frame_field,
                         max_defocus_um=max_defocus_um, max_psf_scale=max_psf_scale,
                         max_phase_px=max_phase_px)  # fmt: skip
        self.dt_s = preset.frame_interval_s * preset.time_scale

    def draw(self, rng: np.random.Generator, history_s: float) -> tuple[float, tuple[float, float]]:
        """An instant after training's time span and a field centre outside training's region."""
        p = self.preset
        span = TRAIN_SPAN_S * p.time_scale
        t = history_s + span + float(rng.uniform(0.0, span))
        x0, y0, _ = p.positions[int(rng.integers(len(p.positions)))]
        reach = max(50.0, 4 * max(self.shape) * p.pixel_size_um)  # training: +-reach per axis
        angle, radius = float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(1.5, 2.5)) * reach
        return t, (x0 + radius * math.cos(angle), y0 + radius * math.sin(angle))

    def truth(self, t_s: float, xy: tuple[float, float], scale: int, rng: np.random.Generator,
              kind: Truth = "high-quality", rig: RigDraw | None = None,
              brightness: float = 1.0) -> np.ndarray:  # fmt: skip
        """The slow high-quality scan at ``scale`` (or its noise-free expectation), in
        raw-equivalent ADU (with ``rig``: that rig's camera's, scalar offset)."""
        return self.target(t_s, xy, scale, kind, rng, rig=rig, brightness=brightness)


def _rig_for(preset: Preset, seed: int, frame_field: int | None, max_defocus_um: float,
             spec: RigSpec | None) -> tuple[_HeldOutRig, RigDraw | None]:  # fmt: skip
    """The held-out pair rig and, for a rig ``spec``, its draw around the preset's fast scan
    (the field's margin wide enough for its PSF and line phase)."""
    rig = _HeldOutRig(preset, seed, frame_field, max_defocus_um)
    if spec is None:
        return rig, None
    draw = spec.draw(rig.fast)
    if frame_field and (draw.psf_scale > 1 or draw.phase_px):
        rig = _HeldOutRig(preset, seed, frame_field, max_defocus_um, max(1.0, draw.psf_scale),
                          abs(draw.phase_px or 0.0))  # fmt: skip
    return rig, draw


def _draw_dz(rng: np.random.Generator, defocus_um: tuple[float, float]) -> float:
    """A signed defocus, ``|dz|`` uniform in ``defocus_um`` with a random sign (training's
    draw). Drawn from a stream of its own, so the same seed gives the same instants, positions
    and noise in focus and out of focus: only the blur differs."""
    return float(rng.uniform(*defocus_um)) * float(rng.choice([-1.0, 1.0]))


def check_defocus(defocus_um: Sequence[float]) -> tuple[float, float]:
    """``(lo, hi)`` as floats, or a ValueError unless it is a finite ``0 <= lo <= hi`` range."""
    try:
        lo, hi = (float(v) for v in defocus_um)
    except (TypeError, ValueError):
        raise ValueError(
            f"defocus {defocus_um!r} must be a range (lo, hi) of |dz| in um, e.g. (1.5, 3.0)"
        ) from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi):
        raise ValueError(
            f"defocus ({lo:g}, {hi:g}) must be a |dz| range in um with 0 <= lo <= hi, both "
            "finite, e.g. (1.5, 3.0); (0, 0) is in focus"
        )
    return lo, hi


def _simulated(preset: Preset, *, scale: int, pairs: int, history: int, sequence: int,
               seed: int, frame_field: int | None, progress: Progress | None,
               defocus_um: tuple[float, float] = (0.0, 0.0),
               truth: Truth = "high-quality", baseline_frames: int = 1,
               motion_px: float | None = None, rig_spec: RigSpec | None = None,
               rig_name: str | None = None) -> _Data:  # fmt: skip
    """Held-out pairs (``history`` raw frames each, truth at the last) and one raw sequence,
    the raw frames of each at one defocus drawn from ``defocus_um`` (a ``|dz|`` range).

    ``baseline_frames`` above ``history`` prepends the frames a temporal baseline uses, drawn
    from a noise stream of their own: every other frame stays as it was without them.
    ``motion_px`` moves the stage (the field of view) that many output px (raw px / scale) per
    frame along :data:`MOTION_DIRECTION`, so the specimen moves the opposite way across the
    frame: each frame is rendered at its own stage position, sub-pixel, and
    degraded by the same forward model; the truth is at the scored (last) frame's position.
    In a sweep (``motion_px`` not None, 0 included) each frame draws its noise from a stream of
    its own, so every speed has the same instants, positions, scored frames and truths: only
    the earlier frames move. None keeps the still pairs of a run without a sweep.

    ``rig_name`` (a rig sweep: :data:`calibration.sim.rigs.OWN_RIG` or a rig's name) records
    every frame with ``rig_spec`` (None: the preset's own rig) and gives the data that rig's
    calibration profile as ``units``; the truth is in that rig's ADU (scalar offset), the
    specimen as bright as the rig's photon budget asks at each pair's scored frame. Each frame
    draws its noise from a stream of its own, as in a motion sweep, so every rig records the
    same instants and positions."""
    defocus_um = check_defocus(defocus_um)
    if truth not in TRUTHS:
        raise ValueError(f"truth {truth!r} must be one of {', '.join(TRUTHS)}")
    f = preset.high_quality_factor
    if scale > f or f % scale:
        scales = [s for s in range(1, f + 1) if f % s == 0]
        raise ValueError(
            f"the engines have scale {scale}, but preset {preset.name!r} has truth only at "
            f"scale {' or '.join(map(str, scales))} (its slow scan is {f}x finer than its fast "
            "scan): benchmark engines of that scale on it, or use paired data (data=FOLDER)"
        )
    rig, draw = _rig_for(preset, seed, frame_field, defocus_um[1], rig_spec)
    camera = preset.camera if draw is None else draw.camera
    fast = rig.fast if draw is None else draw.model(rig.fast)
    offset = float(camera.offset_adu)
    out: list[_Pair] = []
    dzs: list[float] = []
    rng = np.random.default_rng([seed + HELD_OUT_SEED, 1])
    dz_rng = np.random.default_rng([seed + HELD_OUT_SEED, 3])
    truth_rng = np.random.default_rng([seed + HELD_OUT_SEED, 5])  # the same raw for each truth
    extra = max(0, baseline_frames - history)
    extra_rng = np.random.default_rng([seed + HELD_OUT_SEED, _EXTRA_HISTORY_STREAM])
    sweep = motion_px is not None or rig_name is not None
    # the stage moves the field as training's motion does (calibration.sim.randomize)
    stage = StageMotion((motion_px or 0.0) * preset.pixel_size_um / scale, MOTION_DIRECTION)

    def noise(i: int, k: int, shared: np.random.Generator) -> np.random.Generator:
        """Frame ``k`` (0: the scored one) of pair ``i`` (-1: the sequence): its own stream in
        a sweep, else the shared one."""
        return (
            np.random.default_rng([seed + HELD_OUT_SEED, 8, i + 1, k + 10_000]) if sweep else shared
        )

    moved = stage.center  # the field centre k frames after xy (negative: before)
    brights: list[float] = []

    def low(t: float, xy: tuple[float, float], gen: np.random.Generator, dz: float,
            bright: float) -> np.ndarray:  # fmt: skip
        if draw is None:
            return rig.low(t, xy, gen, dz)
        return rig.low(t, xy, gen, dz, rig=draw, brightness=bright)

    def earlier(t: float, xy: tuple[float, float], n: int, dz: float, i: int,
                bright: float) -> list[np.ndarray]:  # fmt: skip
        """``extra`` frames before the ``n`` frames that end at (t, xy), oldest first."""
        ks = range(-(n - 1) - extra, -(n - 1))
        return [low(t + k * rig.dt_s, moved(xy, k), noise(i, k, extra_rng), dz, bright)
                for k in ks]  # fmt: skip

    for i in range(pairs):
        t, xy = rig.draw(rng, (history - 1) * rig.dt_s)
        dz = _draw_dz(dz_rng, defocus_um)
        bright = 1.0 if draw is None else rig.brightness(t, xy, draw, dz)
        ks = range(-(history - 1), 1)
        frames = [low(t + k * rig.dt_s, moved(xy, k), noise(i, k, rng), dz, bright) for k in ks]
        frames = earlier(t, xy, history, dz, i, bright) + frames
        target = rig.truth(t, xy, scale, truth_rng, truth, rig=draw, brightness=bright)
        out.append(_Pair(f"sim-{i}", frames, target, offset))
        dzs.append(dz)
        brights.append(bright)
        if progress is not None:
            at = f", dz={dz:+.2f} um" if defocus_um[1] > 0 else ""
            progress(f"pair {i + 1}/{pairs} simulated ({preset.name}, t={t:.1f} s{at})")
    frames_seq, seq_dz, warmup = None, None, history - 1
    truths_seq: list[np.ndarray] | None = None
    if sequence:
        seq_rng = np.random.default_rng([seed + HELD_OUT_SEED, 2])
        t, xy = rig.draw(seq_rng, warmup * rig.dt_s)
        seq_dz = _draw_dz(np.random.default_rng([seed + HELD_OUT_SEED, 4]), defocus_um)
        bright = 1.0 if draw is None else rig.brightness(t, xy, draw, seq_dz)
        frames_seq = [low(t + k * rig.dt_s, moved(xy, k), noise(-1, k, seq_rng), seq_dz, bright)
                      for k in range(-warmup, sequence)]  # fmt: skip
        frames_seq = earlier(t, xy, warmup + 1, seq_dz, -1, bright) + frames_seq
        warmup += extra
        # the truth of each scored frame, as a pair's: its own stream leaves every draw above
        seq_truth_rng = np.random.default_rng([seed + HELD_OUT_SEED, _SEQUENCE_TRUTH_STREAM])
        truths_seq = [rig.truth(t + k * rig.dt_s, moved(xy, k), scale, seq_truth_rng, truth,
                                rig=draw, brightness=bright)
                      for k in range(sequence)]  # fmt: skip
    info = {"preset": preset.name, "channel": rig.channel, "scene_seed": seed + HELD_OUT_SEED,
            "field": list(rig.shape), "dt_s": rig.dt_s, "defocus_um": list(defocus_um),
            "dz_um": dzs, "sequence_dz_um": seq_dz, "truth": truth}  # fmt: skip
    if motion_px is not None:
        info["motion_px_per_frame"] = motion_px
        info["motion_direction_xy"] = list(MOTION_DIRECTION)
    units = None
    if rig_name is not None:
        offsets = None if draw is None else recorded_offset_map(rig, draw)
        profile = rig_profile(rig_name, rig.fast, draw, preset.pixel_size_um, offsets)
        units = Electrons.from_profile(profile)
        info["rig"] = rig_name
        info["rig_definition"] = describe_rig(rig_spec, preset)
        info["units"] = units.describe()
        if draw is not None and draw.peak_photons is not None:
            info["brightness"] = brights
    return _Data(
        pairs=out,
        scale=scale,
        camera=camera,
        scan=fast.scan if draw is not None else preset.scan,
        pixel_size_um=preset.pixel_size_um,
        psf_sigma_px=psf_sigma_um(fast.optics) / preset.pixel_size_um,
        sequence=frames_seq,
        warmup=warmup if sequence else 0,
        sequence_truth=truths_seq,
        info=info,
        units=units,
    )


# -- folder pairs -----------------------------------------------------------------------------


def _real_pairs_rig(folder: Path) -> dict[str, Any] | None:
    """The ``info.json`` that ``bench real-pairs`` writes beside its pairs, if there is one:
    which preset's forward model degraded them (so camera, scan, pixel size and PSF are known,
    and the high images are raw-equivalent already)."""
    path = folder / "info.json"
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}; fix or remove it") from e
    if not isinstance(info, dict) or info.get("kind") != "real-pairs":
        return None
    return info


def _folder(folder: Path, match: bool, progress: Progress | None) -> _Data:
    """Every low/high pair of ``folder``; the scale is the high/low side ratio. A low TIFF of
    shape (T, H, W) holds T raw frames of the pair, oldest first (the last is scored); the
    first such pair's frames are also the flicker sequence (a static field, T exposures).

    Pairs written by ``bench real-pairs`` (its info.json beside them) are scored with their
    preset's camera, scan, pixel size and PSF, and their high images, raw-equivalent by
    construction, are not refitted (a fit would dim the truth of defocused pairs)."""
    files = pair_files(folder)
    names = [f.name for f in files]
    rig_info = _real_pairs_rig(folder)
    if rig_info is not None:
        match = False
    pairs: list[_Pair] = []
    scale: int | None = None
    for i, pair in enumerate(files):
        name = pair.name
        low, high = read_pair(pair)
        if low.ndim not in (2, 3) or high.ndim != 2 or (low.ndim == 3 and len(low) < 1):
            raise ValueError(
                f"pair {name!r} in {folder}: low {low.shape} must be a 2-D image or a (T, H, W) "
                f"stack of T raw frames (oldest first, the last scored), and high {high.shape} "
                "a 2-D image"
            )
        side = low.shape[-2:]
        ratio = high.shape[0] // side[0]
        if ratio < 1 or high.shape != (side[0] * ratio, side[1] * ratio):
            raise ValueError(
                f"pair {name!r} in {folder}: high {high.shape} is not an integer multiple of low "
                f"{side} on both axes; register it (`scopecast calibrate register`)"
            )
        if scale is not None and ratio != scale:
            raise ValueError(
                f"pairs in {folder} differ in scale: {names[0]!r} is x{scale}, {name!r} is "
                f"x{ratio}; keep one scale per folder"
            )
        scale = ratio
        if str(low.dtype) not in DTYPES:
            low = low.astype(np.float32)
        truth = np.asarray(high, np.float32)
        if not (np.isfinite(truth).all() and np.isfinite(low).all()):
            raise ValueError(f"pair {name!r} in {folder} has NaN or inf values: replace them")
        frames = [np.ascontiguousarray(f) for f in low.reshape(-1, *side)]
        if match:  # on the mean of the frames: less noise, the same expected value
            mean = np.mean(np.stack(frames), axis=0, dtype=np.float64)
            a, b = match_intensity(mean, truth, ratio, f"pair {name!r}")
            truth = truth * np.float32(a) + np.float32(b)
        offset = float(np.percentile(frames[-1], 0.1))
        if rig_info is not None:
            offset = float(rig_info["intensity"]["offset_adu"])
        pairs.append(_Pair(name, frames, truth, offset))
        if progress is not None:
            progress(f"pair {i + 1}/{len(names)} read ({name}, {len(frames)} frame(s))")
    assert scale is not None
    history = {len(p.frames) for p in pairs}
    sequence = next((p.frames for p in pairs if len(p.frames) >= 2), None)
    info: dict[str, Any] = {"match_intensity": match, "history": sorted(history)}
    if sequence is not None:
        info["sequence_from"] = next(p.name for p in pairs if len(p.frames) >= 2)
    data = _Data(pairs=pairs, scale=scale, sequence=sequence, info=info)
    if rig_info is not None and sequence is not None:
        data.sequence_truth = _sequence_truth(folder, rig_info, info["sequence_from"], sequence)
        if data.sequence_truth is not None:
            info["truth"] = "real-pairs"
    if rig_info is not None:
        if rig_info.get("scale") != scale:
            raise ValueError(
                f"{folder / 'info.json'} says scale {rig_info.get('scale')}, but the pairs in "
                f"{folder} have scale {scale}: the folder mixes runs; write it anew"
            )
        preset = get_preset(rig_info["preset"])
        rig = PairRig(preset, channel=rig_info.get("channel"))
        data.camera, data.scan = preset.camera, rig.fast.scan
        data.pixel_size_um = preset.pixel_size_um
        data.psf_sigma_px = psf_sigma_um(rig.fast.optics) / preset.pixel_size_um
        info["real_pairs"] = {
            k: rig_info.get(k)
            for k in (
                "preset",
                "channel",
                "scale",
                "defocus_um",
                "history",
                "seed",
                "field",
                "motion_px_per_frame",
                "motion_direction_xy",
            )
        }
        if isinstance(rig_info.get("rig"), dict):
            _folder_rig(folder, rig_info["rig"], data)
    info["folder"] = str(folder)
    return data


def _sequence_truth(folder: Path, info: dict[str, Any], pair: str,
                    frames: list[np.ndarray]) -> list[np.ndarray] | None:  # fmt: skip
    """The truth of every frame of the flicker sequence ``pair``, from the file ``bench
    real-pairs`` wrote beside it (``SEQUENCE_TRUTH``); None when it wrote none (older folders)."""
    entry = info.get("sequence_truth")
    if not isinstance(entry, dict) or entry.get("pair") != pair:
        return None
    path = folder / str(entry.get("file"))
    try:
        truths = np.asarray(tifffile.imread(path), np.float32)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}; write the pairs anew") from e
    if truths.ndim != 3 or len(truths) != len(frames):
        raise ValueError(
            f"{path} holds {truths.shape}, not the truth of each of the {len(frames)} frames of "
            f"pair {pair!r}: the folder mixes runs; write it anew"
        )
    return list(truths)


def _folder_rig(folder: Path, rig: dict[str, Any], data: _Data) -> None:
    """Pairs ``bench real-pairs --rig`` recorded with a rig: its calibration profile (beside
    them in ``profile/``) gives the camera, scan, PSF and the engines' conversion."""
    try:
        profile = CalibrationProfile.load(folder / RIG_PROFILE)
    except ScopecastError as e:
        raise ValueError(f"{folder} holds pairs of rig {rig.get('name')!r}: {e}") from e
    data.units = Electrons.from_profile(profile)
    shape = data.units.shape
    if shape is not None and any(p.frames[-1].shape != shape for p in data.pairs):
        raise ValueError(
            f"the offset map of {folder / RIG_PROFILE} is {shape}, but not every pair in {folder} "
            "is: the folder mixes runs; write it anew"
        )
    data.camera, data.scan = profile.camera, profile.scan
    data.pixel_size_um = profile.pixel_size_um
    data.psf_sigma_px = psf_sigma_um(profile.optics) / profile.pixel_size_um
    data.info.update(rig=rig.get("name"), rig_definition=rig, units=data.units.describe())


# -- methods ----------------------------------------------------------------------------------


def _open(name: str, backend: str, units: Electrons | None = None) -> EngineChain:
    """One engine (or an ``a+b`` chain) by name or package folder; ValueError if unknown.
    ``units``: the rig's conversion from its profile, as ``serve --profile`` passes it."""
    from engines.offline.build import rebuild_plan  # a plan missing for this GPU is rebuilt

    parts: list[str | Path] = [name] if Path(name).exists() else list(name.split("+"))
    try:
        return EngineChain.open(parts, backend, rebuild=rebuild_plan, units=units)
    except PackageError as e:
        raise ValueError(f"engine {name!r} cannot be opened: {e}") from e


def _history(chain: EngineChain) -> int:
    """Raw frames a chain should see before the scored one: window, background, previous."""
    first = chain.engines[0].manifest.temporal
    return max(first.window, BACKGROUND_FRAMES if first.background else 1,
               2 if first.previous_output else 1)  # fmt: skip


def _run_chain(
    chain: EngineChain, frames: Sequence[np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(frame, float output) for each of ``frames`` in order, fed through one fresh ring exactly
    as the server feeds a key: push, snapshot, enhance, keep each stage's previous output."""
    ring = Ring(chain.window, background=chain.background, max_pause_s=None)
    out = []
    for t, given in enumerate(frames):
        frame = np.ascontiguousarray(given)
        header = FrameHeader(stream="bench", seq=t, index={"t": t}, shape=frame.shape,
                             dtype=str(frame.dtype), mono_ns=t, wall_time=0.0)  # fmt: skip
        ring.push(header, frame)
        window = ring.snapshot()
        try:
            result = chain.enhance(window.frames, window.previous, window.background)
        except EngineError as e:
            raise ValueError(f"engine {chain.name!r} failed on a {frame.shape} frame: {e}") from e
        for stage in result.stages:
            ring.set_previous(stage.stage, stage.output, window.generation)
        out.append((result.frame, result.stages[-1].output))
    return out


def _score(output: np.ndarray, fid_output: np.ndarray, pair: _Pair, data: _Data) -> dict[str, Any]:
    """Every per-pair metric of one output against the pair's truth and raw frame."""
    truth, raw = pair.truth, pair.frames[-1]
    value_range = float(np.ptp(truth))
    side = min(truth.shape)
    scores: dict[str, Any] = {
        "psnr": psnr(truth, output, data_range=value_range),
        "ssim": ssim(truth, output, data_range=value_range),
        "ms_ssim": ms_ssim(truth, output, data_range=value_range)
        if side >= _MS_SSIM_MIN_SIDE else None,
        "nrmse": nrmse(truth, output, normalization="min-max"),
        "decorrelation_px": None,
        "decorrelation_um": None,
        "fidelity_chi2": None,
        "fidelity_worst_block": None,
    }  # fmt: skip
    if side >= _DECORRELATION_MIN_SIDE:
        px = None if data.pixel_size_um is None else data.pixel_size_um / data.scale
        d = decorrelation_resolution(output, pixel_size_um=px)
        scores["decorrelation_px"], scores["decorrelation_um"] = d.resolution_px, d.resolution_um
    if data.camera is not None:
        fid = fidelity(np.asarray(fid_output, np.float32), raw, data.camera, scale=data.scale,
                       scan=data.scan, **data.maps)  # fmt: skip
        scores["fidelity_chi2"], scores["fidelity_worst_block"] = fid.chi2, fid.worst_block
    return scores


def _mean(values: list[Any]) -> float | None:
    known = [float(v) for v in values if v is not None]
    return float(np.mean(known)) if known else None


def _truth_reference(data: _Data) -> dict[str, float | None]:
    """What a perfect method would score on the resolution and fidelity metrics."""
    res_px, res_um, chi2 = [], [], []
    for pair in data.pairs:
        if min(pair.truth.shape) >= _DECORRELATION_MIN_SIDE:
            px = None if data.pixel_size_um is None else data.pixel_size_um / data.scale
            d = decorrelation_resolution(pair.truth, pixel_size_um=px)
            res_px.append(d.resolution_px)
            res_um.append(d.resolution_um)
        if data.camera is not None:
            fid = fidelity(pair.truth, pair.frames[-1], data.camera, scale=data.scale,
                           scan=data.scan, **data.maps)  # fmt: skip
            chi2.append(fid.chi2)
    return {"decorrelation_px": _mean(res_px), "decorrelation_um": _mean(res_um),
            "fidelity_chi2": _mean(chi2)}  # fmt: skip


# -- the benchmark ----------------------------------------------------------------------------


def _check_args(engines: Sequence[str], data: Path | None, simulated: str | None, pairs: int,
                sequence: int, seed: int, baselines: Sequence[str],
                frame_field: int | None, defocus_um: tuple[float, float]) -> None:  # fmt: skip
    if (data is None) == (simulated is None):
        raise ValueError(
            "give exactly one of data (a folder with low/ and high/ TIFFs) or simulated "
            f"(a preset name); got data={data!r}, simulated={simulated!r}"
        )
    if data is not None and defocus_um[1] > 0:
        raise ValueError(
            f"defocus {defocus_um} applies to simulated pairs only; folder pairs are used as "
            "recorded (`scopecast bench real-pairs --defocus LO,HI` writes defocused pairs)"
        )
    if isinstance(engines, str):
        raise ValueError(f"engines must be a list of names, got the string {engines!r}")
    if not (isinstance(pairs, int) and pairs >= 1):
        raise ValueError(f"pairs must be an integer >= 1, got {pairs!r}")
    if not (isinstance(sequence, int) and (sequence == 0 or sequence >= 2)):
        raise ValueError(f"sequence must be 0 (no flicker) or an integer >= 2, got {sequence!r}")
    if not (isinstance(seed, int) and seed >= 0):
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if frame_field is not None and not (isinstance(frame_field, int) and frame_field >= _MIN_FIELD):
        raise ValueError(f"field must be None (whole frame) or an int >= {_MIN_FIELD}, got "
                         f"{frame_field!r}")  # fmt: skip
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}: choose from {', '.join(BASELINES)}")


def check_motion(motion: Sequence[float] | None) -> tuple[float, ...] | None:
    """The speeds of a motion sweep (output px per frame) as floats, or a ValueError unless
    each is finite and >= 0 and none repeats; None stays None (no sweep)."""
    if motion is None:
        return None
    if isinstance(motion, str):
        raise ValueError(f"motion must be a list of speeds, got the string {motion!r}")
    try:
        speeds = tuple(float(v) for v in motion)
    except (TypeError, ValueError):
        raise ValueError(f"motion {motion!r} must be speeds in output px per frame") from None
    if not speeds:
        raise ValueError("motion must list at least one speed (output px per frame), e.g. [0, 2]")
    bad = [v for v in speeds if not (math.isfinite(v) and v >= 0)]
    if bad:
        raise ValueError(f"motion speeds {bad} must be finite and >= 0 (output px per frame)")
    if len(set(speeds)) != len(speeds):
        raise ValueError(f"motion speeds {list(speeds)} repeat a speed")
    return speeds


def _common_scale(chains: dict[str, EngineChain]) -> int | None:
    scales = {name: c.scale for name, c in chains.items()}
    if len(set(scales.values())) > 1:
        listed = ", ".join(f"{n} x{s}" for n, s in scales.items())
        raise ValueError(
            f"the engines differ in scale ({listed}): run the engines of each scale in a "
            "separate call, so every method is scored on one truth grid"
        )
    return next(iter(scales.values()), None)


def run_quality(
    *,
    engines: Sequence[str],
    data: Path | None = None,
    simulated: str | None = None,
    pairs: int = 8,
    sequence: int = 8,
    seed: int = 0,
    baselines: Sequence[str] = tuple(BASELINES),
    field: int | None = None,
    psf_sigma_px: float | None = None,
    match: bool = True,
    backend: str = "auto",
    defocus_um: tuple[float, float] = (0.0, 0.0),
    truth: Truth = "high-quality",
    motion: Sequence[float] | None = None,
    rigs: Sequence[str | RigSpec] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Score every baseline and engine on held-out pairs from ``data`` or ``simulated``.

    ``field`` renders simulated frames of that many raw px per side (None: the preset's frame);
    ``defocus_um`` is a ``|dz|`` range (um): each simulated pair's raw frames are recorded at
    one defocus drawn from it with a random sign, the truth in focus (a deblur benchmark);
    ``truth`` is the simulated slow scan as recorded ("high-quality", noisy like real data) or
    its noise-free expectation ("expected": what a perfect estimator returns; the noise of a
    recorded truth caps every method's PSNR and squeezes their differences);
    ``psf_sigma_px`` overrides Richardson-Lucy's PSF (default: the preset's optics, or 1 px for
    folder data); ``match`` fits folder high images onto the low images' ADU. With no engines the
    baselines run at the data's scale (1 for simulated data).

    ``motion`` (simulated only) is a sweep of speeds in output px per frame: the held-out pairs
    and the flicker sequence are rendered moving at each speed (same instants, positions and
    noise; see :func:`_simulated`) and every method is scored per speed, under
    ``result["by_motion"]["<speed>"]``; the top-level methods are the first speed's.

    ``rigs`` is a rig sweep: names of :data:`calibration.sim.rigs.RIGS`, ``"preset"`` (the
    preset's own rig), paths of saved calibration profiles, or :class:`RigSpec` objects. Simulated
    pairs are recorded by each (the same instants, positions and noise streams); folder data
    ``DIR`` reads ``DIR/<rig>``, the pairs ``bench real-pairs --rig`` wrote. Every method is
    scored per rig (and per speed) under ``result["by_rig"]["<rig>"]`` (with motion:
    ``...["by_motion"]["<speed>"]``), each engine fed through that rig's profile;
    :func:`sections` lists them all. The top-level methods are the first section's.
    """
    frame_field = field
    defocus_um = check_defocus(defocus_um)
    _check_args(engines, data, simulated, pairs, sequence, seed, baselines, frame_field,
                defocus_um)  # fmt: skip
    speeds = check_motion(motion)
    if data is not None and speeds is not None:
        raise ValueError(f"motion {list(speeds)} needs simulated pairs; folder pairs are used as "
                         "recorded")  # fmt: skip
    if data is not None and truth != "high-quality":
        raise ValueError(f"truth {truth!r} needs simulated pairs; folder pairs are scored "
                         "against their high images")  # fmt: skip
    sweep = check_rigs(rigs, data)
    preset = get_preset(simulated) if simulated is not None else None
    chains: dict[str, EngineChain] = {}
    try:
        for name in engines:
            if name in chains:
                raise ValueError(f"engine {name!r} is listed twice")
            chains[name] = _open(name, backend)
        scale = _common_scale(chains)
        history = max([_history(c) for c in chains.values()] + [1])

        def make(v: float | None, rig: tuple[str, RigSpec | None] | None) -> _Data:
            """The data of one section: at speed ``v``, recorded by ``rig`` (name, spec)."""
            if preset is not None:
                d = _simulated(preset, scale=scale or 1, pairs=pairs, history=history,
                               sequence=sequence, seed=seed, frame_field=frame_field,
                               progress=progress, defocus_um=defocus_um, truth=truth,
                               baseline_frames=baseline_history(baselines), motion_px=v,
                               rig_spec=None if rig is None else rig[1],
                               rig_name=None if rig is None else rig[0])  # fmt: skip
            else:
                assert data is not None
                folder = Path(data) if rig is None else _rig_folder(Path(data), rig[0])
                d = _folder(folder, match, progress)
                if d.sequence is not None:  # keep two scored frames at least
                    d.warmup = max(0, min(history - 1, len(d.sequence) - 2))
                if d.sequence_truth is not None:  # the scored frames' own
                    d.sequence_truth = d.sequence_truth[d.warmup :]
                if scale is not None and scale != d.scale:
                    name = next(iter(chains))
                    raise ValueError(
                        f"engine {name!r} has scale {scale}, but the data in {folder} have scale "
                        f"{d.scale} (high/low side ratio): use engines of scale {d.scale}, or "
                        f"pairs whose high images are {scale}x the low images"
                    )
            if psf_sigma_px is not None:
                d.psf_sigma_px = float(psf_sigma_px)
            for name, chain in chains.items():
                try:
                    chain.check(d.pairs[0].frames[-1].shape)
                except EngineError as e:
                    raise ValueError(f"engine {name!r} cannot take these frames: {e}") from e
            return d

        def score(d: _Data) -> dict[str, Any]:
            """Every method on ``d``; with a profile (``d.units``) each engine is opened anew
            with its conversion, as ``serve --profile`` opens it."""
            if d.units is None:
                return _evaluate(d, chains, list(baselines), data, simulated, seed, progress)
            fed: dict[str, EngineChain] = {}
            try:
                for name in chains:
                    fed[name] = _open(name, backend, d.units)
                return _evaluate(d, fed, list(baselines), data, simulated, seed, progress)
            finally:
                for chain in fed.values():
                    chain.close()

        first_rig = sweep[0] if sweep else None
        result = score(make(speeds[0] if speeds else None, first_rig))
        result["engine_packages"] = {
            name: str(chain.engines[0].package.path) if len(chain.engines) == 1 else None
            for name, chain in chains.items()
        }
        if speeds is not None:
            result["motion_px_per_frame"] = list(speeds)
        if sweep is None:
            if speeds is None:
                return result
            result["by_motion"] = {}
            for i, v in enumerate(speeds):
                if i and progress is not None:
                    progress(f"motion {v:g} px/frame")
                at = score(make(v, None)) if i else result
                result["by_motion"][f"{v:g}"] = _section(at, v)
            return result
        result["rigs"] = [name for name, _ in sweep]
        result["by_rig"] = {}
        for j, rig in enumerate(sweep):
            group: dict[str, Any] = {}
            for i, v in enumerate(speeds or [None]):
                if progress is not None and (i or j):
                    at_speed = "" if v is None else f", motion {v:g} px/frame"
                    progress(f"rig {rig[0]}{at_speed}")
                at = score(make(v, rig)) if (i or j) else result
                if speeds is None:
                    group = _section(at, v)
                else:
                    group.setdefault("by_motion", {})[f"{v:g}"] = _section(at, v)
            result["by_rig"][rig[0]] = group
        return result
    finally:
        for chain in chains.values():
            chain.close()


_SECTION_KEYS = ("best_baseline", "info", "truth", "truth_flicker", "methods")


def _section(at: dict[str, Any], v: float | None) -> dict[str, Any]:
    return {"motion_px_per_frame": v, **{k: at[k] for k in _SECTION_KEYS}}


def sections(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every scored section of a :func:`run_quality` result, in order, each with ``rig`` (None
    without a rig sweep), ``motion_px_per_frame`` (None without a motion sweep),
    ``best_baseline``, ``info``, ``truth``, ``truth_flicker`` and ``methods``."""
    by_rig = result.get("by_rig")
    if by_rig:
        out = []
        for name, group in by_rig.items():
            inner = group.get("by_motion")
            out += [{"rig": name, **s} for s in inner.values()] if inner else [
                {"rig": name, **group}]  # fmt: skip
        return out
    if result.get("by_motion"):
        return [{"rig": None, **s} for s in result["by_motion"].values()]
    return [{"rig": None, **_section(result, None)}]


def check_rigs(rigs: Sequence[str | RigSpec] | None,
               data: Path | None = None) -> list[tuple[str, RigSpec | None]] | None:  # fmt: skip
    """A rig sweep as (name, spec) pairs (spec None: the preset's own rig), or a ValueError
    naming the choices; None stays None. Folder ``data`` keeps the names (its subfolders)."""
    if rigs is None:
        return None
    if isinstance(rigs, str):
        raise ValueError(f"rigs must be a list of rig names or profile paths, got {rigs!r}")
    if not rigs:
        raise ValueError(f"rigs must list at least one rig: {OWN_RIG}, a name from "
                         "calibration.sim.rigs.RIGS or a calibration profile path")  # fmt: skip
    out: list[tuple[str, RigSpec | None]] = []
    for rig in rigs:
        if isinstance(rig, RigSpec):
            out.append((rig.name, rig))
        elif data is not None:
            out.append((str(rig), None))
        else:
            spec = resolve_rig(str(rig))
            out.append((OWN_RIG if spec is None else spec.name, spec))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"rigs {names} repeat a rig")
    return out


def _rig_folder(data: Path, rig: str) -> Path:
    """``DATA/<rig>``: the pairs ``bench real-pairs --rig <rig> --out DATA`` wrote."""
    folder = data / rig
    if not folder.is_dir():
        found = sorted(p.name for p in data.iterdir() if (p / "info.json").is_file()) if (
            data.is_dir()) else []  # fmt: skip
        raise ValueError(
            f"no pairs for rig {rig!r} in {data}: --rig with --data reads DATA/<rig>, the "
            f"folders `scopecast bench real-pairs --rig {rig} --out {data}` writes (there: "
            f"{', '.join(found) or 'none'})"
        )
    return folder


def _evaluate(d: _Data, chains: dict[str, EngineChain], baselines: list[str],
              data: Path | None, simulated: str | None, seed: int,
              progress: Progress | None) -> dict[str, Any]:  # fmt: skip
    """Score the raw frame, every baseline and every engine; aggregate per method."""
    kw = {"scale": d.scale, "psf_sigma_px": d.psf_sigma_px}
    outputs: dict[str, Callable[[_Pair], tuple[np.ndarray, np.ndarray]]] = {}
    sequences: dict[str, Callable[[list[np.ndarray]], list[np.ndarray]]] = {}
    kinds: dict[str, dict[str, Any]] = {"raw": {"kind": "raw"}}

    def flat(frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Raw frames with the profile's offset map (and flat field) taken out."""
        return [d.flatten(f, 1) for f in frames]

    def raw(p: _Pair) -> tuple[np.ndarray, np.ndarray]:
        up = d.flatten(upsample_nearest(p.frames[-1], d.scale), d.scale)
        return up, up

    outputs["raw"] = raw
    sequences["raw"] = lambda frames: [d.flatten(f, 1) for f in frames]
    offset = float(np.mean([p.offset for p in d.pairs]))  # the sequence's frames (flicker)
    for b in baselines:

        def baseline(p: _Pair, b: str = b) -> tuple[np.ndarray, np.ndarray]:
            est = run_baseline(b, flat(p.frames), offset=p.offset, camera=d.camera, **kw)
            return est, est

        outputs[b] = baseline
        sequences[b] = lambda frames, b=b, offset=offset: [
            run_baseline(b, f[: i + 1], offset=offset, camera=d.camera, **kw)
            for f in [flat(frames)]
            for i in range(len(frames))
        ]
        kinds[b] = {"kind": "baseline"}
    for name, chain in chains.items():
        key = f"engine:{name}"

        def engine(p: _Pair, chain: EngineChain = chain) -> tuple[np.ndarray, np.ndarray]:
            shown, output = _run_chain(chain, p.frames)[-1]
            return d.flatten(shown, d.scale), d.flatten(output, d.scale)

        outputs[key] = engine
        sequences[key] = lambda frames, chain=chain: [
            d.flatten(f, d.scale) for f, _ in _run_chain(chain, frames)
        ]
        manifest = chain.engines[-1].manifest
        kinds[key] = {"kind": "engine", "engine": name, "task": manifest.task}

    truth_flicker: float | None = None  # the truth's own over the scored frames (simulated)
    if d.sequence and d.sequence_truth and len(d.sequence_truth) >= 2:
        truth_flicker = flicker(np.stack([np.asarray(f, np.float64) for f in d.sequence_truth]))
    methods: dict[str, dict[str, Any]] = {}
    samples: list[dict[str, np.ndarray]] = [
        {"truth": p.truth.astype(np.float32)} for p in d.pairs[:PANEL_PAIRS]
    ]
    for method, run in outputs.items():
        per_pair: dict[str, list[Any]] = {m: [] for m in METRICS if m != "flicker"}
        for i, pair in enumerate(d.pairs):
            shown, for_fidelity = run(pair)
            for m, v in _score(shown, for_fidelity, pair, d).items():
                per_pair[m].append(v)
            if i < PANEL_PAIRS:
                samples[i][method] = np.asarray(shown, np.float32)
        flick = None
        if d.sequence:
            outs = sequences[method](d.sequence)[d.warmup :]
            flick = flicker(np.stack([np.asarray(f, np.float64) for f in outs]))
        methods[method] = {
            **kinds[method],
            **{m: _mean(v) for m, v in per_pair.items()},
            "flicker": flick,
            "flicker_ratio": (
                flick / truth_flicker if flick is not None and truth_flicker else None
            ),
            "per_pair": per_pair,
        }
        if progress is not None:
            psnr_mean = methods[method]["psnr"]
            progress(f"{method}: PSNR {psnr_mean:.2f} dB over {len(d.pairs)} pairs")
    best = _best_baseline(methods, baselines)
    keep = {"raw", "truth", *([best] if best else []), *(f"engine:{n}" for n in chains)}
    for s in samples:
        for k in [k for k in s if k not in keep]:
            del s[k]
    return {
        "kind": "quality",
        "data": None if data is None else str(data),
        "simulated": simulated,
        "pairs": len(d.pairs),
        "scale": d.scale,
        "seed": seed,
        "sequence": len(d.sequence) - d.warmup if d.sequence else 0,
        "sequence_warmup": d.warmup,
        "engines": list(chains),
        "baselines": baselines,
        "best_baseline": best,
        "pixel_size_um": d.pixel_size_um,
        "psf_sigma_px": d.psf_sigma_px,
        "pair_names": [p.name for p in d.pairs],
        "info": d.info,
        "truth": _truth_reference(d),
        "truth_flicker": truth_flicker,
        "methods": methods,
        "samples": Samples(samples),
    }


def _best_baseline(methods: dict[str, dict[str, Any]], baselines: list[str]) -> str | None:
    """The baseline with the highest mean PSNR (ties: the earlier one)."""
    scored = [(methods[b]["psnr"], -i, b) for i, b in enumerate(baselines)]
    return max(scored)[2] if scored else None


# -- reports and records ---------------------------------------------------------------------

METRIC_LABELS = {"psnr": "PSNR dB", "ssim": "SSIM", "ms_ssim": "MS-SSIM", "nrmse": "NRMSE",
               "decorrelation_px": "decorr px", "fidelity_chi2": "chi2",
               "flicker": "flicker", "flicker_ratio": "flicker / truth"}  # fmt: skip


def truth_flicker_note(section: dict[str, Any]) -> str | None:
    """What the truth's own flicker of ``section`` is and which truth it is; None without."""
    value = section.get("truth_flicker")
    if value is None:
        return None
    kind = section["info"].get("truth")
    which = {"high-quality": "the recorded slow scan, its noise included",
             "expected": "the noise-free slow scan",
             "real-pairs": "the clean image, moved as the field moves"}  # fmt: skip
    which = which.get(str(kind), str(kind))
    return f"truth's own flicker {fmt(value)} ({kind} truth: {which})"


def format_markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown table: one row per method and section, with the rig and speed
    columns of a sweep; the best baseline of each section in bold."""
    rows = sections(result)
    rigs = any(r["rig"] is not None for r in rows)
    moving = any(r["motion_px_per_frame"] is not None for r in rows)
    head = [*(["rig"] if rigs else []), *(["px/frame"] if moving else []), "method",
            *METRIC_LABELS.values()]  # fmt: skip
    source = result.get("simulated") or result.get("data")
    lines = [f"**quality, {source}, {result['pairs']} pairs (mean), x{result['scale']}**", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]  # fmt: skip
    for r in rows:
        for name, m in r["methods"].items():
            label = f"`{name.removeprefix('engine:')}`" if m["kind"] == "engine" else name
            if name == r.get("best_baseline"):
                label = f"**{label}** (best baseline)"
            lead = [*([str(r["rig"])] if rigs else []),
                    *([fmt(r["motion_px_per_frame"])] if moving else [])]  # fmt: skip
            cells = [*lead, label, *(fmt(m.get(k)) for k in METRIC_LABELS)]
            lines.append("| " + " | ".join(cells) + " |")
    notes = {r["rig"]: r["info"]["units"] for r in rows if r["info"].get("units")}
    if notes:
        lines += ["", *(f"- {rig}: {u}" for rig, u in notes.items())]
    truths = []
    for r in rows:
        note = truth_flicker_note(r)
        if note is not None:
            at = [*([str(r["rig"])] if rigs else []),
                  *([f"{fmt(r['motion_px_per_frame'])} px/frame"] if moving else [])]  # fmt: skip
            truths.append(f"- {', '.join(at) + ': ' if at else ''}{note}")
    if truths:
        lines += ["", *truths]
    return "\n".join(lines)


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _held_out(result: dict[str, Any], section: dict[str, Any], name: str, when: str,
              version: str) -> HeldOutScore | None:  # fmt: skip
    """One engine's record of one section, or None if its scoring gave no finite PSNR."""
    m = section["methods"].get(f"engine:{name}")
    if m is None or _finite(m.get("psnr")) is None:
        return None
    info = section["info"]
    best = section.get("best_baseline")
    b = section["methods"].get(best, {}) if best else {}
    data: dict[str, Any] = {
        "simulated": result.get("simulated"),
        "data": result.get("data"),
        "rig": section["rig"],
        "motion_px_per_frame": section["motion_px_per_frame"],
        "pairs": result["pairs"],
        "truth": info.get("truth", "folder high images"),
        "scale": result["scale"],
        "seed": result["seed"],
        "baselines": list(result["baselines"]),
    }
    for key in ("field", "defocus_um", "rig_definition", "units", "real_pairs", "folder"):
        if info.get(key) is not None:
            data[key] = info[key]
    psnr_e, psnr_b = _finite(m.get("psnr")), _finite(b.get("psnr"))
    return HeldOutScore(
        data=json.loads(json.dumps(data, default=str)),
        psnr=psnr_e,
        ssim=_finite(m.get("ssim")),
        best_baseline=best,
        baseline_psnr=psnr_b,
        baseline_ssim=_finite(b.get("ssim")),
        margin_db=None if psnr_e is None or psnr_b is None else psnr_e - psnr_b,
        date=when,
        scopecast_version=version,
    )


def record_held_out(result: dict[str, Any], *, when: str | None = None) -> dict[str, str]:
    """Write every scored engine's held-out metrics (one :class:`HeldOutScore` per section of
    ``result``) into its package's ``manifest.json`` under ``held_out``; an older entry for the
    same data (preset or folder, rig, speed, pairs, truth, ...) is replaced, others are kept.

    Only the manifest is rewritten: it lists the sha256 of the package's other files, not its
    own, so the package still verifies (it is loaded again to check). Shipped engines
    (``engines/zoo``) are written too: that is what a developer does after retraining. An
    engine is not recorded when any of its sections has no finite PSNR, nor a chain (``a+b``:
    its numbers belong to no one package). Returns one line per engine: where it went, or why
    not."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        scopecast = version("scopecast")
    except PackageNotFoundError:
        scopecast = "unknown"
    when = when or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    packages = result.get("engine_packages", {})
    said: dict[str, str] = {}
    for name in result["engines"]:
        path = packages.get(name)
        if path is None:
            said[name] = "not recorded: a chain's numbers belong to no one package"
            continue
        entries = []
        for section in sections(result):
            entry = _held_out(result, section, name, when, scopecast)
            if entry is None:
                entries = []
                break
            entries.append(entry)
        if not entries:
            said[name] = "not recorded: its scoring gave no finite PSNR"
            continue
        said[name] = _write_held_out(Path(path), entries)
    return said


def _write_held_out(folder: Path, entries: list[HeldOutScore]) -> str:
    """Put ``entries`` into the package's manifest (replacing those for the same data)."""
    package = load_package(folder)
    file = package.path / MANIFEST
    before = file.read_bytes()
    new = {json.dumps(e.data, sort_keys=True) for e in entries}
    kept = [e for e in package.manifest.held_out if json.dumps(e.data, sort_keys=True) not in new]
    manifest = Manifest.model_validate(
        {**package.manifest.model_dump(), "held_out": [*kept, *entries]}
    )
    _replace(file, manifest_json(manifest).encode())
    try:
        load_package(package.path)
    except PackageError as e:  # never leave a package that no longer loads
        _replace(file, before)
        raise ValueError(f"recording into {file} broke the package, restored it: {e}") from e
    replaced = len(package.manifest.held_out) - len(kept)
    more = f", replacing {replaced} older" if replaced else ""
    return (f"recorded {len(entries)} held-out entr{'y' if len(entries) == 1 else 'ies'} into "
            f"{file}{more} ({len(kept) + len(entries)} in all)")  # fmt: skip


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- plots ------------------------------------------------------------------------------------


def plot_quality(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """``quality_metrics.png`` (mean PSNR and SSIM per method) and, when the result still holds
    its images, ``quality_panels.png``: raw | best baseline | each engine | truth, one contrast
    per row (the truth's 0.5-99.5th percentiles)."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [_plot_metrics(result, out_dir, plt)]
    samples = result.get("samples")
    if isinstance(samples, Samples) and samples.pairs:
        paths.append(_plot_panels(result, samples, out_dir, plt))
    return paths


def _plot_metrics(result: dict[str, Any], out_dir: Path, plt: Any) -> Path:
    methods = result["methods"]
    names = list(methods)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.9 * len(names) + 3), 4), squeeze=False)
    for ax, metric, label in zip(axes[0], ("psnr", "ssim"), ("PSNR (dB)", "SSIM"), strict=True):
        values = [methods[n].get(metric) for n in names]
        colors = ["tab:gray" if methods[n]["kind"] == "raw" else
                  "tab:orange" if methods[n]["kind"] == "engine" else "tab:blue"
                  for n in names]  # fmt: skip
        ax.bar(range(len(names)), [np.nan if v is None else v for v in values], color=colors)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel(label)
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if finite:
            lo, hi = min(finite), max(finite)
            ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
    source = result.get("simulated") or result.get("data")
    fig.suptitle(f"quality on {source}, {result['pairs']} pairs, x{result['scale']} "
                 "(gray raw, blue baselines, orange engines)", fontsize=9)  # fmt: skip
    fig.tight_layout()
    path = out_dir / "quality_metrics.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_panels(result: dict[str, Any], samples: Samples, out_dir: Path, plt: Any) -> Path:
    best = result.get("best_baseline")
    columns = ["raw", *([best] if best else []), *(f"engine:{n}" for n in result["engines"]),
               "truth"]  # fmt: skip
    rows = len(samples.pairs)
    fig, axes = plt.subplots(rows, len(columns), figsize=(2.6 * len(columns), 2.7 * rows),
                             squeeze=False)  # fmt: skip
    names = result.get("pair_names", [])
    for r, images in enumerate(samples.pairs):
        lo, hi = np.percentile(images["truth"], (0.5, 99.5))
        for c, column in enumerate(columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            image = images.get(column)
            if image is None:
                continue
            ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            title = "baseline: " + column if column == best else column
            per_pair = result["methods"].get(column, {}).get("per_pair", {})
            if per_pair.get("psnr"):
                title += f"\n{per_pair['psnr'][r]:.2f} dB"
            ax.set_title(title, fontsize=8)
        if r < len(names):
            axes[r][0].set_ylabel(names[r], fontsize=8)
    fig.tight_layout()
    path = out_dir / "quality_panels.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
