"""Key limits against hostile clients: every spelling of a limit, disconnects, streamed prompts.

Each test is named after the review finding it pins (issue 11); each failed on
the main branch before the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.helpers import Daemon, fake_model, registry_doc, wait_until

CAPPED = "sk-capped-0123456789"  # max_tokens 5
METERED = "sk-metered-0123456789"  # 100 tokens a minute
PROMPTY = "sk-prompty-0123456789"  # 50 tokens a minute
PROMPTY_LLAMA = "sk-prompty-llama-0123"  # 50 tokens a minute
SPARSE = "sk-sparse-0123456789"  # 3 requests a minute
KEYS = {
    "keys": [
        {"key": CAPPED, "name": "capped", "max_tokens": 5},
        {"key": METERED, "name": "metered", "tokens_per_minute": 100},
        {"key": PROMPTY, "name": "prompty", "tokens_per_minute": 50},
        {"key": PROMPTY_LLAMA, "name": "prompty-llama", "tokens_per_minute": 50},
        {"key": SPARSE, "name": "sparse", "requests_per_minute": 3},
    ]
}
LONG = {"FAKE_TOKENS": "4000"}  # what an engine generates when nothing bounds it: the context
DOC = registry_doc(
    fake_model("vllm", backend="vllm", env=LONG),
    fake_model("sglang", backend="sglang", env=LONG),
    fake_model("llama", backend="llamacpp", env=LONG),
    fake_model("slow", backend="vllm", env={"FAKE_TOKEN_DELAY": "0.01", "FAKE_TOKENS": "200"}),
    fake_model("gpu", backend="sglang", env={"FAKE_TOKEN_DELAY": "0.05", "FAKE_TOKENS": "400"}),
)


@pytest.fixture
def daemon(daemon_for: Any, tmp_path: Path) -> Daemon:
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump(KEYS))
    started: Daemon = daemon_for(
        DOC, API_KEYS_FILE=str(keys_file), OFFLOAD_QUEUE_THRESHOLD="1", ENABLE_CPU_OFFLOAD="false"
    ).start()
    return started


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _completion_tokens(resp: httpx.Response) -> int:
    assert resp.status_code == 200, resp.text
    return int(resp.json()["usage"]["completion_tokens"])


def _in_flight(c: httpx.Client, model: str) -> int:
    return int(next(r for r in c.get("/v1/status", headers=_auth(CAPPED)).json()["models"]
                    if r["name"] == model)["in_flight"])  # fmt: skip


def test_key_limits_hold_for_every_spelling_of_max_tokens(daemon: Daemon) -> None:
    """Finding 1: "40" (engines coerce strings), 40.0, max_completion_tokens, and no field at
    all, must all stay within a key's max_tokens of 5."""
    with daemon.client() as c:
        for model in ("vllm", "sglang", "llama"):
            for path in ("/v1/completions", "/v1/chat/completions"):
                base: dict[str, Any] = {"model": model}
                base.update(
                    {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
                )
                for over in ({"max_tokens": "40"}, {"max_tokens": 40.0}, {"max_tokens": " 40 "},
                             {"max_completion_tokens": 40}, {"max_completion_tokens": "40"},
                             {"max_tokens": 3, "max_completion_tokens": 40}):  # fmt: skip
                    resp = c.post(path, json={**base, **over}, headers=_auth(CAPPED))
                    assert resp.status_code == 400, (model, path, over, resp.text)
                    assert resp.json()["error"]["code"] == "LIMIT_EXCEEDED"
                # Absent, null, 0 and -1 (llama.cpp reads the last three as "no limit"): the key's 5.
                for unbounded in ({}, {"max_tokens": None}, {"max_tokens": 0}, {"max_tokens": -1},
                                  {"max_completion_tokens": None}):  # fmt: skip
                    tokens = _completion_tokens(
                        c.post(path, json={**base, **unbounded}, headers=_auth(CAPPED))
                    )
                    assert tokens == 5, (model, path, unbounded)
                # Within the limit, in any spelling the engines accept: exactly what was asked.
                assert (
                    _completion_tokens(c.post(path, json={**base, "max_tokens": "4"}, headers=_auth(CAPPED)))
                    == 4
                )
                assert (
                    _completion_tokens(c.post(path, json={**base, "max_tokens": 3.0}, headers=_auth(CAPPED)))
                    == 3
                )
                if "chat" in path:  # llama.cpp ignores max_completion_tokens: the daemon says max_tokens too
                    resp = c.post(path, json={**base, "max_completion_tokens": 2}, headers=_auth(CAPPED))
                    assert _completion_tokens(resp) == 2, model
                garbage = c.post(path, json={**base, "max_tokens": "lots"}, headers=_auth(CAPPED))
                assert garbage.status_code == 400 and garbage.json()["error"]["code"] == "INVALID_BODY"


def test_tokens_per_minute_is_charged_when_the_client_disconnects(daemon: Daemon) -> None:
    """Finding 2: streams closed just before their end, and a non-streaming request abandoned,
    cost what the engine produced."""
    with daemon.client() as c:
        body = {"model": "slow", "prompt": "x", "max_tokens": 58, "stream": True}
        for _ in range(2):
            with c.stream("POST", "/v1/completions", json=body, headers=_auth(METERED)) as s:
                seen = 0
                for chunk in s.iter_raw():
                    seen += chunk.count(b"data: {")
                    if seen >= 55:
                        break
            wait_until(lambda: _in_flight(c, "slow") == 0, timeout=5)
        # 2 x (55+ tokens streamed + the prompt) > 100: the key is over its minute.
        third = c.post("/v1/completions", json={**body, "stream": False}, headers=_auth(METERED))
        assert third.status_code == 429 and third.json()["error"]["code"] == "RATE_LIMITED", third.text


def test_tokens_per_minute_is_charged_for_an_abandoned_non_streaming_request(daemon: Daemon) -> None:
    """Finding 2, not streaming: the client leaves after 0.3 s of a 120-token answer."""
    with daemon.client() as c:
        # Started first: the 0.3 s must be spent generating (a fake engine's cold start takes
        # about that long, and a request abandoned before any engine saw it costs nothing).
        c.post("/v1/admin/models/slow/start").raise_for_status()
        body = {"model": "slow", "prompt": "x", "max_tokens": 120}
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/completions", json=body, headers=_auth(METERED), timeout=httpx.Timeout(30, read=0.3))
        wait_until(lambda: _in_flight(c, "slow") == 0, timeout=5)
        after = c.post("/v1/completions", json={**body, "max_tokens": 1}, headers=_auth(METERED))
        assert after.status_code == 429, after.text


@pytest.mark.parametrize(("model", "key"), [("vllm", PROMPTY), ("llama", PROMPTY_LLAMA)])
def test_streamed_prompts_are_charged(daemon: Daemon, model: str, key: str) -> None:
    """Finding 3: a 602-token prompt streamed with max_tokens 1 costs its prompt (usage from the
    engine where it reports it in streams, an estimate from the prompt on llama.cpp)."""
    prompt = " ".join(["word"] * 602)
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "stream": True}
    with daemon.client() as c:
        with c.stream("POST", "/v1/completions", json=body, headers=_auth(key)) as s:
            data = b"".join(s.iter_raw())
        assert b'"usage"' not in data, (
            "the client did not ask for usage: the daemon's request for it is hidden"
        )
        assert data.endswith(b"data: [DONE]\n\n")
        wait_until(lambda: _in_flight(c, model) == 0, timeout=5)
        again = c.post("/v1/completions", json={**body, "stream": False}, headers=_auth(key))
        assert again.status_code == 429, again.text


