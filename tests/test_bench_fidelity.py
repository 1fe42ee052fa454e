"""`scopecast bench fidelity`: planted objects of a known raw SNR, the server's check, honest
numbers (a perfect output's chi-square with and without a column pattern, the measured false
alarms), an engine's outputs, the cost table and the CLI's files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from bench.fidelity import _check, _matching_z, _snr, plant, run_fidelity, simulated_scenes


@pytest.fixture(scope="module")
def scene():
    return simulated_scenes("confocal-20fps", ["nuclei"], 64, 2)[0]


@pytest.mark.parametrize("kind", ["invented", "removed", "patch"])
def test_a_planted_object_has_the_asked_snr(scene, kind):
    rng = np.random.default_rng(1)
    for _ in range(20):  # places and shapes differ: every one at the asked SNR
        p = plant(scene, kind, 2 * scene.psf_sigma_px, 6.0, scene.expected, rng)
        assert p is not None
        change = p.output - scene.expected if kind != "removed" else p.recorded - scene.expected
        checked = p.output  # the check's variance is the output's prediction's
        assert _snr(scene, change, checked) == pytest.approx(6.0, rel=1e-3)
    assert (kind == "removed") == (p.output is scene.expected)
    assert scene.expected.std() > 0  # the field has structure (patches copy it)


def test_strong_objects_are_found_and_faint_ones_are_not(scene):
    rng = np.random.default_rng(2)
    found = {}
    for snr in (1.0, 12.0):
        z = []
        for _ in range(6):
            p = plant(scene, "invented", 2 * scene.psf_sigma_px, snr, scene.expected, rng)
            raw = scene.record(p.recorded, rng)
            z.append(_matching_z(_check(scene, p.output, raw, 0.05).scan, p, scene.scale))
        found[snr] = np.mean([v > 0 for v in z])
    assert found[12.0] == 1 and found[1.0] <= 1 / 6


def test_perfect_output_is_honest_and_an_engine_is_scored(tmp_path):
    r = run_fidelity(engines=["bicubic-x2"], specimens=["nuclei"], side=64, frames=3,
                     kinds=["invented", "removed"], snrs=[2.0, 10.0], radii=[2.0],
                     cost_sides=[64], column_sd_adu=4.0)  # fmt: skip
    assert r["scenes"] == ["sim-nuclei", "sim-nuclei+columns4"]
    assert r["sources"] == ["perfect", "bicubic-x2"]
    perfect = r["by_source"]["perfect"]
    lo, hi = perfect["chi2_range"]
    assert 0.9 < lo <= hi < 1.1  # the column pattern is in the prediction
    assert perfect["honest_frames"] == 6 and perfect["false_alarm"] <= 1 / 3
    strong = perfect["detection"]["invented"]["2"]
    assert strong["10"] == 1.0 and strong["2"] < 0.5
    assert perfect["detection"]["removed"]["2"]["10"] >= 5 / 6
    # the ROC: stricter thresholds never flag more honest frames nor find more objects
    roc = perfect["roc"]
    assert [p["threshold"] for p in roc] == sorted(p["threshold"] for p in roc)[::-1]
    for looser, stricter in zip(roc[1:], roc[:-1], strict=True):
        assert stricter["false_alarm"] <= looser["false_alarm"]
        assert stricter["detection_snr5"] <= looser["detection_snr5"]
    bicubic = r["by_source"]["bicubic-x2"]  # smooths: its own residual, but it runs through
    assert bicubic["honest_frames"] == 6 and bicubic["detection"]["invented"]["2"]["10"] >= 0.5
    cost = r["cost_ms"]["64"]
    assert cost["full_ms"] > 0 and cost["auto_every"] == 1


def test_cli_writes_the_table_json_and_plots(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "bench", "fidelity", "--side", "48", "--frames", "2",
         "--specimen", "puncta", "--kind", "invented", "--snr", "8", "--radius", "1",
         "--cost", "0", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "fidelity.json").read_text())
    assert result["kind"] == "fidelity" and result["cost_ms"] == {}
    assert "honest chi2" in run.stdout and "invented, radius 1 PSF" in run.stdout
    assert (tmp_path / "fidelity-roc.png").exists() and (tmp_path / "fidelity-snr.png").exists()
    bad = subprocess.run([sys.executable, "-m", "bench", "fidelity", "--kind", "ghost"],
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert bad.returncode == 2 and "ghost" in bad.stderr and "invented" in bad.stderr
