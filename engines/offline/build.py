"""``scopecast build``: an engine package's ONNX -> a TensorRT plan for this GPU, checked.

1. The ONNX for the precision: fp32 as exported; fp16 with weights and activations in half
   precision (inputs and outputs stay float32 through Cast nodes, so every backend sees the
   same interface); int8 with explicit Quantize/DequantizeLinear pairs calibrated on frames
   from the rig (symmetric int8, per-channel weights, as TensorRT's explicit quantization
   wants). Both conversions run here with ONNX Runtime's tools, on CPU.
2. The numerics guard on CPU: that ONNX against the fp32 model in ONNX Runtime.
3. The plan: optimization profiles for the package's tile and batch sizes, a persistent
   timing cache, TensorRT 10 or 11 (through ``engines.runtime.tensorrt``, the GPU seam).
4. The numerics guard again: the plan against ONNX Runtime fp32 on the same inputs. A plan
   beyond tolerance, or with NaN, inf or an all-constant output, is rejected, not packaged.
5. The plan (and the ONNX it came from) goes into the package, tagged and hashed.

onnx is imported only by the conversions (it is a dev/train dependency, not a runtime one).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..package import ZOO_DIR, EnginePackage, Manifest, PlanInfo, load_package, write_package
from ..runtime.base import BackendError
from ..runtime.guard import (
    PRECISIONS,
    NumericsReport,
    Runner,
    Tolerance,
    compare_runners,
    tolerance_for,
)
from ..runtime.plans import (
    MAX_SIDE,
    MIN_SIDE,
    OPT_SIDE,
    MachineFacts,
    PlanChoice,
    Profile,
    Rebuilt,
    dump_profiles,
    make_profiles,
    parse_profiles,
)

#: Ops whose inputs get Q/DQ pairs for int8: the ones TensorRT runs in int8 kernels.
INT8_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
CALIBRATION_SUFFIXES = (".tif", ".tiff", ".npy", ".npz")


class BuildError(BackendError):
    """A plan cannot be built as asked; the message says what and what to do."""


class BuildRejected(BuildError):
    """The numerics guard rejected a build; ``report`` has the numbers."""

    def __init__(self, report: NumericsReport, engine: str, stage: str) -> None:
        self.report = report
        self.engine = engine
        lines = [f"{stage} rejected: {report.summary()}", *(f"  - {d}" for d in report.details)]
        if report.precision != "fp32":
            lines.append(
                f"  fp32 keeps the model's numbers: scopecast build {engine} --precision fp32"
            )
        else:
            lines.append(
                "  even fp32 differs from ONNX Runtime: check the model and the TensorRT version "
                f"(or keep ONNX Runtime: scopecast serve --engine {engine} --backend onnxruntime)"
            )
        super().__init__("\n".join(lines))


# -- the GPU seam ----------------------------------------------------------------------------


PlanBuilder = Callable[..., tuple[bytes, list[Profile], list[str]]]
RunnerFactory = Callable[[EnginePackage, bytes], AbstractContextManager[Runner]]


@dataclass(frozen=True)
class Toolkit:
    """What building and checking a plan needs from the machine; tests pass fakes.

    ``build(onnx, profiles, precision, workspace_mb=, timing_cache=)`` returns the plan bytes,
    the profiles as built and notes; ``runner(package, plan)`` opens the plan as a runner.
    """

    facts: Callable[[], MachineFacts]
    build: PlanBuilder
    runner: RunnerFactory


def tensorrt_toolkit() -> Toolkit:
    """The real seam: TensorRT and pycuda on this machine (imported when first used)."""
    from ..runtime import tensorrt as seam

    @contextlib.contextmanager
    def runner(package: EnginePackage, plan: bytes) -> Iterator[Runner]:
        backend = seam.TensorRtBackend(package, plan_bytes=plan, label="new plan")
        try:
            yield backend.infer
        finally:
            backend.close()

    return Toolkit(facts=seam.gather_machine_facts, build=seam.build_serialized_plan, runner=runner)


# -- calibration frames ----------------------------------------------------------------------


def load_frames(path: Path) -> np.ndarray:
    """Frames (N, H, W) float32 from a TIFF stack, a folder of TIFFs, .npy or .npz."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".tif", ".tiff"))
        if not files:
            raise BuildError(f"calibration folder {path} holds no .tif/.tiff files")
        stacks = [load_frames(f) for f in files]
        shapes = {s.shape[1:] for s in stacks}
        if len(shapes) > 1:
            raise BuildError(f"calibration frames in {path} differ in size: {sorted(shapes)}")
        return np.concatenate(stacks)
    if not path.is_file():
        raise BuildError(f"calibration frames {path} not found")
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        import tifffile

        data = tifffile.imread(path)
    elif suffix == ".npy":
        data = np.load(path, allow_pickle=False)
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if not z.files:
                raise BuildError(f"{path} holds no arrays")
            data = z[z.files[0]]
    else:
        raise BuildError(
            f"calibration frames {path}: unknown format {suffix!r}; give "
            f"{', '.join(CALIBRATION_SUFFIXES)} or a folder of TIFFs"
        )
    data = np.asarray(data)
    if data.ndim < 2 or data.dtype.kind not in "uif":
        raise BuildError(f"{path} holds {data.dtype} {data.shape}, not frames (N, H, W)")
    frames = data.reshape(-1, *data.shape[-2:]).astype(np.float32)
    if min(frames.shape[1:]) < 8 or not np.isfinite(frames).all():
        raise BuildError(f"{path}: frames {frames.shape} are smaller than 8 px or not finite")
    return frames


