"""`scopecast bench ...` end to end on tiny sizes: tables, one JSON with consistent numbers,
plots, --compare, and clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip


def ordered(p: dict) -> bool:
    return p["p50"] <= p["p90"] <= p["p99"] <= p["max"]


@pytest.mark.slow
def test_latency_writes_consistent_numbers(tmp_path):
    run = bench("latency", "--engine", "gaussian", "--duration", "2", "--warmup", "0.5",
                "--out", str(tmp_path))  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "latency.json").read_text())
    assert list(result["engines"]) == ["identity", "gaussian"]  # the baseline comes first
    assert result["machine"]["cores"] >= 1 and "onnxruntime" in result["versions"]
    for e in result["engines"].values():
        assert "samples" not in e
        assert e["frames_enhanced"] <= e["frames_acquired"]
        for stage in ("hook", "transport", "queue", "inference", "publish", "disk", "total"):
            assert ordered(e["latency_ms"][stage]), stage
        assert e["latency_ms"]["inference"]["p50"] <= e["latency_ms"]["total"]["p50"]
    assert (tmp_path / "latency_gaussian_hist.png").exists()
    assert "total" in run.stdout


def test_throughput_and_compare(tmp_path):
    args = ("throughput", "--engine", "identity", "--size", "64", "--seconds", "0.2")
    first = bench(*args, "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    result = json.loads((tmp_path / "a" / "throughput.json").read_text())
    rows = result["results"]  # one per CPU backend found here (onnxruntime, openvino)
    assert rows and len({r["backend"] for r in rows}) == len(rows)
    for row in rows:
        assert row["fps"] > 0 and ordered(row["latency_ms"])
        assert row["mpx_per_s"] == pytest.approx(row["fps"] * 64 * 64 / 1e6, rel=1e-6)
    again = bench(*args, "--out", str(tmp_path / "b"), "--compare",
                  str(tmp_path / "a" / "throughput.json"))  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "compared with the older run" in again.stdout


def test_quality_against_the_baselines(tmp_path):
    run = bench("quality", "--engine", "gaussian", "--simulated", "confocal-20fps", "--pairs",
                "2", "--out", str(tmp_path))  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "quality.json").read_text())
    methods = result["methods"]
    assert {"raw", "identity", "bicubic", "gaussian", "nlm", "richardson-lucy", "unsharp-clahe",
            "engine:gaussian"} <= set(methods)  # fmt: skip
    assert methods["engine:gaussian"]["psnr"] > methods["raw"]["psnr"]
    assert all(0 < m["ssim"] <= 1 for m in methods.values())
    assert "samples" not in result and (tmp_path / "quality_panels.png").exists()


def test_bad_input_is_one_clear_line(tmp_path):
    for args, words in (
        (("throughput", "--engine", "nope", "--size", "64"), "nope"),
        (("throughput", "--engine", "identity", "--backend", "warp-drive"), "warp-drive"),
        (("latency", "--engine", "identity", "--duration", "0.5"), "--duration"),
        (("quality", "--engine", "identity"), "--data"),
        (("quality", "--engine", "identity", "--data", str(tmp_path)), "pairs"),
    ):
        run = bench(*args, "--out", str(tmp_path / "out"))
        assert run.returncode == 2, (args, run.stderr)
        assert words in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_crash_kills_a_server_and_recovers_every_indexed_plane(tmp_path):
    run = bench("crash", "--kills", "2", "--size", "32", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "crash.json").read_text())
    assert result["kills"] == 2 and len(result["rounds"]) == 2
    assert result["planes_indexed"] > 0
    assert result["planes_recovered_exact"] == result["planes_indexed"]
    assert "recovered bit-exact (100.00%)" in run.stdout
