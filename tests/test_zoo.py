"""The shipped default engines: each preset's default is in the zoo, each learned engine was
trained from the config under version control, is small, and still beats the classical
baselines on held-out simulated data (a quick regression check; `bench quality` measures)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.quality import run_quality
from calibration.sim.presets import PRESETS
from engines.package import ZOO_DIR, find_package, load_package

CONFIGS = ZOO_DIR / "configs"
LEARNED = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
MAX_ONNX_BYTES = 5 * 2**20


def test_every_preset_demo_engine_is_shipped() -> None:
    assert {"confocal-denoise", "confocal-denoise-sr2x", "brightfield-deblur"} <= set(LEARNED)
    for preset in PRESETS.values():
        package = load_package(find_package(preset.engine))
        assert package.path.parent == ZOO_DIR, preset.name
        assert not package.manifest.baseline, f"{preset.name} demo runs a baseline"


@pytest.mark.parametrize("name", LEARNED)
def test_learned_engine_matches_its_config(name: str) -> None:
    pytest.importorskip("torch", reason="reading training configs needs the train extra")
    from engines.train.config import load_config

    cfg = load_config(CONFIGS / f"{name}.yaml")
    package = load_package(find_package(name))
    m = package.manifest
    assert (package.path / m.model).stat().st_size <= MAX_ONNX_BYTES
    assert m.provenance["train_config_sha256"] == cfg.digest(), (
        f"engines/zoo/{name} was not trained from engines/zoo/configs/{name}.yaml as it is now: "
        "retrain and export it"
    )
    assert (m.task, m.scale, m.temporal.window) == (cfg.task, cfg.scale, cfg.window)
    assert (m.temporal.previous_output, m.temporal.background) == (cfg.previous, cfg.background)
    assert {"psnr", "ssim"} <= set(m.metrics)


@pytest.mark.parametrize(
    ("engines", "preset", "reference", "extra"),
    [
        (["confocal-denoise"], "confocal-20fps", "gaussian", {}),
        (["confocal-denoise-sr2x"], "confocal-20fps", "gaussian", {}),
        (["brightfield-deblur"], "celldiscoverer", "unsharp-clahe", {"defocus_um": (1.5, 3.0)}),
    ],
)
def test_learned_engine_beats_the_classical_baseline(
    engines: list[str], preset: str, reference: str, extra: dict, tmp_path: Path
) -> None:
    r = run_quality(engines=engines, simulated=preset, pairs=2, sequence=0, field=96,
                    baselines=["identity", reference], truth="expected", **extra)  # fmt: skip
    engine = r["methods"][f"engine:{engines[0]}"]
    assert engine["psnr"] > r["methods"][reference]["psnr"] + 1.0
    assert engine["psnr"] > r["methods"]["identity"]["psnr"] + 3.0
