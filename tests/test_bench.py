"""The benchmark's own logic, and a quick run that keeps `python -m bench.run` working.

Speed is judged by the benchmark's report, never by timed assertions here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.load import percentile
from bench.report import check_targets, summarize
from tests.helpers import ROOT


def _raw(daemon_rps: float, daemon_ttft: float) -> dict[str, Any]:
    def cell(rps: float, p50: float) -> list[dict[str, float]]:
        return [{"rps": rps, "p50_ms": p50, "p99_ms": p50 * 3, "errors": 0}]

    def stream(ttft: float) -> list[dict[str, float]]:
        return [{"ttft_p50_ms": ttft, "ttft_p99_ms": ttft * 2, "gap_p99_ms": 12.0, "errors": 0}]

    return {
        "nonstream": {
            "direct": {"1": cell(6000, 0.2), "32": cell(12000, 2.5)},
            "daemon": {"1": cell(2000, 0.5), "32": cell(daemon_rps, 5.0)},
        },
        "stream": {"direct": stream(100.0), "daemon": stream(daemon_ttft)},
        "cold": {"fake": [{"engine_ready_ms": 2000.0, "engine_first_token_ms": 2.0, "cold_ttft_ms": 2100.0,
                           "warm_ttft_ms": 2.0}]},
        "overload": {
            "bound": 3, "gpu-alone_rejected": 100, "gpu-alone_rejected_p99_ms": 1.0,
            "gpu-alone_engine_max_in_flight": 3, "gpu_offloaded": 50, "gpu_offloaded_p99_ms": 6.0,
            "gpu_engine_max_in_flight": 4,
        },
        "rss": {"idle_mb": 70.0, "streaming_peak_mb": 75.0},
    }  # fmt: skip


def test_targets_are_judged_on_ratios_within_the_run() -> None:
    met = {t: ok for t, _, ok in check_targets(summarize(_raw(daemon_rps=6100, daemon_ttft=110)))}
    assert met["non-streaming 32 conns: req/s >= 0.5 x direct"]
    assert met["streaming: TTFT p50 <= 1.15 x direct"]
    assert met["cold start (fake): TTFT <= engine start-to-ready + 150 ms"]
    assert not met["overload: offload decision p99 <= 5 ms"]
    assert not met["overload (gpu): engine in flight <= bound"]
    missed = {t: ok for t, _, ok in check_targets(summarize(_raw(daemon_rps=5900, daemon_ttft=120)))}
    assert not missed["non-streaming 32 conns: req/s >= 0.5 x direct"]
    assert not missed["streaming: TTFT p50 <= 1.15 x direct"]


def test_percentile() -> None:
    assert percentile([5, 1, 3, 2, 4], 50) == 3
    assert percentile(list(range(101)), 99) == 99


@pytest.mark.slow
def test_quick_benchmark_run_writes_its_reports(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "bench.run", "--rounds", "1", "--duration", "1", "--streams", "8",
            "--tokens", "8", "--stream-bursts", "1", "--no-llamacpp", "--out", str(tmp_path)]  # fmt: skip
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "targets met" in run.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"direct", "daemon"} <= set(results["summary"]["nonstream"])
    assert (tmp_path / "results.png").stat().st_size > 10_000
    assert "| daemon |" in (tmp_path / "results.md").read_text()
    assert "| prefix_affinity |" in (tmp_path / "results.md").read_text()


def test_the_llama_cpp_collection_cost_is_judged_against_the_engine_alone() -> None:
    raw = _raw(daemon_rps=6100, daemon_ttft=110)
    raw["collect"] = {
        "8": {"daemon_ms": 370.0, "engine_ms": 305.0},
        "64": {"daemon_ms": 2700.0, "engine_ms": 2500.0},
    }
    met = {t: ok for t, _, ok in check_targets(summarize(raw))}
    rows = [t for t in met if t.startswith("llama.cpp non-streaming")]
    assert [met[t] for t in rows] == [True, False] and "8 tokens" in rows[0]


def test_prefix_affinity_is_judged_against_round_robin_on_the_multi_turn_workload() -> None:
    def row(hit: float, p50: float) -> list[dict[str, float]]:
        return [{"hit_rate": hit, "ttft_p50_ms": p50, "ttft_p99_ms": 60.0, "ttft_mean_ms": p50 * 2,
                 "load_max_over_mean": 1.1, "requests": 144.0}]  # fmt: skip

    raw = _raw(daemon_rps=6100, daemon_ttft=110)
    rows = {"round_robin": row(0.58, 5.8), "least_loaded": row(0.64, 4.2), "prefix_affinity": row(0.80, 6.0)}
    raw["replicas"] = {"prefill_ms": 50.0, "replicas": 3, "rows": rows}
    met = {t: ok for t, _, ok in check_targets(summarize(raw))}
    assert met["replicas, multi-turn chat: prefix_affinity cache hit rate > round_robin"]
    assert not met["replicas, multi-turn chat: prefix_affinity TTFT p50 < round_robin"]
