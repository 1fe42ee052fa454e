"""The TensorRT backend: plan selection from recorded metadata (real manifests written with
write_package, recorded machine facts), ``open_backend``'s choice on this machine and on
described ones (a stand-in for the GPU runs the "plan" with ONNX Runtime, so the rebuild path
runs on CPU), and bench's backend listing. Tests that need TensorRT and a GPU are at the end;
they skip with the reason where either is missing.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from typer.testing import CliRunner

import engines.offline.build as build_module
from engines.offline.build import Toolkit, onnxruntime_runner
from engines.package import ZOO_DIR, EnginePackage, Manifest, PlanInfo, Tiling, load_package
from engines.package import write_package as write
from engines.runtime import BackendError, OpenOptions, backend_status, open_backend
from engines.runtime import tensorrt as seam
from engines.runtime.openvino import auto_here
from engines.runtime.openvino import unavailable as openvino_unavailable
from engines.runtime.plans import (
    MachineFacts,
    dump_profiles,
    make_profiles,
    needed_shapes,
    parse_profiles,
    select_plan,
)

H100 = MachineFacts(tensorrt="10.8.0.43", gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0")
A100 = MachineFacts(tensorrt="10.3.0.26", gpu="NVIDIA A100-SXM4-40GB", compute_capability="8.0")
L4 = MachineFacts(tensorrt="10.8.0.43", gpu="NVIDIA L4", compute_capability="8.9")
TRT11 = H100.model_copy(update={"tensorrt": "11.0.0.9"})
NONE = MachineFacts(problem="TensorRT is not installed here (No module named 'tensorrt')")
PREFIX = b"FAKE-PLAN\0"
REBUILD = build_module.rebuild_plan  # what the commands hand the runtime
IDENTITY = (ZOO_DIR / "identity" / "model.onnx").read_bytes()
#: where TensorRT does not run, auto takes the CPU: OpenVINO where its rule holds, else ONNX Runtime
CPU_AUTO = "openvino" if auto_here() is None else "onnxruntime"
OPENVINO = openvino_unavailable(OpenOptions()) is None


def plan(facts: MachineFacts, precision: str, manifest: Manifest, **kw: Any) -> PlanInfo:
    cc = (facts.compute_capability or "").replace(".", "")
    return PlanInfo(
        file=f"plans/{precision}-sm{cc}.plan", tensorrt=facts.tensorrt, gpu=facts.gpu,
        compute_capability=facts.compute_capability, precision=precision,
        profiles=dump_profiles(make_profiles(manifest)),
        onnx="model.onnx" if precision == "fp32" else f"plans/model.{precision}.onnx", **kw,
    )  # fmt: skip


def recorded_package(
    path: Path, *, batch: int = 2, plans: tuple = ((H100, "fp16"), (A100, "fp32"))
) -> EnginePackage:
    """An engine package as ``scopecast build`` leaves it on two machines: an fp16 plan from an
    H100 and an fp32 plan from an A100 (the "plans" are stand-ins: the ONNX behind a prefix)."""
    m = Manifest(name="tiny", task="denoise", architecture="identity",
                 tile=Tiling(size=64, overlap=8, batch=batch))  # fmt: skip
    infos = [plan(f, p, m) for f, p in plans]
    files = {"model.onnx": IDENTITY, "plans/model.fp16.onnx": IDENTITY}
    files.update({i.file: PREFIX + IDENTITY for i in infos})
    return write(path, m.model_copy(update={"plans": infos}), files)


# --- plan selection -----------------------------------------------------------------------------


def test_a_plan_is_used_only_where_every_tag_matches(tmp_path: Path) -> None:
    m = recorded_package(tmp_path / "p").manifest
    shapes = needed_shapes(m)
    use = select_plan(m, H100, shapes=shapes)
    assert use.action == "use" and use.plan == m.plans[0] and use.precision == "fp16"
    assert "plans/fp16-sm90.plan (fp16, TensorRT 10.8.0.43, NVIDIA H100 80GB HBM3" in use.reason
    on_a100 = select_plan(m, A100, shapes=shapes)  # the fp16 plan does not fit, the fp32 one does
    assert on_a100.action == "use" and on_a100.plan == m.plans[1]
    spelled = MachineFacts(
        tensorrt="10.8.0.43", gpu="nvidia  H100 80GB HBM3", compute_capability="sm_90"
    )
    assert select_plan(m, spelled).action == "use"


@pytest.mark.parametrize(
    ("facts", "precision", "source", "words"),
    [
        (L4, None, "plans/model.fp16.onnx",
         [("plans/fp16-sm90.plan was built for GPU 'NVIDIA H100 80GB HBM3' (here 'NVIDIA L4'), "
           "sm 9.0 (here 8.9)"), "plans/fp32-sm80.plan was built for TensorRT 10.3.0.26",
          "rebuilding fp16 from plans/model.fp16.onnx"]),
        (TRT11, None, "plans/model.fp16.onnx", ["TensorRT 10.8.0.43 (here 11.0.0.9)"]),
        (H100, "fp32", "model.onnx", ["rebuilding fp32 from model.onnx", "A100"]),
    ],
)  # fmt: skip
def test_a_mismatched_plan_is_rebuilt_from_its_onnx(
    tmp_path: Path, facts: MachineFacts, precision: str | None, source: str, words: list[str]
) -> None:
    m = recorded_package(tmp_path / "p").manifest
    choice = select_plan(m, facts, precision=precision, shapes=needed_shapes(m))
    assert choice.action == "rebuild" and choice.source == source
    assert choice.profiles == m.plans[0 if precision is None else 1].profiles
    for w in words:
        assert w in choice.reason


def test_fallbacks_say_why_and_what_to_run(tmp_path: Path) -> None:
    package = recorded_package(tmp_path / "p")
    m = package.manifest
    assert select_plan(m, NONE).reason == NONE.problem and select_plan(m, NONE).action == "fallback"
    int8 = select_plan(m, H100, precision="int8")
    assert int8.action == "fallback"
    assert (
        "no int8 TensorRT plan" in int8.reason
        and "scopecast build tiny --precision int8" in int8.reason
    )
    off = select_plan(m, L4, rebuild=False)
    assert off.action == "fallback" and "rebuilding is off" in off.reason
    bare = m.model_copy(update={"plans": []})
    none = select_plan(bare, H100)
    assert none.action == "fallback" and "has no TensorRT plan" in none.reason
    assert "scopecast build tiny --precision fp16" in none.reason
    built = select_plan(bare, H100, build_missing=True)
    assert built.action == "rebuild" and built.source == "model.onnx" and built.precision == "fp32"
    assert select_plan(bare, H100, precision="fp16", build_missing=True).action == "fallback"
    lost = m.model_copy(
        update={"files": {k: v for k, v in m.files.items() if "fp16.onnx" not in k}}
    )
    gone = select_plan(lost, L4)
    assert (
        gone.action == "fallback"
        and "fp16 ONNX it was built from is not in the package" in gone.reason
    )
    with pytest.raises(ValueError, match="unknown precision"):
        select_plan(m, H100, precision="bf16")


def test_profiles_must_cover_the_tiling(tmp_path: Path) -> None:
    m = recorded_package(tmp_path / "p", batch=2).manifest
    bigger = m.model_copy(update={"tile": Tiling(size=64, overlap=8, batch=4)})
    choice = select_plan(bigger, H100, shapes=needed_shapes(bigger))
    assert choice.action == "rebuild"
    assert (
        "matches TensorRT 10.8.0.43 on NVIDIA H100 80GB HBM3 (sm 9.0) but no optimization "
        "profile covers frames 4x1x64x64"
    ) in choice.reason
    assert parse_profiles(choice.profiles)[0]["frames"].max == (4, 1, 64, 64)
    broken = m.model_copy(
        update={"plans": [m.plans[0].model_copy(update={"profiles": [{"x": 1}]})]}
    )
    assert "unreadable" in select_plan(broken, H100, shapes=needed_shapes(m)).reason


# --- open_backend: this machine, and described ones ---------------------------------------------


def test_auto_on_this_machine_says_why_not_tensorrt() -> None:
    if seam.gather_machine_facts().usable:
        pytest.skip("TensorRT and a GPU are present here; see the GPU tests below")
    backend, reason = open_backend(load_package("gaussian"), "auto", threads=1)
    try:
        assert backend.name == CPU_AUTO and reason.startswith(f"auto: {CPU_AUTO} ")
        assert "TensorRT not used:" in reason
        assert "not installed" in reason or "driver" in reason
    finally:
        backend.close()
    with pytest.raises(BackendError, match=r"pip install -e '\.\[gpu\]'|driver"):
        open_backend(load_package("gaussian"), "tensorrt")
    facts = seam.gather_machine_facts()
    assert not facts.usable and facts.problem
    status = backend_status()
    assert status["tensorrt"].startswith("not available here (") and "onnxruntime" in status


class FakeTensorRt:
    """TensorRtBackend's interface around ONNX Runtime, for a plan that is PREFIX + ONNX."""

    name = "tensorrt"
    device = "cuda"
    opened: ClassVar[list[str]] = []

    def __init__(self, package: EnginePackage, plan: PlanInfo | None = None, *,
                 plan_bytes: bytes | None = None, **_: Any) -> None:  # fmt: skip
        data = plan_bytes if plan_bytes is not None else package.read(plan.file if plan else "")
        assert data.startswith(PREFIX)
        self.plan, self._run = plan, onnxruntime_runner(data[len(PREFIX) :], threads=1)
        FakeTensorRt.opened.append(plan.file if plan else "bytes")

    def infer(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self._run(inputs)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "plan": self.plan.file if self.plan else None}

    def close(self) -> None:
        pass


