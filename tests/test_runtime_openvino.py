"""The OpenVINO backend against ONNX Runtime on the same inputs: the shipped engines plain, tiled,
temporal and chained give the same outputs within fp32 tolerance, the numerics guard reaches the
same verdicts, ``--backend openvino`` is a name everywhere, ``auto`` takes it by its rule, and
without openvino everything still runs and says why it is not used. Tiny frames, 1 thread."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from engines.engine import Engine, EngineChain
from engines.package import EnginePackage, PackageError, Tiling, load_package, write_package
from engines.runtime import (
    BackendError,
    auto_order,
    backend_names,
    backend_status,
    open_backend,
)
from engines.runtime.guard import compare_runners

ov = pytest.importorskip("openvino", reason="the openvino backend needs openvino installed")

from engines.runtime.openvino import CACHED_SHAPES, auto_declines, auto_here  # noqa: E402

#: fp32 on two CPU runtimes: different kernels and summation orders, same math.
RTOL = 1e-5


def close_enough(got: np.ndarray, want: np.ndarray) -> None:
    """Equal within fp32 rounding, relative to the reference's value range."""
    assert got.shape == want.shape and got.dtype == want.dtype
    span = float(np.ptp(want)) or 1.0
    assert float(np.abs(got.astype(np.float64) - want).max()) <= RTOL * span


def with_tiling(package: EnginePackage, **tile: object) -> EnginePackage:
    """The package with its tiling replaced, in memory only."""
    m = package.manifest
    tiling = Tiling.model_validate({**m.tile.model_dump(), **tile})
    return dataclasses.replace(package, manifest=m.model_copy(update={"tile": tiling}))


def both(package: EnginePackage) -> tuple[EngineChain, EngineChain]:
    return (EngineChain([Engine(package, "onnxruntime-cpu", 1)]),
            EngineChain([Engine(package, "openvino", 1)]))  # fmt: skip


def frames(shape: tuple[int, int], count: int = 1, seed: int = 0) -> list[np.ndarray]:
    """Smooth structure plus noise, as uint16 ADU around a camera offset."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    base = 300 + 200 * np.sin(yy / 4.0) * np.cos(xx / 5.0)
    return [(base + rng.normal(0, 20, shape)).clip(0, 65535).astype(np.uint16)
            for _ in range(count)]  # fmt: skip


def compare_chains(ort: EngineChain, ovn: EngineChain, sequence: list[np.ndarray]) -> int:
    """Run both on ``sequence`` as the server does (each keeps its own previous outputs);
    every stage's float output agrees; returns how many frames were compared."""
    prev_ort: dict[int, np.ndarray] = {}
    prev_ov: dict[int, np.ndarray] = {}
    for i in range(len(sequence)):
        window = sequence[max(0, i + 1 - ort.window) : i + 1]
        a = ort.enhance(window, prev_ort, None)
        b = ovn.enhance(window, prev_ov, None)
        for sa, sb in zip(a.stages, b.stages, strict=True):
            close_enough(sb.output, sa.output)
        assert a.frame.dtype == b.frame.dtype == sequence[i].dtype
        assert int(np.abs(a.frame.astype(int) - b.frame).max()) <= 1  # rounding of x.5 only
        prev_ort = {s.stage: s.output for s in a.stages}
        prev_ov = {s.stage: s.output for s in b.stages}
    return len(sequence)


def test_a_plain_engine_matches_onnxruntime() -> None:
    ort, ovn = both(with_tiling(load_package("confocal-denoise"), size=None))
    try:
        assert [e.backend.name for e in ovn.engines] == ["openvino"]
        assert compare_chains(ort, ovn, frames((48, 40))) == 1
    finally:
        ort.close(), ovn.close()


def test_a_tiled_batched_engine_matches_onnxruntime() -> None:
    # 9 tiles of 80 in calls of 2: two input shapes (batch 2, then the last tile alone)
    package = with_tiling(load_package("brightfield-deblur"), size=80, overlap=32, batch=2)
    ort, ovn = both(package)
    try:
        compare_chains(ort, ovn, frames((150, 130)))
        assert ovn.describe()["backend"][0]["compiled_shapes"] == 2
    finally:
        ort.close(), ovn.close()


def test_a_temporal_engine_matches_onnxruntime_frame_after_frame() -> None:
    package = with_tiling(load_package("confocal-denoise-sr2x"), size=None)
    assert package.manifest.temporal.previous_output and package.manifest.temporal.background
    ort, ovn = both(package)
    try:
        assert compare_chains(ort, ovn, frames((40, 48), count=3, seed=1)) == 3
    finally:
        ort.close(), ovn.close()


