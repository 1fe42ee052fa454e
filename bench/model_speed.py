"""Generator size and CPU inference time per 256x256 frame, in torch and in ONNX Runtime.

    scopecast bench model-speed [--threads 2] [--runs 10] [--budget 30] [--scale 1]
        [--hw 256] [--sizes small --sizes large] [--arch unet ...] [--json OUT]
        (or python -m bench model-speed ...; needs the train extra)

Every generator at "small" (CPU real-time) and "large" (GPU), batch 1, randomly initialized;
tgan with its full tGAN inputs (2 frames, previous output, background). Median of ``--runs``
timed runs after 2 warm-ups; a model slower than ``--budget`` seconds per backend gets fewer
runs (at least 1 after 1 warm-up), and the table says how many. The fastest run is shown too:
on a shared machine it is the better estimate of what the model costs.
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
import onnxruntime as ort
import torch
from rich.console import Console
from rich.table import Table

from engines.models import GENERATORS, build_generator, count_parameters
from engines.models.onnx_export import example_inputs, export_onnx

TEMPORAL = {"tgan": {"window": 2, "previous": True, "background": True}}


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


def measure(
    arch: str, size: str, *, threads: int, runs: int, budget: float, scale: int, hw: int
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_generator(arch, size, scale=scale, **TEMPORAL.get(arch, {})).eval()
    inputs = example_inputs(model, 1, hw, hw)
    with torch.no_grad():
        torch_s, torch_min, torch_n = _time(lambda: model(**inputs), runs, budget)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "model.onnx")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {k: v.numpy() for k, v in inputs.items()}
    ort_s, ort_min, ort_n = _time(lambda: session.run(None, feed), runs, budget)
    return {
        "arch": arch,
        "size": size,
        "inputs": model.input_names,
        "window": model.window,
        "scale": scale,
        "params": count_parameters(model),
        "multiple": model.multiple,
        "receptive_radius": model.receptive_radius,
        "torch_ms": torch_s * 1e3,
        "torch_min_ms": torch_min * 1e3,
        "torch_runs": torch_n,
        "onnxruntime_ms": ort_s * 1e3,
        "onnxruntime_min_ms": ort_min * 1e3,
        "onnxruntime_runs": ort_n,
    }


def _inputs(r: dict[str, Any]) -> str:
    frames = f"{r['window']} frame{'s' * (r['window'] > 1)}"
    return " + ".join([frames, *(n for n in r["inputs"] if n != "frames")])


def run_model_speed(
    *,
    threads: int = 2,
    runs: int = 10,
    budget: float = 30.0,
    scale: int = 1,
    hw: int = 256,
    sizes: Sequence[str] = ("small", "large"),
    archs: Sequence[str] | None = None,
    json_out: Path | None = None,
) -> list[dict[str, Any]]:
    """Every architecture (``archs``, default all) at every size: print the table, write every
    number to ``json_out`` if given, and return the rows."""
    archs = list(archs or GENERATORS)
    unknown = [a for a in archs if a not in GENERATORS]
    if unknown:
        raise ValueError(f"--arch {unknown}: choose from {', '.join(GENERATORS)}")
    if threads < 1 or runs < 1 or budget <= 0 or hw < 8:
        raise ValueError(f"--threads {threads} and --runs {runs} must be >= 1, --budget "
                         f"{budget:g} > 0 and --hw {hw} >= 8")  # fmt: skip
    torch.set_num_threads(threads)
    table = Table(
        "generator",
        "size",
        "inputs",
        "params",
        "torch ms median / min (runs)",
        "onnxruntime ms median / min (runs)",
        "ort fps",
        title=(
            f"generator CPU inference, {hw}x{hw} -> x{scale}, batch 1, {threads} threads, median"
        ),
    )
    rows = []
    console = Console(width=120)
    for arch in archs:
        for size in sizes:
            with console.status(f"{arch} {size}"):
                r = measure(
                    arch, size, threads=threads, runs=runs, budget=budget, scale=scale, hw=hw,
                )  # fmt: skip
            rows.append(r)
            table.add_row(
                arch,
                size,
                _inputs(r),
                f"{r['params'] / 1e6:.3f} M",
                f"{r['torch_ms']:.1f} / {r['torch_min_ms']:.1f} ({r['torch_runs']})",
                f"{r['onnxruntime_ms']:.1f} / {r['onnxruntime_min_ms']:.1f} "
                f"({r['onnxruntime_runs']})",
                f"{1e3 / r['onnxruntime_ms']:.1f}",
            )
    console.print(table)
    load = os.getloadavg()
    console.print(
        f"load average after the run (1/5/15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on "
        f"{os.cpu_count()} CPUs; other processes on the machine slow torch's OpenMP threads most"
    )
    if json_out:
        results = {
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "onnxruntime": ort.__version__,
                "numpy": np.__version__,
                "cpus": os.cpu_count(),
                "load_average": load,
            },
            "threads": threads,
            "frame": [hw, hw],
            "models": rows,
        }
        Path(json_out).write_text(json.dumps(results, indent=1))
    return rows
