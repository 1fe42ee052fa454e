"""Checkpoint -> engine package: ONNX (dynamic height and width, opset 17), checked against
torch on random inputs, with a manifest recording task, scale, temporal inputs, tile size,
normalization, the training config's hash and the validation metrics.

Training normalizes raw ADU; when the training data's camera is known (simulated or synthetic
data: the profile's camera, else the preset's) the manifest is written in electrons with the
same numbers divided by the gain, so the model's input is the same on the training rig and any
other rig converts through its own profile (``calibration.units``)."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import torch

from calibration.camera import CameraParams
from calibration.errors import CalibrationError
from calibration.profile import CalibrationProfile
from calibration.sim.presets import get_preset
from engines.models import GENERATORS
from engines.models.onnx_export import check_parity, export_onnx
from engines.package import (
    EnginePackage,
    Manifest,
    Normalization,
    Temporal,
    Tiling,
    UnitsCamera,
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
        normalization=in_electrons(Normalization.model_validate(meta["normalization"]), cfg),
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


def training_camera(cfg: TrainConfig) -> CameraParams | None:
    """The camera the training frames were made with, where known: simulated and synthetic
    data use the profile's camera, else the preset's; recordings and recorded pairs their
    profile's (unknown without one)."""
    data = cfg.data
    if data.kind in ("recording", "paired", "stacks") and data.profile is None:
        return None
    if data.profile is not None:
        try:
            return CalibrationProfile.load(data.profile).camera
        except CalibrationError:
            return None  # not here any more: the manifest stays in ADU
    try:
        return get_preset(data.preset).camera
    except (KeyError, ValueError):
        return None


def in_electrons(norm: Normalization, cfg: TrainConfig) -> Normalization:
    """``norm`` (ADU, from training) as an electrons normalization giving the model the same
    input on the training camera; unchanged when that camera is unknown."""
    camera = training_camera(cfg)
    if norm.units != "adu" or camera is None:
        return norm
    gain = camera.gain_adu_per_electron
    return Normalization(
        units="electrons",
        offset=(norm.offset - camera.offset_adu) / gain,
        scale=norm.scale / gain,
        camera=UnitsCamera(offset_adu=camera.offset_adu, gain_adu_per_electron=gain),
    )


def _tiling(tile: int | None, radius: int, multiple: int) -> Tiling:
    """Tiles of ``tile`` px overlapping by twice the receptive radius, in whole multiples."""
    overlap = -(-2 * radius // multiple) * multiple
    if tile is None:
        return Tiling(size=None, overlap=overlap, multiple=multiple)
    size = max(tile, MIN_TILE, overlap + multiple)
    size = -(-size // multiple) * multiple
    return Tiling(size=size, overlap=min(overlap, size - multiple), multiple=multiple)
