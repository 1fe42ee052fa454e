"""Synthetic cell label time-lapses: a seeded population of moving, deforming, dividing cells
rendered as label images, with their lineage (``scopecast synthesize masks``). Torch-free.

The model, in one paragraph. A cell is a centre, an adult radius drawn from a log-normal
distribution, an elongated outline (an area-preserving ellipse of aspect ``alpha`` turned by
``theta``) wrinkled by random Fourier harmonics of orders 2..K, a velocity and a cell-cycle
phase. Cells live in a *domain*: the field of view plus a margin wide enough that a cell whose
centre leaves the domain is no longer visible; cells drifting out are removed, and new cells are
placed in the margin whenever the domain holds less cell area than the density target asks for,
so cells enter and leave through the field's borders. Every frame is a partition: each pixel
goes to the cell with the smallest *normalized distance* (distance from the centre over the
outline's radius in that direction), if that distance is at most a global scale ``g``; so
touching cells share a border and never overlap, and ``g`` is chosen per frame as the quantile
of the normalized-distance map that covers exactly the requested fraction of the field. Between
frames a cell moves by a persistent random walk plus a soft repulsion from overlapping
neighbours (together clipped to ``max_step_um``), then by the global drift and the field's
rotation; its outline turns (``spin_deg``) and deforms (an Ornstein-Uhlenbeck process on the
harmonics). With divisions on, a cell's area grows as ``2**(phase - 1/2)`` times its adult area
while its phase advances by one cell cycle (log-normal length around ``cycle_frames``), slowed
when the domain is crowded (contact inhibition); at phase 1 it splits across its long axis into
two daughters of half its area, with new ids and their parent recorded.

Labels are track segments, as in the Cell Tracking Challenge: a label stays on one cell for as
long as the cell is visible in consecutive frames; a daughter gets a new label whose parent is
the mother's label; a cell that leaves the field and comes back gets a new label whose parent
is its previous one. ``res_track.txt`` (``L B E P``) and ``tracks.csv`` are computed from the
label images themselves, so they always agree with them.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import tifffile
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.spatial import cKDTree
from skimage.measure import label as connected_components

__all__ = [
    "FrameStats",
    "MaskMovie",
    "MaskParams",
    "Track",
    "read_lineage",
    "synthesize_masks",
    "write_masks",
]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

G_MIN, G_MAX = 0.6, 1.6
"""The range of the per-frame outline scale ``g``; outside it the density target is missed
(reported per frame) rather than cells drawn at absurd sizes."""
_RADIUS_CLIP_SIGMAS = 2.5
_MIN_RADIUS_PX = 2.0
_NO_CELL = np.iinfo(np.int64).max
_Q_BITS = 24
_IDX_BITS = 32
_REPULSION = 0.3
"""Fraction of a pair's overlap removed per frame (each cell moves half of it)."""
_CROWDED = 0.15
"""Contact inhibition: the cell cycle stops when the domain holds (1 + this) times the target
cell area, and runs at full speed at or below the target."""


