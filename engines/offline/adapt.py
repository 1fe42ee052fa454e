"""``scopecast adapt``: an engine for this rig and this specimen, learnt from its own noisy
recording alone, and a gate that refuses it unless it is better than the engine it came from.

1. The recording (a scopecast run folder, or TIFF/OME-TIFF time-lapses) is split in time: the
   first 80% of each file trains, the rest is held out for the gate.
2. Training fine-tunes the base engine (a shipped package: its weights come back out of its
   ONNX graph, :func:`base_checkpoint`) against the next frame (Noise2Noise in time, frames
   whose field moved left out) or the frame's other scan lines (Neighbor2Neighbor,
   ``engines.train.line_split``), or trains a new U-Net behind blind spots (Noise2Void; a
   residual base cannot be fine-tuned into one). See ``engines.train.data`` ("recording").
3. The gate, on the held-out frames, as the server runs both engines (ONNX Runtime, the rig's
   units): the held-out self-supervised loss, which is also a consistency measure, the mean
   squared difference between the enhanced frame t and the RAW frame t+1 (an independent noise
   draw of the same scene, so it is the error against the clean scene plus a constant), must
   not be worse than the base engine's; and the fidelity chi-square of the enhanced frames
   against their own raw frames must lie in the honest band :data:`HONEST_CHI2`.
   :func:`run_check` (``adapt --check ENGINE``) runs the gate alone, on every frame, for an
   engine made elsewhere.

Super-resolution engines (a base of scale 2 or 4) learn from pairs the rig's forward model
makes (:func:`estimates`): a denoiser's estimates of the training frames are taken as the
specimen on the finer grid, and the profile's forward model (PSF, binning, noise; the base's
preset without a profile) records them, as ``kind: synthetic`` training data. The gate then
compares the output binned back onto the raw grid.

What it cannot do: a noisy recording holds no finer or cleaner image. A denoiser learns
denoising at the recording's own sampling. A super-resolution engine adapted from estimates
learns to undo this rig's binning, PSF and noise on structures as they look one grid finer
(self-similarity: the specimen taken as if it were ``scale`` times smaller), so it can recover
what the raw sampling resolves, sharpened and de-binned consistently with the rig; detail
beyond the raw sampling's Nyquist limit or the PSF's cut-off is not in its targets, so it
cannot be recovered, only guessed (the fidelity check is the guard).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from calibration.camera import CameraParams
from calibration.errors import ScopecastError
from calibration.fidelity import fidelity, predicted_raw
from calibration.profile import CalibrationProfile
from calibration.units import Electrons
from engines.engine import EngineChain
from engines.package import BACKGROUND_FRAMES, EnginePackage, Normalization, load_package

HONEST_CHI2 = (0.8, 1.3)
"""The fidelity chi-square an honest output of a calibrated rig gives (README, Measured)."""
HELD_OUT = 0.2
"""The share of each recording's frames (its last) the gate scores on."""
CONTEXT = BACKGROUND_FRAMES
"""Frames before the scored ones the gate feeds each engine first, unscored, so that temporal
engines are scored settled, as they run live once a key has history (their start from an empty
ring is reported apart: ``GateScores.start_offset``)."""

Progress = Callable[[str], None]


class GateRefused(ScopecastError, RuntimeError):
    """The adapted engine did not pass the gate; the message says which test failed (not a
    user mistake: ``scopecast adapt`` exits 1)."""


@dataclass(frozen=True)
class Recording:
    """A recording cut for adaptation: raw frames (T, H, W) per file, in the rig's ADU."""

    stacks: dict[str, np.ndarray]

    @classmethod
    def read(cls, source: Path, frames: int) -> Recording:
        from engines.train.data import read_recording, recording_files

        stacks = {p.stem.split(".")[0]: read_recording(p, frames)[:, 0]
                  for p in recording_files(Path(source))}  # fmt: skip
        short = [n for n, s in stacks.items() if len(s) < 10]
        if short:
            raise ValueError(
                f"recording(s) {short} in {source} have fewer than 10 frames: adaptation needs a "
                "time-lapse (a still field, frames a few ms to s apart) of 10 frames or more"
            )
        return cls(stacks)

    def split(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, int]]:
        """(training, held-out, context) frames of every file: its first 80% train; the rest
        is held out, preceded by up to :data:`CONTEXT` training frames the gate runs the
        engines on first but does not score (context: how many)."""
        cut = {n: len(s) - max(2, round(HELD_OUT * len(s))) for n, s in self.stacks.items()}
        start = {n: max(0, c - CONTEXT) for n, c in cut.items()}
        return ({n: s[: cut[n]] for n, s in self.stacks.items()},
                {n: s[start[n] :] for n, s in self.stacks.items()},
                {n: cut[n] - start[n] for n in self.stacks})  # fmt: skip


