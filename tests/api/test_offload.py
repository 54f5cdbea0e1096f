"""GPU -> CPU spill and cpu execution mode, through a real daemon."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest

from tests.helpers import Daemon, fake_model, registry_doc

pytestmark = pytest.mark.anyio

SLOW = {"FAKE_TOKEN_DELAY": "0.05", "FAKE_TOKENS": "400"}
DOC = registry_doc(
    fake_model("gpu", env=SLOW, cpu_offload_model="twin"),
    fake_model("twin", backend="llamacpp"),
    fake_model("gpu-alone", backend="vllm", env=SLOW),
)


async def _fill(c: httpx.AsyncClient, stack: AsyncExitStack, model: str, n: int) -> None:
    """Hold `n` streams open on `model` (each is in flight until the stack closes)."""
    for _ in range(n):
        body = {"model": model, "prompt": "x", "stream": True}
        resp = await stack.enter_async_context(c.stream("POST", "/v1/completions", json=body))
        assert resp.status_code == 200 and resp.headers["x-served-model"] == model


async def test_at_the_threshold_requests_spill_to_the_cpu_twin(daemon_for: Any) -> None:
    daemon: Daemon = daemon_for(DOC, OFFLOAD_QUEUE_THRESHOLD="2").start()
    async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as c, AsyncExitStack() as stack:
        await _fill(c, stack, "gpu", 2)
        resp = await c.post("/v1/completions", json={"model": "gpu", "prompt": "y", "max_tokens": 2})
        assert resp.status_code == 200
        assert resp.headers["x-served-model"] == "twin"
        assert resp.json()["model"] == "gpu", "the answer names the model the client asked for"

        await _fill(c, stack, "gpu-alone", 2)
        refused = await c.post("/v1/completions", json={"model": "gpu-alone", "prompt": "y"})
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "GPU_OVERLOADED"
        assert refused.headers["retry-after"] == "1"
        rows = {r["name"]: r for r in (await c.get("/v1/status")).json()["models"]}
        assert rows["gpu"]["in_flight"] == 2 and rows["gpu-alone"]["in_flight"] == 2


async def test_offload_can_be_disabled(daemon_for: Any) -> None:
    daemon: Daemon = daemon_for(DOC, OFFLOAD_QUEUE_THRESHOLD="1", ENABLE_CPU_OFFLOAD="false").start()
    async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as c, AsyncExitStack() as stack:
        await _fill(c, stack, "gpu", 1)
        resp = await c.post("/v1/completions", json={"model": "gpu", "prompt": "y"})
        assert resp.status_code == 429


async def test_cpu_mode_serves_gpu_models_by_their_twin(daemon_for: Any) -> None:
    daemon: Daemon = daemon_for(DOC, EXECUTION_MODE="cpu").start()
    async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as c:
        resp = await c.post("/v1/completions", json={"model": "gpu", "prompt": "y", "max_tokens": 2})
        assert resp.status_code == 200 and resp.headers["x-served-model"] == "twin"
        refused = await c.post("/v1/completions", json={"model": "gpu-alone", "prompt": "y"})
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "MODEL_UNAVAILABLE"
        assert "cpu execution mode" in refused.json()["error"]["message"]
        admin = await c.post("/v1/admin/models/gpu-alone/start")
        assert admin.status_code == 503
        status = (await c.get("/v1/status")).json()
        assert status["execution_mode"] == "cpu"
        assert {r["name"]: r["starts"] for r in status["models"]} == {"gpu": 0, "twin": 1, "gpu-alone": 0}


async def test_a_burst_at_a_starting_model_with_replicas_is_told_it_too(daemon_for: Any) -> None:
    """Found by the review of issue 25: with replicas, the requests past both replicas' bounds
    while they start got Retry-After: 1 and no word of the start."""
    doc = registry_doc(fake_model("r", replicas={"min": 0, "max": 2}, env={"FAKE_START_DELAY": "2"}))
    daemon: Daemon = daemon_for(doc, OFFLOAD_QUEUE_THRESHOLD="2").start()
    body = {"model": "r", "prompt": "x", "max_tokens": 1}
    async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as c:
        for burst in range(2):
            replies = await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(8)))
            refused = [r for r in replies if r.status_code == 429]
            assert refused and all(r.status_code in (200, 429) for r in replies)
            for r in refused:
                assert "its engine is starting" in r.json()["error"]["message"]
                if burst:
                    assert 2 <= int(r.headers["retry-after"]) <= 4
            assert (await c.post("/v1/admin/models/r/stop")).status_code == 200


async def test_a_burst_at_a_starting_model_is_told_when_the_start_should_end(daemon_for: Any) -> None:
    """Issue 25, defect 6: five requests at once for a cold model (bound 3, no twin): three wait
    for the start, two get 429 — with a Retry-After of one second whatever the start's length.
    Now the two are told when the start is expected to end: the last start's duration less
    the time this one has run (the first start has none to go by: it says at least 1 s)."""
    doc = registry_doc(fake_model("cold", backend="vllm", env={"FAKE_START_DELAY": "3"}))
    daemon: Daemon = daemon_for(doc, OFFLOAD_QUEUE_THRESHOLD="3").start()
    body = {"model": "cold", "prompt": "x", "max_tokens": 2}
    async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as c:
        for burst in range(2):
            replies = await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(5)))
            assert sorted(r.status_code for r in replies) == [200, 200, 200, 429, 429]
            refused = [r for r in replies if r.status_code == 429]
            for r in refused:
                error = r.json()["error"]
                assert error["code"] == "GPU_OVERLOADED" and "its engine is starting" in error["message"]
            waits = [int(r.headers["retry-after"]) for r in refused]
            if burst == 0:
                assert all(w >= 1 for w in waits)
            else:  # the first start took ~3 s: that is what a refused caller is told
                assert all(3 <= w <= 5 for w in waits), waits
            assert (await c.post("/v1/admin/models/cold/stop")).status_code == 200
