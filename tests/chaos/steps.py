"""A walk: the steps of one chaos run, drawn from a seed before anything runs.

A step is a plain JSON object (`{"op": ..., ...}`), so a failing walk prints as JSON and replays
from it (CHAOS_REPLAY). Steps name models and choices, never pids or states: what a step finds
when it runs (is the model's engine up? which pid?) is looked up then. Drawing the whole walk
first keeps it the same for a seed whatever the timings of a run.
"""

from __future__ import annotations

import random
from typing import Any

from tests.chaos.world import BASE_SPLIT, KEYS

Step = dict[str, Any]
MODELS = ["a", "b", "c", "pin", "rep", "q", "twin"]
ASKABLE = [*MODELS, "chat", "stable", "extra"]
CLIENTS = ["normal"] * 6 + ["disconnect", "slow", "never"]

# op: weight. Requests dominate, as in a day of operations; every operator action and fault
# comes up in a walk of a few dozen steps.
WEIGHTS = {
    "burst": 30, "background": 6, "join": 4, "start": 4, "stop": 5, "sleep": 4, "split": 3,
    "reload": 4, "kill": 4, "kill_starting": 2, "squat": 2, "unsquat": 2, "validate": 4,
    "oversize": 1, "pressure": 2, "settle": 6, "mix": 12,
}  # fmt: skip
# What a "mix" step does while its requests run: operators and faults that race them.
MIXED = ["start", "stop", "sleep", "split", "reload", "kill", "squat", "unsquat"]


def plan(seed: int, steps: int, restart: bool | None = None) -> list[Step]:
    """`steps` steps for `seed`; a walk ends with a settle, and (for some seeds, or when asked)
    a daemon SIGKILL and restart on the same state directory."""
    rng = random.Random(seed)
    ops, weights = zip(*WEIGHTS.items(), strict=True)
    walk = [_step(rng, op) for op in rng.choices(ops, weights, k=steps)]
    walk.append({"op": "settle"})
    if restart if restart is not None else rng.random() < 0.5:
        walk += [{"op": "restart"}, {"op": "burst", "requests": [_request(rng) for _ in range(3)]},
                 {"op": "settle"}]  # fmt: skip
    return walk


def _step(rng: random.Random, op: str) -> Step:
    if op == "burst":
        return {"op": op, "requests": [_request(rng) for _ in range(rng.randint(1, 5))]}
    if op == "mix":  # requests and, a moment into them, an operator's action or a fault
        requests = [_request(rng) for _ in range(rng.randint(1, 4))]
        delay, action = rng.choice([0.0, 0.02, 0.1, 0.3]), _step(rng, rng.choice(MIXED))
        return {"op": op, "requests": requests, "delay": delay, "action": action}
    if op == "pressure":  # one request to each of many models at once: MAX_LOADED_MODELS
        models = rng.sample(MODELS, 6)
        return {"op": op, "requests": [_request(rng, model=m, client="normal") for m in models]}
    if op == "background":
        return {"op": op, "request": {**_request(rng, client="normal"), "stream": True,
                                      "max_tokens": rng.randint(40, 120)}}  # fmt: skip
    if op in ("start", "kill", "kill_starting"):
        return {"op": op, "model": rng.choice(MODELS if op != "kill_starting" else ["c", "b", "rep"])}
    if op == "stop":
        return {"op": op, "model": rng.choice(MODELS), "force": rng.random() < 0.5}
    if op == "sleep":
        return {"op": op, "model": rng.choice(["a", "b", "a", "b", "c"])}
    if op == "split":
        return {"op": op, "split": rng.choice([{"a": 100}, {"b": 1}, {"a": 50, "b": 50}, dict(BASE_SPLIT)])}
    if op == "reload":
        variant = {"extra": rng.random() < 0.5, "rep_max": rng.choice([1, 2]),
                   "split": rng.choice([dict(BASE_SPLIT), {"a": 50, "b": 50}]),
                   "c_hangs": rng.random() < 0.2}  # fmt: skip
        return {"op": op, "variant": variant, "how": rng.choice(["route", "sighup"])}
    if op == "squat":
        return {"op": op, "gpu": rng.choice([0, 1]), "share": rng.choice([0.3, 0.5, 0.7])}
    if op == "validate":
        return {"op": op, "request": _request(rng), "priority": rng.choice([None, "low", "high", "urgent"])}
    if op == "oversize":
        return {"op": op, "path": rng.choice(["/v1/models/validate", "/v1/admin/aliases/chat"])}
    return {"op": op}


def _request(rng: random.Random, model: str | None = None, client: str | None = None) -> Step:
    stream = rng.random() < 0.5
    key = rng.choice(list(KEYS))
    own = KEYS[key].get("models")
    if model is None:  # mostly what the key may use (as clients do), sometimes anything
        model = rng.choice(own) if own and rng.random() < 0.85 else rng.choice(ASKABLE)
    if own and "a" in own and model == "a" and rng.random() < 0.5:
        model = "chat"  # a key allowed one version, asking for the alias (issue 25, defect 4)
    return {
        "key": key,
        "model": model,
        "chat": rng.random() < 0.4,
        "stream": stream,
        "client": client or (rng.choice(CLIENTS) if stream else rng.choice(["normal"] * 8 + ["disconnect"])),
        "session": rng.choice([None, None, "s1", "s2", "s3"]),
        "max_tokens": rng.choice([2, 4, 8, 16, 64]),
        "priority": rng.choice([None, None, None, "low"]),
    }
