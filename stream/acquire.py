"""Run an MDA (simulated microscope or a real Micro-Manager config) with the hook attached."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import useq
from pydantic import ValidationError
from pymmcore_plus import CMMCorePlus

from .hook import FrameHook, HookStats
from .simulated import SimulatedMicroscope


class SetupError(ValueError):
    """A config, sequence or preset that cannot be used; the message says why and what to do."""


def load_config(path: Path) -> CMMCorePlus:
    """A real CMMCorePlus with a Micro-Manager config loaded (device adapters from MM or
    the ``mm-test-adapters`` package)."""
    if not path.is_file():
        raise SetupError(f"config file {str(path)!r} does not exist")
    logging.getLogger("pymmcore-plus").setLevel(logging.CRITICAL)
    core = CMMCorePlus()
    search = _adapter_paths()
    if search:
        core.setDeviceAdapterSearchPaths(search)
    try:
        core.loadSystemConfiguration(str(path))
    except Exception as e:  # MMCore raises its own CMMError/RuntimeError types
        hint = (
            ""
            if search
            else (
                " (no Micro-Manager installation or mm-test-adapters found: install Micro-Manager "
                "or `pip install mm-test-adapters`)"
            )
        )
        raise SetupError(f"config {str(path)!r} did not load: {e}{hint}") from e
    if not core.getCameraDevice():
        raise SetupError(f"config {str(path)!r} loaded but sets no camera: add a Core Camera line")
    return core


def _adapter_paths() -> list[str]:
    from pymmcore_plus import find_micromanager

    paths = []
    try:
        import mm_test_adapters

        paths.append(str(mm_test_adapters.device_adapter_path()))
    except (ImportError, AttributeError):
        pass
    if found := find_micromanager():
        paths.append(found)
    return paths


def load_sequence(path: Path) -> useq.MDASequence:
    """A useq MDASequence from a YAML or JSON file, or a SetupError saying what is wrong."""
    if not path.is_file():
        raise SetupError(f"sequence file {str(path)!r} does not exist")
    if path.suffix not in {".yaml", ".yml", ".json"}:
        raise SetupError(f"sequence file {str(path)!r} must be .yaml, .yml or .json")
    try:
        return useq.MDASequence.from_file(path)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise SetupError(
            f"sequence {str(path)!r} is not a valid useq MDASequence: {problems}"
        ) from e
    except Exception as e:  # YAML/JSON syntax errors
        raise SetupError(f"sequence {str(path)!r} could not be read: {e}") from e


def simulated(preset: str, seed: int = 0) -> SimulatedMicroscope:
    """The simulated microscope, with an unknown preset turned into a SetupError."""
    try:
        return SimulatedMicroscope(preset, seed=seed)
    except ValueError as e:
        raise SetupError(str(e)) from e


def run(
    core: CMMCorePlus,
    sequence: useq.MDASequence,
    hook: FrameHook,
    *,
    on_progress: Callable[[HookStats], None] | None = None,
    also: Sequence[Any] = (),
) -> dict[str, Any]:
    """Run ``sequence`` on ``core`` with ``hook`` (and the handlers in ``also``) attached;
    return the hook's summary."""
    t0 = time.monotonic()
    thread = core.run_mda(sequence, output=[hook, *also])
    while thread.is_alive():
        thread.join(0.1)
        if on_progress is not None:
            on_progress(hook.stats)
    summary = hook.stats.summary()
    summary["duration_s"] = time.monotonic() - t0
    summary["frames_expected"] = sum(1 for _ in sequence)
    return summary


def run_with_receiver(
    core: CMMCorePlus,
    sequence: useq.MDASequence,
    *,
    stream: str = "scope",
    headers: Path | None = None,
    on_progress: Callable[[HookStats], None] | None = None,
    also: Sequence[Any] = (),
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``sequence`` into ``scopecast receive`` started in another process on a free
    loopback port; return (hook summary, receiver summary)."""
    total = sum(1 for _ in sequence)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    cmd = [
        sys.executable,
        "-m",
        "stream",
        "receive",
        "--listen",
        endpoint,
        "--json",
        "--count",
        str(total),
        "--idle-timeout",
        "20",
    ]
    if headers is not None:
        cmd += ["--headers", str(headers)]
    rx = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        hook = FrameHook(endpoint, stream=stream, on_finished=lambda stats: None)
        try:
            hook.wait_for_receiver(20)
            sent = run(core, sequence, hook, on_progress=on_progress, also=also)
        finally:
            hook.close()
        out, errors = rx.communicate(timeout=120)
    finally:
        if rx.poll() is None:
            rx.kill()
    if rx.returncode != 0:
        raise RuntimeError(f"scopecast receive exited with {rx.returncode}: {errors.strip()}")
    return sent, json.loads(out.strip().splitlines()[-1])
