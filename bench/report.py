"""What every benchmark result carries and how it is shown: the machine and versions it ran
on, one JSON file with every number, terminal tables, and a comparison with an older run."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

PACKAGES = ("scopecast", "numpy", "onnxruntime", "onnxruntime-gpu", "openvino", "pyzmq", "tifffile",
            "pymmcore-plus", "torch", "tensorrt")  # fmt: skip


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, and the NVIDIA GPU and driver when there is one."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = driver = None
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10, check=False,
            ).stdout.strip()  # fmt: skip
            if out:
                gpu, driver = (s.strip() for s in out.splitlines()[0].split(",", 1))
        except (OSError, subprocess.TimeoutExpired, ValueError):
            pass
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory_gb = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": memory_gb,
        "gpu": gpu,
        "driver": driver,
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    """Installed versions of the packages a result depends on (without importing them)."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def backends() -> dict[str, str]:
    """Each inference backend and whether it runs here: ONNX Runtime with its providers, and
    TensorRT with its version and GPU, or ``not available here (reason)``."""
    from engines.runtime import backend_status

    return backend_status()


def default_backends() -> list[str]:
    """What to measure when no backend is named: every backend ``auto`` would try that runs
    here, side by side (TensorRT beside ONNX Runtime), or ``auto`` when only one does (the
    backend the server would pick)."""
    from engines.runtime import OpenOptions, auto_order

    runs = [s.names[0] for s in auto_order() if s.unavailable(OpenOptions()) is None]
    return runs if len(runs) > 1 else ["auto"]


def write_result(result: dict[str, Any], out_dir: Path) -> Path:
    """``out_dir/KIND.json`` with the machine, backends, versions and time added."""
    out_dir.mkdir(parents=True, exist_ok=True)
    full = {
        **result,
        "machine": machine(),
        "backends": backends(),
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = out_dir / f"{result['kind']}.json"
    path.write_text(json.dumps(full, indent=1, default=_jsonable))
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def numbers(tree: Any, prefix: str = "") -> dict[str, float]:
    """Every numeric leaf of a result as {"engines.identity.latency.total.p99": 3.1, ...}."""
    flat: dict[str, float] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key in ("machine", "backends", "versions", "created", "samples", "sample_times_s",
                       "per_pair"):  # fmt: skip
                continue
            flat.update(numbers(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            label = _label(value) if isinstance(value, dict) else str(i)
            flat.update(numbers(value, f"{prefix}[{label}]"))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        flat[prefix] = float(tree)
    return flat


def _label(item: dict[str, Any]) -> str:
    keys = ("engine", "backend", "size", "tile", "batch")
    return ",".join(f"{item[k]}" for k in keys if k in item) or "?"


def compare(new: dict[str, Any], old: dict[str, Any], *, threshold: float = 0.05) -> Table:
    """A table of the numbers that changed by more than ``threshold`` (relative)."""
    a, b = numbers(old), numbers(new)
    table = Table("number", "old", "new", "change", title="compared with the older run")
    for key in sorted(set(a) & set(b)):
        before, after = a[key], b[key]
        if before == after:
            continue
        change = (after - before) / abs(before) if before else float("inf")
        if abs(change) >= threshold:
            table.add_row(escape(key), f"{before:.4g}", f"{after:.4g}", f"{change:+.0%}")
    only = sorted(set(a) ^ set(b))
    if only:
        table.caption = f"{len(only)} numbers are in only one of the runs"
    return table


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)
