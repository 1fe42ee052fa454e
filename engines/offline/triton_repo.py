"""Export engine packages as a Triton Inference Server model repository.

``export_repository`` writes, for each package, the layout Triton loads::

    REPO/<name>/config.pbtxt         platform onnxruntime_onnx (or backend python, see below)
    REPO/<name>/1/model.onnx         the package's hash-verified ONNX
    REPO/<name>/manifest.json        the scopecast manifest (provenance, normalization, tiles)
    REPO/<name>-tensorrt/...         only when the package has TensorRT plans: platform
                                     tensorrt_plan, one ``model.smXY.plan`` per GPU kind, picked
                                     by Triton through ``cc_model_filenames``

The config carries the model's real input and output names, dtypes and dims (dynamic sides as
-1); a batch dimension the ONNX leaves free becomes ``max_batch_size`` with dynamic batching and
a queue delay bound short enough for live use (the default 500 us is 1 % of a 20 fps frame).
``parameters`` carry ``scopecast.onnx_sha256`` and the manifest's name and version, so the
``triton`` backend can check that Triton serves the very ONNX of the package it was given.

``runtime="python"`` writes a Python-backend model instead (``1/model.py`` running the ONNX with
onnxruntime inside Triton): for Triton builds without the ONNX Runtime backend, such as the
``tritonserver`` that the ``nvidia-pytriton`` wheel ships. It batches the requests Triton's
dynamic batcher hands it in one session run.

Every config written is parsed back with Triton's own protobuf definitions (``tritonclient``'s
``model_config_pb2``): ``validate_config``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibration.errors import InvalidInput, MissingExtra

from ..package import MANIFEST, EnginePackage, PackageError, load_package

INSTALL = "pip install 'tritonclient[grpc]' (the triton extra)"
RUNTIMES = ("onnxruntime", "python")
DEVICES = ("gpu", "cpu")
VERSION = "1"  # the one model version written
TENSORRT_SUFFIX = "-tensorrt"
SHA_PARAMETER = "scopecast.onnx_sha256"
MAX_QUEUE_DELAY_US = 100_000  # beyond 0.1 s of queueing a "live" bound means nothing

# ONNX TensorProto element types -> Triton data types (model_config.proto's DataType names)
_ONNX_TO_TRITON = {
    1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16",
    6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64",
    12: "TYPE_UINT32", 13: "TYPE_UINT64", 16: "TYPE_BF16",
}  # fmt: skip


def _pb() -> tuple[Any, Any]:
    """Triton's ``model_config_pb2`` and protobuf's ``text_format``; MissingExtra without them."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise MissingExtra(
            f"exporting a Triton model repository needs tritonclient ({e}): {INSTALL}"
        ) from e
    return model_config_pb2, text_format


@dataclass(frozen=True)
class Tensor:
    """One model input or output as Triton sees it."""

    name: str
    data_type: str  # TYPE_FP32, ...
    dims: tuple[int, ...]  # without the batch dimension when the model is batched; -1: dynamic


@dataclass(frozen=True)
class ExportedModel:
    """One Triton model written to the repository."""

    name: str
    path: Path
    platform: str  # onnxruntime_onnx, python or tensorrt_plan
    max_batch_size: int
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    files: tuple[str, ...]  # under path, relative


@dataclass(frozen=True)
class ExportOptions:
    """How the models are served: see ``scopecast engines export-triton --help``."""

    max_batch: int = 8
    queue_delay_us: int = 500
    device: str = "gpu"
    instances: int = 1
    gpus: tuple[int, ...] = ()
    runtime: str = "onnxruntime"

    def check(self) -> None:
        if self.max_batch < 0:
            raise InvalidInput(f"--max-batch {self.max_batch}: give 0 (no batching) or more")
        if not 0 <= self.queue_delay_us <= MAX_QUEUE_DELAY_US:
            raise InvalidInput(
                f"--queue-delay-us {self.queue_delay_us}: give 0 to {MAX_QUEUE_DELAY_US} "
                "(a 20 fps frame lasts 50000 us; a few hundred keep batching cheap)"
            )
        if self.device not in DEVICES:
            raise InvalidInput(f"--device {self.device!r}: choose one of {', '.join(DEVICES)}")
        if self.instances < 1:
            raise InvalidInput(f"--instances {self.instances}: give 1 or more")
        if self.runtime not in RUNTIMES:
            raise InvalidInput(f"--runtime {self.runtime!r}: choose one of {', '.join(RUNTIMES)}")
        if self.gpus and self.device != "gpu":
            raise InvalidInput(f"--gpu {list(self.gpus)} needs --device gpu")
        if any(g < 0 for g in self.gpus):
            raise InvalidInput(f"--gpu {list(self.gpus)}: GPU indices are 0 or more")


