"""Benchmark: the daemon against the engine direct and the Rust routers, in one run.

    python -m bench.run [--rounds 3] [--duration 4] [--no-llamacpp]

Starts a fast fake engine behind the daemon, and sglang-router / vllm-router
(when installed) in front of the same engine; measures every target in turn,
round after round (A B C A B C ...), after a warm-up. Writes
bench/results/results.{json,md,png} and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench import affinity, fairness, report, scenarios
from bench.load import wrk_available
from bench.procs import ROUTERS, Proc, engine_url, router_available, start_daemon, start_router
from bench.scenarios import RssSampler, Target
from config.models import ModelSpec
from config.settings import DEFAULT_MODELS_CONFIG
from lifecycle.model_files import ModelFiles

BENCH_KEY = "sk-bench-client-key-0001"
FAST = {"name": "fast", "backend": "sglang", "model_path": "org/fast"}
STREAM = {
    "name": "stream",
    "backend": "sglang",
    "model_path": "org/stream",
    "env": {"FAKE_TOKEN_DELAY": "0.01"},
}
COLD = {"name": "cold", "backend": "sglang", "model_path": "org/cold", "env": {"FAKE_START_DELAY": "2"}}
SLOW = {"FAKE_TOKEN_DELAY": "0.01"}
WAKE_DELAY = 0.5  # the fake engine's wake; its cold start takes 2 s plus its own start
SLEEPER = {
    "name": "sleeper", "backend": "vllm", "model_path": "org/sleeper", "gpu_id": 0, "gpu_memory": 0.5,
    "on_idle": "sleep", "idle_timeout": 0,
}  # fmt: skip
OVERLOAD: list[dict[str, Any]] = [
    {"name": "gpu-alone", "backend": "sglang", "model_path": "org/a", "env": SLOW},
    {"name": "gpu", "backend": "sglang", "model_path": "org/g", "env": SLOW, "cpu_offload_model": "twin"},
    {"name": "twin", "backend": "llamacpp", "model_path": "/m/twin.gguf"},
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cold-rounds", type=int, default=5, help="cold starts of the real llama.cpp engine")
    p.add_argument("--duration", type=float, default=4.0, help="seconds per non-streaming cell")
    p.add_argument("--streams", type=int, default=128)
    p.add_argument("--stream-bursts", type=int, default=5, help="stream bursts per target per round")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--no-llamacpp", action="store_true", help="skip the real llama.cpp cold start")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    return p.parse_args(argv)


def measure_data_plane(args: argparse.Namespace, work: Path, procs: list[Proc], raw: dict[str, Any]) -> None:
    daemon = start_daemon(work / "main", [FAST, STREAM, COLD], OFFLOAD_QUEUE_THRESHOLD="1000000")
    procs.append(daemon)
    (fast, fast_key), (stream, stream_key) = engine_url(daemon, "fast"), engine_url(daemon, "stream")
    # Every target gets the same bearer header (the daemon, with no client keys, ignores it).
    targets = [
        (Target("direct", fast, "fast", fast_key), Target("direct", stream, "stream", stream_key)),
        (Target("daemon", daemon.url, "fast", fast_key), Target("daemon", daemon.url, "stream", stream_key)),
    ]
    # The same daemon with client keys enforced (its own engine, same fake engine).
    keyed = start_daemon(
        work / "keyed", [FAST, STREAM], OFFLOAD_QUEUE_THRESHOLD="1000000", API_KEYS=BENCH_KEY
    )
    procs.append(keyed)
    # Observed, not understood: a fake engine (aiohttp on asyncio's selector
    # loop) behind the daemon needs ~80 us of CPU per request until one request
    # reaches it straight from another client (a new connection, closed by that
    # client), and ~62 us ever after; the daemon's own health probes do not
    # flip it. The "direct" runs do that for the first daemon's engines only,
    # so every engine gets one such request before anything is measured.
    for model in ("fast", "stream"):
        scenarios.touch(*engine_url(keyed, model))
    for url, key in ((fast, fast_key), (stream, stream_key)):
        scenarios.touch(url, key)
    targets.append(
        (
            Target("daemon+keys", keyed.url, "fast", BENCH_KEY),
            Target("daemon+keys", keyed.url, "stream", BENCH_KEY),
        )
    )
    for name in ROUTERS:
        if router_available(name):
            r_fast = start_router(name, fast, fast_key, work)
            r_stream = start_router(name, stream, stream_key, work)
            procs += [r_fast, r_stream]
            targets.append(
                (Target(name, r_fast.url, "fast", fast_key), Target(name, r_stream.url, "stream", stream_key))
            )
        else:
            print(f"{name} is not installed: skipped (pip install {name})", file=sys.stderr)
    raw["rss"] = {"idle_mb": scenarios.rss_mb(daemon.popen.pid), "streaming_peak_mb": 0.0}
    for t_fast, t_stream in targets:  # warm-up: the same load shapes, so every pool is filled
        scenarios.rate(t_fast, 32, 1.0)
        scenarios.streaming(t_stream, args.streams, args.tokens)
    raw["nonstream"] = {t.name: {"1": [], "32": []} for t, _ in targets}
    raw["stream"] = {t.name: [] for _, t in targets}
    for round_no in range(args.rounds):
        print(f"round {round_no + 1}/{args.rounds}", file=sys.stderr)
        for t_fast, t_stream in targets:
            for conns in ("1", "32"):
                cell = scenarios.rate(t_fast, int(conns), args.duration)
                raw["nonstream"][t_fast.name][conns].append(dataclasses.asdict(cell))
            with RssSampler(daemon.popen.pid) as rss:
                for _ in range(args.stream_bursts):  # a burst's TTFT swings +-20%: take several
                    burst = scenarios.streaming(t_stream, args.streams, args.tokens)
                    raw["stream"][t_stream.name].append(burst)
            if t_stream.name == "daemon":
                raw["rss"]["streaming_peak_mb"] = max(raw["rss"]["streaming_peak_mb"], rss.peak / 2**20)
    raw["cold"] = {"fake engine, 2 s start": []}
    files = ModelFiles(work / "models")
    scenarios.cold_start(daemon, "cold")  # warm-up: first imports and page cache
    for _ in range(args.rounds):
        row = scenarios.engine_alone(ModelSpec.model_validate(COLD), files, True)
        row.update(scenarios.cold_start(daemon, "cold"))
        raw["cold"]["fake engine, 2 s start"].append(row)


def measure_llamacpp(args: argparse.Namespace, work: Path, procs: list[Proc], raw: dict[str, Any]) -> None:
    doc = yaml.safe_load(Path(DEFAULT_MODELS_CONFIG).read_text())
    daemon = start_daemon(work / "real", doc["models"], fake=False, EXECUTION_MODE="cpu")
    procs.append(daemon)
    files = ModelFiles(work / "models")
    spec = scenarios.shipped_spec("gemma-3-270m")
    raw["cold"]["llama.cpp Gemma 3 270M"] = []
    # Warm-up: the first start assembles the GGUF into the daemon's STATE_DIR
    # (a one-time install step, not part of a cold start of a stopped model).
    scenarios.cold_start(daemon, "gemma-3-270m")
    for _ in range(args.cold_rounds):
        row = scenarios.engine_alone(spec, files, False)
        row.update(scenarios.cold_start(daemon, "gemma-3-270m"))
        raw["cold"]["llama.cpp Gemma 3 270M"].append(row)
    raw["collect"] = {
        str(tokens): scenarios.collected_documents(daemon, "gemma-3-270m", 8, tokens) for tokens in (8, 64)
    }


def measure_wake(args: argparse.Namespace, work: Path, procs: list[Proc], raw: dict[str, Any]) -> None:
    env = {
        "FAKE_START_DELAY": "2",
        "FAKE_WAKE_DELAY": str(WAKE_DELAY),
        "FAKE_GPU_LEDGER": str(work / "ledger"),
    }
    sleeper = {**SLEEPER, "env": env}
    daemon = start_daemon(work / "wake", [sleeper], gpus=[{"id": 0, "memory_gb": 80}])
    procs.append(daemon)
    scenarios.wake_vs_cold(daemon, "sleeper")  # warm-up
    raw["wake"] = {"delay_ms": WAKE_DELAY * 1000, "rows": []}
    for _ in range(args.rounds):
        raw["wake"]["rows"].append(scenarios.wake_vs_cold(daemon, "sleeper"))


def measure_replicas(args: argparse.Namespace, work: Path, procs: list[Proc], raw: dict[str, Any]) -> None:
    daemon = start_daemon(work / "replicas", affinity.models(), OFFLOAD_QUEUE_THRESHOLD="1000")
    procs.append(daemon)
    affinity.run(daemon, 1, conversations=6, turns=2)  # warm-up: connections, first requests
    raw["replicas"] = affinity.run(daemon, args.rounds)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ui-bench-"))
    procs: list[Proc] = []
    raw: dict[str, Any] = {}
    try:
        measure_data_plane(args, work, procs, raw)
        if not args.no_llamacpp:
            measure_llamacpp(args, work, procs, raw)
        overload_daemon = start_daemon(work / "overload", OVERLOAD, OFFLOAD_QUEUE_THRESHOLD="3")
        procs.append(overload_daemon)
        raw["overload"] = scenarios.overload(overload_daemon, 3, args.duration)
        measure_wake(args, work, procs, raw)
        measure_replicas(args, work, procs, raw)
        fair_daemon = fairness.start(work / "fairness")
        procs.append(fair_daemon)
        raw["fairness"] = fairness.run(fair_daemon, args.rounds)
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(work, ignore_errors=True)
    meta = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rounds": args.rounds,
        "tool": "wrk -t1 (non-streaming), asyncio aiohttp client (streaming)" if wrk_available()
        else "asyncio aiohttp client",
        "cpus": os.cpu_count(),
        "streams": args.streams,
        "tokens": args.tokens,
    }  # fmt: skip
    md, targets = report.write(args.out, raw, meta)
    print(md)
    missed = [t for t, _, ok in targets if not ok]
    print(
        f"{len(targets) - len(missed)}/{len(targets)} targets met" + (f"; missed: {missed}" if missed else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
