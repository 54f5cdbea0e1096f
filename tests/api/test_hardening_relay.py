"""What the daemon relays: engines that misbehave, answers that must not be trusted as sent.

Most tests run against tests/scripted_engine.py, an engine that does on purpose
what real ones should not. Each test named after a review finding (issue 11)
failed on the main branch before the fix.
"""

from __future__ import annotations

import gzip
import json
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
import yaml

from tests.helpers import FAKE_ENGINES, Daemon, engine_get, fake_model, wait_until

SCRIPTED = Path(__file__).resolve().parent.parent / "scripted_engine.py"
TIGHT = "sk-tight-0123456789"  # 10 tokens a minute


def _doc() -> dict[str, Any]:
    # The scripted engine stands in for vLLM; the fake engine for SGLang and llama.cpp.
    engines = {**FAKE_ENGINES, "vllm": {"command": [sys.executable, str(SCRIPTED)]}}
    models = [
        fake_model("s", backend="vllm", served_model_name="served-name"),  # answers are renamed
        fake_model("served-name", backend="vllm"),  # the same engine's answers, as they come
        fake_model("f", backend="sglang", env={"FAKE_CRASH_ON": "boom", "FAKE_LOG_REQUESTS": "1"}),
        fake_model("l", backend="llamacpp"),
    ]
    return {"models": models, "engines": engines}


@pytest.fixture
def daemon(daemon_for: Any, tmp_path: Path) -> Daemon:
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [
        {"key": TIGHT, "name": "tight", "tokens_per_minute": 10},
        {"key": "sk-open-0123456789", "name": "open"},
    ]}))  # fmt: skip
    started: Daemon = daemon_for(
        _doc(), API_KEYS_FILE=str(keys), MAX_RESPONSE_BODY_BYTES=str(4 * 2**20), LOG_LEVEL="debug"
    ).start()
    return started


OPEN = {"Authorization": "Bearer sk-open-0123456789"}


def _script(
    c: httpx.Client, script: str, stream: bool = False, model: str = "s", headers: dict[str, str] = OPEN
) -> httpx.Response:
    body = {"model": model, "prompt": script, "stream": stream}
    return c.post("/v1/completions", json=body, headers=headers)


def _row(c: httpx.Client, model: str) -> dict[str, Any]:
    rows = c.get("/v1/status", headers=OPEN).json()["models"]
    row: dict[str, Any] = next(r for r in rows if r["name"] == model)
    return row


def test_a_request_that_crashes_its_engine_is_sent_once(daemon: Daemon) -> None:
    """Finding 8: it was retried on a fresh engine (crashing it again), and the failure count
    went 1 -> 0 -> 1, so the back-off never grew."""
    log = daemon.workdir / "state" / "logs" / "f.log"
    with daemon.client() as c:
        ok = {"model": "f", "prompt": "fine", "max_tokens": 2}
        assert c.post("/v1/completions", json=ok, headers=OPEN).status_code == 200  # a pooled connection
        boom = {"model": "f", "prompt": "boom", "max_tokens": 2}
        first = c.post("/v1/completions", json=boom, headers=OPEN)
        assert first.status_code == 502 and first.json()["error"]["code"] == "BACKEND_UNAVAILABLE"
        wait_until(lambda: _row(c, "f")["state"] == "failed", timeout=10)
        assert log.read_text().count("crashing on this request") == 1, "the request was sent once"
        assert (_row(c, "f")["starts"], _row(c, "f")["failures"]) == (1, 1)
        second = c.post("/v1/completions", json=boom, headers=OPEN)  # a new engine, crashed again
        assert second.status_code == 502
        wait_until(lambda: _row(c, "f")["state"] == "failed", timeout=10)
        row = _row(c, "f")
        assert (row["starts"], row["failures"]) == (2, 2), "failures keep counting across starts"
        assert row["retry_at"] is not None, "the second failure in a row backs off"
        assert log.read_text().count("crashing on this request") == 2


def test_sse_error_event_is_not_glued_to_a_partial_line(daemon: Daemon) -> None:
    """Finding 9: the engine broke mid-event; the error event was glued onto the partial line
    and the openai SDK raised JSONDecodeError instead of an API error."""
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="sk-open-0123456789", max_retries=0)
    texts = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in client.completions.create(model="served-name", prompt="partial-then-die", stream=True):
            texts.append(chunk.choices[0].text)
    assert texts == ["hello "]
    assert caught.value.code == "BACKEND_UNAVAILABLE"