def test_a_client_that_asks_for_stream_usage_still_gets_it(daemon: Daemon) -> None:
    with daemon.client() as c:
        body = {"model": "vllm", "prompt": "a b c", "max_tokens": 3, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        with c.stream("POST", "/v1/completions", json=body, headers=_auth(METERED)) as s:
            events = [e for e in b"".join(s.iter_raw()).split(b"\n\n") if e.startswith(b"data: {")]
        usage = json.loads(events[-1][6:])["usage"]
        assert usage == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_gpu_overloaded_does_not_use_up_a_request_of_the_key(daemon: Daemon) -> None:
    """Finding 12: a 429 GPU_OVERLOADED (no request reached an engine) is not one of the
    key's requests per minute."""
    with daemon.client() as c:
        body = {"model": "gpu", "prompt": "x", "max_tokens": 400, "stream": True}
        with c.stream("POST", "/v1/completions", json=body, headers=_auth(SPARSE)) as held:  # 1 of 3
            assert held.status_code == 200
            for _ in range(5):
                refused = c.post("/v1/completions", json={**body, "stream": False}, headers=_auth(SPARSE))
                assert refused.json()["error"]["code"] == "GPU_OVERLOADED"
        wait_until(lambda: _in_flight(c, "gpu") == 0, timeout=5)
        short = {"model": "gpu", "prompt": "x", "max_tokens": 1}
        answers = [c.post("/v1/completions", json=short, headers=_auth(SPARSE)) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 429], "2 of the 3 requests were left"
