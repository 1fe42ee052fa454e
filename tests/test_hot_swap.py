"""Hot swap of the engine in a running server (stream.swap): a steady stream of frames, a swap
mid-stream, no frame lost or skipped, each frame named with the engine that made it (index and
OME-XML read back), failed swaps that leave the old engine serving, the temporal-state rule,
and ``scopecast status --swap`` against a real server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import useq
from test_server import ramp_frames, send_frame, send_frames, started_hook

from engines.engine import EngineChain
from engines.package import ZOO_DIR
from stream.acquire import free_endpoint
from stream.control import ControlError, request, wait_swap
from stream.control import swap as ask_swap
from stream.hook import FrameHook
from stream.protocol import FrameHeader
from stream.ring import Rings
from stream.server import EngineServer, ServerConfig
from stream.sinks import RunWriter, read_index, recover
from stream.swap import EngineSwap, SwapRefused, chain_id

SHAPE = (32, 40)


def ids(*names: str) -> list[str]:
    """``name@version:sha`` of each shipped engine, as the index and the OME-XML name it."""
    return [chain_id(EngineChain.open([n])) for n in names]


def enhanced_records(run_dir: Path) -> list[dict]:
    return [r for r in read_index(run_dir / "index.jsonl") if r["kind"] == "enhanced"]


def engines_note(path: Path) -> str:
    """The ``scopecast.engines`` value of an OME-TIFF's MapAnnotation."""
    with tifffile.TiffFile(path) as tif:
        ome = tifffile.xml2dict(tif.ome_metadata)["OME"]
    pairs = ome["StructuredAnnotations"]["MapAnnotation"]["Value"]["M"]
    return {m["K"]: m["value"] for m in pairs}["scopecast.engines"]


class Sender(threading.Thread):
    """A steady stream of frames (one acquisition, t = 0, 1, ...) through a real FrameHook,
    about ``fps`` a second, until :meth:`finish_after` frames more than were sent by then."""

    def __init__(self, endpoint: str, *, fps: float = 50.0, limit: int = 3000) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.period, self.limit = endpoint, 1.0 / fps, limit
        self.sent: list[np.ndarray] = []
        self._stop_at: int | None = None
        self._rng = np.random.default_rng(7)

    def finish_after(self, more: int) -> None:
        self._stop_at = len(self.sent) + more

    def run(self) -> None:
        hook = FrameHook(self.endpoint, stream="scope", hwm=10_000)
        hook.wait_for_receiver(10)
        hook.sequenceStarted(useq.MDASequence(time_plan={"interval": 0, "loops": 1}))
        t = 0
        while t < self.limit and (self._stop_at is None or t < self._stop_at):
            frame = self._rng.integers(0, 4000, SHAPE, dtype=np.uint16)
            assert hook.send(frame, event=useq.MDAEvent(index={"t": t}),
                             meta={"pixel_size_um": 0.5})  # fmt: skip
            self.sent.append(frame)
            t += 1
            time.sleep(self.period)
        hook.close()


