"""Float engine package -> raw-io package: the graph takes the raw uint16 (or uint8) frames and
returns the written frame, so no per-pixel work remains in Python between receive and write.

The new graph is the original one between a prologue and an epilogue (``engines.package``'s
docstring has the I/O convention):

- prologue, per input: ``Cast`` to float32; for an electrons engine ``(x - offset_map) /
  gain_map`` (the rig's conversion, fed by the server from its calibration profile); then
  ``(x - offset) * (1 / scale)``, the manifest's normalization, in the float path's order.
- epilogue: ``y * scale + offset``; for electrons ``* gain_map_out + offset_map_out``; then
  ``Round`` (half to even, as ``np.rint``), ``Clip`` to the dtype's range, ``Cast`` to it. The
  sum of ``y`` goes out as ``checksum``: the server's NaN/inf check on one number.

The rig's offset map and flat field are graph inputs, not constants baked in: one package then
serves any rig and any ROI (a baked map fits one camera and one frame size), tiles cut the maps
like the frames, and a scalar camera costs nothing (its maps are (1, 1, 1, 1) and broadcast).
Bad pixels are not in the graph (a median of good neighbours per pixel): the engine patches
those few pixels of a copy of the frame before the graph (``engines.engine``).

Plans are dropped: TensorRT has no uint16 tensors, and a plan was built from the float graph.
Before the package is written, the tool checks it against the float package (ONNX Runtime,
the same frames, plain and temporal): at most 1 ADU apart after rounding, else it refuses.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calibration.errors import ScopecastError
from calibration.units import Electrons
from engines.engine import Engine, EngineChain
from engines.package import (
    ENGINE_NAME,
    EnginePackage,
    Manifest,
    PackageError,
    find_package,
    load_package,
    write_package,
)

DTYPES = {"uint16": TensorProto.UINT16, "uint8": TensorProto.UINT8}
#: the most a raw-io package's written frame may differ from the float package's, in ADU
MAX_ADU = 1.0
PREFIX = "engine/"
_FLOAT = TensorProto.FLOAT


class RawIoError(ScopecastError, ValueError):
    """A package that cannot be made raw-io, or a raw-io graph that does not match its source."""


@dataclasses.dataclass(frozen=True)
class RawIoResult:
    package: EnginePackage
    max_adu: float
    """Largest |raw-io - float| of the written frames in the check (ADU)."""
    frames_checked: int


def wrap_model(model: onnx.ModelProto, manifest: Manifest, dtype: str) -> onnx.ModelProto:
    """``model`` (float I/O, ``manifest``'s convention) as a raw-io graph taking ``dtype``."""
    if dtype not in DTYPES:
        raise RawIoError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 11:
        raise RawIoError(
            f"{manifest.name!r}: model opset {opset} is below 11 (Round, Clip with bounds): "
            "re-export it with a newer opset"
        )
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in
             model.graph.initializer}]  # fmt: skip
    if sorted(names) != sorted(manifest.input_names):
        raise RawIoError(
            f"{manifest.name!r}: model inputs {names}, manifest implies {manifest.input_names}: "
            "fix the source package first (`scopecast engines verify`)"
        )
    inner = onnx.compose.add_prefix(model, PREFIX)
    g = inner.graph
    norm = manifest.normalization
    electrons = norm.units == "electrons"
    grid = "_out" if manifest.scale > 1 else ""
    out_maps = (f"offset_map{grid}", f"gain_map{grid}")
    nodes: list[onnx.NodeProto] = []
    consts: list[onnx.TensorProto] = []

    def const(name: str, value: float) -> str:
        consts.append(numpy_helper.from_array(np.array(value, np.float32), f"raw_io/{name}"))
        return f"raw_io/{name}"

    def op(kind: str, inputs: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(kind, inputs, [out], name=out, **attrs))
        return out

    raw = DTYPES[dtype]
    types = manifest.model_copy(update={"io": "raw", "raw_dtype": dtype}).io_dtypes
    elem = {"float32": _FLOAT, **DTYPES}
    graph_inputs = []
    by_name = {i.name: i for i in model.graph.input}
    for name in manifest.input_names[: 1 + manifest.temporal.previous_output
                                     + manifest.temporal.background]:  # fmt: skip
        source = by_name[name]
        dims = [d.dim_param or d.dim_value for d in source.type.tensor_type.shape.dim]
        graph_inputs.append(helper.make_tensor_value_info(name, elem[types[name]], dims or None))
        x = name
        if types[name] != "float32":
            x = op("Cast", [x], f"raw_io/{name}/float", to=_FLOAT)
        if electrons:
            offset, gain = ("offset_map", "gain_map") if name != "previous" else out_maps
            x = op("Sub", [x, offset], f"raw_io/{name}/dark")
            x = op("Div", [x, gain], f"raw_io/{name}/electrons")
        if norm.offset:
            x = op("Sub", [x, const(f"{name}/offset", norm.offset)], f"raw_io/{name}/centred")
        if norm.scale != 1:
            x = op("Mul", [x, const(f"{name}/inv_scale", 1.0 / norm.scale)], f"raw_io/{name}/n")
        nodes.append(helper.make_node("Identity", [x], [PREFIX + name], name=f"raw_io/{name}"))
    if electrons:
        maps = ["offset_map", "gain_map"] + (list(out_maps) if manifest.scale > 1 else [])
        for name in maps:
            grid = "_out" if name.endswith("_out") else ""
            dims = [f"map_n{grid}", 1, f"map_h{grid}", f"map_w{grid}"]
            graph_inputs.append(helper.make_tensor_value_info(name, _FLOAT, dims))

    head = g.output[0]
    y = head.name
    nodes_before = len(nodes)
    checksum = op("ReduceSum", [y], "checksum", keepdims=0)
    if norm.scale != 1:
        y = op("Mul", [y, const("out/scale", norm.scale)], "raw_io/out/scaled")
    if norm.offset:
        y = op("Add", [y, const("out/offset", norm.offset)], "raw_io/out/shifted")
    if electrons:
        y = op("Mul", [y, out_maps[1]], "raw_io/out/adu_gain")
        y = op("Add", [y, out_maps[0]], "raw_io/out/adu")
    out_type = elem[types["output"]]
    if types["output"] != "float32":
        info = np.iinfo(np.dtype(dtype))
        y = op("Round", [y], "raw_io/out/rounded")
        lo, hi = const("out/min", float(info.min)), const("out/max", float(info.max))
        y = op("Clip", [y, lo, hi], "raw_io/out/clipped")
        y = op("Cast", [y], "frame", to=raw)
    else:
        y = op("Identity", [y], "frame")
    post = nodes[nodes_before:]
    del nodes[nodes_before:]
    dims = [d.dim_param or d.dim_value for d in head.type.tensor_type.shape.dim]
    graph = helper.make_graph(
        [*nodes, *g.node, *post],
        f"{manifest.name}-raw-io",
        graph_inputs,
        [
            helper.make_tensor_value_info("frame", out_type, dims or None),
            helper.make_tensor_value_info(checksum, _FLOAT, []),
        ],
        initializer=[*consts, *g.initializer],
        value_info=list(g.value_info),
    )
    wrapped = helper.make_model(
        graph, opset_imports=list(model.opset_import), ir_version=model.ir_version,
        producer_name="scopecast raw-io",
    )  # fmt: skip
    onnx.checker.check_model(wrapped, full_check=True)
    return wrapped


