"""CPU inference time per frame, backends side by side: the generators (randomly initialized) in
torch, ONNX Runtime and OpenVINO, or the shipped engine packages on the runtime backends.

    scopecast bench model-speed [--threads 2] [--runs 10] [--budget 30] [--scale 1]
        [--hw 256] [--sizes small --sizes large] [--arch unet ...]
        [--backend torch --backend onnxruntime --backend openvino] [--json OUT]
        (or python -m bench model-speed ...; generators need the train extra)
    scopecast bench model-speed --engine confocal-denoise-sr2x --engine brightfield-deblur
        [--hw 256 --hw 512] [--backend onnxruntime --backend openvino] [--runs 100] [--json OUT]

Generators: every architecture at "small" (CPU real-time) and "large" (GPU), batch 1; tgan with
its full tGAN inputs (2 frames, previous output, background). Median of ``--runs`` timed runs
after 2 warm-ups; a model slower than ``--budget`` seconds per backend gets fewer runs (at least
1 after 1 warm-up), and the table says how many. The fastest run is shown too: on a shared
machine it is the better estimate of what the model costs.

Engines (``--engine``): each package's model on one whole ``--hw`` frame (batch 1, no tiling,
the same seeded random inputs for every backend) through ``open_backend``, exactly as the
server runs it. The backends take turns call by call, so a busy machine slows them alike; the
table gives p50, p99 and the fastest call, each backend's p50 relative to the first one's, and
how far its output is from the first backend's.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

TEMPORAL = {"tgan": {"window": 2, "previous": True, "background": True}}
#: what ``--backend`` may name for the generators (the engines take every runtime backend)
GENERATOR_BACKENDS = ("torch", "onnxruntime", "openvino")


def _time(fn: Callable[[], Any], runs: int, budget: float) -> tuple[float, float, int]:
    """Median and fastest seconds per call, and the number of timed calls."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first < budget / 4:
        fn()
    n = max(1, min(runs, int(budget / max(first, 1e-9))))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), n


def _onnxruntime_runner(path: Path, feed: dict[str, np.ndarray], threads: int) -> Callable:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, feed)


def _openvino_runner(path: Path, feed: dict[str, np.ndarray], threads: int) -> Callable:
    """The model compiled as the openvino backend compiles it (f32, shapes fixed)."""
    from engines.runtime.openvino import compile_config, import_openvino

    core = import_openvino().Core()
    model = core.read_model(str(path))
    model.reshape({name: list(a.shape) for name, a in feed.items()})
    request = core.compile_model(model, "CPU", compile_config(threads)).create_infer_request()
    return lambda: request.infer(feed)


