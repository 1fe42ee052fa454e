"""bench.latency: a real short acquisition per engine through the server, measured per stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.latency import STAGES, plot_latency, run_latency

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def result() -> dict:
    messages: list[str] = []
    r = run_latency(
        engines=["gaussian", "identity", "gaussian"], preset="confocal-20fps", duration_s=2.0,
        warmup_s=0.5, progress=messages.append,
    )  # fmt: skip
    assert messages, "progress was never reported"
    return r


def test_every_engine_has_every_stage_in_order(result: dict) -> None:
    assert result["kind"] == "latency"
    assert result["preset"] == "confocal-20fps" and result["config"] is None
    assert list(result["engines"]) == ["identity", "gaussian"]  # baseline first, no duplicates
    for name, e in result["engines"].items():
        assert set(e["latency_ms"]) == set(STAGES), name
        for stage in STAGES:
            p = e["latency_ms"][stage]
            assert p["p50"] is not None, (name, stage)
            assert 0 <= p["p50"] <= p["p90"] <= p["p99"] <= p["max"], (name, stage, p)
            assert len(e["samples"][stage]) == len(e["sample_times_s"][stage])
        assert e["frames_enhanced"] <= e["frames_acquired"]
        assert e["frames_received_by_subscriber"] > 0
        assert e["warmup_frames_dropped"] > 0
        assert e["fps_acquired"] > 0 and e["rss_mb"] > 0 and e["cpu_s"] >= 0
        assert e["backend"]
        lat = e["latency_ms"]
        assert lat["total"]["max"] >= lat["inference"]["max"]
        assert all(t >= 0.5 for t in e["sample_times_s"]["total"])  # warm-up left out


def test_plots_are_png(result: dict, tmp_path: Path) -> None:
    paths = plot_latency(result, tmp_path)
    assert {p.name for p in paths} == {
        f"latency_{n}_{k}.png" for n in ("identity", "gaussian") for k in ("hist", "timeline")
    }
    for p in paths:
        assert p.read_bytes()[:8] == PNG


def test_too_short_duration_is_refused() -> None:
    with pytest.raises(ValueError, match="raise --duration"):
        run_latency(engines=["identity"], duration_s=1.0, warmup_s=0.5)


def test_unknown_engine_is_refused() -> None:
    with pytest.raises(ValueError, match=r"no-such-engine.*not found"):
        run_latency(engines=["no-such-engine"], duration_s=5.0)


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(ValueError, match="confocal-20fps"):
        run_latency(engines=["identity"], preset="widefield", duration_s=5.0)


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="live, complete"):
        run_latency(engines=["identity"], mode="fast", duration_s=5.0)


# -- several streams into one server ------------------------------------------------------------


def test_two_streams_into_one_server_per_backend() -> None:
    from bench.latency import run_stream_latency

    r = run_stream_latency(
        engine="identity", backends=["onnxruntime", "auto"], streams=[2], fps=20, size=64,
        duration_s=2.5, warmup_s=0.5,
    )  # fmt: skip
    assert r["kind"] == "latency-streams" and r["triton"] is None
    assert [(c["backend_requested"], c["streams"]) for c in r["cases"]] == [
        ("onnxruntime", 2), ("auto", 2),
    ]  # fmt: skip
    for c in r["cases"]:
        assert c["frames_sent"] == c["frames_received"] > 0
        assert c["frames_enhanced"] + c["frames_skipped"] <= c["frames_received"]
        assert c["server_healthy"] and c["hook_warmup_excluded"]
        for stage in ("hook", "transport", "inference", "total"):
            p = c["latency_ms"][stage]
            assert 0 <= p["p50"] <= p["p99"], (stage, p)
    (o,) = r["overhead"]
    assert o["backend"] == "auto" and o["vs"] == "onnxruntime" and o["streams"] == 2
    assert o["total_p50_ms"] is not None


def test_triton_without_a_venv_is_one_clear_refusal(tmp_path: Path) -> None:
    from bench.latency import run_stream_latency

    with pytest.raises(ValueError, match="no tritonserver in"):
        run_stream_latency(engine="identity", backends=["triton"], duration_s=2.5,
                           warmup_s=0.5, triton_venv=tmp_path)  # fmt: skip


def test_stream_counts_parse() -> None:
    from bench.cli import _stream_counts

    assert _stream_counts(["1,4", "8"]) == [1, 4, 8]