def synthetic_frames(
    manifest: Manifest, count: int = 8, side: int = 256, seed: int = 0
) -> np.ndarray:
    """Deterministic specimen-like frames in raw units (smooth structure, fine detail, noise).

    Used by the numerics guard when no rig frames are given; int8 calibration needs real ones.
    """
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    frames = np.empty((count, side, side), np.float32)
    for i in range(count):
        coarse = gaussian_filter(rng.random((side, side)), 6)
        fine = gaussian_filter(rng.random((side, side)), 1.2)
        x = _unit(coarse) * 0.7 + _unit(fine) * 0.3
        x = x + rng.normal(0, 0.02, x.shape)
        frames[i] = manifest.normalization.offset + manifest.normalization.scale * x
    return frames


def _unit(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def guard_side(
    manifest: Manifest, tiles: Sequence[int] | None = None, max_side: int = MAX_SIDE
) -> int:
    """The tile side the guard and calibration feed: the first tile, else a moderate frame
    inside the whole-frame profile."""
    if tiles:
        return int(tiles[0])
    if manifest.tile.size is not None:
        return manifest.tile.size
    m = manifest.tile.multiple
    return max(-(-MIN_SIDE // m) * m, min(OPT_SIDE // 2, max_side) // m * m)


def calibration_inputs(
    manifest: Manifest, frames: np.ndarray, *, side: int, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """One batch-1 model input per frame: a ``side`` crop, normalized, with the temporal
    inputs the manifest asks for (the window of preceding frames, the previous output as the
    upsampled frame, the background as the median frame), as the server feeds them."""
    if frames.ndim != 3 or len(frames) == 0:
        raise BuildError(f"calibration frames must be (N, H, W), got {frames.shape}")
    frames = _at_least(np.asarray(frames, np.float32), side)
    n, h, w = frames.shape
    norm, t, s = manifest.normalization, manifest.temporal, manifest.scale
    background = np.median(frames, axis=0) if t.background else None
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        y = int(rng.integers(0, h - side + 1))
        x = int(rng.integers(0, w - side + 1))
        idx = [max(0, j) for j in range(i - t.window + 1, i + 1)]
        crop = (frames[idx, y : y + side, x : x + side] - norm.offset) / norm.scale
        item = {"frames": crop[None].astype(np.float32)}
        if t.previous_output:
            newest = np.repeat(np.repeat(crop[-1], s, 0), s, 1)
            item["previous"] = newest[None, None].astype(np.float32)
        if background is not None:
            bg = (background[y : y + side, x : x + side] - norm.offset) / norm.scale
            item["background"] = bg[None, None].astype(np.float32)
        out.append(item)
    return out


def _at_least(frames: np.ndarray, side: int) -> np.ndarray:
    """Frames padded (reflect, else edge) at the bottom and right to at least ``side``."""
    _, h, w = frames.shape
    ph, pw = max(0, side - h), max(0, side - w)
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "edge"
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw)), mode=mode)
    return frames


def batched(items: Sequence[dict[str, np.ndarray]], batch: int) -> list[dict[str, np.ndarray]]:
    """Batch-1 inputs stacked into batches of up to ``batch`` (the last may be smaller)."""
    return [
        {k: np.concatenate([it[k] for it in items[i : i + batch]]) for k in items[0]}
        for i in range(0, len(items), max(1, batch))
    ]


# -- precision: the ONNX a plan is built from ------------------------------------------------


def onnxruntime_runner(onnx: bytes, threads: int | None = None) -> Runner:
    """An ONNX Runtime CPU session as a runner (inputs by name -> first output, float32)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        feed = {n: np.ascontiguousarray(inputs[n], np.float32) for n in names}
        return np.asarray(session.run(None, feed)[0], np.float32)

    return run


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise BuildError(
            "converting an engine to fp16 or int8 needs the onnx package: pip install -e '.[dev]'"
        ) from None
    return onnx


def _topological(graph: Any) -> None:
    """Order ``graph``'s nodes so every input is produced before use (TensorRT's parser and
    onnx's checker need it; ONNX Runtime's fp16 converter appends its Casts at the end)."""
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(name in known for name in node.input):
                ordered.append(node)
                known.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            names = ", ".join(n.name or n.op_type for n in rest[:5])
            raise BuildError(f"the converted model has nodes with unresolvable inputs: {names}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def to_fp16(onnx_bytes: bytes) -> bytes:
    """The model with float16 weights and activations; inputs and outputs stay float32."""
    onnx = _onnx()
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load_from_string(onnx_bytes)
    ir_version = model.ir_version
    logging.getLogger("onnxruntime.transformers.float16").setLevel(logging.ERROR)
    converted = convert_float_to_float16(model, keep_io_types=True)
    _topological(converted.graph)
    converted.ir_version = ir_version
    onnx.checker.check_model(converted)
    return converted.SerializeToString(deterministic=True)


def quantize_int8(
    onnx_bytes: bytes, calibration: Sequence[dict[str, np.ndarray]], *, method: str = "minmax"
) -> bytes:
    """Explicit int8 (QDQ): symmetric int8 activations and per-channel weights on the inputs
    of Conv/ConvTranspose/MatMul/Gemm, scales from ``calibration`` (model inputs), float bias."""
    onnx = _onnx()
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in methods:
        raise BuildError(f"calibration method {method!r}: choose one of {', '.join(methods)}")
    if not calibration:
        raise BuildError("int8 needs calibration inputs: give --calibration FRAMES from the rig")
    model = onnx.load_from_string(onnx_bytes)
    if not any(n.op_type in INT8_OPS for n in model.graph.node):
        raise BuildError(
            f"the model has no {'/'.join(INT8_OPS)} layer to quantize, so int8 would change "
            "nothing: build fp16 or fp32 instead"
        )

    class Reader(CalibrationDataReader):
        def __init__(self, items: Sequence[dict[str, np.ndarray]]) -> None:
            self._items = iter(items)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._items, None)

    reader = Reader(calibration)
    with _quiet_root_logger(), tempfile.TemporaryDirectory(prefix="scopecast-int8-") as tmp:
        src, dst = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        src.write_bytes(onnx_bytes)
        quantize_static(
            str(src), str(dst), reader, quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
            op_types_to_quantize=list(INT8_OPS), calibrate_method=methods[method],
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                           "QuantizeBias": False},
        )  # fmt: skip
        quantized = onnx.load(str(dst))
    quantized.ir_version = model.ir_version
    _topological(quantized.graph)
    onnx.checker.check_model(quantized)
    return quantized.SerializeToString(deterministic=True)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """Drop the quantizer's advice, which it logs on the root logger as warnings."""
    root = logging.getLogger()
    handler = logging.NullHandler() if not root.handlers else None  # no basicConfig side effect
    drop = logging.Filter("onnxruntime")  # passes only records of onnxruntime's own loggers
    if handler is not None:
        root.addHandler(handler)
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)
        if handler is not None:
            root.removeHandler(handler)


