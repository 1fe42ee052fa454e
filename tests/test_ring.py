"""stream.ring: per-key temporal state, each reset row of the module's table, independent keys."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from stream.protocol import FrameHeader
from stream.ring import RESET_REASONS, Ring, Rings, Window

S = 1_000_000_000  # ns per second


def header(
    t: int | None = 0,
    p: int = 0,
    *,
    seq: int = 0,
    s: float | None = None,
    shape: tuple[int, ...] = (4, 4),
    dtype: str = "uint16",
    acquisition: str | None = "a",
) -> FrameHeader:
    """A header at time `s` seconds (default: t seconds, i.e. 1 frame per second)."""
    index = {"p": p} if t is None else {"t": t, "p": p}
    mono = int(((t or 0) if s is None else s) * S)
    return FrameHeader(
        stream="scope",
        seq=seq,
        index=index,
        shape=shape,
        dtype=dtype,
        mono_ns=mono,
        wall_time=0.0,
        acquisition=acquisition,
    )


def frame(value: float, shape: tuple[int, ...] = (4, 4), dtype: str = "uint16") -> np.ndarray:
    a = np.full(shape, value, dtype=dtype)
    a.flags.writeable = False  # the server hands read-only arrays
    return a


def values(w: Window) -> list[float]:
    return [float(f.flat[0]) for f in w.frames]


def filled(ring: Ring, n: int, *, value0: int = 0) -> Ring:
    for t in range(n):
        ring.push(header(t), frame(value0 + t))
    return ring


# --- window contents ------------------------------------------------------------------------


def test_window_is_padded_with_the_oldest_frame_then_slides():
    ring = Ring(window=3)
    got = []
    for t in range(5):
        ring.push(header(t), frame(t))
        got.append(values(ring.snapshot()))
    assert got == [[0, 0, 0], [0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4]]


def test_frames_are_held_by_reference():
    ring = Ring(window=2, background=True)
    a, b = frame(1), frame(2)
    ring.push(header(0), a)
    ring.push(header(1), b)
    w = ring.snapshot()
    assert w.frames[0] is a and w.frames[1] is b


def test_snapshot_is_not_changed_by_later_pushes():
    ring = filled(Ring(window=2), 2)
    w = ring.snapshot()
    ring.push(header(2), frame(2))
    assert values(w) == [0, 1]


def test_snapshot_before_any_push_says_what_to_do():
    with pytest.raises(RuntimeError, match="push a frame first"):
        Ring().snapshot()


def test_frame_must_match_its_header():
    with pytest.raises(ValueError, match=r"frame \(4, 5\) uint16 does not match .* \(4, 4\)"):
        Ring().push(header(0), frame(0, shape=(4, 5)))


@pytest.mark.parametrize("kwargs", [{"window": 0}, {"background_frames": 0}, {"max_pause_s": 0}])
def test_bad_config_is_refused(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        Ring(**kwargs)
    with pytest.raises(ValueError, match=name):
        Rings(**kwargs)


# --- reset reasons, one test per row of the table -------------------------------------------


def test_first():
    ring = Ring(window=2)
    assert ring.push(header(0), frame(0)) == "first"
    w = ring.snapshot()
    assert (w.reset, w.generation) == ("first", 1)
    assert ring.push(header(1), frame(1)) is None
    assert ring.snapshot().reset is None
    assert ring.generation == 1


def _with_state(**kwargs) -> Ring:
    """A ring with 3 frames (t=0..2, values 0..2), a previous output for stage 0 and 1."""
    ring = filled(Ring(window=3, background=True, background_frames=5, **kwargs), 3)
    for stage in (0, 1):
        assert ring.set_previous(stage, np.ones((8, 8), np.float32), ring.generation)
    return ring


@pytest.mark.parametrize(
    ("reason", "next_header", "keeps_background"),
    [
        ("acquisition", header(3, acquisition="b"), False),
        ("acquisition", header(3, acquisition=None), False),
        ("order", header(2), True),  # repeat
        ("order", header(1), True),  # going back
        ("gap", header(4), True),
        ("pause", header(3, s=2 + 10.5), True),
    ],
)
def test_reset_rows(reason, next_header, keeps_background):
    ring = _with_state()
    generation = ring.generation
    assert ring.push(next_header, frame(100)) == reason
    w = ring.snapshot()
    assert (w.reset, w.generation) == (reason, generation + 1)
    assert values(w) == [100, 100, 100]
    assert w.previous == {}
    # background median over (0, 1, 2, 100) if the history was kept, else just the new frame
    assert w.background is not None and w.background.dtype == np.float32
    assert float(w.background.flat[0]) == (1.5 if keeps_background else 100.0)
    assert ring.resets == {"first": 1, reason: 1}


def test_shape_and_dtype_changes_clear_everything():
    ring = _with_state()
    assert ring.push(header(3, shape=(4, 6)), frame(100, shape=(4, 6))) == "shape"
    w = ring.snapshot()
    assert values(w) == [100, 100, 100] and w.previous == {}
    assert w.background.shape == (4, 6) and float(w.background.flat[0]) == 100.0
    assert ring.push(header(4, dtype="uint8", shape=(4, 6)), frame(7, (4, 6), "uint8")) == "shape"
    assert ring.resets["shape"] == 2


def test_precedence_acquisition_then_shape_then_order():
    ring = _with_state()
    assert ring.push(header(0, shape=(4, 6), acquisition="b"), frame(1, (4, 6))) == "acquisition"
    assert ring.push(header(0, shape=(4, 4), acquisition="b"), frame(1)) == "shape"
    assert ring.push(header(0, s=99, acquisition="b"), frame(1)) == "order"


def test_pause_within_the_limit_is_no_reset_and_none_disables_it():
    ring = filled(Ring(window=2, max_pause_s=10.0), 1)
    assert ring.push(header(1, s=9.9), frame(1)) is None
    assert ring.push(header(2, s=30.0), frame(2)) == "pause"
    never = filled(Ring(window=2, max_pause_s=None), 1)
    assert never.push(header(1, s=1e6), frame(1)) is None
    assert values(never.snapshot()) == [0, 1]


def test_without_t_only_pause_shape_and_acquisition_apply():
    """Interleaved positions: seq jumps and goes back per key, which must not reset anything."""
    ring = Ring(window=2)
    assert ring.push(header(None, seq=5, s=0), frame(0)) == "first"
    assert ring.push(header(None, seq=2, s=1), frame(1)) is None
    assert ring.push(header(None, seq=90, s=2), frame(2)) is None
    assert values(ring.snapshot()) == [1, 2]
    assert ring.push(header(None, seq=91, s=20), frame(3)) == "pause"
    assert ring.push(header(None, seq=92, s=21, shape=(2, 2)), frame(4, (2, 2))) == "shape"
    other = header(None, seq=93, s=22, shape=(2, 2), acquisition="z")
    assert ring.push(other, frame(5, (2, 2))) == "acquisition"


def test_every_reason_is_a_known_one():
    ring = _with_state()
    for h in (header(3, acquisition="b"), header(9, acquisition="b")):
        ring.push(h, frame(0))
    assert set(ring.resets) <= set(RESET_REASONS)


# --- previous outputs -----------------------------------------------------------------------


def test_set_previous_keeps_outputs_per_stage_and_refuses_stale_generations():
    ring = filled(Ring(window=2), 2)
    gen = ring.snapshot().generation
    low, high = np.zeros((4, 4), np.float32), np.zeros((8, 8), np.float32)
    assert ring.set_previous(0, low, gen) and ring.set_previous(1, high, gen)
    prev = ring.snapshot().previous
    assert prev[0] is low and prev[1] is high
    ring.push(header(5), frame(5))  # gap: the output computed before it is stale
    assert not ring.set_previous(0, low, gen)
    assert ring.snapshot().previous == {}
    assert ring.set_previous(0, low, ring.generation)


# --- background -----------------------------------------------------------------------------


def test_background_is_the_exact_median_of_the_last_frames_and_cached():
    rng = np.random.default_rng(1)
    stack = rng.integers(0, 4000, size=(12, 4, 4)).astype(np.uint16)
    ring = Ring(window=2, background=True, background_frames=5)
    for t, f in enumerate(stack):
        ring.push(header(t), f)
    w = ring.snapshot()
    np.testing.assert_array_equal(w.background, np.median(stack[-5:], axis=0).astype(np.float32))
    assert w.background.dtype == np.float32
    assert ring.snapshot().background is w.background  # cached until the next push
    ring.push(header(12), stack[0])
    assert ring.snapshot().background is not w.background


def test_reference_background_is_used_as_is_and_never_replaced():
    reference = np.full((4, 4), 7.5, np.float32)
    ring = Ring(window=2, background=True, reference=reference)
    for t in range(20):
        ring.push(header(t, acquisition=str(t // 5)), frame(t))  # acquisition resets too
        assert ring.snapshot().background is reference


def test_reference_of_the_wrong_shape_is_refused():
    ring = Ring(background=True, reference=np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match=r"reference background \(8, 8\) does not match"):
        ring.push(header(0), frame(0))


def test_without_background_only_the_window_is_held():
    ring = filled(Ring(window=3), 10)
    assert ring.snapshot().background is None
    assert ring.nbytes == 3 * frame(0).nbytes
    with_bg = filled(Ring(window=3, background=True, background_frames=5), 10)
    _ = with_bg.snapshot()  # median cached
    assert with_bg.nbytes == 5 * frame(0).nbytes + 4 * 4 * 4


# --- Rings: independent keys, thread safety -------------------------------------------------


def test_interleaved_positions_keep_independent_windows():
    """A multi-position plate: p0, p1, p2 visited in turn, each key sees only its own frames."""
    rings = Rings(window=3)
    seq = 0
    for t in range(4):
        for p in range(3):
            w = rings.push(header(t, p, seq=seq, s=t * 3 + p), frame(100 * p + t))
            seq += 1
            assert values(w) == [100 * p + max(t - k, 0) for k in (2, 1, 0)]
            assert w.reset == ("first" if t == 0 else None)
    assert rings.keys() == ["scope/p0/c0/z0@a", "scope/p1/c0/z0@a", "scope/p2/c0/z0@a"]
    assert len(rings) == 3

    # p1 loses a frame: only p1 resets, p0 and p2 keep their windows and previous outputs
    for p in (0, 2):
        assert rings.set_previous(f"scope/p{p}/c0/z0@a", 0, np.zeros(4), 1)
    w1 = rings.push(header(5, 1, s=12), frame(999))
    assert w1.reset == "gap" and values(w1) == [999] * 3
    w0 = rings.push(header(4, 0, s=13), frame(4))
    w2 = rings.push(header(4, 2, s=14), frame(204))
    assert (w0.reset, w2.reset) == (None, None)
    assert values(w0) == [2, 3, 4] and values(w2) == [202, 203, 204]
    assert 0 in w0.previous and 0 in w2.previous
    assert not rings.set_previous("scope/p1/c0/z0@a", 0, np.zeros(4), 1)  # p1's generation moved on
    assert not rings.set_previous("scope/p7/c0/z0", 0, np.zeros(4), 1)  # never seen

    stats = rings.stats()
    assert stats["keys"] == 3
    assert stats["resets"] == {r: {"first": 3, "gap": 1}.get(r, 0) for r in RESET_REASONS}
    # p0, p2: 3 frames and one output each; p1: 1 frame since its reset (padding is a snapshot's)
    assert stats["bytes"] == 7 * frame(0).nbytes + 2 * np.zeros(4).nbytes


def test_push_without_snapshot_then_snapshot_by_key():
    """Live mode: every frame enters the ring, the window is taken when the engine is free."""
    rings = Rings(window=2)
    for t in range(3):
        assert rings.push(header(t), frame(t), snapshot=False) is None
    w = rings.snapshot("scope/p0/c0/z0@a")
    assert values(w) == [1, 2] and w.generation == 1
    with pytest.raises(KeyError, match="scope/p1/c0/z0"):
        rings.snapshot("scope/p1/c0/z0")


def test_channels_and_z_are_separate_keys():
    rings = Rings(window=2)
    h = header(0)
    for c, z in ((0, 0), (1, 0), (0, 3)):
        indexed = h.model_copy(update={"index": {"t": 0, "p": 0, "c": c, "z": z}})
        assert rings.push(indexed, frame(c + z)).reset == "first"
    assert sorted(rings.keys()) == ["scope/p0/c0/z0@a", "scope/p0/c0/z3@a", "scope/p0/c1/z0@a"]


def test_references_are_per_key():
    ref0 = np.zeros((4, 4), np.float32)
    rings = Rings(background=True, references={"scope/p0/c0/z0": ref0})
    assert rings.push(header(0, 0), frame(5)).background is ref0
    w1 = rings.push(header(0, 1), frame(5))
    assert float(w1.background.flat[0]) == 5.0  # no reference: running median


def test_a_refused_first_frame_creates_no_key():
    rings = Rings()
    with pytest.raises(ValueError):
        rings.push(header(0), frame(0, shape=(2, 2)))
    assert len(rings) == 0


def test_concurrent_pushes_to_many_keys():
    rings = Rings(window=2)
    errors: list[BaseException] = []

    def worker(p: int) -> None:
        try:
            for t in range(200):
                w = rings.push(header(t, p), frame(t))
                assert values(w) == [max(t - 1, 0), t]
        except BaseException as e:  # noqa: BLE001 - a thread's failure is asserted on below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(p,)) for p in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert rings.stats()["resets"]["first"] == 8 and sum(rings.stats()["resets"].values()) == 8


# --- grid tiles, shared stream ids, memory ---------------------------------------------------


def test_grid_tiles_are_separate_keys_and_keep_their_history():
    """Two tiles of a grid at each t: before g was part of the key, every frame reset."""
    rings = Rings(window=2)
    h = header(0)
    for t in range(3):
        for g in (0, 1):
            tile = h.model_copy(update={"index": {"t": t, "p": 0, "g": g}, "mono_ns": t * S})
            w = rings.push(tile, frame(10 * g + t))
            assert values(w) == [10 * g + max(t - 1, 0), 10 * g + t]
    assert sorted(rings.keys()) == ["scope/p0/g0/c0/z0@a", "scope/p0/g1/c0/z0@a"]
    assert rings.stats()["resets"]["first"] == 2 and sum(rings.stats()["resets"].values()) == 2


def test_acquisitions_sharing_a_stream_id_do_not_reset_each_other():
    rings = Rings(window=2)
    for t in range(50):
        for acq in ("one", "two"):
            w = rings.push(header(t, acquisition=acq), frame(t))
            assert w.reset == ("first" if t == 0 else None)
    assert rings.stats()["resets"] == {r: 2 if r == "first" else 0 for r in RESET_REASONS}


def test_memory_budget_evicts_the_least_recently_used_keys():
    one = frame(0).nbytes  # 32 bytes per 4x4 uint16 frame
    rings = Rings(window=2, budget_bytes=5 * one)
    for p in range(4):  # each key holds 2 frames after two pushes
        for t in range(2):
            rings.push(header(t, p), frame(t))
    stats = rings.stats()
    assert stats["bytes"] <= 5 * one and stats["evicted"]["budget"] == 2
    assert rings.keys() == ["scope/p2/c0/z0@a", "scope/p3/c0/z0@a"]
    w = rings.push(header(2, 0), frame(2))  # an evicted key starts again
    assert w.reset == "first" and rings.stats()["resets"]["first"] == 5


def test_idle_keys_whose_state_would_reset_are_evicted():
    rings = Rings(window=2, max_pause_s=0.05)
    rings.push(header(0, 0), frame(0))
    time.sleep(0.06)
    rings._next_sweep = 0.0  # the sweep runs at most once a second; do not wait for it here
    rings.push(header(0, 1), frame(0))
    assert rings.keys() == ["scope/p1/c0/z0@a"] and rings.stats()["evicted"]["idle"] == 1
    with_history = Rings(window=2, background=True, max_pause_s=0.05)
    with_history.push(header(0, 0), frame(0))
    time.sleep(0.06)
    with_history._next_sweep = 0.0
    with_history.push(header(0, 1), frame(0))
    assert len(with_history) == 2  # the background history outlives a pause: kept


def test_single_frame_engines_hold_neither_frames_nor_outputs():
    rings = Rings(window=1, keep_previous=False)
    for p in range(100):
        w = rings.push(header(0, p), frame(p))
        assert not rings.set_previous(f"scope/p{p}/c0/z0@a", 0, np.zeros((8, 8)), w.generation)
        assert values(w) == [p]  # the window still has its frame
    assert rings.stats()["bytes"] == 0