def test_a_chain_matches_onnxruntime(tmp_path: Path) -> None:
    first = with_tiling(load_package("confocal-denoise-sr2x"), size=None)
    second = load_package("bicubic-x2")
    ort = EngineChain([Engine(first, "onnxruntime-cpu", 1), Engine(second, "onnxruntime-cpu", 1)])
    ovn = EngineChain([Engine(first, "openvino", 1), Engine(second, "openvino", 1)])
    try:
        assert [b["name"] for b in ovn.describe()["backend"]] == ["openvino", "openvino"]
        compare_chains(ort, ovn, frames((32, 40), count=2, seed=2))
        out = ovn.enhance(frames((32, 40)), {}, None).frame
        assert out.shape == (128, 160) and out.dtype == np.uint16
    finally:
        ort.close(), ovn.close()


# --- the numerics guard --------------------------------------------------------------------------


def spoiled(tmp_path: Path, name: str, how: str) -> EnginePackage:
    """``name``'s package with its output multiplied by 0 (a black frame) or NaN."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    package = load_package(name)
    model = onnx.load_from_string(package.read("model.onnx"))
    graph = model.graph
    out = graph.output[0].name
    factor = np.array(0.0 if how == "black" else np.nan, np.float32)
    graph.initializer.append(numpy_helper.from_array(factor, "spoil_factor"))
    for node in graph.node:  # the last node now writes a hidden tensor
        node.output[:] = [f"{o}_unspoiled" if o == out else o for o in node.output]
    graph.node.append(helper.make_node("Mul", [f"{out}_unspoiled", "spoil_factor"], [out]))
    return write_package(tmp_path / f"{name}-{how}", package.manifest,
                         {"model.onnx": model.SerializeToString()})  # fmt: skip


def test_the_guard_reaches_the_same_verdict_on_either_runtime(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    samples = [{"frames": rng.random((2, 1, 32, 40), dtype=np.float32)} for _ in range(2)]
    reference, _ = open_backend(load_package("confocal-denoise"), "onnxruntime-cpu", 1)
    same, _ = open_backend(load_package("confocal-denoise"), "openvino", 1)
    report = compare_runners(reference.infer, same.infer, samples, precision="fp32",
                             candidate_label="openvino fp32")  # fmt: skip
    assert report.passed and report.samples == 4, report.summary()
    assert report.max_error is not None and report.max_error < RTOL
    for how, failed in (("black", ["constant", "psnr", "max_error", "mean_error"]),
                        ("nan", ["nonfinite", "constant"])):  # fmt: skip
        package = spoiled(tmp_path, "confocal-denoise", how)
        verdicts = {}
        for runtime in ("onnxruntime-cpu", "openvino"):
            candidate, _ = open_backend(package, runtime, 1)
            r = compare_runners(reference.infer, candidate.infer, samples, precision="fp32",
                                candidate_label=runtime)  # fmt: skip
            candidate.close()
            verdicts[runtime] = (r.failed, r.nonfinite, r.constant_samples)
        assert verdicts["openvino"] == verdicts["onnxruntime-cpu"], verdicts
        assert verdicts["openvino"][0] == failed, (how, verdicts)
    # a candidate that raises is a rejection with its reason, on OpenVINO as on ONNX Runtime
    bad = [{"frames": rng.random((1, 3, 16, 16), dtype=np.float32)}]
    r = compare_runners(lambda b: b["frames"][:, :1], same.infer, bad, precision="fp32")
    assert r.failed == ["error"] and "'confocal-denoise' failed on inputs" in r.details[0]
    reference.close(), same.close()


# --- the backend itself --------------------------------------------------------------------------


def test_openvino_is_a_backend_name_with_threads_like_onnxruntime() -> None:
    assert "openvino" in backend_names()
    assert [s.family for s in auto_order()] == ["tensorrt", "openvino", "onnxruntime"]
    assert backend_status()["openvino"].startswith(f"openvino {ov.get_version().split('-')[0]}")
    package = load_package("gaussian")
    backend, reason = open_backend(package, "openvino", threads=1)
    info = backend.describe()
    assert backend.name == "openvino" and backend.device == "cpu"
    assert reason.startswith("openvino: openvino ") and "1 threads, as requested" in reason
    assert info["threads"] == info["effective_threads"] == 1
    assert info["inference_precision"] == "f32"
    assert [i["name"] for i in info["inputs"]] == ["frames"]
    x = np.random.default_rng(4).random((1, 1, 24, 24), dtype=np.float32)
    want, _ = open_backend(package, "onnxruntime-cpu", threads=1)
    close_enough(backend.infer({"frames": x, "unused": x}), want.infer({"frames": x}))
    with pytest.raises(BackendError, match=r"needs inputs \['frames'\]"):
        backend.infer({"previous": x})
    with pytest.raises(BackendError, match=r"failed on inputs \{'frames': \(1, 3, 24, 24\)\}"):
        backend.infer({"frames": np.zeros((1, 3, 24, 24), np.float32)})
    backend.close()
    with pytest.raises(BackendError, match="is closed"):
        backend.infer({"frames": x})
    for bad in (0, -2):
        with pytest.raises(BackendError, match=f"threads must be >= 1 or None.*got {bad}"):
            open_backend(package, "openvino", threads=bad)
    default, _ = open_backend(package, "openvino")
    assert default.describe()["threads"] is None and default.describe()["effective_threads"] >= 1


def test_a_model_that_does_not_fit_its_manifest_is_refused(tmp_path: Path) -> None:
    package = load_package("confocal-denoise-sr2x")  # a temporal manifest, a one-input model
    broken = write_package(tmp_path / "t", package.manifest,
                           {"model.onnx": load_package("gaussian").read("model.onnx")})  # fmt: skip
    for runtime in ("onnxruntime-cpu", "openvino"):
        with pytest.raises(PackageError, match=r"has inputs \['frames'\] but its manifest implies"):
            open_backend(broken, runtime)


def test_a_few_shapes_are_kept_compiled() -> None:
    backend, _ = open_backend(load_package("gaussian"), "openvino", threads=1)
    want, _ = open_backend(load_package("gaussian"), "onnxruntime-cpu", threads=1)
    rng = np.random.default_rng(5)
    for side in (16, 24, 32, 40, 48, 56, 16):  # more shapes than are kept, then an old one
        x = rng.random((1, 1, side, side + 8), dtype=np.float32)
        close_enough(backend.infer({"frames": x}), want.infer({"frames": x}))
    assert backend.describe()["compiled_shapes"] == CACHED_SHAPES
    backend.close(), want.close()


def test_auto_takes_openvino_on_this_cpu_and_says_why() -> None:
    if (why := auto_here()) is not None:
        pytest.skip(f"auto does not take OpenVINO on this machine: {why}")
    backend, reason = open_backend(load_package("identity"), "auto", threads=1)
    try:
        assert backend.name == "openvino"
        assert (
            reason.startswith("auto: openvino ") and "before ONNX Runtime's CPU provider" in reason
        )
        assert "0.65-0.75 of ONNX Runtime's CPU time" in reason
        assert "TensorRT not used:" in reason
        x = np.random.default_rng(6).random((1, 1, 8, 8), dtype=np.float32)
        assert np.array_equal(backend.infer({"frames": x}), x)
    finally:
        backend.close()


def test_the_auto_rule() -> None:
    assert auto_declines("x86_64", None) is None and auto_declines("AMD64", None) is None
    arm = auto_declines("aarch64", None)
    assert arm is not None and "'aarch64'" in arm and "--backend openvino" in arm
    gpu = auto_declines("x86_64", "CUDAExecutionProvider")
    assert gpu is not None and "CUDAExecutionProvider" in gpu


def test_without_openvino_everything_runs_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` fails as if absent
    status = backend_status()["openvino"]
    assert status.startswith("not available here (OpenVINO is not installed here")
    assert "pip install openvino" in status
    package = load_package("identity")
    with pytest.raises(BackendError, match=r"'openvino' is not available here: OpenVINO is not"):
        open_backend(package, "openvino")
    backend, reason = open_backend(package, "auto", threads=1)
    try:
        assert backend.name == "onnxruntime" and reason.startswith("auto: onnxruntime on CPU")
        assert "OpenVINO not used: OpenVINO is not installed here" in reason
    finally:
        backend.close()


def test_bench_model_speed_shows_both_backends_in_one_table(tmp_path: Path) -> None:
    from bench.cli import app

    out = tmp_path / "speed.json"
    r = CliRunner().invoke(app, ["model-speed", "--engine", "confocal-denoise", "--hw", "16",
                                 "--backend", "onnxruntime", "--backend", "openvino",
                                 "--threads", "1", "--runs", "3", "--json", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "onnxruntime" in r.output and "openvino" in r.output and "p99 ms" in r.output
    import json

    rows = json.loads(out.read_text())["engines"]
    assert [(x["engine"], x["backend"]) for x in rows] == [
        ("confocal-denoise", "onnxruntime"), ("confocal-denoise", "openvino"),
    ]  # fmt: skip
    for x in rows:
        assert x["runs"] == 3 and 0 < x["min_ms"] <= x["p50_ms"] <= x["p99_ms"]
        assert x["max_abs_diff_vs_first"] <= RTOL * x["output_range"]
    assert rows[0]["p50_vs_first"] == 1.0
    bad = CliRunner().invoke(app, ["model-speed", "--engine", "identity", "--backend", "opnevino"])
    assert bad.exit_code != 0 and "'opnevino'" in bad.output and "openvino" in bad.output