def precision_onnx_name(precision: str) -> str:
    """Where the package keeps the ONNX of a precision (fp32 is the package's own model)."""
    return "model.onnx" if precision == "fp32" else f"plans/model.{precision}.onnx"


# -- plans in the package --------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "gpu"


def plan_file_name(precision: str, facts: MachineFacts) -> str:
    """``plans/<precision>-trt<version>-sm<cc>-<gpu>.plan``: one file per machine kind."""
    cc = (facts.compute_capability or "").replace(".", "")
    return f"plans/{precision}-trt{facts.tensorrt}-sm{cc}-{_slug(facts.gpu or '')}.plan"


def default_timing_cache(facts: MachineFacts) -> Path:
    """A timing cache per TensorRT version and GPU kind, kept between builds."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    cc = (facts.compute_capability or "").replace(".", "")
    return root / "scopecast" / "tensorrt" / f"timing-trt{facts.tensorrt}-sm{cc}.cache"


def is_zoo(package: EnginePackage) -> bool:
    return package.path.resolve().is_relative_to(ZOO_DIR.resolve())


def add_plan(
    package: EnginePackage,
    plan: PlanInfo,
    plan_bytes: bytes,
    extra: dict[str, bytes] | None = None,
    out: Path | None = None,
) -> EnginePackage:
    """The package with ``plan`` first in its plan list (replacing one of the same file),
    written to ``out`` (default: in place); every file is re-read hash-checked and re-hashed."""
    m = package.manifest
    files = {name: package.read(name) for name in m.files}
    files[plan.file] = plan_bytes
    files.update(extra or {})
    plans = [plan, *(p for p in m.plans if p.file != plan.file)]
    manifest = Manifest.model_validate({**m.model_dump(), "plans": [p.model_dump() for p in plans]})
    return write_package(Path(out) if out is not None else package.path, manifest, files)


@dataclass
class BuildResult:
    """What ``build_plan`` made and measured."""

    package: EnginePackage
    plan: PlanInfo
    onnx_report: NumericsReport | None
    plan_report: NumericsReport
    seconds: float
    notes: list[str] = field(default_factory=list)


def _report_record(report: NumericsReport) -> dict[str, Any]:
    keep = ("reference", "samples", "max_error", "mean_error", "psnr_db", "reference_range")
    record = {k: v for k, v in report.model_dump(mode="json").items() if k in keep}
    record["tolerance"] = report.tolerance.model_dump(mode="json")
    return record


def build_plan(
    target: str | Path | EnginePackage,
    precision: str = "fp16",
    *,
    calibration: Path | np.ndarray | None = None,
    workspace_mb: int = 1024,
    timing_cache: Path | None = None,
    batches: Sequence[int] | None = None,
    tiles: Sequence[int] | None = None,
    max_side: int = MAX_SIDE,
    out: Path | None = None,
    tolerance: Tolerance | None = None,
    toolkit: Toolkit | None = None,
    progress: Callable[[str], None] | None = None,
) -> BuildResult:
    """Build, check and package a plan for this GPU (see the module docstring).

    Raises BuildRejected with the report when a numerics check fails, BuildError when the
    plan cannot be built here (no TensorRT or GPU, bad arguments).
    """
    say = progress or (lambda _msg: None)
    if precision not in PRECISIONS:
        raise BuildError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if workspace_mb < 1:
        raise BuildError(f"--workspace-mb {workspace_mb} must be >= 1")
    if calibration is None and precision == "int8":
        raise BuildError(
            "int8 needs --calibration FRAMES: frames from your rig (a TIFF stack, a folder of "
            "TIFFs, .npy or .npz) set the quantization scales; synthetic ones would not"
        )
    package = target if isinstance(target, EnginePackage) else load_package(target)
    m = package.manifest
    if out is None and is_zoo(package):
        raise BuildError(
            f"{m.name!r} is a shipped zoo package ({package.path}); pass --out DIR to write a "
            "copy that carries the plan"
        )
    try:
        profiles = make_profiles(m, batches=batches, tiles=tiles, max_side=max_side)
    except ValueError as e:
        raise BuildError(str(e)) from None
    tol = tolerance_for(precision, tolerance)
    if calibration is None:
        frames = synthetic_frames(m)
        say("numerics guard inputs: 8 synthetic frames (give --calibration for the rig's own)")
    else:
        frames = calibration if isinstance(calibration, np.ndarray) else load_frames(calibration)
        say(f"calibration: {len(frames)} frames {frames.shape[1]}x{frames.shape[2]}")
    side = guard_side(m, tiles, max_side)
    samples = calibration_inputs(m, frames, side=side)
    guard = batched(samples, max(batches or [m.tile.batch]))
    model = package.read(m.model)
    reference = onnxruntime_runner(model)
    onnx_name = precision_onnx_name(precision)
    onnx_report = None
    if precision == "fp32":
        onnx_bytes = model
    else:
        say(f"converting {m.model} to {precision}")
        onnx_bytes = to_fp16(model) if precision == "fp16" else quantize_int8(model, samples)
        onnx_report = compare_runners(
            reference, onnxruntime_runner(onnx_bytes), guard, precision=precision, tolerance=tol,
            candidate_label=f"ONNX {precision} (onnxruntime CPU)",
        )  # fmt: skip
        say(onnx_report.summary())
        if not onnx_report.passed:
            raise BuildRejected(onnx_report, m.name, f"the {precision} ONNX")
    kit = toolkit or tensorrt_toolkit()
    facts = kit.facts()
    if not facts.usable:
        checked = f" (the {precision} ONNX passed its numerics check on CPU)" if onnx_report else ""
        raise BuildError(f"cannot build a TensorRT plan here{checked}: {facts.problem}")
    cache = timing_cache or default_timing_cache(facts)
    say(f"building a {precision} plan for {facts.describe()}, {len(profiles)} profile(s)")
    t0 = time.perf_counter()
    plan_bytes, built, notes = kit.build(
        onnx_bytes, profiles, precision, workspace_mb=workspace_mb, timing_cache=cache
    )
    seconds = time.perf_counter() - t0
    for note in notes:
        say(note)
    with kit.runner(package, plan_bytes) as run:
        report = compare_runners(
            reference, run, guard, precision=precision, tolerance=tol,
            candidate_label=f"TensorRT {precision} plan",
        )  # fmt: skip
    say(report.summary())
    if not report.passed:
        raise BuildRejected(report, m.name, f"the TensorRT {precision} plan")
    plan = PlanInfo(
        file=plan_file_name(precision, facts),
        tensorrt=str(facts.tensorrt), gpu=str(facts.gpu),
        compute_capability=str(facts.compute_capability), precision=precision,
        profiles=dump_profiles(built), onnx=onnx_name, build_seconds=round(seconds, 3),
        numerics=_report_record(report),
    )  # fmt: skip
    extra = {} if onnx_name == m.model else {onnx_name: onnx_bytes}
    written = add_plan(package, plan, plan_bytes, extra, out)
    return BuildResult(written, plan, onnx_report, report, seconds, notes)


def rebuild_plan(
    package: EnginePackage,
    choice: PlanChoice,
    *,
    toolkit: Toolkit | None = None,
    workspace_mb: int = 1024,
) -> Rebuilt:
    """Carry out ``select_plan``'s "rebuild" (a ``PlanRebuilder``, handed to the runtime by the
    commands that open backends): build from the package's ONNX of that precision
    with the chosen profiles and the shared timing cache, guard it on synthetic frames against
    ONNX Runtime fp32, and save it in the package when the folder is writable (not the zoo)."""
    if choice.action != "rebuild" or choice.source is None or choice.precision is None:
        raise BuildError(f"nothing to rebuild: {choice.reason}")
    kit = toolkit or tensorrt_toolkit()
    facts = kit.facts()
    if not facts.usable:
        raise BuildError(f"cannot rebuild here: {facts.problem}")
    m = package.manifest
    profiles = parse_profiles(choice.profiles) or make_profiles(m)
    onnx_bytes = package.read(choice.source)
    t0 = time.perf_counter()
    plan_bytes, built, _ = kit.build(
        onnx_bytes, profiles, choice.precision, workspace_mb=workspace_mb,
        timing_cache=default_timing_cache(facts),
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    frames = built[0]["frames"].opt  # a shape the plan is tuned for: (batch, C, side, side)
    samples = calibration_inputs(m, synthetic_frames(m, count=4), side=frames[2])
    guard = batched(samples, frames[0])
    with kit.runner(package, plan_bytes) as run:
        report = compare_runners(
            onnxruntime_runner(package.read(m.model)), run, guard, precision=choice.precision,
            candidate_label=f"rebuilt TensorRT {choice.precision} plan",
        )  # fmt: skip
    if not report.passed:
        raise BuildRejected(report, m.name, f"the rebuilt TensorRT {choice.precision} plan")
    plan = PlanInfo(
        file=plan_file_name(choice.precision, facts), tensorrt=str(facts.tensorrt),
        gpu=str(facts.gpu), compute_capability=str(facts.compute_capability),
        precision=choice.precision, profiles=dump_profiles(built), onnx=choice.source,
        build_seconds=round(seconds, 3), numerics=_report_record(report),
    )  # fmt: skip
    if is_zoo(package):
        return Rebuilt(package, plan, plan_bytes, seconds, report, "not saved (zoo package)")
    try:
        saved = add_plan(package, plan, plan_bytes)
    except OSError as e:
        return Rebuilt(package, plan, plan_bytes, seconds, report, f"not saved ({e})")
    return Rebuilt(saved, plan, plan_bytes, seconds, report, f"saved as {plan.file}")
