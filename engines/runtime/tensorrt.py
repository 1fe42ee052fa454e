"""TensorRT backend: builds serialized plans and runs them with pycuda. The one module that
imports tensorrt and pycuda (lazily, with a message naming the ``gpu`` extra when missing).

Running a plan: page-locked host buffers, device buffers and three CUDA streams (upload,
compute, download) with events between them. ``submit`` enqueues one batch and returns at
once; ``result`` waits for it. With two buffer slots the upload of batch k+1 overlaps the
compute of batch k and the download of batch k-1; ``infer`` is ``result(submit(x))``.
Optionally the compute step is captured once per slot and shape as a CUDA graph and replayed.
Every call runs in the GPU's primary context, the one the CUDA runtime (and torch) use, so a
process that also runs torch shares one context and one memory pool.

Written to the TensorRT 10.x and 11.x Python API (11 is always strongly typed and has no
FP16/INT8 builder flags: precision comes from the ONNX). Not yet run on a GPU: its tests skip
with the reason where TensorRT or a CUDA driver is missing.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

import numpy as np

from ..package import EnginePackage, PackageError, PlanInfo
from .base import Backend, BackendError, feed
from .plans import (
    INSTALL_TENSORRT,
    MachineFacts,
    Profile,
    ShapeRange,
    fit_fixed_dims,
    needed_shapes,
    profile_for,
    select_plan,
)
from .registry import OpenOptions

T = TypeVar("T")

GPU_EXTRA = "pip install -e '.[gpu]'"


def import_tensorrt() -> Any:
    """The tensorrt module, or BackendError saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendError(f"TensorRT is not installed here ({e}); {INSTALL_TENSORRT}") from None
    except OSError as e:  # the bindings wheel without NVIDIA's libraries
        raise BackendError(
            f"TensorRT's Python bindings are installed but its libraries do not load ({e}); "
            f"install the full TensorRT ({GPU_EXTRA}) from NVIDIA's index on a GPU machine"
        ) from None
    if _major(trt) < 10:
        raise BackendError(
            f"TensorRT {trt.__version__} is too old: scopecast builds and runs plans with "
            f"TensorRT 10 or 11 ({GPU_EXTRA})"
        )
    return trt


def import_pycuda() -> Any:
    """pycuda.driver, initialized, or BackendError saying what is missing."""
    try:
        import pycuda.driver as cuda
    except ImportError as e:
        if "pycuda" in str(e) and "No module" in str(e):
            raise BackendError(f"pycuda is not installed ({e}); {INSTALL_TENSORRT}") from None
        raise BackendError(
            f"pycuda cannot load the CUDA driver ({e}): no NVIDIA driver on this machine"
        ) from None
    try:
        cuda.init()
        if cuda.Device.count() < 1:
            raise BackendError("the CUDA driver reports no GPU on this machine")
    except cuda.Error as e:
        raise BackendError(f"CUDA driver initialization failed: {e}") from None
    return cuda


def _major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


@functools.cache
def gather_machine_facts() -> MachineFacts:
    """TensorRT version, GPU 0's name and compute capability, or the reason there are none."""
    try:
        trt = import_tensorrt()
        cuda = import_pycuda()
        device = cuda.Device(0)
        major, minor = device.compute_capability()
        return MachineFacts(
            tensorrt=str(trt.__version__), gpu=str(device.name()),
            compute_capability=f"{major}.{minor}",
        )  # fmt: skip
    except BackendError as e:
        return MachineFacts(problem=str(e))


def machine_facts(refresh: bool = False) -> MachineFacts:
    """This machine's TensorRT version, GPU and compute capability (or why there are none).

    Imports tensorrt and pycuda on first use only.
    """
    if refresh:
        gather_machine_facts.cache_clear()
    return gather_machine_facts()


# -- the registry's functions (``registry``'s "tensorrt" row) --------------------------------


