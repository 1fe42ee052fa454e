"""Which TensorRT plan to run here, or whether to rebuild one, or to use another backend.

A serialized plan only works on the TensorRT version and GPU it was built for, so a plan is
used only when every tag matches this machine and its optimization profiles cover the shapes
the engine will be called with. Pure Python: the machine facts are a small model, gathered
lazily (``tensorrt.machine_facts``) from tensorrt and pycuda only when asked, so every rule
here is tested with recorded metadata on machines without a GPU. A "rebuild" is carried out by a
``PlanRebuilder`` the caller passes in: the offline build code implements it, the runtime only
names its shape.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from ..package import EnginePackage, Manifest, PlanInfo
from .guard import NumericsReport

INSTALL_TENSORRT = (
    "on a machine with an NVIDIA GPU and driver: pip install -e '.[gpu]' (TensorRT and pycuda)"
)
PRECISION_ORDER = ("fp32", "fp16", "int8")
Shape = tuple[int, ...]

#: Longest frame side (input pixels) a whole-frame engine's plan accepts by default, and the
#: side TensorRT tunes it for.
MAX_SIDE = 2048
OPT_SIDE = 512
MIN_SIDE = 16


class MachineFacts(BaseModel):
    """What decides whether a plan runs here; ``problem`` says why TensorRT cannot."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tensorrt: str | None = None
    gpu: str | None = None
    compute_capability: str | None = None
    problem: str = ""

    @property
    def usable(self) -> bool:
        return not self.problem and None not in (self.tensorrt, self.gpu, self.compute_capability)

    def describe(self) -> str:
        if not self.usable:
            return self.problem or "TensorRT facts incomplete"
        return f"TensorRT {self.tensorrt} on {self.gpu} (sm {self.compute_capability})"


class ShapeRange(BaseModel):
    """One input's (min, opt, max) shapes in an optimization profile."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min: Shape
    opt: Shape
    max: Shape

    def covers(self, shape: Sequence[int]) -> bool:
        shape = tuple(int(s) for s in shape)
        return len(shape) == len(self.min) and all(
            lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max, strict=True)
        )


Profile = dict[str, ShapeRange]


def parse_profiles(raw: Iterable[Mapping[str, Any]]) -> list[Profile] | None:
    """A plan's stored profiles, or None when they are not in the expected form."""
    try:
        return [{name: ShapeRange.model_validate(r) for name, r in p.items()} for p in raw]
    except (ValidationError, AttributeError, TypeError):
        return None


def dump_profiles(profiles: Sequence[Profile]) -> list[dict[str, Any]]:
    """Profiles as stored in ``PlanInfo.profiles`` (JSON lists)."""
    return [{name: r.model_dump(mode="json") for name, r in p.items()} for p in profiles]


def profile_for(profiles: Sequence[Profile], shapes: Mapping[str, Sequence[int]]) -> int | None:
    """The index of the profile covering ``shapes`` with the smallest maximum, or None."""
    best: tuple[int, int] | None = None
    for i, p in enumerate(profiles):
        if all(name in p and p[name].covers(s) for name, s in shapes.items()):
            size = sum(_volume(r.max) for r in p.values())
            if best is None or size < best[0]:
                best = (size, i)
    return None if best is None else best[1]


