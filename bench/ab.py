"""A/B of the data plane: this tree's daemon against another commit's, in one run.

    python -m bench.ab [--base HEAD~1] [--rounds 5] [--duration 4]

Both daemons run the same fake engine (this tree's, instant answers, one each)
and are measured in turn, round after round, the order swapped every round
(A B B A A B ...) so that drift favours neither, with wrk at 32 and at 1
connection. Prints the median of each side and the ratio new/base, and each
daemon's own CPU time per request (psutil), which moves far less from one cell
to the next than a request rate does (two runs of the same code differ by up
to 10% per cell on a 2-core machine). Read the ratios. With valgrind installed
it also counts the instructions each daemon executes per request
(bench/instructions.py), which do not move with the machine's load at all.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil

from bench import instructions, scenarios
from bench.load import wrk_available
from bench.procs import ROOT, Proc, engine_url, start_daemon
from bench.scenarios import Target

FAST: dict[str, Any] = {"name": "fast", "backend": "sglang", "model_path": "org/fast"}
STREAM: dict[str, Any] = {
    "name": "stream",
    "backend": "sglang",
    "model_path": "org/stream",
    "env": {"FAKE_TOKEN_DELAY": "0.01"},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="HEAD~1", help="the commit to compare this tree against")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--duration", type=float, default=4.0, help="seconds per cell")
    p.add_argument("--streams", type=int, default=0, help="also N concurrent streams of 64 tokens: TTFT p50")
    p.add_argument("--backend", choices=["sglang", "vllm"], default="sglang",
                   help="the fake engine's dialect (vllm: a local engine on a Unix socket)")  # fmt: skip
    p.add_argument(
        "--instructions",
        type=int,
        default=300,
        metavar="N",
        help="also count instructions per request over N requests under valgrind (0: skip)",
    )
    return p.parse_args(argv)


def checkout(ref: str, into: Path) -> Path:
    tree = into / "base"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref], check=True,
                   capture_output=True)  # fmt: skip
    return tree


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not wrk_available():
        print("wrk is not installed (apt-get install wrk): the A/B needs it", file=sys.stderr)
        return 2
    procs: list[Proc] = []
    count: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="ab-") as tmp:
        work = Path(tmp)
        base_tree = checkout(args.base, work)
        try:
            sides = {}
            for name, root in (("base", base_tree), ("new", ROOT)):
                chosen = [FAST, STREAM] if args.streams else [FAST]
                models = [{**m, "backend": args.backend} for m in chosen]
                daemon = start_daemon(work / name, models, root=root, OFFLOAD_QUEUE_THRESHOLD="1000000")
                procs.append(daemon)
                for model in models:  # see bench/run.py: an engine's first client
                    if args.backend == "sglang":  # (its key is on its command line)
                        scenarios.touch(*engine_url(daemon, str(model["name"])))
                sides[name] = Target(name, daemon.url, "fast")
            for target in sides.values():
                scenarios.rate(target, 32, 1.0)  # warm-up
            cells: dict[str, dict[int, list[float]]] = {n: {32: [], 1: []} for n in sides}
            p50: dict[str, list[float]] = {n: [] for n in sides}
            cpu: dict[str, list[float]] = {n: [] for n in sides}
            ttft: dict[str, list[float]] = {n: [] for n in sides}
            pids = {p.url: psutil.Process(p.popen.pid) for p in procs}
            for round_no in range(args.rounds):
                print(f"round {round_no + 1}/{args.rounds}", file=sys.stderr)
                order = list(sides.items()) if round_no % 2 == 0 else list(reversed(sides.items()))
                for name, target in order:
                    for conns in (32, 1):
                        process = pids[target.base_url]
                        before = sum(process.cpu_times()[:2])
                        cell = scenarios.rate(target, conns, args.duration)
                        used = sum(process.cpu_times()[:2]) - before
                        cells[name][conns].append(cell.rps)
                        if conns == 1:
                            p50[name].append(cell.p50_ms)
                        else:
                            cpu[name].append(used / (cell.rps * args.duration) * 1e6)
                    for _ in range(3 if args.streams else 0):  # a burst's TTFT swings: take several
                        stream = Target(name, target.base_url, "stream")
                        ttft[name].append(scenarios.streaming(stream, args.streams, 64)["ttft_p50_ms"])
            for proc in procs:
                proc.stop()
            if args.instructions and instructions.available():
                for name, root in (("base", base_tree), ("new", ROOT)):
                    count[name] = instructions.per_request(
                        root, work / f"cg-{name}", args.instructions, args.backend
                    )
        finally:
            for proc in procs:
                proc.stop()
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)],
                           check=False, capture_output=True)  # fmt: skip
    print(f"base = {args.base}, new = this tree, {args.backend} engines; "
          f"medians of {args.rounds} rounds of {args.duration:g} s")  # fmt: skip
    rows = {
        "req/s, 32 conns": {n: statistics.median(cells[n][32]) for n in sides},
        "req/s, 1 conn": {n: statistics.median(cells[n][1]) for n in sides},
        "p50 ms, 1 conn": {n: statistics.median(p50[n]) for n in sides},
        "daemon CPU us/req": {n: statistics.median(cpu[n]) for n in sides},
    }
    if args.streams:
        rows[f"TTFT p50 ms, {args.streams} streams"] = {n: statistics.median(ttft[n]) for n in sides}
    if count:
        rows["instructions/req"] = count
    for label, value in rows.items():
        base, new = value["base"], value["new"]
        print(f"{label:16} base {base:10.3f}  new {new:10.3f}  new/base {new / base:.3f}")
    for n in sides:
        print(f"{n} req/s at 32 conns, each round: {', '.join(f'{x:,.0f}' for x in cells[n][32])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
