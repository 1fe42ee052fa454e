"""ONNX Runtime backend: runs a package's hash-verified ``model.onnx`` on CPU, CUDA or TensorRT.

onnxruntime-gpu silently falls back to CPU when a GPU provider cannot start, so the providers
actually active in the session are checked, not only the ones the build offers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from ..package import EnginePackage, PackageError
from .base import Backend, BackendError, feed, feed_typed
from .providers import INSTALL_GPU, BackendChoice, choose_backend
from .registry import OpenOptions


class OnnxRuntimeBackend:
    """One ONNX Runtime session for one engine package."""

    name = "onnxruntime"

    def __init__(
        self, package: EnginePackage, choice: BackendChoice, threads: int | None = None
    ) -> None:
        if threads is not None and threads < 1:
            raise BackendError(f"threads must be >= 1 or None (onnxruntime decides), got {threads}")
        self.package = package
        self.device: str = choice.device  # Backend.device; choice.device is the Device literal
        self.threads = threads
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle pool threads would spin for a while after every run; in a server whose
        # receive, write and publish threads share a few cores, that steals their CPU.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        model = package.read(package.manifest.model)
        try:
            self._session: ort.InferenceSession | None = ort.InferenceSession(
                model, sess_options=options, providers=self._providers(choice)
            )
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise BackendError(
                f"onnxruntime could not open {package.path / package.manifest.model} on "
                f"{choice.device}: {e}"
            ) from e
        self.active_providers: list[str] = self._session.get_providers()
        wanted = choice.providers[0]
        if wanted not in self.active_providers:
            active = ", ".join(self.active_providers)
            self._session = None
            raise BackendError(
                f"{wanted} is offered by onnxruntime but did not start (session runs on {active}); "
                f"check the NVIDIA driver, CUDA and cuDNN/TensorRT libraries, or {INSTALL_GPU}"
            )
        self._inputs = [i.name for i in self._session.get_inputs()]
        self._dtypes: dict[str, np.dtype[Any]] = {}
        self._check_io()
        self._output_dtype = np.dtype(package.manifest.io_dtypes["output"])

    def _providers(self, choice: BackendChoice) -> list[Any]:
        if choice.device == "tensorrt" and self.package.manifest.precision == "fp16":
            first: Any = (choice.providers[0], {"trt_fp16_enable": True})
            return [first, *choice.providers[1:]]
        return list(choice.providers)

    def _check_io(self) -> None:
        """The session's inputs must be the rank-4 tensors the manifest promises (float32, or
        the raw dtype where ``io`` is "raw")."""
        assert self._session is not None
        manifest = self.package.manifest
        if sorted(self._inputs) != sorted(manifest.input_names):
            raise PackageError(
                f"model of {manifest.name!r} has inputs {self._inputs} but its manifest implies "
                f"{manifest.input_names}: re-export the model with those input names or fix "
                "manifest.temporal"
            )
        types = manifest.io_dtypes
        self._dtypes = {n: np.dtype(types[n]) for n in self._inputs}
        outputs = self._session.get_outputs()[:1]
        for arg, want in [*((a, types[a.name]) for a in self._session.get_inputs()),
                          *((a, types["output"]) for a in outputs)]:  # fmt: skip
            if arg.type != _ORT_TYPES[want] or len(arg.shape) != 4:
                raise PackageError(
                    f"model of {manifest.name!r}: {arg.name!r} is {arg.type} {arg.shape}, but "
                    f"this engine (io {manifest.io!r}) takes and returns {want} (N, C, H, W): "
                    "re-export the model (or remake it with `scopecast engines raw-io`)"
                )

    def infer(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Run the model on the inputs it has (others are ignored) and return its first output
        (float32; a raw-io package's output in its own dtype)."""
        return self.infer_outputs(inputs)[0]

    def infer_outputs(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Every output of the model (a raw-io package's ``checksum`` second)."""
        if self._session is None:
            raise BackendError(f"backend for {self.package.manifest.name!r} is closed")
        name = self.package.manifest.name
        if self.package.manifest.io == "float":
            arrays = feed(name, self._inputs, inputs)
        else:
            arrays = feed_typed(name, self._dtypes, inputs)
        try:
            outs = self._session.run(None, arrays)
        except Exception as e:  # onnxruntime raises its own untyped errors
            shapes = {n: a.shape for n, a in arrays.items()}
            raise BackendError(f"engine {name!r} failed on inputs {shapes}: {e}") from e
        first = np.asarray(outs[0])
        if first.dtype != self._output_dtype:
            first = first.astype(self._output_dtype)
        return [first, *(np.asarray(o) for o in outs[1:])]

    def describe(self) -> dict[str, Any]:
        """What runs this engine: backend, device, providers, threads, versions and model I/O."""
        session = self._session
        io = (
            {
                "inputs": [_arg(a) for a in session.get_inputs()],
                "outputs": [_arg(a) for a in session.get_outputs()],
            }
            if session is not None
            else {}
        )
        return {
            "name": self.name,
            "device": self.device,
            "engine": self.package.manifest.name,
            "providers": list(self.active_providers),
            "available_providers": ort.get_available_providers(),
            "threads": self.threads,
            "inter_op_threads": 1,
            "versions": {"onnxruntime": ort.__version__},
            **io,
        }

    def close(self) -> None:
        self._session = None

    def __enter__(self) -> OnnxRuntimeBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_ORT_TYPES = {"float32": "tensor(float)", "uint16": "tensor(uint16)", "uint8": "tensor(uint8)"}


def _arg(arg: Any) -> dict[str, Any]:
    return {"name": arg.name, "type": arg.type, "shape": list(arg.shape)}


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers (not proof that they start)."""
    return list(ort.get_available_providers())


# -- the registry's functions (``registry``'s "onnxruntime" row) -----------------------------


def open_onnxruntime(
    package: EnginePackage, requested: str, options: OpenOptions
) -> tuple[Backend, str]:
    """Open ``requested`` (``auto``, ``onnxruntime`` or ``onnxruntime-DEVICE``): the fastest
    provider that starts here, or the one named; a GPU provider offered but not starting is
    skipped with its reason unless it was named."""
    available = available_providers()
    failed: dict[str, str] = {}
    while True:
        choice = choose_backend(requested, available, failed)
        try:
            return OnnxRuntimeBackend(package, choice, threads=options.threads), choice.reason
        except BackendError as e:
            if choice.requested.startswith("onnxruntime-") or choice.device == "cpu":
                raise
            failed[choice.device] = str(e)


def unavailable(options: OpenOptions) -> str | None:
    """ONNX Runtime runs wherever this module imports (a CPU provider is always there)."""
    return None


def status(options: OpenOptions) -> str:
    providers = ", ".join(p.removesuffix("ExecutionProvider") for p in available_providers())
    return f"onnxruntime {ort.__version__} ({providers})"
