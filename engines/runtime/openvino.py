"""OpenVINO backend: runs a package's hash-verified ``model.onnx`` with OpenVINO's CPU plugin.

On x86-64 CPUs it took 0.65-0.75 of ONNX Runtime's time on the shipped engines (2 threads, same
inputs, outputs equal to 7e-7), so ``auto`` takes it before ONNX Runtime's CPU provider there
(``AUTO_RULE``); where ONNX Runtime offers a GPU provider that one goes first. The model is
compiled once per distinct set of input shapes (a frame size, a tile size; a few kept), with
shapes fixed, which ran 7-13% faster than one dynamic-shape compile. Inference precision is
pinned to f32: OpenVINO's CPU plugin otherwise runs bf16 on CPUs that have it.

The one module that imports ``openvino`` (lazily: without it the backend reports why).
"""

from __future__ import annotations

import platform
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from ..package import EnginePackage, PackageError
from .base import Backend, BackendError, feed, feed_typed
from .registry import AUTO, OpenOptions

INSTALL_OPENVINO = "pip install openvino (or pip install -c requirements-lock.txt -e .)"

#: CPU architectures where ``auto`` prefers OpenVINO to ONNX Runtime's CPU provider (measured).
AUTO_MACHINES = ("x86_64", "amd64")
AUTO_RULE = (
    "on x86-64 CPUs OpenVINO took 0.65-0.75 of ONNX Runtime's CPU time on the shipped engines"
)

#: Compiled models kept per backend, one per distinct set of input shapes (least recent out).
CACHED_SHAPES = 4

Shapes = tuple[tuple[str, tuple[int, ...]], ...]


def import_openvino() -> Any:
    """The openvino module, or BackendError saying how to get it."""
    try:
        import openvino as ov
    except ImportError as e:
        raise BackendError(f"OpenVINO is not installed here ({e}); {INSTALL_OPENVINO}") from None
    return ov


def compile_config(threads: int | None) -> dict[str, Any]:
    """Compile settings: one stream tuned for latency, f32 as in training, threads unpinned.

    Unpinned because the acquisition, the receiver and the writer share the same few cores: a
    pinned inference thread cannot move off a core another process is busy on.
    """
    config: dict[str, Any] = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
        "ENABLE_CPU_PINNING": False,
    }
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


