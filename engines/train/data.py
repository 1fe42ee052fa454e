"""Training data: raw low frames and raw-equivalent targets, cut into normalized torch crops.

Pairs come from real paired data (``paired``: single images, ``stacks``: time-lapse stacks) or
from the calibration forward model (``simulated``: the simulated microscope's fast and slow
scans of the same instant; ``synthetic``: clean images degraded by a rig's forward model), never
from bicubic downsampling alone; or from noisy recordings alone (``recording``: the next frame
as target, Noise2Noise in time; the frame itself behind blind spots, Noise2Void; or its other
scan lines, Neighbor2Neighbor).

Units. Low frames stay in raw ADU. Targets are in RAW-EQUIVALENT ADU: the mean of a target over
``scale x scale`` blocks has the expected value of the raw low frame, offset included, so the
live fidelity check (forward model of the enhanced frame vs raw) and the engine's
``y * scale + offset`` mapping hold. A target made from ADU ``x`` of the same camera (offset
``o``) is ``o + k * (x - o)``. Derivation of ``k`` for the simulated rig, whose specimens give

- fluorescence: photons per pixel proportional to pixel AREA (flux is conserved), and
- transmitted light (``brightfield-cells``): photons per pixel whatever its size, summed over the
  ``d x d`` fine pixels of each recorded pixel (``d`` = ``scan.downsample``):

a slow-scan pixel is ``f`` (``high_quality_factor``) times smaller per side and collects
``dwell`` (``high_quality_dwell``) times longer, so it holds ``dwell / f**2`` (fluorescence) or
``dwell`` (transmitted) times the photons per pixel of a fast-scan pixel of the same brightness,
hence ``k = f**2 / dwell`` or ``1 / dwell``; the slow scan is then mean-binned by ``f / scale``
(mean keeps the per-pixel level). The confocal preset (f = 2, dwell = 16) gives ``k = 1/4`` at
scale 2 and at scale 1. A noise-free ``clean`` target on a grid ``s`` times finer than the fast
scan (fast dwell) gets ``k = s**2`` (fluorescence) or ``1``. Synthetic data read a clean image
as raw-equivalent ADU on the target grid and turn it into fine-grid photons
``(clean - o) / (gain * qe * scale**2)`` for the forward model (fine grid = target grid).
Paired data from two systems are mapped onto raw-equivalent ADU by a linear fit of the
block-binned high image to the low image, both smoothed (blur-insensitive); see ``match_intensity``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import tifffile
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.utils.data import Dataset

from calibration.bidir import correct_phase
from calibration.forward import ForwardModel
from calibration.pairfolder import pair_files, read_pair
from calibration.profile import CalibrationProfile
from calibration.sim.pairs import TRAIN_SPAN_S, PairRig, degrade, match_intensity
from calibration.sim.presets import get_preset
from calibration.sim.randomize import MotionRanges, RigDraw, RigRanges, StageMotion
from calibration.sim.specimen import get_specimen_kind
from calibration.units import Electrons
from engines.package import BACKGROUND_FRAMES, Normalization

if TYPE_CHECKING:
    from calibration.sim.scene import Preset

Progress = Callable[[int, int], None]
"""``progress(done, total)``, called as pairs are generated or read."""

SELF_SUPERVISED = ("next-frame", "blind-spot", "line-split")
"""Targets that noisy recordings alone train against (``kind: recording``)."""
_MAX_BYTES = 8 << 30  # refuse to hold more generated data than this in memory


class DataConfig(BaseModel):
    """Where training pairs come from and how they are cropped (``build_datasets`` reads it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["simulated", "paired", "stacks", "synthetic", "recording"]
    preset: str = Field("confocal-20fps", description="simulated rig (simulated, synthetic)")
    channel: str | None = Field(None, description="preset channel; None: its first")
    seed: int = Field(0, ge=0, description="seeds generation, noise and the train/val split")
    target: Literal["high-quality", "clean", "next-frame", "blind-spot", "line-split"] = Field(
        "high-quality",
        description="simulated: noisy slow scan (as real data) or noise-free; recording: the "
        "next frame (Noise2Noise in time), the frame itself behind blind spots (Noise2Void), or "
        "the frame's other lines (Neighbor2Neighbor on scan lines, engines.train.line_split)",
    )
    defocus_um: tuple[float, float] = Field(
        (0.0, 0.0), description="|dz| range applied to the low frames (target in focus)"
    )
    folder: Path | None = Field(
        None,
        description="paired/stacks: low/ and high/ TIFFs by name; synthetic: clean TIFFs; "
        "recording: (T, H, W) TIFF/OME-TIFF time-lapses, or a scopecast run folder (its raw files)",
    )
    profile: Path | None = Field(
        None,
        description="calibration profile: the rig simulated/synthetic data are made with; the "
        "rig recordings and paired/stacks low frames were recorded with (converted through it, "
        "so the exported engine is in electrons)",
    )
    pairs: int = Field(64, ge=1, description="simulated/synthetic: training pairs to generate")
    val_pairs: int = Field(
        16, ge=0, description="simulated/synthetic: validation pairs; recording: at most these"
    )
    val_fraction: float = Field(
        0.2, ge=0, lt=1, description="paired/stacks/synthetic TIFFs: share held out by name"
    )
    patch: int = Field(64, ge=4, description="training crop side at the input (low) resolution")
    dt_s: float = Field(
        0.05, ge=0, allow_inf_nan=False, description="simulated seconds between frames"
    )
    field: int | None = Field(
        None, ge=8, description="render (or crop) only this many low pixels per side per pair"
    )
    match_intensity: bool = Field(
        True, description="paired/stacks: fit high images linearly onto the low images' ADU"
    )
    frames: int = Field(
        500, ge=2, description="recording: at most this many frames of each time-lapse (its first)"
    )
    max_shift_px: float = Field(
        0.5,
        ge=0,
        allow_inf_nan=False,
        description="recording, next-frame: frame pairs whose field moved more (phase "
        "correlation, raw px) are left out: the next frame must show the same scene",
    )
    key_starts: float = Field(
        0.0,
        ge=0,
        le=1,
        description="background engines: share of training items whose background is the "
        "median of 1 to 8 frames, as a key's first frames have it live (else 9)",
    )
    specimens: tuple[str, ...] | None = Field(
        None,
        description="simulated: specimen kinds (calibration.sim.SPECIMEN_KINDS, e.g. "
        "wheel-bbbc007 for real images) each sample draws one of, uniformly; None: the preset "
        "channel's own",
    )

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        lo, hi = self.defocus_um
        if not (0 <= lo <= hi and math.isfinite(hi)):
            raise ValueError(
                f"defocus_um={self.defocus_um} must be a range (low, high) of |dz| with "
                "0 <= low <= high, e.g. (1.0, 3.0)"
            )
        self_supervised = self.target in SELF_SUPERVISED
        if (self.kind == "recording") != self_supervised:
            raise ValueError(
                f"kind={self.kind!r} with target={self.target!r}: noisy recordings "
                "(kind='recording') train against the next frame, blind spots or the other "
                "lines (target='next-frame', 'blind-spot' or 'line-split'), and only they do"
            )
        if self.kind == "recording" and self.folder is None:
            raise ValueError(
                "kind='recording' needs folder: (T, H, W) TIFF time-lapses, or a scopecast run "
                "folder"
            )
        files = self.kind in ("paired", "stacks")
        if files and self.folder is None:
            raise ValueError(
                f"kind={self.kind!r} needs folder: a folder holding low/ and high/ TIFFs "
                "matched by name (what `scopecast calibrate register` writes)"
            )
        if self.kind == "simulated" and self.folder is not None:
            raise ValueError(
                f"kind='simulated' does not read folder={self.folder}: drop folder, or use "
                "kind='paired' (low/ and high/) or kind='synthetic' (clean images)"
            )
        if self.specimens is not None:
            self._check_specimens()
        if files and self.target == "clean":
            raise ValueError(
                f"target='clean' needs a simulated scene; kind={self.kind!r} uses the recorded "
                "high images: drop target or use kind='simulated'"
            )
        return self

    def _check_specimens(self) -> None:
        """Specimens only for simulated data, known kinds, in the channel's light."""
        if self.kind != "simulated":
            raise ValueError(
                f"specimens={list(self.specimens or ())} choose what kind='simulated' data "
                f"image, not kind={self.kind!r}: drop specimens"
            )
        if not self.specimens:
            raise ValueError("specimens is empty: name one kind at least, or drop it")
        preset = get_preset(self.preset)
        spec = preset.channels.get(self.channel or next(iter(preset.channels)))
        for name in self.specimens:
            kind = get_specimen_kind(name)  # ValueError naming the known kinds
            if spec is not None and kind.transmitted != spec.kind.transmitted:
                light = "transmitted light" if spec.kind.transmitted else "fluorescence"
                raise ValueError(
                    f"specimen kind {name!r} is not seen in {light}, as preset "
                    f"{self.preset!r} images: choose kinds of the same light"
                )


@dataclass(frozen=True)
class Series:
    """One field over time: raw low frames (T, C, H, W), oldest first, and the raw-equivalent
    targets (C, H*scale, W*scale) known for some time indices."""

    low: np.ndarray
    targets: dict[int, np.ndarray]
    meta: dict[str, Any]


_Items = list[tuple[int, int]]
_Made = tuple[list[Series], _Items, _Items, float | None, dict[str, Any]]
"""What each source gives: series, train and validation items (series, time), offset, info."""


class PairDataset(Dataset):
    """Items of normalized float32 tensors: "frames", "target", optionally "previous" and
    "background"; random crops for training, fixed centre crops for validation.

    With ``previous`` an item also holds the rollout: "frames_prev", the windows of the
    ``rollout`` steps before (oldest first, stacked on the channel axis), and "previous_prev",
    the first-frame rule's previous output for the oldest of them."""

    def __init__(
        self,
        series: list[Series],
        items: list[tuple[int, int]],
        *,
        scale: int,
        window: int,
        patch: int,
        previous: bool,
        background: bool,
        normalization: Normalization,
        train: bool,
        rollout: int = 1,
        key_starts: float = 0.0,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.series, self.items = series, items
        self.key_starts = key_starts
        self.scale, self.window, self.patch = scale, window, patch
        self.previous, self.background, self.train = previous, background, train
        self.rollout = rollout
        self.normalization = normalization
        self.info = info or {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s_idx, t = self.items[index]
        s, p, k = self.series[s_idx], self.patch, self.scale
        r, c = self._corner(*s.low.shape[-2:])
        low = s.low[:, :, r : r + p, c : c + p]
        frames = low[np.clip(np.arange(t - self.window + 1, t + 1), 0, None)]
        hi = (slice(None), slice(r * k, (r + p) * k), slice(c * k, (c + p) * k))
        out = {"frames": frames.reshape(-1, p, p), "target": s.targets[t][hi]}
        if self.previous:
            prev = s.targets.get(t - 1)
            # first frame of a sequence: the current frame, upsampled
            out["previous"] = _upsample(low[t], k) if prev is None else prev[hi]
            # the rollout: the windows of the `rollout` steps before, oldest first, and the
            # first-frame rule's previous for the oldest; the generator makes its own previous
            # output from them, as it runs live, instead of seeing a target it never has
            first = t - self.rollout
            windows = np.arange(first, t)[:, None] + np.arange(1 - self.window, 1)[None]
            out["frames_prev"] = low[np.clip(windows.ravel(), 0, None)].reshape(-1, p, p)
            out["previous_prev"] = _upsample(low[max(first, 0)], k)
        if self.background:
            out["background"] = np.median(low[max(0, t - self._background_frames() + 1) : t + 1],
                                          axis=0)  # fmt: skip
        norm = self.normalization
        return {
            key: torch.from_numpy(
                (np.asarray(a, np.float32) - np.float32(norm.offset)) / np.float32(norm.scale)
            )
            for key, a in out.items()
        }

    def _background_frames(self) -> int:
        """Frames the background is the median of: ``BACKGROUND_FRAMES``, as a key has live
        once it has that many; in training, the share ``key_starts`` of items gets 1 to
        ``BACKGROUND_FRAMES - 1`` instead, as a key has in its first frames."""
        if self.train and self.key_starts and float(torch.rand(())) < self.key_starts:
            return int(torch.randint(1, BACKGROUND_FRAMES, ()))
        return BACKGROUND_FRAMES

    def _corner(self, height: int, width: int) -> tuple[int, int]:
        """Top-left of the crop; rows start even so bidirectional-scan line parity is kept."""
        p = self.patch
        if not self.train:
            return (height - p) // 2 // 2 * 2, (width - p) // 2
        r = 2 * int(torch.randint(0, (height - p) // 2 + 1, ()))
        return r, int(torch.randint(0, width - p + 1, ()))


def build_datasets(
    cfg: DataConfig,
    *,
    scale: int,
    window: int,
    previous: bool,
    background: bool,
    rollout: int = 1,
    normalization: Normalization | None = None,
    progress: Progress | None = None,
    rig: RigRanges | None = None,
    motion: MotionRanges | None = None,
) -> tuple[PairDataset, PairDataset, Normalization]:
    """Train and validation datasets for ``cfg``, and the normalization their items use.

    With ``normalization`` None it comes from the training low frames: offset = the camera
    offset (simulated/synthetic) or their 0.1th percentile (paired/stacks), scale = their
    99.9th percentile minus the offset, rounded to 3 significant digits.

    ``rig`` and ``motion`` (simulated data only; None: off, the data as before they existed)
    draw a rig per sample and a stage motion per sequence (:func:`_randomized`).
    """
    if scale not in (1, 2, 4):
        raise ValueError(f"scale={scale} is not supported: use 1 (denoise/deblur), 2 or 4 (SR)")
    if not (isinstance(window, int) and window >= 1):
        raise ValueError(f"window={window!r} must be an int >= 1 (frames per input)")
    if not (isinstance(rollout, int) and rollout >= 1):
        raise ValueError(f"rollout={rollout!r} must be an int >= 1 (steps before the scored one)")
    history = _history(window, previous, background, rollout)
    if rig is not None and cfg.kind != "simulated":
        raise ValueError(
            f"rig randomization needs kind='simulated' data, not kind={cfg.kind!r}: drop the "
            "rig section"
        )
    if motion is not None and cfg.kind not in ("simulated", "synthetic"):
        raise ValueError(
            f"motion needs kind='simulated' or 'synthetic' data, not kind={cfg.kind!r}: drop "
            "the motion section"
        )
    if cfg.kind == "simulated":
        made = _simulated(cfg, scale, history, previous, progress, rig, motion)
    elif cfg.kind == "synthetic":
        made = _synthetic(cfg, scale, history, previous, progress, motion)
    elif cfg.kind == "recording":
        made = _recording(cfg, scale, window, previous, progress)
    else:
        made = _recorded(cfg, scale, progress)
    series, train_items, val_items, offset, info = made
    for i, s in enumerate(series):
        height, width = s.low.shape[-2:]
        if min(height, width) < cfg.patch:
            raise ValueError(
                f"{s.meta.get('name', f'pair {i}')} is {height}x{width} low pixels, smaller than "
                f"patch={cfg.patch}: lower patch, or use larger images (or a larger field)"
            )
    if normalization is None:
        normalization = _normalization(series, train_items, offset)
    kw: dict[str, Any] = {"scale": scale, "window": window, "patch": cfg.patch,
                          "previous": previous, "background": background, "rollout": rollout,
                          "key_starts": cfg.key_starts, "normalization": normalization,
                          "info": info}  # fmt: skip
    return (
        PairDataset(series, train_items, train=True, **kw),
        PairDataset(series, val_items, train=False, **kw),
        normalization,
    )


# -- normalization ----------------------------------------------------------------------------


def _round_sig(x: float, digits: int = 3) -> float:
    return float(f"{x:.{digits}g}")


def _normalization(
    series: list[Series], items: list[tuple[int, int]], offset: float | None
) -> Normalization:
    """Offset (camera offset, else 0.1th percentile) and 99.9th-percentile scale of train lows."""
    if not items:
        raise ValueError("no training pairs to take the normalization from: add training data")
    picks = items[:: max(1, len(items) // 64)]
    step = max(1, int(math.sqrt(sum(series[s].low[t].size for s, t in picks) / 4e6)))
    values = np.concatenate(
        [series[s].low[t][..., ::step, ::step].ravel().astype(np.float32) for s, t in picks]
    )
    if offset is None:
        offset = _round_sig(float(np.percentile(values, 0.1)), 4)
    top = float(np.percentile(values, 99.9))
    if not top > offset:
        raise ValueError(
            f"the training low frames are dark: 99.9th percentile {top:g} ADU is not above the "
            f"offset {offset:g} ADU; check exposure and data, or pass a normalization"
        )
    return Normalization(offset=offset, scale=_round_sig(top - offset))


# -- helpers ----------------------------------------------------------------------------------


def _split_names(names: list[str], fraction: float, seed: int, what: str) -> set[str]:
    """A seeded, reproducible set of names held out for validation."""
    if fraction == 0:
        return set()
    if len(names) < 2:
        raise ValueError(
            f"{what}: {len(names)} found, need at least 2 to hold some out for validation; "
            "add more, or set val_fraction=0"
        )
    n_val = min(len(names) - 1, max(1, round(fraction * len(names))))
    order = np.random.default_rng([seed, 3]).permutation(len(names))
    return {names[i] for i in order[:n_val]}


def _check_memory(n: int, frames: int, low_px: int, targets: int, target_px: int) -> None:
    total = n * (frames * low_px * 2 + targets * target_px * 4)
    if total > _MAX_BYTES:
        raise ValueError(
            f"{n} pairs would hold {total / 2**30:.1f} GiB in memory: set field (e.g. 256) to "
            "render a smaller field of view per pair, or generate fewer pairs"
        )


# -- the simulated rig ------------------------------------------------------------------------


class _Rig(PairRig):
    """The simulated rig a DataConfig asks for (profile applied), and where training draws."""

    def __init__(self, cfg: DataConfig, rig: RigRanges | None = None,
                 specimen: str | None = None) -> None:  # fmt: skip
        preset: Preset = get_preset(cfg.preset)
        self.profile = CalibrationProfile.load(cfg.profile) if cfg.profile is not None else None
        if self.profile is not None:
            preset = preset.with_profile(self.profile)
        if specimen is not None:  # the channel images another specimen kind
            channel = cfg.channel or next(iter(preset.channels))
            spec = preset.channels[channel].model_copy(update={"specimen": specimen})
            preset = preset.model_copy(update={"channels": {**preset.channels, channel: spec}})
        extra: dict[str, float] = {}
        if rig is not None:  # room for the widest PSF and line phase the rig may draw
            extra = {"max_psf_scale": rig.max_psf_scale, "max_phase_px": rig.max_phase_px}
        super().__init__(preset, channel=cfg.channel, seed=cfg.seed, field=cfg.field,
                         max_defocus_um=cfg.defocus_um[1], **extra)  # fmt: skip
        if cfg.folder is None and min(self.shape) < cfg.patch:
            raise ValueError(
                f"field {self.shape[0]}x{self.shape[1]} is smaller than patch={cfg.patch}: "
                "raise field (or leave it None for the full frame), or lower patch"
            )

    def draw(self, rng: np.random.Generator, span: float,
             defocus: tuple[float, float]) -> tuple[float, tuple[float, float], float]:  # fmt: skip
        """A random instant (after ``span`` s of history), field centre and signed defocus."""
        p = self.preset
        t = span + float(rng.uniform(0.0, TRAIN_SPAN_S * p.time_scale))
        x0, y0, _ = p.positions[int(rng.integers(len(p.positions)))]
        reach = max(50.0, 4 * max(self.shape) * p.pixel_size_um)
        xy = (x0 + float(rng.uniform(-reach, reach)), y0 + float(rng.uniform(-reach, reach)))
        dz = float(rng.uniform(*defocus)) * float(rng.choice([-1.0, 1.0]))
        return t, xy, dz


def _history(window: int, previous: bool, background: bool, rollout: int = 1) -> int:
    """Low frames per simulated pair: the window, the background median's, and with a previous
    output the windows of the ``rollout`` steps before the last."""
    return max(window, BACKGROUND_FRAMES if background else 1,
               window + rollout if previous else 1)  # fmt: skip


def _upsample(low: np.ndarray, k: int) -> np.ndarray:
    """Nearest-neighbour ``k`` x upsampling of the last two axes: the first frame's previous."""
    return np.repeat(np.repeat(low, k, -2), k, -1)


def _simulated(
    cfg: DataConfig, scale: int, n_low: int, previous: bool, progress: Progress | None,
    rig_ranges: RigRanges | None = None, motion: MotionRanges | None = None,
) -> _Made:  # fmt: skip
    """True pairs: fast-scan frames at t - (L-1) dt ... t and the slow (or clean) target at t.
    With ``cfg.specimens`` each sample images a kind drawn from them (a stream of its own)."""
    kinds = cfg.specimens or (None,)
    rigs = [_Rig(cfg, rig_ranges, k) for k in kinds]
    rig = rigs[0]
    f = rig.preset.high_quality_factor
    if cfg.target == "high-quality" and (scale > f or f % scale):
        raise ValueError(
            f"preset {rig.preset.name!r} has a high-quality scan only {f}x finer than its fast "
            f"scan, so scale={scale} cannot have a high-quality target: use scale <= {f} (a "
            "divisor of it), or target='clean'"
        )
    rows, cols = rig.shape
    _check_memory(cfg.pairs + cfg.val_pairs, n_low, rows * cols,
                  1 + previous, rows * cols * scale**2)  # fmt: skip
    series: list[Series] = []
    splits: list[list[tuple[int, int]]] = [[], []]
    total = cfg.pairs + cfg.val_pairs
    for split, n in enumerate((cfg.pairs, cfg.val_pairs)):
        rng = np.random.default_rng([cfg.seed, split])
        # rig and motion draw from streams of their own: instants, fields and noise stay put
        rig_rng = np.random.default_rng([cfg.seed, split, 7])
        motion_rng = np.random.default_rng([cfg.seed, split, 8])
        kind_rng = np.random.default_rng([cfg.seed, split, 9])
        for _ in range(n):
            pick = int(kind_rng.integers(len(rigs))) if len(rigs) > 1 else 0
            rig = rigs[pick]
            t, xy, dz = rig.draw(rng, (n_low - 1) * cfg.dt_s, cfg.defocus_um)
            times = [t - (n_low - 1 - i) * cfg.dt_s for i in range(n_low)]
            meta = {"name": f"{('train', 'val')[split]}-{len(splits[split])}", "t_s": times,
                    "xy_um": xy, "dz_um": dz, "margin": rig.margin}  # fmt: skip
            if cfg.specimens is not None:
                meta["specimen"] = kinds[pick]
            if rig_ranges is None and motion is None:
                low = np.stack([rig.low(ti, xy, rng, dz) for ti in times])[:, None]
                targets = {n_low - 1: rig.target(t, xy, scale, cfg.target, rng)[None]}
                if previous:
                    targets[n_low - 2] = rig.target(times[-2], xy, scale, cfg.target, rng)[None]
            else:
                drawn = None if rig_ranges is None else rig_ranges.draw(rig_rng, rig.fast.camera)
                moves = (
                    None if motion is None
                    else motion.draw(motion_rng, rig.preset.pixel_size_um, scale)
                )  # fmt: skip
                low, targets = _randomized(rig, cfg, scale, times, xy, dz, rng, previous,
                                           drawn, moves)  # fmt: skip
                meta.update(_describe(drawn, moves))
            splits[split].append((len(series), n_low - 1))
            series.append(Series(low, targets, meta))
            if progress is not None:
                progress(len(series), total)
    info = {"kind": "simulated", "preset": rig.preset.name, "channel": rig.channel,
            "target": cfg.target, "target_gain": rig.target_gain(cfg.target, scale)}  # fmt: skip
    if cfg.specimens is not None:
        info["specimens"] = list(cfg.specimens)
    return series, splits[0], splits[1], rig.fast.camera.offset_adu, info


def _randomized(
    rig: _Rig, cfg: DataConfig, scale: int, times: list[float], xy: tuple[float, float],
    dz: float, rng: np.random.Generator, previous: bool, drawn: RigDraw | None,
    moves: StageMotion | None,
) -> tuple[np.ndarray, dict[int, np.ndarray]]:  # fmt: skip
    """One sequence recorded by a drawn rig and/or through a moving field of view.

    Frame ``k`` (0: the scored, newest) is seen at ``moves.center(xy, k)`` turned by
    ``moves.angle(k)``, so the scored frame and its target sit where they would without motion.
    With a drawn rig each raw frame (uint16, the rig's ADU) is converted to photo-electrons with
    that rig's conversion (its column offsets included), the target with its scalar one, and
    both are expressed in the preset's (or profile's) camera ADU, ``e * gain + offset``, float32:
    the units the normalization and the exported electrons manifest assume, so the network sees
    the same units whatever rig drew the sample. Each frame and target draws its noise from a
    stream of its own (seeded from ``rng``, which gives the same number of draws whatever the
    rig and motion), so two speeds give the same instants, fields, scored frame and target."""
    n_low = len(times)
    streams = [np.random.default_rng(s) for s in rng.integers(0, 2**63, n_low + 2)]
    motion = moves or StageMotion()

    def pose(i: int) -> tuple[tuple[float, float], float]:
        k = i - (n_low - 1)
        return motion.center(xy, k), motion.angle(k)

    bright = 1.0 if drawn is None else rig.brightness(times[-1], xy, drawn, dz)
    lows = []
    for i, ti in enumerate(times):
        at, angle = pose(i)
        lows.append(rig.low(ti, at, streams[i], dz, angle=angle, rig=drawn, brightness=bright))
    low = np.stack(lows)[:, None]
    scored = [n_low - 1, n_low - 2] if previous else [n_low - 1]
    targets = {}
    for j, i in enumerate(scored):
        at, angle = pose(i)
        targets[i] = rig.target(times[i], at, scale, cfg.target, streams[n_low + j], angle=angle,
                                rig=drawn,
                                brightness=bright)[None]  # fmt: skip
    if drawn is not None:
        reference = Electrons.from_camera(rig.fast.camera)
        low = reference.to_adu(drawn.electrons(low.shape[-2:]).to_electrons(low))
        own = Electrons.from_camera(drawn.camera)
        targets = {i: reference.to_adu(own.to_electrons(a)) for i, a in targets.items()}
    return low, targets


def _describe(drawn: RigDraw | None, moves: StageMotion | None) -> dict[str, Any]:
    """What a randomized sample was drawn with, for its meta."""
    out: dict[str, Any] = {}
    if drawn is not None:
        out["rig"] = {"gain_adu_per_electron": drawn.camera.gain_adu_per_electron,
                      "read_noise_e": drawn.camera.read_noise_electrons,
                      "offset_adu": drawn.camera.offset_adu, "column_sd_adu": drawn.column_sd_adu,
                      "psf_scale": drawn.psf_scale, "bidirectional": drawn.bidirectional,
                      "phase_px": drawn.phase_px, "peak_photons": drawn.peak_photons}  # fmt: skip
    if moves is not None:
        out["motion"] = {"step_um": moves.step_um, "direction": list(moves.direction),
                         "rotation_rad": moves.rotation_rad}  # fmt: skip
    return out


# -- synthetic: clean images through a forward model ------------------------------------------


def _degrader(rig: _Rig, scale: int) -> ForwardModel:
    """The rig's forward model (profile, else the preset's fast scan) with the target grid as
    its fine grid."""
    model = rig.profile.forward_model() if rig.profile is not None else rig.fast
    return model.model_copy(update={"scan": model.scan.model_copy(update={"downsample": scale})})


def _read_clean(folder: Path, scale: int) -> dict[str, np.ndarray]:
    files = sorted([*folder.glob("*.tif"), *folder.glob("*.tiff")])
    if not files:
        raise ValueError(
            f"no clean images (*.tif, *.tiff) in {folder}: put 2-D clean TIFFs there, or drop "
            "folder to use the simulated specimens"
        )
    images = {}
    for path in files:
        image = np.asarray(tifffile.imread(path), np.float32)
        if image.ndim != 2 or image.shape[0] % scale or image.shape[1] % scale:
            raise ValueError(
                f"clean image {path.name} has shape {image.shape}: need a 2-D image whose sides "
                f"are multiples of scale={scale}; crop it"
            )
        if not np.isfinite(image).all():
            raise ValueError(f"clean image {path.name} has NaN or inf values: replace them")
        images[path.stem.split(".")[0]] = image
    return images


def _synthetic(
    cfg: DataConfig,
    scale: int,
    n_low: int,
    previous: bool,
    progress: Progress | None,
    motion: MotionRanges | None = None,
) -> _Made:
    """Clean images (TIFFs, or the simulated specimens over time) degraded by the forward model.
    With ``motion``, a clean image's earlier frames show it moved and turned (each sample's
    speed, heading and turn drawn from a stream of its own), the scored frame as it is."""
    rig = _Rig(cfg)
    model = _degrader(rig, scale)
    series: list[Series] = []
    splits: list[list[tuple[int, int]]] = [[], []]
    total = cfg.pairs + cfg.val_pairs
    if cfg.folder is None:
        rows, cols = rig.shape
        _check_memory(total, n_low, rows * cols, n_low, rows * cols * scale**2)
    else:
        images = _read_clean(cfg.folder, scale)
        names = sorted(images)
        held = _split_names(names, cfg.val_fraction, cfg.seed, f"clean images in {cfg.folder}")
        pools = [[n for n in names if n not in held], sorted(held)]
        if cfg.val_pairs and not pools[1]:
            raise ValueError(
                f"val_pairs={cfg.val_pairs} but val_fraction=0 holds no clean image out of "
                f"{cfg.folder}: set val_fraction > 0, or val_pairs=0"
            )
        side = cfg.field * scale if cfg.field else max(max(im.shape) for im in images.values())
        _check_memory(total, n_low, side**2 // scale**2, 1, side**2)
    for split, n in enumerate((cfg.pairs, cfg.val_pairs)):
        rng = np.random.default_rng([cfg.seed, split])
        for i in range(n):
            if cfg.folder is None:
                t, xy, dz = rig.draw(rng, (n_low - 1) * cfg.dt_s, cfg.defocus_um)
                times = [t - (n_low - 1 - j) * cfg.dt_s for j in range(n_low)]
                cleans = [rig.clean(ti, xy, scale) for ti in times]
                low = np.stack([rig.crop(degrade(model, c, scale, dz, rng), 1) for c in cleans])
                targets = {n_low - 1: rig.crop(cleans[-1], scale)[None]}
                if previous:  # the specimen moves: the previous time point's clean image
                    targets[n_low - 2] = rig.crop(cleans[-2], scale)[None]
                meta = {"t_s": times, "xy_um": xy, "dz_um": dz, "margin": rig.margin}
            else:
                name = pools[split][i % len(pools[split])]
                clean = _field_crop(images[name], cfg.field, scale, rng)
                dz = float(rng.uniform(*cfg.defocus_um)) * float(rng.choice([-1.0, 1.0]))
                # a clean image has no time axis: its frames are independent exposures of a
                # static field (or, with motion, of the field moved), and "previous" follows
                # the first-frame rule
                moves = None if motion is None else motion.draw(
                    np.random.default_rng([cfg.seed, split, 11, i]), 1.0, 1
                )  # fmt: skip
                cleans = [clean if moves is None else _moved(clean, moves, n_low - 1 - j)
                          for j in range(n_low)]  # fmt: skip
                low = np.stack([degrade(model, c, scale, dz, rng) for c in cleans])
                targets = {n_low - 1: clean[None]}
                meta = {"source": name, "dz_um": dz}
                if moves is not None:
                    meta["motion"] = {"px_per_frame": moves.step_um,
                                      "direction": list(moves.direction),
                                      "turn_deg": math.degrees(moves.rotation_rad)}  # fmt: skip
            meta["name"] = f"{('train', 'val')[split]}-{len(splits[split])}"
            splits[split].append((len(series), n_low - 1))
            series.append(Series(low[:, None], targets, meta))
            if progress is not None:
                progress(len(series), total)
    info = {"kind": "synthetic", "source": str(cfg.folder) if cfg.folder else rig.preset.name,
            "forward_model": "profile" if rig.profile is not None else rig.preset.name}  # fmt: skip
    return series, splits[0], splits[1], model.camera.offset_adu, info


def _moved(image: np.ndarray, moves: StageMotion, lag: int) -> np.ndarray:
    """``image`` as the frame ``lag`` frames before it showed it: shifted by ``lag`` steps of
    ``moves`` (px along its direction, x then y) and turned by ``lag`` of its turns about the
    centre (edges mirrored)."""
    if lag == 0 or (moves.step_um == 0 and moves.rotation_rad == 0):
        return image
    from scipy import ndimage

    out = image
    if moves.rotation_rad:
        out = ndimage.rotate(out, math.degrees(lag * moves.rotation_rad), reshape=False, order=1,
                             mode="mirror")  # fmt: skip
    dx, dy = (lag * moves.step_um * d for d in moves.direction)
    return np.asarray(ndimage.shift(out, (dy, dx), order=1, mode="mirror"), np.float32)


def _field_crop(image: np.ndarray, field: int | None, scale: int,
                rng: np.random.Generator) -> np.ndarray:  # fmt: skip
    """A random field x field (low pixels) crop of a clean image, starting on an even low row."""
    if field is None:
        return image
    side = field * scale
    h, w = image.shape
    if side > min(h, w):
        return image
    r = 2 * scale * int(rng.integers(0, (h - side) // (2 * scale) + 1))
    c = scale * int(rng.integers(0, (w - side) // scale + 1))
    return image[r : r + side, c : c + side]


# -- noisy recordings alone: Noise2Noise in time, or blind spots -------------------------------


def recording_files(folder: Path) -> list[Path]:
    """The time-lapses of ``folder``: its raw files if it is a scopecast run folder (an
    index.jsonl beside ``*_raw.ome.tif``), else every TIFF in it; a file is itself."""
    if folder.is_file():
        return [folder]
    if (folder / "index.jsonl").is_file():
        files = sorted(folder.glob("*_raw.ome.tif"))
    else:
        files = sorted([*folder.glob("*.tif"), *folder.glob("*.tiff")])
    if not files:
        raise ValueError(
            f"no time-lapse TIFFs in {folder}: give a folder of (T, H, W) TIFF/OME-TIFF files, a "
            "scopecast run folder, or one file"
        )
    return files


def read_recording(path: Path, frames: int) -> np.ndarray:
    """The first ``frames`` frames of a (T, H, W) time-lapse (a 2-D image: T = 1), uint or
    float, as (T, 1, H, W)."""
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        shape = series.shape
        if len(shape) == 2:
            stack = series.asarray()[None]
        elif len(shape) == 3:
            n = min(frames, shape[0])
            stack = series.asarray(key=range(n)) if len(series.pages) == shape[0] else (
                series.asarray()[:n]
            )  # fmt: skip
        else:
            raise ValueError(
                f"{path.name} has shape {shape} ({series.axes}): a recording must be (T, H, W) "
                "(one position and channel per file); split it"
            )
    stack = np.asarray(stack).reshape(-1, 1, *shape[-2:])
    if not np.issubdtype(stack.dtype, np.number) or not np.isfinite(stack).all():
        raise ValueError(f"{path.name} holds non-numeric, NaN or inf values: fix the file")
    return stack


def _profile_conversion(path: Path | None) -> Callable[[np.ndarray], np.ndarray]:
    """Raw frames through a calibration profile's conversion (offset map, flat field, bad
    pixels out) into its camera's scalar ADU, the units an engine exported from them is
    documented in (electrons through that camera); without a profile, frames as they are."""
    if path is None:
        return lambda frames: frames
    profile = CalibrationProfile.load(path)
    rig, scalar = Electrons.from_profile(profile), Electrons.from_camera(profile.camera)
    return lambda frames: scalar.to_adu(rig.to_electrons(frames))


def _field_shift(a: np.ndarray, b: np.ndarray) -> float:
    """How far (raw px) the field moved from ``a`` to ``b``: phase correlation, 0.1 px steps."""
    from skimage.registration import phase_cross_correlation

    shift, _, _ = phase_cross_correlation(a.astype(np.float32), b.astype(np.float32),
                                          upsample_factor=10, normalization=None)  # fmt: skip
    return float(np.hypot(*shift))


def _recording(cfg: DataConfig, scale: int, window: int, previous: bool,
               progress: Progress | None) -> _Made:  # fmt: skip
    """Noisy time-lapses alone: no clean or high image anywhere. ``next-frame``: the target of
    time t is the raw frame t+1, an independent noise draw of (nearly) the same scene, for the
    pairs whose field moved at most ``max_shift_px``; ``blind-spot`` and ``line-split``: the
    target is frame t itself, and training hides pixels of the input
    (``engines.train.blind_spot``) or splits it by lines (``engines.train.line_split``). Split
    by file (one file: in time, the last frames held out). With a ``profile`` the frames go
    through its conversion (offset map, flat field, bad pixels) into its camera's scalar ADU,
    the units an engine exported from them is documented in (electrons through that camera);
    for ``line-split`` a bidirectional scan's line phase is undone too, as ``serve
    --correct-bidir`` does, so that neighbouring lines show the same content."""
    if scale != 1 or previous:
        raise ValueError(
            f"recordings train denoisers (scale 1, no previous output), not scale={scale}"
            f"{' with previous' if previous else ''}: a noisy recording holds no finer or "
            "cleaner image to learn from; set scale: 1 and previous: false"
        )
    assert cfg.folder is not None
    files = recording_files(Path(cfg.folder))
    series: list[Series] = []
    dropped: dict[str, int] = {}
    next_frame = cfg.target == "next-frame"
    phase = 0.0  # line-split: the bidirectional line phase to undo
    if cfg.profile is not None and cfg.target == "line-split":
        scan = CalibrationProfile.load(cfg.profile).scan
        phase = scan.phase_px if scan.bidirectional else 0.0
    convert = _profile_conversion(cfg.profile)
    for i, path in enumerate(files):
        low = convert(read_recording(path, cfg.frames))
        if phase:
            low = np.stack([correct_phase(f[0], phase) for f in low])[:, None]
        if next_frame and len(low) < 2:
            raise ValueError(f"{path.name} has 1 frame: target='next-frame' needs 2 or more")
        if next_frame:
            keep = [t for t in range(len(low) - 1)
                    if _field_shift(low[t, 0], low[t + 1, 0]) <= cfg.max_shift_px]  # fmt: skip
            dropped[path.name] = len(low) - 1 - len(keep)
            targets = {t: low[t + 1].astype(np.float32) for t in keep}
        else:
            targets = {t: low[t].astype(np.float32) for t in range(len(low))}
        series.append(Series(low, targets, {"name": path.stem.split(".")[0]}))
        if progress is not None:
            progress(i + 1, len(files))
    names = [s.meta["name"] for s in series]
    usable = [(i, t) for i, s in enumerate(series) for t in sorted(s.targets) if t >= window - 1]
    if not usable:
        raise ValueError(
            f"no frame of {cfg.folder} can be trained on: every pair of consecutive frames moved "
            f"more than max_shift_px={cfg.max_shift_px} (or the files are shorter than the "
            "window); raise max_shift_px, or use target='blind-spot'"
        )
    if len(series) == 1:
        n_val = 0 if cfg.val_fraction == 0 else max(1, round(cfg.val_fraction * len(usable)))
        n_val = min(n_val, len(usable) - 1)
        train, val = usable[: len(usable) - n_val], usable[len(usable) - n_val :]
    else:
        held = _split_names(names, cfg.val_fraction, cfg.seed, f"recordings in {cfg.folder}")
        train = [(i, t) for i, t in usable if names[i] not in held]
        val = [(i, t) for i, t in usable if names[i] in held]
    if len(val) > cfg.val_pairs > 0:  # evenly spaced: validation stays quick on long recordings
        val = [val[i] for i in np.linspace(0, len(val) - 1, cfg.val_pairs).round().astype(int)]
    info = {"kind": "recording", "folder": str(cfg.folder), "target": cfg.target,
            "files": [p.name for p in files], "frames": [len(s.low) for s in series]}  # fmt: skip
    if next_frame:
        info["dropped_for_motion"] = dropped
    return series, train, val, None, info


# -- recorded pairs: low/ and high/ folders ---------------------------------------------------


def _recorded(cfg: DataConfig, scale: int, progress: Progress | None) -> _Made:
    """Paired images (T = 1) or time-lapse stacks, split by name (one stack: split in time).
    With a ``profile`` the low frames go through its conversion, as recordings do."""
    assert cfg.folder is not None
    stacks = cfg.kind == "stacks"
    files = pair_files(Path(cfg.folder))
    convert = _profile_conversion(cfg.profile)
    series: list[Series] = []
    fits: dict[str, tuple[float, float]] = {}
    for i, pair in enumerate(files):
        name, low_path, high_path = pair.name, pair.low, pair.high
        low, high = read_pair(pair)
        dims = 3 if stacks else 2
        need = "(T, H, W) stacks" if stacks else "2-D images (kind='stacks' for time-lapse)"
        for what, path, a in (("low", low_path, low), ("high", high_path, high)):
            if a.ndim != dims:
                raise ValueError(
                    f"{what}/{path.name} has shape {a.shape}: kind={cfg.kind!r} needs {need}"
                )
        if stacks and len(low) != len(high):
            raise ValueError(
                f"stacks {name!r} differ in length: low has {len(low)} frames, high has "
                f"{len(high)}; give both the same time points"
            )
        want = (low.shape[-2] * scale, low.shape[-1] * scale)
        if high.shape[-2:] != want:
            raise ValueError(
                f"high/{high_path.name} is {high.shape[-2]}x{high.shape[-1]} but low/"
                f"{low_path.name} is {low.shape[-2]}x{low.shape[-1]}: for scale={scale} the high "
                f"image must be {want[0]}x{want[1]} (`scopecast calibrate register --upsample "
                f"{scale}`)"
            )
        high = np.asarray(high, np.float32).reshape(-1, 1, *want)
        if not np.isfinite(high).all():  # float64 values beyond float32's range
            raise ValueError(f"high/{high_path.name} has NaN or inf values: crop or replace them")
        low = convert(low.reshape(-1, 1, *low.shape[-2:]))
        if cfg.match_intensity:
            picks = np.linspace(0, len(low) - 1, min(len(low), 8)).round().astype(int)
            a, b = match_intensity(low[picks, 0], high[picks, 0], scale, f"pair {name!r}")
            fits[name] = (a, b)
            high = high * np.float32(a) + np.float32(b)
        series.append(Series(low, dict(enumerate(high)), {"name": name}))
        if progress is not None:
            progress(i + 1, len(files))
    names = [s.meta["name"] for s in series]
    if stacks and len(series) == 1:
        length = len(series[0].low)
        n_val = 0 if cfg.val_fraction == 0 else round(cfg.val_fraction * length)
        n_val = min(length - 1, max(1 if cfg.val_fraction else 0, n_val))
        if cfg.val_fraction and length < 2:
            raise ValueError(
                f"stack {names[0]!r} has 1 frame: need 2 or more to hold some out for "
                "validation; add frames, or set val_fraction=0"
            )
        train = [(0, t) for t in range(length - n_val)]
        val = [(0, t) for t in range(length - n_val, length)]
    else:
        held = _split_names(names, cfg.val_fraction, cfg.seed, f"{cfg.kind} in {cfg.folder}")
        items = [(i, t) for i, s in enumerate(series) for t in range(len(s.low))]
        train = [(i, t) for i, t in items if names[i] not in held]
        val = [(i, t) for i, t in items if names[i] in held]
    info = {"kind": cfg.kind, "folder": str(cfg.folder), "intensity_fit": fits}
    return series, train, val, None, info
