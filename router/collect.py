"""One non-streaming answer built from an engine's stream, for engines that cannot cancel
a non-streaming request (llama.cpp: llama-cpp-python finishes the generation whatever becomes
of its connection, and it serves one request at a time, so an abandoned request blocks every
user of the model).

The daemon asks such an engine for a stream; a client that leaves closes it, and the engine
stops at its next token. The client that stays gets the document the engine would have sent
(llama-cpp-python 0.3.36, `llama.py` `_create_completion` and `llama_chat_format.py`
`_convert_text_completion_chunks_to_chat`), built here from the events:
- `id`, `created`, `model` from the first event; the text (or `message.content`) is the
  events' text joined; `finish_reason` from the last event;
- `usage.completion_tokens`: the engine sends one event per token it samples, so it is the
  events counted; when generation stopped at `max_tokens` it is `max_tokens` (tokens held
  back as the possible start of a stop sequence are never sent, but were sampled);
- `usage.prompt_tokens` is not in the stream: the caller asks the engine (`prompt_tokens`).

Requests whose answer a stream cannot rebuild exactly (logprobs, echo, tools and functions)
are not collected: they go to the engine as they are (see `collectable`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from router.engine_client import EngineResponse
from router.errors import BackendUnavailable
from router.relay import MAX_LINE, Relay, body_chunks

# Fields with which the stream does not carry all of the non-streaming answer.
NOT_COLLECTABLE = ("logprobs", "top_logprobs", "echo", "tools", "functions", "function_call", "tool_choice")


def collectable(payload: Mapping[str, Any]) -> bool:
    """Whether the request's non-streaming answer can be rebuilt exactly from its stream."""
    return not any(payload.get(field) not in (None, False, 0) for field in NOT_COLLECTABLE)


class DocumentBuilder:
    """Reads a llama.cpp completion or chat stream, line by line; builds the document."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.head: dict[str, Any] = {}
        self.parts: list[str] = []
        self.tokens = 0
        self.finish_reason: str | None = None
        self.done = False  # `data: [DONE]` came

    def feed(self, line: bytes) -> None:
        if not line.startswith(b"data: "):
            return  # blank lines between events, comments, pings
        data = line[6:].strip()
        if data == b"[DONE]":
            self.done = True
            return
        event = orjson.loads(data)
        if not self.head:
            self.head = {key: event.get(key) for key in ("id", "created", "model")}
        choice = (event.get("choices") or [{}])[0]
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]
            return
        if self.chat:
            delta = choice.get("delta") or {}
            if "content" not in delta:
                return  # the first event: the role only, no token
            text = delta.get("content") or ""
        else:
            text = choice.get("text") or ""
        self.parts.append(text)
        self.tokens += 1

    def document(self, prompt_tokens: int, max_tokens: int | None) -> bytes:
        completion = self.tokens
        if self.finish_reason == "length" and max_tokens:
            completion = max_tokens
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                 "total_tokens": prompt_tokens + completion}  # fmt: skip
        text = "".join(self.parts)
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["message"] = {"content": text, "role": "assistant"}
        else:
            choice["text"] = text
        choice.update({"logprobs": None, "finish_reason": self.finish_reason})
        kind = "chat.completion" if self.chat else "text_completion"
        doc = {"id": self.head.get("id"), "object": kind, "created": self.head.get("created"),
               "model": self.head.get("model"), "choices": [choice], "usage": usage}  # fmt: skip
        return orjson.dumps(doc)


class Collector(Relay):
    """A Relay that reads the engine's stream whole, then sends one document (`finish`)."""

    collecting = True

    def __init__(self, *args: Any, chat: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.builder = DocumentBuilder(chat)

    async def stream(self, resp: EngineResponse) -> None:
        self.doing = "reading the answer"
        self.status = resp.status
        builder = self.builder
        rest = b""
        async for piece in body_chunks(resp, self.max_body):
            lines = (rest + piece).split(b"\n")
            rest = lines.pop()
            if len(rest) > MAX_LINE:
                raise BackendUnavailable(f"The engine sent a stream line over {MAX_LINE} bytes")
            for line in lines:
                builder.feed(line)
            self.tokens = builder.tokens
        builder.feed(rest)
        if not builder.done:
            raise BackendUnavailable("The engine's stream ended before its last event")

    async def finish(self, prompt_tokens: int, max_tokens: int | None) -> None:
        """Send the document built, with the prompt's size the engine gave."""
        data = self.builder.document(prompt_tokens, max_tokens)
        await self.deliver(self.status, [(b"content-type", b"application/json")], data)


class Capture(Relay):
    """A Relay that keeps a document instead of sending it (for a question the daemon asks)."""

    data = b""

    async def deliver(self, status: int, headers: list[tuple[bytes, bytes]], data: bytes) -> None:
        self.data, self.status, self.complete = data, status, True
