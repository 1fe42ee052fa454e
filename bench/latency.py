"""Where every millisecond goes, frameReady -> subscriber, for each engine on a real acquisition.

Each engine gets its own run: the simulated microscope (or a real rig's Micro-Manager config)
runs an MDA through the real :class:`~stream.hook.FrameHook` into ``scopecast serve`` in another
process (files written to a temporary folder, deleted afterwards), while a ZeroMQ SUB socket in
this process records when every enhanced frame arrives. The ``identity`` engine always runs
first: its numbers are the pipeline's own overhead, the baseline for every other engine.

Stages, in milliseconds per frame:

===========  ===================================================================================
hook         frameReady -> frame handed to ZeroMQ (copy into the hook's buffer, header, send)
transport    frameReady -> received by the server (from the published header; includes hook)
queue        received -> the engine took it (waiting behind other frames)
preprocess   normalization, tiling, stacking the temporal window
inference    the backend's own time
postprocess  de-normalization, output checks, conversion to the raw dtype
publish      end of enhancement -> arrival at the subscriber (PUB hand-over, network, wake-up)
disk         one OME-TIFF plane plus its index line (raw and enhanced writes together)
total        frameReady -> arrival of the enhanced frame at the subscriber
===========  ===================================================================================

transport + queue + preprocess + inference + postprocess + publish = total, frame by frame.
Frames whose frameReady falls within ``warmup_s`` of the first frame are left out of every
stage. Same-host clocks only: the subscriber and the server must share ``time.monotonic_ns``.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import useq
import zmq

from calibration.sim.scene import time_plan
from engines.package import PackageError, load_package
from engines.runtime import backend_names
from stream.acquire import load_config, run_with_server, simulated
from stream.control import ControlError, parse_status
from stream.control import status as server_status
from stream.hook import HookStats
from stream.protocol import ProtocolError, PublishedHeader, decode_header
from stream.sinks import read_index
from stream.sinks.store import INDEX_NAME
from stream.stats import percentiles
from stream.status import ServerStatus

from .triton_server import TritonUnavailable

STAGES = ("hook", "transport", "queue", "preprocess", "inference", "postprocess", "publish",
          "disk", "total")  # fmt: skip
SERVER_STAGES = ("transport", "queue", "preprocess", "inference", "postprocess")
MODES = ("live", "complete")
BASELINE = "identity"
MIN_FRAMES = 5

Progress = Callable[[str], None]


def run_latency(
    *,
    engines: Sequence[str],
    preset: str | None = "confocal-20fps",
    config: Path | None = None,
    duration_s: float = 60.0,
    backend: str = "auto",
    mode: str = "live",
    warmup_s: float = 2.0,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Per-stage latency percentiles (p50/p90/p99/max, ms) and counters for every engine, each
    measured on its own acquisition of ``duration_s`` (``config`` wins over ``preset``).

    ``hook`` is per frame after the warm-up when every sent frame reached the server (the usual
    case); otherwise it falls back to the hook's own summary, which cannot exclude the warm-up
    (``hook_warmup_excluded`` says which). Each engine's ``samples`` and ``sample_times_s`` hold
    the per-frame values (ms) and their frame times (s since the first frame) for the plots.
    """
    names = _engine_order(engines)
    _check(duration_s=duration_s, warmup_s=warmup_s, mode=mode, backend=backend)
    for name in names:
        try:
            load_package(name)
        except PackageError as e:
            raise ValueError(str(e)) from e
    say = progress or (lambda message: None)
    rig = None
    if config is not None:
        rig = load_config(Path(config))  # SetupError is a ValueError
        interval_s = max(rig.getExposure() / 1000, 0.001)
        sequence = useq.MDASequence(time_plan=time_plan(duration_s, interval_s))
    elif preset is None:
        raise ValueError("give a simulated preset or a Micro-Manager config to acquire from")
    else:
        first = simulated(preset, seed)  # an unknown preset fails here, listing the presets
        sequence = first.preset.sequence(duration_s)
    result: dict[str, Any] = {
        "kind": "latency",
        "preset": None if config is not None else preset,
        "config": str(config) if config is not None else None,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "mode": mode,
        "backend_requested": backend,
        "engines": {},
    }
    for i, name in enumerate(names):
        core = rig if rig is not None else (first if i == 0 else simulated(preset, seed)).core  # type: ignore[arg-type]
        say(f"{name}: acquiring {duration_s:g} s ({sum(1 for _ in sequence)} frames)")
        result["engines"][name] = _measure(
            name, core, sequence, duration_s=duration_s, warmup_s=warmup_s, backend=backend,
            mode=mode, say=say,
        )  # fmt: skip
        total = result["engines"][name]["latency_ms"]["total"]
        say(f"{name}: total p50 {total['p50']:.2f} ms, p99 {total['p99']:.2f} ms")
    return result


