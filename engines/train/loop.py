"""The training loop: pre-train the generator, then the discriminator, then the adversarial
game (CIEGAN's schedule); validate, keep the best model, stop early; checkpoint and resume.

A run folder holds ``config.json``, ``log.jsonl`` (one line per log step and per validation),
``last.safetensors`` and ``best.safetensors`` (weights, optimizer and RNG state, metadata) and
``samples.png`` (input | output | target of the validation set, refreshed at each validation).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from calibration.metrics import psnr, ssim
from engines.models import build_discriminator, build_generator
from engines.package import Normalization

from . import blind_spot, line_split
from . import losses as L
from .augment import diff_augment, sample_params, video_augment
from .checkpoint import (
    load_checkpoint,
    load_optimizer,
    optimizer_tensors,
    save_checkpoint,
    strip_prefix,
    with_prefix,
)
from .config import TrainConfig
from .data import build_datasets

LAST, BEST = "last.safetensors", "best.safetensors"
MIN_GAIN_DB = 0.01  # a validation PSNR gain smaller than this is not an improvement
LR_FLOOR = 0.01  # lr_decay "cosine" ends each phase at this fraction of lr


@dataclass
class Progress:
    """What the loop reports to whoever shows it (the CLI's progress bar)."""

    step: int
    total: int
    phase: str
    losses: dict[str, float] = field(default_factory=dict)
    val_psnr: float | None = None


def noise_model(cfg: TrainConfig, norm: Normalization) -> L.NoiseModel:
    """The camera noise of ``cfg``'s data in the run's normalized units (for the
    poisson_gaussian loss): its profile's camera, else its preset's; ValueError for data with
    no single known camera."""
    from calibration.profile import CalibrationProfile
    from calibration.sim.presets import get_preset

    data = cfg.data
    why = None
    if cfg.rig is not None:
        why = "rig randomization draws a camera per sample"
    elif data.kind in ("paired", "stacks") and data.profile is None:
        why = f"kind={data.kind!r} pairs without data.profile come with no calibrated camera"
    elif norm.units != "adu":
        why = f"the normalization is in {norm.units}, not the data's ADU"
    if why is not None:
        raise ValueError(
            f"losses.poisson_gaussian needs the one camera that recorded the data, and {why}: "
            "drop the term, or train on a recording or simulated data of one rig"
        )
    camera = (CalibrationProfile.load(data.profile).camera if data.profile is not None
              else get_preset(data.preset).camera)  # fmt: skip
    return L.NoiseModel.of(camera.gain_adu_per_electron, camera.offset_adu,
                           camera.read_noise_electrons, norm.offset, norm.scale)  # fmt: skip


class VideoAugmented(Dataset):
    """Training items with one random flip/rotation applied alike to every tensor of a sample
    (input window, target, previous output, background), whatever their resolution."""

    def __init__(self, data: Dataset, rng: np.random.Generator) -> None:
        self.data, self.rng = data, rng

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = dict(self.data[index])
        # a rollout's earlier window and previous output ride along with frames and previous
        n, m = item["frames"].shape[0], item["previous"].shape[0] if "previous" in item else 0
        frames = (
            torch.cat([item["frames"], item["frames_prev"]])
            if "frames_prev" in item
            else item["frames"]
        )
        previous = item.get("previous")
        if "previous_prev" in item:
            previous = torch.cat([item["previous"], item["previous_prev"]])
        frames, target, previous, background = video_augment(
            frames, item["target"], previous, item.get("background"), rng=self.rng
        )
        item.update(frames=frames[:n], target=target)
        if "frames_prev" in item:
            item.update(frames_prev=frames[n:], previous_prev=previous[m:])
        if previous is not None:
            item["previous"] = previous[:m]
        if background is not None:
            item["background"] = background
        return {k: v.contiguous() for k, v in item.items()}


class Trainer:
    """One training run in ``out``; ``resume`` continues from ``out/last.safetensors``."""

    def __init__(self, cfg: TrainConfig, out: Path, *, resume: bool = False) -> None:
        self.cfg, self.out = cfg, Path(out)
        if not resume and (self.out / LAST).exists():
            raise FileExistsError(
                f"{self.out} already holds a run: pass --resume to continue it, or choose "
                "another --out"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        start = None  # (tensors, metadata) of the checkpoint this run starts from
        if resume:
            start = load_checkpoint(self.out / LAST)
        elif cfg.init_from is not None:
            start = load_checkpoint(cfg.init_from)
        # a continued or fine-tuned model keeps the normalization it was trained with
        norm = cfg.normalization
        if start is not None:
            norm = Normalization.model_validate(start[1]["normalization"])
        self.train_set, self.val_set, self.norm = build_datasets(
            cfg.data, scale=cfg.scale, window=cfg.window, previous=cfg.previous,
            rollout=cfg.rollout,
            background=cfg.background, normalization=norm, rig=cfg.rig, motion=cfg.motion,
        )  # fmt: skip
        self.g = build_generator(
            cfg.generator.arch, cfg.generator.size, scale=cfg.scale, window=cfg.window,
            previous=cfg.previous, background=cfg.background, **cfg.generator.overrides,
        )  # fmt: skip
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
        self.d = self.opt_d = None
        if cfg.discriminator is not None:
            self.d = build_discriminator(
                cfg.discriminator.arch, cfg.discriminator.size,
                in_channels=1 + cfg.window, **cfg.discriminator.overrides,
            )  # fmt: skip
            self.opt_d = torch.optim.Adam(self.d.parameters(), lr=cfg.lr_d, betas=(0.9, 0.99))
        self.flow = self.opt_flow = None
        if cfg.losses.get("temporal"):
            if cfg.window < 2:
                raise ValueError("losses.temporal needs window >= 2 (two input frames)")
            from engines.models.flow import FlowNet

            self.flow = FlowNet()
            self.opt_flow = torch.optim.Adam(self.flow.parameters(), lr=cfg.lr)
        # the generator's losses: without the adversarial term before the game starts
        noise = noise_model(cfg, self.norm) if cfg.losses.get("poisson_gaussian") else None
        self.gan_loss = L.WeightedLoss(cfg.losses, vgg=cfg.vgg_weights, adversarial=cfg.adversarial,
                                       noise=noise)  # fmt: skip
        pixel = {k: v for k, v in cfg.losses.items() if k != "adversarial"}
        self.pixel_loss = L.WeightedLoss(pixel, vgg=self.gan_loss.vgg, adversarial=cfg.adversarial,
                                         noise=noise)  # fmt: skip
        self.step = 0
        self.best: dict[str, Any] = {"psnr": -math.inf}
        self.history: list[dict[str, Any]] = []
        self.stale = 0
        if resume:
            self._resume(*start)
        elif start is not None:
            self._fine_tune_from(*start)
        (self.out / "config.json").write_text(cfg.model_dump_json(indent=2))

    # -- the loop -----------------------------------------------------------------------------

    def run(
        self, on_progress: Callable[[Progress], None] | None = None, *, until: int | None = None
    ) -> dict[str, Any]:
        """Train to the end of the schedule (or step ``until``, or an early stop); return the
        run's summary. Ctrl-C saves ``last.safetensors`` first, so ``--resume`` goes on."""
        try:
            return self._run(on_progress, min(until or self.cfg.schedule.total,
                                              self.cfg.schedule.total))  # fmt: skip
        except KeyboardInterrupt:
            self._save(LAST)
            raise

    def _run(self, on_progress: Callable[[Progress], None] | None, end: int) -> dict[str, Any]:
        cfg = self.cfg
        batches = self._batches()
        hiding = torch.Generator().manual_seed(cfg.seed * 1000 + 7 + self.step)
        stopped_early = False
        if self.step == 0:
            self._validate(on_progress)
        while self.step < end:
            phase = cfg.schedule.phase(self.step)
            batch = self._self_supervised(next(batches), hiding)
            terms = self._train_step(phase, batch)
            self.step += 1
            if self.step % cfg.log_every == 0:
                self._log({"step": self.step, "phase": phase, **terms})
            if on_progress is not None:
                on_progress(Progress(self.step, cfg.schedule.total, phase, terms,
                                     self.best.get("psnr")))  # fmt: skip
            if self.step % cfg.validate_every == 0 or self.step == end:
                improved = self._validate(on_progress)
                self._save(LAST)
                self.stale = 0 if improved else self.stale + 1
                if self.stale >= cfg.patience and phase != "discriminator":
                    s = cfg.schedule
                    if phase == "adversarial" or s.total == s.pretrain_steps:
                        stopped_early = True
                        break
                    # pre-training has converged: go on with the discriminator and the game
                    self._log({"step": self.step, "event": "pretraining converged"})
                    self.step, self.stale = s.pretrain_steps, 0
        self._save(LAST)
        first = self.history[0] if self.history else {}
        return {
            "steps": self.step,
            "stopped_early": stopped_early,
            "first": first,
            "best": self.best,
            "normalization": self.norm.model_dump(),
            "files": [str(self.out / n) for n in (LAST, BEST, "log.jsonl", "samples.png")],
        }

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.cfg.seed * 1000 + self.step)
        data = self.train_set
        if self.cfg.video_augment:
            data = VideoAugmented(data, np.random.default_rng([self.cfg.seed, self.step]))
        while True:
            loader = DataLoader(data, batch_size=self.cfg.batch, shuffle=True,
                                drop_last=len(self.train_set) > self.cfg.batch,
                                generator=gen)  # fmt: skip
            yield from loader

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The generator's output; a temporal one gets its OWN output of the step before as
        ``previous``, as it runs live, rather than the target of the step before, which it
        never sees live: it runs ``rollout`` steps from the first-frame rule first (no gradient
        through them), each feeding its output to the next."""
        previous, background = batch.get("previous"), batch.get("background")
        if "frames_prev" in batch:
            previous = batch["previous_prev"]
            with torch.no_grad():
                for frames in batch["frames_prev"].split(self.g.in_channels, dim=1):
                    previous = self.g(frames, previous, background)
        return self.g(batch["frames"], previous, background)

    def _self_supervised(self, batch: dict[str, torch.Tensor], generator: torch.Generator,
                         *, validating: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
        """Blind-spot data (``data.target: blind-spot``): the batch with pixels of its newest
        frame hidden, and their ``mask``; line-split data: the batch's input halves and
        corrected target halves (``engines.train.line_split``, from the generator's full-size
        output without a gradient; validation scores against the plain other half, which does
        not move with the generator); any other batch as it is."""
        target = self.cfg.data.target
        if target == "blind-spot":
            frames, mask = blind_spot.hide(batch["frames"], generator)
            return {**batch, "frames": frames, "mask": mask}
        if target == "line-split":
            frames = batch["frames"]
            frames = frames[..., : frames.shape[-2] // 2 * 2, : frames.shape[-1] // 2 * 2]
            batch = {k: v[..., : frames.shape[-2], : frames.shape[-1]] for k, v in batch.items()}
            full = None
            if not validating:
                with torch.no_grad():
                    full = self._forward(batch)
            gamma = 0.0 if validating else line_split.GAMMA
            halves, target_half, first = line_split.pairs(frames, batch["target"], full, generator,
                                                          gamma)  # fmt: skip
            out = {**batch, "frames": halves, "target": target_half}
            if "background" in batch:
                out["background"] = line_split.take(batch["background"], first)
            return out
        return batch

    def _scored(self, batch: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """What the losses and validation compare with the target: the output, or with blind
        spots the output at the hidden pixels only (``blind_spot.scored``)."""
        return blind_spot.scored(out, batch["target"], batch["mask"]) if "mask" in batch else out

    def _generator_lr(self) -> float:
        """The generator's (and flow net's) learning rate at this step (``cfg.lr_decay``)."""
        cfg = self.cfg
        if cfg.lr_decay == "constant":
            return cfg.lr
        cosine = 0.5 * (1.0 + math.cos(math.pi * cfg.schedule.fraction(self.step)))
        return cfg.lr * (LR_FLOOR + (1.0 - LR_FLOOR) * cosine)

    def _train_step(self, phase: str, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.g.train()
        if phase == "discriminator":
            with torch.no_grad():
                fake = self._forward(batch)
            return self._d_step(batch, fake)
        lr = self._generator_lr()
        for opt in (o for o in (self.opt_g, self.opt_flow) if o is not None):
            for group in opt.param_groups:
                group["lr"] = lr
        terms: dict[str, float] = {}
        fake = self._scored(batch, self._forward(batch))
        if phase == "adversarial":
            terms.update(self._d_step(batch, fake.detach()))
        loss, g_terms = self._g_loss(batch, fake, adversarial=phase == "adversarial")
        self.opt_g.zero_grad(set_to_none=True)
        if self.opt_flow is not None:
            self.opt_flow.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_g.step()
        if self.opt_flow is not None:
            self.opt_flow.step()
        return {**terms, **g_terms}

    def _g_loss(
        self, batch: dict[str, torch.Tensor], fake: torch.Tensor, *, adversarial: bool
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The configured weighted sum (the adversarial term only in the game), plus the flow
        net's own self-supervised loss when the temporal term trains it alongside."""
        target, frames = batch["target"], batch["frames"]
        kw: dict[str, Any] = {}
        loss = self.gan_loss if adversarial else self.pixel_loss
        if "adversarial" in loss.terms:
            params = sample_params(fake.shape, self._policy)
            cond = self._condition(frames, fake, params)
            kw["fake_logits"] = self.d(diff_augment(fake, params=params), cond)
            if self.cfg.adversarial == "ragan":
                with torch.no_grad():
                    kw["real_logits"] = self.d(diff_augment(target, params=params), cond)
        if "temporal" in loss.terms:
            kw.update(pred_prev=batch.get("previous", target), frame_t=frames[:, -1:],
                      frame_prev=frames[:, -2:-1], flow_net=self.flow)  # fmt: skip
        total, terms = loss(fake, target, **kw)
        if self.flow is not None:
            flow_loss = L.flow_self_supervised_loss(self.flow, frames[:, -2:-1], frames[:, -1:])
            total = total + flow_loss
            terms["flow"] = float(flow_loss.detach())
        return total, {f"g_{k}": v for k, v in terms.items()}

    _policy = "translation,cutout,brightness,contrast"

    @staticmethod
    def _condition(frames: torch.Tensor, like: torch.Tensor, params: Any) -> torch.Tensor:
        """The input frames at the candidate's resolution, augmented exactly like it, so that
        DiffAugment's shifts and cutouts keep candidate and condition aligned."""
        if frames.shape[-2:] != like.shape[-2:]:
            frames = F.interpolate(frames, size=like.shape[-2:], mode="bilinear",
                                   align_corners=False)  # fmt: skip
        return diff_augment(frames, params=params)

    def _d_step(self, batch: dict[str, torch.Tensor], fake: torch.Tensor) -> dict[str, float]:
        assert self.d is not None and self.opt_d is not None
        real = batch["target"]
        params = sample_params(real.shape, self._policy)  # the same augmentation for all three
        cond = self._condition(batch["frames"], real, params)
        real_aug, fake_aug = diff_augment(real, params=params), diff_augment(fake, params=params)
        loss = L.adversarial_d(self.cfg.adversarial, self.d(real_aug, cond), self.d(fake_aug, cond))
        if self.cfg.adversarial == "wgan" and self.cfg.gp_weight:
            loss = loss + self.cfg.gp_weight * L.gradient_penalty(self.d, real_aug, fake_aug, cond)
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_d.step()
        return {"d_loss": float(loss.detach())}

    # -- validation, logging, checkpoints ----------------------------------------------------

    @torch.no_grad()
    def _validate(self, on_progress: Callable[[Progress], None] | None = None) -> bool:
        self.g.eval()
        scores, losses, panels = [], [], []
        for i in range(len(self.val_set)):
            item = {k: v[None] for k, v in self.val_set[i].items()}
            # the same blind spots (or line split) at each validation
            item = self._self_supervised(item, torch.Generator().manual_seed(i), validating=True)
            out = self._scored(item, self._forward(item))
            losses.append(float(L.l1(out, item["target"])))
            pred, truth = out[0, 0].numpy(), item["target"][0, 0].numpy()
            rng = float(truth.max() - truth.min()) or 1.0
            scores.append((psnr(truth, pred, data_range=rng), ssim(truth, pred, data_range=rng)))
            if i < 3:
                panels.append((item["frames"][0, -1].numpy(), pred, truth))
        p, s = (float(np.mean(c)) for c in zip(*scores, strict=True))
        record = {"step": self.step, "val_l1": float(np.mean(losses)), "val_psnr": p, "val_ssim": s}
        self.history.append(record)
        self._log(record)
        self._plot(panels)
        improved = p > self.best["psnr"] + MIN_GAIN_DB
        if improved:
            self.best = {"psnr": p, "ssim": s, "step": self.step, "val_l1": record["val_l1"]}
            self._save(BEST)
        if on_progress is not None:
            on_progress(Progress(self.step, self.cfg.schedule.total, "validate", {}, p))
        return improved

    def _log(self, record: dict[str, Any]) -> None:
        with (self.out / "log.jsonl").open("a") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")

    def _plot(self, panels: list[tuple[np.ndarray, ...]]) -> None:
        import matplotlib as mpl

        mpl.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(panels), 3, figsize=(9, 3 * len(panels)), squeeze=False)
        for row, images in zip(axes, panels, strict=True):
            lo, hi = np.percentile(images[2], [0.5, 99.5])
            for ax, im, title in zip(row, images, ("input", "output", "target"), strict=True):
                ax.imshow(im, cmap="gray", vmin=lo, vmax=hi)
                ax.set_title(f"{title} (step {self.step})")
                ax.axis("off")
        fig.tight_layout()
        fig.savefig(self.out / "samples.png", dpi=80)
        plt.close(fig)

    def _save(self, name: str) -> Path:
        tensors = with_prefix("g", self.g.state_dict())
        groups: dict[str, list] = {}
        for prefix, model, opt in (("d", self.d, self.opt_d), ("flow", self.flow, self.opt_flow)):
            if model is not None:
                tensors.update(with_prefix(prefix, model.state_dict()))
                t, groups[f"opt_{prefix}"] = optimizer_tensors(f"opt_{prefix}", opt)
                tensors.update(t)
        t, groups["opt_g"] = optimizer_tensors("opt_g", self.opt_g)
        tensors.update(t)
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {
            "step": self.step,
            "best": self.best,
            "stale": self.stale,
            "history": self.history,
            "generator": {"arch": self.cfg.generator.arch, "config": self.g.config()},
            "normalization": self.norm.model_dump(),
            "train_config": self.cfg.model_dump(mode="json"),
            "config_sha256": self.cfg.digest(),
            "optimizer_groups": groups,
            "torch": torch.__version__,
        }
        return save_checkpoint(self.out / name, tensors, meta)

    def _resume(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if meta["config_sha256"] != self.cfg.digest():
            raise ValueError(
                f"{self.out / LAST} was trained with another config (sha256 "
                f"{meta['config_sha256'][:12]}): resume with the same config, or fine-tune "
                "with init_from"
            )
        self.g.load_state_dict(strip_prefix("g", tensors))
        groups = meta["optimizer_groups"]
        load_optimizer(self.opt_g, "opt_g", tensors, groups["opt_g"])
        for prefix, model, opt in (("d", self.d, self.opt_d), ("flow", self.flow, self.opt_flow)):
            if model is not None:
                model.load_state_dict(strip_prefix(prefix, tensors))
                load_optimizer(opt, f"opt_{prefix}", tensors, groups[f"opt_{prefix}"])
        torch.set_rng_state(tensors["rng.torch"])
        self.step, self.best, self.stale = meta["step"], meta["best"], meta["stale"]
        self.history = meta["history"]

    def _fine_tune_from(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Start from another run's generator weights (fine-tuning with few pairs)."""
        if meta["generator"]["config"] != self.g.config():
            raise ValueError(
                f"{self.cfg.init_from} holds a {meta['generator']['arch']} generator with "
                f"{meta['generator']['config']}; this config builds {self.g.config()}: "
                "fine-tune with the same architecture and size"
            )
        self.g.load_state_dict(strip_prefix("g", tensors))
