"""Fair admission on a saturated GPU model: a flood against a tenant sending one at a time.

One daemon, two fake-engine models that take 20 ms a token with bound 3
(OFFLOAD_QUEUE_THRESHOLD) and no CPU twin: `queued` has a `queue_timeout`, `plain` has
none (429 at once). Tenant A keeps 48 requests in flight; tenant B sends one at a time.
Measured: the time to serve one request alone, B's wait (its latency less that) p50/p99 and
A's admissions meanwhile on `queued`; B's share of 429s on `plain`. Then A (weight 3) and
C (weight 1) both keep 12 requests waiting on `queued`: their shares of admissions.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench.load import percentile
from bench.procs import Proc, start_daemon

TOKEN_DELAY = 0.02
TOKENS = 10
BOUND = 3
KEYS: dict[str, dict[str, Any]] = {
    "a": {"key": "sk-bench-tenant-a", "name": "a", "weight": 3},
    "b": {"key": "sk-bench-tenant-b", "name": "b"},
    "c": {"key": "sk-bench-tenant-c", "name": "c"},
}


def start(work: Path) -> Proc:
    work.mkdir(parents=True, exist_ok=True)
    keys = work / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": list(KEYS.values())}))
    env = {"FAKE_TOKEN_DELAY": str(TOKEN_DELAY)}
    models: list[dict[str, Any]] = [
        {"name": "queued", "backend": "sglang", "model_path": "org/q", "env": env, "queue_timeout": 60},
        {"name": "plain", "backend": "sglang", "model_path": "org/p", "env": env},
    ]
    return start_daemon(work, models, API_KEYS_FILE=str(keys), OFFLOAD_QUEUE_THRESHOLD=str(BOUND))


class _Tenant:
    def __init__(self, session: aiohttp.ClientSession, url: str, who: str, model: str) -> None:
        self.session, self.url, self.model = session, url, model
        self.headers = {"authorization": f"Bearer {KEYS[who]['key']}"}
        self.served: list[float] = []  # end times of 200s
        self.refused = 0
        self.stop = False

    async def one(self) -> tuple[int, float]:
        body = {"model": self.model, "prompt": "x", "max_tokens": TOKENS}
        t0 = time.perf_counter()
        async with self.session.post(self.url, json=body, headers=self.headers) as r:
            await r.read()
            status = r.status
        if status == 200:
            self.served.append(time.perf_counter())
        else:
            self.refused += 1
        return status, time.perf_counter() - t0

    async def flood(self, workers: int) -> None:
        async def worker() -> None:
            while not self.stop:
                status, _ = await self.one()
                if status != 200:
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(worker() for _ in range(workers)))

    def between(self, t0: float, t1: float) -> int:
        return sum(1 for t in self.served if t0 <= t <= t1)


async def _flood_vs_one(url: str, model: str, requests: int, serve: float) -> dict[str, float]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        a, b = _Tenant(session, url, "a", model), _Tenant(session, url, "b", model)
        flood = asyncio.ensure_future(a.flood(48))
        await asyncio.sleep(1.0)  # the flood fills the slots and the queue
        waits, codes, t0 = [], [], time.perf_counter()
        for _ in range(requests):
            status, seconds = await b.one()
            codes.append(status)
            if status == 200:
                waits.append(max(0.0, seconds - serve) * 1000)
        t1 = time.perf_counter()
        a.stop = True
        await flood
    return {
        "b_wait_p50_ms": percentile(waits, 50) if waits else float("nan"),
        "b_wait_p99_ms": percentile(waits, 99) if waits else float("nan"),
        "b_refused_share": codes.count(429) / len(codes),
        "a_served": float(a.between(t0, t1)),
        "b_served": float(len(waits)),
    }


async def _serve_time(url: str) -> float:
    async with aiohttp.ClientSession() as session:
        tenant = _Tenant(session, url, "b", "queued")
        times = [(await tenant.one())[1] for _ in range(6)]
    return statistics.median(times[1:])


async def _weights(url: str, seconds: float) -> dict[str, float]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        a, c = _Tenant(session, url, "a", "queued"), _Tenant(session, url, "c", "queued")
        floods = asyncio.gather(a.flood(12), c.flood(12))
        await asyncio.sleep(1.0)
        t0 = time.perf_counter()
        await asyncio.sleep(seconds)
        t1 = time.perf_counter()
        a.stop = c.stop = True
        await floods
    served_a, served_c = a.between(t0, t1), c.between(t0, t1)
    return {"a_share": served_a / max(1, served_a + served_c), "admissions": float(served_a + served_c)}


def run(daemon: Proc, rounds: int, requests: int = 30, seconds: float = 10.0) -> dict[str, Any]:
    url = daemon.url + "/v1/completions"
    serve = asyncio.run(_serve_time(url))
    out: dict[str, Any] = {"serve_ms": serve * 1000, "bound": BOUND, "rows": []}
    for _ in range(rounds):
        row = asyncio.run(_flood_vs_one(url, "queued", requests, serve))
        plain = asyncio.run(_flood_vs_one(url, "plain", requests // 3, serve))
        row["plain_b_refused_share"] = plain["b_refused_share"]
        row.update(asyncio.run(_weights(url, seconds)))
        out["rows"].append(row)
    return out
