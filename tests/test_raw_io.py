"""Raw-io packages (`scopecast engines raw-io`): the graph takes the raw uint16/uint8 frames and
returns the written frame. Against the float package they came from, on ONNX Runtime and
OpenVINO, the written frames agree within 1 ADU: plain, scale 2, temporal, tiled, with and
without a calibration profile (maps, bad pixels). The float packages are untouched, and what a
raw-io package cannot take is refused with a clear message. Small frames, 1 thread."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from pydantic import ValidationError
from typer.testing import CliRunner

from calibration.units import Electrons
from engines.engine import (
    Engine,
    EngineChain,
    EngineError,
    EngineInputError,
    EngineOutputError,
)
from engines.offline.raw_io import RawIoError, make_raw_package
from engines.package import (
    EnginePackage,
    Manifest,
    PackageError,
    Tiling,
    list_packages,
    load_package,
    manifest_json,
    write_package,
)

BACKENDS = [
    "onnxruntime-cpu",
    pytest.param(
        "openvino",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("openvino") is None, reason="openvino is not installed"
        ),
    ),
]


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> dict[str, EnginePackage]:
    """Raw-io packages of the zoo engines the tests use (made once, parity-checked)."""
    root = tmp_path_factory.mktemp("raw")
    made = {}
    for name in ("identity", "bicubic-x2", "confocal-denoise", "confocal-denoise-sr2x"):
        made[name] = make_raw_package(name, root / name).package
    return made


def tiled(package: EnginePackage, size: int, overlap: int) -> EnginePackage:
    """The package with small tiles, in memory only."""
    m = package.manifest
    tile = Tiling.model_validate({**m.tile.model_dump(), "size": size, "overlap": overlap})
    return dataclasses.replace(package, manifest=m.model_copy(update={"tile": tile}))


def frames(shape: tuple[int, int], count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    base = 400 + 250 * np.sin(yy / 4.0) * np.cos(xx / 5.0)
    return [(base + rng.normal(0, 25, shape)).clip(0, 65535).astype(np.uint16)
            for _ in range(count)]  # fmt: skip


def profile(shape: tuple[int, int], bad: bool = False) -> Electrons:
    rng = np.random.default_rng(3)
    mask = None
    if bad:
        mask = np.zeros(shape, bool)
        mask[[3, 10, 11, 20], [5, 7, 7, 30]] = True  # two of them neighbours
    return Electrons(
        50.0, 8.0,
        offset_map=(50 + rng.normal(0, 3, shape)).astype(np.float32),
        flat_field=(1 + rng.normal(0, 0.05, shape)).astype(np.float32),
        bad_pixels=mask, source="test rig",
    )  # fmt: skip


def written(
    package: EnginePackage, backend: str, seq: list[np.ndarray], units: Electrons | None = None
) -> list[np.ndarray]:
    """The written frames of ``seq`` through one engine, temporal state carried as served."""
    m = package.manifest
    chain = EngineChain([Engine(package, backend, 1, units=units)])
    out, previous = [], {}
    try:
        for i in range(len(seq)):
            window = seq[max(0, i + 1 - m.temporal.window) : i + 1]
            bg = np.median(seq[: i + 1], axis=0).astype(np.float32)
            result = chain.enhance(window, previous, bg if m.temporal.background else None)
            previous = {s.stage: s.output for s in result.stages}
            out.append(result.frame)
    finally:
        chain.close()
    return out


def assert_same(source: EnginePackage, raw_pkg: EnginePackage, backend: str,
                seq: list[np.ndarray], units: Electrons | None = None) -> None:  # fmt: skip
    want = written(source, backend, seq, units)
    got = written(raw_pkg, backend, seq, units)
    for a, b in zip(want, got, strict=True):
        assert b.dtype == a.dtype == seq[0].dtype and b.shape == a.shape
        assert np.abs(a.astype(np.int64) - b.astype(np.int64)).max() <= 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["identity", "bicubic-x2"])
def test_adu_engines_plain_and_scale2(raw, backend, name):
    assert_same(load_package(name), raw[name], backend, frames((24, 40), 2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("units", ["camera", "maps", "bad pixels"])
def test_electrons_engine_tiled(raw, backend, units):
    """confocal-denoise on 64-px tiles (overlap 16) of an 88x72 frame: padding, cuts, maps cut
    like the frames, bad pixels patched as calibration.units does."""
    shape = (88, 72)
    conv = None if units == "camera" else profile(shape, bad=units == "bad pixels")
    source = tiled(load_package("confocal-denoise"), 64, 16)
    assert_same(source, tiled(raw["confocal-denoise"], 64, 16), backend, frames(shape, 1), conv)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_profile", [False, True])
def test_temporal_scale2_engine(raw, backend, with_profile):
    """confocal-denoise-sr2x (2 frames, its previous output, the background; x2), tiled: the
    previous output goes back in as the written frame."""
    shape = (72, 80)
    conv = profile(shape, bad=True) if with_profile else None
    source = tiled(load_package("confocal-denoise-sr2x"), 64, 16)
    seq = frames(shape, 4, seed=1)
    assert_same(source, tiled(raw["confocal-denoise-sr2x"], 64, 16), backend, seq, conv)


def test_chain_mixing_float_and_raw(raw):
    """A float stage then a raw-io stage (its float output rounded on the way) and the reverse."""
    seq = frames((32, 32), 1)
    float_chain = EngineChain.open(["confocal-denoise", "bicubic-x2"], "onnxruntime-cpu", 1)
    want = float_chain.enhance(seq, {}, None).frame
    for names in (["confocal-denoise", raw["bicubic-x2"].path],
                  [raw["confocal-denoise"].path, "bicubic-x2"]):  # fmt: skip
        chain = EngineChain.open(names, "onnxruntime-cpu", 1)
        got = chain.enhance(seq, {}, None).frame
        assert got.dtype == np.uint16
        assert np.abs(got.astype(np.int64) - want.astype(np.int64)).max() <= 1
        assert "io raw" in " ".join(chain.describe()["units"])


def test_raw_output_needs_no_conversion(raw):
    """The written frame is the graph's output: uint16 straight from the backend."""
    chain = EngineChain([Engine(raw["identity"], "onnxruntime-cpu", 1)])
    f = frames((16, 16), 1)[0]
    result = chain.enhance([f], {}, None)
    np.testing.assert_array_equal(result.frame, f)
    assert result.stages[0].output.dtype == np.uint16


