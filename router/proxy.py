"""The data plane: send one request to an engine and relay its answer over ASGI.

- Streams (`text/event-stream`) are relayed chunk by chunk as they arrive:
  no buffering, no re-encoding. If the engine breaks mid-stream the client
  gets one SSE `error` event and the stream ends.
- Other answers are complete documents: read whole, then sent in one message
  (so an engine that dies half-way gives a clean 502, not truncated JSON).
- The only change made to an answer is the `model` field, and only when the
  engine's served name differs from the name the client asked for.
- Engine connection errors and timeouts are translated into RouterErrors
  here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import re
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from config.models import Timeouts
from router.engine_client import EngineClient, EngineConnectError, EngineResponse, request_head
from router.errors import BackendConnectFailed, BackendTimeout, BackendUnavailable, RouterError, ShuttingDown
from router.ticker import Ticker

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
        pattern = re.compile(rb'("model"\s*:\s*)' + re.escape(json.dumps(served).encode()))
        return cls(pattern, rb"\g<1>" + json.dumps(requested).encode().replace(b"\\", b"\\\\"))

    def apply(self, data: bytes) -> bytes:
        return self.pattern.sub(self.replacement, data)


class Upstream:
    """Every request the daemon forwards goes through one pooled EngineClient."""

    def __init__(self, ticker: Ticker) -> None:
        self._client = EngineClient(ticker)

    async def close(self) -> None:
        self._client.close()

    async def forward(
        self,
        send: Send,
        *,
        base_url: str,
        path: str,
        api_key: str,
        keep_alive: float,
        request_id: str,
        body: bytes,
        extra_headers: list[tuple[bytes, bytes]],
        rename: Rename | None,
        timeouts: Timeouts,
        count_usage: bool = False,
    ) -> Relay:
        """POST `body` to the engine at `base_url` and relay its answer to `send`.

        Returns a Relay that says how it went. Raises RouterError if nothing
        was sent yet. Once a stream has begun, a failure (engine gone,
        BACKEND_TIMEOUT, the daemon shutting down) ends it with one SSE error
        event instead.

        One deadline per request: a document must be complete, a stream must
        begin, within `first_byte`; then each chunk must come within `idle` of
        the last, and all of it within `total` (if set). It bounds waiting on
        the engine, never on a slow client.
        """
        host, port, head = _request_head(base_url, path, api_key)
        request = b"%sX-Request-ID: %s\r\nContent-Length: %d\r\n\r\n%s" % (
            head, request_id.encode("latin-1"), len(body), body,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        now = loop.time()
        hard = now + timeouts.total if timeouts.total else math.inf
        relay = Relay(send, extra_headers, rename, count_usage)
        try:
            resp = await self._client.post(
                host, port, request,
                connect_timeout=timeouts.connect, keep_alive=keep_alive,
                deadline=min(now + timeouts.first_byte, hard),
            )  # fmt: skip
            try:
                if resp.content_type == "text/event-stream":
                    resp.until_idle(timeouts.idle, hard)
                    await relay.stream(resp)
                else:
                    await relay.document(resp)
            finally:
                resp.close()  # an unfinished answer drops the connection: the engine sees the cancel
        except Exception as exc:
            error = _translate(exc, relay.doing)
            if not relay.started:
                raise error from exc
            await relay.fail(error)
        except asyncio.CancelledError:
            # The client left (sending is then a no-op) or the daemon's shutdown
            # grace ran out: say so in the stream before the connection closes.
            if relay.started:
                with contextlib.suppress(Exception):
                    await relay.fail(ShuttingDown("The daemon is shutting down; the stream was cut off"))
            raise
        return relay


@functools.lru_cache(maxsize=256)
def _request_head(base_url: str, path: str, api_key: str) -> tuple[str, int, bytes]:
    """Host, port and the constant part of every request to one engine launch's path."""
    url = urllib.parse.urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return host, port, request_head("POST", host, port, path, headers)


def _translate(exc: Exception, doing: str) -> RouterError:
    if isinstance(exc, TimeoutError):
        return BackendTimeout(f"The engine did not answer in time while {doing}")
    if isinstance(exc, EngineConnectError):
        return BackendConnectFailed(f"The engine refused the connection: {exc}")
    detail = str(exc) or type(exc).__name__
    return BackendUnavailable(f"The engine connection failed while {doing}: {detail}")


class Relay:
    """Sends the engine's answer to the client, and keeps what metrics need of it."""

    def __init__(
        self, send: Send, extra: list[tuple[bytes, bytes]], rename: Rename | None, count_usage: bool = False
    ) -> None:
        self.send = send
        self.count_usage = count_usage
        self.usage_tokens = 0  # the answer's usage.total_tokens, when asked to count it
        self.extra = extra
        self.rename = rename
        self.started = False
        self.doing = "waiting for the engine's answer"
        self.status = 0
        self.error_code = ""  # set when a begun stream ends with an error event
        self.streaming = False
        self.first_chunk: float | None = None  # time.perf_counter() of the first streamed chunk
        self.tokens = 0  # SSE data events relayed

    def _headers(self, resp: EngineResponse) -> list[tuple[bytes, bytes]]:
        headers = [(k, v) for k, v in resp.headers if k not in HOP_BY_HOP]
        return headers + self.extra

    async def document(self, resp: EngineResponse) -> None:
        self.doing = "reading the answer"
        data = await resp.read()
        if self.count_usage:
            self.usage_tokens = _usage_tokens(data)
        if self.rename is not None:
            data = self.rename.apply(data)
        headers = self._headers(resp)
        headers.append((b"content-length", str(len(data)).encode()))
        self.started = True
        self.status = resp.status
        await self.send({"type": "http.response.start", "status": resp.status, "headers": headers})
        await self.send({"type": "http.response.body", "body": data})

    async def stream(self, resp: EngineResponse) -> None:
        self.started = self.streaming = True
        self.status = resp.status
        start = {"type": "http.response.start", "status": resp.status, "headers": self._headers(resp)}
        await self.send(start)
        self.doing = "streaming the answer"
        send, rename = self.send, self.rename
        # With a rename, whole lines only, so a `"model"` field is never split across two reads.
        chunks = resp.chunks() if rename is None else _whole_lines(resp.chunks())
        async for chunk in chunks:
            self._count(chunk)
            body = chunk if rename is None else rename.apply(chunk)
            await send({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _count(self, chunk: bytes) -> None:
        if self.first_chunk is None:
            self.first_chunk = time.perf_counter()
        self.tokens += chunk.count(b"data: {")

    async def fail(self, error: RouterError) -> None:
        self.error_code = error.code
        await self.send({"type": "http.response.body", "body": error.sse_event(), "more_body": True})
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})


async def _whole_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The same bytes, cut only after a newline (the rest, if any, at the end)."""
    rest = b""
    async for chunk in chunks:
        lines, _, rest = (rest + chunk).rpartition(b"\n")
        if lines:
            yield lines + b"\n"
    if rest:
        yield rest


def _usage_tokens(data: bytes) -> int:
    """usage.total_tokens of a JSON answer (0 if it has none)."""
    try:
        usage = json.loads(data).get("usage") or {}
        return int(usage.get("total_tokens") or 0)
    except (ValueError, AttributeError, TypeError):
        return 0