def fake_toolkit(facts: MachineFacts, spoil: Callable | None = None) -> Toolkit:
    def build(onnx_bytes, profiles, precision, *, workspace_mb, timing_cache):
        return PREFIX + onnx_bytes, list(profiles), []

    @contextlib.contextmanager
    def runner(package: EnginePackage, plan_bytes: bytes) -> Iterator[Callable]:
        run = FakeTensorRt(package, plan_bytes=plan_bytes).infer
        yield (lambda x: spoil(run(x))) if spoil else run

    return Toolkit(facts=lambda: facts, build=build, runner=runner)


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[..., None]:
    monkeypatch.setattr(seam, "TensorRtBackend", FakeTensorRt)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    FakeTensorRt.opened = []

    def use(facts: MachineFacts, spoil: Callable | None = None) -> None:
        monkeypatch.setattr(build_module, "tensorrt_toolkit", lambda: fake_toolkit(facts, spoil))

    return use


def test_auto_prefers_a_matching_plan(tmp_path: Path, fake_gpu: Callable) -> None:
    package = recorded_package(tmp_path / "p")
    fake_gpu(H100)
    backend, reason = open_backend(package, "auto", facts=H100)
    assert backend.name == "tensorrt" and FakeTensorRt.opened == ["plans/fp16-sm90.plan"]
    assert reason.startswith("auto: TensorRT fp16 plan on NVIDIA H100 80GB HBM3; plan ")
    x = np.random.default_rng(0).random((2, 1, 64, 64), dtype=np.float32)
    assert np.array_equal(backend.infer({"frames": x}), x)
    _, reason = open_backend(package, "tensorrt", facts=H100, precision="fp32", rebuild=REBUILD)
    assert "rebuilt in" in reason  # fp32 exists only for the A100: rebuilt here


