"""bioimage.io model packages in and out: an engine package as a bioimage.io model (rdf.yaml
format 0.5, ONNX weights, test tensors computed by running the engine, cover, documentation,
scopecast's extras under ``config.scopecast``), and a bioimage.io model with ONNX weights (or
PyTorch weights, converted with the ``train`` extra) as a verified engine package.

Out: the manifest's normalization becomes ``scale_linear`` pre- and postprocessing on raw ADU
(an electrons engine with the manifest's camera, the assumption it makes without a calibration
profile); temporal inputs (window, previous output, background) become further input tensors.

In: a leading run of fixed linear operations (``scale_linear``, ``fixed_zero_mean_unit_variance``)
becomes the manifest's normalization; everything after it (per-frame statistics:
``zero_mean_unit_variance``, ``scale_range``; ``clip``, ``sigmoid``, ``binarize``) and every
postprocessing step the manifest cannot express is baked into the ONNX graph; axes other than
(batch, channel, y, x) in that order are transposed or squeezed in the graph. What cannot be done
exactly is refused, naming the operation. The imported package is verified: scopecast's own
loader and ONNX Runtime must reproduce the model's test output within its tolerance.

Offline: needs ``bioimageio.spec``, ``bioimageio.core`` and ``onnx``, imported here only.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibration.errors import MissingExtra, ScopecastError
from engines.package import (
    EnginePackage,
    Manifest,
    Normalization,
    Temporal,
    Tiling,
    load_package,
    write_package,
)

INSTALL = "pip install -c requirements-lock.txt -e '.[bioimageio]'"
TEST_SIDE = 256
"""Side of the test input an export computes (rounded to the engine's tile and multiple)."""
DEFAULT_TILE = 256
"""Tile side (input pixels) an imported model gets when neither its rdf nor scopecast's extras
say one."""
FORMAT_VERSION = "0.5"


class BioimageioError(ScopecastError, ValueError):
    """A bioimage.io model that cannot become an engine package (or an engine that cannot
    become one): the message names what and says what to do."""


def need_bioimageio() -> None:
    """Raise MissingExtra naming the install command unless bioimageio.spec/core and onnx are
    importable."""
    try:
        import bioimageio.core
        import bioimageio.spec  # noqa: F401
        import onnx  # noqa: F401
    except ImportError as e:
        raise MissingExtra(
            f"bioimage.io import and export need the bioimageio extra ({e.name} is missing): "
            f"{INSTALL}"
        ) from None


# ------------------------------------------------------------------------------------------ out


@dataclass(frozen=True)
class ExportResult:
    """What ``export_bioimageio`` wrote and what the validator said."""

    path: Path
    status: str
    warnings: list[str]
    inputs: list[str]
    test_max_abs_error: float | None = None


def check_zip_name(out: Path) -> Path:
    """``out`` if it names a .zip file, else BioimageioError."""
    out = Path(out)
    if out.suffix.lower() != ".zip" or out.is_dir():
        raise BioimageioError(f"bioimage.io output {out}: give a .zip file name (OUT.zip)")
    return out


def _affine_adu(m: Manifest) -> tuple[float, float, float, float]:
    """(gain_in, offset_in, gain_out, offset_out): model input = raw * gain_in + offset_in,
    raw output = model output * gain_out + offset_out, raw in ADU (an electrons engine through
    the camera its manifest declares)."""
    n = m.normalization
    if n.units == "electrons":
        assert n.camera is not None
        g, o = n.camera.gain_adu_per_electron, n.camera.offset_adu
        return 1 / (g * n.scale), -(o / g + n.offset) / n.scale, n.scale * g, n.offset * g + o
    return 1 / n.scale, -n.offset / n.scale, n.scale, n.offset


def _test_frames(m: Manifest, side: int, seed: int = 0) -> list[np.ndarray]:
    """``window + 1`` consecutive float32 frames in ADU of a drifting synthetic specimen (blobs
    and lines, Poisson noise) in the engine's units: a plausible, reproducible test input."""
    from scipy.ndimage import gaussian_filter, shift

    rng = np.random.default_rng(seed)
    truth = np.zeros((side, side), np.float32)
    yy, xx = rng.integers(8, side - 8, (2, side // 6))
    truth[yy, xx] = rng.uniform(0.5, 1.0, yy.size)
    for _ in range(6):
        y0, x0, y1, x1 = rng.integers(0, side, 4)
        n = 4 * side
        t = np.linspace(0, 1, n)
        truth[(y0 + (y1 - y0) * t).astype(int), (x0 + (x1 - x0) * t).astype(int)] += 0.4
    truth = gaussian_filter(truth, 1.5)
    truth /= truth.max()
    n = m.normalization
    if n.units == "electrons":
        assert n.camera is not None
        gain, offset = n.camera.gain_adu_per_electron, n.camera.offset_adu
    else:
        gain, offset = 1.0, n.offset
    peak = 3 * n.scale * (n.camera.gain_adu_per_electron if n.camera else 1.0) / gain
    frames = []
    for i in range(m.temporal.window + 1):
        moved = shift(truth, (0.7 * i, 0.4 * i), order=1, mode="wrap")
        photons = rng.poisson(np.clip(moved, 0, None) * max(peak, 1.0) + 1.0)
        frames.append((offset + gain * photons).astype(np.float32))
    return frames


def _run_engine(
    package: EnginePackage, frames: list[np.ndarray]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The test inputs (raw ADU, bioimage.io layout) and the engine's output for them, computed
    by scopecast's own Engine on ONNX Runtime: frames[:-1] is the window, the previous output is
    the engine's output for the window before, the background the median of all frames."""
    from engines.engine import Engine

    m = package.manifest
    w = m.temporal.window
    engine = Engine(package, "onnxruntime-cpu", threads=1)
    try:
        background = np.median(np.stack(frames), axis=0).astype(np.float32)
        bg = background if m.temporal.background else None
        previous = None
        if m.temporal.previous_output:  # one frame earlier, as the server's ring would hold it
            previous = engine.run(frames[:w], None, bg, {})
        window = frames[1 : w + 1]
        y = engine.run(window, previous, bg, {})
    finally:
        engine.close()
    inputs = {"frames": np.stack(window)[None].astype(np.float32)}
    if previous is not None:
        inputs["previous"] = previous[None, None].astype(np.float32)
    if m.temporal.background:
        inputs["background"] = background[None, None]
    return inputs, y[None, None].astype(np.float32)


def _cover(x: np.ndarray, y: np.ndarray) -> bytes:
    """A 2:1 PNG: the raw test frame beside the engine's output, each contrast-stretched."""
    from PIL import Image

    def stretch(a: np.ndarray, side: int) -> Image.Image:
        lo, hi = np.percentile(a, (0.5, 99.8))
        u8 = (np.clip((a - lo) / max(hi - lo, 1e-12), 0, 1) * 255).astype(np.uint8)
        return Image.fromarray(u8).resize((side, side), Image.Resampling.BICUBIC)

    side = max(x.shape[-1], y.shape[-1])
    img = Image.new("L", (2 * side, side))
    img.paste(stretch(x, side), (0, 0))
    img.paste(stretch(y, side), (side, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _documentation(m: Manifest, gains: tuple[float, float, float, float], side: int) -> str:
    gi, oi, go, oo = gains
    t = m.temporal
    inputs = [
        "`frames`: the current frame"
        + (f" and the {t.window - 1} before it (oldest first, as channels)" if t.window > 1 else "")
    ]
    if t.previous_output:
        inputs.append(f"`previous`: the model's own previous output ({m.scale}x the frame's size)")
    if t.background:
        inputs.append(
            "`background`: a reference background (scopecast: running median of 9 frames)"
        )
    units = (
        f"photo-electrons: this package assumes the camera of the manifest (offset "
        f"{m.normalization.camera.offset_adu:g} ADU, gain "
        f"{m.normalization.camera.gain_adu_per_electron:g} ADU/e-); scopecast itself converts "
        "with the rig's calibration profile instead"
        if m.normalization.units == "electrons" and m.normalization.camera
        else "raw ADU"
    )
    tile = (
        "whole frame" if m.tile.size is None else f"{m.tile.size} px, overlap {m.tile.overlap} px"
    )
    lines = [
        f"# {m.name} {m.version}",
        "",
        m.description or f"{m.task} engine",
        "",
        (
            f"Exported from a scopecast engine package ({m.architecture}, task {m.task}, "
            f"x{m.scale})."
        ),
        "",
        "## Inputs and outputs",
        "",
        *(f"- {i}" for i in inputs),
        f"- output: float32, {m.scale}x the input's height and width, in the input's units",
        "",
        "## Normalization",
        "",
        (
            f"The engine works in {units}. Preprocessing `scale_linear` (gain {gi:.6g}, offset "
            f"{oi:.6g}) maps raw pixels to the model's units, postprocessing `scale_linear` "
            f"(gain {go:.6g}, offset {oo:.6g}) maps the output back."
        ),
        "",
        "## Tiling",
        "",
        (
            f"Input height and width: multiples of {m.tile.multiple}. scopecast runs tiles of "
            f"{tile}; the output halo is the part of a tile to discard at its borders."
        ),
        "",
        "## Test data",
        "",
        (
            f"A {side}x{side} synthetic frame (blobs and lines, Poisson noise) in the engine's "
            "units; the expected output was computed by scopecast's Engine on ONNX Runtime."
        ),
    ]
    if m.metrics:
        lines += [
            "",
            "## Validation metrics (training)",
            "",
            "```",
            json.dumps(m.metrics, indent=2, sort_keys=True),
            "```",
        ]
    return "\n".join(lines) + "\n"


def _test_side(m: Manifest) -> int:
    side = m.tile.size or TEST_SIDE
    side = -(-max(side, m.tile.multiple) // m.tile.multiple) * m.tile.multiple
    return side


def _halo(m: Manifest) -> int:
    """The input-side halo: half the tile overlap, rounded up."""
    return -(-m.tile.overlap // 2)


def _min_side(m: Manifest) -> int:
    """The smallest input side the rdf admits: a multiple of the tile multiple larger than the
    two halos."""
    k = m.tile.multiple
    return (2 * _halo(m) // k + 1) * k


def export_bioimageio(
    target: str | Path,
    out: Path,
    *,
    authors: Sequence[str] = (),
    license: str = "BSD-3-Clause",
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Write engine ``target`` (name or folder) as a bioimage.io model package ``out`` (.zip),
    then validate it with bioimageio.spec; return the validator's status and warnings."""
    need_bioimageio()
    import onnx
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5 as bio

    out = check_zip_name(out)
    package = load_package(target)
    m = package.manifest
    if m.channels != 1:
        raise BioimageioError(
            f"engine {m.name!r} has {m.channels} channels: scopecast's export writes "
            "single-channel engines (the server feeds one channel per frame)"
        )
    gains = _affine_adu(m)
    gi, oi, go, oo = gains
    side = _test_side(m)
    frames = _test_frames(m, side)
    test_in, test_out = _run_engine(package, frames)
    model_bytes = package.read(m.model)
    opset = max(
        (
            o.version
            for o in onnx.load_from_string(model_bytes).opset_import
            if o.domain in ("", "ai.onnx")
        ),
        default=17,
    )

    k, halo, s = m.tile.multiple, _halo(m), m.scale
    frames_id = bio.TensorId("frames")
    y_ref = bio.SizeReference(tensor_id=frames_id, axis_id=bio.AxisId("y"))
    x_ref = bio.SizeReference(tensor_id=frames_id, axis_id=bio.AxisId("x"))

    def pre() -> list[Any]:
        ops: list[Any] = []
        if gi != 1 or oi != 0:
            ops.append(bio.ScaleLinearDescr(kwargs=bio.ScaleLinearKwargs(gain=gi, offset=oi)))
        return ops  # bioimageio.spec adds the ensure_dtype float32 steps itself

    def data() -> Any:
        return bio.IntervalOrRatioDataDescr(type="float32")

    def yx_ref(grid: int) -> list[Any]:
        return [
            bio.SpaceInputAxis(id=bio.AxisId("y"), size=y_ref, scale=1 / grid),
            bio.SpaceInputAxis(id=bio.AxisId("x"), size=x_ref, scale=1 / grid),
        ]

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)

        def file(name: str, data_: bytes) -> Path:
            (tmp / name).write_bytes(data_)
            return tmp / name

        def npy(name: str, a: np.ndarray) -> Path:
            np.save(tmp / name, a)
            return tmp / name

        w = m.temporal.window
        names = [f"t-{w - 1 - i}" if i < w - 1 else "t" for i in range(w)]
        inputs = [
            bio.InputTensorDescr(
                id=frames_id,
                description=f"the newest {w} frame(s), oldest first" if w > 1 else "the frame",
                axes=[
                    bio.BatchAxis(),
                    bio.ChannelAxis(
                        channel_names=[bio.Identifier(n.replace("-", "_")) for n in names]
                    ),
                    bio.SpaceInputAxis(
                        id=bio.AxisId("y"), size=bio.ParameterizedSize(min=_min_side(m), step=k)
                    ),
                    bio.SpaceInputAxis(
                        id=bio.AxisId("x"), size=bio.ParameterizedSize(min=_min_side(m), step=k)
                    ),
                ],
                test_tensor=bio.FileDescr(source=npy("test_frames.npy", test_in["frames"])),
                data=data(),
                preprocessing=pre(),
            )
        ]
        extras = (  # the temporal inputs: (name, wanted, grid relative to the input, what)
            ("previous", m.temporal.previous_output, s,
             "the model's own previous output, in raw units"),
            ("background", m.temporal.background, 1,
             "a reference background for this stream, in raw units"),
        )  # fmt: skip
        for role, wanted, grid, description in extras:
            if not wanted:
                continue
            inputs.append(
                bio.InputTensorDescr(
                    id=bio.TensorId(role),
                    description=description,
                    axes=[
                        bio.BatchAxis(),
                        bio.ChannelAxis(channel_names=[bio.Identifier("c0")]),
                        *yx_ref(grid),
                    ],
                    test_tensor=bio.FileDescr(source=npy(f"test_{role}.npy", test_in[role])),
                    data=data(),
                    preprocessing=pre(),
                )
            )
        out_axis = bio.SpaceOutputAxisWithHalo if halo else bio.SpaceOutputAxis
        extra: dict[str, Any] = {"halo": halo * s} if halo else {}
        post: list[Any] = []
        if go != 1 or oo != 0:
            post.append(bio.ScaleLinearDescr(kwargs=bio.ScaleLinearKwargs(gain=go, offset=oo)))
        outputs = [
            bio.OutputTensorDescr(
                id=bio.TensorId("output"),
                description=f"the enhanced frame ({s}x), in raw units",
                axes=[
                    bio.BatchAxis(),
                    bio.ChannelAxis(channel_names=[bio.Identifier("c0")]),
                    out_axis(id=bio.AxisId("y"), size=y_ref, scale=1 / s, **extra),
                    out_axis(id=bio.AxisId("x"), size=x_ref, scale=1 / s, **extra),
                ],
                test_tensor=bio.FileDescr(source=npy("test_output.npy", test_out)),
                data=data(),
                postprocessing=post,
            )
        ]
        scopecast = {
            "engine": m.name,
            "version": m.version,
            "task": m.task,
            "architecture": m.architecture,
            "baseline": m.baseline,
            "scale": m.scale,
            "channels": m.channels,
            "output_dtype": m.output_dtype,
            "temporal": m.temporal.model_dump(mode="json"),
            "tile": m.tile.model_dump(mode="json"),
            "normalization": m.normalization.model_dump(mode="json"),
            "inputs": {"frames": "frames"}
            | ({"previous": "previous"} if m.temporal.previous_output else {})
            | ({"background": "background"} if m.temporal.background else {}),
            "model_sha256": m.files[m.model],
        }
        tags = ["scopecast", "2d", "onnx", "fluorescence-light-microscopy", *_task_tags(m.task)]
        descr = bio.ModelDescr(
            name=m.name,
            description=(m.description or f"scopecast {m.task} engine")[:1024],
            authors=[bio.Author(name=a) for a in (authors or ["scopecast"])],
            cite=[],
            license=license,
            documentation=bio.FileDescr(
                source=file("README.md", _documentation(m, gains, side).encode())
            ),
            covers=[
                bio.FileDescr(
                    source=file("cover.png", _cover(test_in["frames"][0, -1], test_out[0, 0]))
                )
            ],
            tags=tags,
            version=_version(m.version),
            inputs=inputs,
            outputs=outputs,
            weights=bio.WeightsDescr(
                onnx=bio.OnnxWeightsDescr(
                    source=file("model.onnx", model_bytes), opset_version=opset
                )
            ),
            config=bio.Config(scopecast=scopecast),
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        save_bioimageio_package(descr, output_path=out)
    if progress:
        progress(f"wrote {out}; validating with bioimageio.spec")
    status, warnings = validate(out)
    return ExportResult(
        path=out, status=status, warnings=warnings, inputs=[str(i.id) for i in inputs]
    )


def _task_tags(task: str) -> list[str]:
    return {
        "denoise": ["denoising"],
        "deblur": ["deblurring"],
        "super-resolution": ["super-resolution"],
        "denoise-super-resolution": ["denoising", "super-resolution"],
    }.get(task, [])


def _version(text: str) -> str | None:
    try:
        from packaging.version import Version

        Version(text)
        return text
    except Exception:  # noqa: BLE001  (any unparsable version: leave the field out)
        return None


def validate(source: Path | str) -> tuple[str, list[str]]:
    """bioimageio.spec's verdict on a package (zip or rdf.yaml): its status and warnings;
    raise BioimageioError with the errors if it is invalid."""
    from bioimageio.spec import InvalidDescr, load_description

    descr = load_description(source, format_version="discover")
    summary = descr.validation_summary
    if isinstance(descr, InvalidDescr) or summary.status == "failed":
        raise BioimageioError(
            f"{source} is not a valid bioimage.io description: {_errors(summary)}"
        )
    warnings = [
        f"{'.'.join(map(str, w.loc))}: {w.msg}" for d in summary.details for w in d.warnings
    ]
    return summary.status, warnings


def _errors(summary: Any) -> str:
    errs = [
        f"{'.'.join(map(str, e.loc)) or '(top)'}: {e.msg}"
        for d in summary.details
        for e in d.errors
    ]
    return "; ".join(errs[:8]) or summary.status


# ------------------------------------------------------------------------------------------- in


@dataclass
class _Plan:
    """How an imported model becomes a package: the normalization, what the graph must do
    around the model, and notes for the provenance."""

    normalization: Normalization = field(default_factory=Normalization)
    pre_graph: list[Any] = field(default_factory=list)  # ops applied in the graph, in order
    post_graph: list[Any] = field(default_factory=list)
    post_affine: tuple[float, float] | None = None  # graph output -> (y - offset) / scale
    whole_frame: bool = False  # per-frame statistics: tiles would change them
    mapped: list[str] = field(default_factory=list)
    baked: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ImportResult:
    """The verified package and how the model was mapped."""

    package: EnginePackage
    mapped: list[str]
    baked: list[str]
    max_abs_error: float
    tolerance: str


_LINEAR = ("scale_linear", "fixed_zero_mean_unit_variance")


def _op_id(op: Any) -> str:
    return str(op.id)


def _scalar(value: Any, what: str, model: str) -> float:
    """One float from a kwarg that may be a per-axis list of one element."""
    if isinstance(value, list | tuple):
        if len(value) != 1:
            raise BioimageioError(
                f"{model}: {what} has {len(value)} per-channel values {list(value)}: scopecast "
                "engines take one channel, so only one value can apply"
            )
        value = value[0]
    return float(value)


def _affine_of(op: Any, model: str) -> tuple[float, float]:
    """(a, b) with op(x) = a * x + b for a fixed linear operation."""
    kw = op.kwargs
    if _op_id(op) == "scale_linear":
        return _scalar(kw.gain, "scale_linear gain", model), _scalar(
            kw.offset, "scale_linear offset", model
        )
    mean = _scalar(kw.mean, "fixed_zero_mean_unit_variance mean", model)
    std = _scalar(kw.std, "fixed_zero_mean_unit_variance std", model)
    eps = float(getattr(kw, "eps", 1e-6))
    return 1 / (std + eps), -mean / (std + eps)


def _describe_op(op: Any) -> str:
    kw = op.kwargs.model_dump(mode="json") if hasattr(op.kwargs, "model_dump") else {}
    shown = ", ".join(f"{k}={v}" for k, v in kw.items() if v is not None)
    return f"{_op_id(op)}({shown})"


_BAKEABLE = ("zero_mean_unit_variance", "scale_range", "clip", "sigmoid", "binarize", *_LINEAR)


def _check_bakeable(op: Any, model: str, where: str, tensor: str) -> None:
    oid = _op_id(op)
    if oid == "ensure_dtype":
        if op.kwargs.dtype not in ("float32", "float64"):
            raise BioimageioError(
                f"{model}: {where} casts {tensor} to {op.kwargs.dtype} (ensure_dtype): scopecast "
                "engines compute in float32; only float32/float64 ensure_dtype steps are mapped"
            )
        return
    if oid not in _BAKEABLE:
        raise BioimageioError(
            f"{model}: {where} {_describe_op(op)} on {tensor!r} cannot be mapped to a scopecast "
            f"engine (mapped: {', '.join(_BAKEABLE)}, ensure_dtype float32); ask the model's "
            "authors for a variant without it, or bake it into the ONNX yourself"
        )
    kw = op.kwargs
    if oid in ("zero_mean_unit_variance", "scale_range", "clip"):
        axes = getattr(kw, "axes", None)
        stat = oid != "clip" or kw.min_percentile is not None or kw.max_percentile is not None
        if stat and (axes is None or "batch" in [str(a) for a in axes]):
            raise BioimageioError(
                f"{model}: {where} {_describe_op(op)} on {tensor!r} uses dataset statistics "
                "(axes include the batch or are unset): a live stream has no fixed data set; "
                "give fixed values (fixed_zero_mean_unit_variance, scale_linear) instead"
            )
    if oid == "scale_range" and kw.reference_tensor not in (None, tensor):
        raise BioimageioError(
            f"{model}: {where} scale_range on {tensor!r} takes its percentiles from another "
            f"tensor ({kw.reference_tensor}); scopecast can only use the frame's own"
        )
    if oid == "binarize" and isinstance(kw.threshold, list | tuple) and len(kw.threshold) != 1:
        raise BioimageioError(f"{model}: binarize with per-channel thresholds cannot be mapped")


def _plan(pre: Sequence[Any], post: Sequence[Any], model: str, tensor: str) -> _Plan:
    """The normalization: the leading fixed linear preprocessing (positive gain); the rest of the
    preprocessing, and the postprocessing unless it is exactly that normalization's inverse,
    go into the graph."""
    plan = _Plan()
    ops = [
        op
        for op in pre
        if _op_id(op) != "ensure_dtype" or op.kwargs.dtype not in ("float32", "float64")
    ]
    for op in pre:
        _check_bakeable(op, model, "preprocessing", tensor)
    a, b, i = 1.0, 0.0, 0
    while i < len(ops) and _op_id(ops[i]) in _LINEAR:
        a2, b2 = _affine_of(ops[i], model)
        if a * a2 <= 0:
            break
        a, b = a2 * a, a2 * b + b2
        plan.mapped.append(f"preprocessing {_describe_op(ops[i])} -> manifest normalization")
        i += 1
    # model input = a * x + b = (x - offset) / scale
    plan.normalization = Normalization(units="adu", offset=-b / a, scale=1 / a)
    plan.pre_graph = list(ops[i:])
    plan.baked += [f"preprocessing {_describe_op(op)} -> ONNX graph" for op in plan.pre_graph]
    plan.whole_frame = any(
        _op_id(op) in ("zero_mean_unit_variance", "scale_range")
        or (
            _op_id(op) == "clip"
            and (op.kwargs.min_percentile is not None or op.kwargs.max_percentile is not None)
        )
        for op in plan.pre_graph
    )
    for op in post:
        _check_bakeable(op, model, "postprocessing", tensor="output")
    post_ops = [op for op in post if _op_id(op) != "ensure_dtype"]
    # scopecast maps the graph's output back with y * scale + offset: with a, b above that is
    # y / a - b / a. A postprocessing that is exactly this needs nothing in the graph.
    pa, pb = 1.0, 0.0
    linear = all(_op_id(op) in _LINEAR for op in post_ops)
    if linear:
        for op in post_ops:
            a2, b2 = _affine_of(op, model)
            pa, pb = a2 * pa, a2 * pb + b2
    scale, offset = 1 / a, -b / a
    if (
        linear
        and math.isclose(pa, scale, rel_tol=1e-9)
        and math.isclose(pb, offset, rel_tol=1e-9, abs_tol=1e-9 * abs(scale))
    ):
        plan.mapped += [
            f"postprocessing {_describe_op(op)} -> manifest normalization (inverse)"
            for op in post_ops
        ]
        return plan
    plan.post_graph = post_ops
    plan.post_affine = (offset, scale)
    plan.baked += [f"postprocessing {_describe_op(op)} -> ONNX graph" for op in post_ops]
    plan.baked.append(
        f"ONNX graph output -> (y - {offset:.6g}) / {scale:.6g}, undone by the manifest "
        "normalization"
    )
    plan.whole_frame |= any(
        _op_id(op) in ("zero_mean_unit_variance", "scale_range") for op in post_ops
    )
    return plan


_BCYX = ("batch", "channel", "y", "x")


class _Graph:
    """Nodes appended around an ONNX model, in the forms of its opset."""

    def __init__(self, model: Any):
        from onnx import helper

        self.helper = helper
        self.opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.n = 0

    def name(self, hint: str) -> str:
        self.n += 1
        return f"scopecast_{hint}_{self.n}"

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        from onnx import numpy_helper

        name = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, kind: str, inputs: list[str], **attrs: Any) -> str:
        out = self.name(kind.lower())
        self.nodes.append(self.helper.make_node(kind, inputs, [out], **attrs))
        return out

    def reduce(self, kind: str, x: str, axes: list[int]) -> str:
        if self.opset >= 18 or (kind == "ReduceSum" and self.opset >= 13):
            return self.op(kind, [x, self.const(axes, np.int64)], keepdims=1)
        return self.op(kind, [x], axes=axes, keepdims=1)

    def squeeze(self, kind: str, x: str, axes: list[int]) -> str:
        if self.opset >= 13:
            return self.op(kind, [x, self.const(axes, np.int64)])
        return self.op(kind, [x], axes=axes)

    def quantile(self, x: str, q: float, axes: list[int]) -> str:
        """The linear-interpolated q-quantile over ``axes`` (numpy's default method), kept as
        (N, 1, 1, 1): sorted with TopK over the flattened (channel, y, x) of each image."""
        if q <= 0:
            return self.reduce("ReduceMin", x, axes)
        if q >= 1:
            return self.reduce("ReduceMax", x, axes)
        flat = self.op("Reshape", [x, self.const([0, -1], np.int64)])
        n = self.op("Gather", [self.op("Shape", [flat]), self.const([1], np.int64)], axis=0)
        ordered = self.name("sorted")
        self.nodes.append(
            self.helper.make_node(
                "TopK", [flat, n], [ordered, self.name("order")], axis=1, largest=0, sorted=1
            )
        )
        pos = self.op(
            "Mul",
            [
                self.op("Cast", [self.op("Sub", [n, self.const([1], np.int64)])], to=1),
                self.const([q]),
            ],
        )
        lo_f = self.op("Floor", [pos])
        lo = self.op("Cast", [lo_f], to=7)
        hi = self.op(
            "Min",
            [
                self.op("Add", [lo, self.const([1], np.int64)]),
                self.op("Sub", [n, self.const([1], np.int64)]),
            ],
        )
        v_lo = self.op("Gather", [ordered, lo], axis=1)
        v_hi = self.op("Gather", [ordered, hi], axis=1)
        frac = self.op("Sub", [pos, lo_f])
        v = self.op("Add", [v_lo, self.op("Mul", [frac, self.op("Sub", [v_hi, v_lo])])])
        return self.op("Reshape", [v, self.const([-1, 1, 1, 1], np.int64)])

    def apply(self, x: str, op: Any, model: str) -> str:
        """One bioimage.io processing step on ``x`` (N, C, H, W)."""
        oid, kw = _op_id(op), op.kwargs
        if oid in _LINEAR:
            a, b = _affine_of(op, model)
            return self.op("Add", [self.op("Mul", [x, self.const(a)]), self.const(b)])
        if oid == "sigmoid":
            return self.op("Sigmoid", [x])
        if oid == "binarize":
            t = _scalar(kw.threshold, "binarize threshold", model)
            return self.op("Cast", [self.op("Greater", [x, self.const(t)])], to=1)
        axes = _axes_of(kw, model)
        if oid == "zero_mean_unit_variance":
            mean = self.reduce("ReduceMean", x, axes)
            d = self.op("Sub", [x, mean])
            std = self.op("Sqrt", [self.reduce("ReduceMean", self.op("Mul", [d, d]), axes)])
            return self.op("Div", [d, self.op("Add", [std, self.const(float(kw.eps))])])
        if oid == "scale_range":
            lo = self.quantile(x, kw.min_percentile / 100, axes)
            hi = self.quantile(x, kw.max_percentile / 100, axes)
            span = self.op("Add", [self.op("Sub", [hi, lo]), self.const(float(kw.eps))])
            return self.op("Div", [self.op("Sub", [x, lo]), span])
        if oid == "clip":
            lo = self.const(kw.min) if kw.min is not None else None
            hi = self.const(kw.max) if kw.max is not None else None
            if kw.min_percentile is not None:
                lo = self.quantile(x, kw.min_percentile / 100, axes)
            if kw.max_percentile is not None:
                hi = self.quantile(x, kw.max_percentile / 100, axes)
            y = self.op("Max", [x, lo]) if lo else x
            return self.op("Min", [y, hi]) if hi else y
        raise BioimageioError(f"{model}: {_describe_op(op)} cannot be baked into the graph")


def _axes_of(kw: Any, model: str) -> list[int]:
    """The (N, C, H, W) indices a statistic reduces over; percentiles need (y, x) at least."""
    axes = getattr(kw, "axes", None)
    if axes is None:
        return [1, 2, 3]
    ids = [str(a) for a in axes]
    bad = [a for a in ids if a not in _BCYX[1:]]
    if bad:
        raise BioimageioError(f"{model}: statistics over axes {ids} ({bad} unknown to a 2-D frame)")
    idx = sorted(_BCYX.index(a) for a in ids)
    if not {2, 3} <= set(idx):
        raise BioimageioError(
            f"{model}: statistics over axes {ids} only: scopecast computes them over whole "
            "(y, x) planes; per-row or per-column statistics are not mapped"
        )
    return idx


def _rename(graph: Any, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
    for vi in [*graph.output, *graph.value_info]:
        if vi.name == old:
            vi.name = new


def _axis_ids(axes: Sequence[Any], model: str, tensor: str) -> list[str]:
    """The axes as batch/channel/y/x, refusing any other kind (z, time, index)."""
    ids = []
    for ax in axes:
        kind = ax.type
        aid = "batch" if kind == "batch" else "channel" if kind == "channel" else str(ax.id)
        if kind == "space" and aid in ("y", "x"):
            ids.append(aid)
        elif kind in ("batch", "channel"):
            ids.append(kind)
        else:
            raise BioimageioError(
                f"{model}: tensor {tensor!r} has a {kind} axis {aid!r}: scopecast engines take "
                "2-D frames (axes batch, channel, y, x); 3-D, time and index axes are not mapped"
            )
    if "y" not in ids or "x" not in ids:
        raise BioimageioError(f"{model}: tensor {tensor!r} has axes {ids}: it needs y and x")
    return ids


def _to_bcyx(a: np.ndarray, ids: list[str]) -> np.ndarray:
    """An array in ``ids`` order as (N, C, H, W)."""
    present = [i for i in _BCYX if i in ids]
    a = np.transpose(a, [ids.index(i) for i in present])
    for i, name in enumerate(_BCYX):
        if name not in ids:
            a = np.expand_dims(a, i)
    return a


def _safe_engine_name(text: str) -> str:
    import re

    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")[:64]
    return name or "bioimageio-model"


def _onnx_bytes(descr: Any, model: str, tmp: Path) -> tuple[bytes, str]:
    """The model's ONNX weights, or its TorchScript / PyTorch state-dict weights converted to
    ONNX with bioimageio.core's converters (needs torch: the train extra)."""
    w = descr.weights
    if w.onnx is not None:
        if getattr(w.onnx, "external_data", None) is not None:
            raise BioimageioError(
                f"{model}: its ONNX weights keep their tensors in an external data file; "
                "scopecast packages hold one self-contained model.onnx: re-save it inline"
            )
        return w.onnx.get_reader().read(), "onnx"
    present = [k for k in ("torchscript", "pytorch_state_dict") if getattr(w, k) is not None]
    if not present:
        formats = [k for k, v in w if v is not None] if hasattr(w, "__iter__") else []
        raise BioimageioError(
            f"{model}: no ONNX, TorchScript or PyTorch weights (it has "
            f"{', '.join(formats) or 'none'}); "
            "scopecast runs ONNX: convert the weights to ONNX first"
        )
    try:
        import torch  # noqa: F401
    except ImportError:
        raise MissingExtra(
            f"{model} has {present[0]} weights but no ONNX: converting them needs the train "
            "extra (torch): pip install -c requirements-lock.txt -e '.[train,bioimageio]'"
        ) from None
    if present[0] == "torchscript":
        from bioimageio.core.weight_converters.torchscript_to_onnx import convert
    else:
        from bioimageio.core.weight_converters.pytorch_to_onnx import convert
    path = tmp / "converted.onnx"
    try:
        convert(descr, path)
    except Exception as e:
        raise BioimageioError(
            f"{model}: converting its {present[0]} weights to ONNX failed: {e}"
        ) from e
    return path.read_bytes(), present[0]


def _load_model_descr(source: Path) -> Any:
    from bioimageio.spec import InvalidDescr, load_description
    from bioimageio.spec.model import v0_5

    if not source.exists():
        raise BioimageioError(f"{source} does not exist: give a bioimage.io model .zip or rdf.yaml")
    descr = load_description(str(source), format_version="latest")
    if isinstance(descr, InvalidDescr):
        raise BioimageioError(
            f"{source} is not a valid bioimage.io description: {_errors(descr.validation_summary)}"
        )
    if descr.type != "model" or not isinstance(descr, v0_5.ModelDescr):
        raise BioimageioError(
            f"{source} describes a bioimage.io {descr.type}, not a model: only models import"
        )
    return descr


def _size_plan(
    descr: Any, ids: list[str], out_ids: list[str], model: str, cfg: dict[str, Any]
) -> tuple[int, Tiling]:
    """The scale and tiling from the axes: ParameterizedSize(min, step) -> multiple of step;
    output halo -> overlap; config.scopecast.tile (a scopecast export) wins where present."""
    from bioimageio.spec.model import v0_5

    inp, out = descr.inputs[0], descr.outputs[0]
    in_axes = {ids[i]: ax for i, ax in enumerate(inp.axes)}
    out_axes = {out_ids[i]: ax for i, ax in enumerate(out.axes)}
    scales, halo, multiple, fixed = [], 0, 1, None
    for a in ("y", "x"):
        size = in_axes[a].size
        if isinstance(size, v0_5.ParameterizedSize):
            if size.min % size.step:
                raise BioimageioError(
                    f"{model}: input {a} sizes are {size.min} + n*{size.step}: scopecast pads "
                    "frames to multiples of one number; a minimum that is not a multiple of the "
                    "step is not mapped"
                )
            multiple = max(multiple, size.step)
        elif isinstance(size, int):
            fixed = size
        else:
            raise BioimageioError(f"{model}: input {a} size {size!r} is not mapped")
        osz = out_axes[a].size
        if (
            not isinstance(osz, v0_5.SizeReference)
            or str(osz.tensor_id) != str(inp.id)
            or osz.offset
        ):
            raise BioimageioError(
                f"{model}: output {a} size {osz!r} does not follow the input's {a} size: "
                "scopecast needs outputs of scale x the input (a SizeReference, offset 0)"
            )
        ratio = in_axes[str(osz.axis_id)].scale / out_axes[a].scale
        scales.append(ratio)
        halo = max(halo, int(getattr(out_axes[a], "halo", 0) or 0))
    if len({round(s, 6) for s in scales}) != 1 or round(scales[0], 6) not in (1, 2, 4):
        raise BioimageioError(
            f"{model}: output scale {scales} (y, x): scopecast engines scale by 1, 2 or 4 in both"
        )
    scale = round(scales[0])
    overlap = -(-2 * halo // scale)
    if fixed is not None:
        if overlap >= fixed:
            raise BioimageioError(
                f"{model}: fixed input size {fixed} is not larger than its halos ({overlap})"
            )
        return scale, Tiling(size=fixed, overlap=overlap, multiple=fixed)
    if cfg.get("tile"):
        return scale, Tiling.model_validate(cfg["tile"])
    overlap = -(-overlap // multiple) * multiple
    size = max(DEFAULT_TILE, overlap + multiple)
    size = -(-size // multiple) * multiple
    return scale, Tiling(size=size, overlap=overlap, multiple=multiple)


def _adapt_graph(
    model_bytes: bytes, descr: Any, plan: _Plan, ids: list[str], out_ids: list[str], model: str
) -> tuple[bytes, bool]:
    """The ONNX with scopecast's I/O: input 'frames' (N, C, H, W), the baked steps, one output
    (N, C, H', W'). Unchanged bytes when nothing needs doing."""
    import onnx
    from onnx import TensorProto, helper, version_converter

    m = onnx.load_from_string(model_bytes)
    inits = {i.name for i in m.graph.initializer}
    graph_inputs = [i for i in m.graph.input if i.name not in inits]
    if len(graph_inputs) != 1 or len(m.graph.output) != 1:
        raise BioimageioError(
            f"{model}: its ONNX has inputs {[i.name for i in graph_inputs]} and outputs "
            f"{[o.name for o in m.graph.output]}: scopecast maps models of one input and one output"
        )
    gin, gout = graph_inputs[0], m.graph.output[0]
    if gin.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise BioimageioError(
            f"{model}: its ONNX input {gin.name!r} is of type "
            f"{TensorProto.DataType.Name(gin.type.tensor_type.elem_type)}: scopecast feeds float32"
        )
    identity_io = ids == list(_BCYX) and out_ids == list(_BCYX)
    if identity_io and not plan.pre_graph and plan.post_affine is None and gin.name == "frames":
        return model_bytes, False
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 13:
        m = version_converter.convert_version(m, 13)
    g = _Graph(m)
    inner_in, inner_out = g.name("model_input"), g.name("model_output")
    _rename(m.graph, gin.name, inner_in)
    _rename(m.graph, gout.name, inner_out)
    x = "frames"
    for op in plan.pre_graph:
        x = g.apply(x, op, model)
    missing = [i for i, a in enumerate(_BCYX) if a not in ids]
    if missing:
        x = g.squeeze("Squeeze", x, missing)
    present = [a for a in _BCYX if a in ids]
    perm = [present.index(a) for a in ids]
    if perm != sorted(perm):
        x = g.op("Transpose", [x], perm=perm)
    front = [*g.nodes]
    g.nodes = []
    y = inner_out
    present_out = [a for a in _BCYX if a in out_ids]
    perm = [out_ids.index(a) for a in present_out]
    if perm != sorted(perm):
        y = g.op("Transpose", [y], perm=perm)
    missing = [i for i, a in enumerate(_BCYX) if a not in out_ids]
    if missing:
        y = g.squeeze("Unsqueeze", y, missing)
    for op in plan.post_graph:
        y = g.apply(y, op, model)
    if plan.post_affine is not None:
        offset, scale = plan.post_affine
        y = g.op("Mul", [g.op("Sub", [y, g.const(offset)]), g.const(1 / scale)])
    g.nodes.append(helper.make_node("Identity", [y], ["output"]))
    front.append(helper.make_node("Identity", [x], [inner_in]))
    nodes = [*front, *m.graph.node, *g.nodes]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.graph.initializer.extend(g.inits)
    m.graph.input.remove(gin)
    m.graph.input.insert(
        0, helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["N", "C", "H", "W"])
    )
    m.graph.output.remove(gout)
    m.graph.output.append(
        helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", "C", "OH", "OW"])
    )
    del m.graph.value_info[:]
    onnx.checker.check_model(m)
    return m.SerializeToString(), True


def _tolerance(descr: Any) -> tuple[float, float, float]:
    """(rtol, atol, mismatched per million) for the ONNX weights, from the rdf or its defaults."""
    for t in descr.config.bioimageio.reproducibility_tolerance:
        if not t.weights_formats or "onnx" in t.weights_formats:
            return t.relative_tolerance, t.absolute_tolerance, t.mismatched_elements_per_million
    return 1e-3, 1e-4, 100


def import_bioimageio(
    source: Path,
    out: Path,
    *,
    name: str | None = None,
    task: str | None = None,
    tile: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> ImportResult:
    """Turn a bioimage.io model (.zip or rdf.yaml) into a verified engine package in ``out``."""
    need_bioimageio()
    from bioimageio.spec.utils import load_array

    source = Path(source)
    descr = _load_model_descr(source)
    model = f"bioimage.io model {descr.name!r} ({source.name})"
    cfg: dict[str, Any] = dict((descr.config.model_extra or {}).get("scopecast") or {})
    required = [t for t in descr.inputs if not t.optional]
    roles = {str(v): k for k, v in (cfg.get("inputs") or {}).items()}
    if len(required) != 1 and not roles:
        raise BioimageioError(
            f"{model} has {len(required)} inputs ({', '.join(str(t.id) for t in required)}): "
            "scopecast maps models of one input (the frame), or scopecast's own temporal "
            "exports (config.scopecast.inputs)"
        )
    if len(descr.outputs) != 1:
        raise BioimageioError(
            f"{model} has {len(descr.outputs)} outputs "
            f"({', '.join(str(t.id) for t in descr.outputs)}): "
            "scopecast engines have one output"
        )
    frames = next((t for t in required if roles.get(str(t.id), "frames") == "frames"), required[0])
    others = [t for t in required if t is not frames]
    ids = _axis_ids(frames.axes, model, str(frames.id))
    out_ids = _axis_ids(descr.outputs[0].axes, model, str(descr.outputs[0].id))
    temporal = Temporal.model_validate(cfg.get("temporal") or {})
    for tensor, tids in ((frames, ids), (descr.outputs[0], out_ids)):
        if "channel" in tids:
            n = len(tensor.axes[tids.index("channel")].channel_names)
            want = temporal.window if tensor is frames else 1
            if n != want:
                raise BioimageioError(
                    f"{model}: tensor {str(tensor.id)!r} has {n} channels: scopecast feeds one "
                    "channel per frame" + (f" (window {temporal.window})" if want > 1 else "")
                )
    plan = _plan(frames.preprocessing, descr.outputs[0].postprocessing, model, str(frames.id))
    if others and (plan.pre_graph or plan.post_affine is not None or ids != list(_BCYX)):
        raise BioimageioError(
            f"{model}: a temporal model's steps must all map to the manifest (got "
            f"{'; '.join(plan.baked) or 'axes ' + str(ids)}); export it again from scopecast"
        )
    for t in others:
        if _plan(t.preprocessing, [], model, str(t.id)).normalization != plan.normalization:
            raise BioimageioError(
                f"{model}: input {str(t.id)!r} is normalized unlike {str(frames.id)!r}; scopecast "
                "normalizes all of an engine's inputs alike"
            )
    scale, tiling = _size_plan(descr, ids, out_ids, model, cfg)
    if tile is not None:
        tiling = Tiling(
            size=tile, overlap=tiling.overlap, multiple=tiling.multiple, batch=tiling.batch
        )
    if plan.whole_frame:
        tiling = Tiling(size=None, overlap=tiling.overlap, multiple=tiling.multiple)
    if "batch" not in ids or "batch" not in out_ids:
        tiling = tiling.model_copy(update={"batch": 1})
    norm = plan.normalization
    if cfg.get("normalization"):  # a scopecast export: its units, if the rdf agrees
        theirs = Normalization.model_validate(cfg["normalization"])
        probe = Manifest(name="probe", task="denoise", architecture="x", normalization=theirs)
        gi, oi, _, _ = _affine_adu(probe)
        if math.isclose(gi, 1 / norm.scale, rel_tol=1e-6) and math.isclose(
            oi, -norm.offset / norm.scale, rel_tol=1e-6, abs_tol=1e-9
        ):
            norm = theirs
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_bytes, weights_from = _onnx_bytes(descr, model, tmp)
        model_bytes, rewritten = (
            _adapt_graph(model_bytes, descr, plan, ids, out_ids, model)
            if not others
            else (model_bytes, False)
        )
        if others:
            expected = {
                str(t.id): role
                for t, role in (
                    (frames, "frames"),
                    *((t, roles.get(str(t.id), "")) for t in others),
                )
            }
            if any(k != v for k, v in expected.items()):
                raise BioimageioError(f"{model}: inputs {expected} do not carry scopecast's names")
        task_ = task or cfg.get("task") or _task_from(descr, scale)
        manifest = Manifest(
            name=name or cfg.get("engine") or _safe_engine_name(descr.name),
            version=str(descr.version) if descr.version else cfg.get("version", "0.1.0"),
            task=task_,
            baseline=bool(cfg.get("baseline", False)),
            description=descr.description or "",
            architecture=cfg.get("architecture") or f"bioimageio:{_safe_engine_name(descr.name)}",
            scale=scale,
            channels=1,
            output_dtype=cfg.get("output_dtype", "float32"),
            temporal=temporal,
            tile=tiling,
            normalization=norm,
            precision="fp32",
            provenance={
                "bioimageio": {
                    "name": descr.name,
                    "id": str(descr.id) if descr.id else None,
                    "version": str(descr.version) if descr.version else None,
                    "format_version": descr.format_version,
                    "source": source.name,
                    "source_sha256": _sha256(source) if source.is_file() else None,
                    "weights": weights_from,
                    "graph_rewritten": rewritten,
                    "mapped": plan.mapped,
                    "baked": plan.baked,
                    "whole_frame": plan.whole_frame,
                }
            },
        )
        staged = write_package(tmp / "package", manifest, {"model.onnx": model_bytes})
        inputs = {
            ("frames" if t is frames else roles[str(t.id)]): _to_bcyx(
                load_array(t.test_tensor), _axis_ids(t.axes, model, str(t.id))
            )
            for t in [frames, *others]
        }
        expected_out = _to_bcyx(load_array(descr.outputs[0].test_tensor), out_ids)
        err, tol = _verify(staged.path, inputs, expected_out, _tolerance(descr), model)
        if progress:
            progress(
                f"verified: scopecast reproduces the test output (max abs error {err:.3g}, {tol})"
            )
        final = write_package(Path(out), manifest, {"model.onnx": model_bytes})
    return ImportResult(
        package=final, mapped=plan.mapped, baked=plan.baked, max_abs_error=err, tolerance=tol
    )


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _task_from(descr: Any, scale: int) -> str:
    tags = {str(t).lower() for t in descr.tags}
    if scale > 1:
        return "denoise-super-resolution" if "denoising" in tags else "super-resolution"
    if tags & {"deblurring", "deconvolution", "deblur"}:
        return "deblur"
    return "denoise"


def _verify(
    folder: Path,
    inputs: dict[str, np.ndarray],
    expected: np.ndarray,
    tolerance: tuple[float, float, float],
    model: str,
) -> tuple[float, str]:
    """Load the staged package with scopecast's loader, run the test input through the manifest
    normalization and ONNX Runtime, and compare with the model's test output."""
    from engines.runtime import open_backend

    package = load_package(folder)
    gi, oi, go, oo = _affine_adu(package.manifest)
    backend, _ = open_backend(package, "onnxruntime-cpu", threads=1)
    try:
        batch = {
            k: (v.astype(np.float32) * np.float32(gi) + np.float32(oi)).astype(np.float32)
            for k, v in inputs.items()
        }
        y = backend.infer(batch) * np.float32(go) + np.float32(oo)
    finally:
        backend.close()
    rtol, atol, per_million = tolerance
    text = f"rtol {rtol:g}, atol {atol:g}, {per_million:g} mismatches per million allowed"
    if y.shape != expected.shape:
        raise BioimageioError(
            f"{model}: the imported engine gives shape {y.shape}, its test output is "
            f"{expected.shape}"
        )
    diff = np.abs(y.astype(np.float64) - expected)
    bad = np.count_nonzero(diff > atol + rtol * np.abs(expected))
    err = float(diff.max())
    if bad > per_million * diff.size / 1e6:
        raise BioimageioError(
            f"{model}: the imported engine does not reproduce the model's test output ({bad} of "
            f"{diff.size} values off, max abs error {err:.3g}; {text}): not written"
        )
    return err, text
