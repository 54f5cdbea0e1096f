"""The chaos test: seeded walks through everything a day of operations brings, every feature on,
invariants after every step (tests/chaos/checks.py). docs/chaos.md says how to run it longer.

    CHAOS_SEED=S        run only this seed
    CHAOS_STEPS=N       steps per walk (default STEPS)
    CHAOS_REPLAY=FILE   replay a walk a failing run wrote (JSON)
    CHAOS_SHRINK=SECS   how long a failing run may spend shrinking its walk (default 180; 0: none)
    CHAOS_RESTART=0|1   end the walk with a daemon SIGKILL and restart (default: the seed says)

A failing run prints its seed, the step and what broke, and the walk shrunk to the fewest steps
that still break the same invariant, written to a file for CHAOS_REPLAY.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.chaos.runner import Failure, Run, dump
from tests.chaos.steps import Step, plan
from tests.chaos.world import World, tag_for

# Fixed for CI: together about three minutes on the 2-core machine, and between them every op.
SEEDS = [11, 23, 2024]
STEPS = 36


def _seeds() -> list[int]:
    if os.environ.get("CHAOS_SEED"):
        return [int(os.environ["CHAOS_SEED"])]
    return SEEDS


def run_walk(root: Path, seed: int, walk: list[Step]) -> Run:
    root.mkdir(parents=True, exist_ok=True)
    run = Run(World(root, tag_for(seed)), walk)
    asyncio.run(run.run())
    return run


@pytest.mark.parametrize("seed", _seeds())
def test_chaos(seed: int, tmp_path: Path) -> None:
    replay = os.environ.get("CHAOS_REPLAY")
    if replay:
        walk: list[Step] = json.loads(Path(replay).read_text())["walk"]
    else:
        restart = {"0": False, "1": True}.get(os.environ.get("CHAOS_RESTART", ""))
        walk = plan(seed, int(os.environ.get("CHAOS_STEPS", STEPS)), restart)
    started = time.monotonic()
    try:
        run = run_walk(tmp_path / "run", seed, walk)
    except Failure as caught:
        failure = caught

        def fails(w: list[Step], n: int) -> bool:
            return _fails_alike(tmp_path / f"shrink-{n}", seed, w, failure)

        shrunk = shrink(failure, fails)
        out = tmp_path / f"chaos-{seed}-shrunk.json"
        dump(shrunk, out)
        pytest.fail(
            f"chaos seed {seed} broke at step {failure.step} of {len(walk)}:\n  "
            + "\n  ".join(failure.problems[:10])
            + "\nthe run's last steps:\n" + "\n".join(failure.log[-15:])
            + f"\nshrunk to {len(shrunk)} steps (replay: CHAOS_SEED={seed} CHAOS_REPLAY={out}):\n"
            + "\n".join(json.dumps(s) for s in shrunk),
            pytrace=False,
        )
    answers = run.clients.answers if run.clients else []
    codes = Counter(a.code or str(a.status) for a in answers)
    print(f"chaos seed {seed}: {len(walk)} steps, {len(answers)} requests in "
          f"{time.monotonic() - started:.0f}s: {dict(codes.most_common())}")  # fmt: skip
    if len(run.rss) >= 2:
        (first_step, first), (last_step, last) = run.rss[0], run.rss[-1]
        mib = 2**20
        print(f"daemon RSS: {first / mib:.1f} MiB at step {first_step}, "
              f"{last / mib:.1f} MiB at step {last_step}")  # fmt: skip
    if os.environ.get("CHAOS_VERBOSE"):
        print("\n".join(run.log))


def _signature(problem: str) -> str:
    """What broke, without the particulars (ids, numbers, names in quotes)."""
    return re.sub(r"chaos-\S+|\d+(\.\d+)?|'[^']*'", "#", problem)[:80]


def _fails_alike(root: Path, seed: int, walk: list[Step], original: Failure) -> bool:
    try:
        run_walk(root, seed, walk)
    except Failure as again:
        return _signature(again.problems[0]) == _signature(original.problems[0])
    return False


def shrink(failure: Failure, fails: Callable[[list[Step], int], bool]) -> list[Step]:
    """The walk up to the failing step, with as many steps removed as still fail alike (chunks
    halved in turn, as delta debugging does), within CHAOS_SHRINK seconds."""
    walk = failure.walk[: failure.step + 1]
    deadline = time.monotonic() + float(os.environ.get("CHAOS_SHRINK", "180"))
    parts, tries = 2, 0
    while len(walk) > 1 and time.monotonic() < deadline:
        size = math.ceil(len(walk) / parts)
        for i in range(0, len(walk), size):
            candidate = walk[:i] + walk[i + size :]
            tries += 1
            if candidate and time.monotonic() < deadline and fails(candidate, tries):
                walk, parts = candidate, max(parts - 1, 2)
                break
        else:
            if size == 1:
                break
            parts = min(len(walk), parts * 2)
    return walk