def wait_for(predicate, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# -- a swap mid-stream --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["complete", "live"])
def test_swap_mid_stream_loses_nothing_and_each_frame_names_its_engine(tmp_path, servers, mode):
    srv = servers(tmp_path, "--engine", "identity", "--mode", mode)
    sender = Sender(srv.listen)
    sender.start()
    wait_for(lambda: srv.status()["frames_enhanced"] >= 20)
    reply = request(srv.control, "swap", engines=["gaussian"])
    assert reply["swap"] == "loading" and reply["previous"] == "identity"
    info = wait_swap(srv.control, reply["number"], timeout_s=60)
    assert info.state == "done", info.error
    sender.finish_after(30)  # frames keep coming through the switch and after it
    sender.join(120)
    n = len(sender.sent)
    summary = srv.stop({"scope": n})

    identity, gaussian = ids("identity", "gaussian")
    assert summary["engine"]["engine"] == "gaussian" and summary["engine"]["id"] == gaussian
    assert summary["swap"]["state"] == "done" and summary["swap"]["engine_id"] == gaussian
    assert summary["frames_received"] == summary["frames_written"]["raw"] == n
    assert summary["frames_missing"] == 0 and summary["engine_errors"] == {}
    m = summary["frames_enhanced"]  # complete: every frame; live: the rest were skipped
    assert m + summary["frames_skipped"] == n and summary["frames_written"]["enhanced"] == m
    if mode == "complete":
        assert m == n and summary["frames_skipped"] == summary["frames_not_enhanced"] == 0
    k = summary["swap"]["switched_after"]
    assert 20 <= k <= m - 1

    # the index: in order, every frame before the switch made by identity, after it by gaussian
    records = enhanced_records(srv.run_dir)
    seqs = [r["header"]["seq"] for r in records]
    assert seqs == (list(range(n)) if mode == "complete" else sorted(set(seqs)))
    assert [r["engine_id"] for r in records] == [identity] * k + [gaussian] * (m - k)
    assert {r["file"] for r in records} == {"scope_p000_identity.ome.tif"}  # one file, kept
    # the pixels: identity gives the raw frame back, gaussian smooths it
    enhanced_file = srv.run_dir / "scope_p000_identity.ome.tif"
    enh = tifffile.imread(enhanced_file).reshape(-1, *SHAPE)
    raw = np.stack(sender.sent)[seqs]
    assert len(enh) == m and np.array_equal(enh[:k], raw[:k])
    for i in (k, m - 1):
        assert enh[i].std() < 0.6 * raw[i].std()
        assert abs(float(enh[i].mean()) - float(raw[i].mean())) < 60
    # the OME-XML names each engine with its plane range
    assert engines_note(enhanced_file) == (
        f"{identity}: planes 0..{k - 1}; {gaussian}: planes {k}..{m - 1}"
    )


# -- failed swaps -------------------------------------------------------------------------------


def test_failed_swaps_leave_the_old_engine_serving_and_say_why(tmp_path, servers):
    srv = servers(tmp_path / "run", "--engine", "identity", "--mode", "complete")
    frames = ramp_frames(6, shape=SHAPE)
    send_frames(srv.listen, frames[:3])
    wait_for(lambda: srv.status()["frames_enhanced"] == 3)
    tampered = shutil.copytree(ZOO_DIR / "gaussian", tmp_path / "tampered")
    model = tampered / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + bytes([model.read_bytes()[-1] ^ 1]))
    for engine, says in (
        ("no-such-engine", ["'no-such-engine' not found", "available:"]),
        ("bicubic-x2", ["scale 2", "scale 1", "swap to an engine of scale 1"]),
        (str(tampered), ["sha256", "model.onnx"]),
    ):
        info = wait_swap(srv.control, ask_swap(srv.control, [engine]), timeout_s=60)
        assert info.state == "failed", engine
        assert info.error is not None and "'identity' keeps serving" in info.error
        for words in says:
            assert words in info.error, (engine, info.error)
        assert srv.status()["engine"]["engine"] == "identity"
    send_frames(srv.listen, frames[3:])
    summary = srv.stop({"scope": 6})  # frames received so far, by stream
    assert summary["frames_enhanced"] == 6 and summary["engine_errors"] == {}
    assert summary["swap"]["number"] == 3 and summary["swap"]["state"] == "failed"
    (identity,) = ids("identity")
    assert [r["engine_id"] for r in enhanced_records(srv.run_dir)] == [identity] * 6
    # each send_frames is its own acquisition: its own file (the second one's named _a002)
    enh = [tifffile.imread(srv.run_dir / f"scope{a}_p000_identity.ome.tif").reshape(-1, *SHAPE)
           for a in ("", "_a002")]  # fmt: skip
    assert np.array_equal(np.concatenate(enh), np.stack(frames))


def test_a_second_swap_is_refused_while_one_loads(tmp_path):
    release = threading.Event()

    def slow_open(engines, backend, threads):
        release.wait(30)
        return EngineChain.open(engines, backend, threads)

    serving = EngineChain.open(["identity"])
    swap = EngineSwap(slow_open, "auto", None)
    first = swap.request(["gaussian"], serving=serving, samples=[])
    assert first.state == "loading" and first.number == 1 and swap.take() is None
    with pytest.raises(SwapRefused, match="swap 1 to 'gaussian' is still loading"):
        swap.request(["identity"], serving=serving, samples=[])
    release.set()
    wait_for(lambda: swap.info.state == "ready")
    assert swap.info.warmup_shapes == [[512, 512]]  # no frame yet: the engine's tile size
    chain = swap.take()
    assert chain is not None and chain.name == "gaussian" and swap.take() is None
    swap.switched(chain, after=0)
    assert swap.info.state == "done" and swap.backend == "auto"
    swap.close()
    with pytest.raises(SwapRefused, match="stopping"):
        swap.request(["identity"], serving=chain, samples=[])
    chain.close()


def test_a_malformed_swap_request_is_refused_at_once(tmp_path, servers):
    srv = servers(tmp_path, "--engine", "identity")
    for fields, says in (({}, "swap needs 'engines'"), ({"engines": []}, "swap needs 'engines'")):
        with pytest.raises(ControlError, match=says):
            request(srv.control, "swap", **fields)
    with pytest.raises(ControlError, match="go with swap"):
        request(srv.control, "status", engines=["gaussian"])
    assert srv.stop()["swap"] is None