def test_a_plan_from_another_gpu_is_rebuilt_checked_and_saved(
    tmp_path: Path, fake_gpu: Callable
) -> None:
    package = recorded_package(tmp_path / "p")
    fake_gpu(L4)
    backend, reason = open_backend(package, "auto", facts=L4, rebuild=REBUILD)
    assert backend.name == "tensorrt"
    assert reason.startswith("auto: TensorRT fp16 plan on NVIDIA L4, rebuilt in ")
    assert "passed" in reason and "saved as plans/fp16-trt10.8.0.43-sm89-nvidia-l4.plan" in reason
    assert "NVIDIA H100 80GB HBM3" in reason  # and why: the plan it had was for another GPU
    again = load_package(package.path)
    assert [p.gpu for p in again.manifest.plans] == ["NVIDIA L4", "NVIDIA H100 80GB HBM3",
                                                     "NVIDIA A100-SXM4-40GB"]  # fmt: skip
    assert again.manifest.plans[0].numerics["samples"] == 4
    _, reason = open_backend(again, "auto", facts=L4, rebuild=REBUILD)
    assert "rebuilt" not in reason and "matches this machine" in reason


def test_a_rebuilt_plan_that_fails_the_guard_falls_back(tmp_path: Path, fake_gpu: Callable) -> None:
    package = recorded_package(tmp_path / "p")
    fake_gpu(L4, spoil=np.zeros_like)
    backend, reason = open_backend(package, "auto", threads=1, facts=L4, rebuild=REBUILD)
    try:
        assert backend.name == CPU_AUTO
        assert "TensorRT not used: the rebuilt TensorRT fp16 plan rejected" in reason
        assert "constant" in reason and "scopecast build tiny --precision fp32" in reason
    finally:
        backend.close()
    with pytest.raises(BackendError, match="rejected"):
        open_backend(package, "tensorrt", facts=L4, rebuild=REBUILD)
    assert len(load_package(package.path).manifest.plans) == 2  # nothing saved


