"""bioimage.io models in and out, with the real bioimageio.spec / bioimageio.core (no internet):
shipped engines exported, validated and reproduced by bioimageio.core; models written with
bioimageio.spec's own API around a small ONNX imported and run by scopecast; round trips; refusals.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip(
    "bioimageio.core",
    reason="bioimageio.core is not installed: pip install --no-deps bioimageio.core==0.11.0 "
    "(after the bioimageio extra; .ci/run does)",
)
onnx = pytest.importorskip("onnx")

from bioimageio.core import test_model as core_test_model  # noqa: E402
from bioimageio.spec import load_description, save_bioimageio_package  # noqa: E402
from bioimageio.spec.model import v0_5 as bio  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from engines.engine import Engine  # noqa: E402
from engines.offline.bioimageio import (  # noqa: E402
    BioimageioError,
    export_bioimageio,
    import_bioimageio,
)
from engines.package import Manifest, Temporal, Tiling, load_package, write_package  # noqa: E402

KERNEL = np.array([[0.05, 0.1, 0.05], [0.1, 0.4, 0.1], [0.05, 0.1, 0.05]], np.float32)


def _failures(summary: Any) -> list[str]:
    return [
        f"{d.name}: {[e.msg[:300] for e in d.errors]}"
        for d in summary.details
        if d.status == "failed"
    ]


def _run(package_path: Path, frames: list[np.ndarray], **kw: Any) -> np.ndarray:
    engine = Engine(load_package(package_path), "onnxruntime-cpu", threads=1)
    try:
        return engine.run(frames, kw.get("previous"), kw.get("background"), {})
    finally:
        engine.close()


# ------------------------------------------------------------------------------ (a) export


@pytest.mark.parametrize("engine", ["confocal-denoise", "bicubic-x2"])
def test_export_shipped_engine_validates_and_reproduces(engine: str, tmp_path: Path) -> None:
    result = export_bioimageio(engine, tmp_path / f"{engine}.zip")
    assert result.status in ("valid-format", "passed")
    descr = load_description(result.path)
    assert descr.validation_summary.status != "failed"
    assert descr.format_version.startswith("0.5")
    assert descr.config.model_extra["scopecast"]["engine"] == engine
    m = load_package(engine).manifest
    out_axis = descr.outputs[0].axes[2]
    assert out_axis.size.get_size(out_axis, descr.inputs[0].axes[2], n=0) == (
        descr.inputs[0].axes[2].size.min * m.scale
    )
    summary = core_test_model(result.path)
    assert summary.status == "passed", _failures(summary)
    # the test output is scopecast's own Engine on the test input
    from bioimageio.spec.utils import load_array

    x = load_array(descr.inputs[0].test_tensor)[0, 0]
    y = load_array(descr.outputs[0].test_tensor)[0, 0]
    np.testing.assert_allclose(_run(load_package(engine).path, [x]), y, rtol=1e-6, atol=1e-3)


def test_export_refuses_non_zip_name(tmp_path: Path) -> None:
    with pytest.raises(BioimageioError, match=r"OUT\.zip"):
        export_bioimageio("identity", tmp_path / "model.tar")


# ---------------------------------------------------------------- temporal engine (3 inputs)


def _temporal_package(tmp_path: Path) -> Path:
    """window 2 + previous output + background, scale 1: y = mean(frames) * 0.5 + 0.3 * prev
    + 0.2 * (frame_t - background)."""
    dims = ["N", "C", "H", "W"]
    nodes = [
        helper.make_node("ReduceMean", ["frames"], ["m"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["m", "half"], ["a"]),
        helper.make_node("Mul", ["previous", "p3"], ["b"]),
        helper.make_node("Slice", ["frames", "s1", "s2", "ax"], ["last"]),
        helper.make_node("Sub", ["last", "background"], ["d"]),
        helper.make_node("Mul", ["d", "p2"], ["c"]),
        helper.make_node("Sum", ["a", "b", "c"], ["y"]),
    ]
    consts = {"half": 0.5, "p3": 0.3, "p2": 0.2}
    inits = [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in consts.items()]
    inits += [
        numpy_helper.from_array(np.array([v], np.int64), k)
        for k, v in (("s1", 1), ("s2", 2), ("ax", 1))
    ]
    graph = helper.make_graph(
        nodes,
        "temporal",
        [
            helper.make_tensor_value_info("frames", TensorProto.FLOAT, dims),
            helper.make_tensor_value_info("previous", TensorProto.FLOAT, dims),
            helper.make_tensor_value_info("background", TensorProto.FLOAT, dims),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    manifest = Manifest(
        name="toy-temporal",
        task="denoise",
        architecture="toy",
        temporal=Temporal(window=2, previous_output=True, background=True),
        tile=Tiling(size=64, overlap=8, multiple=8),
        normalization={
            "units": "electrons",
            "offset": 1.0,
            "scale": 4.0,
            "camera": {"offset_adu": 100.0, "gain_adu_per_electron": 2.0},
        },
    )
    write_package(tmp_path / "toy-temporal", manifest, {"model.onnx": model.SerializeToString()})
    return tmp_path / "toy-temporal"


def test_temporal_engine_exports_with_three_inputs_and_round_trips(tmp_path: Path) -> None:
    package = _temporal_package(tmp_path)
    result = export_bioimageio(package, tmp_path / "temporal.zip")
    assert result.inputs == ["frames", "previous", "background"]
    summary = core_test_model(result.path)
    assert summary.status == "passed", _failures(summary)
    back = import_bioimageio(result.path, tmp_path / "back").package
    before = load_package(package).manifest
    assert back.manifest.temporal == before.temporal
    assert back.manifest.normalization == before.normalization
    assert back.manifest.tile == before.tile
    rng = np.random.default_rng(1)
    frames = [rng.uniform(100, 400, (64, 64)).astype(np.float32) for _ in range(2)]
    prev, bg = (rng.uniform(100, 400, (64, 64)).astype(np.float32) for _ in range(2))
    np.testing.assert_array_equal(
        _run(package, frames, previous=prev, background=bg),
        _run(back.path, frames, previous=prev, background=bg),
    )


# --------------------------------------------------------------------------- (c) round trip


def test_round_trip_confocal_denoise_gives_identical_outputs(tmp_path: Path) -> None:
    zipped = export_bioimageio("confocal-denoise", tmp_path / "cd.zip").path
    back = import_bioimageio(zipped, tmp_path / "cd").package
    original = load_package("confocal-denoise")
    assert back.manifest.normalization == original.manifest.normalization
    assert back.manifest.tile == original.manifest.tile
    assert back.read("model.onnx") == original.read("model.onnx")
    frame = np.random.default_rng(0).poisson(80, (300, 280)).astype(np.uint16)
    np.testing.assert_array_equal(_run(original.path, [frame]), _run(back.path, [frame]))


# --------------------------------------------- (b) a model written with bioimageio.spec's API


def _conv_onnx(layout: str) -> bytes:
    """A 3x3 smoothing conv; layout 'nchw' or 'nhwc' (a transpose inside, as TF exports do)."""
    w = numpy_helper.from_array(KERNEL[None, None], "w")
    if layout == "nchw":
        dims = ["N", 1, "H", "W"]
        nodes = [helper.make_node("Conv", ["raw", "w"], ["smooth"], pads=[1, 1, 1, 1])]
    else:
        dims = ["N", "H", "W", 1]
        nodes = [
            helper.make_node("Transpose", ["raw"], ["t"], perm=[0, 3, 1, 2]),
            helper.make_node("Conv", ["t", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Transpose", ["c"], ["smooth"], perm=[0, 2, 3, 1]),
        ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("raw", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("smooth", TensorProto.FLOAT, dims)],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _spec_model(
    tmp_path: Path,
    *,
    layout: str = "nchw",
    pre: list[Any] | None = None,
    post: list[Any] | None = None,
    z: bool = False,
    halo: int = 0,
) -> Path:
    """A bioimage.io model written with bioimageio.spec's API around ``_conv_onnx``; its test
    output computed by bioimageio.core's own prediction."""
    from bioimageio.core import predict

    (tmp_path / "model.onnx").write_bytes(_conv_onnx(layout))
    rng = np.random.default_rng(3)
    space = [
        bio.SpaceInputAxis(id=bio.AxisId(a), size=bio.ParameterizedSize(min=16, step=8))
        for a in "yx"
    ]
    ref = bio.SizeReference(tensor_id=bio.TensorId("raw"), axis_id=bio.AxisId("y"))
    refx = bio.SizeReference(tensor_id=bio.TensorId("raw"), axis_id=bio.AxisId("x"))
    out_cls = bio.SpaceOutputAxisWithHalo if halo else bio.SpaceOutputAxis
    kw = {"halo": halo} if halo else {}
    out_space = [
        out_cls(id=bio.AxisId("y"), size=ref, **kw),
        out_cls(id=bio.AxisId("x"), size=refx, **kw),
    ]
    channel = bio.ChannelAxis(channel_names=[bio.Identifier("c")])
    in_axes: list[Any] = [bio.BatchAxis(), channel, *space]
    out_axes: list[Any] = [bio.BatchAxis(), channel, *out_space]
    shape_in, shape_out = (1, 1, 48, 40), (1, 1, 48, 40)
    if layout == "nhwc":
        in_axes, out_axes = (
            [bio.BatchAxis(), *space, channel],
            [bio.BatchAxis(), *out_space, channel],
        )
        shape_in = shape_out = (1, 48, 40, 1)
    if z:
        in_axes.insert(2, bio.SpaceInputAxis(id=bio.AxisId("z"), size=4))
        out_axes.insert(2, bio.SpaceOutputAxis(id=bio.AxisId("z"), size=4))
        shape_in = shape_out = (1, 1, 4, 48, 40)
    x = (200 + 50 * rng.standard_normal(shape_in)).astype(np.float32)
    np.save(tmp_path / "in.npy", x)
    np.save(tmp_path / "out.npy", x.reshape(shape_out))  # replaced by the prediction below

    def descr() -> Any:
        return bio.ModelDescr(
            name="Spec Built Smoother",
            description="a 3x3 smoothing convolution written with bioimageio.spec",
            authors=[bio.Author(name="test")],
            license="MIT",
            documentation=bio.FileDescr(source=_doc(tmp_path)),
            tags=["denoising"],
            inputs=[
                bio.InputTensorDescr(
                    id=bio.TensorId("raw"),
                    axes=in_axes,
                    test_tensor=bio.FileDescr(source=tmp_path / "in.npy"),
                    data=bio.IntervalOrRatioDataDescr(type="float32"),
                    preprocessing=pre or [],
                )
            ],
            outputs=[
                bio.OutputTensorDescr(
                    id=bio.TensorId("smooth"),
                    axes=out_axes,
                    test_tensor=bio.FileDescr(source=tmp_path / "out.npy"),
                    data=bio.IntervalOrRatioDataDescr(type="float32"),
                    postprocessing=post or [],
                )
            ],
            weights=bio.WeightsDescr(
                onnx=bio.OnnxWeightsDescr(source=tmp_path / "model.onnx", opset_version=17)
            ),
        )

    if not z:
        sample = predict(model=descr(), inputs={"raw": x})
        np.save(tmp_path / "out.npy", sample.members["smooth"].data.to_numpy())
    path = tmp_path / "spec-model.zip"
    save_bioimageio_package(descr(), output_path=path)
    return path


