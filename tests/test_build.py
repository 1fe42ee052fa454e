"""``scopecast build`` on CPU: the fp16 and int8 ONNX conversions (run in ONNX Runtime), the
numerics guard against real and deliberately broken runners, calibration frames, optimization
profiles, and the whole build -> check -> package flow through a stand-in for the GPU seam
(the "plan" is the precision's ONNX run by ONNX Runtime). TensorRT itself: tests/test_tensorrt.py.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from engines.cli import build as build_command
from engines.offline.build import (
    BuildError,
    BuildRejected,
    Toolkit,
    add_plan,
    batched,
    build_plan,
    calibration_inputs,
    guard_side,
    load_frames,
    onnxruntime_runner,
    plan_file_name,
    quantize_int8,
    synthetic_frames,
    to_fp16,
)
from engines.package import (
    MANIFEST,
    EnginePackage,
    Manifest,
    Normalization,
    PlanInfo,
    Temporal,
    Tiling,
    load_package,
    verify_package,
    write_package,
)
from engines.runtime.guard import (
    DEFAULT_TOLERANCE,
    Tolerance,
    check_outputs,
    compare_runners,
)
from engines.runtime.plans import (
    MachineFacts,
    ShapeRange,
    fit_fixed_dims,
    make_profiles,
    parse_profiles,
    profile_for,
    select_plan,
)

onnx = pytest.importorskip("onnx", reason="the fp16/int8 conversions need onnx (extra dev)")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402 - only once onnx is known there

H100 = MachineFacts(tensorrt="10.8.0.43", gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0")
PREFIX = b"FAKE-PLAN\0"


def tiny_convnet(seed: int = 0) -> bytes:
    """frames (N, 1, H, W) -> Conv 3x3 (4) -> LeakyRelu -> Conv 3x3 (1) + skip, dynamic N/H/W."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.normal(0, 0.4, (4, 1, 3, 3)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (1, 4, 3, 3)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(np.zeros(1, np.float32), "b2")
    nodes = [
        helper.make_node("Conv", ["frames", "w1", "b1"], ["h1"], pads=[1, 1, 1, 1]),
        helper.make_node("LeakyRelu", ["h1"], ["a1"], alpha=0.2),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["h2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["frames", "h2"], ["enhanced"]),
    ]
    x = helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["N", 1, "H", "W"])
    y = helper.make_tensor_value_info("enhanced", TensorProto.FLOAT, ["N", 1, "H", "W"])
    graph = helper.make_graph(nodes, "tiny", [x], [y], initializer=[w1, b1, w2, b2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def tiny_package(path: Path, **manifest: object) -> EnginePackage:
    m = Manifest(
        name="tiny", task="denoise", architecture="tiny-conv",
        tile=Tiling(size=64, overlap=8, batch=2),
        normalization=Normalization(offset=100.0, scale=1000.0), **manifest,  # type: ignore
    )  # fmt: skip
    return write_package(path, m, {"model.onnx": tiny_convnet()})


def samples_for(package: EnginePackage, count: int = 6) -> list[dict[str, np.ndarray]]:
    m = package.manifest
    return calibration_inputs(m, synthetic_frames(m, count=count, side=96), side=guard_side(m))


def fake_toolkit(
    facts: MachineFacts = H100, broken: Callable[[np.ndarray], np.ndarray] | None = None
) -> tuple[Toolkit, list[dict]]:
    """The GPU seam on CPU: a "plan" is PREFIX + the ONNX it came from, run by ONNX Runtime;
    ``broken`` spoils its outputs (what a bad fp16 plan does)."""
    calls: list[dict] = []

    def build(onnx_bytes, profiles, precision, *, workspace_mb, timing_cache):
        calls.append({"precision": precision, "profiles": profiles, "workspace_mb": workspace_mb,
                      "timing_cache": timing_cache})  # fmt: skip
        if timing_cache is not None:
            Path(timing_cache).parent.mkdir(parents=True, exist_ok=True)
            with open(timing_cache, "ab") as f:
                f.write(b"tactics;")
        return PREFIX + onnx_bytes, list(profiles), ["fake build"]

    @contextlib.contextmanager
    def runner(package: EnginePackage, plan: bytes) -> Iterator[Callable]:
        assert plan.startswith(PREFIX)
        run = onnxruntime_runner(plan[len(PREFIX) :], threads=1)
        yield (lambda x: broken(run(x))) if broken else run

    return Toolkit(facts=lambda: facts, build=build, runner=runner), calls


# --- precision: the ONNX a plan is built from ---------------------------------------------------


def graph_types(model_bytes: bytes) -> tuple[list[int], list[int], dict[str, int]]:
    m = onnx.load_from_string(model_bytes)
    io = [v.type.tensor_type.elem_type for v in [*m.graph.input, *m.graph.output]]
    return io, [n.op_type for n in m.graph.node], {i.name: i.data_type for i in m.graph.initializer}


def test_fp16_keeps_float32_io_and_really_rounds(tmp_path: Path) -> None:
    package = tiny_package(tmp_path / "tiny")
    model = package.read("model.onnx")
    half = to_fp16(model)
    io, ops, inits = graph_types(half)
    assert io == [TensorProto.FLOAT, TensorProto.FLOAT]  # the backend interface is unchanged
    assert ops[0] == "Cast" and ops[-1] == "Cast"  # in and out through Casts, in graph order
    assert inits["w1"] == inits["w2"] == TensorProto.FLOAT16
    onnx.checker.check_model(onnx.load_from_string(half), full_check=True)
    report = compare_runners(
        onnxruntime_runner(model, 1), onnxruntime_runner(half, 1), samples_for(package),
        precision="fp16", candidate_label="ONNX fp16",
    )  # fmt: skip
    assert report.passed, report.summary()
    assert 0 < report.max_error < DEFAULT_TOLERANCE["fp16"].max_error  # rounded, within limits
    assert report.psnr_db > 45


@pytest.mark.parametrize("name", ["identity", "gaussian", "bicubic-x2"])
def test_fp16_conversion_of_the_zoo_runs(name: str) -> None:
    package = load_package(name)
    m = package.manifest
    half = to_fp16(package.read(m.model))
    samples = calibration_inputs(m, synthetic_frames(m, count=2, side=64), side=64)
    report = compare_runners(
        onnxruntime_runner(package.read(m.model), 1), onnxruntime_runner(half, 1), samples,
        precision="fp16",
    )  # fmt: skip
    assert report.passed, report.summary()


def test_int8_is_explicit_symmetric_qdq(tmp_path: Path) -> None:
    package = tiny_package(tmp_path / "tiny")
    model = package.read("model.onnx")
    samples = samples_for(package, count=8)
    q = onnx.load_from_string(quantize_int8(model, samples))
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("QuantizeLinear") >= 2 and ops.count("DequantizeLinear") >= 4
    assert ops.count("Conv") == 2
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    zero_points = [
        inits[n.input[2]] for n in q.graph.node
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2
    ]  # fmt: skip
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    assert not [a for a in inits.values() if a.dtype == np.int32]  # float bias, as TensorRT wants
    per_channel = [n for n in q.graph.node if n.op_type == "DequantizeLinear"
                   and any(a.name == "axis" for a in n.attribute)]  # fmt: skip
    assert per_channel  # weights quantized per output channel
    report = compare_runners(
        onnxruntime_runner(model, 1), onnxruntime_runner(q.SerializeToString(), 1), samples,
        precision="int8",
    )  # fmt: skip
    assert report.passed, report.summary()
    assert report.max_error > 1e-4  # it really is quantized


def test_int8_needs_layers_and_frames(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="no Conv/ConvTranspose/MatMul/Gemm layer"):
        quantize_int8(
            load_package("identity").read("model.onnx"),
            [{"frames": np.zeros((1, 1, 8, 8), np.float32)}],
        )
    with pytest.raises(BuildError, match="--calibration"):
        quantize_int8(tiny_convnet(), [])


# --- the numerics guard -------------------------------------------------------------------------


def test_guard_rejects_broken_outputs(tmp_path: Path) -> None:
    package = load_package("gaussian")
    reference = onnxruntime_runner(package.read("model.onnx"), 1)
    samples = samples_for(package, count=3)
    rng = np.random.default_rng(0)
    broken = {
        "nonfinite": lambda y: np.where(y > np.median(y), np.nan, y),
        "inf": lambda y: np.full_like(y, np.inf),
        "black": np.zeros_like,
        "flat": lambda y: np.full_like(y, 0.5),
        "noisy": lambda y: y + rng.normal(0, 0.05, y.shape).astype(np.float32),
        "shifted": lambda y: y + 0.1,
        "shape": lambda y: y[..., :-1],
        "raises": lambda y: (_ for _ in ()).throw(RuntimeError("CUDA error 700")),
    }
    expected = {
        "nonfinite": {"nonfinite"}, "inf": {"nonfinite", "constant"}, "black": {"constant"},
        "flat": {"constant"}, "noisy": {"psnr", "max_error", "mean_error"},
        "shifted": {"psnr", "max_error", "mean_error"}, "shape": {"shape"}, "raises": {"error"},
    }  # fmt: skip
    for name, spoil in broken.items():
        report = compare_runners(
            reference, lambda x, spoil=spoil: spoil(reference(x)), samples, precision="fp16",
            candidate_label=f"{name} plan",
        )  # fmt: skip
        assert not report.passed, name
        assert expected[name] <= set(report.failed), (name, report.failed)
        assert report.details and f"{name} plan" in report.summary()
    ok = compare_runners(reference, reference, samples, precision="fp32")
    assert ok.passed and ok.max_error == 0 and ok.psnr_db == 200.0


def test_guard_tolerances_depend_on_precision() -> None:
    ref = [np.linspace(0, 1, 4096, dtype=np.float32).reshape(1, 1, 64, 64)]
    noisy = [ref[0] + np.random.default_rng(1).normal(0, 2e-3, ref[0].shape).astype(np.float32)]
    assert not check_outputs(ref, noisy, precision="fp32").passed
    assert check_outputs(ref, noisy, precision="fp16").passed
    assert check_outputs(ref, noisy, precision="int8").passed
    strict = Tolerance(max_error=1e-3, mean_error=1e-4, min_psnr_db=80)
    assert check_outputs(ref, noisy, precision="int8", tolerance=strict).failed
    flat_in = [np.full((1, 1, 8, 8), 3.0, np.float32)]  # a constant reference is no failure
    assert check_outputs(flat_in, flat_in, precision="fp16").passed
    with pytest.raises(ValueError, match="unknown precision"):
        check_outputs(ref, ref, precision="fp8")


def test_rejection_offers_fp32_with_the_exact_command() -> None:
    ref = [np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 1, 8, 8)]
    report = check_outputs(ref, [np.zeros_like(ref[0])], precision="fp16",
                           candidate="TensorRT fp16 plan")  # fmt: skip
    message = str(BuildRejected(report, "gaussian", "the TensorRT fp16 plan"))
    assert "rejected" in message and "constant" in message and "PSNR" in message
    assert "scopecast build gaussian --precision fp32" in message


# --- calibration frames and profiles ------------------------------------------------------------


def test_load_frames_formats(tmp_path: Path) -> None:
    import tifffile

    stack = np.random.default_rng(0).integers(0, 4000, (3, 40, 50), dtype=np.uint16)
    np.save(tmp_path / "f.npy", stack)
    np.savez(tmp_path / "f.npz", frames=stack)
    tifffile.imwrite(tmp_path / "f.tif", stack, photometric="minisblack")
    (tmp_path / "dir").mkdir()
    for i, frame in enumerate(stack):
        tifffile.imwrite(tmp_path / "dir" / f"{i}.tiff", frame)
    for name in ("f.npy", "f.npz", "f.tif", "dir"):
        frames = load_frames(tmp_path / name)
        assert frames.dtype == np.float32 and np.array_equal(frames, stack), name
    np.save(tmp_path / "one.npy", stack[0])
    assert load_frames(tmp_path / "one.npy").shape == (1, 40, 50)
    (tmp_path / "f.png").write_bytes(b"x")
    for bad, words in (("f.png", "unknown format"), ("missing.npy", "not found"),
                       ("empty", "no .tif")):  # fmt: skip
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(BuildError, match=words):
            load_frames(tmp_path / bad)


def test_calibration_inputs_follow_the_io_convention() -> None:
    m = Manifest(
        name="t", task="super-resolution", architecture="tgan", scale=2,
        temporal=Temporal(window=2, previous_output=True, background=True),
        tile=Tiling(size=32, overlap=8, batch=3), normalization=Normalization(offset=100, scale=50),
    )  # fmt: skip
    frames = 100 + 50 * np.random.default_rng(0).random((5, 48, 40)).astype(np.float32)
    items = calibration_inputs(m, frames, side=32)
    assert len(items) == 5
    for item in items:
        assert item["frames"].shape == (1, 2, 32, 32)
        assert item["previous"].shape == (1, 1, 64, 64)
        assert item["background"].shape == (1, 1, 32, 32)
        assert item["frames"].min() >= 0 and item["frames"].max() <= 1  # normalized
    assert np.array_equal(items[0]["frames"][0, 0], items[0]["frames"][0, 1])  # window padded
    assert [b["frames"].shape[0] for b in batched(items, 3)] == [3, 2]
    small = calibration_inputs(m, frames[:, :20, :20], side=32)  # padded up to the tile
    assert small[0]["frames"].shape == (1, 2, 32, 32)


def test_profiles_cover_the_tiles_and_batches() -> None:
    m = Manifest(
        name="t", task="denoise", architecture="a", tile=Tiling(size=256, overlap=16, batch=4)
    )
    (p,) = make_profiles(m)
    assert p["frames"] == ShapeRange(
        min=(1, 1, 256, 256), opt=(4, 1, 256, 256), max=(4, 1, 256, 256)
    )
    profiles = make_profiles(m, batches=[8, 1], tiles=[128, 256])
    assert len(profiles) == 4
    assert profile_for(profiles, {"frames": (1, 1, 128, 128)}) == 0  # the smallest that covers
    assert profile_for(profiles, {"frames": (5, 1, 256, 256)}) == 3
    assert profile_for(profiles, {"frames": (1, 1, 512, 512)}) is None
    sr = Manifest(
        name="s", task="super-resolution", architecture="a", scale=4,
        temporal=Temporal(previous_output=True), tile=Tiling(size=None, multiple=8),
    )  # fmt: skip
    (whole,) = make_profiles(sr, max_side=1000)
    assert whole["frames"].min == (1, 1, 16, 16) and whole["frames"].max == (1, 1, 1000, 1000)
    assert whole["previous"].max == (1, 1, 4000, 4000)
    assert parse_profiles([{"frames": whole["frames"].model_dump()}]) == [
        {"frames": whole["frames"]}
    ]
    assert parse_profiles([{"frames": {"min": "x"}}]) is None
    with pytest.raises(ValueError, match="multiple of 8"):
        make_profiles(sr, tiles=[100])
    fixed = fit_fixed_dims(p, {"frames": [-1, 1, -1, -1]})
    assert fixed == p
    pinned = fit_fixed_dims(p, {"frames": [2, 1, -1, -1]})
    assert pinned["frames"].min[0] == pinned["frames"].max[0] == 2
    with pytest.raises(ValueError, match="fixed size 512 on axis 2"):
        fit_fixed_dims(p, {"frames": [-1, 1, 512, 512]})
    with pytest.raises(ValueError, match="no input 'frames'"):
        fit_fixed_dims(p, {"input": [-1, 1, -1, -1]})


# --- build -> check -> package, through a stand-in for the GPU ----------------------------------


def test_build_packages_a_checked_tagged_plan(tmp_path: Path) -> None:
    package = tiny_package(tmp_path / "tiny")
    toolkit, calls = fake_toolkit()
    cache = tmp_path / "cache" / "timing.cache"
    lines: list[str] = []
    result = build_plan(package.path, "fp16", toolkit=toolkit, timing_cache=cache,
                        batches=[1, 4], progress=lines.append)  # fmt: skip
    plan = result.plan
    assert plan.file == "plans/fp16-trt10.8.0.43-sm90-nvidia-h100-80gb-hbm3.plan"
    assert (plan.tensorrt, plan.gpu, plan.compute_capability, plan.precision) == (
        "10.8.0.43", "NVIDIA H100 80GB HBM3", "9.0", "fp16")  # fmt: skip
    assert plan.onnx == "plans/model.fp16.onnx" and plan.build_seconds is not None
    assert plan.numerics["psnr_db"] > 45 and plan.numerics["samples"] > 0
    assert [p["frames"]["max"] for p in plan.profiles] == [[1, 1, 64, 64], [4, 1, 64, 64]]
    assert calls[0]["timing_cache"] == cache and cache.read_bytes() == b"tactics;"
    assert result.onnx_report is not None and result.onnx_report.passed
    assert any("ONNX fp16" in line for line in lines) and any("plan" in line for line in lines)
    loaded = load_package(package.path)  # hashes of the plan and its ONNX are checked
    assert verify_package(package.path) == []
    assert loaded.manifest.plans == [plan]
    assert set(loaded.manifest.files) == {"model.onnx", plan.file, "plans/model.fp16.onnx"}
    assert loaded.read(plan.file).startswith(PREFIX)
    # the plan runs where it was built, is rebuilt from its fp16 ONNX elsewhere
    assert select_plan(loaded.manifest, H100).action == "use"
    l4 = MachineFacts(tensorrt="10.8.0.43", gpu="NVIDIA L4", compute_capability="8.9")
    again = select_plan(loaded.manifest, l4)
    assert again.action == "rebuild" and again.source == "plans/model.fp16.onnx"
    # a second build (fp32 this time) comes first and keeps the first one
    build_plan(package.path, "fp32", toolkit=toolkit, timing_cache=cache)
    both = load_package(package.path).manifest
    assert [p.precision for p in both.plans] == ["fp32", "fp16"]
    assert both.plans[0].onnx == "model.onnx" and cache.read_bytes() == b"tactics;tactics;"
    assert select_plan(both, H100, precision="fp16").plan == plan


def test_int8_build_with_rig_frames_goes_to_out(tmp_path: Path) -> None:
    package = tiny_package(tmp_path / "tiny")
    before = (package.path / MANIFEST).read_bytes()
    frames = 100 + 1000 * synthetic_frames(package.manifest, count=6, side=80) / 1100
    np.save(tmp_path / "rig.npy", frames.astype(np.uint16))
    toolkit, calls = fake_toolkit()
    result = build_plan(package.path, "int8", calibration=tmp_path / "rig.npy", toolkit=toolkit,
                        timing_cache=tmp_path / "t.cache", out=tmp_path / "copy")  # fmt: skip
    assert (package.path / MANIFEST).read_bytes() == before  # the source package is untouched
    assert result.package.path == tmp_path / "copy" and result.plan.precision == "int8"
    int8 = onnx.load_from_string(result.package.read("plans/model.int8.onnx"))
    assert "QuantizeLinear" in [n.op_type for n in int8.graph.node]
    assert calls[0]["precision"] == "int8"


def test_a_plan_that_fails_the_guard_is_not_packaged(tmp_path: Path) -> None:
    package = tiny_package(tmp_path / "tiny")
    before = sorted(p.name for p in package.path.rglob("*"))
    for spoil, check in ((np.zeros_like, "constant"),
                         (lambda y: np.where(y > 0.5, np.inf, y), "nonfinite")):  # fmt: skip
        toolkit, _ = fake_toolkit(broken=spoil)
        with pytest.raises(BuildRejected) as e:
            build_plan(package.path, "fp16", toolkit=toolkit, timing_cache=tmp_path / "t.cache")
        assert check in e.value.report.failed
        assert "scopecast build tiny --precision fp32" in str(e.value)
    assert sorted(p.name for p in package.path.rglob("*")) == before


def test_build_errors_say_what_to_do(tmp_path: Path) -> None:
    toolkit, _ = fake_toolkit()
    with pytest.raises(BuildError, match=r"shipped zoo package.*--out"):
        build_plan("gaussian", "fp16", toolkit=toolkit)
    with pytest.raises(BuildError, match="unknown precision"):
        build_plan("gaussian", "fp8", toolkit=toolkit, out=tmp_path / "g")
    with pytest.raises(BuildError, match="int8 needs --calibration"):
        build_plan("gaussian", "int8", toolkit=toolkit, out=tmp_path / "g")
    gone, _ = fake_toolkit(MachineFacts(problem="TensorRT is not installed here"))
    with pytest.raises(BuildError, match=r"fp16 ONNX passed its numerics check.*not installed"):
        build_plan("gaussian", "fp16", toolkit=gone, out=tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_add_plan_replaces_the_same_file_and_old_manifests_load(tmp_path: Path) -> None:
    package = tiny_package(tmp_path / "tiny")
    old = {"file": "plans/a.plan", "tensorrt": "8.6.1", "gpu": "Tesla T4",
           "compute_capability": "7.5", "precision": "fp16", "profiles": []}  # fmt: skip
    raw = json.loads((package.path / MANIFEST).read_text())
    raw["plans"] = [old]  # a manifest from before onnx/build_seconds/numerics existed
    raw["files"]["plans/a.plan"] = __import__("hashlib").sha256(b"old").hexdigest()
    (package.path / "plans").mkdir()
    (package.path / "plans" / "a.plan").write_bytes(b"old")
    (package.path / MANIFEST).write_text(json.dumps(raw))
    loaded = load_package(package.path)
    assert loaded.manifest.plans[0].onnx is None and loaded.manifest.plans[0].numerics == {}
    t4 = MachineFacts(tensorrt="10.8.0.43", gpu="Tesla T4", compute_capability="7.5")
    choice = select_plan(loaded.manifest, t4)
    assert choice.action == "fallback" and "fp16 ONNX it was built from is not in the package" in (
        choice.reason)  # fmt: skip
    new = PlanInfo(**{**old, "tensorrt": "10.8.0.43"}, onnx=None)
    updated = add_plan(loaded, new, b"new")
    assert [p.tensorrt for p in updated.manifest.plans] == ["10.8.0.43"]
    assert load_package(package.path).read("plans/a.plan") == b"new"


def test_plan_file_names_are_safe() -> None:
    odd = MachineFacts(tensorrt="11.0.0.1", gpu="NVIDIA GeForce RTX 4090 / (laptop)",
                       compute_capability="8.9")  # fmt: skip
    name = plan_file_name("int8", odd)
    assert name == "plans/int8-trt11.0.0.1-sm89-nvidia-geforce-rtx-4090-laptop.plan"
    PlanInfo(file=name, tensorrt="11", gpu="g", compute_capability="8.9", precision="int8")


# --- command line -------------------------------------------------------------------------------


def cli() -> typer.Typer:
    """``build`` behind the `scopecast` root's handling of a user's mistake (one line, exit 2)."""
    from stream.console import ScopecastGroup

    app = typer.Typer(cls=ScopecastGroup)
    app.command()(build_command)
    app.command("noop")(lambda: None)  # two commands: typer keeps "build" as a subcommand
    return app


def test_cli_build_here_checks_the_onnx_then_says_tensorrt_is_missing(tmp_path: Path) -> None:
    pytest.importorskip("engines.runtime.tensorrt")
    from engines.runtime.tensorrt import gather_machine_facts

    if gather_machine_facts().usable:
        pytest.skip("TensorRT and a GPU are present: tests/test_tensorrt.py builds for real")
    runner = CliRunner()
    r = runner.invoke(
        cli(), ["build", "gaussian", "--precision", "fp16", "--out", str(tmp_path / "g")]
    )
    assert r.exit_code == 2, r.output
    assert "ONNX fp16 (onnxruntime CPU) vs onnxruntime fp32" in r.output and "passed" in r.output
    assert "TensorRT is not installed here" in r.output and "pip install -e '.[gpu]'" in r.output
    strict = ["--max-error", "1e-6", "--out", str(tmp_path / "g")]
    r = runner.invoke(cli(), ["build", "gaussian", "--precision", "fp16", *strict])
    assert r.exit_code == 1 and "the fp16 ONNX rejected" in r.output and "max_error" in r.output
    assert "scopecast build gaussian --precision fp32" in r.output
    assert not (tmp_path / "g").exists()
    r = runner.invoke(cli(), ["build", "gaussian", "--precision", "int8"])
    assert r.exit_code == 2 and "--calibration" in r.output
    r = runner.invoke(cli(), ["build", "gaussian", "--precision", "fp64"])
    assert r.exit_code == 2 and "choose one of fp32, fp16, int8" in r.output
    r = runner.invoke(cli(), ["build", "no-such-engine"])
    assert r.exit_code == 2 and "not found" in r.output


def test_scopecast_build_is_a_top_level_command() -> None:
    code = "from stream.cli import main; main()"
    r = subprocess.run([sys.executable, "-c", code, "build", "--help"],
                       capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    for option in ("--precision", "--calibration", "--workspace-mb", "--timing-cache", "--batch"):
        assert option in r.stdout