class MaskParams(BaseModel):
    """Everything that shapes a synthetic label time-lapse; lengths in micrometres, rates per
    frame. The same parameters and seed give the same movie, bit for bit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    frames: int = Field(50, ge=1, le=100_000, description="Number of frames (T).")
    height: int = Field(256, ge=16, le=16_384, description="Field height in pixels (Y).")
    width: int = Field(256, ge=16, le=16_384, description="Field width in pixels (X).")
    pixel_um: float = Field(0.65, gt=0, le=100, description="Pixel size in µm.")
    interval_s: float = Field(60.0, gt=0, description="Time between frames (metadata only).")
    density: float = Field(
        0.5, gt=0, le=0.95, description="Fraction of the field covered by cells (0.9: confluent)."
    )
    radius_um: float = Field(6.0, gt=0, description="Median adult cell radius (area-equivalent).")
    radius_cv: float = Field(0.2, ge=0, le=0.6, description="Log-normal sigma of the radius.")
    elongation: float = Field(1.3, ge=1, le=4, description="Typical aspect ratio (long/short).")
    irregularity: float = Field(
        0.08, ge=0, le=0.3, description="Outline wrinkle: rms of the 2nd harmonic's amplitude."
    )
    harmonics: int = Field(5, ge=2, le=12, description="Highest Fourier order of the outline.")
    deformation: float = Field(
        0.05, ge=0, le=1, description="Fraction of the outline's wrinkle renewed per frame."
    )
    speed_um: float = Field(0.5, ge=0, description="RMS random-walk speed per frame.")
    persistence: float = Field(0.8, ge=0, lt=1, description="Velocity memory from frame to frame.")
    max_step_um: float | None = Field(
        None,
        gt=0,
        description="Largest own step per frame (walk + repulsion); default max(3 speed, r/4).",
    )
    drift_um: tuple[float, float] = Field(
        (0.0, 0.0), description="Global drift (dy, dx) per frame, added to every cell."
    )
    rotation_deg: float = Field(
        0.0, ge=-10, le=10, description="Rotation of the whole field about its centre per frame."
    )
    spin_deg: float = Field(2.0, ge=0, le=30, description="RMS turn of a cell's outline per frame.")
    divisions: bool = Field(True, description="Cells grow and divide.")
    cycle_frames: float = Field(60.0, ge=4, description="Median cell-cycle length in frames.")
    cycle_cv: float = Field(0.2, ge=0, le=1, description="Log-normal sigma of the cycle length.")
    seed: int = Field(0, ge=0, description="Seed of the random generator.")

    @model_validator(mode="after")
    def _consistent(self) -> MaskParams:
        r_px = self.radius_px
        if r_px < _MIN_RADIUS_PX:
            raise ValueError(
                f"radius_um={self.radius_um:g} is {r_px:.2g} px at pixel_um={self.pixel_um:g}; a "
                f"cell needs a radius of at least {_MIN_RADIUS_PX:g} px: raise radius_um or "
                "lower pixel_um"
            )
        if r_px > min(self.height, self.width) / 4:
            raise ValueError(
                f"radius_um={self.radius_um:g} is {r_px:.1f} px, more than a quarter of the "
                f"{self.height}x{self.width} field: the field would hold a handful of cells; "
                "lower radius_um, raise pixel_um or make the field larger"
            )
        drift = math.hypot(*self.drift_um)
        if drift > self.radius_um:
            raise ValueError(
                f"drift_um={self.drift_um} moves every cell {drift:.3g} µm per frame, more than "
                f"radius_um={self.radius_um:g}: cells could not be followed from frame to frame; "
                "lower the drift"
            )
        corner_um = math.hypot(self.height, self.width) / 2 * self.pixel_um
        turn_um = corner_um * 2 * math.sin(math.radians(abs(self.rotation_deg)) / 2)
        if turn_um > self.radius_um:
            raise ValueError(
                f"rotation_deg={self.rotation_deg:g} moves the field's corners {turn_um:.3g} µm "
                f"per frame, more than radius_um={self.radius_um:g}; lower the rotation"
            )
        if self.max_step_um is not None and self.max_step_um > 2 * self.radius_um:
            raise ValueError(
                f"max_step_um={self.max_step_um:g} is more than a cell diameter "
                f"(2 x radius_um={2 * self.radius_um:g}); lower it"
            )
        return self

    @property
    def radius_px(self) -> float:
        return self.radius_um / self.pixel_um

    @property
    def step_um(self) -> float:
        """The largest own step of a cell per frame (random walk plus repulsion)."""
        if self.max_step_um is not None:
            return self.max_step_um
        return max(3.0 * self.speed_um, self.radius_um / 4)

    def step_bound_um(self, distance_um: float) -> float:
        """The most a cell's centre moves in one frame at ``distance_um`` from the field's
        centre: its own step, the drift and the arc of the field's rotation."""
        turn = 2 * math.sin(math.radians(abs(self.rotation_deg)) / 2) * distance_um
        return self.step_um + math.hypot(*self.drift_um) + turn


@dataclass(frozen=True)
class Track:
    """One label's life in the movie (a Cell Tracking Challenge ``L B E P`` line): present in
    every frame from ``begin`` to ``end``; ``parent`` is 0 for none. ``kind``: ``start`` (there
    at frame 0), ``entered`` (came in through a border), ``division`` (a daughter) or
    ``reentry`` (the same cell back after leaving the field; its parent is its previous label)."""

    label: int
    begin: int
    end: int
    parent: int
    kind: Literal["start", "entered", "division", "reentry"] = "start"
    cell: int = 0


@dataclass(frozen=True)
class FrameStats:
    """What one frame came out as: the covered fraction, the outline scale ``g`` that gave it,
    and the number of labels."""

    t: int
    density: float
    scale: float
    cells: int


