"""Triton Inference Server: the model repository export, and the ``triton`` backend against a
real ``tritonserver`` process on loopback.

The server is the one the ``nvidia-pytriton`` wheel ships (Triton 2.51 with the Python backend
only; its numpy<2 pin keeps it out of the project's venv). The tests look for a virtual
environment holding ``nvidia-pytriton`` and ``onnxruntime`` at ``$SCOPECAST_TRITON_VENV``, else
``.triton-venv`` in the repository, and skip with the reason when there is none or the server
does not start. That build has no ONNX Runtime backend, so the engines are exported with
``--runtime python`` (the ONNX run by onnxruntime inside Triton); the repository's
onnxruntime_onnx configs are checked by parsing them with Triton's protobuf definitions.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc", reason="tritonclient (the triton extra) is not installed")
onnx = pytest.importorskip("onnx", reason="onnx (dev extra) reads the models being exported")

from google.protobuf import text_format  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from bench.triton_server import TritonServer, TritonUnavailable  # noqa: E402
from calibration.errors import InvalidInput  # noqa: E402
from engines.engine import EngineChain  # noqa: E402
from engines.offline.triton_repo import (  # noqa: E402
    ExportOptions,
    export_repository,
    validate_config,
)
from engines.package import Manifest, PackageError, PlanInfo, load_package, write_package  # noqa: E402
from engines.runtime import BackendError, open_backend  # noqa: E402
from engines.runtime.triton import URL_ENV, parse_url  # noqa: E402
from stream.acquire import free_endpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LD = "LD_LIBRARY_PATH"


def _config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the export (no server needed) -------------------------------------------------------------


def test_export_writes_a_repository_triton_can_parse(tmp_path):
    repo = tmp_path / "repo"
    models = export_repository(["identity", "confocal-denoise-sr2x"], repo)
    assert [m.name for m in models] == ["identity", "confocal-denoise-sr2x"]
    for name in ("identity", "confocal-denoise-sr2x"):
        package = load_package(name)
        folder = repo / name
        assert (folder / "1" / "model.onnx").read_bytes() == package.read("model.onnx")
        assert (folder / "manifest.json").read_bytes() == (
            package.path / "manifest.json"
        ).read_bytes()
        config = validate_config(folder / "config.pbtxt")
        assert config == _config(folder / "config.pbtxt")
        assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 8
        assert config.dynamic_batching.max_queue_delay_microseconds == 500
        [group] = config.instance_group
        assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU and group.count == 1
        assert (
            config.parameters["scopecast.onnx_sha256"].string_value
            == (package.manifest.files["model.onnx"])
        )
        assert [t.name for t in config.input] == package.manifest.input_names
        assert all(t.data_type == model_config_pb2.TYPE_FP32 for t in config.input)
    sr = _config(repo / "confocal-denoise-sr2x" / "config.pbtxt")
    assert {t.name: list(t.dims) for t in sr.input} == {
        "frames": [2, -1, -1], "previous": [1, -1, -1], "background": [1, -1, -1],
    }  # fmt: skip
    assert [(t.name, list(t.dims)) for t in sr.output] == [("enhanced", [1, -1, -1])]
    assert not list(repo.glob(".*")), "no staging folder is left behind"


def _package(path: Path, name: str, batch: int | None, plans: list[PlanInfo] = ()) -> Path:
    """A one-node package whose ONNX has batch dimension ``batch`` (None: free)."""
    dim = "N" if batch is None else batch
    graph = helper.make_graph(
        [helper.make_node("Identity", ["frames"], ["enhanced"])], name,
        [helper.make_tensor_value_info("frames", TensorProto.FLOAT, [dim, 1, 64, "W"])],
        [helper.make_tensor_value_info("enhanced", TensorProto.FLOAT, [dim, 1, 64, "W"])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    manifest = Manifest(name=name, task="identity", architecture="test", plans=list(plans))
    files = {"model.onnx": model.SerializeToString()}
    files.update({p.file: f"plan for sm {p.compute_capability}".encode() for p in plans})
    write_package(path, manifest, files)
    return path


def test_a_fixed_batch_dimension_is_served_without_batching(tmp_path):
    pkg = _package(tmp_path / "fixed", "fixed", batch=1)
    [model] = export_repository([str(pkg)], tmp_path / "repo", ExportOptions(device="cpu"))
    config = validate_config(model.path / "config.pbtxt")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [1, 1, 64, -1]
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU


def test_tensorrt_plans_become_a_model_with_one_plan_per_gpu_kind(tmp_path):
    profile = {"frames": {"min": [1, 1, 64, 64], "opt": [2, 1, 64, 256], "max": [4, 1, 64, 512]}}
    plans = [
        PlanInfo(file="a.plan", tensorrt="10.3.0", gpu="NVIDIA L4", compute_capability="8.9",
                 precision="fp32", profiles=[profile]),
        PlanInfo(file="b.plan", tensorrt="10.3.0", gpu="NVIDIA H100", compute_capability="9.0",
                 precision="fp32", profiles=[profile]),
    ]  # fmt: skip
    pkg = _package(tmp_path / "planned", "planned", batch=None, plans=plans)
    models = export_repository([str(pkg)], tmp_path / "repo", ExportOptions(gpus=(0, 1)))
    assert [m.name for m in models] == ["planned", "planned-tensorrt"]
    trt = models[1]
    config = validate_config(trt.path / "config.pbtxt")
    assert config.platform == "tensorrt_plan"
    assert dict(config.cc_model_filenames) == {"8.9": "model.sm89.plan", "9.0": "model.sm90.plan"}
    assert (trt.path / "1" / "model.sm90.plan").read_bytes() == b"plan for sm 9.0"
    assert config.max_batch_size == 4  # what the plans' profiles take, not --max-batch 8
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert list(config.instance_group[0].gpus) == [0, 1]
    assert config.parameters["scopecast.tensorrt"].string_value == "10.3.0"


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (ExportOptions(queue_delay_us=-5), "--queue-delay-us -5"),
        (ExportOptions(queue_delay_us=10**6), "--queue-delay-us 1000000"),
        (ExportOptions(device="tpu"), "--device 'tpu'"),
        (ExportOptions(runtime="tf"), "--runtime 'tf'"),
        (ExportOptions(instances=0), "--instances 0"),
        (ExportOptions(max_batch=-1), "--max-batch -1"),
        (ExportOptions(device="cpu", gpus=(0,)), "needs --device gpu"),
    ],
)
def test_bad_export_options_name_the_value(tmp_path, options, words):
    with pytest.raises(InvalidInput, match=words.replace("(", r"\(")):
        export_repository(["identity"], tmp_path / "repo", options)


def test_a_folder_not_written_by_the_export_is_not_replaced(tmp_path):
    (tmp_path / "repo" / "identity").mkdir(parents=True)
    (tmp_path / "repo" / "identity" / "config.pbtxt").write_text("precious")
    with pytest.raises(InvalidInput, match="not a scopecast export"):
        export_repository(["identity"], tmp_path / "repo")
    assert (tmp_path / "repo" / "identity" / "config.pbtxt").read_text() == "precious"
    export_repository(["identity"], tmp_path / "again")
    export_repository(["identity"], tmp_path / "again")  # its own earlier export: replaced


def test_a_config_that_does_not_parse_is_named(tmp_path):
    bad = tmp_path / "m" / "config.pbtxt"
    bad.parent.mkdir()
    bad.write_text('name: "m"\nmax_batch_size: "eight"\n')
    with pytest.raises(PackageError, match=r"config\.pbtxt is not a valid Triton model config"):
        validate_config(bad)


def test_the_export_command(tmp_path):
    from engines.cli import app

    r = CliRunner().invoke(
        app, ["export-triton", "identity", "bicubic-x2", "--repository", str(tmp_path / "r"),
              "--device", "cpu", "--queue-delay-us", "1000"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "identity (onnxruntime_onnx, max_batch_size 8" in r.output
    config = validate_config(tmp_path / "r" / "bicubic-x2" / "config.pbtxt")
    assert config.dynamic_batching.max_queue_delay_microseconds == 1000


@pytest.mark.parametrize(
    ("text", "target"),
    [("grpc://triton.lab:8001", "triton.lab:8001"), ("10.0.0.5:9001", "10.0.0.5:9001"),
     ("grpc://gpu-room", "gpu-room:8001"), ("grpc://[::1]:8001", "[::1]:8001")],
)  # fmt: skip
def test_triton_urls(text, target):
    assert parse_url(text) == target


@pytest.mark.parametrize("text", ["http://host:8000", "grpc://host:http", "grpc://:8001", ""])
def test_bad_triton_urls_are_named(text):
    with pytest.raises(BackendError, match=f"Triton URL {text!r}"):
        parse_url(text)


def test_serve_with_no_triton_there_is_one_line_and_exit_2(tmp_path):
    url = f"grpc://127.0.0.1:{_free_port()}"
    r = subprocess.run(
        [sys.executable, "-m", "stream", "serve", "--backend", "triton", "--triton-url", url,
         "--out", str(tmp_path), "--listen", free_endpoint(), "--quiet"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"Triton at {url} is unreachable" in lines[0], r.stderr


def test_triton_url_without_the_triton_backend_is_refused(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "stream", "serve", "--backend", "onnxruntime",
         "--triton-url", "grpc://127.0.0.1:8001", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert r.returncode == 2 and "needs --backend triton" in r.stderr, r.stderr


# -- a real tritonserver -----------------------------------------------------------------------


class Triton(TritonServer):
    """The shared local ``tritonserver`` (:mod:`bench.triton_server`); the test skips with the
    reason where it cannot start."""

    def __init__(self, repo: Path, work: Path, port: int | None = None) -> None:
        try:
            super().__init__(repo, work, port)
        except TritonUnavailable as e:
            pytest.skip(str(e))

    def start(self, timeout_s: float = 90) -> Triton:
        try:
            super().start(timeout_s)
        except TritonUnavailable as e:
            pytest.skip(str(e))
        return self


ENGINES = ["identity", "bicubic-x2", "confocal-denoise-sr2x"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("triton") / "repo"
    options = ExportOptions(device="cpu", runtime="python", queue_delay_us=2000)
    export_repository(ENGINES, path, options)
    return path


@pytest.fixture(scope="module")
def triton(repo, tmp_path_factory):
    server = Triton(repo, tmp_path_factory.mktemp("triton-work")).start()
    yield server
    server.kill()


@pytest.fixture
def at(triton, monkeypatch) -> Triton:
    monkeypatch.setenv(URL_ENV, triton.url)
    return triton


def _frames(n: int, shape: tuple[int, int], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(40, 4000, shape, dtype=np.uint16) for _ in range(n)]


@pytest.mark.parametrize(
    ("engine", "shape"),
    [("identity", (96, 80)), ("bicubic-x2", (300, 270)), ("confocal-denoise-sr2x", (64, 72)),
     ("confocal-denoise-sr2x", (256, 256))],  # one whole tile: the output is Triton's own array
)  # fmt: skip
def test_triton_gives_the_local_backends_outputs(at, engine, shape):
    """Tiles (bicubic-x2: 4 tiles of 256 + overlap), a temporal window, previous output and
    background (sr2x): the same numbers through Triton as through ONNX Runtime here."""
    remote = EngineChain.open([engine], backend="triton")
    local = EngineChain.open([engine], backend="onnxruntime-cpu", threads=1)
    try:
        info = remote.describe()["backend"][0]
        assert info["name"] == "triton" and info["url"] == at.url and info["health"] == "ready"
        assert info["provenance"] == "checked"
        frames = _frames(3, shape, seed=len(engine))
        previous: dict[str, dict[int, np.ndarray]] = {"remote": {}, "local": {}}
        for t in range(len(frames)):
            window = frames[max(0, t - 1) : t + 1]
            got = {}
            for label, chain in (("remote", remote), ("local", local)):
                result = chain.enhance(window, previous[label], frames[0])
                previous[label] = {0: result.stages[0].output}
                got[label] = result
            np.testing.assert_allclose(
                got["remote"].stages[0].output, got["local"].stages[0].output, rtol=1e-5, atol=1e-3
            )
            assert got["remote"].timings_ms["inference"] > 0
        assert remote.describe()["backend"][0]["calls"] >= 3
    finally:
        remote.close()
        local.close()


def test_four_positions_are_batched_by_triton(at):
    """Four positions in flight at once (threads, as four rigs or a plate's positions would be):
    Triton's dynamic batcher runs them together, and each gets its own result back."""
    package = load_package("bicubic-x2")
    backend, _ = open_backend(package, "triton")
    local, _ = open_backend(package, "onnxruntime-cpu", threads=1)
    before = backend.triton_statistics(refresh=True)
    inputs = {p: np.random.default_rng(p).random((1, 1, 48, 40), np.float32) for p in range(4)}
    expected = {p: local.infer({"frames": x}) for p, x in inputs.items()}
    failures: list[str] = []
    barrier = threading.Barrier(4)

    def position(p: int) -> None:
        barrier.wait()
        for _ in range(15):
            y = backend.infer({"frames": inputs[p]})
            if not np.allclose(y, expected[p], rtol=1e-5, atol=1e-4):
                failures.append(f"position {p} got another position's or a wrong result")

    threads = [threading.Thread(target=position, args=(p,)) for p in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    after = backend.triton_statistics(refresh=True)
    backend.close()
    local.close()
    assert not failures, failures[:3]
    requests = after["inference_count"] - before.get("inference_count", 0)
    executions = after["execution_count"] - before.get("execution_count", 0)
    assert requests == 60
    assert executions < requests, after  # batched: fewer model executions than requests
    assert any(int(size) > 1 for size in after["batch_sizes"]), after
    assert after["queue_ms"] is not None and after["compute_infer_ms"] is not None


def test_a_killed_and_restarted_triton_is_survived(repo, tmp_path, monkeypatch):
    server = Triton(repo, tmp_path).start()
    monkeypatch.setenv(URL_ENV, server.url)
    try:
        backend, reason = open_backend(load_package("identity"), "triton")
        assert f"Triton 2.51.0 at {server.url}" in reason
        x = np.arange(2 * 32 * 40, dtype=np.float32).reshape(2, 1, 32, 40)
        np.testing.assert_array_equal(backend.infer({"frames": x}), x)
        server.kill()
        t0 = time.monotonic()
        with pytest.raises(BackendError, match="lost"):
            backend.infer({"frames": x})
        with pytest.raises(BackendError, match="next reconnect in"):  # within the backoff: fast
            backend.infer({"frames": x})
        assert time.monotonic() - t0 < 3, "a lost Triton must not stall the engine stage"
        assert backend.describe()["health"].startswith("lost: ")
        server.start()
        deadline = time.monotonic() + 60
        while True:
            try:
                y = backend.infer({"frames": x})
                break
            except BackendError:
                assert time.monotonic() < deadline, "enhancement did not resume"
                time.sleep(0.2)
        np.testing.assert_array_equal(y, x)
        info = backend.describe()
        assert info["health"] == "ready" and info["reconnects"] == 1 and info["errors"] >= 2
        backend.close()
    finally:
        server.kill()


def test_serve_with_triton_writes_every_raw_frame_through_a_triton_restart(repo, tmp_path,
                                                                           servers):  # fmt: skip
    """The engine server on --backend triton, 4 positions: Triton killed mid-run -> raw frames
    still written, engine errors counted; Triton back -> enhancement resumes by itself."""
    from test_server import send_frames

    (tmp_path / "t").mkdir()
    server = Triton(repo, tmp_path / "t").start()
    try:
        srv = servers(tmp_path / "run", "--engine", "identity", "--backend", "triton",
                      "--triton-url", server.url, "--mode", "complete")  # fmt: skip
        status = srv.status()
        assert status["engine"]["backend"][0]["name"] == "triton"
        frames = _frames(8, (32, 40), seed=1)
        send_frames(srv.listen, frames, positions=4)
        _wait(lambda: srv.status()["frames_enhanced"] >= 8, "the first frames enhanced")
        server.kill()
        send_frames(srv.listen, frames, positions=4)
        _wait(lambda: srv.status()["frames_written"]["raw"] >= 16, "raw frames written")
        assert sum(srv.status()["engine_errors"].values()) >= 1
        server.start()
        deadline = time.monotonic() + 60
        while srv.status()["frames_enhanced"] <= 8:
            assert time.monotonic() < deadline, "enhancement did not resume"
            send_frames(srv.listen, frames[:4], positions=4)
            time.sleep(0.5)
        summary = srv.stop()
        assert summary["healthy"]
        assert summary["frames_written"]["raw"] == summary["frames_received"]
        assert summary["engine"]["backend"][0]["reconnects"] >= 1
    finally:
        server.kill()


def _wait(ok, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_model_triton_does_not_serve_is_one_line_and_exit_2(at, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "stream", "serve", "--engine", "gaussian", "--backend", "triton",
         "--triton-url", at.url, "--out", str(tmp_path), "--listen", free_endpoint()],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "has no ready model 'gaussian'" in lines[0], r.stderr
    assert "ready there: bicubic-x2, confocal-denoise-sr2x, identity" in lines[0]


def test_another_export_of_the_engine_is_refused(at, tmp_path, monkeypatch):
    """A package named like a served model but with another ONNX: Triton serves something
    else, so the backend will not open (provenance travels in the config)."""
    other = _package(tmp_path / "identity", "identity", batch=None)
    with pytest.raises(BackendError, match=r"was exported from another model\.onnx"):
        open_backend(load_package(other), "triton")


def test_status_reports_triton_health(at):
    from engines.runtime import backend_status

    assert backend_status()["triton"].endswith(f"Triton at {at.url}: ready")
