"""Building llama.cpp's non-streaming document from its stream (pure: no processes)."""

from __future__ import annotations

import json
from typing import Any

from router.collect import DocumentBuilder, collectable


def _lines(*events: dict[str, Any]) -> list[bytes]:
    out: list[bytes] = []
    for event in events:
        out += [b"data: " + json.dumps(event).encode(), b""]
    return [*out, b"data: [DONE]", b""]


HEAD = {"id": "cmpl-1", "created": 7, "model": "m"}


def _text(text: str, finish: str | None = None) -> dict[str, Any]:
    choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
    return {**HEAD, "object": "text_completion", "choices": [choice]}


def _delta(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {**HEAD, "object": "chat.completion.chunk", "choices": [choice]}


def test_a_completion_is_rebuilt_with_its_usage() -> None:
    builder = DocumentBuilder(chat=False)
    for line in _lines(_text(" 5"), _text(","), _text(""), _text(" 6"), _text("", "stop")):
        builder.feed(line)
    assert builder.done
    doc = json.loads(builder.document(prompt_tokens=12, max_tokens=20))
    assert doc == {
        **HEAD,
        "object": "text_completion",
        "choices": [{"text": " 5, 6", "index": 0, "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16},  # "" was a token too
    }


def test_a_chat_answer_is_rebuilt_and_length_counts_max_tokens() -> None:
    builder = DocumentBuilder(chat=True)
    events = [
        _delta({"role": "assistant"}),
        _delta({"content": "Hi"}),
        _delta({"content": "!"}),
        _delta({}, "length"),
    ]
    for line in _lines(*events):
        builder.feed(line)
    doc = json.loads(builder.document(prompt_tokens=3, max_tokens=3))
    assert doc["object"] == "chat.completion"
    assert doc["choices"] == [
        {
            "index": 0,
            "message": {"content": "Hi!", "role": "assistant"},
            "logprobs": None,
            "finish_reason": "length",
        }
    ]
    # finish_reason length: the engine sampled max_tokens, one of them held back from the stream
    assert doc["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_a_stream_without_its_end_is_not_done() -> None:
    builder = DocumentBuilder(chat=False)
    builder.feed(b"data: " + json.dumps(_text("a")).encode())
    assert not builder.done


def test_what_a_stream_cannot_rebuild_is_not_collected() -> None:
    assert collectable({"prompt": "x", "max_tokens": 3, "stop": ["."], "logprobs": 0, "echo": False})
    for field, value in [
        ("logprobs", 2),
        ("logprobs", True),
        ("top_logprobs", 3),
        ("echo", True),
        ("tools", [{}]),
    ]:
        assert not collectable({"prompt": "x", field: value}), field