def test_oversized_engine_answers_are_refused_not_buffered(daemon: Daemon) -> None:
    """Finding 10: a 200 MB answer raised the daemon's RSS by 400-600 MB. Over
    MAX_RESPONSE_BODY_BYTES (4 MiB here): 502 RESPONSE_TOO_LARGE, whether the engine said its
    length or not."""
    assert daemon.proc is not None
    with daemon.client() as c:
        assert _script(c, "huge:2").status_code == 200  # within the limit: relayed
        before = psutil.Process(daemon.proc.pid).memory_info().rss
        for script in ("huge:64", "huge-chunked:64"):
            resp = _script(c, script)
            assert resp.status_code == 502 and resp.json()["error"]["code"] == "RESPONSE_TOO_LARGE", resp.text
        grown = psutil.Process(daemon.proc.pid).memory_info().rss - before
        assert grown < 40 * 2**20, f"the daemon grew by {grown / 2**20:.0f} MB"


def _metric(c: httpx.Client, name: str, model: str) -> float:
    text = c.get("/metrics", headers=OPEN).text
    match = re.search(rf'^{name}{{model="{model}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def test_streamed_tokens_are_counted_on_the_reassembled_stream(daemon: Daemon) -> None:
    """Finding 11: ten events written three bytes at a time were counted as 0 tokens."""
    with daemon.client() as c:
        resp = _script(c, "split-stream", stream=True, model="served-name")
        assert resp.text.count("data: {") == 10
        assert _metric(c, "unified_inference_streamed_tokens_total", "served-name") == 10


def test_hop_by_hop_headers_named_by_the_engine_are_not_forwarded(daemon: Daemon) -> None:
    """Finding 12: headers named in the engine's Connection header, and Proxy-Connection, were
    forwarded."""
    with daemon.client() as c:
        resp = _script(c, "hop")
    assert resp.status_code == 200 and resp.headers["x-kept"] == "yes"
    for name in ("x-hop-secret", "proxy-connection", "keep-alive"):
        assert name not in resp.headers, name


def _raw(d: Daemon, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def _post_raw(d: Daemon, body: dict[str, Any], version: bytes = b"1.1") -> bytes:
    payload = json.dumps(body).encode()
    return _raw(d, b"POST /v1/completions HTTP/%s\r\nHost: x\r\nAuthorization: Bearer sk-open-0123456789\r\n"
                   b"Content-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                   % (version, len(payload), payload))  # fmt: skip


def test_a_204_answer_has_no_content_length(daemon: Daemon) -> None:
    """Finding 12: a 204 got `content-length: 0`."""
    head = _post_raw(daemon, {"model": "s", "prompt": "no-content"}).split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 204 ") and b"content-length" not in head and b"x-kept: yes" in head


def test_gzip_answers_are_renamed_and_counted(daemon: Daemon) -> None:
    """Finding 12: gzip answers skipped the rename and usage counting."""
    with daemon.client() as c:
        doc = _script(c, "gzip-doc", headers={"Authorization": f"Bearer {TIGHT}"})
        assert doc.status_code == 200 and doc.json()["model"] == "s", doc.text
        assert "content-encoding" not in doc.headers
        over = _script(c, "x", headers={"Authorization": f"Bearer {TIGHT}"})  # usage 11 of 10 a minute
        assert over.status_code == 429, over.text
        stream = _script(c, "gzip-stream", stream=True)
        assert stream.text.count('"model": "s"') == 5 and "served-name" not in stream.text
        assert gzip.compress(b"x")[:2] not in stream.content


def test_head_on_get_routes_and_allow_on_405(daemon: Daemon) -> None:
    """Finding 12: HEAD on GET routes was a 405, and no 405 said which methods are allowed."""
    with daemon.client() as c:
        for path in ("/health", "/v1/models", "/v1/status"):
            head = c.head(path, headers=OPEN)
            assert head.status_code == 200 and head.content == b"", path
        wrong = c.post("/health")
        assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "METHOD_NOT_ALLOWED"
        assert set(wrong.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}
        get = c.get("/v1/completions", headers=OPEN)
        assert get.status_code == 405 and get.headers["allow"] == "POST"


def test_an_http10_client_gets_no_chunked_body(daemon: Daemon) -> None:
    """Finding 12: an HTTP/1.0 client got a chunked body, which HTTP/1.0 does not have."""
    data = _post_raw(daemon, {"model": "l", "prompt": "x", "max_tokens": 3, "stream": True}, version=b"1.0")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding" not in head.lower()
    # three tokens and, as llama.cpp ends its streams, an event with the finish reason
    assert body.count(b"data: {") == 4 and body.endswith(b"data: [DONE]\n\n"), body[-200:]


def test_docs_are_off_by_default(daemon: Daemon, tmp_path: Path) -> None:
    """Finding 12: /docs and /openapi.json answered anyone."""
    with daemon.client() as c:
        for path in ("/docs", "/redoc", "/openapi.json"):
            resp = c.get(path, headers=OPEN)
            assert resp.status_code == 404 and resp.json()["error"]["code"] == "NOT_FOUND", path
    (tmp_path / "docs").mkdir()
    docs = Daemon(tmp_path / "docs", _doc(), API_KEYS="sk-docs-0123456789", ENABLE_DOCS="true")
    try:
        with docs.start().client() as c:
            assert c.get("/openapi.json").status_code == 401, "the docs follow the key rules"
            key = {"Authorization": "Bearer sk-docs-0123456789"}
            assert c.get("/openapi.json", headers=key).status_code == 200
            assert c.get("/docs", headers=key).status_code == 200
    finally:
        docs.stop()


def test_deep_json_is_refused_and_engine_errors_keep_our_shape(daemon: Daemon) -> None:
    """Finding 12: JSON nested 1,000 deep reached llama.cpp and came back as a plain-text 500."""
    with daemon.client() as c:
        deep = b'{"model": "l", "prompt": "x", "logit_bias": ' + b"[" * 1000 + b"]" * 1000 + b"}"
        resp = c.post("/v1/completions", content=deep, headers={**OPEN, "Content-Type": "application/json"})
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "INVALID_JSON"
        assert "nested" in resp.json()["error"]["message"]
        plain = _script(c, "text-500")
        assert plain.status_code == 502 and plain.json()["error"]["code"] == "BACKEND_ERROR"
        assert "Internal Server Error" in plain.json()["error"]["message"]
        detail = _script(c, "json-422")
        assert detail.status_code == 422 and detail.json()["error"]["code"] == "BACKEND_ERROR"
        assert "field required" in detail.json()["error"]["message"]


def test_a_reload_of_a_non_utf8_models_yaml_is_a_400(daemon: Daemon) -> None:
    """Finding 12: a reload of a models.yaml that is not UTF-8 was a plain-text 500, and SIGHUP
    logged a traceback."""
    good = daemon.config.read_bytes()
    daemon.config.write_bytes(b"models:\n  - name: \xff\xfe\n")
    try:
        with daemon.client() as c:
            resp = c.post("/v1/admin/reload")
            assert resp.status_code == 400 and resp.json()["error"]["code"] == "INVALID_CONFIG"
            assert "UTF-8" in json.dumps(resp.json())
            refusals = daemon.log().count("reload refused")
            daemon.signal(signal.SIGHUP)
            wait_until(lambda: daemon.log().count("reload refused") == refusals + 1, timeout=5)
            assert "Traceback" not in daemon.log()
            assert c.get("/health").status_code == 200
    finally:
        daemon.config.write_bytes(good)


def test_only_the_daemons_own_headers_reach_the_engine(daemon: Daemon) -> None:
    """Nothing checked which headers reach an engine: a client's cookies, credentials and
    connection headers must not."""
    with daemon.client() as c:
        headers = {**OPEN, "Cookie": "session=secret", "X-Forwarded-For": "203.0.113.9", "X-Custom": "1",
                   "Proxy-Authorization": "Basic eA==", "X-Request-ID": "req-42"}  # fmt: skip
        body = {"model": "f", "prompt": "x", "max_tokens": 1}
        assert c.post("/v1/completions", json=body, headers=headers).status_code == 200
        row = _row(c, "f")
    seen = {k.lower(): v for k, v in engine_get(row, "/fake/stats").json()["last_headers"].items()}
    assert set(seen) == {"host", "content-type", "authorization", "x-request-id", "content-length",
                         "accept-encoding"}, seen  # fmt: skip
    assert seen["x-request-id"] == "req-42" and seen["accept-encoding"] == "identity"
    assert seen["authorization"].startswith("Bearer ") and "sk-open" not in seen["authorization"]
