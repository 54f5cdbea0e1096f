"""The fake engine's prefix cache (FAKE_PREFILL_DELAY): a later turn of a conversation it has
seen is a hit, anything else a miss (what the replica-balancing benchmark measures)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from lifecycle.ports import free_port
from tests.helpers import FAKE_ENGINE, engine_up, wait_until


def test_a_later_turn_of_a_seen_conversation_hits_the_prefix_cache(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "FAKE_PREFILL_DELAY": "0.05"}
    argv = [sys.executable, str(FAKE_ENGINE), "sglang", "--model-path", "m", "--port", str(port)]
    proc = subprocess.Popen(argv, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: engine_up(url), 15)
        first = [{"role": "user", "content": "hello"}]
        second = [*first, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "more"}]
        other = [{"role": "user", "content": "something else"}]
        for messages in (first, second, other, second):
            body = {"model": "m", "messages": messages, "max_tokens": 1}
            assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 200
        for prompt in ("once upon", "once upon a time", "far away"):
            body = {"model": "m", "prompt": prompt, "max_tokens": 1}
            assert httpx.post(url + "/v1/completions", json=body).status_code == 200
        stats = httpx.get(url + "/fake/stats").json()
        # chat: first miss, second hit (extends first), other miss, second again hit;
        # completions: miss, hit (extends "once upon"), miss
        assert (stats["prefix_hits"], stats["prefix_misses"]) == (3, 4)
    finally:
        proc.terminate()
        proc.wait(10)