def open_tensorrt(
    package: EnginePackage, requested: str, options: OpenOptions
) -> tuple[Backend, str]:
    """The native TensorRT backend for ``package``: a matching plan, or one rebuilt (timed,
    numerics-checked) from the package's ONNX by ``options.rebuild``; BackendError says why
    neither works here.

    ``options.precision`` picks the plan's precision (None: the package's first plan that fits
    this machine); ``options.facts`` replaces this machine's facts (tests). Without
    ``options.rebuild`` (the offline build code, which the runtime never imports) a plan missing
    for this GPU is a BackendError naming the command that makes one.
    """
    facts = options.facts or machine_facts()
    if not facts.usable:
        raise BackendError(facts.problem)
    m = package.manifest
    choice = select_plan(
        m, facts, precision=options.precision, shapes=needed_shapes(m),
        build_missing=requested == "tensorrt",
    )  # fmt: skip
    if choice.action == "fallback":
        raise BackendError(choice.reason)
    if choice.action == "use":
        assert choice.plan is not None
        plan = choice.plan
        return _gpu(lambda: TensorRtBackend(package, plan)), (
            f"{requested}: TensorRT {plan.precision} plan on {facts.gpu}; {choice.reason}"
        )
    rebuild = options.rebuild
    if rebuild is None:
        raise BackendError(
            f"no TensorRT plan for this GPU in the package; `scopecast build {m.name} "
            f"--precision {choice.precision}` makes one ({choice.reason})"
        )
    rebuilt = _gpu(lambda: rebuild(package, choice))
    backend = _gpu(
        lambda: TensorRtBackend(rebuilt.package, rebuilt.plan, plan_bytes=rebuilt.plan_bytes)
    )
    return backend, (
        f"{requested}: TensorRT {rebuilt.plan.precision} plan on {facts.gpu}, rebuilt in "
        f"{rebuilt.seconds:.1f} s and checked ({rebuilt.report.summary()}), {rebuilt.saved}; "
        f"{choice.reason}"
    )


def unavailable(options: OpenOptions) -> str | None:
    facts = options.facts or machine_facts()
    return None if facts.usable else (facts.problem or "TensorRT facts incomplete")


def status(options: OpenOptions) -> str:
    facts = options.facts or machine_facts()
    return f"{facts.describe()}, plans run with pycuda"


def _gpu(step: Callable[[], T]) -> T:
    """Run a GPU step (build, open), turning driver and TensorRT failures into BackendError."""
    try:
        return step()
    except BackendError:
        raise
    except Exception as e:  # pycuda and tensorrt raise their own error types; a plan's I/O
        raise BackendError(f"the TensorRT backend did not start: {type(e).__name__}: {e}") from e


def _logger(trt: Any) -> Any:
    return trt.Logger(trt.Logger.WARNING)


@contextmanager
def _primary_context(cuda: Any) -> Iterator[Any]:
    """GPU 0's primary context, current for the block; released afterwards."""
    ctx = cuda.Device(0).retain_primary_context()
    ctx.push()
    try:
        yield ctx
    finally:
        cuda.Context.pop()
        ctx.detach()


