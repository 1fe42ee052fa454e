"""bench.throughput on the shipped zoo engines, tiny sizes and short runs (CPU only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.throughput import format_table, plot_throughput, run_throughput


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    """identity + gaussian at 64 and 128 px, whole frame and 64 px tiles, plus a CUDA request."""
    return run_throughput(
        engines=["identity", "gaussian"],
        sizes=(64, 128),
        backends=("onnxruntime-cpu", "onnxruntime-cuda"),
        tiles=(None, 64),
        threads=1,
        seconds=0.3,
        warmup=1,
    )


def _ran(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in result["results"] if "skipped" not in r]


def test_every_combination_has_a_row(result: dict[str, Any]) -> None:
    assert result["kind"] == "throughput"
    combos = {(r["engine"], r["backend"], r["size"], r["tile"]) for r in result["results"]}
    assert len(result["results"]) == len(combos) == 2 * 2 * 2 * 2
    assert {r["batch"] for r in result["results"]} == {1}  # the manifests' batch


def test_results_are_consistent(result: dict[str, Any]) -> None:
    ran = _ran(result)
    cpu = [r for r in ran if r["backend"] == "onnxruntime-cpu"]
    assert len(cpu) == 8, [r.get("skipped") for r in result["results"]]
    for r in ran:
        assert r["fps"] > 0 and r["frames"] >= 1
        assert r["mpx_per_s"] == pytest.approx(r["fps"] * r["size"] ** 2 / 1e6)
        lat = r["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert set(r["stages_ms"]) == {"preprocess", "inference", "postprocess"}
        assert all(v >= 0 for v in r["stages_ms"].values())
        assert r["stages_ms"]["inference"] > 0
        assert "onnxruntime" in r["backend_reason"]


def test_cuda_without_gpu_is_skipped_with_reason(result: dict[str, Any]) -> None:
    cuda = [r for r in result["results"] if r["backend"] == "onnxruntime-cuda"]
    assert len(cuda) == 8
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime offers CUDA: the request may run here")
    for r in cuda:
        assert "CUDAExecutionProvider" in r["skipped"]
        assert "fps" not in r


def test_tile_smaller_than_overlap_is_skipped() -> None:
    out = run_throughput(engines=["gaussian"], sizes=(64,), tiles=(16,), seconds=0.05, warmup=0)
    (row,) = out["results"]
    assert "overlap" in row["skipped"] and "16" in row["skipped"]


def test_batch_and_auto_backend() -> None:
    out = run_throughput(
        engines=["identity"], sizes=(128,), tiles=(32,), batches=(4,), seconds=0.05, warmup=0
    )
    (row,) = out["results"]
    assert row["batch"] == 4 and row["tile"] == 32 and row["fps"] > 0
    assert row["backend"] == "auto" and row["backend_reason"].startswith("auto")


def test_progress_sees_every_row() -> None:
    seen: list[dict[str, Any]] = []
    out = run_throughput(
        engines=["identity"], sizes=(8, 16), seconds=0.02, warmup=0, progress=seen.append
    )
    assert seen == out["results"]


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"engines": ["no-such-engine"]}, "no-such-engine"),
        ({"backends": ("tensorflow",)}, "tensorflow"),
        ({"sizes": (4,)}, "4"),
        ({"sizes": (64.0,)}, "64.0"),
        ({"seconds": 0}, "0"),
        ({"seconds": -1.0}, "-1.0"),
        ({"tiles": (0,)}, "0"),
        ({"batches": (0,)}, "0"),
    ],
)
def test_bad_input_raises_value_error(kwargs: dict[str, Any], named: str) -> None:
    args: dict[str, Any] = {"engines": ["identity"], "sizes": (64,), "seconds": 0.01, **kwargs}
    with pytest.raises(ValueError, match=named):
        run_throughput(**args)


def test_plot_and_table(result: dict[str, Any], tmp_path: Path) -> None:
    (path,) = plot_throughput(result, tmp_path / "plots")
    assert path.name == "throughput.png" and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table(result)
    assert table.count("\n") == 1 + len(result["results"])
    empty = plot_throughput({"kind": "throughput", "results": []}, tmp_path)
    assert empty[0].is_file()