def test_zoo_packages_are_rebuilt_in_memory_only(tmp_path: Path, fake_gpu: Callable) -> None:
    fake_gpu(H100)
    before = sorted(p.name for p in (ZOO_DIR / "identity").iterdir())
    _, reason = open_backend(load_package("identity"), "tensorrt", facts=H100, rebuild=REBUILD)
    assert "building fp32 from model.onnx" in reason and "not saved (zoo package)" in reason
    assert sorted(p.name for p in (ZOO_DIR / "identity").iterdir()) == before
    _, reason = open_backend(load_package("identity"), "auto", threads=1, facts=H100,
                             rebuild=REBUILD)  # fmt: skip
    assert reason.startswith(f"auto: {CPU_AUTO}") and "has no TensorRT plan" in reason


def test_without_a_rebuilder_a_missing_plan_names_the_build_command(
    tmp_path: Path, fake_gpu: Callable
) -> None:
    """The runtime never imports the offline build code: a caller that hands in no rebuilder
    gets the command that makes the plan; ``auto`` falls back to ONNX Runtime saying so."""
    package = recorded_package(tmp_path / "p")
    fake_gpu(L4)
    with pytest.raises(BackendError) as e:
        open_backend(package, "tensorrt", facts=L4)
    assert "no TensorRT plan for this GPU in the package" in str(e.value)
    assert "`scopecast build tiny --precision fp16` makes one" in str(e.value)
    assert "NVIDIA H100 80GB HBM3" in str(e.value)  # and why the plan it has does not fit
    backend, reason = open_backend(package, "auto", threads=1, facts=L4)
    try:
        assert backend.name == CPU_AUTO and FakeTensorRt.opened == []
        assert "TensorRT not used: no TensorRT plan for this GPU in the package" in reason
    finally:
        backend.close()
    assert len(load_package(package.path).manifest.plans) == 2  # nothing built, nothing saved
    _, reason = open_backend(package, "auto", facts=H100)  # a matching plan needs no rebuilder
    assert reason.startswith("auto: TensorRT fp16 plan on NVIDIA H100 80GB HBM3; plan ")