class OpenVinoBackend:
    """One OpenVINO model for one engine package, compiled for the CPU per input shape."""

    name = "openvino"
    device = "cpu"

    def __init__(self, package: EnginePackage, threads: int | None = None) -> None:
        if threads is not None and (isinstance(threads, bool) or threads < 1):
            raise BackendError(f"threads must be >= 1 or None (openvino decides), got {threads}")
        ov = import_openvino()
        self.package = package
        self.threads = threads
        self._ov = ov
        self._core = ov.Core()
        self._config = compile_config(threads)
        where = package.path / package.manifest.model
        try:
            self._model: Any = self._core.read_model(package.read(package.manifest.model))
        except Exception as e:  # openvino raises its own untyped errors
            raise BackendError(f"openvino could not read {where}: {e}") from e
        self._inputs = [i.get_any_name() for i in self._model.inputs]
        self._check_io()
        types = package.manifest.io_dtypes
        self._dtypes = {n: np.dtype(types[n]) for n in self._inputs}
        self._output_dtype = np.dtype(types["output"])
        self._compiled: OrderedDict[Shapes, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False
        try:  # compile once now, so a model OpenVINO cannot run fails here, not on a frame
            self.effective_threads = int(
                self._core.compile_model(self._model, "CPU", self._config).get_property(
                    "INFERENCE_NUM_THREADS"
                )
            )
        except Exception as e:
            raise BackendError(f"openvino could not compile {where} for the CPU: {e}") from e

    def _check_io(self) -> None:
        """The model's inputs must be the rank-4 tensors the manifest promises (float32, or the
        raw dtype where ``io`` is "raw")."""
        manifest = self.package.manifest
        if sorted(self._inputs) != sorted(manifest.input_names):
            raise PackageError(
                f"model of {manifest.name!r} has inputs {self._inputs} but its manifest implies "
                f"{manifest.input_names}: re-export the model with those input names or fix "
                "manifest.temporal"
            )
        types = manifest.io_dtypes
        ports = [*((p, types[p.get_any_name()]) for p in self._model.inputs),
                 *((p, types["output"]) for p in self._model.outputs[:1])]  # fmt: skip
        for port, want in ports:
            shape = port.get_partial_shape()
            rank = shape.rank
            got = port.get_element_type().get_type_name()
            if got != _OV_TYPES[want] or rank.is_dynamic or len(shape) != 4:
                raise PackageError(
                    f"model of {manifest.name!r}: {port.get_any_name()!r} is {got} {shape}, but "
                    f"this engine (io {manifest.io!r}) takes and returns {want} (N, C, H, W): "
                    "re-export the model (or remake it with `scopecast engines raw-io`)"
                )

    def _request(self, shapes: Shapes) -> Any:
        """An infer request of the model compiled for ``shapes`` (compiled on first use)."""
        request = self._compiled.get(shapes)
        if request is not None:
            self._compiled.move_to_end(shapes)
            return request
        model = self._model.clone()
        model.reshape({name: list(shape) for name, shape in shapes})
        request = self._core.compile_model(model, "CPU", self._config).create_infer_request()
        self._compiled[shapes] = request
        while len(self._compiled) > CACHED_SHAPES:
            self._compiled.popitem(last=False)
        return request

    def infer(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Run the model on the inputs it has (others are ignored) and return its first output
        (float32; a raw-io package's output in its own dtype)."""
        return self.infer_outputs(inputs, first_only=True)[0]

    def infer_outputs(
        self, inputs: dict[str, np.ndarray], *, first_only: bool = False
    ) -> list[np.ndarray]:
        """Every output of the model (a raw-io package's ``checksum`` second)."""
        manifest = self.package.manifest
        name = manifest.name
        if self._closed:
            raise BackendError(f"backend for {name!r} is closed")
        if manifest.io == "float":
            arrays = feed(name, self._inputs, inputs)
        else:
            arrays = feed_typed(name, self._dtypes, inputs)
        shapes = tuple((n, a.shape) for n, a in arrays.items())
        count = 1 if first_only else len(self._model.outputs)
        with self._lock:
            try:
                request = self._request(shapes)
                request.infer(arrays)
                outs = [request.get_output_tensor(i).data for i in range(count)]
            except Exception as e:  # openvino raises its own untyped errors
                raise BackendError(f"engine {name!r} failed on inputs {dict(shapes)}: {e}") from e
            # copies: the request reuses its buffers
            return [np.array(outs[0], dtype=self._output_dtype),
                    *(np.array(o) for o in outs[1:])]  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """What runs this engine: backend, device, threads, precision, version and model I/O."""
        return {
            "name": self.name,
            "device": self.device,
            "engine": self.package.manifest.name,
            "cpu": _cpu_name(self._core),
            "threads": self.threads,
            "effective_threads": self.effective_threads,
            "inference_precision": "f32",
            "compiled_shapes": len(self._compiled),
            "versions": {"openvino": _version(self._ov)},
            "inputs": [_port(p) for p in self._model.inputs],
            "outputs": [_port(p) for p in self._model.outputs],
        }

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._compiled.clear()

    def __enter__(self) -> OpenVinoBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_OV_TYPES = {"float32": "f32", "uint16": "u16", "uint8": "u8"}


def _port(port: Any) -> dict[str, Any]:
    shape = [str(d) if d.is_dynamic else d.get_length() for d in port.get_partial_shape()]
    return {"name": port.get_any_name(), "type": port.get_element_type().get_type_name(),
            "shape": shape}  # fmt: skip


def _version(ov: Any) -> str:
    return str(ov.get_version()).split("-")[0]


def _cpu_name(core: Any) -> str:
    try:
        return str(core.get_property("CPU", "FULL_DEVICE_NAME"))
    except Exception:  # noqa: BLE001 - a name for reports only
        return platform.processor() or platform.machine()


def _gpu_provider() -> str | None:
    """The GPU execution provider ONNX Runtime offers here, if any (it goes before OpenVINO)."""
    try:
        from .onnxruntime import available_providers
    except ImportError:
        return None
    gpu = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    return next((p for p in gpu if p in available_providers()), None)


def auto_declines(machine: str | None = None, gpu_provider: str | None = None) -> str | None:
    """Why ``auto`` leaves OpenVINO to the next backend here, or None when it takes it: a CPU
    it was not measured faster on, or an ONNX Runtime GPU provider (pure: tests pass values)."""
    machine = (machine if machine is not None else platform.machine()).lower()
    if machine not in AUTO_MACHINES:
        return (
            f"auto prefers OpenVINO only on x86-64 CPUs ({AUTO_RULE}); this CPU is {machine!r}: "
            "name --backend openvino to use it here"
        )
    if gpu_provider is not None:
        return f"onnxruntime offers {gpu_provider} here; a GPU goes before OpenVINO's CPU"
    return None


def auto_here(options: OpenOptions | None = None) -> str | None:
    """Why ``auto`` does not take OpenVINO on this machine, or None when it does (before ONNX
    Runtime; TensorRT, where it runs, still goes first)."""
    return unavailable(options or OpenOptions()) or auto_declines(gpu_provider=_gpu_provider())


# -- the registry's functions (``registry``'s "openvino" row) --------------------------------


def open_openvino(
    package: EnginePackage, requested: str, options: OpenOptions
) -> tuple[Backend, str]:
    """Open OpenVINO on the CPU for ``package``. For ``auto`` only where ``auto_declines`` has
    no objection (else BackendError with its reason, and ``auto`` goes on)."""
    if requested == AUTO and (why := auto_declines(gpu_provider=_gpu_provider())):
        raise BackendError(why)
    backend = OpenVinoBackend(package, threads=options.threads)
    threads = f"{backend.effective_threads} threads" + (
        "" if options.threads is not None else " (openvino's choice)"
    )
    head = f"{requested}: openvino {_version(backend._ov)} on CPU ({_cpu_name(backend._core)}), "
    if requested == AUTO:
        return backend, f"{head}{threads}; before ONNX Runtime's CPU provider: {AUTO_RULE}"
    return backend, f"{head}{threads}, as requested"


def unavailable(options: OpenOptions) -> str | None:
    """None when openvino imports and offers its CPU device, else the reason."""
    try:
        ov = import_openvino()
        devices = ov.Core().available_devices
    except BackendError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - a broken install is a reason, not a crash
        return f"openvino does not start here ({type(e).__name__}: {e}); {INSTALL_OPENVINO}"
    if "CPU" not in devices:
        return f"openvino offers no CPU device here (devices: {devices or 'none'})"
    return None


def status(options: OpenOptions) -> str:
    ov = import_openvino()
    core = ov.Core()
    return f"openvino {_version(ov)} (CPU: {_cpu_name(core)})"
