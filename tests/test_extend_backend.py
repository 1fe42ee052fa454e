"""Adding a backend is one module (tests/toy_backend.py) and one ``register_backend`` row: it
is then a ``--backend`` name, in ``backend_status``, in ``auto``'s order where its row puts it,
and engines run through it (tiling, normalization, chains) like through any other."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from engines.engine import EngineChain
from engines.package import load_package
from engines.runtime import (
    BackendError,
    MachineFacts,
    auto_order,
    backend_help,
    backend_names,
    backend_status,
    choose_backend,
    open_backend,
    register_backend,
    unregister_backend,
)
from engines.runtime.openvino import auto_here

NO_TENSORRT = MachineFacts(problem="TensorRT is not installed here (No module named 'tensorrt')")


@pytest.fixture
def toy() -> Iterator[None]:
    register_backend("toy", ("toy",), "toy_backend", auto=15)  # the one row
    yield
    unregister_backend("toy")


def test_one_row_makes_a_backend(toy: None) -> None:
    assert "toy" in backend_names() and "toy" in backend_help()
    assert [s.family for s in auto_order()] == ["tensorrt", "toy", "openvino", "onnxruntime"]
    status = backend_status()
    assert status["toy"].startswith("toy (numpy ") and {"tensorrt", "onnxruntime"} <= set(status)
    backend, reason = open_backend(load_package("identity"), "toy")
    assert backend.name == "toy" and reason == "toy: toy backend (numpy) for identity"
    x = np.random.default_rng(0).random((2, 1, 16, 16), dtype=np.float32)
    assert np.array_equal(backend.infer({"frames": x}), x)
    with pytest.raises(BackendError, match="toy backend, not an onnxruntime provider"):
        choose_backend("toy", ["CPUExecutionProvider"])


def test_engines_run_through_it(toy: None) -> None:
    frame = np.random.default_rng(1).integers(0, 4096, (96, 80), dtype=np.uint16)
    chain = EngineChain.open(["identity", "bicubic-x2"], "toy")
    try:
        assert [e.backend.name for e in chain.engines] == ["toy", "toy"]
        out = chain.enhance([frame], {}, None)
        assert out.frame.dtype == np.uint16 and out.frame.shape == (192, 160)
        assert np.array_equal(out.frame, frame.repeat(2, 0).repeat(2, 1))  # tiles stitched
        assert chain.describe()["backend"][0]["engine"] == "identity"
    finally:
        chain.close()


def test_auto_takes_it_in_its_place(toy: None) -> None:
    package = load_package("identity")
    backend, reason = open_backend(package, "auto", facts=NO_TENSORRT)
    assert backend.name == "toy"  # after TensorRT (not here), before ONNX Runtime
    assert reason.startswith("auto: toy backend") and "TensorRT not used: TensorRT is not" in reason
    register_backend("toy", ("toy",), "toy_backend", auto=None)  # the row again: not in auto
    assert [s.family for s in auto_order()] == ["tensorrt", "openvino", "onnxruntime"]
    backend, reason = open_backend(package, "auto", threads=1, facts=NO_TENSORRT)
    try:
        assert backend.name == ("openvino" if auto_here() is None else "onnxruntime")
    finally:
        backend.close()


def test_rows_are_checked_and_removable() -> None:
    with pytest.raises(ValueError, match="already belong to 'onnxruntime'"):
        register_backend("toy", ("onnxruntime-cpu",), "toy_backend")
    with pytest.raises(ValueError, match="not 'auto'"):
        register_backend("toy", ("auto",), "toy_backend")
    spec = register_backend("gone", ("gone",), "no_such_module_here", auto=1)
    try:
        assert backend_status()["gone"].startswith("not available here (no_such_module_here")
        backend, reason = open_backend(load_package("identity"), "auto", threads=1,
                                       facts=NO_TENSORRT)  # fmt: skip
        backend.close()
        assert "gone not used: no_such_module_here does not import" in reason
        with pytest.raises(BackendError, match="'gone' is not available here"):
            open_backend(load_package("identity"), "gone")
        assert spec.title == "gone"
    finally:
        unregister_backend("gone")
    assert "gone" not in backend_names() and "toy" not in backend_names()
    with pytest.raises(BackendError, match="unknown backend 'toy'"):
        open_backend(load_package("identity"), "toy")
