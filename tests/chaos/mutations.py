"""Can the chaos test fail? Each mutation puts back a bug on purpose, in a copy of the tree, and
runs the chaos test's CI seeds there: each must break at least one of them.

    python -m tests.chaos.mutations [--steps N] [--seeds 11,23,2024]

Prints, per mutation and seed, the step at which the walk broke and what broke (or "held").
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.chaos.test_chaos import SEEDS, STEPS

ROOT = Path(__file__).resolve().parents[2]

# name: (file, the line as it is, the line with the bug)
MUTATIONS = {
    "a busy engine evictable": (
        "lifecycle/engine.py",
        "        return self.idle_ready and not self.spec.pinned",
        "        return self._state is EngineState.READY and not self.spec.pinned",
    ),
    "a wake re-placed anywhere": (
        "lifecycle/budget.py",
        "        if engine.bound:  # a wake: where its process is, whatever the model's entry allows",
        "        if False:",
    ),
    "a key's model list skipped": (
        "api/auth.py",
        "        if not may_use(policy, model, requested):",
        "        if False:",
    ),
    "a key's rate limits skipped": (
        "api/auth.py",
        "            if bucket is not None and (wait := bucket.wait_for(1.0)) > 0:",
        "            if False and (wait := 0.0):",
    ),
}


def mutated_copy(into: Path, file: str, before: str, after: str) -> Path:
    tree = into / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", "__pycache__", ".mypy_cache",
                                                               ".ruff_cache", ".pytest_cache"))  # fmt: skip
    path = tree / file
    text = path.read_text()
    assert text.count(before) == 1, f"{file}: the line to mutate is not there once: {before!r}"
    path.write_text(text.replace(before, after))
    return tree


def run_seed(tree: Path, seed: int, steps: int) -> str:
    env = {**os.environ, "CHAOS_SEED": str(seed), "CHAOS_STEPS": str(steps), "CHAOS_SHRINK": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/chaos/test_chaos.py"],
        cwd=tree, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    broke = re.search(r"broke at step (\d+) of (\d+):\n  (.*)", done.stdout)
    if broke:
        return f"broke at step {broke[1]} of {broke[2]}: {broke[3][:150]}"
    return "held" if done.returncode == 0 else f"error (exit {done.returncode}): {done.stdout[-300:]}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.chaos.mutations", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--seeds", default=",".join(str(s) for s in SEEDS))
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    missed = []
    for name, (file, before, after) in MUTATIONS.items():
        with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
            tree = mutated_copy(Path(tmp), file, before, after)
            results = {seed: run_seed(tree, seed, args.steps) for seed in seeds}
        print(f"{name} ({file}):")
        for seed, result in results.items():
            print(f"  seed {seed}: {result}")
        if all(r == "held" for r in results.values()):
            missed.append(name)
    print("every mutation was caught" if not missed else f"NOT caught: {missed}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
