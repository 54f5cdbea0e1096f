"""Relaying one engine answer to the client over ASGI, and keeping what metering needs of it.

- Documents are read whole (a broken one is a clean 502, never truncated JSON),
  up to MAX_RESPONSE_BODY_BYTES; an engine's error answer becomes the daemon's
  error shape before anything is sent.
- Streams go on chunk by chunk as they arrive, but only in whole lines: a
  line the engine has not finished waits for its end (microseconds, as engines
  write an event at once). So the `model` name is never split across two
  reads, events are counted on the reassembled stream, and if the stream
  breaks, the error event starts on a fresh line after a finished event, where
  an SSE client (the `openai` SDK) reads it as an error, not as broken JSON.
- Usage: the answer's `usage.total_tokens` when asked to count it; for streams
  also the usage event the daemon asked the engine for, which is taken out
  again when the client did not ask for it.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from router.answer import (
    NO_BODY,
    Decoder,
    Rename,
    embeddings_as_base64,
    engine_error,
    forwarded_headers,
    usage_total,
)
from router.engine_client import EngineResponse
from router.errors import BackendUnavailable, RouterError

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

MAX_LINE = 4 * 1024 * 1024  # an unfinished stream line longer than this is not an SSE engine's
_USAGE_EVENT = re.compile(rb'"usage"\s*:\s*\{')


class Relay:
    """Sends the engine's answer to the client, and keeps what metrics and metering need."""

    collecting = False  # a stream read whole to send one document (router/collect.py)
    base64 = False  # encode an embeddings answer's vectors as base64 (answer.embeddings_as_base64)

    def __init__(
        self,
        send: Send,
        extra: list[tuple[bytes, bytes]],
        rename: Rename | None,
        count_usage: bool = False,
        hide_usage: bool = False,
        max_body: int = 64 * 1024 * 1024,
    ) -> None:
        self.send = send
        self.extra = extra
        self.rename = rename
        self.count_usage = count_usage  # read usage.total_tokens from the answer
        self.hide_usage = hide_usage  # drop the stream's usage-only event (the daemon asked for it)
        self.max_body = max_body
        self.usage_tokens = 0  # the answer's usage.total_tokens, when counted
        self.started = False
        self.complete = False  # the whole answer reached the client
        self.doing = "waiting for the engine's answer"
        self.status = 0
        self.error_code = ""  # set when a begun stream ends with an error event
        self.streaming = False
        self.first_chunk: float | None = None  # time.perf_counter() of the first streamed chunk
        self.tokens = 0  # SSE data events relayed (engines send one per token)
        self._at_event_end = True  # what was relayed ends where an SSE event ended

    async def document(self, resp: EngineResponse) -> None:
        self.doing = "reading the answer"
        data = await resp.read(self.max_body)
        headers, encoding = forwarded_headers(resp.headers)
        if encoding:
            data = Decoder(encoding, self.max_body).feed(data)
        if resp.status >= 400:
            raise engine_error(resp.status, data)
        if self.base64:
            data = embeddings_as_base64(data)
        await self.deliver(resp.status, headers, data)

    async def deliver(self, status: int, headers: list[tuple[bytes, bytes]], data: bytes) -> None:
        """Send one whole answer: its usage read, its model renamed, the daemon's headers added."""
        if self.count_usage:
            self.usage_tokens = usage_total(data)
        if self.rename is not None:
            data = self.rename.apply(data)
        headers = [*headers, *self.extra]
        if status in NO_BODY:
            data = b""
        else:
            headers.append((b"content-length", str(len(data)).encode()))
        self.started = True
        self.status = status
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": data})
        self.complete = True

    async def stream(self, resp: EngineResponse) -> None:
        chunks = resp.chunks()
        headers, encoding = forwarded_headers(resp.headers)
        if encoding:
            chunks = _decoded(chunks, Decoder(encoding, self.max_body))
        self.started = self.streaming = True
        self.status = resp.status
        headers += self.extra
        await self.send({"type": "http.response.start", "status": resp.status, "headers": headers})
        self.doing = "streaming the answer"
        send, rename = self.send, self.rename
        rest = b""  # the start of a line whose end has not come
        async for piece in chunks:
            chunk = rest + piece if rest else piece
            rest = b""
            if chunk[-1:] != b"\n":
                cut = chunk.rfind(b"\n") + 1
                chunk, rest = chunk[:cut], chunk[cut:]
                if len(rest) > MAX_LINE:
                    raise BackendUnavailable(f"The engine sent a stream line over {MAX_LINE} bytes")
                if not chunk:
                    continue
            self._count(chunk)
            if self.count_usage and _USAGE_EVENT.search(chunk):
                chunk = self._take_usage(chunk)
            if rename is not None:
                chunk = rename.apply(chunk)
            self._at_event_end = chunk[-2:] == b"\n\n"
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": rest, "more_body": False})
        self.complete = True

    def _count(self, chunk: bytes) -> None:
        """Events in whole lines: each chunk starts a line, so an event is a line that starts so."""
        if self.first_chunk is None:
            self.first_chunk = time.perf_counter()
        self.tokens += chunk.count(b"\ndata: {") + chunk.startswith(b"data: {")

    def _take_usage(self, chunk: bytes) -> bytes:
        """Read `usage` from the chunk's events; drop the usage-only event if it is hidden."""
        lines = chunk.split(b"\n")
        kept: list[bytes] = []
        skip_blank = False
        for line in lines:
            if skip_blank and line == b"":
                skip_blank = False
                continue
            skip_blank = False
            if line.startswith(b"data: {") and _USAGE_EVENT.search(line):
                event = _json_object(line[6:])
                usage = event.get("usage")
                if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int):
                    self.usage_tokens = usage["total_tokens"]
                    if self.hide_usage and event.get("choices") == []:
                        self.tokens -= 1
                        skip_blank = True
                        continue
            kept.append(line)
        return b"\n".join(kept)

    async def fail(self, error: RouterError) -> None:
        """End a begun stream with one SSE error event, on a line and event of its own."""
        self.error_code = error.code
        lead = b"" if self._at_event_end else b"\n"
        await self.send({"type": "http.response.body", "body": lead + error.sse_event(), "more_body": True})
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def body_chunks(resp: EngineResponse, max_body: int) -> AsyncIterator[bytes]:
    """The answer's body as it comes, decoded if the engine compressed it."""
    _, encoding = forwarded_headers(resp.headers)
    chunks = resp.chunks()
    return _decoded(chunks, Decoder(encoding, max_body)) if encoding else chunks


async def _decoded(chunks: AsyncIterator[bytes], decoder: Decoder) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        out = decoder.feed(chunk)
        if out:
            yield out
