"""Every error code, its status and its shape, through a real daemon on loopback."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.helpers import Daemon, fake_model, registry_doc, wait_until

DOC = registry_doc(
    fake_model("ok"),
    fake_model("gguf-on-sglang", format="gguf"),
    fake_model("broken", env={"FAKE_EXIT_DURING_START": "4"}),
    fake_model("silent", env={"FAKE_HANG": "request"}, timeouts={"first_byte": 1}),
    fake_model("crashy", env={"FAKE_CRASH_AFTER": "0"}),
    fake_model("busy", env={"FAKE_TOKEN_DELAY": "0.05", "FAKE_TOKENS": "400"}),
    fake_model("embedder", type="embedding"),
)


@pytest.fixture
def daemon(daemon_for: Any) -> Daemon:
    started: Daemon = daemon_for(DOC, OFFLOAD_QUEUE_THRESHOLD="1", MAX_REQUEST_BODY_BYTES="4096").start()
    return started


def _check(resp: httpx.Response, status: int, code: str, type_: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    error: dict[str, Any] = resp.json()["error"]
    assert (error["code"], error["type"]) == (code, type_)
    assert isinstance(error["message"], str) and error["message"]
    return error


def _complete(c: httpx.Client, model: str) -> httpx.Response:
    return c.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2})


def test_request_errors(daemon: Daemon) -> None:
    with daemon.client() as c:
        _check(
            c.post("/v1/completions", json={"prompt": "x"}), 400, "MODEL_REQUIRED", "invalid_request_error"
        )
        err = _check(_complete(c, "nope"), 404, "MODEL_NOT_FOUND", "invalid_request_error")
        assert err["available_models"] == [
            "ok",
            "gguf-on-sglang",
            "broken",
            "silent",
            "crashy",
            "busy",
            "embedder",
        ]
        assert err["install_endpoint"] == "/v1/models/install"
        assert c.get("/v1/models", params={"model": "nope"}).json()["error"]["code"] == "MODEL_NOT_FOUND"
        err = _check(_complete(c, "gguf-on-sglang"), 422, "FORMAT_NOT_SUPPORTED", "invalid_request_error")
        assert "format 'gguf' is not supported by backend 'sglang'" in err["message"]
        _check(c.post("/v1/completions", content=b'{"model": '), 400, "INVALID_JSON", "invalid_request_error")
        _check(c.post("/v1/completions", content=b"\xff\xfe"), 400, "INVALID_JSON", "invalid_request_error")
        _check(c.post("/v1/completions", content=b"[1]"), 400, "INVALID_BODY", "invalid_request_error")
        _check(
            c.post("/v1/completions", content=b"[" * 100_000),
            413,
            "REQUEST_TOO_LARGE",
            "invalid_request_error",
        )
        nested = b"[" * 2000 + b"]" * 2000
        _check(c.post("/v1/completions", content=nested), 400, "INVALID_JSON", "invalid_request_error")
        _check(
            c.post("/v1/embeddings", json={"model": "ok", "input": "x"}),
            400,
            "ENDPOINT_NOT_SUPPORTED",
            "invalid_request_error",
        )
        _check(c.post("/v1/no/such/path", json={}), 404, "NOT_FOUND", "invalid_request_error")
        _check(c.get("/v1/completions"), 405, "METHOD_NOT_ALLOWED", "invalid_request_error")


def test_internal_engine_endpoints_are_not_reachable(daemon: Daemon) -> None:
    with daemon.client() as c:
        assert _complete(c, "ok").status_code == 200  # the engine is up and has /flush_cache
        internal = (
            "/flush_cache", "/v1/flush_cache", "/release_memory_occupation", "/fake/stats",
            "/invocations", "/collective_rpc", "/update_weights", "/server_info", "/sleep",
        )  # fmt: skip
        for path in internal:
            _check(c.post(path, json={"model": "ok"}), 404, "NOT_FOUND", "invalid_request_error")


def test_engine_errors(daemon: Daemon) -> None:
    with daemon.client() as c:
        err = _check(_complete(c, "broken"), 503, "MODEL_UNAVAILABLE", "api_error")
        assert "exited with code 4 during start" in err["message"]
        assert "FAKE_EXIT_DURING_START" in err["message"], "the engine's last lines explain why"
        _check(_complete(c, "silent"), 504, "BACKEND_TIMEOUT", "timeout_error")
        _check(_complete(c, "crashy"), 502, "BACKEND_UNAVAILABLE", "api_error")


async def test_gpu_overloaded_has_retry_after(daemon: Daemon) -> None:
    async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as c:
        body = {"model": "busy", "prompt": "x", "stream": True}
        async with c.stream("POST", "/v1/completions", json=body) as first:
            assert first.status_code == 200
            resp = await c.post("/v1/completions", json={"model": "busy", "prompt": "y", "max_tokens": 1})
    _check(resp, 429, "GPU_OVERLOADED", "rate_limit_error")
    assert resp.headers["retry-after"] == "1"


def test_openai_sdk_reads_the_error_shape(daemon: Daemon) -> None:
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="x")
    assert info.value.code == "MODEL_NOT_FOUND"
    assert info.value.type == "invalid_request_error"
    assert "Model 'nope' is not registered" in info.value.message
    with pytest.raises(openai.UnprocessableEntityError) as unprocessable:
        client.completions.create(model="gguf-on-sglang", prompt="x")
    assert unprocessable.value.code == "FORMAT_NOT_SUPPORTED"


def test_server_stays_healthy_after_errors(daemon: Daemon) -> None:
    with daemon.client() as c:
        for _ in range(3):
            _complete(c, "crashy")
        wait_until(lambda: c.get("/health").status_code == 200, timeout=5)
        assert _complete(c, "ok").status_code == 200


pytestmark = pytest.mark.anyio
