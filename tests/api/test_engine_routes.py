"""Routes decided by what each engine serves (backends/capabilities.py), against the fake
engine speaking each engine's dialect: /v1/responses, tokenize/detokenize, adaptation."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.helpers import Daemon, fake_model, registry_doc

KEY = "sk-capped-0123456789"
DOC = registry_doc(
    fake_model("sg", backend="sglang"),
    fake_model("vl", backend="vllm"),
    fake_model("ll", backend="llamacpp", defaults={"max_tokens": 6}),
    fake_model("emb", backend="vllm", type="embedding"),
)


@pytest.fixture
def daemon(daemon_for: Any) -> Daemon:
    d: Daemon = daemon_for(DOC)
    return d.start()


@pytest.mark.parametrize("model", ["sg", "vl"])
def test_responses_reach_vllm_and_sglang_and_stream(daemon: Daemon, model: str) -> None:
    with daemon.client() as c:
        doc = c.post("/v1/responses", json={"model": model, "input": "hi there", "max_output_tokens": 3})
        assert doc.status_code == 200, doc.text
        body = doc.json()
        assert body["object"] == "response" and body["model"] == model
        assert (
            body["output"][0]["content"][0]["text"] == "tok0 tok1 tok2"
            and body["usage"]["output_tokens"] == 3
        )
        request = {"model": model, "input": "hi", "max_output_tokens": 4, "stream": True}
        with c.stream("POST", "/v1/responses", json=request) as s:
            raw = b"".join(s.iter_raw())
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
    events = [block.split(b"\n") for block in raw.strip().split(b"\n\n")]
    kinds = [lines[0].removeprefix(b"event: ").decode() for lines in events]
    assert kinds == ["response.created", *["response.output_text.delta"] * 4, "response.completed"]
    completed = json.loads(events[-1][1].removeprefix(b"data: "))
    assert completed["response"]["model"] == model


def test_a_route_the_engine_does_not_serve_is_refused_naming_it(daemon: Daemon) -> None:
    with daemon.client() as c:
        resp = c.post("/v1/responses", json={"model": "ll", "input": "hi"})
        assert resp.status_code == 400
        error = resp.json()["error"]
        assert error["code"] == "ENDPOINT_NOT_SUPPORTED" and "llama.cpp" in error["message"]
        assert c.post("/v1/responses", json={"model": "emb", "input": "hi"}).status_code == 400


@pytest.mark.parametrize(("model", "field"), [("vl", "prompt"), ("sg", "prompt"), ("ll", "input")])
def test_tokenize_and_detokenize_reach_each_engines_own_route(daemon: Daemon, model: str, field: str) -> None:
    with daemon.client() as c:
        tokens = c.post("/v1/tokenize", json={"model": model, field: "héllo"}).json()["tokens"]
        assert tokens == list("héllo".encode())
        text = c.post("/v1/detokenize", json={"model": model, "tokens": tokens}).json()
        assert "héllo" in text.values()
    with daemon.client() as c:
        assert c.post("/v1/tokenize", json={"model": "emb", "prompt": "x"}).status_code == 200


def test_llama_cpp_gets_max_tokens_and_the_models_default(daemon: Daemon) -> None:
    with daemon.client() as c:
        messages = [{"role": "user", "content": "x"}]
        asked = {"model": "ll", "messages": messages, "max_completion_tokens": 2}
        assert c.post("/v1/chat/completions", json=asked).json()["usage"]["completion_tokens"] == 2
        unbounded = {"model": "ll", "messages": messages}
        assert c.post("/v1/chat/completions", json=unbounded).json()["usage"]["completion_tokens"] == 6
        refused = c.post("/v1/completions", json={"model": "ll", "prompt": "x", "n": 2})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "PARAMETER_NOT_SUPPORTED"
        # vLLM reads max_completion_tokens on chat, not on completions (default 16 there)
        text = c.post("/v1/completions", json={"model": "vl", "prompt": "x", "max_completion_tokens": 3})
        assert text.json()["usage"]["completion_tokens"] == 3


def test_a_keys_max_tokens_holds_on_responses(daemon_for: Any, tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"key": KEY, "name": "capped", "max_tokens": 5}]}))
    d: Daemon = daemon_for(DOC, API_KEYS_FILE=str(keys))
    d.start()
    with httpx.Client(base_url=d.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        over = c.post("/v1/responses", json={"model": "vl", "input": "x", "max_output_tokens": "40"})
        assert over.status_code == 400 and over.json()["error"]["code"] == "LIMIT_EXCEEDED"
        unbounded = c.post("/v1/responses", json={"model": "vl", "input": "x"})
        assert unbounded.json()["usage"]["output_tokens"] == 5


def test_base64_embeddings_hold_whichever_engine_answers(daemon_for: Any) -> None:
    """vLLM encodes base64 itself; SGLang and llama.cpp answer floats, which the daemon encodes."""
    doc = registry_doc(
        fake_model("sg-emb", backend="sglang", type="embedding"),
        fake_model("vl-emb", backend="vllm", type="embedding"),
        fake_model("ll-emb", backend="llamacpp", type="embedding"),
    )
    d: Daemon = daemon_for(doc)
    d.start()
    with d.client() as c:
        for model in ("sg-emb", "vl-emb", "ll-emb"):
            body = {"model": model, "input": ["abc"], "encoding_format": "base64"}
            encoded = c.post("/v1/embeddings", json=body).json()["data"][0]["embedding"]
            assert struct.unpack("<4f", base64.b64decode(encoded)) == (3.0, 0.5, -0.25, 1.0), model
            floats = c.post("/v1/embeddings", json={"model": model, "input": ["abc"]}).json()
            assert floats["data"][0]["embedding"] == [3.0, 0.5, -0.25, 1.0]


def test_a_llama_cpp_answer_is_read_as_a_stream_and_survives_a_failed_size_question(daemon_for: Any) -> None:
    """The daemon asks llama.cpp for a stream and then, for the prompt's size, the same request
    with max_tokens 1 (not streamed). An engine that dies on that question costs the client
    nothing: the answer is whole, its prompt size estimated."""
    model = fake_model("ll", backend="llamacpp", env={"FAKE_CRASH_ON": '"stream":false'})
    d: Daemon = daemon_for(registry_doc(model))
    d.start()
    with d.client() as c:
        resp = c.post(
            "/v1/completions", json={"model": "ll", "prompt": "four words of prompt", "max_tokens": 3}
        )
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert doc["choices"][0]["text"] == "tok0 tok1 tok2 " and doc["choices"][0]["finish_reason"] == "length"
    assert doc["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}  # 20 bytes / 4