@dataclass
class MaskMovie:
    """A synthetic label time-lapse: ``labels`` (T, Y, X) uint32, the tracks table rows and the
    lineage, all in agreement with each other."""

    params: MaskParams
    labels: NDArray[np.uint32]
    tracks: list[Track]
    table: NDArray[np.void]
    frames: list[FrameStats] = field(default_factory=list)
    divisions: int = 0

    @property
    def cells(self) -> int:
        """Distinct physical cells seen in the movie (a re-entering cell counts once)."""
        return len({tr.cell for tr in self.tracks})

    @property
    def mean_density(self) -> float:
        return float(np.mean([f.density for f in self.frames])) if self.frames else 0.0


TABLE_DTYPE = np.dtype(
    [
        ("id", np.uint32),
        ("t", np.int32),
        ("y", np.float64),
        ("x", np.float64),
        ("area", np.int64),
        ("parent", np.uint32),
    ]
)
"""tracks.csv: one row per label per frame; y, x: centroid in pixels (row, column); area in
pixels; parent: the label's parent (0: none)."""


# -- the population -----------------------------------------------------------------------------


@dataclass
class _Cells:
    """The population as parallel arrays (one entry per cell in the domain)."""

    uid: IntArray
    parent: IntArray
    y: FloatArray
    x: FloatArray
    vy: FloatArray
    vx: FloatArray
    radius: FloatArray
    """adult area-equivalent radius, px"""
    phase: FloatArray
    cycle: FloatArray
    theta: FloatArray
    spin: FloatArray
    alpha: FloatArray
    alpha_target: FloatArray
    wrinkle: NDArray[np.complex128]
    """(n, K-1): complex amplitude of outline harmonics 2..K"""

    def __len__(self) -> int:
        return len(self.uid)

    def take(self, keep: NDArray[np.bool_] | IntArray) -> _Cells:
        return _Cells(**{k: v[keep] for k, v in vars(self).items()})

    def extend(self, other: _Cells) -> _Cells:
        return _Cells(**{k: np.concatenate([v, getattr(other, k)]) for k, v in vars(self).items()})


