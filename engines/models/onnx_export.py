"""Generator -> ONNX with dynamic N, H and W (TorchScript exporter), and a torch/onnxruntime
parity check on several input sizes."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from calibration.errors import ScopecastError

from .base import Generator

OUTPUT_NAME = "enhanced"


class ParityError(ScopecastError, ValueError):
    """The ONNX model's output differs from torch's by more than the tolerance."""


class _Positional(nn.Module):
    """Calls the generator with its inputs by name, so the exported graph has exactly them."""

    def __init__(self, model: Generator) -> None:
        super().__init__()
        self.model = model
        self.names = model.input_names

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.model(**dict(zip(self.names, inputs, strict=True)))


@contextlib.contextmanager
def inference_mode(model: Generator) -> Iterator[Generator]:
    """``model`` in eval() with noise injection off; its previous modes restored afterwards."""
    training = model.training
    noise = getattr(model, "noise", None)
    model.eval()
    if noise is not None:
        model.noise = "off"
    try:
        yield model
    finally:
        model.train(training)
        if noise is not None:
            model.noise = noise


def example_inputs(model: Generator, n: int, h: int, w: int, *, seed: int = 0) -> dict[str, Tensor]:
    """Random inputs named and shaped by the engine I/O convention (h, w at the frame grid)."""
    for axis, size in (("h", h), ("w", w)):
        if size <= 0 or size % model.multiple:
            raise ValueError(
                f"{type(model).__name__}: example {axis}={size} must be a positive multiple of "
                f"{model.multiple}"
            )
    gen = torch.Generator().manual_seed(seed)
    s, c = model.scale, model.channels
    shapes = {
        "frames": (n, model.in_channels, h, w),
        "previous": (n, c, h * s, w * s),
        "background": (n, c, h, w),
    }
    return {name: torch.rand(shapes[name], generator=gen) for name in model.input_names}


def _dynamic_axes(model: Generator) -> dict[str, dict[int, str]]:
    low = {0: "N", 2: "h", 3: "w"}
    high = low if model.scale == 1 else {0: "N", 2: "H", 3: "W"}
    axes = {"frames": low, "previous": high, "background": low}
    return {**{n: axes[n] for n in model.input_names}, OUTPUT_NAME: high}


def export_onnx(
    model: Generator, path: Path, *, opset: int = 17, example_hw: tuple[int, int] = (64, 64)
) -> Path:
    """Write ``model`` (eval, noise off) to ``path`` as ONNX: inputs ``model.input_names``,
    output "enhanced", N, H, W dynamic on every input and the output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with inference_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # harmless: a reversed-index Slice that is left unfolded, and InstanceNorm exported with
        # instance statistics (what track_running_stats=False computes in eval too)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        warnings.filterwarnings("ignore", message=".*operator 'instance_norm' is set to train")
        inputs = example_inputs(model, 1, *example_hw)
        torch.onnx.export(
            _Positional(model),
            tuple(inputs.values()),
            str(path),
            input_names=model.input_names,
            output_names=[OUTPUT_NAME],
            dynamic_axes=_dynamic_axes(model),
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    import onnx

    onnx.checker.check_model(str(path))
    return path


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """``max|actual - reference| / max(max|reference|, 1e-6)``: scale-aware, and not blown up by
    reference pixels near zero (the error is relative to the output's range, not per pixel)."""
    return float(np.abs(actual - reference).max() / max(float(np.abs(reference).max()), 1e-6))


def check_parity(
    model: Generator,
    onnx_path: Path,
    *,
    sizes: tuple[tuple[int, int, int], ...] = ((1, 48, 64), (2, 64, 32)),
    rtol: float = 1e-4,
) -> float:
    """Run torch (eval, noise off) and onnxruntime (CPU) on random inputs of each (N, h, w),
    h and w rounded up to ``model.multiple``; return the largest ``relative_error``; raise
    ParityError (a ValueError) beyond ``rtol``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    worst, report = 0.0, []
    m = model.multiple
    for i, (n, h_asked, w_asked) in enumerate(sizes):
        h, w = -(-h_asked // m) * m, -(-w_asked // m) * m
        inputs = example_inputs(model, n, h, w, seed=i + 1)
        with inference_mode(model), torch.no_grad():
            reference = model(**inputs).numpy()
        (actual,) = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        if actual.shape != reference.shape:
            raise ParityError(
                f"{onnx_path}: onnxruntime output shape {actual.shape} != torch "
                f"{reference.shape} for input (N, h, w) = {(n, h, w)}: dynamic axes broken"
            )
        err = relative_error(actual, reference)
        report.append(f"(N, h, w)={(n, h, w)}: {err:.2e}")
        worst = max(worst, err)
    if not worst <= rtol:
        raise ParityError(
            f"{onnx_path}: onnxruntime differs from torch by max relative error {worst:.3e} > "
            f"rtol {rtol:.1e} ({'; '.join(report)})"
        )
    return worst
