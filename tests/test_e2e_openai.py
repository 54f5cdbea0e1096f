"""End to end: the official openai client, the daemon, the real llama.cpp + Gemma 3 270M."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from config.settings import DEFAULT_MODELS_CONFIG
from tests.helpers import Daemon

pytestmark = pytest.mark.slow


@pytest.fixture
def client(daemon_for: Any) -> Iterator[openai.OpenAI]:
    doc = yaml.safe_load(Path(DEFAULT_MODELS_CONFIG).read_text())  # the shipped registry, unchanged
    daemon: Daemon = daemon_for(doc, EXECUTION_MODE="auto")
    daemon.start()
    with openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def test_chat_and_completions_with_and_without_streaming(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model="gemma-3-270m", messages=[{"role": "user", "content": "Name one colour."}], max_tokens=12
    )
    assert chat.model == "gemma-3-270m"
    assert chat.choices[0].message.content and chat.usage and chat.usage.completion_tokens > 0

    text = client.completions.create(model="gemma-3-270m", prompt="The capital of France is", max_tokens=8)
    assert text.choices[0].text.strip()

    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model="gemma-3-270m",
            messages=[{"role": "user", "content": "Count to five."}],
            max_tokens=16,
            stream=True,
        )
        if chunk.choices
    ]
    assert len([p for p in pieces if p]) >= 2 and "".join(pieces).strip()

    streamed = [
        chunk.choices[0].text
        for chunk in client.completions.create(
            model="gemma-3-270m", prompt="One, two,", max_tokens=8, stream=True
        )
    ]
    assert len(streamed) >= 2 and "".join(streamed).strip()


def test_embeddings(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model="gemma-3-270m-embed", input=["hello world", "goodbye"])
    assert len(result.data) == 2
    vectors = [d.embedding for d in result.data]
    assert all(len(v) == 640 and all(isinstance(x, float) for x in v) for v in vectors)
    assert vectors[0] != vectors[1]