def model_io(package: EnginePackage) -> tuple[list[Tensor], list[Tensor], bool]:
    """The ONNX's graph inputs and outputs with full dims (batch included), and whether every
    one of them has a free first dimension (so Triton may batch requests along it)."""
    import onnx

    model = onnx.load_model_from_string(package.read(package.manifest.model))
    initializers = {i.name for i in model.graph.initializer}

    def tensors(values: Any) -> list[Tensor]:
        found = []
        for v in values:
            if v.name in initializers:
                continue
            t = v.type.tensor_type
            dtype = _ONNX_TO_TRITON.get(t.elem_type)
            if dtype is None:
                raise PackageError(
                    f"model of {package.name!r}: {v.name!r} has ONNX element type {t.elem_type}, "
                    "which Triton cannot serve"
                )
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            found.append(Tensor(v.name, dtype, dims))
        return found

    inputs, outputs = tensors(model.graph.input), tensors(model.graph.output)
    expected = package.manifest.input_names
    if sorted(i.name for i in inputs) != sorted(expected):
        raise PackageError(
            f"model of {package.name!r} has inputs {[i.name for i in inputs]} but its manifest "
            f"implies {expected}: re-export the model"
        )
    if not outputs:
        raise PackageError(f"model of {package.name!r} has no outputs")
    batchable = all(t.dims and t.dims[0] == -1 for t in [*inputs, *outputs])
    return inputs, outputs, batchable


def _config(
    name: str,
    inputs: Sequence[Tensor],
    outputs: Sequence[Tensor],
    max_batch: int,
    options: ExportOptions,
    parameters: dict[str, str],
    *,
    platform: str | None = None,
    backend: str | None = None,
    kind: str | None = None,
    cc_files: dict[str, str] | None = None,
) -> Any:
    pb, _ = _pb()
    config = pb.ModelConfig(name=name, max_batch_size=max_batch)
    if platform:
        config.platform = platform
    if backend:
        config.backend = backend
    for source, target in ((inputs, config.input), (outputs, config.output)):
        for t in source:
            dims = t.dims[1:] if max_batch else t.dims
            target.add(name=t.name, data_type=pb.DataType.Value(t.data_type), dims=list(dims))
    if max_batch:
        config.dynamic_batching.max_queue_delay_microseconds = options.queue_delay_us
    group = config.instance_group.add(count=options.instances)
    group.kind = pb.ModelInstanceGroup.Kind.Value(kind or f"KIND_{options.device.upper()}")
    if options.gpus and group.kind == pb.ModelInstanceGroup.Kind.Value("KIND_GPU"):
        group.gpus.extend(options.gpus)
    for cc, file in (cc_files or {}).items():
        config.cc_model_filenames[cc] = file
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


def config_text(config: Any) -> str:
    """A ModelConfig as the text Triton reads from config.pbtxt."""
    _, text_format = _pb()
    return str(text_format.MessageToString(config))


def validate_config(path: Path, *, name: str | None = None) -> Any:
    """Parse a config.pbtxt with Triton's protobuf definitions; return the ModelConfig.
    PackageError naming the file and the problem when it does not parse or is inconsistent.
    ``name``: the model name expected (default: the config's folder name, as Triton wants)."""
    pb, text_format = _pb()
    try:
        config = text_format.Parse(Path(path).read_text(), pb.ModelConfig())
    except (text_format.ParseError, OSError, UnicodeDecodeError) as e:
        raise PackageError(f"{path} is not a valid Triton model config: {e}") from None
    problems = []
    expected = name or Path(path).parent.name
    if config.name != expected:
        problems.append(f"name {config.name!r} is not the model folder's {expected!r}")
    if not (config.platform or config.backend):
        problems.append("neither platform nor backend is set")
    if not config.input or not config.output:
        problems.append("inputs or outputs missing")
    if config.HasField("dynamic_batching") and config.max_batch_size < 1:
        problems.append("dynamic_batching needs max_batch_size >= 1")
    for t in [*config.input, *config.output]:
        if not t.dims or any(d < -1 or d == 0 for d in t.dims):
            problems.append(f"{t.name!r} has dims {list(t.dims)}")
    if problems:
        raise PackageError(f"{path}: {'; '.join(problems)}")
    return config


