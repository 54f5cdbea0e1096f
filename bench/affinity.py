"""Replica balancing on a multi-turn chat workload: round robin, least loaded, prefix affinity.

Three models on one daemon, each 3 replicas of a fake engine that models a KV prefix cache
(FAKE_PREFILL_DELAY: a prompt that extends a conversation the replica has seen starts at once;
any other pays the prefill). Clients walk through conversations turn by turn, streaming, each
turn sending the whole conversation so far; every policy gets its own fresh conversations.
Measured per policy: the replicas' cache hit rate (their own counts), TTFT p50/p99, and the
spread of requests over the replicas (max / mean).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import httpx

from bench.load import percentile
from bench.procs import Proc

POLICIES = ("round_robin", "least_loaded", "prefix_affinity")
PREFILL_DELAY = 0.05  # seconds the fake engine "prefills" a prompt it has not cached
REPLICAS = 3


def models() -> list[dict[str, Any]]:
    env = {"FAKE_PREFILL_DELAY": str(PREFILL_DELAY), "FAKE_TOKEN_DELAY": "0.002"}
    return [
        {"name": f"chat-{p}", "backend": "sglang", "model_path": f"org/{p}", "replicas": REPLICAS,
         "routing": p, "env": env}
        for p in POLICIES
    ]  # fmt: skip


def _stats(daemon: Proc, model: str) -> list[dict[str, Any]]:
    rows = httpx.get(daemon.url + "/v1/status", timeout=30).json()["models"]
    replicas = next(r for r in rows if r["name"] == model)["replicas"]
    return [httpx.get(f"http://127.0.0.1:{r['port']}/fake/stats", timeout=30).json() for r in replicas]


async def _conversations(url: str, model: str, tag: str, count: int, turns: int, clients: int) -> list[float]:
    """`clients` concurrent clients share `count` conversations of `turns` turns; TTFTs in ms."""
    ttfts: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for conv in range(count):
        queue.put_nowait(conv)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def client() -> None:
            while not queue.empty():
                conv = queue.get_nowait()
                messages = [{"role": "system", "content": f"{tag}: you are assistant {conv}."}]
                for t in range(turns):
                    messages.append({"role": "user", "content": f"question {t} of conversation {conv}"})
                    body = {"model": model, "messages": messages, "max_tokens": 4, "stream": True}
                    t0 = time.perf_counter()
                    async with session.post(url, json=body) as r:
                        r.raise_for_status()
                        await r.content.readany()
                        ttfts.append((time.perf_counter() - t0) * 1000)
                        await r.read()
                    messages.append({"role": "assistant", "content": f"answer {t}"})

        await asyncio.gather(*(client() for _ in range(clients)))
    return ttfts


def run(
    daemon: Proc, rounds: int, conversations: int = 24, turns: int = 6, clients: int = 8
) -> dict[str, Any]:
    """Alternating policies round after round; per policy: hit rate, TTFT, spread (medians later)."""
    url = daemon.url + "/v1/chat/completions"
    out: dict[str, Any] = {
        "prefill_ms": PREFILL_DELAY * 1000,
        "replicas": REPLICAS,
        "rows": {p: [] for p in POLICIES},
    }
    for policy in POLICIES:
        httpx.post(f"{daemon.url}/v1/admin/models/chat-{policy}/start", params={"replicas": REPLICAS},
                   timeout=120).raise_for_status()  # fmt: skip
    for round_no in range(rounds):
        for policy in POLICIES:
            model = f"chat-{policy}"
            before = _stats(daemon, model)
            ttfts = asyncio.run(_conversations(url, model, f"r{round_no}", conversations, turns, clients))
            after = _stats(daemon, model)
            hits = sum(a["prefix_hits"] - b["prefix_hits"] for a, b in zip(after, before, strict=True))
            misses = sum(a["prefix_misses"] - b["prefix_misses"] for a, b in zip(after, before, strict=True))
            served = [a["requests"] - b["requests"] for a, b in zip(after, before, strict=True)]
            out["rows"][policy].append({
                "hit_rate": hits / max(1, hits + misses),
                "ttft_p50_ms": percentile(ttfts, 50),
                "ttft_p99_ms": percentile(ttfts, 99),
                "ttft_mean_ms": sum(ttfts) / len(ttfts),
                "load_max_over_mean": max(served) / (sum(served) / len(served)),
                "requests": float(sum(served)),
            })  # fmt: skip
    return out
