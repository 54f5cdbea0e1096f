"""The per-engine request adapter and per-model defaults (pure: no processes)."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import pytest

from api.compute import OUTPUT_LIMITS, adapt, apply_defaults, enforce
from backends.capabilities import ROUTES
from router.answer import embeddings_as_base64
from router.errors import LimitExceeded, ParameterNotSupported

CHAT, TEXT = "/v1/chat/completions", "/v1/completions"


def adapted(backend: str, path: str, payload: dict[str, Any]) -> dict[str, Any]:
    adapt(backend, ROUTES[backend][path], payload)
    return payload


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"max_completion_tokens": 5}, {"max_tokens": 5}),
        ({"max_completion_tokens": "5"}, {"max_tokens": 5}),
        ({"max_completion_tokens": 5, "max_tokens": 9}, {"max_tokens": 5}),
        ({"max_completion_tokens": 9, "max_tokens": 5}, {"max_tokens": 5}),
        ({"max_completion_tokens": 5, "max_tokens": 0}, {"max_tokens": 5}),
        ({"max_completion_tokens": None, "max_tokens": 7}, {"max_tokens": 7}),
        ({"max_tokens": 7}, {"max_tokens": 7}),
    ],
)
def test_max_completion_tokens_becomes_max_tokens_where_the_engine_ignores_it(
    given: dict[str, Any], expected: dict[str, Any]
) -> None:
    for backend, path in (("llamacpp", CHAT), ("llamacpp", TEXT), ("vllm", TEXT), ("sglang", TEXT)):
        assert adapted(backend, path, dict(given)) == expected, (backend, path)


def test_engines_that_read_max_completion_tokens_get_it_unchanged() -> None:
    for backend in ("vllm", "sglang"):
        route = ROUTES[backend][CHAT]
        assert not route.adapts
        payload = {"max_completion_tokens": 5, "max_tokens": 9}
        assert not adapt(backend, route, payload) and payload == {"max_completion_tokens": 5, "max_tokens": 9}


@pytest.mark.parametrize(
    ("path", "payload", "field"),
    [
        (TEXT, {"n": 2}, "n"),
        (CHAT, {"n": "3"}, "n"),
        (TEXT, {"best_of": 2}, "best_of"),
        (TEXT, {"prompt": ["one", "two"]}, "prompt"),
        (CHAT, {"stream": True, "stream_options": {"include_usage": True}}, "stream_options"),
        (TEXT, {"response_format": {"type": "json_object"}}, "response_format"),
        ("/v1/embeddings", {"input": "x", "dimensions": 64}, "dimensions"),
    ],
)
def test_what_llama_cpp_would_silently_ignore_is_refused(
    path: str, payload: dict[str, Any], field: str
) -> None:
    with pytest.raises(ParameterNotSupported, match=rf"^{field}: llama\.cpp") as caught:
        adapt("llamacpp", ROUTES["llamacpp"][path], payload)
    assert caught.value.status == 400 and caught.value.code == "PARAMETER_NOT_SUPPORTED"


@pytest.mark.parametrize(
    "payload",
    [
        {"n": 1},
        {"best_of": 1},
        {"prompt": ["one"]},
        {"prompt": [1, 2, 3]},
        {"stream_options": {"include_usage": False}},
        {"response_format": {"type": "text"}},
    ],
)
def test_what_llama_cpp_honours_passes(payload: dict[str, Any]) -> None:
    adapt("llamacpp", ROUTES["llamacpp"][TEXT], dict(payload))
    adapt("llamacpp", ROUTES["llamacpp"][CHAT], {"response_format": {"type": "json_object"}})


def test_base64_embeddings_are_encoded_by_the_daemon_for_llama_cpp() -> None:
    floats = [0.5, -1.25, 3.0]
    answer = json.dumps({"object": "list", "data": [{"index": 0, "embedding": floats}]}).encode()
    encoded = json.loads(embeddings_as_base64(answer))["data"][0]["embedding"]
    assert list(struct.unpack("<3f", base64.b64decode(encoded))) == floats
    assert ROUTES["llamacpp"]["/v1/embeddings"].lacks_base64
    assert not ROUTES["vllm"]["/v1/embeddings"].lacks_base64


def test_routes_each_engine_serves() -> None:
    assert "/v1/responses" not in ROUTES["llamacpp"] and "/v1/rerank" not in ROUTES["llamacpp"]
    assert ROUTES["llamacpp"]["/v1/tokenize"].path == "/extras/tokenize"
    assert ROUTES["vllm"]["/v1/tokenize"].path == "/tokenize"
    assert ROUTES["sglang"]["/v1/detokenize"].path == "/v1/detokenize"
    assert ROUTES["vllm"]["/v1/responses"].path == ROUTES["sglang"]["/v1/responses"].path == "/v1/responses"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, {"max_tokens": 64}),
        ({"max_tokens": None}, {"max_tokens": 64}),
        ({"max_tokens": 0}, {"max_tokens": 64}),  # llama.cpp would read 0 as no limit at all
        ({"max_completion_tokens": None}, {"max_tokens": 64}),
        ({"max_tokens": 500}, {"max_tokens": 500}),
        ({"max_completion_tokens": 3}, {"max_completion_tokens": 3}),
    ],
)
def test_a_models_default_max_tokens_applies_when_the_request_sets_no_limit(
    given: dict[str, Any], expected: dict[str, Any]
) -> None:
    payload = dict(given)
    apply_defaults({"max_tokens": 64}, payload, OUTPUT_LIMITS[CHAT])
    assert payload == expected


def test_defaults_fill_only_what_is_left_out_and_limits_still_apply() -> None:
    payload: dict[str, Any] = {"temperature": 1.0}
    apply_defaults({"max_tokens": 64, "temperature": 0.0, "top_p": 0.9}, payload, OUTPUT_LIMITS[TEXT])
    assert payload == {"temperature": 1.0, "max_tokens": 64, "top_p": 0.9}
    limits = (("max_tokens", 16),)
    capped: dict[str, Any] = {}
    apply_defaults({"max_tokens": 64}, capped, OUTPUT_LIMITS[TEXT], limits)
    enforce(limits, capped, OUTPUT_LIMITS[TEXT])
    assert capped["max_tokens"] == 16  # a key's limit under the model's default wins
    with pytest.raises(LimitExceeded):  # what the client asks for itself is still checked
        enforce(limits, {"max_tokens": 64}, OUTPUT_LIMITS[TEXT])
    responses: dict[str, Any] = {}
    apply_defaults({"max_tokens": 64}, responses, OUTPUT_LIMITS["/v1/responses"])
    assert responses == {"max_output_tokens": 64}