# -- temporal state -----------------------------------------------------------------------------


def header(t: int) -> FrameHeader:
    return FrameHeader(stream="s", seq=t, index={"t": t}, shape=(4, 4), dtype="uint16",
                       mono_ns=t, wall_time=0.0, acquisition="a")  # fmt: skip


def test_rings_restart_keeps_raw_frames_and_forgets_previous_outputs():
    rings = Rings(1, background=False, keep_previous=False)
    frames = [np.full((4, 4), v, np.uint16) for v in range(5)]
    rings.push(header(0), frames[0])
    rings.push(header(1), frames[1], snapshot=False)  # a window-1 ring holds its latest frame
    rings.restart(2, background=True, keep_previous=True)
    key = header(0).state_key
    window = rings.snapshot(key)  # the new engine's first window: the raw frame kept
    assert [int(f[0, 0]) for f in window.frames] == [1, 1] and window.previous == {}
    assert window.background is not None and window.background[0, 0] == 1  # history from it
    assert rings.set_previous(key, 0, np.zeros((4, 4), np.float32), window.generation)
    w2 = rings.push(header(2), frames[2])
    assert [int(f[0, 0]) for f in w2.frames] == [1, 2] and 0 in w2.previous
    assert w2.background is not None and w2.background[0, 0] == 1.5  # median of 1, 2
    rings.restart(2, background=True, keep_previous=True)  # the next engine starts fresh again
    stale = w2.generation
    w3 = rings.push(header(3), frames[3])
    assert [int(f[0, 0]) for f in w3.frames] == [2, 3] and w3.previous == {}
    assert w3.background is not None and w3.background[0, 0] == 2  # median of 1, 2, 3: kept
    assert not rings.set_previous(key, 0, np.ones((4, 4), np.float32), stale)  # old engine's
    assert rings.stats()["resets"]["first"] == 1 and sum(rings.stats()["resets"].values()) == 1
    assert rings.restarts == 2


def test_a_temporal_engine_restarts_fresh_at_a_swap_with_the_raw_ring_kept(tmp_path):
    """confocal-denoise-sr2x (window 2, previous output, background) swapped for itself: the
    first frame after the swap is the first-frame rule (no previous output) on the kept raw
    window and background; the next one uses the new engine's own previous output."""
    config = ServerConfig(engines=["confocal-denoise-sr2x"], out_dir=tmp_path,
                          listen=free_endpoint(), publish=None, control=free_endpoint(),
                          mode="complete", max_pause_s=None)  # fmt: skip
    server = EngineServer(config)
    results: list = []
    runner = threading.Thread(target=lambda: results.append(server.run()))
    runner.start()
    rng = np.random.default_rng(3)
    k = 5  # frames before the swap; the last of them is brighter, so the window shows
    raw = [(rng.poisson(800 if t == k - 1 else 200, SHAPE) + 50).astype(np.uint16)
           for t in range(8)]  # fmt: skip
    hook = FrameHook(config.listen, stream="scope", hwm=100)
    try:
        hook.wait_for_receiver(10)
        hook.sequenceStarted(useq.MDASequence(time_plan={"interval": 0, "loops": 1}))

        def send(t: int) -> None:
            assert hook.send(raw[t], event=useq.MDAEvent(index={"t": t}))

        for t in range(k):
            send(t)
        wait_for(lambda: server.enhanced == k)
        number = server.swap(["confocal-denoise-sr2x"])["number"]
        wait_for(lambda: server.swapper.info.state == "done")
        assert server.swapper.info.number == number
        for t in range(k, len(raw)):
            send(t)
    finally:
        hook.close()
        server.stop({"scope": len(raw)}, timeout_s=60)
        runner.join(120)
    (summary,) = results
    assert summary.frames_enhanced == len(raw)
    assert summary.swap is not None and summary.swap.switched_after == k
    assert sum(summary.rings.resets.model_dump().values()) == 1  # only the first frame's
    enh = tifffile.imread(server.run_dir / "scope_p000_confocal-denoise-sr2x.ome.tif")
    enh = enh.reshape(-1, 2 * SHAPE[0], 2 * SHAPE[1]).astype(int)

    chain = EngineChain.open(["confocal-denoise-sr2x"])

    def background(t: int) -> np.ndarray:  # the running median of the key's last 9 raw frames
        return np.median(np.stack(raw[max(0, t - 8) : t + 1]), axis=0).astype(np.float32)

    fresh = chain.enhance([raw[k - 1], raw[k]], {}, background(k))
    assert np.abs(enh[k] - fresh.frame).max() <= 1  # the rule: fresh state, raw ring kept
    continued = chain.enhance([raw[k - 1], raw[k]], {0: enh[k - 1].astype(np.float32)},
                              background(k))  # fmt: skip
    assert np.abs(enh[k] - continued.frame).mean() > 5  # not the old engine's previous output
    window_reset = chain.enhance([raw[k], raw[k]], {}, background(k))
    assert np.abs(enh[k] - window_reset.frame).mean() > 5  # the raw window was kept
    after = chain.enhance([raw[k], raw[k + 1]], {0: fresh.stages[0].output}, background(k + 1))
    assert np.abs(enh[k + 1] - after.frame).max() <= 1  # then the new engine's own state
    chain.close()