class _Simulator:
    """Steps the population from frame to frame and renders each frame's partition."""

    def __init__(self, p: MaskParams) -> None:
        self.p = p
        self.rng = np.random.default_rng(p.seed)
        self.r_px = p.radius_px
        self.sigma_k = p.irregularity / np.arange(1, p.harmonics, dtype=np.float64)
        r_max = self.r_px * math.exp(_RADIUS_CLIP_SIGMAS * p.radius_cv) * math.sqrt(2.0)
        reach = r_max * math.sqrt(self._alpha_max) * self._wrinkle_max
        self.margin = math.ceil(G_MAX * reach) + 2
        self.dom_h = p.height + 2 * self.margin
        self.dom_w = p.width + 2 * self.margin
        self.capacity = p.density * self.dom_h * self.dom_w
        self.center = (self.margin + (p.height - 1) / 2, self.margin + (p.width - 1) / 2)
        self.step_px = p.step_um / p.pixel_um
        self.drift_px = (p.drift_um[0] / p.pixel_um, p.drift_um[1] / p.pixel_um)
        self.next_uid = 1
        self.divided = 0
        self.g = G_MAX
        self.cells = self._new_cells(0)
        self._populate()

    # -- drawing cells

    @property
    def _alpha_max(self) -> float:
        return 1 + (self.p.elongation - 1) * math.exp(2 * 0.3)

    @property
    def _wrinkle_max(self) -> float:
        return 1 + 3 * float(np.sqrt(np.sum(self.sigma_k**2)))

    def _draw_alpha(self, n: int) -> FloatArray:
        a = 1 + (self.p.elongation - 1) * np.exp(np.clip(0.3 * self.rng.standard_normal(n), -2, 2))
        return np.minimum(a, self._alpha_max)

    def _draw_wrinkle(self, n: int) -> NDArray[np.complex128]:
        shape = (n, len(self.sigma_k))
        w = np.empty(shape, dtype=np.complex128)
        w.real = self.rng.standard_normal(shape)
        w.imag = self.rng.standard_normal(shape)
        return self._clip_wrinkle(w * (self.sigma_k / math.sqrt(2)))

    def _clip_wrinkle(self, w: NDArray[np.complex128]) -> NDArray[np.complex128]:
        """Keep the summed harmonic amplitude within the bound the margin was sized for."""
        total = np.abs(w).sum(axis=1)
        limit = self._wrinkle_max - 1
        scale = np.where(total > limit, limit / np.maximum(total, 1e-12), 1.0)
        return w * scale[:, None]

    def _draw_cycle(self, n: int) -> FloatArray:
        z = np.clip(self.rng.standard_normal(n), -_RADIUS_CLIP_SIGMAS, _RADIUS_CLIP_SIGMAS)
        return np.maximum(self.p.cycle_frames * np.exp(self.p.cycle_cv * z), 2.0)

    def _draw_radius(self, n: int) -> FloatArray:
        z = np.clip(self.rng.standard_normal(n), -_RADIUS_CLIP_SIGMAS, _RADIUS_CLIP_SIGMAS)
        return self.r_px * np.exp(self.p.radius_cv * z)

    def _new_cells(
        self, n: int, y: FloatArray | None = None, x: FloatArray | None = None
    ) -> _Cells:
        p, rng = self.p, self.rng
        uid = np.arange(self.next_uid, self.next_uid + n, dtype=np.int64)
        self.next_uid += n
        alpha = self._draw_alpha(n)
        v = rng.standard_normal((2, n)) * (p.speed_um / p.pixel_um / math.sqrt(2))
        return _Cells(
            uid=uid,
            parent=np.zeros(n, dtype=np.int64),
            y=rng.uniform(0, self.dom_h, n) if y is None else y,
            x=rng.uniform(0, self.dom_w, n) if x is None else x,
            vy=v[0],
            vx=v[1],
            radius=self._draw_radius(n),
            phase=rng.uniform(0, 1, n) if p.divisions else np.full(n, 0.5),
            cycle=self._draw_cycle(n),
            theta=rng.uniform(0, 2 * math.pi, n),
            spin=rng.standard_normal(n) * math.radians(p.spin_deg),
            alpha=alpha,
            alpha_target=alpha.copy(),
            wrinkle=self._draw_wrinkle(n),
        )

    def _current_radius(self, c: _Cells) -> FloatArray:
        """Area-equivalent radius now: adult radius times sqrt(2 ** (phase - 1/2))."""
        if not self.p.divisions:
            return c.radius
        return c.radius * np.exp2((c.phase - 0.5) / 2)

    def _mass(self, c: _Cells) -> float:
        return float(np.sum(math.pi * self._current_radius(c) ** 2))

    def _populate(self) -> None:
        """Cells at random until the field, then the margin, hold their share of cell area
        (the field's count is then right from the first frame, not only on average); then
        spread apart."""
        p, m = self.p, self.margin

        def in_field(n: int) -> tuple[FloatArray, FloatArray]:
            return self.rng.uniform(m, m + p.height, n), self.rng.uniform(m, m + p.width, n)

        def in_margin(n: int) -> tuple[FloatArray, FloatArray]:
            y, x = self.rng.uniform(0, self.dom_h, 4 * n), self.rng.uniform(0, self.dom_w, 4 * n)
            out = ~((y >= m) & (y < m + p.height) & (x >= m) & (x < m + p.width))
            return y[out][:n], x[out][:n]

        field_share = p.density * p.height * p.width
        self.cells = self._fill(self._new_cells(0), field_share, in_field)
        self.cells = self._fill(self.cells, self.capacity, in_margin)
        for _ in range(40):
            dy, dx = self._repulsion(self.cells, strength=0.5)
            self.cells.y += dy
            self.cells.x += dx
            np.clip(self.cells.y, 0, self.dom_h - 1e-6, out=self.cells.y)
            np.clip(self.cells.x, 0, self.dom_w - 1e-6, out=self.cells.x)

    def _fill(
        self,
        cells: _Cells,
        target: float,
        where: Callable[[int], tuple[FloatArray, FloatArray]],
    ) -> _Cells:
        """``cells`` plus new ones placed by ``where`` until their area reaches ``target``,
        overshooting by at most half the last cell."""
        mean_area = math.pi * self.r_px**2 * math.exp(2 * self.p.radius_cv**2)
        before = len(cells)
        while self._mass(cells) < target:
            n = max(1, math.ceil((target - self._mass(cells)) / mean_area))
            y, x = where(n)
            cells = cells.extend(self._new_cells(len(y), y=y, x=x))
        while len(cells) > max(before, 1) and (
            self._mass(cells) - target > math.pi * self._current_radius(cells)[-1] ** 2 / 2
        ):
            cells = cells.take(np.arange(len(cells) - 1))
        return cells

    # -- motion

    def _repulsion(self, c: _Cells, strength: float) -> tuple[FloatArray, FloatArray]:
        """Displacements that remove ``strength`` of every pair's disk overlap."""
        dy = np.zeros(len(c))
        dx = np.zeros(len(c))
        if len(c) < 2:
            return dy, dx
        r = self._current_radius(c)
        pts = np.column_stack([c.y, c.x])
        pairs = cKDTree(pts).query_pairs(2 * float(r.max()), output_type="ndarray")
        if len(pairs) == 0:
            return dy, dx
        i, j = pairs[:, 0], pairs[:, 1]
        ry, rx = c.y[j] - c.y[i], c.x[j] - c.x[i]
        dist = np.hypot(ry, rx)
        overlap = r[i] + r[j] - dist
        hit = overlap > 0
        i, j, ry, rx, dist, overlap = i[hit], j[hit], ry[hit], rx[hit], dist[hit], overlap[hit]
        safe = np.maximum(dist, 1e-9)
        push = strength * overlap / 2
        uy = np.where(dist > 1e-9, ry / safe, 1.0)
        ux = np.where(dist > 1e-9, rx / safe, 0.0)
        np.add.at(dy, i, -push * uy)
        np.add.at(dx, i, -push * ux)
        np.add.at(dy, j, push * uy)
        np.add.at(dx, j, push * ux)
        return dy, dx

    def step(self) -> None:
        """Advance the population by one frame."""
        p, rng, c = self.p, self.rng, self.cells
        n = len(c)
        # persistent random walk
        s = p.speed_um / p.pixel_um / math.sqrt(2) * math.sqrt(1 - p.persistence**2)
        c.vy = p.persistence * c.vy + s * rng.standard_normal(n)
        c.vx = p.persistence * c.vx + s * rng.standard_normal(n)
        ry, rx = self._repulsion(c, _REPULSION)
        my, mx = c.vy + ry, c.vx + rx
        norm = np.hypot(my, mx)
        clip = np.where(norm > self.step_px, self.step_px / np.maximum(norm, 1e-12), 1.0)
        c.y = c.y + my * clip + self.drift_px[0]
        c.x = c.x + mx * clip + self.drift_px[1]
        # the field turns about its centre
        if p.rotation_deg:
            a = math.radians(p.rotation_deg)
            cy, cx = self.center
            oy, ox = c.y - cy, c.x - cx
            c.y = cy + oy * math.cos(a) + ox * math.sin(a)
            c.x = cx - oy * math.sin(a) + ox * math.cos(a)
            c.theta = c.theta - a
            c.vy, c.vx = (
                c.vy * math.cos(a) + c.vx * math.sin(a),
                -c.vy * math.sin(a) + c.vx * (math.cos(a)),
            )
        # outlines turn and deform
        c.theta = c.theta + c.spin
        if p.deformation > 0 and len(self.sigma_k):
            fresh = self._draw_wrinkle(n)
            c.wrinkle = self._clip_wrinkle(
                math.sqrt(1 - p.deformation) * c.wrinkle + math.sqrt(p.deformation) * fresh
            )
        c.alpha = c.alpha + 0.1 * (c.alpha_target - c.alpha)
        if p.divisions:
            crowding = self._mass(c) / self.capacity
            speed = float(np.clip((1 + _CROWDED - crowding) / _CROWDED, 0.0, 1.0))
            c.phase = c.phase + speed / c.cycle
            self._divide()
        self._leave_and_enter()

    def _divide(self) -> None:
        c = self.cells
        ready = c.phase >= 1.0
        if not np.any(ready):
            return
        mothers = c.take(ready)
        m = len(mothers)
        self.divided += m
        keep = c.take(~ready)
        # two daughters per mother, along her long axis
        r_now = self._current_radius(mothers)  # phase ~1: sqrt(2) x adult area
        offset = r_now / math.sqrt(2) * 0.9
        uy, ux = np.sin(mothers.theta), np.cos(mothers.theta)
        sign = np.concatenate([np.ones(m), -np.ones(m)])
        y = np.tile(mothers.y, 2) + sign * np.tile(offset * uy, 2)
        x = np.tile(mothers.x, 2) + sign * np.tile(offset * ux, 2)
        d = self._new_cells(2 * m, y=y, x=x)
        d.parent = np.tile(mothers.uid, 2)
        d.radius = np.tile(mothers.radius, 2) * np.exp(0.05 * self.rng.standard_normal(2 * m))
        d.phase = np.zeros(2 * m)
        d.theta = np.tile(mothers.theta, 2)
        d.alpha = np.maximum(1.0, np.tile(mothers.alpha, 2) / 2)
        d.vy = np.tile(mothers.vy, 2)
        d.vx = np.tile(mothers.vx, 2)
        self.cells = keep.extend(d)

    def _leave_and_enter(self) -> None:
        c = self.cells
        inside = (c.y >= 0) & (c.y < self.dom_h) & (c.x >= 0) & (c.x < self.dom_w)
        self.cells = c.take(inside)
        deficit = self.capacity - self._mass(self.cells)
        new: list[_Cells] = []
        while deficit > 0:
            one = self._new_cells(1)
            area = float(math.pi * self._current_radius(one)[0] ** 2)
            if area / 2 > deficit:
                self.next_uid -= 1
                break
            one.y[:], one.x[:] = self._margin_spot(float(self._current_radius(one)[0]), new)
            new.append(one)
            deficit -= area
        for one in new:
            self.cells = self.cells.extend(one)

    def _margin_spot(self, radius: float, pending: list[_Cells]) -> tuple[float, float]:
        """The emptiest of a few random spots in the margin band around the field."""
        m, h, w = self.margin, self.p.height, self.p.width
        cand_y = self.rng.uniform(0, self.dom_h, 64)
        cand_x = self.rng.uniform(0, self.dom_w, 64)
        in_field = (cand_y > m) & (cand_y < m + h) & (cand_x > m) & (cand_x < m + w)
        cand_y, cand_x = cand_y[~in_field][:8], cand_x[~in_field][:8]
        if len(cand_y) == 0:
            return float(self.rng.uniform(0, m)), float(self.rng.uniform(0, self.dom_w))
        ys = np.concatenate([self.cells.y, *(o.y for o in pending)])
        xs = np.concatenate([self.cells.x, *(o.x for o in pending)])
        if len(ys) == 0:
            return float(cand_y[0]), float(cand_x[0])
        gap, _ = cKDTree(np.column_stack([ys, xs])).query(np.column_stack([cand_y, cand_x]))
        best = int(np.argmax(gap - radius))
        return float(cand_y[best]), float(cand_x[best])

    # -- rendering

    def render(self) -> tuple[IntArray, float, float]:
        """The frame as cell indices (-1: background), its covered fraction and scale ``g``.

        Outlines are first drawn out to a little beyond the previous frame's ``g`` (cheap:
        boxes a quarter of the size); only if that cannot cover the target density are they
        drawn again out to :data:`G_MAX`."""
        p = self.p
        want = max(1, round(p.density * p.height * p.width))
        for reach in (min(G_MAX, self.g * 1.15 + 0.05), G_MAX):
            best = self._nearest_outline(reach)
            covered = best != _NO_CELL
            dist = np.full(best.shape, np.inf)
            dist[covered] = (best[covered] >> _IDX_BITS) * (reach / (1 << _Q_BITS))
            g = float(np.partition(dist, want - 1)[want - 1])
            if math.isfinite(g):
                break
        g = min(max(g, G_MIN), G_MAX) if math.isfinite(g) else G_MAX
        self.g = g
        cell = np.where(covered & (dist <= g), best & ((1 << _IDX_BITS) - 1), -1)
        cell = _largest_pieces(cell.reshape(p.height, p.width))
        return cell, float(np.mean(cell >= 0)), g

    def _nearest_outline(self, reach: float) -> IntArray:
        """Per field pixel, the smallest normalized distance below ``reach`` to any cell and
        that cell's index, packed into one int64 (distance in the high bits, so a minimum
        picks the nearest outline, ties going to the lower index); no cell: ``_NO_CELL``."""
        p, c = self.p, self.cells
        h_img, w_img = p.height, p.width
        r = self._current_radius(c)
        extent = r * np.sqrt(c.alpha) * (1 + np.abs(c.wrinkle).sum(axis=1))
        half = np.ceil(reach * extent).astype(np.int64) + 1
        fy, fx = c.y - self.margin, c.x - self.margin
        visible = (fy + half >= 0) & (fy - half <= h_img - 1) & (fx + half >= 0)
        visible &= fx - half <= w_img - 1
        best = np.full(h_img * w_img, _NO_CELL, dtype=np.int64)
        f32 = np.float32
        for hv in np.unique(half[visible]):
            sel = np.flatnonzero(visible & (half == hv))
            off = np.arange(-hv, hv + 1)
            rows = np.floor(fy[sel]).astype(np.int64)[:, None] + off
            cols = np.floor(fx[sel]).astype(np.int64)[:, None] + off
            dy = (rows - fy[sel, None]).astype(f32)[:, :, None]
            dx = (cols - fx[sel, None]).astype(f32)[:, None, :]
            cos_t = np.cos(c.theta[sel]).astype(f32)[:, None, None]
            sin_t = np.sin(c.theta[sel]).astype(f32)[:, None, None]
            # pixel offsets in the cell's own frame: xr along the long axis
            xr = dx * cos_t + dy * sin_t
            yr = dy * cos_t - dx * sin_t
            rho = np.sqrt(xr * xr + yr * yr)
            safe = np.where(rho > 0, rho, f32(1))
            cs, sn = np.where(rho > 0, xr / safe, f32(1)), yr / safe
            a = c.alpha[sel].astype(f32)[:, None, None]
            # the area-preserving ellipse: rho / its radius in this direction
            ell = np.sqrt(xr * xr / a + a * yr * yr)
            wrinkle = np.ones_like(rho)
            ck, sk = cs * cs - sn * sn, 2 * cs * sn
            for k in range(c.wrinkle.shape[1]):
                w = c.wrinkle[sel, k]
                wrinkle += w.real.astype(f32)[:, None, None] * ck
                wrinkle -= w.imag.astype(f32)[:, None, None] * sk
                ck, sk = ck * cs - sk * sn, sk * cs + ck * sn
            d = ell / (r[sel].astype(f32)[:, None, None] * np.maximum(wrinkle, f32(0.3)))
            ok = d < reach
            ok &= ((rows >= 0) & (rows < h_img))[:, :, None]
            ok &= ((cols >= 0) & (cols < w_img))[:, None, :]
            q = (d[ok] * f32((1 << _Q_BITS) / reach)).astype(np.int64)
            idx = np.broadcast_to(sel[:, None, None], d.shape)[ok]
            pix = (rows[:, :, None] * w_img + cols[:, None, :])[ok]
            np.minimum.at(best, pix, (q << _IDX_BITS) | idx)
        return best