def _parameters(package: EnginePackage) -> dict[str, str]:
    m = package.manifest
    return {
        "scopecast.engine": m.name,
        "scopecast.version": m.version,
        SHA_PARAMETER: m.files[m.model],
        "scopecast.scale": str(m.scale),
        "scopecast.normalization": json.dumps(m.normalization.model_dump(mode="json")),
    }


def _plan_batch(plans: Sequence[Any], fallback: int) -> int:
    """The largest batch every plan's every profile accepts on every input (its max's first
    dim), or ``fallback`` when the plans record no profiles."""
    sizes = [
        int(shape["max"][0])
        for plan in plans
        for profile in plan.profiles
        for shape in profile.values()
        if isinstance(shape, dict) and shape.get("max")
    ]
    return min(sizes) if sizes else fallback


def _write_model(
    repository: Path,
    name: str,
    config: Any,
    files: dict[str, bytes],
    manifest: bytes,
) -> Path:
    """Write one model folder, replacing an earlier export of it; refuse to replace a folder
    this exporter did not write (no scopecast manifest in it)."""
    target = repository / name
    if target.exists() and not (target / MANIFEST).is_file():
        raise InvalidInput(
            f"{target} exists and is not a scopecast export (no {MANIFEST}): remove it or choose "
            "another --repository"
        )
    repository.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repository))
    try:
        (staging / VERSION).mkdir()
        for file, data in files.items():
            (staging / VERSION / file).write_bytes(data)
        (staging / MANIFEST).write_bytes(manifest)
        (staging / "config.pbtxt").write_text(config_text(config))
        validate_config(staging / "config.pbtxt", name=name)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def export_package(
    package: EnginePackage, repository: Path, options: ExportOptions
) -> list[ExportedModel]:
    """Write ``package`` into ``repository``: its ONNX model and, when it has TensorRT plans,
    a ``-tensorrt`` model with them. Returns what was written."""
    m = package.manifest
    inputs, outputs, batchable = model_io(package)
    max_batch = options.max_batch if batchable else 0
    params = _parameters(package)
    manifest = (package.path / MANIFEST).read_bytes()
    written = []
    if options.runtime == "python":
        files = {"model.onnx": package.read(m.model), "model.py": PYTHON_MODEL.encode()}
        config = _config(m.name, inputs, outputs, max_batch, options, params, backend="python")
        platform = "python"
    else:
        files = {"model.onnx": package.read(m.model)}
        config = _config(
            m.name, inputs, outputs, max_batch, options, params, platform="onnxruntime_onnx"
        )
        platform = "onnxruntime_onnx"
    path = _write_model(repository, m.name, config, files, manifest)
    written.append(_exported(m.name, path, platform, max_batch, inputs, outputs, files))
    if m.plans:
        chosen: dict[str, Any] = {}
        for plan in m.plans:  # one plan per compute capability; the manifest's precision first
            have = chosen.get(plan.compute_capability)
            if have is None or (have.precision != m.precision and plan.precision == m.precision):
                chosen[plan.compute_capability] = plan
        plan_files = {
            f"model.sm{cc.replace('.', '')}.plan": package.read(p.file) for cc, p in chosen.items()
        }
        cc_files = {cc: f"model.sm{cc.replace('.', '')}.plan" for cc in chosen}
        plan_batch = _plan_batch(list(chosen.values()), m.tile.batch) if batchable else 0
        plan_params = {
            **params,
            "scopecast.tensorrt": ",".join(sorted({p.tensorrt for p in chosen.values()})),
        }
        name = f"{m.name}{TENSORRT_SUFFIX}"
        config = _config(
            name, inputs, outputs, min(plan_batch, options.max_batch) if max_batch else 0,
            options, plan_params, platform="tensorrt_plan", kind="KIND_GPU", cc_files=cc_files,
        )  # fmt: skip
        path = _write_model(repository, name, config, plan_files, manifest)
        written.append(
            _exported(name, path, "tensorrt_plan", config.max_batch_size, inputs, outputs,
                      plan_files)
        )  # fmt: skip
    return written


