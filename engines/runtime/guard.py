"""The numerics guard: a candidate (a TensorRT plan, an fp16 or int8 ONNX) against the fp32
reference on the same inputs. NaN, inf, an all-constant (for example black) output, or errors
beyond the precision's tolerance reject the candidate with a report that says what failed.

Errors are relative to the reference's value range, so one tolerance fits every normalization.
Runners are plain callables (inputs by name -> first output), so the guard runs on CPU with
ONNX Runtime as well as on a GPU with a plan.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

Runner = Callable[[dict[str, np.ndarray]], np.ndarray]
Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "int8")

#: PSNR reported for identical outputs (keeps the report finite, so it stays valid JSON).
PSNR_CAP_DB = 200.0


class Tolerance(BaseModel):
    """How far a candidate may stray from the fp32 reference, relative to its value range."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_error: float = Field(gt=0, description="Largest |candidate - reference| / range.")
    mean_error: float = Field(gt=0, description="Mean |candidate - reference| / range.")
    min_psnr_db: float = Field(description="PSNR of the candidate with the reference range.")


#: TensorRT fp32 may use TF32 on Ampere and newer; fp16 rounds weights and activations to
#: 11 bits; int8 keeps 8 bits of each quantized tensor.
DEFAULT_TOLERANCE: dict[str, Tolerance] = {
    "fp32": Tolerance(max_error=1e-2, mean_error=1e-3, min_psnr_db=60.0),
    "fp16": Tolerance(max_error=3e-2, mean_error=3e-3, min_psnr_db=45.0),
    "int8": Tolerance(max_error=0.15, mean_error=0.02, min_psnr_db=30.0),
}


class NumericsReport(BaseModel):
    """What the guard measured, and which checks failed (none: the candidate may be used)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    candidate: str
    reference: str
    precision: Precision
    samples: int = Field(description="Images compared (batch items of every input batch).")
    max_error: float | None = None
    mean_error: float | None = None
    psnr_db: float | None = None
    reference_range: float | None = None
    nonfinite: int = 0
    constant_samples: int = 0
    failed: list[str] = []
    details: list[str] = []
    tolerance: Tolerance

    @property
    def passed(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        """One line: the verdict and the numbers."""
        verdict = "passed" if self.passed else f"FAILED ({', '.join(self.failed)})"
        numbers = (
            f"max error {_fmt(self.max_error)}, mean error {_fmt(self.mean_error)} of the "
            f"reference range {_fmt(self.reference_range)}, PSNR {_fmt(self.psnr_db)} dB"
        )
        if self.nonfinite:
            numbers += f", {self.nonfinite} NaN/inf values"
        if self.constant_samples:
            numbers += f", {self.constant_samples} all-constant outputs"
        t = self.tolerance
        limits = f"limits: max {t.max_error:g}, mean {t.mean_error:g}, PSNR >= {t.min_psnr_db:g} dB"
        return (
            f"{self.candidate} vs {self.reference} on {self.samples} frame(s): "
            f"{verdict}; {numbers} ({limits})"
        )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def tolerance_for(precision: str, override: Tolerance | None = None) -> Tolerance:
    """The tolerance to apply: ``override`` when given, else the precision's default."""
    if override is not None:
        return override
    if precision not in DEFAULT_TOLERANCE:
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return DEFAULT_TOLERANCE[precision]


