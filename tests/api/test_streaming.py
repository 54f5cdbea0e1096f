"""Token streams through a real daemon: timing, engine death, client disconnect."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from tests.helpers import Daemon, engine_aget, fake_model, registry_doc

pytestmark = pytest.mark.anyio

DOC = registry_doc(
    fake_model("slow", env={"FAKE_TOKEN_DELAY": "0.05"}),
    fake_model("dies", env={"FAKE_TOKEN_DELAY": "0.02", "FAKE_CRASH_AFTER": "5"}),
    fake_model("long", env={"FAKE_TOKEN_DELAY": "0.05", "FAKE_TOKENS": "1000"}),
    fake_model("renamed", backend="vllm", served_model_name="engine-side-name"),
    fake_model("cold", backend="llamacpp", env={"FAKE_START_DELAY": "0.5"}),
)


@pytest.fixture
def daemon(daemon_for: Any) -> Daemon:
    started: Daemon = daemon_for(DOC).start()
    return started


async def _status(c: httpx.AsyncClient, name: str) -> dict[str, Any]:
    rows = (await c.get("/v1/status")).json()["models"]
    row: dict[str, Any] = next(r for r in rows if r["name"] == name)
    return row


async def _poll(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_stream_reaches_the_client_as_the_engine_emits_it(daemon: Daemon) -> None:
    async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as c:
        await c.post("/v1/admin/models/slow/start")
        body = {"model": "slow", "prompt": "count", "max_tokens": 64, "stream": True}
        arrivals: list[float] = []
        data = b""
        t0 = time.monotonic()
        async with c.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            assert resp.headers["x-served-model"] == "slow"
            async for chunk in resp.aiter_raw():
                arrivals.append(time.monotonic() - t0)
                data += chunk
    events = [e for e in data.split(b"\n\n") if e.startswith(b"data: {")]
    assert len(events) == 64
    assert data.endswith(b"data: [DONE]\n\n")
    assert len(arrivals) >= 32, f"only {len(arrivals)} separate chunks: the stream was buffered"
    # 64 tokens x 50 ms: the first chunk must come long before the last.
    assert arrivals[-1] - arrivals[0] >= 1.5
    assert arrivals[0] < arrivals[-1] / 4


async def test_engine_dying_mid_stream_ends_it_with_an_error_event(daemon: Daemon) -> None:
    async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as c:
        messages = [{"role": "user", "content": "x"}]
        body = {"model": "dies", "messages": messages, "max_tokens": 50, "stream": True}
        t0 = time.monotonic()
        async with c.stream("POST", "/v1/chat/completions", json=body) as resp:
            data = b"".join([chunk async for chunk in resp.aiter_raw()])
        assert time.monotonic() - t0 < 10
        assert data.count(b"data: {") >= 5
        tail = data.rsplit(b"\n\n", 2)[-2]
        assert tail.startswith(b"event: error\ndata: ")
        error = json.loads(tail.split(b"data: ", 1)[1])["error"]
        assert error["code"] == "BACKEND_UNAVAILABLE"
        # The crash is seen; the next request restarts the engine.
        await _poll(lambda: _state_is(c, "dies", "failed"), timeout=10)
        resp2 = await c.post("/v1/completions", json={"model": "dies", "prompt": "x", "max_tokens": 2})
        assert resp2.status_code == 200
        assert (await _status(c, "dies"))["starts"] == 2


async def _state_is(c: httpx.AsyncClient, name: str, state: str) -> bool:
    return bool((await _status(c, name))["state"] == state)


async def test_client_disconnect_cancels_the_engine_request(daemon: Daemon) -> None:
    async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as c:
        body = {"model": "long", "prompt": "x", "stream": True}
        async with c.stream("POST", "/v1/completions", json=body) as resp:
            got = 0
            async for chunk in resp.aiter_raw():
                got += chunk.count(b"data: ")
                if got >= 3:
                    break
            assert (await _status(c, "long"))["in_flight"] == 1
        # Leaving the block closed the connection mid-stream.
        await _poll(lambda: _in_flight_is(c, "long", 0), timeout=5)
        await _engine_saw_one_cancel(c, "long")


async def test_client_disconnect_cancels_a_non_streaming_request(daemon: Daemon) -> None:
    async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as c:
        await c.post("/v1/admin/models/long/start")
        body = {"model": "long", "prompt": "x"}  # 1000 tokens x 50 ms: far longer than we wait
        with pytest.raises(httpx.ReadTimeout):
            await c.post("/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
        await _poll(lambda: _in_flight_is(c, "long", 0), timeout=5)
        await _engine_saw_one_cancel(c, "long")


async def test_the_daemon_keeps_its_connections_to_an_engine(daemon: Daemon) -> None:
    """Sequential requests share one engine connection; a second burst (under the offload
    threshold) reuses the first burst's."""
    async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as c:
        body = {"model": "slow", "prompt": "x", "max_tokens": 2}
        for _ in range(10):
            assert (await c.post("/v1/completions", json=body)).status_code == 200
        assert (await _engine_stats(c, "slow"))["connections"] == 1
        for _ in range(2):
            answers = await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(3)))
            assert all(a.status_code == 200 for a in answers)
        stats = await _engine_stats(c, "slow")
    assert stats["requests"] == 16 and stats["connections"] <= 3


async def _engine_stats(c: httpx.AsyncClient, model: str) -> dict[str, Any]:
    stats: dict[str, Any] = (await engine_aget(await _status(c, model), "/fake/stats", timeout=5)).json()
    return stats


async def _engine_saw_one_cancel(c: httpx.AsyncClient, model: str) -> None:
    """The engine itself stopped the request: one cancelled, none in flight."""
    row = await _status(c, model)

    async def saw_cancel() -> bool:
        stats = (await engine_aget(row, "/fake/stats", timeout=5)).json()
        return bool(stats["cancelled"] == 1 and stats["in_flight"] == 0)

    await _poll(saw_cancel, timeout=5)


async def _in_flight_is(c: httpx.AsyncClient, name: str, n: int) -> bool:
    return bool((await _status(c, name))["in_flight"] == n)


async def test_model_name_is_rewritten_both_ways(daemon: Daemon) -> None:
    async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as c:
        resp = await c.post("/v1/completions", json={"model": "renamed", "prompt": "x", "max_tokens": 3})
        assert resp.status_code == 200
        assert resp.json()["model"] == "renamed"
        body = {"model": "renamed", "prompt": "x", "max_tokens": 3, "stream": True}
        async with c.stream("POST", "/v1/completions", json=body) as stream:
            data = b"".join([chunk async for chunk in stream.aiter_raw()])
    assert b'"model": "renamed"' in data and b"engine-side-name" not in data
    log = (daemon.workdir / "state" / "logs" / "renamed.log").read_text()
    assert "--served-model-name engine-side-name" in log


async def test_simultaneous_first_requests_start_the_engine_once(daemon: Daemon) -> None:
    async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as c:
        body = {"model": "cold", "prompt": "x", "max_tokens": 1}
        responses = await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(12)))
        assert [r.status_code for r in responses] == [200] * 12
        row = await _status(c, "cold")
        assert (row["starts"], row["state"], row["in_flight"]) == (1, "ready", 0)
