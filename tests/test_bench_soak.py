"""`scopecast bench soak` end to end on a short run with small frames: the JSON timeline and
summary are consistent, the plot is written, bad input is one clear line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def bench(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip


def test_soak_records_memory_and_latency_over_time(tmp_path):
    run = bench("soak", "--duration", "6", "--size", "32", "--fps", "10", "--streams", "2",
                "--keys", "3", "--poll", "1", "--rss-drift-goal", "100",
                "--out", str(tmp_path))  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "soak.json").read_text())
    assert (tmp_path / "soak.png").stat().st_size > 10_000
    assert "RSS drift" in run.stdout
    f = result["frames"]
    assert f["sent"] == f["received"] == f["written_raw"] > 0
    assert f["enhanced"] + f["skipped"] == f["received"]
    assert set(f["sent_by_stream"]) == {"soak0", "soak1"}
    assert result["healthy"] is True and result["problems"] == [] and result["ok"] is True
    timeline = result["timeline"]
    assert len(timeline) >= 4 and timeline[0]["t_s"] == 0
    assert [x["t_s"] for x in timeline] == sorted(x["t_s"] for x in timeline)
    assert all(x["rss_mb"] > 0 for x in timeline)
    assert timeline[-1]["rings"]["keys"] == 6  # 2 streams x 3 positions
    total = timeline[-1]["latency_ms"]["total"]
    assert 0 < total["p50"] <= total["p99"]
    r = result["rss"]
    assert r["warm_t_s"] >= 0.6 and r["drift_percent"] == pytest.approx(
        (r["end_mb"] - r["warm_mb"]) / r["warm_mb"] * 100
    )
    assert r["met"] is (r["drift_percent"] <= 100)


def test_soak_bad_input_is_one_clear_line(tmp_path):
    for args, words in ((("--streams", "0"), "--streams"), (("--mode", "fast"), "fast"),
                        (("--duration", "-1"), "--duration")):  # fmt: skip
        run = bench("soak", *args, "--out", str(tmp_path))
        assert run.returncode == 2, (args, run.stderr)
        assert words in run.stderr and "Traceback" not in run.stderr, run.stderr