def _largest_pieces(cell: IntArray) -> IntArray:
    """Each cell's region cut down to its largest 4-connected piece (stray slivers, which the
    nearest-outline partition can leave, become background)."""
    comp = connected_components(cell + 1, background=0, connectivity=1)
    n = int(comp.max())
    if n == 0:
        return cell
    owner = np.full(n + 1, -1, dtype=np.int64)
    owner[comp.ravel()] = cell.ravel()
    size = np.bincount(comp.ravel(), minlength=n + 1)
    ids = np.arange(1, n + 1)
    order = np.lexsort((-size[1:], owner[1:]))
    _, first = np.unique(owner[1:][order], return_index=True)
    keep = np.zeros(n + 1, dtype=bool)
    keep[ids[order][first]] = True
    if keep[1:].all():
        return cell
    return np.where(keep[comp], cell, -1)


# -- labels, tracks and lineage -----------------------------------------------------------------


_Kind = Literal["start", "entered", "division", "reentry"]


@dataclass
class _Segment:
    label: int
    begin: int
    end: int
    parent: int
    kind: _Kind
    cell: int


class _Lineage:
    """Turns per-frame cell ids into track-segment labels (Cell Tracking Challenge rules)."""

    def __init__(self) -> None:
        self.segments: list[_Segment] = []
        self.current: dict[int, _Segment] = {}
        self.last_label: dict[int, int] = {}

    def labels_for(self, t: int, uids: IntArray, parents: IntArray) -> NDArray[np.uint32]:
        out = np.empty(len(uids), dtype=np.uint32)
        for i, (uid, parent) in enumerate(zip(uids.tolist(), parents.tolist(), strict=True)):
            seg = self.current.get(uid)
            kind: _Kind
            if seg is not None and seg.end == t - 1:
                seg.end = t
            else:
                if uid in self.last_label:
                    kind, par = "reentry", self.last_label[uid]
                elif parent and parent in self.last_label:
                    kind, par = "division", self.last_label[parent]
                else:
                    kind, par = ("start" if t == 0 else "entered"), 0
                seg = _Segment(len(self.segments) + 1, t, t, par, kind, uid)
                self.segments.append(seg)
                self.current[uid] = seg
                self.last_label[uid] = seg.label
            out[i] = seg.label
        return out