def build_serialized_plan(
    onnx: bytes,
    profiles: Sequence[Profile],
    precision: str,
    *,
    workspace_mb: int = 1024,
    timing_cache: Path | None = None,
) -> tuple[bytes, list[Profile], list[str]]:
    """ONNX bytes -> a serialized plan for this GPU; also the profiles as built and notes.

    Precision comes from the ONNX (fp16 weights and activations; int8 as Q/DQ nodes). On
    TensorRT 10 the FP16/INT8 builder flags are set as well; TensorRT 11 networks are always
    strongly typed. ``timing_cache`` is read if present and written back after the build.
    """
    trt = import_tensorrt()
    cuda = import_pycuda()
    major = _major(trt)
    notes: list[str] = []
    logger = _logger(trt)
    with _primary_context(cuda):
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode since 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(onnx):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(f"TensorRT's ONNX parser rejected the model: {errors}")
        inputs = [network.get_input(i) for i in range(network.num_inputs)]
        fixed = {t.name: list(t.shape) for t in inputs}
        for t in [*inputs, *(network.get_output(i) for i in range(network.num_outputs))]:
            if t.dtype != trt.float32:
                raise BackendError(
                    f"network tensor {t.name!r} is {t.dtype}, but engines take and return "
                    "float32: keep the I/O float32 (Cast nodes inside the model)"
                )
        try:
            fitted = [fit_fixed_dims(p, fixed) for p in profiles]
        except ValueError as e:
            raise BackendError(str(e)) from None
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
        flags = getattr(trt, "BuilderFlag", None)
        if major == 10 and precision in ("fp16", "int8") and flags is not None:
            config.set_flag(getattr(flags, precision.upper()))
            notes.append(f"TensorRT {trt.__version__}: {precision.upper()} builder flag set")
        elif precision != "fp32":
            notes.append(f"TensorRT {trt.__version__}: strongly typed, {precision} from the ONNX")
        for p in fitted:
            profile = builder.create_optimization_profile()
            for name, r in p.items():
                profile.set_shape(name, r.min, r.opt, r.max)
            config.add_optimization_profile(profile)
        cache = _load_timing_cache(config, timing_cache, notes)
        t0 = time.perf_counter()
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BackendError(
                "TensorRT could not build the plan (its log above says why); try more "
                "--workspace-mb or --precision fp32"
            )
        notes.append(f"built in {time.perf_counter() - t0:.1f} s")
        if timing_cache is not None and cache is not None:
            _atomic_write(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
        return bytes(memoryview(plan)), fitted, notes


def _load_timing_cache(config: Any, path: Path | None, notes: list[str]) -> Any:
    if path is None:
        return None
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        notes.append(f"timing cache {path} is from another GPU or version: starting a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=True)
    else:
        notes.append(
            f"timing cache {path} ({len(data)} bytes)" if data else f"new timing cache {path}"
        )
    return cache


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass
class _Buffer:
    """A page-locked host array and a device allocation of the same size, grown on demand."""

    host: Any = None
    device: Any = None
    capacity: int = 0  # float32 elements

    def ensure(self, cuda: Any, elements: int) -> bool:
        """Make room for ``elements``; True when the buffers moved (captured graphs go stale)."""
        if elements <= self.capacity:
            return False
        self.free()
        self.host = cuda.pagelocked_empty(elements, np.float32)
        self.device = cuda.mem_alloc(elements * 4)
        self.capacity = elements
        return True

    def free(self) -> None:
        if self.device is not None:
            self.device.free()
        if self.host is not None and hasattr(self.host.base, "free"):
            self.host.base.free()
        self.host = self.device = None
        self.capacity = 0


@dataclass
class _Slot:
    """One in-flight batch: its buffers, the events between the streams, and its ticket."""

    inputs: dict[str, _Buffer]
    outputs: dict[str, _Buffer]
    uploaded: Any
    computed: Any
    downloaded: Any
    ticket: int | None = None
    out_shape: tuple[int, ...] = ()
    graphs: dict[tuple, Any] = field(default_factory=dict)


class TensorRtBackend:
    """One deserialized plan on GPU 0, with double-buffered asynchronous inference."""

    name = "tensorrt"

    def __init__(
        self,
        package: EnginePackage,
        plan: PlanInfo | None = None,
        *,
        plan_bytes: bytes | None = None,
        label: str | None = None,
        cuda_graph: bool = False,
        depth: int = 2,
    ) -> None:
        if plan is None and plan_bytes is None:
            raise BackendError("TensorRtBackend needs a PlanInfo from the package or plan bytes")
        if depth < 1:
            raise BackendError(f"depth {depth} must be >= 1 (2 overlaps upload, compute, download)")
        self.package = package
        self.plan = plan
        self.label = label or (plan.file if plan else "plan")
        self.device = "cuda"
        self._trt = import_tensorrt()
        self._cuda = cuda = import_pycuda()
        data = plan_bytes if plan_bytes is not None else package.read(plan.file if plan else "")
        self._lock = threading.RLock()
        self._ctx = cuda.Device(0).retain_primary_context()
        self._closed = False
        self._ticket = 0
        self._done: dict[int, np.ndarray] = {}
        self.cuda_graph = cuda_graph
        self.graph_problem = ""
        try:
            with self._current():
                self._setup(data, depth)
        except BaseException:
            self._ctx.detach()
            raise
        if cuda_graph and not hasattr(self._compute, "begin_capture"):
            self.cuda_graph = False
            self.graph_problem = "this pycuda has no stream capture (needs pycuda >= 2022.2)"

    # -- setup --------------------------------------------------------------------------------

    def _setup(self, data: bytes, depth: int) -> None:
        trt, cuda = self._trt, self._cuda
        self._runtime = trt.Runtime(_logger(trt))
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            raise BackendError(
                f"TensorRT {trt.__version__} could not load {self.label} of "
                f"{self.package.manifest.name!r}: it was built for another TensorRT version or "
                f"GPU; rebuild it (scopecast build {self.package.manifest.name})"
            )
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self._inputs = [n for n in names if self._engine.get_tensor_mode(n) == mode]
        self._outputs = [n for n in names if self._engine.get_tensor_mode(n) != mode]
        self._check_io()
        self._profiles = self._read_profiles()
        self._profile = 0
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._upload = cuda.Stream()
        self._compute = cuda.Stream()
        self._download = cuda.Stream()
        self._slots = [self._new_slot() for _ in range(depth)]

    @contextmanager
    def _current(self) -> Iterator[None]:
        self._ctx.push()
        try:
            yield
        finally:
            self._cuda.Context.pop()

    def _check_io(self) -> None:
        m = self.package.manifest
        if sorted(self._inputs) != sorted(m.input_names):
            raise PackageError(
                f"{self.label} of {m.name!r} has inputs {self._inputs} but its manifest implies "
                f"{m.input_names}: rebuild the plan from the package's ONNX"
            )
        if not self._outputs:
            raise PackageError(f"{self.label} of {m.name!r} has no output tensor")
        for name in [*self._inputs, *self._outputs]:
            dtype = self._engine.get_tensor_dtype(name)
            if dtype != self._trt.DataType.FLOAT:
                raise PackageError(
                    f"{self.label} of {m.name!r}: tensor {name!r} is {dtype}, but engines take "
                    "and return float32: rebuild it with scopecast build"
                )

    def _read_profiles(self) -> list[Profile]:
        out = []
        for i in range(self._engine.num_optimization_profiles):
            p = {}
            for name in self._inputs:
                lo, opt, hi = self._engine.get_tensor_profile_shape(name, i)
                p[name] = ShapeRange(min=tuple(lo), opt=tuple(opt), max=tuple(hi))
            out.append(p)
        return out

    def _new_slot(self) -> _Slot:
        cuda = self._cuda
        flags = cuda.event_flags.DISABLE_TIMING
        return _Slot(
            inputs={n: _Buffer() for n in self._inputs},
            outputs={n: _Buffer() for n in self._outputs},
            uploaded=cuda.Event(flags), computed=cuda.Event(flags), downloaded=cuda.Event(flags),
        )  # fmt: skip

    # -- running ------------------------------------------------------------------------------

    def _configure(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Select the optimization profile for ``shapes`` and set the input shapes."""
        index = profile_for(self._profiles, shapes)
        if index is None:
            ranges = "; ".join(
                ", ".join(f"{n} {r.min}..{r.max}" for n, r in p.items()) for p in self._profiles
            )
            raise BackendError(
                f"inputs {dict(shapes)} are outside every optimization profile of {self.label} "
                f"({ranges}); rebuild with scopecast build {self.package.manifest.name} "
                "--tile/--batch/--max-size covering them"
            )
        if index != self._profile:
            self._context.set_optimization_profile_async(index, self._compute.handle)
            self._profile = index
            self._shapes = {}
        for name, shape in shapes.items():
            if self._shapes.get(name) != shape:
                if not self._context.set_input_shape(name, shape):
                    raise BackendError(f"TensorRT refused shape {shape} for input {name!r}")
                self._shapes[name] = shape

    def submit(self, inputs: dict[str, np.ndarray]) -> int:
        """Enqueue one batch (upload, compute, download) and return a ticket for ``result``."""
        with self._lock:
            if self._closed:
                raise BackendError(f"backend for {self.package.manifest.name!r} is closed")
            arrays = feed(self.package.manifest.name, self._inputs, inputs)
            ticket = self._ticket
            self._ticket += 1
            slot = self._slots[ticket % len(self._slots)]
            with self._current():
                if slot.ticket is not None:  # an uncollected result: keep a copy
                    self._done[slot.ticket] = self._collect(slot)
                self._enqueue(slot, arrays)
            slot.ticket = ticket
            return ticket

    def _enqueue(self, slot: _Slot, arrays: dict[str, np.ndarray]) -> None:
        cuda, ctx = self._cuda, self._context
        shapes = {n: tuple(a.shape) for n, a in arrays.items()}
        self._configure(shapes)
        moved = False
        for name, a in arrays.items():
            buf = slot.inputs[name]
            moved |= buf.ensure(cuda, a.size)
            host = buf.host[: a.size]
            np.copyto(host, a.reshape(-1))
            cuda.memcpy_htod_async(buf.device, host, self._upload)
        out_shapes = {n: tuple(ctx.get_tensor_shape(n)) for n in self._outputs}
        for name, shape in out_shapes.items():
            if any(s < 0 for s in shape):
                raise BackendError(f"output {name!r} has unresolved shape {shape} after setup")
            moved |= slot.outputs[name].ensure(cuda, int(np.prod(shape)))
        if moved:
            slot.graphs.clear()
        slot.uploaded.record(self._upload)
        self._compute.wait_for_event(slot.uploaded)
        for name, buf in [*slot.inputs.items(), *slot.outputs.items()]:
            ctx.set_tensor_address(name, int(buf.device))
        self._execute(slot, (self._profile, tuple(sorted(shapes.items()))))
        slot.computed.record(self._compute)
        self._download.wait_for_event(slot.computed)
        first = self._outputs[0]
        slot.out_shape = out_shapes[first]
        out = slot.outputs[first]
        cuda.memcpy_dtoh_async(out.host[: int(np.prod(slot.out_shape))], out.device, self._download)
        slot.downloaded.record(self._download)

    def _execute(self, slot: _Slot, key: tuple) -> None:
        """Run the plan on the compute stream: replay a captured graph, capture one, or enqueue."""
        graph = slot.graphs.get(key) if self.cuda_graph else None
        if graph is not None:
            graph.launch(self._compute)
            return
        if self.cuda_graph and key in slot.graphs:  # second call with this key: capture it
            try:
                self._compute.begin_capture()
                ok = self._context.execute_async_v3(self._compute.handle)
                captured = self._compute.end_capture()
                if not ok:
                    raise BackendError("execute_async_v3 failed during capture")
                slot.graphs[key] = captured.instantiate()
                slot.graphs[key].launch(self._compute)
                return
            except Exception as e:  # noqa: BLE001 - capture is an optimization: run without it
                self.cuda_graph = False
                self.graph_problem = f"CUDA graph capture failed ({e}); running without graphs"
                slot.graphs.clear()
        elif self.cuda_graph:
            slot.graphs[key] = None  # first call is the warm-up TensorRT asks for
        if not self._context.execute_async_v3(self._compute.handle):
            raise BackendError(f"TensorRT execute_async_v3 failed for {self.label}")

    def _collect(self, slot: _Slot) -> np.ndarray:
        slot.downloaded.synchronize()
        n = int(np.prod(slot.out_shape))
        out = slot.outputs[self._outputs[0]].host[:n].reshape(slot.out_shape).copy()
        slot.ticket = None
        return out

    def result(self, ticket: int) -> np.ndarray:
        """The output of ``submit``'s ``ticket`` (float32), waiting for it if needed."""
        with self._lock:
            if ticket in self._done:
                return self._done.pop(ticket)
            for slot in self._slots:
                if slot.ticket == ticket:
                    with self._current():
                        return self._collect(slot)
            raise BackendError(f"no pending result for ticket {ticket} (already collected?)")

    def infer(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Run the plan on the inputs it has (others are ignored) and return its first output."""
        return self.result(self.submit(inputs))

    def describe(self) -> dict[str, Any]:
        """What runs this engine: plan, its tags, profiles, GPU, versions and pipelining."""
        p = self.plan
        return {
            "name": self.name,
            "device": self.device,
            "engine": self.package.manifest.name,
            "plan": self.label,
            "precision": p.precision if p else None,
            "built_for": (
                {"tensorrt": p.tensorrt, "gpu": p.gpu, "compute_capability": p.compute_capability}
                if p
                else None
            ),
            "gpu": gather_machine_facts().gpu,
            "profiles": [
                {n: {"min": r.min, "opt": r.opt, "max": r.max} for n, r in prof.items()}
                for prof in self._profiles
            ],
            "inputs": list(self._inputs),
            "outputs": list(self._outputs),
            "buffers": len(self._slots),
            "cuda_graph": self.cuda_graph,
            "cuda_graph_problem": self.graph_problem or None,
            "context": "primary" + (" (shared with torch)" if "torch" in sys.modules else ""),
            "versions": {"tensorrt": str(self._trt.__version__)},
        }

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with self._current():
                for stream in (self._upload, self._compute, self._download):
                    stream.synchronize()
                for slot in self._slots:
                    slot.graphs.clear()
                    for buf in [*slot.inputs.values(), *slot.outputs.values()]:
                        buf.free()
                self._done.clear()
                del self._context, self._engine, self._runtime
            self._ctx.detach()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
