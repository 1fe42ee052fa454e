"""Generator size and CPU inference time per 256x256 frame, in torch and in ONNX Runtime.

    python -m bench.model_speed [--threads 2] [--runs 10] [--budget 30] [--scale 1] [--json OUT]

Every generator at "small" (CPU real-time) and "large" (GPU), batch 1, randomly initialized;
tgan with its full tGAN inputs (2 frames, previous output, background). Median of ``--runs``
timed runs after 2 warm-ups; a model slower than ``--budget`` seconds per backend gets fewer
runs (at least 1 after 1 warm-up), and the table says how many. The fastest run is shown too:
on a shared machine it is the better estimate of what the model costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for torch and onnxruntime")
    ap.add_argument("--runs", type=int, default=10, help="timed runs per model and backend")
    ap.add_argument("--budget", type=float, default=30.0, help="seconds per model and backend")
    ap.add_argument("--scale", type=int, default=1, choices=(1, 2, 4))
    ap.add_argument("--hw", type=int, default=256, help="input frame side in pixels")
    ap.add_argument("--sizes", nargs="+", default=["small", "large"])
    ap.add_argument("--arch", nargs="+", default=list(GENERATORS), choices=list(GENERATORS))
    ap.add_argument("--json", dest="json_out", help="also write the numbers to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    table = Table(
        "generator",
        "size",
        "inputs",
        "params",
        "torch ms median / min (runs)",
        "onnxruntime ms median / min (runs)",
        "ort fps",
        title=(
            f"generator CPU inference, {args.hw}x{args.hw} -> x{args.scale}, batch 1, "
            f"{args.threads} threads, median"
        ),
    )
    rows = []
    console = Console(width=120)
    for arch in args.arch:
        for size in args.sizes:
            with console.status(f"{arch} {size}"):
                r = measure(
                    arch, size, threads=args.threads, runs=args.runs, budget=args.budget,
                    scale=args.scale, hw=args.hw,
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
    if args.json_out:
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
            "threads": args.threads,
            "frame": [args.hw, args.hw],
            "models": rows,
        }
        Path(args.json_out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
