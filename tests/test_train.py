"""Training end to end on simulated pairs (tiny), resume, fine-tuning, and export to an engine
package that the server's ONNX Runtime backend runs like torch."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch", reason="training needs the train extra")

from engines.engine import EngineChain  # noqa: E402
from engines.models import GENERATORS  # noqa: E402
from engines.train.checkpoint import load_checkpoint, strip_prefix  # noqa: E402
from engines.train.config import ConfigError, TrainConfig, load_config  # noqa: E402
from engines.train.loop import Trainer  # noqa: E402

TINY_UNET = {"arch": "unet", "size": "small", "overrides": {"features": 8, "depth": 2}}


def config(**over) -> dict:
    base = {
        "name": "tiny-denoise",
        "task": "denoise",
        "generator": TINY_UNET,
        "data": {
            "kind": "simulated",
            "preset": "confocal-20fps",
            "pairs": 12,
            "val_pairs": 4,
            "patch": 32,
            "field": 64,
            "seed": 0,
        },
        "losses": {"l1": 1.0},
        "schedule": {"pretrain_steps": 60},
        "batch": 4,
        "lr": 2e-3,
        "validate_every": 20,
        "log_every": 5,
    }
    base.update(over)
    return base


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig.model_validate(config())
    summary = Trainer(cfg, out).run()
    return cfg, out, summary


def test_short_training_lowers_loss_and_raises_psnr(trained):
    _, out, summary = trained
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    val = [r for r in log if "val_psnr" in r]
    assert val[0]["step"] == 0 and len(val) >= 3
    assert summary["best"]["psnr"] > val[0]["val_psnr"] + 1.0  # measurably better
    assert min(r["val_l1"] for r in val[1:]) < val[0]["val_l1"]
    assert (out / "samples.png").read_bytes()[:4] == b"\x89PNG"
    assert any("g_l1" in r for r in log)


def test_resume_continues_where_it_stopped(tmp_path):
    cfg = TrainConfig.model_validate(config(schedule={"pretrain_steps": 40}))
    Trainer(cfg, tmp_path).run(until=20)  # as if stopped after step 20
    _, meta = load_checkpoint(tmp_path / "last.safetensors")
    assert meta["step"] == 20
    resumed = Trainer(cfg, tmp_path, resume=True)
    assert resumed.step == 20
    assert resumed.opt_g.state_dict()["state"][0]["step"].item() == 20  # Adam state came back
    summary = resumed.run()
    assert summary["steps"] == 40
    steps = [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 40  # no step trained twice
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(cfg, tmp_path)
    other = cfg.model_copy(update={"lr": 1e-3})
    with pytest.raises(ValueError, match="another config"):
        Trainer(other, tmp_path, resume=True)


def test_export_runs_in_the_server_backend_like_torch(trained, tmp_path):
    cfg, out, _ = trained
    run = subprocess.run(
        [sys.executable, "-m", "stream", "export", str(out / "best.safetensors"), "--out",
         str(tmp_path / "engine")],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    chain = EngineChain.open([tmp_path / "engine"])
    m = chain.engines[0].manifest
    assert m.task == "denoise" and m.architecture == "unet" and not m.baseline
    assert m.provenance["train_config_sha256"] == cfg.digest()
    assert m.metrics["psnr"] > 0
    # the same frame through the server's engine path and through torch
    tensors, meta = load_checkpoint(out / "best.safetensors")
    g = GENERATORS["unet"].from_config(meta["generator"]["config"])
    g.load_state_dict(strip_prefix("g", tensors))
    g.eval()
    frame = np.random.default_rng(0).poisson(80, (256, 256)).astype(np.uint16) + 50  # one tile
    served = chain.enhance([frame], {}, None).stages[-1].output
    n = m.normalization
    # simulated data: the camera is known, so the manifest is in electrons with the same input
    assert n.units == "electrons" and n.camera is not None
    gain = n.camera.gain_adu_per_electron
    offset, scale = n.offset * gain + n.camera.offset_adu, n.scale * gain  # the ADU equivalent
    with torch.no_grad():
        x = torch.from_numpy((frame.astype(np.float32) - offset) / scale)[None, None]
        ref = g(x)[0, 0].numpy() * scale + offset
    assert np.abs(served - ref).max() <= 1e-4 * np.abs(ref).max()


def test_adversarial_schedule_runs(tmp_path):
    cfg = TrainConfig.model_validate(config(
        discriminator={"arch": "patchgan", "size": "small", "overrides": {"features": 8}},
        losses={"l1": 1.0, "adversarial": 0.01},
        schedule={"pretrain_steps": 4, "discriminator_steps": 4, "adversarial_steps": 4},
        validate_every=6,
        log_every=1,
    ))  # fmt: skip
    summary = Trainer(cfg, tmp_path).run()
    assert summary["steps"] == 12
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    phases = {r.get("phase") for r in log}
    assert {"pretrain", "discriminator", "adversarial"} <= phases
    assert any("g_adversarial" in r and "d_loss" in r for r in log)


def test_early_stopping_ends_pretraining_then_the_run(tmp_path):
    """A learning rate too small to improve anything: pre-training is declared converged
    after `patience` validations, the discriminator phase follows, then the game stops too."""
    cfg = TrainConfig.model_validate(config(
        lr=1e-9, patience=2, validate_every=2, log_every=1,
        discriminator={"arch": "cnn", "size": "tiny"}, losses={"l1": 1.0, "adversarial": 1e-9},
        schedule={"pretrain_steps": 100, "discriminator_steps": 2, "adversarial_steps": 100},
    ))  # fmt: skip
    summary = Trainer(cfg, tmp_path).run()
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "pretraining converged" for r in log)
    assert "discriminator" in {r.get("phase") for r in log}
    assert summary["stopped_early"] and summary["steps"] < cfg.schedule.total


def test_fine_tuning_starts_from_a_checkpoint(trained, tmp_path):
    _, out, summary = trained
    cfg = TrainConfig.model_validate(config(init_from=str(out / "best.safetensors"),
                                            schedule={"pretrain_steps": 5}))  # fmt: skip
    t = Trainer(cfg, tmp_path)
    t.run()
    first = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert first["val_psnr"] == pytest.approx(summary["best"]["psnr"], abs=0.5)


def test_bad_configs_say_what_is_wrong(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config(losses={"l3": 1.0})))
    with pytest.raises(ConfigError, match="unknown losses"):
        load_config(bad)
    bad.write_text(yaml.safe_dump(config(schedule={"pretrain_steps": 5, "adversarial_steps": 5})))
    with pytest.raises(ConfigError, match="discriminator"):
        load_config(bad)
    run = subprocess.run([sys.executable, "-m", "stream", "train", str(tmp_path / "none.yaml")],
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert run.returncode == 2 and "not found" in run.stderr


def test_perceptual_loss_without_vgg_weights_is_explained(tmp_path):
    cfg = TrainConfig.model_validate(config(losses={"l1": 1.0, "perceptual": 0.1}))
    with pytest.raises(FileNotFoundError, match="VGG-19"):
        Trainer(cfg, tmp_path)


def test_config_file_round_trip(tmp_path):
    path = Path(tmp_path / "c.yaml")
    path.write_text(yaml.safe_dump(config()))
    assert load_config(path).name == "tiny-denoise"


def test_config_paths_resolve_against_the_configs_folder_and_absolute_ones_stay(tmp_path):
    data = {"kind": "stacks", "folder": "pairs"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config(data=data, init_from="/abs/x.st")))
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.data.folder == (tmp_path / "pairs").resolve()
    assert cfg.init_from == Path("/abs/x.st")
    data["folder"] = str(tmp_path / "elsewhere")  # absolute: as it is (it was dropped)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config(data=data)))
    assert load_config(tmp_path / "c.yaml").data.folder == tmp_path / "elsewhere"


def test_rollout_feeds_each_output_to_the_next_step(tmp_path):
    """rollout=3: the generator runs 3 steps without a gradient from the first-frame rule, each
    getting the output before as previous, then the scored step with a gradient."""
    cfg = TrainConfig.model_validate(config(
        task="denoise-super-resolution", scale=2, window=2, previous=True, rollout=3,
        generator={"arch": "tgan", "size": "tiny"}))  # fmt: skip
    trainer = Trainer(cfg, tmp_path)
    batch = {k: v[None] for k, v in trainer.train_set[0].items()}
    calls = []
    trainer.g.register_forward_hook(
        lambda _m, args, out: calls.append((args, out, torch.is_grad_enabled()))
    )
    out = trainer._forward(batch)
    assert len(calls) == 4 and [c[2] for c in calls] == [False, False, False, True]
    assert torch.equal(calls[0][0][1], batch["previous_prev"])
    frames = batch["frames_prev"].split(2, dim=1)
    for i in range(3):
        assert torch.equal(calls[i][0][0], frames[i])
        assert torch.equal(calls[i + 1][0][1], calls[i][1])
    assert torch.equal(calls[3][0][0], batch["frames"]) and out.requires_grad


def test_rollout_needs_previous_and_later_settings_keep_older_hashes():
    with pytest.raises(ValueError, match="rollout=2 needs previous"):
        TrainConfig.model_validate(config(rollout=2))
    # a setting added later is left out of the hash at its default: shipped engines still match
    cfg = TrainConfig.model_validate(config(rollout=1, lr_decay="constant"))
    dump = cfg.model_dump(mode="json")
    del dump["rollout"], dump["lr_decay"], dump["rig"], dump["motion"]
    for key in ("specimens", "frames", "max_shift_px", "key_starts"):  # data settings added later
        del dump["data"][key]
    assert cfg.digest() == hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()
    temporal = config(task="denoise-super-resolution", scale=2, window=2, previous=True)
    assert TrainConfig.model_validate({**temporal, "rollout": 2}).digest() != (
        TrainConfig.model_validate(temporal).digest()
    )


def test_cosine_lr_decay_falls_over_each_phase(tmp_path):
    cfg = TrainConfig.model_validate(config(
        lr_decay="cosine", discriminator={"arch": "patchgan", "size": "tiny"},
        losses={"l1": 1.0, "adversarial": 0.01},
        schedule={"pretrain_steps": 10, "discriminator_steps": 2,
                  "adversarial_steps": 4}))  # fmt: skip
    trainer = Trainer(cfg, tmp_path)
    lrs = []
    for step in range(16):
        trainer.step = step
        lrs.append(trainer._generator_lr())
    assert lrs[0] == pytest.approx(2e-3) and lrs[5] == pytest.approx(2e-3 * 0.505)
    assert all(a > b for a, b in pairwise(lrs[:10]))  # falls over pre-training
    assert lrs[12] == pytest.approx(2e-3) and lrs[14] == pytest.approx(2e-3 * 0.505)  # the game
    trainer.step = 0
    trainer._train_step("pretrain", {k: v[None] for k, v in trainer.train_set[0].items()})
    assert trainer.opt_g.param_groups[0]["lr"] == pytest.approx(2e-3)
    constant = Trainer(TrainConfig.model_validate(config()), tmp_path / "constant")
    constant.step = 7
    assert constant._generator_lr() == 2e-3


def test_config_rig_and_motion_sections_are_opt_in():
    plain = TrainConfig.model_validate(config())
    assert plain.rig is None and plain.motion is None
    assert plain.digest() == TrainConfig.model_validate(config(rig=None, motion=None)).digest()
    cfg = TrainConfig.model_validate(config(rig={"gain_adu_per_electron": [1, 4],
                                                 "bidirectional": None},
                                            motion={"max_speed_px": 4}))  # fmt: skip
    assert cfg.rig.gain_adu_per_electron == (1.0, 4.0) and cfg.rig.read_noise_e == (0.3, 3.0)
    assert cfg.motion.max_speed_px == 4 and cfg.digest() != plain.digest()
    with pytest.raises(ValueError, match="above 0"):
        TrainConfig.model_validate(config(rig={"gain_adu_per_electron": [0, 4]}))
    with pytest.raises(ValueError, match="low <= high"):
        TrainConfig.model_validate(config(rig={"read_noise_e": [3, 1]}))
    with pytest.raises(ValueError, match="simulated or synthetic"):
        TrainConfig.model_validate(config(motion={}, data={"kind": "paired", "folder": "x"}))
    with pytest.raises(ValueError, match="rig randomizes simulated data"):
        TrainConfig.model_validate(config(rig={}, data={"kind": "synthetic"}))
    assert TrainConfig.model_validate(config(motion={}, data={"kind": "synthetic"})).motion
    example = load_config(Path(__file__).parents[1] / "engines/zoo/configs/examples"
                          / "confocal-denoise-randomized.yaml")  # fmt: skip
    assert example.rig is not None and example.motion is not None