# -- the base engine's weights -----------------------------------------------------------------


def base_checkpoint(package: EnginePackage, out: Path, camera: CameraParams | None) -> Path:
    """A training checkpoint holding ``package``'s weights, read back out of its ONNX graph (the
    exporter keeps parameter names: ``model.<name>``), with its normalization in ``camera``'s
    ADU (the units the adaptation data are in; None: the camera it was trained with)."""
    import onnx
    import torch
    from onnx import numpy_helper

    from engines.models import build_generator
    from engines.train.checkpoint import save_checkpoint, with_prefix
    from engines.train.config import TrainConfig

    m = package.manifest
    raw_cfg = m.provenance.get("train_config")
    if not isinstance(raw_cfg, dict):
        raise ValueError(
            f"engine {m.name!r} records no training config (manifest provenance.train_config): "
            "it cannot be fine-tuned; adapt from scratch (--from-scratch)"
        )
    cfg = TrainConfig.model_validate(raw_cfg)
    g = build_generator(cfg.generator.arch, cfg.generator.size, scale=cfg.scale,
                        window=cfg.window, previous=cfg.previous, background=cfg.background,
                        **cfg.generator.overrides)  # fmt: skip
    graph = onnx.load(str(package.path / m.model))
    weights = {i.name.removeprefix("model."): numpy_helper.to_array(i)
               for i in graph.graph.initializer}  # fmt: skip
    state = g.state_dict()
    missing = [k for k in state if k not in weights or weights[k].shape != tuple(state[k].shape)]
    if missing:
        raise ValueError(
            f"engine {m.name!r}: {len(missing)} weight(s) of its {cfg.generator.arch} generator "
            f"are not in its ONNX graph (e.g. {missing[0]}): it cannot be fine-tuned; adapt from "
            "scratch (--from-scratch)"
        )
    g.load_state_dict({k: torch.from_numpy(np.array(weights[k])) for k in state})
    meta = {
        "step": 0, "best": {"psnr": -math.inf}, "stale": 0, "history": [],
        "generator": {"arch": cfg.generator.arch, "config": g.config()},
        "normalization": adu_normalization(m.normalization, camera).model_dump(),
        "train_config": raw_cfg, "config_sha256": cfg.digest(), "optimizer_groups": {},
        "torch": torch.__version__, "from_engine": f"{m.name} {m.version}",
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(out, with_prefix("g", g.state_dict()), meta)


def adu_normalization(norm: Normalization, camera: CameraParams | None) -> Normalization:
    """An electrons normalization in ``camera``'s ADU (None: the camera it names); an ADU one
    as it is."""
    if norm.units == "adu":
        return norm
    assert norm.camera is not None
    offset = camera.offset_adu if camera else norm.camera.offset_adu
    gain = camera.gain_adu_per_electron if camera else norm.camera.gain_adu_per_electron
    return Normalization(offset=norm.offset * gain + offset, scale=norm.scale * gain)


# -- adaptation ---------------------------------------------------------------------------------


def adapt_config(base: EnginePackage | None, data_dir: Path, *, target: str, steps: int,
                 profile: Path | None, init_from: Path | None, name: str,
                 field: int = 128) -> Any:  # fmt: skip
    """The training config: the base's own (its architecture and temporal inputs), with the
    recording as data, ``steps`` steps, no randomization; blind spots need a U-Net without the
    global residual, trained from scratch. A super-resolution base trains on the estimates in
    ``data_dir`` (``field``: their side) through the forward model instead (``kind:
    synthetic``), keeping its previous output and rollout, moved as its base's training data
    moved (:data:`SR_MOTION` if it records none)."""
    from engines.train.config import TrainConfig

    if base is not None:
        raw = dict(base.manifest.provenance["train_config"])
    else:
        raw = {"task": "denoise", "scale": 1, "window": 1,
               "generator": {"arch": "unet", "size": "small"}}  # fmt: skip
    generator = dict(raw.get("generator") or {"arch": "unet", "size": "small"})
    if target == "blind-spot":
        generator = {**generator, "overrides": {**generator.get("overrides", {}),
                                                "residual": False}}  # fmt: skip
    motion = raw.get("motion") or SR_MOTION
    for key in ("rig", "motion", "discriminator", "normalization", "vgg_weights"):
        raw.pop(key, None)
    scale = int(raw.get("scale", 1))
    data: dict[str, Any] = {"kind": "recording", "folder": str(data_dir), "target": target,
                            "profile": str(profile) if profile else None, "patch": 64,
                            "frames": 100_000, "val_fraction": 0.2}  # fmt: skip
    if scale > 1:
        low = field // scale
        data = {"kind": "synthetic", "folder": str(data_dir), "preset": raw["data"]["preset"],
                "profile": data["profile"], "patch": min(64, low // 8 * 8), "pairs": 256,
                "val_pairs": 16, "val_fraction": 0.2, "key_starts": 0.25}  # fmt: skip
        raw["motion"] = motion  # still estimates, moved: the recurrence must follow motion
    else:
        raw.update({"previous": False, "rollout": 1})
    raw.update({
        "name": name, "generator": generator,
        "background": bool(raw.get("background", False)),
        "data": data,
        "losses": {"mse": 1.0}, "schedule": {"pretrain_steps": steps}, "lr_decay": "cosine",
        "video_augment": target != "line-split",
        "lr": 2e-4 if init_from else 1e-3, "batch": 8, "validate_every": max(1, steps // 8),
        "patience": 100, "init_from": str(init_from) if init_from else None,
        "description": f"{name}: adapted by `scopecast adapt` from its rig's noisy recording "
        f"({target})" + (f", fine-tuned from {base.manifest.name}" if base else ""),
    })  # fmt: skip
    return TrainConfig.model_validate(raw)


@dataclass
class GateScores:
    """One engine on the held-out frames."""

    consistency_mse: float
    """Mean squared difference, ADU^2, between enhanced frame t and raw frame t+1."""
    chi2: float
    """Median fidelity chi-square of the enhanced frames against their own raw frames."""
    panel: tuple[np.ndarray, np.ndarray]
    """(raw, enhanced) of the first held-out frame, for the report."""
    start_offset: float = 0.0
    """Mean level error, ADU, of the output (binned onto the raw grid) against the raw frame at
    the first frame of a key, from an empty ring (not gated; a temporal engine's start)."""


def run_stack(chain: EngineChain, stack: np.ndarray) -> Iterator[np.ndarray]:
    """``chain``'s output (float32, raw units) for each frame of ``stack`` (T, H, W), fed as
    the server feeds a key: its window and background from the frames before (its first frames
    use the earliest ones), its previous outputs carried."""
    previous: dict[int, np.ndarray] = {}
    for t in range(len(stack)):
        window = [stack[max(0, t - k)] for k in range(chain.window - 1, -1, -1)]
        bg = (np.median(stack[max(0, t - BACKGROUND_FRAMES + 1) : t + 1], axis=0)
              .astype(stack.dtype) if chain.background else None)  # fmt: skip
        stages = chain.enhance(window, previous, bg).stages
        previous = {s.stage: s.output for s in stages}
        yield stages[-1].output


def score(chain: EngineChain, held: dict[str, np.ndarray], camera: CameraParams,
          units: Electrons | None,
          context: dict[str, int] | None = None) -> GateScores:  # fmt: skip
    """Run ``chain`` over every held-out stack (:func:`run_stack`), scoring the frames after
    its ``context`` first ones; a super-resolution output is compared binned back onto the raw
    grid."""
    diffs, chi2s, starts, panel = [], [], [], None
    maps = {} if units is None else {"offset_map": units.offset_map,
                                      "flat_field": units.flat_field}  # fmt: skip
    for name, stack in held.items():
        first = (context or {}).get(name, 0)
        outs = []
        for t, out in enumerate(run_stack(chain, stack)):
            outs.append(predicted_raw(out, chain.scale, None))
            if t == 0:
                starts.append(float(outs[0].mean() - stack[0].mean(dtype=np.float64)))
            if t < first:
                continue
            # as the server checks: the output carries the camera's fixed pattern
            chi2s.append(fidelity(out, stack[t], camera, scale=chain.scale,
                                  pattern_in_output=True, **maps).chi2)  # fmt: skip
            if panel is None:
                panel = (stack[t].astype(np.float32), out.astype(np.float32))
        for t in range(first, len(stack) - 1):
            diffs.append(float(np.mean((outs[t] - stack[t + 1].astype(np.float32)) ** 2)))
    assert panel is not None
    return GateScores(float(np.mean(diffs)), float(np.median(chi2s)), panel,
                      float(np.mean(starts)))  # fmt: skip


SR_MOTION = {"max_speed_px": 8.0, "max_rotation_deg": 1.0, "still": 0.0}
"""The motion a super-resolution adaptation moves its still estimates with, when its base
recorded none (engines.train's MotionRanges): without it, the recurrence learns that nothing
ever moves and lags behind moving cells."""
ESTIMATES_PER_FILE = 8
"""Denoised frames of each training stack (evenly spaced) a super-resolution adaptation takes
as the specimen."""


def estimates(train: dict[str, np.ndarray], out: Path, denoiser: str, backend: str,
              rig: CalibrationProfile | None) -> int:  # fmt: skip
    """Write :data:`ESTIMATES_PER_FILE` frames of each training stack, denoised by
    ``denoiser``, into ``out`` as float32 TIFFs in the units ``kind: synthetic`` data read
    (the profile camera's scalar ADU: offset map and flat field out, as the forward model puts
    them back); returns their smallest side."""
    units = Electrons.from_profile(rig) if rig is not None else None
    scalar = Electrons.from_camera(rig.camera) if rig is not None else None
    chain = EngineChain.open([denoiser], backend, units=units)
    try:
        if chain.scale != 1:
            raise ValueError(
                f"--denoiser {denoiser!r} has scale {chain.scale}: the estimates need a "
                "denoiser (scale 1), e.g. confocal-denoise or an engine `scopecast adapt` made"
            )
        out.mkdir(parents=True, exist_ok=True)
        for name, stack in train.items():
            picks = set(np.linspace(0, len(stack) - 1, ESTIMATES_PER_FILE).round().astype(int))
            for t, denoised in enumerate(run_stack(chain, stack)):
                if t in picks:
                    image = (denoised if units is None or scalar is None else
                             scalar.to_adu(units.to_electrons(denoised)))  # fmt: skip
                    tifffile.imwrite(out / f"{name}-t{t:04d}.tif", image.astype(np.float32))
    finally:
        chain.close()
    return min(min(s.shape[-2:]) for s in train.values())


def gate(base: GateScores | None, adapted: GateScores) -> list[str]:
    """What the adapted engine fails (empty: it passes)."""
    failed = []
    if base is not None and adapted.consistency_mse > base.consistency_mse:
        failed.append(
            f"consistency: enhanced frame t vs raw frame t+1 has mean squared difference "
            f"{adapted.consistency_mse:.4g} ADU^2, worse than the base engine's "
            f"{base.consistency_mse:.4g}"
        )
    lo, hi = HONEST_CHI2
    if not lo <= adapted.chi2 <= hi:
        high = "it departs from the raw frames by more than their noise: removed or invented signal"
        low = "it follows the raw frames closer than their noise allows: it keeps noise"
        why = high if adapted.chi2 > hi else low
        failed.append(
            f"fidelity: median chi-square {adapted.chi2:.3f} of the enhanced frames against "
            f"their raw frames is outside the honest band {lo}-{hi} ({why})"
        )
    return failed


def write_report(out: Path, result: dict[str, Any], panels: dict[str, tuple[np.ndarray, ...]],
                 ) -> None:  # fmt: skip
    """``report.json`` and ``report.png`` (raw / base / adapted on a held-out frame)."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    (out / "report.json").write_text(json.dumps(result, indent=2))
    images = [("raw", panels["adapted"][0])] + [(k, v[1]) for k, v in panels.items()]
    lo, hi = np.percentile(images[0][1], (0.5, 99.8))
    fig, axes = plt.subplots(1, len(images), figsize=(4 * len(images), 4.3))
    for ax, (title, image) in zip(np.atleast_1d(axes), images, strict=True):
        ax.imshow(image, cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=80)
    plt.close(fig)


def adapt(recording: Path, out: Path, *, base: str | None, target: str = "next-frame",
          steps: int = 1500, frames: int = 500, profile: Path | None = None,
          backend: str = "onnxruntime", name: str | None = None,
          denoiser: str = "confocal-denoise",
          on_train: Callable[[Any], Any] | None = None,
          progress: Progress | None = None) -> dict[str, Any]:  # fmt: skip
    """Adapt ``base`` (an engine name or package folder; None: from scratch) to ``recording``
    into ``out``: ``out/engine`` when the gate passes, else ``out/candidate`` and GateRefused.
    A super-resolution base learns from ``denoiser``'s estimates through the forward model
    (``target`` does not apply). ``on_train`` is the trainer's progress callback. Returns the
    report's numbers."""
    from engines.offline.export import export
    from engines.train.loop import Trainer

    say = progress or (lambda _: None)
    started, wall = time.monotonic(), time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rig = CalibrationProfile.load(profile) if profile is not None else None
    package = load_package(base) if base is not None else None
    sr = package is not None and package.manifest.scale > 1
    if package is not None and not sr and package.manifest.temporal.previous_output:
        raise ValueError(
            f"engine {package.manifest.name!r} is a denoiser that takes its previous output: "
            "noisy next-frame or blind-spot targets cannot train that recurrence; adapt a "
            "single-frame denoiser such as confocal-denoise, or a super-resolution engine"
        )
    if sr:
        target = "estimates"
    elif target == "blind-spot" and package is not None:
        say(f"blind spots need a U-Net without the global residual: training from scratch with "
            f"{package.manifest.name}'s architecture")  # fmt: skip
    rec = Recording.read(recording, frames)
    train, held, context = rec.split()
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)
    say(f"recording: {', '.join(f'{n} {len(s)} frames' for n, s in rec.stacks.items())}; "
        f"training on {sum(len(s) for s in train.values())}, the gate on the last "
        f"{sum(len(s) for s in held.values())}")  # fmt: skip
    field = 0
    if sr:
        say(f"super-resolution: {denoiser} denoises {ESTIMATES_PER_FILE} training frames of each "
            f"file; {'the profile' if rig else 'the base engine'}'s forward model records them "
            "one grid finer as training pairs")  # fmt: skip
        field = estimates(train, data_dir, denoiser, backend, rig)
    else:
        for n, s in train.items():
            tifffile.imwrite(data_dir / f"{n}.tif", s)
    init = None
    if package is not None and target != "blind-spot":
        init = base_checkpoint(package, out / "base.safetensors",
                               rig.camera if rig is not None else None)  # fmt: skip
    name = name or f"{package.manifest.name if package else 'denoise'}-adapted"
    cfg = adapt_config(package, data_dir, target=target, steps=steps, profile=profile,
                       init_from=init, name=name, field=field)  # fmt: skip
    trainer = Trainer(cfg, out / "run")
    summary = trainer.run(on_train)
    trained_s = time.monotonic() - started
    candidate = out / "candidate"
    export(out / "run" / "best.safetensors", candidate, name=name)
    say("gate: running the base and the adapted engine over the held-out frames")
    units, scores, failed = _run_gate(held, context, base, str(candidate), backend, rig,
                                      package)  # fmt: skip
    curve = [(round(r["time"] - wall, 1), r["val_psnr"])
             for r in _log(out / "run" / "log.jsonl") if "val_psnr" in r]  # fmt: skip
    result = {
        "recording": str(recording), "base": base, "target": target, "steps": summary["steps"],
        "denoiser": denoiser if sr else None,
        "frames": {n: len(s) for n, s in rec.stacks.items()},
        "held_out_frames": {n: len(s) - context[n] for n, s in held.items()},
        "context_frames": context,
        "units": units.describe() if units is not None else "raw ADU as recorded (no --profile)",
        "train_s": round(trained_s, 1), "total_s": round(time.monotonic() - started, 1),
        "validation_curve_s_psnr": curve,
        "scores": {k: _scores_json(v) for k, v in scores.items()},
        "gate": {"passed": not failed, "failed": failed, "honest_chi2": list(HONEST_CHI2)},
    }  # fmt: skip
    if "base" in scores:
        result["consistency_gain_db"] = 10 * math.log10(
            scores["base"].consistency_mse / scores["adapted"].consistency_mse
        )
    write_report(out, result, {k: v.panel for k, v in scores.items()})
    if failed:
        raise GateRefused(
            f"the adapted engine in {candidate} is refused: "
            + "; ".join(failed)
            + f" (report: {out / 'report.json'}, {out / 'report.png'})"
        )
    candidate.replace(out / "engine")
    return result


def _run_gate(held: dict[str, np.ndarray], context: dict[str, int], base: str | None,
              candidate: str, backend: str, rig: CalibrationProfile | None,
              package: EnginePackage | None,
              ) -> tuple[Electrons | None, dict[str, GateScores], list[str]]:  # fmt: skip
    """The profile's conversion, the base's and the candidate's scores, and what the candidate
    fails."""
    units = Electrons.from_profile(rig) if rig is not None else None
    camera = _camera(rig, package)
    scores: dict[str, GateScores] = {}
    for key, where in (("base", base), ("adapted", candidate)):
        if where is None:
            continue
        chain = EngineChain.open([where], backend, units=units)
        try:
            scores[key] = score(chain, held, camera, units, context)
        finally:
            chain.close()
    return units, scores, gate(scores.get("base"), scores["adapted"])


def run_check(recording: Path, engine: str, *, base: str | None, frames: int = 500,
          profile: Path | None = None, backend: str = "onnxruntime") -> dict[str, Any]:  # fmt: skip
    """The gate alone, on every frame of ``recording``: ``engine`` (one made elsewhere, or an
    earlier adaptation) against ``base``, with no training. Raises GateRefused naming what it
    fails; returns the scores when it passes."""
    rig = CalibrationProfile.load(profile) if profile is not None else None
    package = load_package(base) if base is not None else None
    stacks = Recording.read(recording, frames).stacks
    context = {n: min(CONTEXT, len(s) - 2) for n, s in stacks.items()}
    units, scores, failed = _run_gate(stacks, context, base, engine, backend, rig, package)
    result = {
        "recording": str(recording), "engine": engine, "base": base,
        "frames": {n: len(s) for n, s in stacks.items()},
        "units": units.describe() if units is not None else "raw ADU as recorded (no --profile)",
        "scores": {("engine" if k == "adapted" else k): _scores_json(v)
                   for k, v in scores.items()},
        "gate": {"passed": not failed, "failed": failed, "honest_chi2": list(HONEST_CHI2)},
    }  # fmt: skip
    if failed:
        raise GateRefused(f"engine {engine} is refused for {recording}: " + "; ".join(failed))
    return result


def _scores_json(s: GateScores) -> dict[str, float]:
    return {"consistency_mse_adu2": s.consistency_mse, "chi2": s.chi2,
            "start_offset_adu": s.start_offset}  # fmt: skip


def _camera(rig: CalibrationProfile | None, package: EnginePackage | None) -> CameraParams:
    """The noise model the gate's fidelity check uses: the rig's profile, else the camera of
    the preset the base engine was trained on (the confocal preset's from scratch)."""
    if rig is not None:
        return rig.camera
    from calibration.sim.presets import get_preset

    trained = package.manifest.provenance.get("train_config", {}) if package else {}
    return get_preset(trained.get("data", {}).get("preset") or "confocal-20fps").camera


def _log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


__all__ = ["GateRefused", "adapt", "base_checkpoint", "gate", "run_check"]
