"""A training run, as one YAML file validated by pydantic (``scopecast train CONFIG.yaml``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from calibration.errors import ScopecastError
from calibration.sim.randomize import MotionRanges, RigRanges
from engines.package import ENGINE_NAME, Normalization

from .data import DataConfig
from .losses import LOSSES

#: generator loss terms a config may weight: the rows of engines.train.losses.LOSSES
GENERATOR_LOSSES = tuple(LOSSES)


class ModelConfig(BaseModel):
    """An architecture from engines.models, at a named size, with keyword overrides."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    arch: str
    size: str = "small"
    overrides: dict[str, Any] = {}


class Schedule(BaseModel):
    """CIEGAN's schedule: pre-train the generator, then the discriminator, then the game."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    pretrain_steps: int = Field(500, ge=0)
    discriminator_steps: int = Field(0, ge=0)
    adversarial_steps: int = Field(0, ge=0)

    @property
    def total(self) -> int:
        return self.pretrain_steps + self.discriminator_steps + self.adversarial_steps

    def phase(self, step: int) -> str:
        """'pretrain', 'discriminator' or 'adversarial' for a 0-based step."""
        if step < self.pretrain_steps:
            return "pretrain"
        if step < self.pretrain_steps + self.discriminator_steps:
            return "discriminator"
        return "adversarial"

    def fraction(self, step: int) -> float:
        """How far a 0-based step is into its phase, from 0 (its first step) towards 1."""
        starts = {"pretrain": (0, self.pretrain_steps),
                  "discriminator": (self.pretrain_steps, self.discriminator_steps),
                  "adversarial": (self.pretrain_steps + self.discriminator_steps,
                                  self.adversarial_steps)}  # fmt: skip
        start, length = starts[self.phase(step)]
        return min(1.0, (step - start) / length) if length else 0.0


_ADDED_LATER = (
    "rollout",
    "lr_decay",
    "rig",
    "motion",
    "data.specimens",
    "data.frames",
    "data.max_shift_px",
    "data.key_starts",
)
"""TrainConfig settings newer than the first shipped engines (see ``TrainConfig.digest``);
``data.X`` is a setting of the data section."""


class TrainConfig(BaseModel):
    """Everything one training run needs; its hash goes into the exported manifest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="engine name the export gets")
    task: Literal["denoise", "deblur", "super-resolution", "denoise-super-resolution"]
    description: str = ""
    generator: ModelConfig
    scale: Literal[1, 2, 4] = 1
    window: int = Field(1, ge=1, description="consecutive frames in (temporal engines)")
    previous: bool = Field(False, description="the generator also takes its previous output")
    background: bool = Field(False, description="the generator also takes a background")
    rollout: int = Field(
        1,
        ge=1,
        description="with previous: steps the generator runs on its own output before the step "
        "that is scored (the first from the first-frame rule, none with a gradient); more steps "
        "show it the well-settled previous output it gets live",
    )
    discriminator: ModelConfig | None = None
    data: DataConfig
    rig: RigRanges | None = Field(
        None,
        description="simulated data: record each sample with a rig drawn from these ranges "
        "(gain, read noise, offset, column pattern, PSF width, photons, line phase); None: the "
        "preset's rig as it is",
    )
    motion: MotionRanges | None = Field(
        None,
        description="simulated data: move and turn the field of view of each sequence between "
        "its frames; None: a still stage",
    )
    normalization: Normalization | None = Field(None, description="None: from the data")
    losses: dict[str, float] = Field(
        default_factory=lambda: {"l1": 1.0}, description="weight per term of losses.LOSSES"
    )
    adversarial: Literal["lsgan", "bce", "ragan", "wgan"] = "lsgan"
    gp_weight: float = Field(10.0, ge=0, description="WGAN-GP gradient penalty weight")
    vgg_weights: Path | None = Field(None, description="VGG-19 weights for perceptual/style")
    schedule: Schedule = Schedule()
    batch: int = Field(8, ge=1)
    lr: float = Field(2e-4, gt=0)
    lr_d: float = Field(1e-4, gt=0)
    lr_decay: Literal["constant", "cosine"] = Field(
        "constant",
        description="the generator's learning rate over each phase it trains in (pre-training, "
        "the game): constant, or a half cosine from lr down to lr/100 at the phase's end",
    )
    validate_every: int = Field(100, ge=1)
    patience: int = Field(10, ge=1, description="validations without improvement before stop")
    log_every: int = Field(10, ge=1)
    seed: int = 0
    video_augment: bool = Field(
        True,
        description="random flips/rotations, the same for the window, target, previous and "
        "background; off for data whose artifacts have an orientation (bidirectional scan lines)",
    )
    init_from: Path | None = Field(None, description="checkpoint to fine-tune from")
    tile: int | None = Field(256, description="tile side the exported engine runs at")

    @field_validator("name")
    @classmethod
    def _engine_name(cls, v: str) -> str:
        if not ENGINE_NAME.match(v):
            raise ValueError(f"name {v!r} must be 1-64 of [a-z0-9._-], starting alphanumeric")
        return v

    @field_validator("losses")
    @classmethod
    def _known_losses(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(GENERATOR_LOSSES))
        if unknown:
            raise ValueError(f"unknown losses {unknown}; choose from {list(GENERATOR_LOSSES)}")
        if any(w < 0 for w in v.values()):
            raise ValueError(f"loss weights must be >= 0, got {v}")
        return v

    def model_post_init(self, _: Any) -> None:
        s = self.schedule
        if (s.discriminator_steps or s.adversarial_steps) and self.discriminator is None:
            raise ValueError(
                "the schedule has discriminator or adversarial steps but no discriminator: "
                "add `discriminator: {arch: patchgan}` or set those steps to 0"
            )
        if s.adversarial_steps and not self.losses.get("adversarial"):
            raise ValueError("adversarial_steps > 0 needs a weight for losses.adversarial")
        if s.total == 0:
            raise ValueError("the schedule has no steps: set schedule.pretrain_steps")
        if self.rig is not None and self.data.kind != "simulated":
            raise ValueError(
                f"rig randomizes simulated data; data.kind is {self.data.kind!r}: drop the rig "
                "section, or use data.kind: simulated"
            )
        if self.motion is not None and self.data.kind not in ("simulated", "synthetic"):
            raise ValueError(
                f"motion moves simulated or synthetic data; data.kind is {self.data.kind!r}: "
                "drop the motion section"
            )
        target = self.data.target
        if target in ("blind-spot", "line-split"):
            pixel = ("l1", "mse", "poisson_gaussian")
            other = sorted(k for k, w in self.losses.items() if w and k not in pixel)
            if other or self.discriminator is not None:
                what = ("scores the hidden pixels one by one" if target == "blind-spot" else
                        "scores half-size images against a corrected target")  # fmt: skip
                raise ValueError(
                    f"{target} training {what}: use the pixel losses {', '.join(pixel)} only, "
                    f"without "
                    f"{other or ['a discriminator']}"
                )
        if target == "line-split" and self.video_augment:
            raise ValueError(
                "line-split training splits the frames by their recorded lines, which rotations "
                "would turn into columns: set video_augment: false"
            )
        if target == "blind-spot":
            g = self.generator
            if g.arch != "unet" or g.overrides.get("residual", True) is not False:
                raise ValueError(
                    "blind-spot training needs a generator without the global residual (it "
                    "would add back the pixel the network is trained not to see): use "
                    "generator: {arch: unet, overrides: {residual: false}}"
                )
        if self.rollout > 1 and not self.previous:
            raise ValueError(
                f"rollout={self.rollout} needs previous: true (it rolls the generator's own "
                "previous output forward); set previous: true or rollout: 1"
            )

    def digest(self) -> str:
        """sha256 of the config as JSON (sorted keys): the manifest's training-config hash.

        Settings added after engines shipped (``_ADDED_LATER``) are left out while they hold
        their default, so a config that does not use them keeps the hash it had."""
        data = self.model_dump(mode="json")
        for key in _ADDED_LATER:
            section, model, name = (
                (data["data"], DataConfig, key[5:]) if key.startswith("data.") else
                (data, type(self), key)
            )  # fmt: skip
            if section[name] == model.model_fields[name].default:
                del section[name]
        text = json.dumps(data, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


class ConfigError(ScopecastError, ValueError):
    """A training config that cannot be used; the message says where and why."""


def load_config(path: Path) -> TrainConfig:
    """Read and validate a YAML training config; relative paths resolve against its folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training config {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, got {type(raw).__name__}")
    try:
        cfg = TrainConfig.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"{path}: {problems}") from e
    return _resolve_paths(cfg, path.parent)


def _resolve_paths(cfg: TrainConfig, base: Path) -> TrainConfig:
    def fix(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else (base / p).resolve()

    data = cfg.data.model_copy(
        update={"folder": fix(cfg.data.folder), "profile": fix(cfg.data.profile)}
    )
    return cfg.model_copy(
        update={"data": data, "vgg_weights": fix(cfg.vgg_weights), "init_from": fix(cfg.init_from)}
    )


__all__ = ["ConfigError", "ModelConfig", "Schedule", "TrainConfig", "load_config"]
