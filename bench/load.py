"""Load generators: wrk for request rates, an asyncio client for streams."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


@dataclass
class RateResult:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    tool: str


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    assert m, text
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    url: str, body: dict[str, object], connections: int, duration: float, headers: dict[str, str]
) -> RateResult:
    script = (
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(json.dumps(body))}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    ) + "".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n" for k, v in headers.items())
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", "-s", f.name, url]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    Path(f.name).unlink()
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.MULTILINE))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    if socket_errors:
        errors += sum(int(x) for x in socket_errors.groups())
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert rps, out
    return RateResult(float(rps.group(1)), _ms(latency["50"]), _ms(latency["99"]), errors, "wrk")


async def run_asyncio_rate(
    url: str, body: dict[str, object], connections: int, duration: float, headers: dict[str, str]
) -> RateResult:
    """Closed-loop fallback when wrk is not installed (slower: it shares the CPU)."""
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + duration
    payload = json.dumps(body).encode()
    request_headers = {"Content-Type": "application/json", **headers}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:

        async def worker() -> None:
            nonlocal errors
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                async with session.post(url, data=payload, headers=request_headers) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                latencies.append((time.perf_counter() - t0) * 1000)

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.monotonic() - t0
    return RateResult(
        len(latencies) / elapsed, percentile(latencies, 50), percentile(latencies, 99), errors, "asyncio"
    )


def measure_rate(
    url: str, body: dict[str, object], connections: int, duration: float, headers: dict[str, str]
) -> RateResult:
    if wrk_available():
        return run_wrk(url, body, connections, duration, headers)
    return asyncio.run(run_asyncio_rate(url, body, connections, duration, headers))


@dataclass
class StreamResult:
    ttft_ms: list[float] = field(default_factory=list)
    gaps_ms: list[float] = field(default_factory=list)
    errors: int = 0

    def summary(self) -> dict[str, float]:
        return {
            "ttft_p50_ms": percentile(self.ttft_ms, 50),
            "ttft_p99_ms": percentile(self.ttft_ms, 99),
            "gap_p99_ms": percentile(self.gaps_ms, 99),
            "errors": float(self.errors),
        }


async def run_streams(
    url: str, model: str, streams: int, tokens: int, headers: dict[str, str]
) -> StreamResult:
    """`streams` concurrent SSE requests; TTFT and the gaps between chunks as received."""
    result = StreamResult()
    body = json.dumps({"model": model, "prompt": "x", "max_tokens": tokens, "stream": True}).encode()
    request_headers = {"Content-Type": "application/json", **headers}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

        async def one() -> None:
            t0 = time.perf_counter()
            last = None
            events = 0
            try:
                async with session.post(url, data=body, headers=request_headers) as r:
                    if r.status != 200:
                        result.errors += 1
                        return
                    async for chunk in r.content.iter_any():
                        now = time.perf_counter()
                        if last is None:
                            result.ttft_ms.append((now - t0) * 1000)
                        else:
                            result.gaps_ms.append((now - last) * 1000)
                        last = now
                        events += chunk.count(b"data: {")
            except (TimeoutError, aiohttp.ClientError):
                result.errors += 1
                return
            if events != tokens:
                result.errors += 1

        await asyncio.gather(*(one() for _ in range(streams)))
    return result


async def first_chunk_ms(url: str, model: str) -> float:
    """Time from sending a streaming request to its first byte of body."""
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 4, "stream": True}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        t0 = time.perf_counter()
        async with session.post(url, json=body) as r:
            r.raise_for_status()
            await r.content.readany()
            elapsed = (time.perf_counter() - t0) * 1000
            await r.read()
    return elapsed
