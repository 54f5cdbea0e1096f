"""Hostile and careless clients against a daemon on loopback, for a bounded time.

    python tests/adversary.py --port P --seconds S --key K --stuck-key K2 [--slowloris 200] [--stuck 50]

Runs, all at once, until S seconds have passed:
- a slowloris: N connections each sending one header line a second, opening a
  new connection whenever the daemon closes one;
- never-reading stream clients: M connections (4 KiB receive buffers) that ask
  for a long stream of `--stuck-model` and never read it, asking again once the
  daemon resets them;
- a header flood: a connection sending a header line of up to 1 MiB until the
  daemon answers or closes it, again and again (50 a second);
- a hostile key client: cycles through the spellings of `max_tokens` that once
  bypassed a key's limit (strings, floats, `max_completion_tokens`, none at
  all), and streams and answers abandoned half-way, against `--hostile-model`.

Prints one JSON object: what each attacker saw, including every answer that
broke the key's `--max-tokens` (`violations`, which must stay empty).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys
import time
from typing import Any

import httpx

HEAD = b"GET /health HTTP/1.1\r\nHost: x\r\n"


class Stats:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.violations: list[str] = []

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n


async def _socket(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    return sock


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(sock=await _socket(port))


async def slowloris(port: int, stop: float, stats: Stats) -> None:
    while time.monotonic() < stop:
        try:
            reader, writer = await _open(port)
            writer.write(HEAD)
            while time.monotonic() < stop:
                with contextlib.suppress(TimeoutError):
                    if await asyncio.wait_for(reader.read(4096), 1.0) == b"":
                        break  # closed by the daemon (or answered 408 and closed)
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
            stats.add("slowloris_cut")
            writer.close()
        except OSError:
            stats.add("slowloris_reset")  # cut while writing, or refused
            await asyncio.sleep(0.1)


def _stream_request(model: str, key: str) -> bytes:
    body = json.dumps({"model": model, "prompt": "x", "stream": True}).encode()
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += b"Authorization: Bearer %s\r\n" % key.encode()
    return head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


TCP_ESTABLISHED = 1


def _gone(sock: socket.socket) -> bool:
    """Cut off by the daemon, seen without reading anything: the TCP state has left
    ESTABLISHED (a reset, or the daemon's close)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != TCP_ESTABLISHED


async def stuck(port: int, model: str, key: str, stop: float, stats: Stats) -> None:
    while time.monotonic() < stop:
        try:
            sock = await _socket(port, rcvbuf=4096)
        except OSError:
            stats.add("stuck_refused")
            await asyncio.sleep(0.1)
            continue
        with sock:
            try:
                await asyncio.get_running_loop().sock_sendall(sock, _stream_request(model, key))
            except OSError:
                stats.add("stuck_refused")
                continue
            stats.add("stuck_started")
            while time.monotonic() < stop:
                if _gone(sock):
                    stats.add("stuck_cut")
                    break
                await asyncio.sleep(0.5)


async def header_flood(port: int, stop: float, stats: Stats) -> None:
    """One connection at a time (at most 50 a second) sends a header line of up to 1 MiB,
    64 KiB at a time, looking for the daemon's answer after each write."""
    filler = b"a" * 65536
    loop = asyncio.get_running_loop()
    while time.monotonic() < stop:
        try:
            sock = await _socket(port)
        except OSError:
            stats.add("flood_refused")
            await asyncio.sleep(0.1)
            continue
        with sock:
            answer, sent = b"", 0
            try:
                await loop.sock_sendall(sock, b"GET /health HTTP/1.1\r\nX-Flood: ")
                while sent < 2**20 and not answer:
                    await loop.sock_sendall(sock, filler)
                    sent += len(filler)
                    with contextlib.suppress(BlockingIOError):
                        answer = sock.recv(200) or b"closed"
            except OSError:
                with contextlib.suppress(OSError):
                    answer = answer or sock.recv(200)
            stats.add("flood_431" if answer.startswith(b"HTTP/1.1 431 ") else "flood_other")
            stats.add("flood_bytes", sent)
        await asyncio.sleep(0.02)


BYPASSES: list[dict[str, Any]] = [
    {"max_tokens": "40"}, {"max_tokens": 40.0}, {"max_tokens": " 40 "}, {"max_completion_tokens": 40},
    {"max_completion_tokens": "40"}, {}, {"max_tokens": None}, {"max_tokens": 0}, {"max_tokens": -1},
    {"max_tokens": True}, {"max_tokens": "4_0"},
]  # fmt: skip


async def hostile(port: int, key: str, model: str, limit: int, stop: float, stats: Stats) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30) as c:
        i = 0
        while time.monotonic() < stop:
            fields = BYPASSES[i % len(BYPASSES)]
            chat = bool(i % 2)
            i += 1
            path = "/v1/chat/completions" if chat else "/v1/completions"
            body: dict[str, Any] = {"model": model, **fields}
            body.update({"messages": [{"role": "user", "content": "x"}]} if chat else {"prompt": "x"})
            await _hostile_once(c, path, body, limit, i, stats)


async def _hostile_once(c: httpx.AsyncClient, path: str, body: dict[str, Any], limit: int, i: int,
                        stats: Stats) -> None:  # fmt: skip
    try:
        if i % 5 == 0:  # a stream, left after two events
            async with c.stream("POST", path, json={**body, "stream": True}) as s:
                events = 0
                async for chunk in s.aiter_raw():
                    events += chunk.count(b"data: {")
                    if events >= 2:
                        break
                stats.add(f"hostile_stream_{s.status_code}")
            return
        if i % 7 == 0:  # an answer abandoned at once
            with contextlib.suppress(httpx.ReadTimeout):
                await c.post(path, json=body, timeout=httpx.Timeout(30, read=0.05))
            stats.add("hostile_abandoned")
            return
        resp = await c.post(path, json=body)
    except httpx.HTTPError as exc:
        stats.add(f"hostile_error_{type(exc).__name__}")
        return
    stats.add(f"hostile_{resp.status_code}")
    if resp.status_code == 200:
        got = resp.json()["usage"]["completion_tokens"]
        if got > limit:
            stats.violations.append(f"{path} {body}: {got} tokens")
    elif resp.status_code == 429:
        await asyncio.sleep(float(resp.headers.get("retry-after", "1")) / 10)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    stats = Stats()
    stop = time.monotonic() + args.seconds
    tasks = [slowloris(args.port, stop, stats) for _ in range(args.slowloris)]
    tasks += [stuck(args.port, args.stuck_model, args.stuck_key, stop, stats) for _ in range(args.stuck)]
    tasks += [header_flood(args.port, stop, stats)]
    tasks += [hostile(args.port, args.key, args.hostile_model, args.max_tokens, stop, stats)]
    print("attacking", file=sys.stderr, flush=True)
    await asyncio.gather(*tasks)
    return {"counts": stats.counts, "violations": stats.violations}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--max-tokens", type=int, default=5)
    p.add_argument("--slowloris", type=int, default=200)
    p.add_argument("--stuck", type=int, default=50)
    p.add_argument("--stuck-model", default="target")
    p.add_argument("--stuck-key", required=True, help="a key without limits, for the clients that never read")
    p.add_argument("--hostile-model", default="metered")
    print(json.dumps(asyncio.run(main(p.parse_args()))), flush=True)