# -- the sink and recover -----------------------------------------------------------------------


def test_the_enhanced_file_lists_its_engines_and_recover_keeps_them(tmp_path):
    run = RunWriter(tmp_path / "run")
    frames = ramp_frames(5, shape=(8, 8))
    made_by = ["a@1:aa", "a@1:aa", "b@2:bb", "b@2:bb", "a@1:aa"]
    for t, (frame, engine) in enumerate(zip(frames, made_by, strict=True)):
        h = FrameHeader(stream="s", seq=t, index={"t": t}, shape=(8, 8), dtype="uint16",
                        mono_ns=t, wall_time=0.0)  # fmt: skip
        run.write_raw(h, frame)
        rec = run.write_enhanced(h, frame, engine=engine[0], engine_id=engine, file_as="a",
                                 scale=1)  # fmt: skip
        assert (rec["engine"], rec["engine_id"]) == (engine[0], engine)
        assert rec["file"] == "s_p000_a.ome.tif"
    run.close()
    expected = "a@1:aa: planes 0..1; b@2:bb: planes 2..3; a@1:aa: planes 4..4"
    assert engines_note(tmp_path / "run" / "s_p000_a.ome.tif") == expected
    again = recover(tmp_path / "run" / "s_p000_a.ome.tif", output=tmp_path / "again.ome.tif")
    assert again.planes == 5 and engines_note(again.output) == expected


# -- the command --------------------------------------------------------------------------------


def scopecast(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stream", *args], capture_output=True,
                          text=True, timeout=180, check=False,
                          env={**os.environ, "COLUMNS": "200"})  # fmt: skip


def test_status_swap_command_swaps_a_running_server(tmp_path, servers):
    srv = servers(tmp_path, "--engine", "identity", "--mode", "complete")
    frames = ramp_frames(10, shape=SHAPE)
    hook = started_hook(srv.listen)  # one acquisition across the swaps: one enhanced file
    for t in range(5):
        send_frame(hook, frames[t], t)
    wait_for(lambda: srv.status()["frames_enhanced"] == 5)
    identity, gaussian = ids("identity", "gaussian")

    run = scopecast("status", "--control", srv.control, "--swap", "gaussian")
    assert run.returncode == 0, run.stderr
    assert f"swapped identity -> {gaussian}" in run.stdout and "after 5 frames" in run.stdout

    run = scopecast("status", "--control", srv.control, "--swap", "bicubic-x2")
    assert run.returncode == 2
    assert "error: swap to 'bicubic-x2' failed" in run.stderr and "scale 2" in run.stderr
    assert "'gaussian' keeps serving" in run.stderr

    for t in range(5, 8):
        send_frame(hook, frames[t], t)
    wait_for(lambda: srv.status()["frames_enhanced"] == 8)
    run = scopecast("status", "--control", srv.control, "--swap", "identity", "--no-wait",
                    "--json")  # fmt: skip
    assert run.returncode == 0, run.stderr
    accepted = json.loads(run.stdout)
    assert accepted["swap"] == "loading" and accepted["engine"] == "identity"
    assert wait_swap(srv.control, accepted["number"], timeout_s=60).state == "done"
    for t in range(8, 10):
        send_frame(hook, frames[t], t)
    hook.close()
    summary = srv.stop({"scope": 10})
    assert summary["frames_enhanced"] == 10 and summary["engine"]["engine"] == "identity"
    enhanced_file = srv.run_dir / "scope_p000_identity.ome.tif"
    assert engines_note(enhanced_file) == (
        f"{identity}: planes 0..4; {gaussian}: planes 5..7; {identity}: planes 8..9"
    )

    run = scopecast("status", "--help")
    assert run.returncode == 0
    for words in ("--swap", "--no-wait", "--timeout", "--backend", "Exit codes"):
        assert words in run.stdout
