"""Soak: minutes of mixed traffic with random engine kills; every request accounted for.

SOAK_SECONDS (default 120) sets the length.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections import Counter
from typing import Any

import httpx
import psutil
import pytest

from tests.helpers import Daemon, fake_model, registry_doc

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "120"))
MODELS = ["gpu", "cpu"]


def _classify(status: int, data: bytes, streaming: bool) -> str:
    """'ok', 'error:<CODE>', or 'UNACCOUNTED' (no structured outcome)."""
    if status == 200 and streaming:
        if data.endswith(b"data: [DONE]\n\n"):
            return "ok"
        last = data.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
        if last.startswith(b"event: error\ndata: "):
            return "error:" + str(json.loads(last.split(b"data: ", 1)[1])["error"]["code"])
        return "UNACCOUNTED"
    if status == 200:
        return "ok" if json.loads(data).get("choices") else "UNACCOUNTED"
    try:
        return "error:" + str(json.loads(data)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "UNACCOUNTED"


async def _client(c: httpx.AsyncClient, deadline: float, outcomes: Counter[str], rng: random.Random) -> None:
    while time.monotonic() < deadline:
        streaming = rng.random() < 0.6
        body = {
            "model": rng.choice(MODELS),
            "prompt": "x",
            "max_tokens": rng.randint(5, 40),
            "stream": streaming,
        }
        try:
            async with c.stream("POST", "/v1/completions", json=body) as resp:
                data = b"".join([chunk async for chunk in resp.aiter_raw()])
            outcomes[_classify(resp.status_code, data, streaming)] += 1
        except httpx.HTTPError as exc:  # a reset, a hang past the client timeout, a bad frame
            outcomes[f"UNACCOUNTED:{type(exc).__name__}"] += 1


async def _killer(c: httpx.AsyncClient, deadline: float, rng: random.Random, kills: list[str]) -> None:
    while time.monotonic() < deadline - 3:
        await asyncio.sleep(rng.uniform(1.0, 4.0))
        rows = [r for r in (await c.get("/v1/status")).json()["models"] if r["pid"]]
        if rows:
            victim = rng.choice(rows)
            try:
                os.kill(victim["pid"], signal.SIGKILL)
                kills.append(victim["name"])
            except ProcessLookupError:
                pass


async def test_soak_with_random_engine_kills(daemon_for: Any) -> None:
    doc = registry_doc(
        fake_model("gpu", env={"FAKE_TOKEN_DELAY": "0.01"}, cpu_offload_model="cpu"),
        fake_model("cpu", backend="llamacpp", env={"FAKE_TOKEN_DELAY": "0.005"}),
    )
    daemon: Daemon = daemon_for(doc, HEALTH_CHECK_INTERVAL="0.5", STOP_GRACE_PERIOD="1").start()
    proc = psutil.Process(daemon.proc.pid)  # type: ignore[union-attr]
    rng = random.Random(1234)
    outcomes: Counter[str] = Counter()
    kills: list[str] = []
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=daemon.url, timeout=30, limits=limits) as c:
        warm = time.monotonic() + min(10.0, SOAK_SECONDS / 4)
        await asyncio.gather(*(_client(c, warm, outcomes, rng) for _ in range(12)))
        fds_before, rss_before = proc.num_fds(), proc.memory_info().rss
        deadline = time.monotonic() + SOAK_SECONDS
        await asyncio.gather(
            _killer(c, deadline, rng, kills), *(_client(c, deadline, outcomes, rng) for _ in range(12))
        )
        deadline = time.monotonic() + 10
        while True:  # poll until the daemon has settled every request
            status = (await c.get("/v1/status")).json()["models"]
            if not any(r["in_flight"] for r in status):
                break
            assert time.monotonic() < deadline, f"requests still in flight after the soak: {status}"
            await asyncio.sleep(0.05)
        fds_after, rss_after = proc.num_fds(), proc.memory_info().rss

    total = sum(outcomes.values())
    unaccounted = {k: v for k, v in outcomes.items() if k.startswith("UNACCOUNTED")}
    print(f"soak: {total} requests {dict(outcomes)}; kills {Counter(kills)}; fds {fds_before}->{fds_after}; "
          f"rss {rss_before / 2**20:.1f}->{rss_after / 2**20:.1f} MB")  # fmt: skip
    assert not unaccounted, f"requests without a structured outcome: {unaccounted}"
    assert outcomes["ok"] > total * 0.8
    assert len(kills) >= SOAK_SECONDS / 5, "the soak must really kill engines"
    assert all(r["in_flight"] == 0 for r in status)
    assert fds_after <= fds_before + 10, "file descriptors leak"
    assert rss_after - rss_before < 25 * 2**20, "memory grows"
