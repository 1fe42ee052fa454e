"""Raw camera ADU <-> photo-electrons per pixel: the one conversion engines, the server, bench
and training share.

``to_electrons(adu) = (adu - offset_map) / (gain * flat_field)``, then every bad pixel (hot or
dead) replaced by the median of its good 3x3 neighbours; ``to_adu(electrons)`` is the inverse
(``electrons * gain * flat_field + offset_map``; a replaced bad pixel stays replaced). The
offset map carries column and pixel offsets (sCMOS fixed pattern); without one the camera's
scalar offset is used, without a flat field the flat is 1, without bad-pixel maps none are
replaced. Both take ``scale``: the frame is on a grid ``scale`` times finer than the maps
(a super-resolved output or its previous output), and every map is repeated onto it.

Electrons here are flat-corrected ("as if every pixel had the mean sensitivity"), so an engine
trained in electrons sees the same signal and noise on any camera whose noise lies in its
training range.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .camera import CameraParams
from .profile import CalibrationProfile

_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


@dataclass(frozen=True)
class _Grid:
    """The maps repeated onto one grid (``scale`` times finer than the recorded one)."""

    offset: np.ndarray | np.float32
    per_e: np.ndarray | np.float32  # ADU per electron (gain * flat)
    per_adu: np.ndarray | np.float32  # electrons per ADU (its reciprocal)


@dataclass(frozen=True, eq=False)
class Electrons:
    """One rig's ADU <-> electrons conversion (build it with :meth:`from_camera` or
    :meth:`from_profile`); ``source`` says where its numbers come from."""

    offset_adu: float
    gain_adu_per_electron: float
    offset_map: np.ndarray | None = None
    flat_field: np.ndarray | None = None
    bad_pixels: np.ndarray | None = None
    source: str = "camera"
    _grids: dict[int, _Grid] = field(default_factory=dict, repr=False, compare=False)
    _bad: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(
        default=None, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not (np.isfinite(self.gain_adu_per_electron) and self.gain_adu_per_electron > 0):
            raise ValueError(f"gain must be a finite number > 0, got {self.gain_adu_per_electron}")
        if not np.isfinite(self.offset_adu):
            raise ValueError(f"offset must be finite, got {self.offset_adu}")
        shapes = {
            name: np.shape(a)
            for name, a in (
                ("offset_map", self.offset_map),
                ("flat_field", self.flat_field),
                ("bad_pixels", self.bad_pixels),
            )
            if a is not None
        }
        if any(len(s) != 2 for s in shapes.values()) or len(set(shapes.values())) > 1:
            raise ValueError(f"the maps must be 2-D and of one shape, got {shapes}")
        for name in ("offset_map", "flat_field"):
            a = getattr(self, name)
            if a is not None:
                a = np.asarray(a, np.float32)
                if not np.isfinite(a).all():
                    raise ValueError(f"{name} holds NaN or inf: recalibrate the camera")
                object.__setattr__(self, name, a)
        bad = None if self.bad_pixels is None else np.asarray(self.bad_pixels, bool)
        flat = self.flat_field
        if flat is not None and (flat <= 0).any():  # a dead pixel's flat: never divide by it
            dark = flat <= 0
            bad = dark if bad is None else bad | dark
            object.__setattr__(self, "flat_field", np.where(dark, np.float32(1), flat))
        object.__setattr__(self, "bad_pixels", bad if bad is not None and bad.any() else None)
        if self.bad_pixels is not None:
            object.__setattr__(self, "_bad", _bad_neighbours(self.bad_pixels))

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_camera(
        cls, offset_adu: float | CameraParams, gain_adu_per_electron: float | None = None,
        *, source: str = "camera",
    ) -> Electrons:  # fmt: skip
        """A scalar conversion: a camera's offset and gain (``CameraParams`` or two numbers)."""
        if isinstance(offset_adu, CameraParams):
            camera = offset_adu
            return cls(camera.offset_adu, camera.gain_adu_per_electron, source=source)
        if gain_adu_per_electron is None:
            raise ValueError("from_camera takes CameraParams, or an offset and a gain")
        return cls(float(offset_adu), float(gain_adu_per_electron), source=source)

    @classmethod
    def from_profile(cls, profile: CalibrationProfile) -> Electrons:
        """The rig's conversion: its camera's gain and offset, its offset map (column and pixel
        offsets), flat field and hot and dead pixels where the profile has them."""
        hot, dead = profile.array("hot_pixels"), profile.array("dead_pixels")
        bad = None
        for mask in (hot, dead):
            if mask is not None:
                bad = np.asarray(mask, bool) if bad is None else bad | np.asarray(mask, bool)
        return cls(
            profile.camera.offset_adu,
            profile.camera.gain_adu_per_electron,
            offset_map=profile.array("offset_map"),
            flat_field=profile.array("flat_field"),
            bad_pixels=bad,
            source=f"profile {profile.rig!r}",
        )

    # -- the conversion --------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int] | None:
        """The recorded grid of the maps; None for a scalar conversion (any shape)."""
        for a in (self.offset_map, self.flat_field, self.bad_pixels):
            if a is not None:
                return (int(a.shape[0]), int(a.shape[1]))
        return None

    def describe(self) -> str:
        """One line: where the numbers come from and what they are."""
        maps = [
            n for n in ("offset_map", "flat_field", "bad_pixels") if getattr(self, n) is not None
        ]
        extra = f", {', '.join(maps)} {self.shape}" if maps else ""
        return (
            f"{self.source}: offset {self.offset_adu:g} ADU, gain "
            f"{self.gain_adu_per_electron:g} ADU/e-{extra}"
        )

    def to_electrons(self, adu: np.ndarray, *, scale: int = 1) -> np.ndarray:
        """Raw ADU (..., H, W) -> float32 photo-electrons per pixel, bad pixels replaced."""
        g = self._grid(np.shape(adu), scale)
        e = np.asarray(adu, dtype=np.float32) - g.offset
        e *= g.per_adu
        if self._bad is not None and scale == 1:
            _replace_bad(e, self._bad)
        return e

    def to_adu(self, electrons: np.ndarray, *, scale: int = 1) -> np.ndarray:
        """Photo-electrons per pixel (..., H, W) -> float32 ADU (not rounded or clipped)."""
        g = self._grid(np.shape(electrons), scale)
        adu = np.asarray(electrons, dtype=np.float32) * g.per_e
        adu += g.offset
        return adu

    def _grid(self, shape: tuple[int, ...], scale: int) -> _Grid:
        if len(shape) < 2:
            raise ValueError(f"frames must be at least 2-D (..., H, W), got shape {shape}")
        if not (isinstance(scale, int | np.integer) and scale >= 1):
            raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
        own = self.shape
        if own is not None and tuple(shape[-2:]) != (own[0] * scale, own[1] * scale):
            raise ValueError(
                f"frame of shape {tuple(shape[-2:])} does not fit the calibration maps "
                f"{own} (x{scale}): calibrate the camera at this ROI and binning, or serve "
                "without --profile"
            )
        grid = self._grids.get(int(scale))
        if grid is None:
            grid = self._make_grid(int(scale))
            self._grids[int(scale)] = grid
        return grid

    def _make_grid(self, scale: int) -> _Grid:
        def up(a: np.ndarray) -> np.ndarray:
            return a if scale == 1 else np.repeat(np.repeat(a, scale, 0), scale, 1)

        gain = np.float32(self.gain_adu_per_electron)
        offset = np.float32(self.offset_adu) if self.offset_map is None else up(self.offset_map)
        if self.flat_field is None:
            return _Grid(offset, gain, np.float32(1.0 / self.gain_adu_per_electron))
        per_e = up(self.flat_field) * gain
        return _Grid(offset, per_e, (np.float32(1) / per_e).astype(np.float32))


def _bad_neighbours(bad: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every bad pixel: its flat index, its 8 neighbours' flat indices, which are usable."""
    h, w = bad.shape
    ys, xs = np.nonzero(bad)
    ny = ys[:, None] + np.array([d[0] for d in _NEIGHBOURS])
    nx = xs[:, None] + np.array([d[1] for d in _NEIGHBOURS])
    inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
    ny, nx = np.clip(ny, 0, h - 1), np.clip(nx, 0, w - 1)
    ok = inside & ~bad[ny, nx]
    return ys * w + xs, ny * w + nx, ok


def _replace_bad(e: np.ndarray, bad: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """Each bad pixel of ``e`` (..., H, W) in place: the median of its good 3x3 neighbours (the
    frame's median where it has none)."""
    where, neighbours, ok = bad
    flat = e.reshape(-1, e.shape[-2] * e.shape[-1])
    for plane in flat:
        values = np.where(ok, plane[neighbours], np.nan)
        none = ~ok.any(axis=1)
        if none.any():
            values[none, 0] = np.median(plane)
        plane[where] = np.nanmedian(values, axis=1)