def test_bench_lists_the_tensorrt_backend(tmp_path: Path) -> None:
    from bench.cli import app
    from bench.report import backends, default_backends

    listed = backends()
    assert set(listed) == {"onnxruntime", "tensorrt", "openvino", "triton"}
    here = seam.gather_machine_facts().usable
    runs = [*(["tensorrt"] if here else []), *(["openvino"] if OPENVINO else []), "onnxruntime"]
    assert default_backends() == (runs if len(runs) > 1 else ["auto"])
    r = CliRunner().invoke(app, ["throughput", "--engine", "identity", "--size", "32",
                                 "--seconds", "0.05", "--out", str(tmp_path)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "tensorrt: " in r.output and ("not available here" in r.output) != here
    result = __import__("json").loads((tmp_path / "throughput.json").read_text())
    assert result["backends"] == listed


# --- on an NVIDIA GPU with TensorRT ---------------------------------------------------------------


@pytest.fixture
def gpu() -> MachineFacts:
    pytest.importorskip(
        "tensorrt", reason="TensorRT is not installed (pip install -e '.[gpu]' on a GPU machine)"
    )
    pytest.importorskip("pycuda", reason="pycuda is not installed (pip install -e '.[gpu]')")
    facts = seam.gather_machine_facts()
    if not facts.usable:
        pytest.skip(f"TensorRT cannot run here: {facts.problem}")
    return facts


def test_gpu_build_run_and_pipeline(gpu: MachineFacts, tmp_path: Path) -> None:
    pytest.importorskip("onnx", reason="fp16 conversion needs onnx (extra dev)")
    shutil.copytree(ZOO_DIR / "gaussian", tmp_path / "g")
    reference = onnxruntime_runner(load_package(tmp_path / "g").read("model.onnx"))
    for precision in ("fp32", "fp16"):
        result = build_module.build_plan(tmp_path / "g", precision, timing_cache=tmp_path / "t.c",
                                         batches=[1, 2])  # fmt: skip
        assert result.plan_report.passed and (tmp_path / "t.c").stat().st_size > 0
    package = load_package(tmp_path / "g")
    assert [p.precision for p in package.manifest.plans] == ["fp16", "fp32"]
    rng = np.random.default_rng(0)
    batches = [{"frames": rng.random((n, 1, 512, 512), dtype=np.float32)} for n in (1, 2, 1, 2, 1)]
    with seam.TensorRtBackend(package, package.manifest.plans[1]) as fp32:
        tickets = [fp32.submit(b) for b in batches]  # more than the two slots: kept in order
        for t, b in reversed(list(zip(tickets, batches, strict=True))):
            np.testing.assert_allclose(fp32.result(t), reference(b), atol=2e-3)
        with pytest.raises(BackendError, match="no pending result"):
            fp32.result(tickets[0])
        info = fp32.describe()
        assert info["gpu"] == gpu.gpu and info["buffers"] == 2 and len(info["profiles"]) == 2
        with pytest.raises(BackendError, match="outside every optimization profile"):
            fp32.infer({"frames": np.zeros((3, 1, 512, 512), np.float32)})
    with seam.TensorRtBackend(package, package.manifest.plans[1], cuda_graph=True) as graphed:
        for b in batches * 2:
            np.testing.assert_allclose(graphed.infer(b), reference(b), atol=2e-3)
        assert graphed.describe()["cuda_graph"] or graphed.describe()["cuda_graph_problem"]
    backend, reason = open_backend(package, "auto")
    try:
        assert backend.name == "tensorrt" and gpu.gpu in reason
    finally:
        backend.close()


def test_gpu_shares_the_primary_context_with_torch(gpu: MachineFacts, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed (extra train)")
    if not torch.cuda.is_available():
        pytest.skip("this torch build has no CUDA")
    shutil.copytree(ZOO_DIR / "identity", tmp_path / "i")
    before = torch.ones(4, device="cuda")
    backend, _ = open_backend(load_package(tmp_path / "i"), "tensorrt", rebuild=REBUILD)
    try:
        x = np.arange(64, dtype=np.float32).reshape(1, 1, 8, 8)
        assert np.array_equal(backend.infer({"frames": x}), x)
        assert float((before * 2).sum()) == 8.0  # torch's tensors survive in the same context
        assert "shared with torch" in backend.describe()["context"]
    finally:
        backend.close()