def raw_manifest(manifest: Manifest, dtype: str, name: str) -> Manifest:
    """The source manifest for its raw-io graph: same engine, ``io`` raw, no plans."""
    provenance = {
        **manifest.provenance,
        "raw_io": {
            "source": manifest.name,
            "source_version": manifest.version,
            "source_model_sha256": manifest.files.get(manifest.model, ""),
            "dtype": dtype,
            "tool": "scopecast engines raw-io",
        },
    }
    description = (
        manifest.description
        + (" " if manifest.description else "")
        + (f"Raw-io graph of {manifest.name}: takes {dtype} frames, returns the written frame.")
    )
    return manifest.model_copy(
        update={
            "name": name,
            "io": "raw",
            "raw_dtype": dtype,
            "plans": [],
            "files": {},
            "model": "model.onnx",
            "provenance": provenance,
            "description": description,
            "held_out": [],
        }
    )


def make_raw_package(
    source: str | Path,
    out: Path,
    *,
    dtype: str = "uint16",
    name: str | None = None,
    check: bool = True,
    progress: Callable[[str], None] | None = None,
) -> RawIoResult:
    """Write the raw-io package of ``source`` (name or folder) to ``out``; with ``check``,
    refuse it unless it writes the float package's frames within :data:`MAX_ADU`."""
    package = load_package(source)
    m = package.manifest
    if m.io != "float":
        raise RawIoError(f"{m.name!r} is already a raw-io package ({m.raw_dtype}): give its source")
    if dtype not in DTYPES:
        raise RawIoError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    name = name or f"{m.name}-raw" + ("" if dtype == "uint16" else f"-{dtype}")
    if not ENGINE_NAME.match(name):
        raise RawIoError(f"engine name {name!r} is not allowed: use 1-64 of a-z 0-9 . _ -")
    out = Path(out)
    try:
        if out.resolve() == find_package(source).resolve():
            raise RawIoError(f"--out {out} is the source package: write it to a new folder")
    except PackageError:
        pass
    model = onnx.load_from_string(package.read(m.model))
    wrapped = wrap_model(model, m, dtype)
    manifest = raw_manifest(m, dtype, name)
    files = {"model.onnx": wrapped.SerializeToString()}
    result = None
    if check:
        with tempfile.TemporaryDirectory() as tmp:
            candidate = write_package(Path(tmp) / name, manifest, files)
            max_adu, count = check_parity(package, candidate, dtype)
        if progress:
            progress(f"raw-io vs float on {count} frames: max {max_adu:g} ADU")
        if max_adu > MAX_ADU:
            raise RawIoError(
                f"the raw-io graph of {m.name!r} writes frames up to {max_adu:g} ADU away from "
                f"the float package's (limit {MAX_ADU:g}): not written"
            )
        manifest = manifest.model_copy(
            update={
                "provenance": {
                    **manifest.provenance,
                    "raw_io": {
                        **manifest.provenance["raw_io"],
                        "parity_max_adu": max_adu,
                        "parity_frames": count,
                    },
                }
            }
        )
        result = (max_adu, count)
    written = write_package(out, manifest, files)
    max_adu, count = result or (float("nan"), 0)
    return RawIoResult(written, max_adu, count)