def synthesize_masks(
    params: MaskParams, on_frame: Callable[[FrameStats], None] | None = None
) -> MaskMovie:
    """Simulate ``params.frames`` frames and return the labels, tracks table and lineage;
    ``on_frame`` is called after each frame (progress)."""
    p = params
    sim = _Simulator(p)
    labels = np.zeros((p.frames, p.height, p.width), dtype=np.uint32)
    lineage = _Lineage()
    rows: list[NDArray[np.void]] = []
    stats: list[FrameStats] = []
    ys, xs = np.mgrid[0 : p.height, 0 : p.width]
    for t in range(p.frames):
        if t:
            sim.step()
        cell, density, g = sim.render()
        present = np.flatnonzero(np.bincount(cell.ravel() + 1, minlength=len(sim.cells) + 1)[1:])
        lab = lineage.labels_for(t, sim.cells.uid[present], sim.cells.parent[present])
        lut = np.zeros(len(sim.cells) + 1, dtype=np.uint32)
        lut[present + 1] = lab
        frame = lut[cell + 1]
        labels[t] = frame
        rows.append(_frame_rows(t, frame, lab, lineage, ys, xs))
        info = FrameStats(t=t, density=density, scale=g, cells=len(lab))
        stats.append(info)
        if on_frame is not None:
            on_frame(info)
    tracks = [Track(s.label, s.begin, s.end, s.parent, s.kind, s.cell) for s in lineage.segments]
    divisions = len({tr.parent for tr in tracks if tr.kind == "division"})
    table = np.concatenate(rows) if rows else np.zeros(0, dtype=TABLE_DTYPE)
    return MaskMovie(p, labels, tracks, table, stats, divisions)


