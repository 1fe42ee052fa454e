"""Fuzzing a real engine server (``scopecast serve`` in another process, real sockets, files read
back): hostile messages of every kind, interleaved with good frames, never stop a stage, are
counted under the kind each deserves, and every accepted frame lands on disk bit-exact.

The messages come from :mod:`bench.fuzz` (the same generator ``scopecast bench fuzz`` runs at
scale), driven here by seeds hypothesis draws. One server serves the whole module; each
test checks the change of the server's counters over its own messages.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import fuzz
from stream.protocol import ProtocolError, decode


class Fuzzed:
    """The module's server, a client, the stream state, and every frame accepted so far."""

    def __init__(self, out) -> None:
        self.server = fuzz.ServerProcess(out, "--engine", "identity", "--mode", "complete")
        self.client = fuzz.Client(self.server.listen, self.server.control)
        self.state = fuzz.FuzzState()
        self.frames: dict = {}

    def exchange(self, items: list) -> fuzz.Tally:
        """Send messages and control requests in order; assert the server accounted for each."""
        tally = fuzz.Tally()
        before = self.server.status()
        for item in items:
            if isinstance(item, fuzz.ControlMessage):
                tally.answer(item, self.client.ask(item))
            else:
                tally.add(item)
                self.client.send(item)
        after = fuzz.wait_processed(self.server, before, tally, timeout_s=60)
        assert self.server.alive, self.server.log()[-3000:]
        problems = fuzz.mismatches(tally, before, after)
        assert not problems, (problems, self.server.log()[-3000:])
        assert after.healthy is True and after.failure is None
        assert after.stage_errors.seen() == {}
        written = fuzz.check_written(self.server.run_dir, tally.frames)
        assert written["problems"] == [] and written["exact"] == len(tally.frames)
        self.frames.update(tally.frames)
        return tally


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    f = Fuzzed(tmp_path_factory.mktemp("fuzz"))
    yield f
    f.client.close()
    f.server.kill()


def _kind(msg: fuzz.Message) -> str:
    try:
        decode(list(msg.parts))
    except ProtocolError as e:
        return e.kind
    return "accepted"


def test_the_generator_expects_what_the_protocol_decides():
    """No server: each message's expected kind, worked out from how it was made, is what
    ``stream.protocol.decode`` says (so a disagreement in the server tests is the server's)."""
    state = fuzz.FuzzState()
    rng = random.Random(7)
    messages = fuzz.catalog(state, rounds=10) + [fuzz.message(rng, state) for _ in range(2000)]
    wrong = [(m.label, m.expect, _kind(m)) for m in messages if _kind(m) != m.expect]
    assert wrong == []
    assert {m.expect for m in messages} == set(fuzz.KINDS)
    assert {m.category for m in messages} >= set(fuzz.HOSTILE) | {"good", "edge"}
    controls = fuzz.control_catalog(rounds=3) + [fuzz.control_message(rng) for _ in range(300)]
    assert not any(fuzz._would_stop(b"".join(c.parts)) for c in controls if c.rejected)


def test_every_hostile_variant_between_good_frames(fuzzed):
    """Each hostile category walked through its variants, a good frame after each message,
    and every kind of valid but unusual frame (3-D, float32 with NaN, extreme metadata)."""
    messages = fuzz.catalog(fuzzed.state, rounds=10)
    tally = fuzzed.exchange(messages)
    assert set(tally.categories) >= set(fuzz.HOSTILE)
    assert all(tally.sent[k] for k in fuzz.KINDS)


def test_control_socket_refuses_malformed_requests(fuzzed):
    """Multipart, non-JSON, deep, huge and non-finite requests (``stop`` included, never a
    valid one) are refused with an error answer; valid ``status`` requests still answered."""
    controls = fuzz.control_catalog(rounds=3)
    good = [fuzz.good_frame(random.Random(i), fuzzed.state) for i in range(len(controls))]
    tally = fuzzed.exchange([x for pair in zip(controls, good, strict=True) for x in pair])
    assert tally.control_rejected == sum(c.rejected for c in controls) > 0


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(10, 40))
def test_random_interleavings(fuzzed, seed, n):
    """Random mixes of good, unusual and hostile messages and control requests.

    Hypothesis draws only the seed: the generator's draws depend on the shared stream state
    (sequence numbers, header lengths), which a strategy's own draws must not (hypothesis
    reports that as a flaky strategy)."""
    rng = random.Random(seed)
    items = [
        fuzz.control_message(rng)
        if rng.random() < 0.1
        else fuzz.message(rng, fuzzed.state, good=0.3)
        for _ in range(n)
    ]
    fuzzed.exchange(items)


def test_last_the_server_stops_with_every_frame_in_its_files(fuzzed):
    """Last: the server stops healthy, without disk errors, and its files hold every accepted
    frame of the whole module bit-exact and open as OME-TIFFs."""
    assert fuzzed.frames
    expect = dict(Counter(stream for stream, _ in fuzzed.frames))
    summary = fuzzed.server.stop(expect)
    assert fuzzed.server.proc.returncode == 0, fuzzed.server.log()[-3000:]
    assert summary.healthy is True and summary.stage_errors.seen() == {}
    assert summary.disk_errors.seen() == {}
    written = fuzz.check_written(fuzzed.server.run_dir, fuzzed.frames)
    assert written["problems"] == [] and written["exact"] == len(fuzzed.frames)
    raw_files = sorted(fuzzed.server.run_dir.glob("*_raw*.ome.tif"))
    assert raw_files
    for path in raw_files:
        with tifffile.TiffFile(path) as tif:
            assert tif.is_ome, path.name
