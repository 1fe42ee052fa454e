"""Run an MDA (simulated microscope or a real Micro-Manager config) with the hook attached."""

from __future__ import annotations

import contextlib
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

from calibration.errors import ScopecastError

from .hook import FrameHook, HookStats
from .simulated import SimulatedMicroscope
from .status import ServerStatus

log = logging.getLogger(__name__)


class SetupError(ScopecastError, ValueError):
    """A config, sequence or preset that cannot be used; the message says why and what to do."""


class ServerFailed(RuntimeError):
    """The engine server ``run_with_server`` started died or ended without a summary."""


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
    duration = time.monotonic() - t0
    # after the acquisition: frames still queued get time to go (a closing socket drops what
    # it holds after 2 s); is the receiver still there? One that left (a killed server) may
    # have taken frames with it that the hook had handed over
    in_flight = hook.flush(10.0) if hook.receiver_connected() else hook.frames_in_flight
    summary = hook.stats.summary()
    summary["duration_s"] = duration
    summary["frames_expected"] = sum(1 for _ in sequence)
    summary["receiver_connected"] = hook.receiver_connected()
    summary["frames_in_flight"] = in_flight
    return summary


def delivery_problems(summary: dict[str, Any], endpoint: str) -> list[str]:
    """What in an acquisition summary means frames may not have reached the receiver: frames
    not handed over (by reason), a receiver that disconnected or is gone at the end. Empty when
    every frame was handed over to a receiver that is still there."""
    problems = []
    if n := summary.get("frames_not_handed_over", 0):
        reasons = ", ".join(f"{k} {v}" for k, v in summary["not_handed_over_by_reason"].items())
        problems.append(f"{n} of {summary['frames_seen']} frames not handed over ({reasons})")
    if n := summary.get("receiver_disconnects", 0):
        problems.append(f"the receiver at {endpoint} disconnected {n} time(s)")
    if not summary.get("receiver_connected", True) and summary.get("frames_sent", 0):
        problems.append(f"no receiver is connected at {endpoint} any more")
    if n := summary.get("frames_in_flight", 0):
        problems.append(f"{n} frames were still queued for sending at the end (dropped)")
    return problems


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
    on_progress: Callable[[HookStats, ServerStatus | None], None] | None = None,
    status_every_s: float = 0.5,
    also: Sequence[Any] = (),
    on_started: Callable[[dict[str, str]], None] | None = None,
    profile: Path | None = None,
    sink: str | None = None,
) -> tuple[dict[str, Any], ServerStatus | dict[str, Any]]:
    """Run ``sequence`` into ``scopecast serve`` started in another process on free loopback
    ports; stop it once every sent frame arrived; return (hook summary, server summary).

    ``on_started`` gets the endpoints ``{"listen", "publish", "control"}`` once the server is
    ready and before the acquisition starts (e.g. to connect a PUB subscriber). ``profile``: the
    server's ``--profile`` (units and the live fidelity check). ``sink``: the server's file
    format(s), a sink name ("ome-tiff", "ome-zarr" or both joined by "+").
    ``on_progress`` gets the server's latest status (None before the first answer).

    A server that cannot start for an expected reason (unknown or tampered engine) raises
    SetupError with its one-line message. A server that ends by itself because a stage died
    stops the acquisition and its summary (``healthy`` false, ``failure``) is returned: a
    ServerStatus, or the plain dict ``{"healthy": False, "failure": {...}}`` of a server that
    died before it had a status; one that dies without a summary raises ServerFailed."""
    from .control import ControlError, parse_status, status, wait_ready

    listen, publish, control = free_endpoint(), free_endpoint(), free_endpoint()
    cmd = [sys.executable, "-m", "stream", "serve", "--listen", listen, "--publish", publish,
           "--control", control, "--out", str(out_dir), "--mode", mode, "--backend", backend,
           "--json"]  # fmt: skip
    for name in engines:
        cmd += ["--engine", str(name)]
    if threads:
        cmd += ["--threads", str(threads)]
    if profile is not None:
        cmd += ["--profile", str(profile)]
    for name in sink.split("+") if sink else ():  # "ome-tiff+ome-zarr": both formats
        cmd += ["--format", name]
    # the server's output outlives several exits below; each path closes both files
    log_file = tempfile.TemporaryFile("w+")  # noqa: SIM115
    out_file = tempfile.TemporaryFile("w+")  # noqa: SIM115
    server = subprocess.Popen(cmd, stdout=out_file, stderr=log_file, text=True)
    summary: ServerStatus | None = None
    try:
        try:
            wait_ready(control, process=server, timeout_s=60)
        except ControlError as e:
            raise _start_failure(server, log_file, e) from None
        if on_started is not None:
            on_started({"listen": listen, "publish": publish, "control": control})
        hook = FrameHook(listen, stream=stream, on_finished=lambda stats: None)
        last_at = 0.0
        last_status: ServerStatus | None = None

        def progress(stats: HookStats) -> None:
            nonlocal last_at, last_status
            if server.poll() is not None:  # the server ended by itself: nobody to send to
                core.mda.cancel()
            elif time.monotonic() - last_at > status_every_s:
                last_at = time.monotonic()
                with contextlib.suppress(ControlError):
                    last_status = status(control, timeout_s=1.0)
            if on_progress is not None:
                on_progress(stats, last_status)

        try:
            hook.wait_for_receiver(20)
            sent = run(core, sequence, hook, on_progress=progress, also=also)
        finally:
            hook.close()
        summary = _stop(control, server, expect={stream: sent["frames_sent"]})
        server.wait(60)
    except BaseException as e:
        if server.poll() is None:
            server.terminate()  # flushes and closes its files
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        if not isinstance(e, SetupError):
            tail = _tail(log_file, 2000)
            if tail:
                log.warning("engine server log:\n%s", tail)
        log_file.close()
        out_file.close()
        raise
    final = _last_json(out_file)
    out_file.close()
    if server.returncode != 0 or summary is None:
        if final is not None and final.get("healthy") is False:
            log_file.close()
            # a stage died: the caller reports it from the summary (a server that died before
            # it had a status leaves only healthy and failure)
            if "engine" not in final:
                return sent, final
            return sent, parse_status(final, "the engine server's summary")
        last_line = (_tail(log_file, 2000).splitlines() or ["(no output)"])[-1]
        log_file.close()
        raise ServerFailed(
            f"the engine server exited with code {server.returncode} without a summary: "
            f"{last_line[:300]}"
        )
    log_file.close()
    return sent, summary