def test_uint8_package(tmp_path):
    package = make_raw_package("bicubic-x2", tmp_path / "u8", dtype="uint8").package
    assert package.manifest.name == "bicubic-x2-raw-uint8"
    assert package.manifest.raw_dtype == "uint8"
    seq = [f.astype(np.uint8) for f in frames((20, 20), 1)]
    assert_same(load_package("bicubic-x2"), package, "onnxruntime-cpu", seq)


def test_original_packages_unchanged(raw):
    """Zoo manifests load as io float and serialize byte-identically; the float path still
    returns float32 stage outputs."""
    for entry in list_packages():
        assert entry.package is not None, entry.problem
        m = entry.package.manifest
        assert m.io == "float" and m.raw_dtype is None
        assert manifest_json(m) == (entry.path / "manifest.json").read_text()
    result = EngineChain.open(["identity"], "onnxruntime-cpu", 1).enhance(
        frames((8, 8), 1), {}, None
    )
    assert result.stages[0].output.dtype == np.float32
    m = raw["confocal-denoise"].manifest
    assert json.loads(manifest_json(m))["io"] == "raw"
    assert m.plans == [] and m.provenance["raw_io"]["source"] == "confocal-denoise"
    assert m.provenance["raw_io"]["parity_max_adu"] <= 1


def test_manifest_flag_validation():
    base = load_package("identity").manifest.model_dump()
    with pytest.raises(ValidationError, match="needs raw_dtype"):
        Manifest.model_validate({**base, "io": "raw"})
    with pytest.raises(ValidationError, match="only for io 'raw'"):
        Manifest.model_validate({**base, "raw_dtype": "uint16"})
    with pytest.raises(ValidationError):
        Manifest.model_validate({**base, "io": "raw", "raw_dtype": "int32"})