def _frame_rows(
    t: int,
    frame: NDArray[np.uint32],
    lab: NDArray[np.uint32],
    lineage: _Lineage,
    ys: IntArray,
    xs: IntArray,
) -> NDArray[np.void]:
    flat = frame.ravel()
    n = int(lab.max()) + 1 if len(lab) else 1
    area = np.bincount(flat, minlength=n)
    sy = np.bincount(flat, weights=ys.ravel(), minlength=n)
    sx = np.bincount(flat, weights=xs.ravel(), minlength=n)
    order = np.sort(lab)
    out = np.zeros(len(order), dtype=TABLE_DTYPE)
    out["id"] = order
    out["t"] = t
    out["area"] = area[order]
    out["y"] = sy[order] / area[order]
    out["x"] = sx[order] / area[order]
    out["parent"] = [lineage.segments[int(k) - 1].parent for k in order]
    return out


# -- files ---------------------------------------------------------------------------------------


def write_masks(movie: MaskMovie, out: Path, ctc: bool = False) -> dict[str, Path]:
    """Write ``masks.ome.tif`` (T, Y, X labels, uint16 when the labels fit, else uint32, with
    the physical pixel size), ``tracks.csv``, ``res_track.txt`` and ``params.json`` into
    ``out``; with ``ctc`` also one ``maskTTT.tif`` per frame (a Cell Tracking Challenge result
    folder). Returns the paths by kind."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    p = movie.params
    top = int(movie.labels.max()) if movie.labels.size else 0
    dtype = np.uint16 if top <= np.iinfo(np.uint16).max else np.uint32
    data = movie.labels.astype(dtype, copy=False)
    paths = {
        "masks": out / "masks.ome.tif",
        "tracks": out / "tracks.csv",
        "lineage": out / "res_track.txt",
        "params": out / "params.json",
    }
    tifffile.imwrite(
        paths["masks"],
        data,
        ome=True,
        bigtiff=data.nbytes > 2**31,
        photometric="minisblack",
        compression="zlib",
        resolution=(1e4 / p.pixel_um, 1e4 / p.pixel_um),
        resolutionunit="CENTIMETER",
        metadata={
            "axes": "TYX",
            "Name": "scopecast synthetic cell labels",
            "PhysicalSizeX": p.pixel_um,
            "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": p.pixel_um,
            "PhysicalSizeYUnit": "µm",
            "TimeIncrement": p.interval_s,
            "TimeIncrementUnit": "s",
        },
    )
    with paths["tracks"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "t", "y", "x", "area", "parent"])
        for row in movie.table:
            i, t, y, x, area, parent = row.tolist()
            w.writerow([i, t, f"{y:.3f}", f"{x:.3f}", area, parent])
    paths["lineage"].write_text(
        "".join(f"{tr.label} {tr.begin} {tr.end} {tr.parent}\n" for tr in movie.tracks)
    )
    paths["params"].write_text(json.dumps(p.model_dump(mode="json"), indent=2) + "\n")
    if ctc:
        digits = max(3, len(str(p.frames - 1)))
        for t in range(p.frames):
            tifffile.imwrite(out / f"mask{t:0{digits}d}.tif", data[t], compression="zlib")
        paths["ctc"] = out
    return paths


def read_lineage(path: Path) -> list[Track]:
    """A Cell Tracking Challenge lineage file (``L B E P`` per line) as tracks."""
    tracks = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            label, begin, end, parent = (int(v) for v in line.split())
        except ValueError:
            raise ValueError(
                f"{path}:{n}: expected four integers 'L B E P', got {line!r}"
            ) from None
        tracks.append(Track(label, begin, end, parent))
    return tracks