def check_outputs(
    references: Iterable[np.ndarray],
    candidates: Iterable[np.ndarray],
    *,
    precision: str,
    tolerance: Tolerance | None = None,
    candidate: str = "candidate",
    reference: str = "onnxruntime fp32",
) -> NumericsReport:
    """Compare paired outputs (same inputs) and report; pure numpy, no runtime needed."""
    tol = tolerance_for(precision, tolerance)
    refs = [np.asarray(r, np.float64) for r in references]
    gots = [np.asarray(g) for g in candidates]
    base = {"candidate": candidate, "reference": reference, "precision": precision}
    if not refs or len(refs) != len(gots):
        return NumericsReport(
            **base, samples=len(gots), tolerance=tol, failed=["samples"],
            details=[f"{len(refs)} reference outputs but {len(gots)} candidate outputs"],
        )  # fmt: skip
    failed: list[str] = []
    details: list[str] = []
    images = sum(len(_images(r, r)[0]) for r in refs)
    shapes = [
        (i, r.shape, g.shape)
        for i, (r, g) in enumerate(zip(refs, gots, strict=True))
        if r.shape != g.shape
    ]
    if shapes:
        i, want, got = shapes[0]
        return NumericsReport(
            **base, samples=images, tolerance=tol, failed=["shape"],
            details=[f"batch {i}: output shape {got}, the reference gives {want}"],
        )  # fmt: skip
    nonfinite = sum(int(g.size - np.count_nonzero(np.isfinite(g))) for g in gots)
    if nonfinite:
        failed.append("nonfinite")
        details.append(f"{nonfinite} NaN/inf output values (fp16 overflow or a broken plan)")
    constant = 0
    pairs = [
        (r1, g1)
        for r, g in zip(refs, gots, strict=True)
        for r1, g1 in zip(*_images(r, g), strict=True)
    ]
    for i, (r, g) in enumerate(pairs):
        finite = g[np.isfinite(g)]
        if np.ptp(r) > 0 and (finite.size == 0 or np.ptp(finite) == 0):
            constant += 1
            if constant == 1:
                value = float(finite.flat[0]) if finite.size else float("nan")
                details.append(
                    f"frame {i}: every output value is {value:g} while the reference varies "
                    f"over {np.ptp(r):.4g} (a black or flat frame)"
                )
    if constant:
        failed.append("constant")
    lo = min(float(r.min()) for r in refs)
    hi = max(float(r.max()) for r in refs)
    scale = hi - lo
    if scale <= 0:  # a constant reference (e.g. a flat input through identity)
        scale = max(abs(hi), abs(lo), 1.0)
    diffs = [
        np.abs(np.where(np.isfinite(g), g, np.inf) - r) for r, g in zip(refs, gots, strict=True)
    ]
    total = sum(d.size for d in diffs)
    max_abs = max(float(d.max()) for d in diffs)
    mean_abs = sum(float(d.sum()) for d in diffs) / total
    mse = sum(float(np.square(d).sum()) for d in diffs) / total
    psnr = (
        PSNR_CAP_DB if mse == 0 else 10 * math.log10(scale**2 / mse) if math.isfinite(mse) else None
    )
    if psnr is not None:
        psnr = min(psnr, PSNR_CAP_DB)
    max_error = max_abs / scale if math.isfinite(max_abs) else None
    mean_error = mean_abs / scale if math.isfinite(mean_abs) else None
    if not nonfinite:
        if psnr is not None and psnr < tol.min_psnr_db:
            failed.append("psnr")
            details.append(f"PSNR {psnr:.4g} dB is below {tol.min_psnr_db:g} dB")
        if max_error is not None and max_error > tol.max_error:
            failed.append("max_error")
            details.append(f"max error {max_error:.4g} exceeds {tol.max_error:g} of the range")
        if mean_error is not None and mean_error > tol.mean_error:
            failed.append("mean_error")
            details.append(f"mean error {mean_error:.4g} exceeds {tol.mean_error:g} of the range")
    return NumericsReport(
        **base,
        samples=images,
        max_error=max_error,
        mean_error=mean_error,
        psnr_db=psnr,
        reference_range=hi - lo,
        nonfinite=nonfinite,
        constant_samples=constant,
        failed=failed,
        details=details,
        tolerance=tol,
    )


def _images(r: np.ndarray, g: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A batch (N, C, H, W) as its N images; anything else as one."""
    if r.ndim == 4:
        return list(r), list(g)
    return [r], [g]


def compare_runners(
    reference: Runner,
    candidate: Runner,
    inputs: Iterable[Mapping[str, np.ndarray]],
    *,
    precision: str,
    tolerance: Tolerance | None = None,
    candidate_label: str = "candidate",
    reference_label: str = "onnxruntime fp32",
) -> NumericsReport:
    """Run both on every input batch and compare; a runner that raises fails the check."""
    refs: list[np.ndarray] = []
    gots: list[np.ndarray] = []
    for batch in inputs:
        feed = {k: np.ascontiguousarray(v, np.float32) for k, v in batch.items()}
        refs.append(np.asarray(reference(dict(feed)), np.float32))
        try:
            gots.append(np.asarray(candidate(dict(feed)), np.float32))
        except Exception as e:  # noqa: BLE001 - any runtime's failure is a reported rejection
            shapes = {k: v.shape for k, v in feed.items()}
            return NumericsReport(
                candidate=candidate_label, reference=reference_label, precision=precision,
                samples=sum(len(r) for r in refs), tolerance=tolerance_for(precision, tolerance),
                failed=["error"], details=[f"{candidate_label} failed on inputs {shapes}: {e}"],
            )  # fmt: skip
    return check_outputs(
        refs, gots, precision=precision, tolerance=tolerance,
        candidate=candidate_label, reference=reference_label,
    )  # fmt: skip
