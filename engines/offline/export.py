"""Checkpoint -> engine package: ONNX (dynamic height and width, opset 17), checked against
torch on random inputs, with a manifest recording task, scale, temporal inputs, tile size,
normalization, the training config's hash and the validation metrics."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import torch

from engines.models import GENERATORS
from engines.models.onnx_export import check_parity, export_onnx
from engines.package import (
    EnginePackage,
    Manifest,
    Normalization,
    Temporal,
    Tiling,
    write_package,
)
from engines.train.checkpoint import load_checkpoint, strip_prefix
from engines.train.config import TrainConfig

#: the tile side must hold the receptive field on both sides with room to spare
MIN_TILE = 64


def export(checkpoint: Path, out: Path, *, name: str | None = None) -> tuple[EnginePackage, float]:
    """Write the engine package for ``checkpoint`` into ``out``; return it and the parity error."""
    tensors, meta = load_checkpoint(checkpoint)
    cfg = TrainConfig.model_validate(meta["train_config"])
    arch = meta["generator"]["arch"]
    g = GENERATORS[arch].from_config(meta["generator"]["config"])
    g.load_state_dict(strip_prefix("g", tensors))
    g.eval()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(g, Path(tmp) / "model.onnx")
        error = check_parity(g, onnx_path)
        model = onnx_path.read_bytes()
    manifest = Manifest(
        name=name or cfg.name,
        version="0.1.0",
        task=cfg.task,
        description=cfg.description or f"{arch} generator trained by scopecast",
        architecture=arch,
        scale=cfg.scale,
        channels=1,
        output_dtype="input",
        temporal=Temporal(
            window=cfg.window, previous_output=cfg.previous, background=cfg.background
        ),
        tile=_tiling(cfg.tile, g.receptive_radius, g.multiple),
        normalization=Normalization.model_validate(meta["normalization"]),
        precision="fp32",
        provenance={
            "train_config": meta["train_config"],
            "train_config_sha256": meta["config_sha256"],
            "checkpoint_sha256": hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest(),
            "step": meta["step"],
            "torch": meta["torch"],
            "exporter": f"torch {torch.__version__} onnx opset 17",
            "onnx_parity_max_rel_error": error,
            "noise_injection": "off (deterministic)",
        },
        metrics={k: v for k, v in meta["best"].items() if k != "step"},
    )
    return write_package(Path(out), manifest, {"model.onnx": model}), error


def _tiling(tile: int | None, radius: int, multiple: int) -> Tiling:
    """Tiles of ``tile`` px overlapping by twice the receptive radius, in whole multiples."""
    overlap = -(-2 * radius // multiple) * multiple
    if tile is None:
        return Tiling(size=None, overlap=overlap, multiple=multiple)
    size = max(tile, MIN_TILE, overlap + multiple)
    size = -(-size // multiple) * multiple
    return Tiling(size=size, overlap=min(overlap, size - multiple), multiple=multiple)
