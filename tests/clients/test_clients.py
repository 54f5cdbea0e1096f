"""Popular clients, each used as its own documentation shows, against the daemon serving the
shipped Gemma 3 270M on the real llama.cpp engine, with a client key configured."""

from __future__ import annotations

import asyncio
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from langchain_openai import ChatOpenAI, OpenAI, OpenAIEmbeddings

from config.settings import DEFAULT_MODELS_CONFIG
from tests.helpers import Daemon

pytestmark = pytest.mark.slow
MODEL, EMBED = "gemma-3-270m", "gemma-3-270m-embed"
KEY = "sk-clients-0123456789"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    workdir = tmp_path_factory.mktemp("sdk")
    keys = workdir / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"key": KEY, "name": "clients", "max_concurrent": 1}]}))
    doc = yaml.safe_load(Path(DEFAULT_MODELS_CONFIG).read_text())
    d = Daemon(workdir, doc, API_KEYS_FILE=str(keys))
    d.start()
    try:
        with d.client(timeout=120) as c:  # started here, so that no test counts them as its children
            for model in (MODEL, EMBED):
                assert c.post(f"/v1/admin/models/{model}/start").status_code == 200
        yield d
    finally:
        d.stop()


def _sdk(daemon: Daemon, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key=KEY, timeout=120, **options)


def test_openai_sdk_sync_streaming_and_async(daemon: Daemon) -> None:
    with _sdk(daemon, max_retries=0) as client:
        text = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6)
        assert text.usage is not None and 0 < text.usage.completion_tokens <= 6 and text.model == MODEL
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Count to ten."}], max_tokens=6, stream=True
        )
        assert 0 < sum(1 for chunk in stream if chunk.choices and chunk.choices[0].delta.content) <= 6

    async def chat() -> openai.types.chat.ChatCompletion:
        async with openai.AsyncOpenAI(base_url=daemon.url + "/v1", api_key=KEY, max_retries=0) as client:
            messages: Any = [{"role": "user", "content": "Say hello."}]
            return await client.chat.completions.create(
                model=MODEL, messages=messages, max_completion_tokens=4
            )

    reply = asyncio.run(chat())
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 4
    assert reply.choices[0].message.role == "assistant"


def test_openai_sdk_raw_response_headers(daemon: Daemon) -> None:
    with _sdk(daemon, max_retries=0) as client:
        raw = client.completions.with_raw_response.create(model=MODEL, prompt="Hello", max_tokens=2)
    assert raw.headers["x-served-model"] == MODEL and len(raw.headers["x-request-id"]) == 32
    assert raw.parse().choices[0].finish_reason in ("length", "stop")


def test_openai_sdk_retry_honours_retry_after(daemon: Daemon) -> None:
    """The key allows one request at a time: the SDK's second one is told 429 with
    Retry-After: 1, waits, and is served on its retry."""
    started = threading.Event()
    first: dict[str, Any] = {}

    def hold() -> None:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 40, "stream": True}
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.stream(
            "POST", daemon.url + "/v1/completions", json=body, headers=headers, timeout=120
        ) as s:
            started.set()
            first["data"] = b"".join(s.iter_raw())

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert started.wait(60)
        with _sdk(daemon, max_retries=3) as client:
            raw = client.completions.with_raw_response.create(model=MODEL, prompt="Hi", max_tokens=2)
        assert raw.retries_taken >= 1  # it was told to wait, and waited
        assert raw.parse().usage is not None
    finally:
        holder.join(120)
    assert first["data"].endswith(b"data: [DONE]\n\n")


def test_langchain_chat_llm_and_embeddings(daemon: Daemon) -> None:
    url = daemon.url + "/v1"
    with httpx.Client(timeout=120) as http:  # LangChain never closes the clients it makes itself
        chat = ChatOpenAI(
            model=MODEL, base_url=url, api_key=KEY, max_tokens=5, max_retries=0, http_client=http
        )
        message = chat.invoke("Say hello.")
        assert message.usage_metadata is not None and 0 < message.usage_metadata["output_tokens"] <= 5
        llm = OpenAI(model=MODEL, base_url=url, api_key=KEY, max_tokens=5, max_retries=0, http_client=http)
        assert isinstance(llm.invoke("The capital of France is"), str)
        pieces = list(llm.stream("One, two, three,"))
        assert 0 < len([p for p in pieces if p]) <= 5
        # check_embedding_ctx_length=False: otherwise tiktoken downloads OpenAI's encodings
        embeddings = OpenAIEmbeddings(
            model=EMBED,
            openai_api_base=url,
            openai_api_key=KEY,
            check_embedding_ctx_length=False,
            http_client=http,
        )
        vectors = embeddings.embed_documents(["hello world", "goodbye"])
    assert len(vectors) == 2 and all(len(v) == 640 for v in vectors) and vectors[0] != vectors[1]


def test_curl_streams_as_it_is_written(daemon: Daemon) -> None:
    command = [
        "curl", "-sN", daemon.url + "/v1/completions", "-H", "Content-Type: application/json",
        "-H", f"Authorization: Bearer {KEY}",
        "-d", '{"model": "gemma-3-270m", "prompt": "Once upon a time", "max_tokens": 5, "stream": true}',
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, timeout=120, check=True).stdout
    events = out.count(b"data: {")
    assert 2 <= events <= 6 and out.endswith(b"data: [DONE]\n\n")  # 5 tokens at most, and the finish event
