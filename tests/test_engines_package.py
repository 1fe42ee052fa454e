"""Engine packages, the ONNX Runtime backend and the shipped baselines, with real ONNX graphs."""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from pydantic import ValidationError
from typer.testing import CliRunner

from engines.cli import app
from engines.package import (
    ZOO_DIR,
    EnginePackage,
    Manifest,
    PackageError,
    Temporal,
    Tiling,
    find_package,
    is_warning,
    list_packages,
    load_package,
    verify_package,
    write_package,
)
from engines.runtime import Backend, BackendError, backend_names, choose_backend, open_backend

BASELINES = ("identity", "bicubic-x2", "gaussian")
CPU = ["AzureExecutionProvider", "CPUExecutionProvider"]
GPU = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def copy_package(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(ZOO_DIR / name, dst)
    return dst


def run(name: str, frames: np.ndarray) -> np.ndarray:
    backend, _ = open_backend(load_package(name), "onnxruntime-cpu", threads=1)
    try:
        return backend.infer({"frames": frames[None, None].astype(np.float32)})[0, 0]
    finally:
        backend.close()


# --- package format -----------------------------------------------------------------------------


def test_rebuilding_the_baselines_is_byte_identical(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from engines.offline.baselines import build_all

    built = build_all(tmp_path)
    assert sorted(p.manifest.name for p in built) == sorted(BASELINES)
    for name in BASELINES:
        shipped = sorted(p.name for p in (ZOO_DIR / name).iterdir())
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == shipped
        for file in shipped:
            assert (tmp_path / name / file).read_bytes() == (ZOO_DIR / name / file).read_bytes()


def test_shipped_packages_load_and_verify() -> None:
    for name in BASELINES:
        package = load_package(name)
        assert package.path == ZOO_DIR / name
        assert verify_package(package.path) == []
        model = package.read(package.manifest.model)
        assert hashlib.sha256(model).hexdigest() == package.manifest.files["model.onnx"]
        assert package.manifest.baseline and package.manifest.input_names == ["frames"]


def test_a_changed_model_is_refused(tmp_path: Path) -> None:
    path = copy_package("identity", tmp_path)
    loaded = load_package(path)
    data = bytearray((path / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (path / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"sha256 mismatch for 'model.onnx'") as e:
        load_package(path)
    assert "rebuild or re-download" in str(e.value)
    with pytest.raises(PackageError, match="sha256 mismatch"):
        loaded.read("model.onnx")  # loaded before the change: the bytes are checked again
    assert any("sha256 mismatch" in p for p in verify_package(path))


class _Payload:
    """Unpickling this creates a marker file: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_unlisted_files_and_pickles_are_never_read(tmp_path: Path) -> None:
    path = copy_package("identity", tmp_path)
    marker = tmp_path / "unpickled"
    (path / "weights.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    (path / "notes.txt").write_text("hello")
    problems = verify_package(path)
    assert problems and all(is_warning(p) for p in problems)
    assert any("'weights.pkl'" in p and "not listed, will not be loaded" in p for p in problems)
    package = load_package(path)
    backend, _ = open_backend(package, "auto")
    x = np.ones((1, 1, 8, 8), np.float32)
    assert np.array_equal(backend.infer({"frames": x}), x)
    for name in ("weights.pkl", "notes.txt"):
        with pytest.raises(PackageError, match="not listed"):
            package.read(name)
    assert not marker.exists()

    # Listing a pickle-based file in the manifest is refused outright.
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["weights.pkl"] = hashlib.sha256(
        (path / "weights.pkl").read_bytes()
    ).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="pickle"):
        load_package(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"speed": "fast"}, "speed: Extra inputs are not permitted"),
        ({"files": {"../x": "0" * 64}}, "unsafe file name '../x'"),
        ({"files": {"/etc/passwd": "0" * 64}}, "unsafe file name '/etc/passwd'"),
        ({"model": "../model.onnx"}, "unsafe file name"),
        ({"name": "Bad Name"}, "engine name 'Bad Name' is not allowed"),
        ({"tile": {"size": 64, "overlap": 64}}, "overlap 64 must be smaller than tile size 64"),
        ({"format": 2}, "unsupported manifest format 2"),
    ],
)
def test_invalid_manifests_are_refused(tmp_path: Path, change: dict, message: str) -> None:
    path = copy_package("identity", tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, **change}))
    problems = verify_package(path)
    assert any(message in p for p in problems), problems
    with pytest.raises(PackageError, match="cannot be loaded"):
        load_package(path)


def test_missing_manifest_and_bad_json(tmp_path: Path) -> None:
    assert "missing manifest.json" in verify_package(tmp_path)[0]
    (tmp_path / "manifest.json").write_text("{not json")
    assert "not valid JSON" in verify_package(tmp_path)[0]


def test_manifest_rules() -> None:
    m = Manifest(
        name="t",
        task="denoise",
        architecture="x",
        temporal=Temporal(window=3, previous_output=True, background=True),
    )
    assert m.input_names == ["frames", "previous", "background"]
    with pytest.raises(ValidationError):
        Tiling(size=100, multiple=16)
    with pytest.raises(ValidationError):
        Manifest(name="t", task="denoise", architecture="x", scale=3)
    with pytest.raises(ValidationError):
        Manifest(name="t", task="denoise", architecture="x", normalization={"scale": 0})
    with pytest.raises(ValidationError):
        m.name = "other"  # frozen


def test_write_package_refuses_unsafe_or_incomplete_files(tmp_path: Path) -> None:
    manifest = Manifest(name="t", task="identity", architecture="x")
    with pytest.raises(PackageError, match="unsafe file name"):
        write_package(tmp_path / "t", manifest, {"model.onnx": b"", "../evil": b""})
    with pytest.raises(PackageError, match=r"model\.onnx"):
        write_package(tmp_path / "t", manifest, {"other.onnx": b""})
    assert not (tmp_path / "t").exists()


def test_find_package_by_name_path_and_search_path(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(PackageError) as e:
        find_package("no-such-engine")
    shipped = ", ".join(
        sorted(d.name for d in ZOO_DIR.iterdir() if (d / "manifest.json").is_file())
    )
    assert "bicubic-x2" in shipped and "gaussian" in shipped
    assert f"engine 'no-such-engine' not found; available: {shipped}" in str(e.value)
    with pytest.raises(PackageError, match="no engine package folder"):
        find_package(tmp_path / "missing")
    copy_package("gaussian", tmp_path)
    shutil.copytree(ZOO_DIR / "identity", tmp_path / "my-engine")
    monkeypatch.setenv("SCOPECAST_ENGINE_PATH", str(tmp_path))
    assert find_package("my-engine") == tmp_path / "my-engine"
    assert find_package("gaussian") == tmp_path / "gaussian"  # the search path comes first
    assert find_package(str(ZOO_DIR / "gaussian")) == ZOO_DIR / "gaussian"
    (tmp_path / "my-engine" / "model.onnx").write_bytes(b"changed")
    entries = {(e.path.parent, e.name): e for e in list_packages()}
    assert entries[(tmp_path, "my-engine")].package is None
    assert "sha256 mismatch" in entries[(tmp_path, "my-engine")].problem
    assert isinstance(entries[(ZOO_DIR, "identity")].package, EnginePackage)


# --- the baselines run in onnxruntime -----------------------------------------------------------


def test_identity_returns_the_input_exactly() -> None:
    x = np.random.default_rng(0).integers(0, 65535, (37, 53)).astype(np.float32)
    assert np.array_equal(run("identity", x), x)


def _keys_matrix(n: int, a: float = -0.75) -> np.ndarray:
    """1-D bicubic x2 (Keys a, half-pixel centres, edge replicated) as an (2n, n) matrix."""

    def w(d: float) -> float:
        d = abs(d)
        if d <= 1:
            return (a + 2) * d**3 - (a + 3) * d**2 + 1
        if d < 2:
            return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
        return 0.0

    m = np.zeros((2 * n, n))
    for o in range(2 * n):
        x = (o + 0.5) / 2 - 0.5
        i0 = math.floor(x)
        for i in range(i0 - 1, i0 + 3):
            m[o, min(max(i, 0), n - 1)] += w(x - i)
    return m


def test_bicubic_x2_matches_a_reference_bicubic() -> None:
    yy, xx = np.mgrid[0:24, 0:40]
    x = (1000 + 300 * np.sin(yy / 5.0) * np.cos(xx / 7.0) + 10 * xx).astype(np.float32)
    y = run("bicubic-x2", x)
    assert y.shape == (48, 80)
    expected = _keys_matrix(24) @ x.astype(np.float64) @ _keys_matrix(40).T
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-2)
    assert np.allclose(run("bicubic-x2", np.full((16, 16), 123.0, np.float32)), 123.0)
    ramp = run("bicubic-x2", np.tile(np.arange(32, dtype=np.float32) * 4, (8, 1)))
    # half-pixel centres: output column j sits at input x = (j + 0.5) / 2 - 0.5; Keys a=-0.75
    # (OpenCV/PyTorch) is not exact on ramps: it misses by 3/64 of a pixel step at t=1/4, 3/4.
    line = ((np.arange(64) + 0.5) / 2 - 0.5) * 4
    np.testing.assert_allclose(ramp[:, 4:-4], np.tile(line[4:-4], (16, 1)), atol=4 * 3 / 64 + 1e-4)
    assert np.all(np.diff(ramp, axis=1) > 0)


def test_gaussian_keeps_the_mean_and_averages_noise_down() -> None:
    g = np.exp(-(np.arange(-3, 4) ** 2) / 2.0)
    kernel = np.outer(g, g) / np.outer(g, g).sum()
    assert np.allclose(run("gaussian", np.full((20, 30), 500.0, np.float32)), 500.0, atol=1e-3)
    impulse = np.zeros((21, 21), np.float32)
    impulse[10, 10] = 1.0
    response = run("gaussian", impulse)
    assert response.sum() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(response[7:14, 7:14], kernel, atol=1e-7)
    noise = np.random.default_rng(1).normal(0, 10, (512, 512)).astype(np.float32)
    ratio = run("gaussian", noise)[8:-8, 8:-8].var() / noise.var()
    assert ratio == pytest.approx(1 / (4 * math.pi), rel=0.1)  # ~0.08 for sigma 1


# --- backends -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "available", "failed", "device"),
    [
        ("auto", CPU, {}, "cpu"),
        ("auto", GPU, {}, "tensorrt"),
        ("auto", GPU[1:], {}, "cuda"),
        ("auto", GPU, {"tensorrt": "libnvinfer.so missing"}, "cuda"),
        ("auto", GPU, {"tensorrt": "no", "cuda": "no driver"}, "cpu"),
        ("onnxruntime", GPU[1:], {}, "cuda"),
        ("onnxruntime-cpu", GPU, {}, "cpu"),
        ("onnxruntime-cuda", GPU, {}, "cuda"),
        ("onnxruntime-tensorrt", GPU, {}, "tensorrt"),
    ],
)
def test_choose_backend(requested: str, available: list, failed: dict, device: str) -> None:
    choice = choose_backend(requested, available, failed)
    assert choice.device == device and choice.backend == "onnxruntime"
    assert choice.reason.startswith(f"{requested}: onnxruntime on ")
    assert choice.providers[-1] == "CPUExecutionProvider"
    for reason in failed.values():
        assert reason in choice.reason


def test_choose_backend_explains_what_is_missing() -> None:
    assert "onnxruntime-gpu" in choose_backend("auto", CPU).reason
    with pytest.raises(BackendError, match=r"needs CUDAExecutionProvider.*onnxruntime-gpu"):
        choose_backend("onnxruntime-cuda", CPU)
    with pytest.raises(BackendError, match="needs TensorrtExecutionProvider"):
        choose_backend("onnxruntime-tensorrt", GPU[1:])
    with pytest.raises(BackendError, match="did not start: no driver"):
        choose_backend("onnxruntime-cuda", GPU, {"cuda": "no driver"})
    with pytest.raises(BackendError) as e:
        choose_backend("tensorrt-native", GPU)
    assert all(name in str(e.value) for name in backend_names())
    with pytest.raises(BackendError, match="TensorRT backend, not an onnxruntime provider"):
        choose_backend("tensorrt", GPU)


def test_open_backend_on_this_machine() -> None:
    package = load_package("identity")
    backend, reason = open_backend(package, "onnxruntime", threads=1)
    assert isinstance(backend, Backend)
    info = backend.describe()
    assert info["name"] == "onnxruntime" and info["threads"] == 1
    assert info["providers"] and reason.startswith("onnxruntime: onnxruntime on ")
    x = np.arange(12, dtype=np.float32).reshape(1, 1, 3, 4)
    # inputs the model does not take are ignored
    assert np.array_equal(backend.infer({"frames": x, "background": x}), x)
    with pytest.raises(BackendError, match=r"needs inputs \['frames'\]"):
        backend.infer({"previous": x})
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.infer({"frames": x})
    with pytest.raises(BackendError, match="unknown backend 'gpu'"):
        open_backend(package, "gpu")
    with pytest.raises(BackendError, match="threads must be >= 1"):
        open_backend(package, "onnxruntime-cpu", threads=0)
    if "CUDAExecutionProvider" not in info["available_providers"]:
        with pytest.raises(BackendError, match="onnxruntime-gpu"):
            open_backend(package, "onnxruntime-cuda")


def test_model_inputs_must_match_the_manifest(tmp_path: Path) -> None:
    package = load_package("identity")
    temporal = package.manifest.model_copy(update={"temporal": Temporal(previous_output=True)})
    broken = write_package(tmp_path / "t", temporal, {"model.onnx": package.read("model.onnx")})
    with pytest.raises(PackageError, match=r"has inputs \['frames'\].*'previous'"):
        open_backend(broken, "onnxruntime-cpu")


def test_the_runtime_imports_neither_onnx_nor_torch() -> None:
    code = (
        "import sys, numpy as np; import engines.cli; "
        "from engines.package import load_package; from engines.runtime import open_backend; "
        "b, _ = open_backend(load_package('gaussian')); "
        "b.infer({'frames': np.zeros((1, 1, 8, 8), np.float32)}); "
        "print(sorted(m for m in ('onnx', 'torch') if m in sys.modules))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


#: The offline part of engines (models, training, export, plan builds): torch and onnx live
#: there. Every other module of stream, engines and calibration is the live path.
OFFLINE = ("engines.offline", "engines.train", "engines.models")


def test_no_live_module_imports_torch_or_onnx() -> None:
    """Import every live module (found with pkgutil, so a new one is covered) in one fresh
    process, one at a time: none may load torch, onnx or an offline module. (The walk does not
    use walk_packages, which imports each package to look inside, offline ones included.)"""
    code = f"""
import importlib, json, pkgutil, sys
OFFLINE = {OFFLINE!r}
def walk(name, path):
    yield name
    for info in pkgutil.iter_modules(path, name + "."):
        if info.name.startswith(OFFLINE) or info.name.endswith(".__main__"):
            continue
        if info.ispkg:
            yield from walk(info.name, importlib.import_module(info.name).__path__)
        else:
            yield info.name
names, culprits = [], {{}}
for root in ("stream", "engines", "calibration"):
    for name in walk(root, importlib.import_module(root).__path__):
        names.append(name)
        importlib.import_module(name)
        bad = sorted({{m for m in sys.modules
                      if m.split(".")[0] in ("torch", "onnx") or m.startswith(OFFLINE)}})
        if bad and not culprits:
            culprits[name] = bad
print(json.dumps({{"imported": names, "culprits": culprits}}))
"""
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["culprits"] == {}, f"importing this module loads the offline part: {result}"
    imported = set(result["imported"])  # the walk found the whole tree, not only the roots
    assert {"stream.server", "stream.cli", "engines.engine", "engines.runtime.tensorrt",
            "engines.runtime.registry", "engines.zoo",
            "calibration.metrics"} <= imported  # fmt: skip
    assert not any(name.startswith(OFFLINE) for name in imported)


# --- command line -------------------------------------------------------------------------------


def test_cli_list_show_verify(tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["list"])
    assert r.exit_code == 0
    assert all(name in r.stdout for name in BASELINES)

    r = runner.invoke(app, ["show", "bicubic-x2"])
    assert r.exit_code == 0
    assert "super-resolution" in r.stdout and "resize-cubic" in r.stdout
    assert "input  frames: tensor(float)" in r.stdout and "output enhanced" in r.stdout
    r = runner.invoke(app, ["show", "gaussian", "--json"])
    assert r.exit_code == 0
    assert Manifest.model_validate_json(r.stdout) == load_package("gaussian").manifest

    r = runner.invoke(app, ["verify", "identity"])
    assert r.exit_code == 0 and "ok: 1 files verified" in r.stdout

    path = copy_package("identity", tmp_path)
    (path / "model.onnx").write_bytes(b"not the model")
    r = runner.invoke(app, ["verify", str(path)])
    assert r.exit_code == 1
    assert "sha256 mismatch for 'model.onnx'" in r.stderr

    # a user's mistake is reported by the `scopecast` root (one line, exit 2), as when run
    from stream.console import ScopecastGroup

    root = typer.Typer(cls=ScopecastGroup)
    root.add_typer(app, name="engines")
    for args in (["verify", "nope"], ["show", "nope"]):
        r = runner.invoke(root, ["engines", *args])
        assert r.exit_code == 2
        assert "engine 'nope' not found; available:" in r.stderr and "identity" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


# --- symbolic links and bad input ----------------------------------------------------------------


@pytest.mark.parametrize("which", ["manifest.json", "model.onnx"])
def test_a_symlinked_file_is_refused(tmp_path: Path, which: str) -> None:
    path = copy_package("identity", tmp_path)
    real = tmp_path / f"real-{which}"  # outside the package; inside would be refused the same
    (path / which).rename(real)
    (path / which).symlink_to(real)
    with pytest.raises(PackageError, match=rf"'{which}' in .* is a symbolic link") as e:
        load_package(path)
    assert "\n" not in str(e.value) and "copy the file into the package" in str(e.value)
    assert any("symbolic link" in p and not is_warning(p) for p in verify_package(path))
    inside = copy_package("gaussian", tmp_path / "inside")
    (inside / "copy.onnx").write_bytes((inside / which).read_bytes())
    (inside / which).unlink()
    (inside / which).symlink_to("copy.onnx")  # a link that stays inside the folder
    with pytest.raises(PackageError, match="symbolic link"):
        load_package(inside)


def test_load_errors_are_one_line(tmp_path: Path) -> None:
    path = copy_package("identity", tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.pop("task")
    (path / "manifest.json").write_text(json.dumps({**manifest, "scale": 3}))
    with pytest.raises(PackageError) as e:
        load_package(path)
    text = str(e.value)
    assert "\n" not in text
    assert text.startswith(f"engine package {path} cannot be loaded: invalid manifest: task")
    assert "; scale: Input should be 1, 2 or 4 (got 3)" in text


def test_nan_input_is_an_input_error_not_an_engine_error() -> None:
    from engines.engine import EngineChain, EngineOutputError, NonFiniteInputError

    chain = EngineChain.open(["gaussian"], "onnxruntime-cpu", threads=1)
    try:
        frame = np.ones((16, 16), np.float32)
        frame[2, 2] = np.inf
        with pytest.raises(NonFiniteInputError, match="the input frame holds 1 NaN/inf") as e:
            chain.enhance([frame], {}, None)
        assert e.value.kind == "input" and not isinstance(e.value, EngineOutputError)
        assert "not the engine" in str(e.value)
        ok = chain.enhance([np.ones((16, 16), np.float32)], {}, None)
        assert np.isfinite(ok.frame).all()
    finally:
        chain.close()
