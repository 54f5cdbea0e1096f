"""Metrics, request IDs and engine logs, after real traffic through a real daemon."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import Daemon, fake_model, registry_doc, wait_until

DOC = registry_doc(
    fake_model("gpu", env={"FAKE_TOKEN_DELAY": "0.05", "FAKE_LOG_REQUESTS": "1"}, cpu_offload_model="cpu"),
    fake_model("cpu", backend="llamacpp", env={"FAKE_LOG_REQUESTS": "1"}),
)


def _samples(c: httpx.Client) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    resp = c.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain; version=")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_move_by_the_right_amounts(daemon_for: Any) -> None:
    daemon: Daemon = daemon_for(DOC, OFFLOAD_QUEUE_THRESHOLD="1").start()
    p = "unified_inference"
    with daemon.client() as c:
        before = _samples(c)
        assert _value(before, f"{p}_engine_starts_total", model="cpu", backend="llamacpp", replica="0") == 0
        assert not any(name.startswith(f"{p}_gpu_") for name, _ in before), "no GPU: GPU series are absent"

        for _ in range(5):
            assert (
                c.post("/v1/completions", json={"model": "cpu", "prompt": "x", "max_tokens": 3}).status_code
                == 200
            )
        c.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        body = {"model": "cpu", "prompt": "x", "max_tokens": 7, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as stream:
            b"".join(stream.iter_raw())

        with ExitStack() as stack:  # hold the GPU model at its bound, then one more spills to the twin
            busy = stack.enter_context(
                c.stream(
                    "POST",
                    "/v1/completions",
                    json={"model": "gpu", "prompt": "x", "stream": True, "max_tokens": 200},
                )
            )
            assert busy.status_code == 200
            spilled = c.post("/v1/completions", json={"model": "gpu", "prompt": "y", "max_tokens": 2})
            assert spilled.headers["x-served-model"] == "cpu"
            assert _value(_samples(c), f"{p}_engine_in_flight_requests", model="gpu", replica="0") == 1
        after = _samples(c)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta(f"{p}_requests_total", model="cpu", backend="llamacpp", status="200", code="") == 6
    assert (
        delta(f"{p}_requests_total", model="_unknown", backend="", status="404", code="MODEL_NOT_FOUND") == 1
    )
    assert delta(f"{p}_requests_total", model="gpu", backend="sglang", status="200", code="") == 1
    assert delta(f"{p}_request_duration_seconds_count", model="cpu") == 6
    assert delta(f"{p}_time_to_first_token_seconds_count", model="cpu") == 1
    assert delta(f"{p}_streamed_tokens_total", model="cpu") == 8  # 7 events + llama.cpp's finish event
    assert delta(f"{p}_offloads_total", model="gpu", target="cpu") == 1
    assert delta(f"{p}_engine_starts_total", model="cpu", backend="llamacpp", replica="0") == 1
    assert delta(f"{p}_engine_startup_seconds_count", model="cpu", backend="llamacpp") == 1
    assert delta(f"{p}_engine_startup_seconds_sum", model="cpu", backend="llamacpp") > 0
    assert (
        _value(after, f"{p}_engine_state", model="cpu", backend="llamacpp", state="ready", replica="0") == 1
    )
    assert (
        _value(after, f"{p}_engine_state", model="cpu", backend="llamacpp", state="stopped", replica="0") == 0
    )


def test_overload_rejections_and_crashes_are_counted(daemon_for: Any) -> None:
    doc = registry_doc(fake_model("gpu", env={"FAKE_TOKEN_DELAY": "0.05"}), fake_model("bad", env={
        "FAKE_EXIT_DURING_START": "1"}))  # fmt: skip
    daemon: Daemon = daemon_for(doc, OFFLOAD_QUEUE_THRESHOLD="1").start()
    p = "unified_inference"
    with daemon.client() as c:
        body = {"model": "gpu", "prompt": "x", "stream": True, "max_tokens": 200}
        with c.stream("POST", "/v1/completions", json=body):
            assert c.post("/v1/completions", json={"model": "gpu", "prompt": "y"}).status_code == 429
        c.post("/v1/admin/models/bad/start")
        samples = _samples(c)
    assert _value(samples, f"{p}_rejected_requests_total", model="gpu", code="GPU_OVERLOADED") == 1
    assert (
        _value(samples, f"{p}_engine_start_failures_total", model="bad", backend="sglang", replica="0") == 1
    )


def test_request_id_is_returned_logged_and_reaches_the_engine(daemon_for: Any) -> None:
    daemon: Daemon = daemon_for(DOC, LOG_FORMAT="json").start()
    rid = "req-4f1c2a-from-client"
    with daemon.client() as c:
        resp = c.post("/v1/completions", json={"model": "cpu", "prompt": "x", "max_tokens": 2},
                      headers={"X-Request-ID": rid})  # fmt: skip
        assert resp.headers["x-request-id"] == rid
        generated = c.post("/v1/completions", json={"model": "nope"}).headers["x-request-id"]
        assert len(generated) == 32 and generated != rid
        assert c.get("/v1/status").headers["x-request-id"]
        engine_log = c.get("/v1/admin/models/cpu/logs", params={"tail": 50}).text
    assert f"x-request-id={rid}" in engine_log, "the engine received the ID"

    def daemon_lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]

    wait_until(lambda: any(e["request_id"] == rid for e in daemon_lines()), timeout=5)
    mine = [e for e in daemon_lines() if e["request_id"] == rid]
    assert any("engine 'cpu' ready" in e["message"] for e in mine), "the start it caused carries its ID"
    assert any(e["logger"] == "unified_inference.access" and "200" in e["message"] for e in mine)


def test_logs_endpoint_tails_and_follows(daemon_for: Any) -> None:
    daemon: Daemon = daemon_for(DOC).start()
    with daemon.client() as c:
        c.post("/v1/admin/models/cpu/start")
        tail = c.get("/v1/admin/models/cpu/logs", params={"tail": 3}).text.splitlines()
        assert len(tail) <= 3 and any("serving on 127.0.0.1" in line for line in tail)
        assert c.get("/v1/admin/models/nope/logs").status_code == 404

        got = b""
        with c.stream("GET", "/v1/admin/models/cpu/logs", params={"tail": 0, "follow": True}) as follow:
            c.post("/v1/completions", json={"model": "cpu", "prompt": "x", "max_tokens": 1},
                   headers={"X-Request-ID": "followed-request"})  # fmt: skip
            deadline = time.monotonic() + 10
            for chunk in follow.iter_raw():
                got += chunk
                if b"followed-request" in got or time.monotonic() > deadline:
                    break
        assert b"x-request-id=followed-request" in got
