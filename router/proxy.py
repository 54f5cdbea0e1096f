"""The data plane: send one request to an engine and relay its answer over ASGI.

- Streams (`text/event-stream`) are relayed chunk by chunk as they arrive:
  no buffering, no re-encoding. If the engine breaks mid-stream the client
  gets one SSE `error` event and the stream ends.
- Other answers are complete documents: read whole, then sent in one message
  (so an engine that dies half-way gives a clean 502, not truncated JSON).
- The only change made to an answer is the `model` field, and only when the
  engine's served name differs from the name the client asked for.
- aiohttp and socket exceptions are translated into RouterErrors here, once.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from router.errors import BackendTimeout, BackendUnavailable, RouterError

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# Not forwarded in either direction: connection-level, or recomputed by the server.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"date",
        b"server",
    }
)


@dataclass(frozen=True)
class Rename:
    """Rewrites `"model": "<served>"` to `"model": "<requested>"` in answer bytes."""

    pattern: re.Pattern[bytes]
    replacement: bytes

    @classmethod
    def of(cls, served: str, requested: str) -> Rename:
        import json

        pattern = re.compile(rb'("model"\s*:\s*)' + re.escape(json.dumps(served).encode()))
        return cls(pattern, rb"\g<1>" + json.dumps(requested).encode().replace(b"\\", b"\\\\"))

    def apply(self, data: bytes) -> bytes:
        return self.pattern.sub(self.replacement, data)


@dataclass(frozen=True)
class Timeouts:
    connect: float
    read: float  # silence from the engine (before the first byte or between chunks)


class Upstream:
    """One pooled aiohttp session for every request the daemon forwards."""

    def __init__(self, timeouts: Timeouts) -> None:
        self._timeouts = timeouts
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, enable_cleanup_closed=True)
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self._timeouts.connect, sock_read=self._timeouts.read
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False, skip_auto_headers=("User-Agent",)
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def forward(
        self,
        send: Send,
        *,
        url: str,
        body: bytes,
        headers: dict[str, str],
        extra_headers: list[tuple[bytes, bytes]],
        rename: Rename | None,
    ) -> None:
        """Relay the engine's answer to `send`. Raises RouterError if nothing was sent yet."""
        assert self._session is not None, "Upstream.start() was not called"
        try:
            resp = await self._session.post(url, data=body, headers=headers)
        except Exception as exc:
            raise _translate(exc, "sending the request") from exc
        try:
            if resp.content_type == "text/event-stream":
                await _relay_stream(resp, send, extra_headers, rename)
            else:
                await _relay_document(resp, send, extra_headers, rename)
        finally:
            resp.close()  # an unfinished answer drops the connection: the engine sees the cancel


def _translate(exc: Exception, doing: str) -> RouterError:
    if isinstance(exc, asyncio.TimeoutError):  # aiohttp's timeouts subclass it
        return BackendTimeout(f"The engine did not answer in time while {doing}")
    detail = str(exc) or type(exc).__name__
    return BackendUnavailable(f"The engine connection failed while {doing}: {detail}")


def _response_headers(
    resp: aiohttp.ClientResponse, extra: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    headers = [(k.lower(), v) for k, v in resp.raw_headers if k.lower() not in HOP_BY_HOP]
    return headers + extra


async def _relay_document(
    resp: aiohttp.ClientResponse, send: Send, extra: list[tuple[bytes, bytes]], rename: Rename | None
) -> None:
    try:
        data = await resp.read()
    except Exception as exc:
        raise _translate(exc, "reading the answer") from exc
    if rename is not None:
        data = rename.apply(data)
    headers = _response_headers(resp, extra)
    headers.append((b"content-length", str(len(data)).encode()))
    await send({"type": "http.response.start", "status": resp.status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


async def _relay_stream(
    resp: aiohttp.ClientResponse, send: Send, extra: list[tuple[bytes, bytes]], rename: Rename | None
) -> None:
    await send(
        {"type": "http.response.start", "status": resp.status, "headers": _response_headers(resp, extra)}
    )
    try:
        if rename is None:
            async for chunk in resp.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        else:  # line by line, so a `"model"` field is never split across two reads
            async for line in resp.content:
                await send({"type": "http.response.body", "body": rename.apply(line), "more_body": True})
    except Exception as exc:
        error = _translate(exc, "streaming the answer")
        await send({"type": "http.response.body", "body": error.sse_event(), "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
