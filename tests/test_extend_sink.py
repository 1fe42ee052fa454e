"""Adding a sink is one module plus one row: the toy flat-binary sink of ``toy_sink.py``,
registered with one ``register_sink`` call, stores a real engine server's frames, reads them
back bit-exact, and ``recover`` rebuilds its file after an unclean close."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from test_server import ramp_frames, send_frames
from toy_sink import SUFFIX, FlatSink, read_flat, recover_flat

from stream.acquire import free_endpoint
from stream.server import EngineServer, ServerConfig, ServerError
from stream.sinks import SINKS, RunWriter, read_index, recover, register_sink
from stream.sinks.store import INDEX_NAME


@pytest.fixture
def flat():
    register_sink("flat", FlatSink, suffix=SUFFIX, recover=recover_flat)  # the one row
    yield "flat"
    SINKS.pop("flat")


def test_a_server_stores_through_a_registered_sink(tmp_path, flat):
    config = ServerConfig(out_dir=tmp_path, listen=free_endpoint(), publish=None,
                          control=free_endpoint(), mode="complete", sink=flat)  # fmt: skip
    server = EngineServer(config)
    results: list = []
    runner = threading.Thread(target=lambda: results.append(server.run()))
    runner.start()
    frames = ramp_frames(12, shape=(16, 24))
    try:
        send_frames(config.listen, frames, positions=2)
    finally:
        server.stop({"scope": len(frames)}, timeout_s=60)
        runner.join(60)
    (summary,) = results
    assert summary.healthy and summary.stage_errors.seen() == {}
    assert summary.disk_errors.seen() == {} and summary.engine_errors == {}
    assert summary.frames_written.raw == summary.frames_written.enhanced == len(frames)
    for p in (0, 1):
        for kind in ("raw", "identity"):
            path = server.run_dir / f"scope_p{p:03d}_{kind}{SUFFIX}"
            assert str(path) in summary.files
            assert np.array_equal(read_flat(path), np.stack(frames[p::2]))  # bit-exact
    assert not list(server.run_dir.glob("*.ome.tif"))


def test_recover_dispatches_to_the_sink_after_an_unclean_close(tmp_path, flat):
    from stream.protocol import FrameHeader

    run = RunWriter(tmp_path, sink=flat)
    frames = ramp_frames(5, shape=(8, 10))
    for seq, frame in enumerate(frames):
        header = FrameHeader(stream="cam", seq=seq, shape=frame.shape, dtype="uint16",
                             mono_ns=seq, wall_time=0.0, index={"t": seq})  # fmt: skip
        run.write_raw(header, frame)
    path = tmp_path / f"cam_p000_raw{SUFFIX}"
    with path.open("ab") as f:
        f.write(b"\0" * 37)  # the process died while writing a sixth plane, and never closed
    assert not (tmp_path / f"cam_p000_raw{SUFFIX}.json").exists()
    assert len(read_index(tmp_path / INDEX_NAME)) == len(frames)

    result = recover(path)  # by the file's suffix, through the registry
    assert result.planes == len(frames) and result.bad_crc == 0 and result.from_index
    assert result.output.name == f"cam_p000_raw.recovered{SUFFIX}"
    assert np.array_equal(read_flat(result.output), np.stack(frames))


def test_an_unknown_sink_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="unknown sink 'nope': choose one of ome-tiff"):
        RunWriter(tmp_path / "run", sink="nope")
    assert not (tmp_path / "run").exists()
    config = ServerConfig(out_dir=tmp_path, listen=free_endpoint(), publish=None,
                          control=free_endpoint(), sink="nope")  # fmt: skip
    with pytest.raises(ServerError, match="unknown sink"):
        EngineServer(config)
    assert list(tmp_path.iterdir()) == []