def test_bad_frames_are_refused(raw):
    engine = Engine(raw["identity"], "onnxruntime-cpu", 1)
    chain = EngineChain([engine])
    f = frames((8, 8), 1)[0]
    with pytest.raises(EngineInputError, match="taking uint16 frames, got a uint8 frame"):
        chain.enhance([f.astype(np.uint8)], {}, None)
    with pytest.raises(EngineInputError, match="--dtype float32"):
        chain.enhance([f.astype(np.float32)], {}, None)
    units = profile((8, 8))
    chain = EngineChain([Engine(raw["confocal-denoise"], "onnxruntime-cpu", 1, units=units)])
    with pytest.raises(EngineInputError, match="does not fit the calibration maps"):
        chain.enhance([frames((16, 8), 1)[0]], {}, None)


def test_tool_refusals(raw, tmp_path):
    with pytest.raises(RawIoError, match="already a raw-io package"):
        make_raw_package(raw["identity"].path, tmp_path / "again")
    with pytest.raises(RawIoError, match="choose one of uint16, uint8"):
        make_raw_package("identity", tmp_path / "x", dtype="int16")
    with pytest.raises(RawIoError, match="is the source package"):
        make_raw_package("identity", load_package("identity").path)


def test_a_float_graph_labelled_raw_is_refused(raw, tmp_path):
    """A manifest saying raw over a float graph: the backend says what the model takes."""
    src = load_package("identity")
    m = src.manifest.model_copy(update={"io": "raw", "raw_dtype": "uint16", "name": "liar"})
    package = write_package(tmp_path / "liar", m, {"model.onnx": src.read("model.onnx")})
    with pytest.raises(PackageError, match=r"takes and returns uint16"):
        Engine(package, "onnxruntime-cpu", 1)


def test_nonfinite_output_is_caught(tmp_path):
    """The graph's checksum carries the NaN/inf check: the frame is discarded, not written."""
    x = helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["N", 1, "H", "W"])
    y = helper.make_tensor_value_info("enhanced", TensorProto.FLOAT, ["N", 1, "H", "W"])
    nodes = [helper.make_node("Log", ["frames"], ["neg"]),
             helper.make_node("Sqrt", ["neg"], ["enhanced"])]  # fmt: skip
    graph = helper.make_graph(nodes, "nan", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    src = load_package("identity").manifest.model_copy(update={"name": "nan", "files": {}})
    source = write_package(tmp_path / "nan", src, {"model.onnx": model.SerializeToString()})
    package = make_raw_package(source.path, tmp_path / "nan-raw", check=False).package
    chain = EngineChain([Engine(package, "onnxruntime-cpu", 1)])
    f = np.zeros((8, 8), np.uint16)  # log(0) = -inf, sqrt(-inf) = NaN
    with pytest.raises(EngineOutputError, match="NaN/inf"):
        chain.enhance([f], {}, None)
    assert onnx.load(str(package.model_path)).graph.output[1].name == "checksum"


def test_backend_without_all_outputs_is_refused(raw, monkeypatch):
    import engines.engine as engine_module

    class FirstOnly:
        name, device = "toy", "cpu"

        def infer(self, inputs):
            raise AssertionError

        def describe(self):
            return {}

        def close(self):
            pass

    monkeypatch.setattr(engine_module, "open_backend", lambda *a, **k: (FirstOnly(), "test"))
    with pytest.raises(EngineError, match="cannot run"):
        Engine(raw["identity"], "toy")


def test_cli(tmp_path):
    """`scopecast engines raw-io`; a mistake is InvalidInput (one error line, exit 2)."""
    from calibration.errors import InvalidInput
    from engines.cli import app

    runner = CliRunner()
    out = tmp_path / "gaussian-raw"
    result = runner.invoke(app, ["raw-io", "gaussian", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "gaussian-raw (uint16 frames in" in result.output
    assert load_package(out).manifest.io == "raw"
    result = runner.invoke(app, ["raw-io", str(out), "--out", str(tmp_path / "b")])
    assert isinstance(result.exception, InvalidInput)
    assert "already a raw-io package" in str(result.exception)
    assert not Path(tmp_path / "b").exists()