def _stop(
    control: str, server: subprocess.Popen, *, expect: dict[str, int], timeout_s: float = 3600.0
) -> ServerStatus | None:
    """Ask the server to stop once ``expect`` arrived; its summary, or None when the server
    process ended without answering (a stage died: it stopped by itself)."""
    from .control import ServerGone, stop

    try:
        return stop(control, expect=expect, timeout_s=timeout_s, process=server)
    except ServerGone:
        return None


def _tail(file: Any, n: int) -> str:
    file.seek(0)
    return file.read()[-n:].strip()


def _last_json(file: Any) -> dict[str, Any] | None:
    """The last line of ``file`` parsed as a JSON object (``serve --json``'s summary), or None."""
    lines = _tail(file, 1 << 24).splitlines()
    try:
        value = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _start_failure(server: subprocess.Popen, log_file: Any, error: Exception) -> Exception:
    """Why the server did not become ready, as one line: its own ``error:`` line (an expected
    mistake such as an unknown engine: SetupError), else ServerFailed."""
    if server.poll() is None:
        return ServerFailed(f"the engine server did not answer: {error}")
    lines = [line.strip() for line in _tail(log_file, 20000).splitlines() if line.strip()]
    said = [line.removeprefix("error:").strip() for line in lines if line.startswith("error:")]
    if server.returncode == 2 and said:
        return SetupError(said[-1])
    last = (said or lines or ["(no output)"])[-1]
    code = server.returncode
    return ServerFailed(f"the engine server exited with code {code} before it was ready: {last}")
