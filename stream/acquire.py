"""Run an MDA (simulated microscope or a real Micro-Manager config) with the hook attached."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import useq
from pydantic import ValidationError
from pymmcore_plus import CMMCorePlus

from .hook import FrameHook, HookStats
from .simulated import SimulatedMicroscope

log = logging.getLogger(__name__)


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


def free_endpoint() -> str:
    """A tcp endpoint on loopback with a port nobody is using right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


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
    endpoint = free_endpoint()
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


def run_with_server(
    core: CMMCorePlus,
    sequence: useq.MDASequence,
    *,
    engines: Sequence[str],
    out_dir: Path,
    mode: str = "live",
    stream: str = "scope",
    backend: str = "auto",
    threads: int | None = None,
    on_progress: Callable[[HookStats, dict[str, Any] | None], None] | None = None,
    status_every_s: float = 0.5,
    also: Sequence[Any] = (),
    on_started: Callable[[dict[str, str]], None] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``sequence`` into ``scopecast serve`` started in another process on free loopback
    ports; stop it once every sent frame arrived; return (hook summary, server summary).

    ``on_started`` gets the endpoints ``{"listen", "publish", "control"}`` once the server is
    ready and before the acquisition starts (e.g. to connect a PUB subscriber)."""
    from .control import ControlError, request, wait_ready

    listen, publish, control = free_endpoint(), free_endpoint(), free_endpoint()
    cmd = [sys.executable, "-m", "stream", "serve", "--listen", listen, "--publish", publish,
           "--control", control, "--out", str(out_dir), "--mode", mode, "--backend", backend,
           "--quiet"]  # fmt: skip
    for name in engines:
        cmd += ["--engine", str(name)]
    if threads:
        cmd += ["--threads", str(threads)]
    log_file = tempfile.TemporaryFile("w+")
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_file, text=True)
    try:
        wait_ready(control, process=server, timeout_s=60)
        if on_started is not None:
            on_started({"listen": listen, "publish": publish, "control": control})
        hook = FrameHook(listen, stream=stream, on_finished=lambda stats: None)
        last: dict[str, Any] = {"at": 0.0, "status": None}

        def progress(stats: HookStats) -> None:
            if time.monotonic() - last["at"] > status_every_s:
                last["at"] = time.monotonic()
                try:
                    last["status"] = request(control, "status", timeout_s=1.0)
                except ControlError:
                    pass
            if on_progress is not None:
                on_progress(stats, last["status"])

        try:
            hook.wait_for_receiver(20)
            sent = run(core, sequence, hook, on_progress=progress, also=also)
        finally:
            hook.close()
        summary = request(control, "stop", expect={stream: sent["frames_sent"]}, timeout_s=3600.0)
        server.wait(60)
    except BaseException:
        if server.poll() is None:
            server.terminate()  # flushes and closes its files
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        log_file.seek(0)
        tail = log_file.read()[-2000:].strip()
        if tail:
            log.warning("engine server log:\n%s", tail)
        raise
    finally:
        log_file.close()
    if server.returncode != 0:
        raise RuntimeError(f"scopecast serve exited with {server.returncode}")
    return sent, summary