def _engine_order(engines: Sequence[str]) -> list[str]:
    """``identity`` first, then the others in the order given, each once."""
    names = [BASELINE]
    for name in engines:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"engine names must be non-empty strings, got {name!r}")
        if name not in names:
            names.append(name)
    return names


def _check(*, duration_s: float, warmup_s: float, mode: str, backend: str) -> None:
    if warmup_s < 0:
        raise ValueError(f"warm-up {warmup_s:g} s must be 0 or more")
    if duration_s < warmup_s + 1:
        raise ValueError(
            f"duration {duration_s:g} s is too short to measure after a {warmup_s:g} s warm-up: "
            f"raise --duration to at least {warmup_s + 1:g} s (60 s gives steady percentiles)"
        )
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    if backend not in (names := backend_names()):
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(names)}")


class _Subscriber:
    """A PUB subscriber in a thread: arrival time and header bytes of every enhanced frame."""

    def __init__(self, endpoint: str) -> None:
        self.enhanced: list[tuple[int, bytes]] = []
        self.raw = 0
        self._stop = threading.Event()
        self._ctx = zmq.Context()  # its own I/O thread: the hook's sends do not wait on ours
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, 100_000)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.connect(endpoint)
        self._thread = threading.Thread(target=self._run, name="latency-subscriber", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sock = self._sock
        while True:
            if not sock.poll(300 if self._stop.is_set() else 50):
                if self._stop.is_set():
                    return  # stopped, and nothing more arrived for 0.3 s
                continue
            frames = sock.recv_multipart(copy=False)
            now = time.monotonic_ns()
            topic = frames[0].bytes
            if topic.endswith(b"/enhanced"):
                self.enhanced.append((now, frames[1].bytes))
            elif topic.endswith(b"/raw"):
                self.raw += 1  # (a profiled server also publishes significance maps)

    def stop(self) -> None:
        """Take what is still on its way, then close."""
        self._stop.set()
        self._thread.join()
        self._sock.close(0)
        self._ctx.term()


def _wait_for_viewer(control: str, timeout_s: float = 10.0) -> ServerStatus:
    """The server's status once it has accepted our subscriber's connection."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = server_status(control, timeout_s=2.0)
        if status.viewers.connected >= 1:
            time.sleep(0.1)  # the subscription itself follows the accepted connection
            return status
        if time.monotonic() > deadline:
            raise ControlError(f"the subscriber did not connect to the server within {timeout_s} s")
        time.sleep(0.02)


def _measure(
    name: str,
    core: Any,
    sequence: useq.MDASequence,
    *,
    duration_s: float,
    warmup_s: float,
    backend: str,
    mode: str,
    say: Progress,
) -> dict[str, Any]:
    """One acquisition through the server running ``name``; its latency summary."""
    state: dict[str, Any] = {"sub": None, "start": None, "stats": None, "said": 0.0}
    rss: list[float] = []
    t0 = time.monotonic()

    def on_started(endpoints: dict[str, str]) -> None:
        state["sub"] = _Subscriber(endpoints["publish"])
        state["start"] = _wait_for_viewer(endpoints["control"])

    def on_progress(stats: HookStats, status: ServerStatus | None) -> None:
        state["stats"] = stats
        if status is not None and status.rss_mb is not None:
            rss.append(status.rss_mb)
        if time.monotonic() - state["said"] >= 2.0:
            state["said"] = time.monotonic()
            enhanced = status.frames_enhanced if status else 0
            say(f"{name}: {time.monotonic() - t0:.0f} s, {stats.frames_seen} frames, "
                f"{enhanced} enhanced")  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="scopecast-latency-") as tmp:
        try:
            sent, summary = run_with_server(
                core, sequence, engines=[name], out_dir=Path(tmp), mode=mode, backend=backend,
                on_progress=on_progress, on_started=on_started,
            )  # fmt: skip
        finally:
            if state["sub"] is not None:
                state["sub"].stop()
        # a ServerStatus as is; the bare failure dict of a server that died before it had
        # a status is refused (ControlError)
        server = parse_status(summary, "the engine server's summary")
        index = read_index(Path(server.out_dir) / INDEX_NAME)
    sub: _Subscriber = state["sub"]
    if server.rss_mb is not None:
        rss.append(server.rss_mb)
    raw, warm_end_ns, (samples, times, add, _) = _after_warmup(
        sub, index, warmup_s, f"engine {name!r}", f"raise --duration (now {duration_s:g} s)"
    )
    hook_exact = _hook_samples(state["stats"], raw, warm_end_ns, add)

    engine = server.engine
    described = engine.backend[0] if engine.backend else None
    start: ServerStatus | None = state["start"]
    cpu_s = wall_s = cpu_percent = None
    if start is not None:
        cpu_s = server.cpu_s - start.cpu_s
        wall_s = server.uptime_s - start.uptime_s
        cpu_percent = 100 * cpu_s / wall_s if wall_s > 0 else None
    latency = {s: percentiles(samples[s]) for s in STAGES}
    if not hook_exact:
        latency["hook"] = dict(sent["hook_ms"])
    return {
        "engine": engine.engine,
        "latency_ms": latency,
        "frames_measured": {s: len(samples[s]) for s in STAGES},
        "fps_acquired": sent.get("fps"),
        "frames_expected": sent.get("frames_expected"),
        "frames_acquired": sent["frames_seen"],
        "frames_enhanced": server.frames_enhanced,
        "frames_skipped": server.frames_skipped,
        "frames_not_handed_over": sent["frames_not_handed_over"],
        "frames_received_by_subscriber": len(sub.enhanced),
        "raw_frames_received_by_subscriber": sub.raw,
        "server_healthy": server.healthy,
        "warmup_frames_dropped": sum(1 for r in raw if r["header"]["mono_ns"] < warm_end_ns),
        "hook_warmup_excluded": hook_exact,
        "engine_errors": server.engine_errors,
        "disk_errors": server.disk_errors.seen(),
        "rss_mb": max(rss) if rss else None,
        "cpu_s": cpu_s,
        "cpu_s_total": server.cpu_s,
        "wall_s": wall_s,
        "cpu_percent": cpu_percent,
        "backend": " ".join(x for x in (described.name, described.device) if x)
        if described
        else "",
        "backend_reason": engine.reason[0] if engine.reason else None,
        "samples": samples,
        "sample_times_s": times,
    }


Add = Callable[[str, int, float], None]


Collected = tuple[dict[str, list[float]], dict[str, list[float]], Add, int]
"""What :func:`_collect` returns: samples and times per stage, their adder, frames measured."""


def _after_warmup(sub: _Subscriber, index: list[dict[str, Any]], warmup_s: float, what: str,
                  remedy: str) -> tuple[list[dict[str, Any]], int, Collected]:  # fmt: skip
    """The run's raw index lines, the end of its warm-up (``warmup_s`` after the first raw frame,
    monotonic ns) and :func:`_collect`'s samples after it; RuntimeError without a raw frame,
    ValueError (with ``remedy``) with fewer than MIN_FRAMES measured frames."""
    raw = [r for r in index if r.get("kind") == "raw"]
    if not raw:
        raise RuntimeError(f"{what}: the server wrote no raw frame; see its log above")
    first_ns = min(r["header"]["mono_ns"] for r in raw)
    warm_end_ns = first_ns + int(warmup_s * 1e9)
    collected = _collect(sub.enhanced, index, first_ns, warm_end_ns)
    measured = collected[3]
    if measured < MIN_FRAMES:
        raise ValueError(
            f"{what}: only {measured} enhanced frames after the {warmup_s:g} s warm-up reached "
            f"the subscriber (need {MIN_FRAMES}): {remedy}"
        )
    return raw, warm_end_ns, collected


def _collect(
    enhanced: list[tuple[int, bytes]], index: list[dict[str, Any]], first_ns: int,
    warm_end_ns: int,
) -> Collected:  # fmt: skip
    """Per-stage samples (ms) and their frame times (s since ``first_ns``) of the enhanced
    frames a subscriber received and of the disk writes in the run's index, after the warm-up;
    the function adding more, and how many enhanced frames were measured."""
    samples: dict[str, list[float]] = {s: [] for s in STAGES}
    times: dict[str, list[float]] = {s: [] for s in STAGES}

    def add(stage: str, mono_ns: int, ms: float) -> None:
        samples[stage].append(float(ms))
        times[stage].append((mono_ns - first_ns) / 1e9)

    measured = 0
    for arrival_ns, raw_header in enhanced:
        try:
            h = decode_header(raw_header, PublishedHeader)
        except ProtocolError:
            continue
        if h.mono_ns < warm_end_ns:
            continue
        measured += 1
        t = h.timings_ms
        for stage in SERVER_STAGES:
            if stage in t:
                add(stage, h.mono_ns, t[stage])
        total = (arrival_ns - h.mono_ns) / 1e6
        add("publish", h.mono_ns, total - sum(t.values()))  # fidelity, if any, is server work
        add("total", h.mono_ns, total)
    for r in index:
        mono_ns = r["header"]["mono_ns"]
        if mono_ns >= warm_end_ns and "disk" in r.get("timings_ms", {}):
            add("disk", mono_ns, r["timings_ms"]["disk"])
    return samples, times, add, measured


def _hook_samples(
    stats: HookStats | None,
    raw: list[dict[str, Any]],
    warm_end_ns: int,
    add: Callable[[str, int, float], None],
) -> bool:
    """Add the hook's per-frame times after the warm-up; False when frames cannot be matched.

    The hook keeps one time per sent frame, in order; when every sent frame reached the server,
    the n-th time belongs to the raw frame with the n-th smallest seq."""
    if stats is None:
        return False
    values = stats.send_us.values() / 1e3
    ordered = sorted(raw, key=lambda r: r["header"]["seq"])
    if len(values) != len(ordered) or len(values) != stats.frames_sent:
        return False
    for ms, r in zip(values, ordered, strict=True):
        if r["header"]["mono_ns"] >= warm_end_ns:
            add("hook", r["header"]["mono_ns"], ms)
    return True


# -- several streams into one server, per backend --------------------------------------------


def run_stream_latency(
    *,
    engine: str,
    backends: Sequence[str] = ("auto",),
    streams: Sequence[int] = (1,),
    fps: float = 20.0,
    size: int = 256,
    duration_s: float = 30.0,
    warmup_s: float = 2.0,
    mode: str = "live",
    triton_url: str | None = None,
    triton_venv: Path | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Per-stage latency of ``engine`` with N concurrent simulated streams (each its own hook
    and stream id, ``size`` x ``size`` uint16 at ``fps``) into ONE ``scopecast serve``, for every
    backend and every N: one case per (backend, N), each its own server for ``duration_s``,
    taken in turns (N outer, backend inner) so a busy machine weighs on all backends alike.

    ``--backend triton`` uses the Triton at ``triton_url``; without one, a local
    ``tritonserver`` from ``triton_venv`` serves the engine (exported on the fly) for the whole
    run and is killed afterwards. ``overhead`` compares every backend with the first one, case
    by case (same N)."""
    from .soak import start_streams
    from .triton_server import local_triton

    backends = list(dict.fromkeys(backends)) or ["auto"]
    counts = list(dict.fromkeys(int(n) for n in streams)) or [1]
    for b in backends:
        _check(duration_s=duration_s, warmup_s=warmup_s, mode=mode, backend=b)
    if any(not 1 <= n <= 64 for n in counts):
        raise ValueError(f"--streams {counts}: each must be 1..64")
    if not fps > 0 or not 8 <= size <= 8192:
        raise ValueError(f"--fps {fps:g} must be > 0 and --size {size} 8..8192 pixels")
    try:
        load_package(engine)
    except PackageError as e:
        raise ValueError(str(e)) from e
    if triton_url is not None and "triton" not in backends:
        raise ValueError(f"--triton-url {triton_url!r} needs --backend triton")
    say = progress or (lambda message: None)
    result: dict[str, Any] = {
        "kind": "latency-streams", "engine": engine, "backends": backends, "streams": counts,
        "fps": fps, "size": size, "duration_s": duration_s, "warmup_s": warmup_s, "mode": mode,
        "triton_url": triton_url, "triton": None, "cases": [],
    }  # fmt: skip
    with contextlib.ExitStack() as stack:
        url = triton_url
        if "triton" in backends and url is None:
            say(f"starting a local tritonserver for {engine} (Python backend, CPU)")
            try:
                server = stack.enter_context(local_triton([engine], venv=triton_venv))
            except TritonUnavailable as e:
                raise ValueError(f"--backend triton: {e}; or give --triton-url") from None
            url = server.url
            result["triton"] = f"local tritonserver {server.binary} at {url}"
        elif url is not None:
            result["triton"] = f"given at {url}"
        for n in counts:
            for b in backends:
                say(f"{b}, {n} stream(s): {duration_s:g} s at {fps:g} fps, {size}x{size}")
                case = _measure_streams(
                    engine, b, n, fps=fps, size=size, duration_s=duration_s, warmup_s=warmup_s,
                    mode=mode, triton_url=url if b == "triton" else None, seed=seed,
                    start_streams=start_streams, say=say,
                )  # fmt: skip
                total = case["latency_ms"]["total"]
                say(f"{b}, {n} stream(s): total p50 {total['p50']:.2f} ms, p99 "
                    f"{total['p99']:.2f} ms, {case['frames_skipped']} skipped")  # fmt: skip
                result["cases"].append(case)
    result["overhead"] = _overhead(result["cases"], backends[0])
    return result


