"""Named held-out rigs: cameras and optics unlike a preset's own, for testing engines beyond the
rig they were trained on. Torch-free; ``bench quality --rig`` and ``bench real-pairs --rig``
read this one table.

:data:`RIGS` maps a name to a :class:`RigSpec`: what differs from the preset's own fast scan
(camera gain, offset, read noise, a fixed per-column offset pattern, PSF width, the photon budget
at the brightest pixel, the scan's line phase); anything a spec leaves at None is the preset's.
:func:`resolve_rig` also takes :data:`OWN_RIG` (the preset's own rig, what training uses by
default) and the path of a saved calibration profile (``calibration.profile``): its camera, PSF
width, scan and offset map (column and pixel offsets) record the frames.

A spec becomes a :class:`~calibration.sim.randomize.RigDraw` for one preset (:meth:`RigSpec.draw`)
that :class:`~calibration.sim.pairs.PairRig` records with, and a
:class:`~calibration.profile.CalibrationProfile` (:func:`rig_profile`) describing exactly what
was simulated: the profile a user of that rig would have measured, which converts its ADU to
electrons (``calibration.units.Electrons.from_profile``) as ``serve --profile`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from calibration.errors import CalibrationError
from calibration.forward import ForwardModel
from calibration.optics import psf_sigma_um
from calibration.profile import PROFILE, CalibrationProfile

from .pairs import PairRig
from .randomize import RigDraw
from .scene import Preset

RIG_PROFILE = "profile"
"""The folder, beside a pair folder's low/ and high/, holding the calibration profile of the rig
that recorded its pairs (``bench real-pairs --rig``)."""
OWN_RIG = "preset"
"""``--rig preset``: the preset's own camera and optics (the training default), no RigDraw."""