def measure(
    arch: str,
    size: str,
    *,
    threads: int,
    runs: int,
    budget: float,
    scale: int,
    hw: int,
    backends: Sequence[str] = ("torch", "onnxruntime"),
) -> dict[str, Any]:
    import torch

    from engines.models import build_generator, count_parameters
    from engines.models.onnx_export import example_inputs, export_onnx

    torch.manual_seed(0)
    model = build_generator(arch, size, scale=scale, **TEMPORAL.get(arch, {})).eval()
    inputs = example_inputs(model, 1, hw, hw)
    feed = {k: v.numpy() for k, v in inputs.items()}
    row: dict[str, Any] = {
        "arch": arch,
        "size": size,
        "hw": hw,
        "inputs": model.input_names,
        "window": model.window,
        "scale": scale,
        "params": count_parameters(model),
        "multiple": model.multiple,
        "receptive_radius": model.receptive_radius,
    }
    runners: dict[str, Callable[[], Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "model.onnx")
        for backend in backends:
            if backend == "onnxruntime":
                runners[backend] = _onnxruntime_runner(path, feed, threads)
            elif backend == "openvino":
                runners[backend] = _openvino_runner(path, feed, threads)
    for backend in backends:
        if backend == "torch":
            with torch.no_grad():
                median, fastest, n = _time(lambda: model(**inputs), runs, budget)
        else:
            median, fastest, n = _time(runners[backend], runs, budget)
        row |= {f"{backend}_ms": median * 1e3, f"{backend}_min_ms": fastest * 1e3,
                f"{backend}_runs": n}  # fmt: skip
    return row


def _inputs(r: dict[str, Any]) -> str:
    frames = f"{r['window']} frame{'s' * (r['window'] > 1)}"
    return " + ".join([frames, *(n for n in r["inputs"] if n != "frames")])


def run_model_speed(
    *,
    threads: int = 2,
    runs: int = 10,
    budget: float = 30.0,
    scale: int = 1,
    hw: int | Sequence[int] = 256,
    sizes: Sequence[str] = ("small", "large"),
    archs: Sequence[str] | None = None,
    engines: Sequence[str] | None = None,
    backends: Sequence[str] | None = None,
    json_out: Path | None = None,
) -> list[dict[str, Any]]:
    """Every architecture (``archs``, default all) at every size, or every engine package in
    ``engines``, on every backend: print the table, write every number to ``json_out`` if
    given, and return the rows."""
    sides = [hw] if isinstance(hw, int) else list(hw)
    if threads < 1 or runs < 1 or budget <= 0 or not sides or min(sides) < 8:
        raise ValueError(f"--threads {threads} and --runs {runs} must be >= 1, --budget "
                         f"{budget:g} > 0 and --hw {sides} >= 8")  # fmt: skip
    if engines:
        if archs:
            raise ValueError(f"--arch {list(archs)} is for the generators: not with --engine")
        return _run_engines(engines, backends or _default_engine_backends(), threads=threads,
                            runs=runs, budget=budget, sides=sides, json_out=json_out)  # fmt: skip
    return _run_generators(
        backends or _default_generator_backends(), threads=threads, runs=runs, budget=budget,
        scale=scale, sides=sides, sizes=sizes, archs=archs, json_out=json_out,
    )  # fmt: skip


def _openvino_here() -> bool:
    from engines.runtime import OpenOptions, find_backend

    return find_backend("openvino").unavailable(OpenOptions()) is None


def _default_generator_backends() -> list[str]:
    return ["torch", "onnxruntime", *(["openvino"] if _openvino_here() else [])]


def _default_engine_backends() -> list[str]:
    return ["onnxruntime", *(["openvino"] if _openvino_here() else [])]


def _run_generators(
    backends: Sequence[str],
    *,
    threads: int,
    runs: int,
    budget: float,
    scale: int,
    sides: Sequence[int],
    sizes: Sequence[str],
    archs: Sequence[str] | None,
    json_out: Path | None,
) -> list[dict[str, Any]]:
    import torch

    from engines.models import GENERATORS

    archs = list(archs or GENERATORS)
    unknown = [a for a in archs if a not in GENERATORS]
    if unknown:
        raise ValueError(f"--arch {unknown}: choose from {', '.join(GENERATORS)}")
    wrong = [b for b in backends if b not in GENERATOR_BACKENDS]
    if wrong or not backends:
        raise ValueError(f"--backend {wrong or list(backends)}: the generators run on "
                         f"{', '.join(GENERATOR_BACKENDS)}")  # fmt: skip
    if "openvino" in backends and not _openvino_here():
        from engines.runtime import OpenOptions, find_backend

        why = find_backend("openvino").unavailable(OpenOptions())
        raise ValueError(f"--backend openvino is not available here: {why}")
    torch.set_num_threads(threads)
    onnx = [b for b in backends if b != "torch"]
    table = Table(
        "generator", "size", "hw", "inputs", "params",
        *(f"{b} ms median / min (runs)" for b in backends),
        *(["fps (fastest ONNX)"] if onnx else []),
        title=f"generator CPU inference, -> x{scale}, batch 1, {threads} threads, median",
    )  # fmt: skip
    rows = []
    console = Console(width=160)
    for arch in archs:
        for size in sizes:
            for side in sides:
                with console.status(f"{arch} {size} {side}"):
                    r = measure(arch, size, threads=threads, runs=runs, budget=budget,
                                scale=scale, hw=side, backends=backends)  # fmt: skip
                rows.append(r)
                cells = [f"{r[f'{b}_ms']:.1f} / {r[f'{b}_min_ms']:.1f} ({r[f'{b}_runs']})"
                         for b in backends]  # fmt: skip
                fps = [f"{1e3 / min(r[f'{b}_ms'] for b in onnx):.1f}"] if onnx else []
                table.add_row(arch, size, str(side), _inputs(r), f"{r['params'] / 1e6:.3f} M",
                              *cells, *fps)  # fmt: skip
    console.print(table)
    load = _print_load(console)
    if json_out:
        _write(json_out, {"threads": threads, "frames": [[s, s] for s in sides],
                          "backends": list(backends), "models": rows}, load)  # fmt: skip
    return rows


def _engine_inputs(manifest: Any, side: int) -> dict[str, np.ndarray]:
    """Seeded random inputs for one whole ``side`` x ``side`` frame, in model units."""
    rng = np.random.default_rng(0)
    t = manifest.temporal
    shapes = {"frames": (1, t.window, side, side)}
    if t.previous_output:
        shapes["previous"] = (1, 1, side * manifest.scale, side * manifest.scale)
    if t.background:
        shapes["background"] = (1, 1, side, side)
    return {name: rng.random(shape, dtype=np.float32) for name, shape in shapes.items()}


def measure_engine(
    package: Any, side: int, backends: Sequence[str], *, threads: int, runs: int, budget: float
) -> list[dict[str, Any]]:
    """One row per backend for ``package`` on one ``side`` frame; backends take turns."""
    from engines.runtime import BackendError, open_backend

    inputs = _engine_inputs(package.manifest, side)
    opened: dict[str, Any] = {}
    rows: dict[str, dict[str, Any]] = {}
    outputs: dict[str, np.ndarray] = {}
    base = {"engine": package.manifest.name, "hw": side}
    try:
        for backend in backends:
            try:
                runner, reason = open_backend(package, backend, threads)
                t0 = time.perf_counter()
                outputs[backend] = runner.infer(inputs)  # the first call compiles for the shape
                first = time.perf_counter() - t0
                runner.infer(inputs)
            except BackendError as e:
                rows[backend] = {**base, "backend": backend, "skipped": str(e)}
                continue
            opened[backend] = runner
            rows[backend] = {**base, "backend": backend, "reason": reason,
                             "first_call_ms": first * 1e3, "times": []}  # fmt: skip
        deadline = time.perf_counter() + budget * max(1, len(opened))
        for _ in range(runs):
            for backend, runner in opened.items():
                t0 = time.perf_counter()
                runner.infer(inputs)
                rows[backend]["times"].append(time.perf_counter() - t0)
            if time.perf_counter() > deadline:
                break
    finally:
        for runner in opened.values():
            runner.close()
    reference = next(iter(outputs.values()), None)
    first_p50 = None
    for backend in opened:
        row = rows[backend]
        ms = np.array(row.pop("times")) * 1e3
        p50, p99 = (float(v) for v in np.percentile(ms, [50, 99]))
        first_p50 = first_p50 or p50
        assert reference is not None
        out = outputs[backend]
        span = float(np.ptp(reference)) or 1.0
        row |= {
            "p50_ms": p50, "p99_ms": p99, "min_ms": float(ms.min()), "runs": int(ms.size),
            "p50_vs_first": p50 / first_p50,
            "max_abs_diff_vs_first": float(np.abs(out - reference).max())
            if out.shape == reference.shape else None,
            "output_range": span,
        }  # fmt: skip
    return [rows[b] for b in backends]


def _run_engines(
    engines: Sequence[str],
    backends: Sequence[str],
    *,
    threads: int,
    runs: int,
    budget: float,
    sides: Sequence[int],
    json_out: Path | None,
) -> list[dict[str, Any]]:
    from engines.package import load_package
    from engines.runtime import backend_names

    names = backend_names()
    wrong = [b for b in backends if b not in names]
    if wrong or not backends:
        raise ValueError(f"--backend {wrong or list(backends)}: choose from {', '.join(names)}")
    packages = [load_package(e) for e in engines]  # PackageError is a ValueError
    table = Table(
        "engine", "frame", "backend", "p50 ms", "p99 ms", "min ms", "runs", "p50 / first",
        "max |diff| vs first",
        title=f"engine inference, whole frame, batch 1, {threads} threads, backends taking turns",
    )  # fmt: skip
    rows: list[dict[str, Any]] = []
    console = Console(width=160)
    for package in packages:
        for side in sides:
            with console.status(f"{package.manifest.name} {side}x{side}"):
                measured = measure_engine(package, side, backends, threads=threads, runs=runs,
                                          budget=budget)  # fmt: skip
            for i, r in enumerate(measured):
                head = [r["engine"], f"{side}x{side}", r["backend"]]
                end = i == len(measured) - 1
                if "skipped" in r:
                    table.add_row(*head, "skipped", r["skipped"], end_section=end)
                    continue
                diff = r["max_abs_diff_vs_first"]
                table.add_row(
                    *head, f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['min_ms']:.1f}",
                    str(r["runs"]), f"{r['p50_vs_first']:.2f}",
                    "-" if diff is None else f"{diff:.1e} of {r['output_range']:.3g}",
                    end_section=end,
                )  # fmt: skip
            rows.extend(measured)
    console.print(table)
    load = _print_load(console)
    if json_out:
        _write(json_out, {"threads": threads, "frames": [[s, s] for s in sides],
                          "backends": list(backends), "engines": rows}, load)  # fmt: skip
    return rows


def _print_load(console: Console) -> tuple[float, float, float]:
    load = os.getloadavg()
    console.print(
        f"load average after the run (1/5/15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on "
        f"{os.cpu_count()} CPUs; other processes on the machine slow torch's OpenMP threads most"
    )
    return load


def _write(json_out: Path, result: dict[str, Any], load: tuple[float, float, float]) -> None:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "onnxruntime", "openvino"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    results = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            **found,
            "numpy": np.__version__,
            "cpus": os.cpu_count(),
            "load_average": load,
        },
        **result,
    }
    Path(json_out).write_text(json.dumps(results, indent=1))
