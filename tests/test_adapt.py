"""``scopecast adapt``: a shipped engine's weights come back out of its ONNX graph, it is
fine-tuned on a noisy recording alone, and the gate passes or refuses it with a report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

torch = pytest.importorskip("torch", reason="adaptation needs the train extra")

from engines.offline.adapt import GateScores, base_checkpoint, gate  # noqa: E402
from engines.package import load_package  # noqa: E402


def test_a_shipped_engines_weights_come_back_out_of_its_onnx(tmp_path):
    import onnxruntime as ort

    from engines.models import GENERATORS
    from engines.train.checkpoint import load_checkpoint, strip_prefix

    package = load_package("confocal-denoise")
    tensors, meta = load_checkpoint(base_checkpoint(package, tmp_path / "base.safetensors", None))
    g = GENERATORS[meta["generator"]["arch"]].from_config(meta["generator"]["config"]).eval()
    g.load_state_dict(strip_prefix("g", tensors))
    x = np.random.default_rng(0).random((1, 1, 64, 64), np.float32)
    session = ort.InferenceSession(str(package.path / package.manifest.model))
    (want,) = session.run(None, {session.get_inputs()[0].name: x})
    with torch.no_grad():
        np.testing.assert_allclose(g(torch.from_numpy(x)).numpy(), want, atol=1e-5)
    # its normalization in ADU of the camera it was trained with (electrons in the manifest)
    assert meta["normalization"]["units"] == "adu"
    norm = package.manifest.normalization
    assert norm.camera is not None
    gain = norm.camera.gain_adu_per_electron
    assert meta["normalization"]["scale"] == pytest.approx(norm.scale * gain)


def _scores(mse: float, chi2: float) -> GateScores:
    return GateScores(mse, chi2, (np.zeros((2, 2)), np.zeros((2, 2))))


def test_gate_refuses_worse_consistency_and_dishonest_fidelity():
    assert gate(_scores(10.0, 1.0), _scores(9.0, 1.05)) == []
    assert gate(None, _scores(9.0, 1.05)) == []  # from scratch: fidelity only
    worse = gate(_scores(10.0, 1.0), _scores(11.0, 1.0))
    assert len(worse) == 1 and "worse than the base engine's 10" in worse[0]
    (invents,) = gate(_scores(10.0, 1.0), _scores(9.0, 2.0))
    assert "outside the honest band 0.8-1.3" in invents and "removed or invented" in invents
    (keeps,) = gate(_scores(10.0, 1.0), _scores(9.0, 0.5))
    assert "it keeps noise" in keeps


def _recording(folder: Path, files: int = 2, frames: int = 12) -> Path:
    from calibration.sim.pairs import PairRig
    from calibration.sim.presets import get_preset

    rig = PairRig(get_preset("confocal-20fps"), field=64)
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for j in range(files):
        xy = (25.0 * j, -10.0 * j)
        tifffile.imwrite(
            folder / f"r{j}.tif", np.stack([rig.low(0.0, xy, rng) for _ in range(frames)])
        )
    return folder


def test_adapt_command_trains_gates_and_reports(tmp_path):
    from typer.testing import CliRunner

    from stream.cli import _add_groups, app

    _add_groups()
    rec = _recording(tmp_path / "rec")
    out = tmp_path / "adapted"
    run = CliRunner().invoke(app, ["adapt", str(rec), "--out", str(out), "--steps", "8"])
    report = json.loads((out / "report.json").read_text())
    assert report["frames"] == {"r0": 12, "r1": 12}
    assert report["held_out_frames"] == {"r0": 2, "r1": 2}
    # the training frames before them run first, unscored: temporal engines are scored settled
    assert report["context_frames"] == {"r0": 9, "r1": 9}
    assert all("start_offset_adu" in v for v in report["scores"].values())
    assert set(report["scores"]) == {"base", "adapted"} and (out / "report.png").is_file()
    if report["gate"]["passed"]:
        assert run.exit_code == 0, run.output
        assert load_package(out / "engine").manifest.name == "confocal-denoise-adapted"
    else:  # refused: exit 1, the candidate kept for a look, no engine
        assert run.exit_code == 1 and "refused:" in run.output
        assert (out / "candidate").is_dir() and not (out / "engine").exists()
    bad = CliRunner().invoke(app, ["adapt", str(rec), "--out", str(tmp_path / "x"),
                                   "--base", "confocal-denoise-sr2x", "--denoiser",
                                   "bicubic-x2"])  # fmt: skip
    assert bad.exit_code == 2 and "--denoiser 'bicubic-x2' has scale 2" in bad.output


def test_a_super_resolution_engine_adapts_from_estimates_through_the_forward_model(tmp_path):
    from typer.testing import CliRunner

    from stream.cli import _add_groups, app

    _add_groups()
    rec = _recording(tmp_path / "rec", files=1)
    out = tmp_path / "sr"
    run = CliRunner().invoke(app, ["adapt", str(rec), "--out", str(out), "--steps", "3",
                                   "--base", "confocal-denoise-sr2x"])  # fmt: skip
    assert run.exit_code in (0, 1), run.output
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == "estimates" and report["denoiser"] == "confocal-denoise"
    # 8 denoised training frames, in the forward model's units, one grid finer than raw
    estimates = sorted((out / "data").glob("r0-t*.tif"))
    assert len(estimates) == 8 and tifffile.imread(estimates[0]).shape == (64, 64)
    cfg = json.loads((out / "run" / "config.json").read_text())
    assert cfg["data"]["kind"] == "synthetic" and cfg["scale"] == 2 and cfg["previous"]
    # the still estimates move as the base's data moved, and a quarter start a key
    assert cfg["motion"]["max_speed_px"] == 8.0 and cfg["data"]["key_starts"] == 0.25
    made = out / ("engine" if report["gate"]["passed"] else "candidate")
    assert load_package(made).manifest.scale == 2
    assert set(report["scores"]) == {"base", "adapted"}
    assert 0 < report["scores"]["adapted"]["chi2"] < 100


def test_check_gates_an_engine_made_elsewhere_without_training(tmp_path):
    from typer.testing import CliRunner

    from stream.cli import _add_groups, app

    _add_groups()
    rec = _recording(tmp_path / "rec", files=1)
    runner = CliRunner()
    # a mild Gaussian blur: it keeps noise (chi2 below the band) and matches the next raw frame
    # worse than the shipped denoiser
    wrong = runner.invoke(app, ["adapt", str(rec), "--check", "gaussian"])
    assert wrong.exit_code == 1, wrong.output
    assert "engine gaussian is refused for" in wrong.output
    assert "worse than the base engine's" in wrong.output and "it keeps noise" in wrong.output
    fit = runner.invoke(app, ["adapt", str(rec), "--check", "confocal-denoise", "--base", "none"])
    assert fit.exit_code == 0, fit.output
    result = json.loads(fit.output)
    assert result["gate"]["passed"] and set(result["scores"]) == {"engine"}
    assert result["frames"] == {"r0": 12} and 0.8 <= result["scores"]["engine"]["chi2"] <= 1.3
    no_out = runner.invoke(app, ["adapt", str(rec)])
    assert no_out.exit_code == 2 and "adapting needs --out DIR" in no_out.output