@dataclass(frozen=True)
class RigSpec:
    """One held-out rig, relative to a preset's fast scan (None: the preset's value).

    ``column_sd_adu`` draws a fixed per-column offset pattern (Gaussian, this sd, seeded by
    ``column_seed``: the same pattern every run) on top of the offset, as
    :meth:`RigDraw.offset_map` does; ``psf_scale`` widens the PSF (sigma ~ lambda / NA; the
    wavelength is scaled); ``peak_photons`` sets the specimen's brightness so that the scored
    frame's brightest pixel expects that many photons. ``profile`` (from a saved calibration
    profile) replaces the camera, PSF width, scan and offset map with the profile's."""

    name: str
    doc: str
    gain_adu_per_electron: float | None = None
    offset_adu: float | None = None
    read_noise_e: float | None = None
    column_sd_adu: float = 0.0
    column_seed: int = 0
    psf_scale: float = 1.0
    peak_photons: float | None = None
    bidirectional: bool | None = None
    phase_px: float | None = None
    profile: CalibrationProfile | None = field(default=None, compare=False, repr=False)
    source: str | None = None
    """Where a profile rig came from (its path)."""

    def __post_init__(self) -> None:
        for name in ("gain_adu_per_electron", "peak_photons"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"rig {self.name!r}: {name} must be > 0, got {v}")
        for name in ("offset_adu", "read_noise_e", "column_sd_adu"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise ValueError(f"rig {self.name!r}: {name} must be >= 0, got {v}")
        if not (math.isfinite(self.psf_scale) and self.psf_scale > 0):
            raise ValueError(f"rig {self.name!r}: psf_scale must be > 0, got {self.psf_scale}")

    def draw(self, fast: ForwardModel) -> RigDraw:
        """This rig around a preset's fast-scan forward model ``fast``."""
        if self.profile is not None:
            p = self.profile
            return _ProfileDraw(
                camera=p.camera,
                psf_scale=psf_sigma_um(p.optics) / psf_sigma_um(fast.optics),
                bidirectional=p.scan.bidirectional,
                phase_px=p.scan.phase_px,
                peak_photons=self.peak_photons,
                offsets=p.array("offset_map"),
            )
        update = {k: v for k, v in (("gain_adu_per_electron", self.gain_adu_per_electron),
                                    ("offset_adu", self.offset_adu),
                                    ("read_noise_electrons", self.read_noise_e))
                  if v is not None}  # fmt: skip
        return RigDraw(
            camera=fast.camera.model_copy(update=update),
            psf_scale=self.psf_scale,
            bidirectional=self.bidirectional,
            phase_px=self.phase_px,
            column_sd_adu=self.column_sd_adu,
            column_seed=self.column_seed,
            peak_photons=self.peak_photons,
        )

    def describe(self) -> dict[str, Any]:
        """The definition as plain JSON values (for results and manifests)."""
        if self.profile is not None:
            p = self.profile
            offsets = p.array("offset_map")
            return {"name": self.name, "source": self.source, "camera": p.camera.model_dump(),
                    "psf_sigma_um": psf_sigma_um(p.optics), "bidirectional": p.scan.bidirectional,
                    "phase_px": p.scan.phase_px,
                    "offset_map": None if offsets is None else list(offsets.shape),
                    "doc": self.doc}  # fmt: skip
        skip = {"profile", "doc"}
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        out = {k: v for k, v in out.items() if v is not None}
        out["doc"] = self.doc
        return out

    @classmethod
    def from_profile(cls, path: Path) -> RigSpec:
        """A rig from a saved calibration profile (its folder or ``profile.json``).

        Its camera, PSF width (``optics``: 0.21 lambda / NA), scan (line phase) and offset map
        record the frames; the preset's specimen, pixel size and photons stay. A flat field or
        hot/dead-pixel maps are not simulated, so they are left out of the rig's conversion too
        (said in :attr:`doc`)."""
        try:
            profile = CalibrationProfile.load(Path(path))
        except CalibrationError as e:
            raise ValueError(str(e)) from None
        left_out = [n for n in ("flat_field", "hot_pixels", "dead_pixels")
                    if profile.array(n) is not None]  # fmt: skip
        note = f"; not simulated, so left out: {', '.join(left_out)}" if left_out else ""
        cam = profile.camera
        offsets = profile.array("offset_map")
        pattern = "" if offsets is None else f", offset map {offsets.shape[0]}x{offsets.shape[1]}"
        doc = (f"calibration profile {profile.rig!r} ({path}): gain {cam.gain_adu_per_electron:g} "
               f"ADU/e-, offset {cam.offset_adu:g} ADU, read noise {cam.read_noise_electrons:g} "
               f"e-{pattern}, PSF sigma {psf_sigma_um(profile.optics):.3g} um{note}")  # fmt: skip
        kept = profile.with_arrays(flat_field=None, hot_pixels=None, dead_pixels=None,
                                   read_noise_map=None, background=None)  # fmt: skip
        return cls(name=profile.rig, doc=doc, profile=kept, source=str(path))


@dataclass(frozen=True, eq=False)
class _ProfileDraw(RigDraw):
    """A rig whose offsets are a measured map: the centre of it, cut to the frame's shape."""

    offsets: np.ndarray | None = None

    def offset_map(self, shape: tuple[int, int]) -> np.ndarray | None:
        if self.offsets is None:
            return None
        h, w = self.offsets.shape
        if h < shape[0] or w < shape[1]:
            raise ValueError(
                f"the profile's offset map is {h}x{w}, smaller than the {shape[0]}x{shape[1]} "
                "raw px the rig records (the field plus its PSF margin): use a smaller --field"
            )
        y, x = (h - shape[0]) // 2, (w - shape[1]) // 2
        return np.array(self.offsets[y : y + shape[0], x : x + shape[1]], np.float32)


RIGS: dict[str, RigSpec] = {
    spec.name: spec
    for spec in (
        RigSpec(
            "scmos-columns",
            "sCMOS-like camera with a fixed column pattern: gain 1.5 ADU/e-, offset 200 ADU, read "
            "noise 1.4 e-, and per-column offsets drawn Gaussian with sd 6 ADU (4 e-; seed 17, "
            "the same pattern every run); the preset's optics and photons.",
            gain_adu_per_electron=1.5,
            offset_adu=200.0,
            read_noise_e=1.4,
            column_sd_adu=6.0,
            column_seed=17,
        ),
        RigSpec(
            "gain2-offset100",
            "Another camera, no fixed pattern: gain 2 ADU/e-, offset 100 ADU, read noise 1.5 e- "
            "(confocal-20fps records at 8 ADU/e-, 50 ADU, 0.3 e-); the preset's optics and "
            "photons.",
            gain_adu_per_electron=2.0,
            offset_adu=100.0,
            read_noise_e=1.5,
        ),
        RigSpec(
            "wide-psf-dim",
            "Wider PSF and fewer photons: PSF sigma 1.3x the preset's (a lower NA or a redder "
            "dye) and 12 photons expected at the brightest pixel of the scored frame; the "
            "preset's camera.",
            psf_scale=1.3,
            peak_photons=12.0,
        ),
        RigSpec(
            "bright-sharp",
            "Narrower PSF and more light on a noisier camera: PSF sigma 0.9x, 200 photons at the "
            "brightest pixel, gain 4 ADU/e-, offset 400 ADU, read noise 2.5 e-, a "
            "unidirectional scan (no line phase).",
            gain_adu_per_electron=4.0,
            offset_adu=400.0,
            read_noise_e=2.5,
            psf_scale=0.9,
            peak_photons=200.0,
            bidirectional=False,
        ),
    )
}
"""The named held-out rigs, each unlike the presets' own cameras and optics."""


def resolve_rig(text: str) -> RigSpec | None:
    """A ``--rig`` value: :data:`OWN_RIG` (None: the preset's own rig), a name in :data:`RIGS`,
    or the path of a saved calibration profile (folder or ``profile.json``); ValueError
    otherwise, naming the choices."""
    if text == OWN_RIG:
        return None
    if text in RIGS:
        return RIGS[text]
    path = Path(text).expanduser()
    if (path.is_dir() and (path / PROFILE).is_file()) or path.is_file():
        return RigSpec.from_profile(path)
    raise ValueError(
        f"unknown rig {text!r}: use one of {', '.join([OWN_RIG, *RIGS])} or the path of a saved "
        "calibration profile (`scopecast calibrate camera --profile DIR` writes one)"
    )


def describe_rig(spec: RigSpec | None, preset: Preset) -> dict[str, Any]:
    """A rig's definition as plain JSON values; None: the preset's own rig."""
    if spec is not None:
        return spec.describe()
    cam = preset.camera
    return {"name": OWN_RIG, "doc": f"{preset.name}'s own camera and optics (the training "
            f"default): gain {cam.gain_adu_per_electron:g} ADU/e-, offset {cam.offset_adu:g} ADU, "
            f"read noise {cam.read_noise_electrons:g} e-"}  # fmt: skip


def recorded_offset_map(rig: PairRig, draw: RigDraw) -> np.ndarray | None:
    """The offset map (column and pixel offsets) of the frames ``rig.low(..., rig=draw)``
    records: the draw's map of the rendered field, margin included, with the margin cut off.
    None without one (the camera's scalar offset)."""
    m = rig.margin
    full = draw.offset_map((rig.shape[0] + 2 * m, rig.shape[1] + 2 * m))
    return None if full is None else np.ascontiguousarray(rig.crop(full, 1))


def rig_profile(name: str, fast: ForwardModel, draw: RigDraw | None, pixel_size_um: float,
                offset_map: np.ndarray | None = None) -> CalibrationProfile:  # fmt: skip
    """The calibration profile of a simulated rig: the draw's camera and the fast scan's optics
    and scan as the draw changes them (no draw: the fast scan's own rig), ``pixel_size_um`` and
    the ``offset_map`` of the recorded frames (:func:`recorded_offset_map`). What a user of
    that rig would have measured; ``Electrons.from_profile`` of it is the rig's conversion."""
    model = fast if draw is None else draw.model(fast)
    profile = CalibrationProfile(rig=name, pixel_size_um=pixel_size_um, camera=model.camera,
                                 optics=model.optics, scan=model.scan,
                                 measured={"simulated": "calibration.sim.rigs"})  # fmt: skip
    return profile.with_arrays(offset_map=offset_map)


__all__ = ["OWN_RIG", "RIGS", "RIG_PROFILE", "RigSpec", "describe_rig", "recorded_offset_map",
           "resolve_rig", "rig_profile"]  # fmt: skip
