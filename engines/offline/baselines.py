"""Build the classical baseline engines (identity, bicubic x2, Gaussian) as ONNX packages.

They are written with the onnx helper API (no torch) and serialize to the same bytes on every
run, so the committed packages can be checked by rebuilding. ``onnx`` is a dev/train dependency:
only this offline builder imports it, never the runtime.
Run ``python -m engines.offline.baselines``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..package import ZOO_DIR, EnginePackage, Manifest, Normalization, Tiling, write_package

OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17; fixed so onnx upgrades keep the bytes
_PROVENANCE = {"builder": "engines.offline.baselines", "onnx_opset": OPSET}


def _model(name: str, nodes: list, initializers: list, out_hw: tuple[str, str]) -> bytes:
    """A single-channel float32 graph ``frames`` (N, 1, H, W) -> ``enhanced``, as fixed bytes."""
    frames = helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["N", 1, "H", "W"])
    enhanced = helper.make_tensor_value_info("enhanced", TensorProto.FLOAT, ["N", 1, *out_hw])
    graph = helper.make_graph(nodes, name, [frames], [enhanced], initializer=initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="scopecast",
        producer_version="0.1",
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString(deterministic=True)


def build_identity() -> tuple[Manifest, bytes]:
    """Output = input: measures the pipeline's own cost and fidelity with no enhancement."""
    model = _model(
        "identity", [helper.make_node("Identity", ["frames"], ["enhanced"])], [], ("H", "W")
    )
    manifest = Manifest(
        name="identity",
        task="identity",
        baseline=True,
        architecture="onnx-identity",
        description=(
            "Classical baseline: returns the frame unchanged. Measures what the pipeline itself "
            "costs (transfer, queueing, disk) and is the reference every learned engine must beat."
        ),
        tile=Tiling(size=None),
        normalization=Normalization(offset=0.0, scale=1.0),
        provenance=_PROVENANCE,
    )
    return manifest, model


def build_bicubic_x2() -> tuple[Manifest, bytes]:
    """Bicubic 2x upsampling (a = -0.75, half-pixel centres, edges replicated)."""
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "scales")
    resize = helper.make_node(
        "Resize",
        ["frames", "", "scales"],
        ["enhanced"],
        mode="cubic",
        coordinate_transformation_mode="half_pixel",
        cubic_coeff_a=-0.75,
        exclude_outside=0,
    )
    model = _model("bicubic-x2", [resize], [scales], ("H2", "W2"))
    manifest = Manifest(
        name="bicubic-x2",
        task="super-resolution",
        baseline=True,
        architecture="resize-cubic",
        scale=2,
        description=(
            "Classical baseline: bicubic 2x interpolation (Keys a=-0.75). Adds no information; "
            "it is the reference every learned super-resolution engine must beat."
        ),
        tile=Tiling(size=256, overlap=8),
        normalization=Normalization(offset=0.0, scale=1.0),
        provenance={**_PROVENANCE, "cubic_coeff_a": -0.75},
    )
    return manifest, model


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalized 2-D Gaussian, radius ceil(3 sigma), float32, summing to 1."""
    radius = max(1, math.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-(x**2) / (2 * sigma**2))
    k = np.outer(g, g)
    return (k / k.sum()).astype(np.float32)


def build_gaussian(sigma: float = 1.0) -> tuple[Manifest, bytes]:
    """Gaussian smoothing with reflect padding (Pad then an unpadded 2-D Conv)."""
    if not 0 < sigma <= 8:
        raise ValueError(f"gaussian sigma must be in (0, 8] pixels, got {sigma}")
    kernel = gaussian_kernel(sigma)
    radius = kernel.shape[0] // 2
    weights = numpy_helper.from_array(kernel[None, None], "kernel")
    pads = numpy_helper.from_array(
        np.array([0, 0, radius, radius, 0, 0, radius, radius], dtype=np.int64), "pads"
    )
    nodes = [
        helper.make_node("Pad", ["frames", "pads"], ["padded"], mode="reflect"),
        helper.make_node("Conv", ["padded", "kernel"], ["enhanced"], pads=[0, 0, 0, 0]),
    ]
    model = _model("gaussian", nodes, [weights, pads], ("H", "W"))
    manifest = Manifest(
        name="gaussian",
        task="denoise",
        baseline=True,
        architecture="gaussian-conv",
        description=(
            f"Classical baseline: Gaussian smoothing (sigma {sigma:g} px, {2 * radius + 1}x"
            f"{2 * radius + 1} kernel, reflect edges). Trades resolution for noise; it is the "
            "reference every learned denoising engine must beat."
        ),
        tile=Tiling(size=512, overlap=max(16, 2 * radius), batch=1),
        normalization=Normalization(offset=0.0, scale=1.0),
        provenance={**_PROVENANCE, "sigma": sigma, "radius": radius},
    )
    return manifest, model


def build_all(zoo_dir: Path = ZOO_DIR) -> list[EnginePackage]:
    """Write every baseline package into ``zoo_dir/<name>/``."""
    built = []
    for manifest, model in (build_identity(), build_bicubic_x2(), build_gaussian()):
        built.append(
            write_package(Path(zoo_dir) / manifest.name, manifest, {manifest.model: model})
        )
    return built


def main() -> None:
    for package in build_all():
        m = package.manifest
        print(
            f"wrote {package.path}: {m.name} ({m.task}, x{m.scale}) {m.model} sha256 "
            f"{m.files[m.model][:12]}, {package.model_path.stat().st_size} bytes"
        )


if __name__ == "__main__":
    main()