def _overhead(cases: list[dict[str, Any]], base: str) -> list[dict[str, Any]]:
    """Per N and backend, its p50/p99 minus the first backend's (ms), stage by stage."""
    first = {c["streams"]: c for c in cases if c["backend_requested"] == base}
    rows = []
    for c in cases:
        ref = first.get(c["streams"])
        if c["backend_requested"] == base or ref is None:
            continue
        row: dict[str, Any] = {"streams": c["streams"], "backend": c["backend_requested"],
                               "vs": base}  # fmt: skip
        for stage in ("inference", "total"):
            for q in ("p50", "p99"):
                a, b = c["latency_ms"][stage].get(q), ref["latency_ms"][stage].get(q)
                row[f"{stage}_{q}_ms"] = None if a is None or b is None else a - b
        rows.append(row)
    return rows


def _measure_streams(
    engine: str, backend: str, n: int, *, fps: float, size: int, duration_s: float,
    warmup_s: float, mode: str, triton_url: str | None, seed: int, start_streams: Any,
    say: Progress,
) -> dict[str, Any]:  # fmt: skip
    """One case: its own server, a subscriber, ``n`` streams; the per-stage summary."""
    from .fuzz import ServerProcess

    args = ["--engine", engine, "--mode", mode, "--backend", backend, "--quiet"]
    if triton_url is not None:
        args += ["--triton-url", triton_url]
    rss: list[float] = []
    with tempfile.TemporaryDirectory(prefix="scopecast-latency-") as tmp:
        server = ServerProcess(Path(tmp), *args)
        sub: _Subscriber | None = None
        stop = threading.Event()
        try:
            sub = _Subscriber(server.publish)
            start = _wait_for_viewer(server.control)
            hooks, senders = start_streams(server.listen, streams=n, fps=fps, size=size,
                                           duration_s=duration_s, seed=seed, stop=stop,
                                           prefix="lat")  # fmt: skip
            t0 = time.monotonic()
            try:
                while any(t.is_alive() for t in senders):
                    time.sleep(2.0)
                    if not server.alive:
                        raise RuntimeError(f"the server exited: {server.log()[-2000:]}")
                    status = server.status()
                    if status.rss_mb is not None:
                        rss.append(status.rss_mb)
                    say(f"{backend}, {n} stream(s): {time.monotonic() - t0:.0f} s, "
                        f"{status.frames_received} received, {status.frames_enhanced} enhanced, "
                        f"{status.frames_skipped} skipped")  # fmt: skip
            finally:
                stop.set()
                for t in senders:
                    t.join()
            elapsed = time.monotonic() - t0
            sent = {h.stream: h.stats.frames_sent for h in hooks}
            not_handed_over = sum(h.stats.frames_not_handed_over for h in hooks)
            stats = {h.stream: h.stats for h in hooks}
            for hook in hooks:
                hook.close()
            summary = server.stop(sent, timeout_s=300)
        finally:
            if sub is not None:
                sub.stop()
            server.kill()
        index = read_index(server.run_dir / INDEX_NAME)
    raw, warm_end_ns, (samples, _, add, measured) = _after_warmup(
        sub, index, warmup_s, f"{backend}, {n} streams", "raise --duration or lower --fps"
    )
    hook_exact = all(
        _hook_samples(st, [r for r in raw if r["header"]["stream"] == name], warm_end_ns, add)
        for name, st in stats.items()
    )
    if summary.rss_mb is not None:
        rss.append(summary.rss_mb)
    described = summary.engine.backend[0] if summary.engine.backend else None
    cpu_s = summary.cpu_s - start.cpu_s
    wall_s = summary.uptime_s - start.uptime_s
    received = summary.frames_received
    return {
        "backend_requested": backend,
        "backend": " ".join(x for x in (described.name, described.device) if x)
        if described
        else "",
        "streams": n,
        "latency_ms": {s: percentiles(samples[s]) for s in STAGES},
        "hook_warmup_excluded": hook_exact,
        "frames_measured": measured,
        "frames_sent": sum(sent.values()),
        "frames_not_handed_over": not_handed_over,
        "frames_received": received,
        "frames_enhanced": summary.frames_enhanced,
        "frames_skipped": summary.frames_skipped,
        "frames_received_by_subscriber": len(sub.enhanced),
        "engine_errors": summary.engine_errors,
        "elapsed_s": elapsed,
        "fps_received": received / elapsed if elapsed > 0 else None,
        "enhanced_fps": summary.frames_enhanced / elapsed if elapsed > 0 else None,
        "rss_mb": max(rss) if rss else None,
        "cpu_percent": 100 * cpu_s / wall_s if wall_s > 0 else None,
        "server_healthy": summary.healthy,
    }