def _doc(tmp_path: Path) -> Path:
    (tmp_path / "README.md").write_text("# smoother\n")
    return tmp_path / "README.md"


def _core_predict(zipped: Path, x: np.ndarray) -> np.ndarray:
    from bioimageio.core import predict

    sample = predict(model=str(zipped), inputs={"raw": x})
    return sample.members["smooth"].data.to_numpy()


def test_spec_model_with_fixed_normalization_maps_into_the_manifest(tmp_path: Path) -> None:
    pre = [
        bio.FixedZeroMeanUnitVarianceDescr(
            kwargs=bio.FixedZeroMeanUnitVarianceKwargs(mean=200.0, std=50.0)
        )
    ]
    post = [bio.ScaleLinearDescr(kwargs=bio.ScaleLinearKwargs(gain=50.0, offset=200.0))]
    zipped = _spec_model(tmp_path, pre=pre, post=post)
    summary = core_test_model(zipped)
    assert summary.status == "passed", _failures(summary)
    result = import_bioimageio(zipped, tmp_path / "engine")
    m = result.package.manifest
    assert m.name == "spec-built-smoother"
    assert m.normalization.units == "adu" and m.normalization.offset == pytest.approx(200, rel=1e-5)
    assert m.tile.multiple == 8
    assert result.baked == [] or all("ensure_dtype" not in b for b in result.baked)
    # live path (tiles of 256) vs bioimageio.core on a frame it has not seen; the tiler pads a
    # frame smaller than a tile by reflection where the model's own conv pads zeros, so the one
    # pixel of the frame's edge within the 3x3 kernel's reach differs
    frame = (200 + 50 * np.random.default_rng(9).standard_normal((64, 48))).astype(np.float32)
    expected = _core_predict(zipped, frame[None, None])[0, 0]
    got = _run(result.package.path, [frame])
    np.testing.assert_allclose(got[1:-1, 1:-1], expected[1:-1, 1:-1], rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_spec_model_with_per_frame_statistics_is_baked_into_the_graph(
    layout: str, tmp_path: Path
) -> None:
    axes = [bio.AxisId("channel"), bio.AxisId("y"), bio.AxisId("x")]
    pre = [
        bio.ScaleRangeDescr(
            kwargs=bio.ScaleRangeKwargs(axes=axes, min_percentile=1.0, max_percentile=99.5)
        ),
        bio.ClipDescr(kwargs=bio.ClipKwargs(min=0.0, max=1.0)),
    ]
    post = [bio.ScaleLinearDescr(kwargs=bio.ScaleLinearKwargs(gain=1000.0, offset=100.0))]
    zipped = _spec_model(tmp_path, layout=layout, pre=pre, post=post)
    result = import_bioimageio(zipped, tmp_path / "engine")
    m = result.package.manifest
    assert m.tile.size is None  # per-frame statistics: whole frames, never tiles
    assert any("scale_range" in b for b in result.baked)
    assert m.provenance["bioimageio"]["graph_rewritten"] is True
    frame = (200 + 50 * np.random.default_rng(9).standard_normal((64, 48))).astype(np.float32)
    shaped = frame[None, None] if layout == "nchw" else frame[None, :, :, None]
    expected = _core_predict(zipped, shaped).reshape(frame.shape)
    np.testing.assert_allclose(_run(result.package.path, [frame]), expected, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------------ (d) refusals


def test_refuses_3d_models(tmp_path: Path) -> None:
    zipped = _spec_model(tmp_path, z=True)
    with pytest.raises(BioimageioError, match=r"space axis 'z'.*2-D frames"):
        import_bioimageio(zipped, tmp_path / "engine")
    assert not (tmp_path / "engine").exists()


def test_refuses_dataset_statistics(tmp_path: Path) -> None:
    axes = [bio.AxisId("batch"), bio.AxisId("channel"), bio.AxisId("y"), bio.AxisId("x")]
    pre = [bio.ZeroMeanUnitVarianceDescr(kwargs=bio.ZeroMeanUnitVarianceKwargs(axes=axes))]
    zipped = _spec_model(tmp_path, pre=pre)
    with pytest.raises(BioimageioError, match=r"dataset statistics.*fixed_zero_mean_unit_variance"):
        import_bioimageio(zipped, tmp_path / "engine")


def test_refuses_what_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(BioimageioError, match="does not exist"):
        import_bioimageio(tmp_path / "missing.zip", tmp_path / "engine")
    (tmp_path / "rdf.yaml").write_text("type: model\nformat_version: 0.5.4\nname: broken\n")
    with pytest.raises(BioimageioError, match=r"not a valid bioimage\.io description"):
        import_bioimageio(tmp_path / "rdf.yaml", tmp_path / "engine")


# ------------------------------------------------------------------------------------- CLI


def test_cli_export_and_import(tmp_path: Path) -> None:
    def scopecast(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "stream", *args],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    r = scopecast("engines", "export-bioimageio", "bicubic-x2", str(tmp_path / "b.zip"))
    assert r.returncode == 0, r.stderr
    assert "ok:" in r.stdout
    r = scopecast("engines", "import", str(tmp_path / "b.zip"), "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    assert load_package(tmp_path / "b").manifest.scale == 2
    r = scopecast("engines", "import", str(tmp_path / "nothing.zip"), "--out", str(tmp_path / "c"))
    assert r.returncode == 2
    assert [line for line in r.stderr.splitlines() if line.strip()] == [
        (
            f"error: {tmp_path / 'nothing.zip'} does not exist: give a bioimage.io model .zip "
            "or rdf.yaml"
        )
    ]