def _exported(
    name: str,
    path: Path,
    platform: str,
    max_batch: int,
    inputs: Sequence[Tensor],
    outputs: Sequence[Tensor],
    files: dict[str, bytes],
) -> ExportedModel:
    def strip(ts: Sequence[Tensor]) -> tuple[Tensor, ...]:
        return tuple(Tensor(t.name, t.data_type, t.dims[1:] if max_batch else t.dims) for t in ts)

    return ExportedModel(
        name=name,
        path=path,
        platform=platform,
        max_batch_size=max_batch,
        inputs=strip(inputs),
        outputs=strip(outputs),
        files=tuple(sorted([f"{VERSION}/{f}" for f in files] + ["config.pbtxt", MANIFEST])),
    )


def export_repository(
    targets: Sequence[str | Path], repository: Path, options: ExportOptions | None = None
) -> list[ExportedModel]:
    """Load (hash-verify) every package, then write each into ``repository``."""
    options = options or ExportOptions()
    options.check()
    if not targets:
        raise InvalidInput("give at least one engine (name or package folder)")
    packages = [load_package(t) for t in targets]
    names = [p.name for p in packages]
    if len(set(names)) != len(names):
        raise InvalidInput(f"engines {names}: two packages share a name; Triton needs one each")
    _pb()
    repository = Path(repository)
    if repository.exists() and not repository.is_dir():
        raise InvalidInput(f"--repository {repository} exists and is not a folder")
    return [model for p in packages for model in export_package(p, repository, options)]


# The Python-backend model (``--runtime python``): the package's ONNX run by onnxruntime inside
# Triton. Triton's dynamic batcher groups only requests whose shapes agree, so one session run
# takes them all; rows are split back per request.
PYTHON_MODEL = '''"""A scopecast engine on Triton's Python backend: model.onnx run by onnxruntime.
Written by `scopecast engines export-triton --runtime python`; do not edit."""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        here = os.path.join(args["model_repository"], args["model_version"])
        options = ort.SessionOptions()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        threads = config.get("parameters", {}).get("threads", {}).get("string_value")
        if threads:
            options.intra_op_num_threads = int(threads)
        providers = ["CPUExecutionProvider"]
        if (
            args.get("model_instance_kind") == "GPU"
            and "CUDAExecutionProvider" in ort.get_available_providers()
        ):
            device = int(args.get("model_instance_device_id", 0))
            providers = [("CUDAExecutionProvider", {"device_id": device}), *providers]
        self.session = ort.InferenceSession(
            os.path.join(here, "model.onnx"), options, providers=providers
        )
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        self.batched = config.get("max_batch_size", 0) > 0

    def _run(self, feeds):
        return self.session.run(self.outputs, feeds)

    def execute(self, requests):
        feeds = [
            {n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs}
            for r in requests
        ]
        same = all(
            f[n].shape[1:] == feeds[0][n].shape[1:] for f in feeds for n in self.inputs
        )
        if self.batched and len(feeds) > 1 and same:
            try:
                outs = self._run({n: np.concatenate([f[n] for f in feeds]) for n in self.inputs})
            except Exception as e:
                error = pb_utils.TritonError(f"onnxruntime: {e}")
                return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in feeds]
            bounds = np.cumsum([f[self.inputs[0]].shape[0] for f in feeds])[:-1]
            parts = [np.split(o, bounds) for o in outs]
            return [
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor(n, np.ascontiguousarray(p[i]))
                        for n, p in zip(self.outputs, parts)
                    ]
                )
                for i in range(len(feeds))
            ]
        responses = []
        for f in feeds:
            try:
                outs = self._run(f)
            except Exception as e:
                error = pb_utils.TritonError(f"onnxruntime: {e}")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(n, o) for n, o in zip(self.outputs, outs)]
                )
            )
        return responses

    def finalize(self):
        self.session = None
'''