def _frames(shape: tuple[int, int], count: int, dtype: str, seed: int = 0) -> list[np.ndarray]:
    """Smooth structure plus noise around a camera offset, as ``dtype``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    top = np.iinfo(np.dtype(dtype)).max
    base = (0.05 + 0.04 * np.sin(yy / 5.0) * np.cos(xx / 7.0)) * top
    return [
        (base + rng.normal(0, 0.004 * top, shape)).clip(0, top).astype(dtype) for _ in range(count)
    ]


def check_parity(
    source: EnginePackage,
    raw: EnginePackage,
    dtype: str,
    *,
    backend: str = "onnxruntime-cpu",
    units: Electrons | None = None,
    shape: tuple[int, int] | None = None,
) -> tuple[float, int]:
    """Run both packages on the same frame sequence (the temporal state carried as the server
    does); return the largest |difference| of the written frames (ADU) and the frames run."""
    m = source.manifest
    if shape is None:
        side = max(m.tile.multiple * 4, 48)
        side += -side % m.tile.multiple
        shape = (side, side + m.tile.multiple)
    frames = _frames(shape, m.temporal.window + 2, dtype)
    worst, count = 0.0, 0
    with_float = EngineChain([Engine(source, backend, 1, units=units)])
    with_raw = EngineChain([Engine(raw, backend, 1, units=units)])
    try:
        prev_f: dict[int, np.ndarray] = {}
        prev_r: dict[int, np.ndarray] = {}
        for i in range(len(frames)):
            window = frames[max(0, i + 1 - m.temporal.window) : i + 1]
            background = np.median(frames[: i + 1], axis=0).astype(np.float32)
            bg = background if m.temporal.background else None
            a = with_float.enhance(window, prev_f, bg)
            b = with_raw.enhance(window, prev_r, bg)
            prev_f = {s.stage: s.output for s in a.stages}
            prev_r = {s.stage: s.output for s in b.stages}
            if a.frame.shape != b.frame.shape or a.frame.dtype != b.frame.dtype:
                raise RawIoError(
                    f"raw-io frame {b.frame.shape} {b.frame.dtype}, float frame "
                    f"{a.frame.shape} {a.frame.dtype}"
                )
            diff = np.abs(a.frame.astype(np.float64) - b.frame.astype(np.float64))
            worst = max(worst, float(diff.max()))
            count += 1
    finally:
        with_float.close()
        with_raw.close()
    return worst, count
