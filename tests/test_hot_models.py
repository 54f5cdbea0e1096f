"""Hot models (models.yaml `preload`, `warmup`) through a real daemon and fake engines."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from tests.helpers import Daemon, fake_model, registry_doc, wait_until

FIRST = {"FAKE_FIRST_REQUEST_DELAY": "2", "FAKE_LOG_REQUESTS": "1"}  # a first request costs 2 s


def ttft(daemon: Daemon, model: str, request_id: str) -> float:
    async def run() -> float:
        body = {"model": model, "prompt": "hi", "max_tokens": 3, "stream": True}
        async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as c:
            t0 = time.perf_counter()
            async with c.stream(
                "POST", "/v1/completions", json=body, headers={"X-Request-ID": request_id}
            ) as r:
                assert r.status_code == 200
                async for _ in r.aiter_raw():
                    return time.perf_counter() - t0
        raise AssertionError("no chunk")

    return asyncio.run(run())


def test_preloaded_models_are_ready_before_the_daemon_says_it_is(daemon_for: Any) -> None:
    doc = registry_doc(
        fake_model("hot", preload=True, warmup=True, env={**FIRST, "FAKE_START_DELAY": "0.5"}),
        fake_model("cold", env=FIRST),
    )
    daemon: Daemon = daemon_for(doc).start()
    with daemon.client() as c:
        early = c.get("/health", params={"ready": 1})
        assert c.get("/health").status_code == 200  # liveness is not readiness
        assert early.status_code == 503 and early.json()["waiting_for"] == ["hot"], early.text
        wait_until(lambda: c.get("/health", params={"ready": 1}).status_code == 200, 30)
        states = {m["name"]: m["state"] for m in c.get("/v1/status").json()["models"]}
        assert states == {"hot": "ready", "cold": "stopped"}

        # The warm-up paid the engine's first-request cost: a client's first token comes at once.
        assert ttft(daemon, "hot", "client-1") < 1.0
        log = c.get("/v1/admin/models/hot/logs", params={"tail": 200}).text
        assert log.index("x-request-id=warmup-hot") < log.index("x-request-id=client-1"), log
        # Without a warm-up, the first client pays it (the knob is real).
        assert ttft(daemon, "cold", "client-2") >= 2.0
        metrics = c.get("/metrics").text
    assert 'unified_inference_engine_warmup_seconds_count{model="hot"} 1.0' in metrics
    assert 'unified_inference_engine_warmup_seconds_count{model="cold"}' not in metrics


def test_a_failed_warm_up_fails_the_start_with_its_reason(daemon_for: Any) -> None:
    doc = registry_doc(fake_model("bad", warmup={"prompt": "CRASH-NOW", "max_tokens": 1},
                                  env={"FAKE_CRASH_ON": "CRASH-NOW"}))  # fmt: skip
    daemon: Daemon = daemon_for(doc).start()
    with daemon.client() as c:
        resp = c.post("/v1/admin/models/bad/start")
        assert resp.status_code == 503
        assert "the warm-up request failed" in resp.json()["error"]["message"], resp.text
        assert c.get("/v1/status").json()["models"][0]["state"] == "failed"