def plot_stream_latency(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """``latency_streams.png``: total p50 and p99 per backend against the number of streams."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for b in result["backends"]:
        cases = [c for c in result["cases"] if c["backend_requested"] == b]
        x = [c["streams"] for c in cases]
        for q, style in (("p50", "-o"), ("p99", "--o")):
            y = [c["latency_ms"]["total"].get(q) for c in cases]
            ax.plot(x, [np.nan if v is None else v for v in y], style, label=f"{b} {q}")
    ax.set_xlabel("concurrent streams into one server")
    ax.set_ylabel("frameReady -> subscriber (ms)")
    ax.set_title(f"{result['engine']}, {result['size']}x{result['size']} at {result['fps']:g} "
                 f"fps per stream, {result['mode']}")  # fmt: skip
    ax.legend(fontsize=8)
    path = out_dir / "latency_streams.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def plot_latency(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Per engine, ``latency_ENGINE_hist.png`` (histogram per stage) and
    ``latency_ENGINE_timeline.png`` (per-frame stage times vs frame time); the written paths."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, r in result.get("engines", {}).items():
        samples = r.get("samples")
        if not samples:
            raise ValueError(
                f"engine {name!r} has no per-frame samples to plot: plot the result of "
                "run_latency before its samples are stripped"
            )
        times = r.get("sample_times_s", {})
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))
        for kind in ("hist", "timeline"):
            fig, axes = plt.subplots(3, 3, figsize=(13, 10), constrained_layout=True)
            for ax, stage in zip(axes.flat, STAGES, strict=True):
                values = np.asarray(samples.get(stage, []), dtype=float)
                ax.set_title(f"{stage} (n={values.size})", fontsize=10)
                if values.size == 0:
                    ax.text(0.5, 0.5, "no samples", ha="center", va="center",
                            transform=ax.transAxes)  # fmt: skip
                    continue
                p = percentiles(values)
                if kind == "hist":
                    ax.hist(values, bins=min(60, max(10, values.size // 10)), color="tab:blue")
                    for q, style in (("p50", "-"), ("p99", "--")):
                        ax.axvline(p[q], color="tab:red", linestyle=style, label=f"{q} {p[q]:.2f}")
                    ax.set_xlabel("ms")
                    ax.legend(fontsize=8)
                else:
                    t = np.asarray(times.get(stage, []), dtype=float)
                    ax.plot(t[: values.size], values[: t.size], ".", markersize=2)
                    ax.axhline(p["p99"], color="tab:red", linestyle="--", linewidth=0.8,
                               label=f"p99 {p['p99']:.2f}")  # fmt: skip
                    ax.set_xlabel("frame time (s)")
                    ax.set_ylabel("ms")
                    ax.legend(fontsize=8)
            what = "histograms" if kind == "hist" else "per frame"
            fig.suptitle(f"latency per stage, engine {name} ({what}; backend {r.get('backend')})")
            path = out_dir / f"latency_{safe}_{kind}.png"
            fig.savefig(path, dpi=80)
            plt.close(fig)
            written.append(path)
    return written