def _volume(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _shapes(manifest: Manifest, n: int, h: int, w: int) -> dict[str, Shape]:
    """Input shapes for a batch of n tiles of h x w frame pixels, by the model I/O convention."""
    c, s = manifest.channels, manifest.scale
    shapes: dict[str, Shape] = {"frames": (n, c * manifest.temporal.window, h, w)}
    if manifest.temporal.previous_output:
        shapes["previous"] = (n, c, h * s, w * s)
    if manifest.temporal.background:
        shapes["background"] = (n, c, h, w)
    return shapes


def make_profiles(
    manifest: Manifest,
    *,
    batches: Sequence[int] | None = None,
    tiles: Sequence[int] | None = None,
    max_side: int = MAX_SIDE,
) -> list[Profile]:
    """Optimization profiles for the shapes the runtime sends this engine.

    A tiled engine gets one profile per (tile, batch): tiles of exactly that side, 1 to
    ``batch`` of them, tuned for the full batch. A whole-frame engine (``tile.size`` None)
    gets one batch-1 profile from ``MIN_SIDE`` to ``max_side``, both multiples of
    ``tile.multiple``.
    """
    batches = sorted(set(batches or [manifest.tile.batch]))
    if any(b < 1 for b in batches):
        raise ValueError(f"batch sizes {batches} must all be >= 1")
    sizes = list(tiles) if tiles else ([manifest.tile.size] if manifest.tile.size else [])
    m = manifest.tile.multiple
    for t in sizes:
        if t < 1 or t % m:
            raise ValueError(f"tile {t} must be a positive multiple of {m} for {manifest.name!r}")
    profiles: list[Profile] = []
    if not sizes:
        lo = _round_up(MIN_SIDE, m)
        hi = max(lo, max_side - max_side % m)
        opt = min(max(lo, _round_up(OPT_SIDE, m)), hi)
        for b in batches:
            mn, op = _shapes(manifest, 1, lo, lo), _shapes(manifest, b, opt, opt)
            mx = _shapes(manifest, b, hi, hi)
            profiles.append({k: ShapeRange(min=mn[k], opt=op[k], max=mx[k]) for k in mn})
        return profiles
    for t in sorted(set(sizes)):
        for b in batches:
            mn, mx = _shapes(manifest, 1, t, t), _shapes(manifest, b, t, t)
            profiles.append({k: ShapeRange(min=mn[k], opt=mx[k], max=mx[k]) for k in mn})
    return profiles


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def fit_fixed_dims(profile: Profile, fixed: Mapping[str, Sequence[int]]) -> Profile:
    """Pin every dimension the network fixes (not -1) in ``fixed``; raise if it cannot fit."""
    out: Profile = {}
    for name, r in profile.items():
        dims = fixed.get(name)
        if dims is None:
            raise ValueError(
                f"the network has no input {name!r} (it has {sorted(fixed)}): the ONNX does not "
                "follow the manifest's inputs"
            )
        if len(dims) != len(r.min):
            raise ValueError(f"input {name!r} has rank {len(dims)}, the profile {len(r.min)}")
        ranges = []
        for axis, (d, lo, op, hi) in enumerate(zip(dims, r.min, r.opt, r.max, strict=True)):
            if d >= 0:
                if not lo <= d <= hi:
                    raise ValueError(
                        f"input {name!r} has a fixed size {d} on axis {axis}, outside the "
                        f"profile's {lo}..{hi}: export the model with that axis dynamic"
                    )
                ranges.append((d, d, d))
            else:
                ranges.append((lo, op, hi))
        out[name] = ShapeRange(
            min=tuple(x[0] for x in ranges), opt=tuple(x[1] for x in ranges),
            max=tuple(x[2] for x in ranges),
        )  # fmt: skip
    return out


def needed_shapes(manifest: Manifest) -> list[dict[str, Shape]]:
    """Shapes a plan must accept for the runtime's tiling (single tile and a full batch).

    Whole-frame engines take any frame size, so nothing is required up front; a frame outside
    the plan's profiles fails with a message when it comes.
    """
    t = manifest.tile
    if t.size is None:
        return []
    return [_shapes(manifest, 1, t.size, t.size), _shapes(manifest, t.batch, t.size, t.size)]


def plan_mismatches(plan: PlanInfo, facts: MachineFacts) -> list[str]:
    """Every tag of ``plan`` that does not match this machine, as short phrases."""
    out = []
    if plan.tensorrt != facts.tensorrt:
        out.append(f"TensorRT {plan.tensorrt} (here {facts.tensorrt})")
    if _norm_gpu(plan.gpu) != _norm_gpu(facts.gpu or ""):
        out.append(f"GPU {plan.gpu!r} (here {facts.gpu!r})")
    if _norm_cc(plan.compute_capability) != _norm_cc(facts.compute_capability or ""):
        out.append(f"sm {plan.compute_capability} (here {facts.compute_capability})")
    return out


def _norm_gpu(name: str) -> str:
    return " ".join(name.split()).lower()


def _norm_cc(cc: str) -> str:
    """Read "8.6", "sm86", "sm_86" and "86" alike, as "8.6"."""
    s = cc.strip().lower().removeprefix("sm").lstrip("_ ")
    if re.fullmatch(r"\d{2,3}", s):
        return f"{s[:-1]}.{s[-1]}"
    return s


class PlanChoice(BaseModel):
    """The decision: run ``plan``, rebuild one from ``source``, or fall back; and why."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    action: Literal["use", "rebuild", "fallback"]
    reason: str
    plan: PlanInfo | None = None
    precision: str | None = None
    source: str | None = None
    profiles: list[dict[str, Any]] = []


def _label(plan: PlanInfo) -> str:
    return (
        f"{plan.file} ({plan.precision}, TensorRT {plan.tensorrt}, {plan.gpu}, "
        f"sm {plan.compute_capability})"
    )


def select_plan(
    manifest: Manifest,
    facts: MachineFacts,
    *,
    precision: str | None = None,
    shapes: Sequence[Mapping[str, Sequence[int]]] = (),
    rebuild: bool = True,
    build_missing: bool = False,
) -> PlanChoice:
    """Decide what the TensorRT backend does for ``manifest`` on the machine ``facts`` describe.

    ``precision`` None takes the package's plans in manifest order (``scopecast build`` puts
    the newest first). A plan is used only if TensorRT version, GPU name and compute capability
    all match and a profile covers each of ``shapes``. Otherwise, with ``rebuild``, the first
    candidate is rebuilt from the ONNX it was built from; with ``build_missing``, a package with
    no plan of the precision is built from ``model.onnx`` (fp32 only: fp16 and int8 need
    ``scopecast build`` to make their ONNX).
    """
    if precision is not None and precision not in PRECISION_ORDER:
        raise ValueError(f"unknown precision {precision!r}: choose one of {PRECISION_ORDER}")
    if not facts.usable:
        return PlanChoice(action="fallback", reason=facts.problem or "TensorRT facts incomplete")
    here = facts.describe()
    candidates = [p for p in manifest.plans if precision is None or p.precision == precision]
    missing_note = (
        f"no {precision} TensorRT plan in package {manifest.name!r}"
        if precision and manifest.plans
        else f"package {manifest.name!r} has no TensorRT plan"
    )
    if not candidates:
        if build_missing and precision in (None, "fp32"):
            profiles = dump_profiles(make_profiles(manifest))
            return PlanChoice(
                action="rebuild", precision="fp32", source=manifest.model, profiles=profiles,
                reason=f"{missing_note}; building fp32 from {manifest.model} for {here}",
            )  # fmt: skip
        hint = f"scopecast build {manifest.name} --precision {precision or 'fp16'}"
        return PlanChoice(action="fallback", reason=f"{missing_note} (make one here: {hint})")
    problems = []
    for plan in candidates:
        mismatch = plan_mismatches(plan, facts)
        if mismatch:
            problems.append(f"{plan.file} was built for {', '.join(mismatch)}")
            continue
        parsed = parse_profiles(plan.profiles)
        uncovered = _uncovered(parsed, shapes)
        if uncovered:
            problems.append(f"{plan.file} matches {here} but {uncovered}")
            continue
        return PlanChoice(
            action="use", plan=plan, precision=plan.precision, source=plan.onnx,
            profiles=list(plan.profiles), reason=f"plan {_label(plan)} matches this machine",
        )  # fmt: skip
    why = "; ".join(problems)
    first = candidates[0]
    if not rebuild:
        return PlanChoice(
            action="fallback",
            reason=f"no plan matches {here}: {why}; rebuilding is off (run: scopecast build "
            f"{manifest.name} --precision {first.precision})",
        )
    source = first.onnx or (manifest.model if first.precision == "fp32" else None)
    if source is None or source not in manifest.files:
        return PlanChoice(
            action="fallback",
            reason=f"no plan matches {here}: {why}; the {first.precision} ONNX it was built from "
            f"is not in the package (run: scopecast build {manifest.name} --precision "
            f"{first.precision})",
        )
    kept = parse_profiles(first.profiles)
    if kept is None or _uncovered(kept, shapes):
        kept = make_profiles(manifest)
    return PlanChoice(
        action="rebuild", plan=first, precision=first.precision, source=source,
        profiles=dump_profiles(kept),
        reason=f"no plan matches {here}: {why}; rebuilding {first.precision} from {source}",
    )  # fmt: skip


def _uncovered(
    profiles: Sequence[Profile] | None, shapes: Sequence[Mapping[str, Sequence[int]]]
) -> str:
    if profiles is None:
        return "its optimization profiles are unreadable"
    for s in shapes:
        if profile_for(profiles, s) is None:
            described = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in s.items())
            return f"no optimization profile covers {described}"
    return ""


@dataclass
class Rebuilt:
    """A plan rebuilt at startup for this machine, and whether it was saved in the package."""

    package: EnginePackage
    plan: PlanInfo
    plan_bytes: bytes
    seconds: float
    report: NumericsReport
    saved: str


class PlanRebuilder(Protocol):
    """Carries out ``select_plan``'s "rebuild" (build, numerics-check, maybe save); the runtime
    is handed one by its caller (``engines.offline.build.rebuild_plan``), never imports it."""

    def __call__(self, package: EnginePackage, choice: PlanChoice) -> Rebuilt: ...
