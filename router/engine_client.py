"""A lean HTTP/1.1 keep-alive client for the daemon's own engines.

The daemon talks to a handful of engines on loopback, always with the same
few headers, and relays their answers byte for byte. A general-purpose client
spends most of its time on what this traffic never needs (URL objects, cookie
jars, header multidicts, payload registries, tracing hooks): aiohttp's client
was ~25% of the daemon's CPU under load. This one writes a pre-built request
head and parses the answer with httptools (llhttp, the parser uvicorn uses):

- `EngineClient.post()` returns an `EngineResponse` once the status line and
  headers are in; the body is then read whole (`read()`) or as it arrives
  (`chunks()`), with reading paused while unread data piles up.
- A connection goes back to the pool only after a complete, keep-alive answer.
  Closing an unfinished response aborts its connection, so the engine sees the
  client leave (that is how cancellation reaches an engine). A request is never
  sent twice: only a refused connection (the engine never saw it) is an error
  the caller may retry.
- Idle connections are reused newest first, and dropped a margin before the
  engine's own keep-alive would close them (the caller says how long that is).
- Every response has a deadline (loop time). Past it, reading fails with
  TimeoutError. A stream can instead be given an idle limit: each arrival
  then moves the deadline on, and so does time spent not waiting for the engine
  (relaying to a slow client). Deadlines are checked by a shared Ticker, not a
  timer per request.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from typing import cast

import httptools

from router.address import UNIX
from router.errors import ResponseTooLarge
from router.ticker import Ticker

KEEP_ALIVE_MARGIN = 1.0  # reuse an idle connection only this long before the engine may close it
HIGH_WATER = 256 * 1024  # unread bytes at which reading from the engine pauses


class EngineConnectError(OSError):
    """No connection to the engine could be made."""


class EngineConnectionLost(ConnectionError):
    """The engine closed the connection, or sent what is not HTTP, before the answer ended."""

    def __init__(self, message: str, before_answer: bool = False) -> None:
        super().__init__(message)
        self.before_answer = before_answer  # not one byte of the answer had come


class _Connection(asyncio.Protocol):
    """One TCP connection to an engine, carrying one request at a time."""

    def __init__(self, client: EngineClient, key: tuple[str, int]) -> None:
        self.client = client
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: EngineResponse | None = None
        self.closed = False
        self.idle_since = 0.0
        self.reuse_for = 0.0  # seconds it may sit idle and still be reused
        self.received = False  # any byte of the current answer

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.response is None or self.response.complete:
            self.abort()  # bytes nobody asked for: the connection can't be trusted
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.response.fail(EngineConnectionLost(f"the engine sent an invalid HTTP answer: {exc}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.client.forget(self)
        response, self.response = self.response, None
        if response is not None and not response.complete:
            response.connection_lost()
        # Break the reference cycles (parser and transport each hold this protocol): freed
        # now, not at the next full collection, with the buffers they hold.
        self.parser = self.transport = None  # type: ignore[assignment]

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.response is not None and self.response.complete:
            self.closed = True  # a second answer to one request: never reuse this connection

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        self.response.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        assert self.response is not None
        self.response.headers_complete(self.parser.get_status_code(), self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        assert self.response is not None
        self.response.feed(body)

    def on_message_complete(self) -> None:
        assert self.response is not None
        self.response.message_complete()

    # used by EngineClient / EngineResponse

    def send(self, data: bytes, response: EngineResponse) -> None:
        assert self.transport is not None
        self.response = response
        self.received = False
        self.transport.write(data)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def release(self) -> None:
        """The answer is complete: back to the pool, or closed if the engine said so."""
        response, self.response = self.response, None
        if response is None or not response.keep_alive or self.closed:
            self.abort()
            return
        assert self.transport is not None
        if not self.transport.is_reading():
            self.transport.resume_reading()
        self.client.keep(self)


class EngineResponse:
    """An engine's answer: status and headers at once, the body as it comes."""

    def __init__(self, connection: _Connection, deadline: float) -> None:
        self._conn = connection
        self.deadline = deadline  # loop time by which the answer must be complete
        self._idle = 0.0  # when set: each arrival moves the deadline to now + idle (at most _hard)
        self._hard = math.inf
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []  # names lower-cased
        self.keep_alive = False
        self.complete = False
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._headers_done = False
        self._closed = False

    @property
    def content_type(self) -> str:
        """The media type, lower-case, without parameters ("" if none was sent)."""
        for name, value in self.headers:
            if name == b"content-type":
                return value.partition(b";")[0].strip().decode("latin-1").lower()
        return ""

    # fed by the connection

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def headers_complete(self, status: int, keep_alive: bool) -> None:
        self.status, self.keep_alive, self._headers_done = status, keep_alive, True
        self._wake()

    def feed(self, data: bytes) -> None:
        if self._idle:
            self.deadline = min(asyncio.get_running_loop().time() + self._idle, self._hard)
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and self._conn.transport is not None:
            self._conn.transport.pause_reading()
        self._wake()

    def message_complete(self) -> None:
        self.complete = True
        self._wake()

    def fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def connection_lost(self) -> None:
        if self._headers_done and self._delimited_by_close():
            self.message_complete()
            return
        message = "the engine closed the connection before its answer ended"
        self.fail(EngineConnectionLost(message, before_answer=not self._conn.received))

    def _delimited_by_close(self) -> bool:
        """An answer with neither Content-Length nor chunked encoding ends when the connection does."""
        for name, value in self.headers:
            if name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value.lower()):
                return False
        return not self.keep_alive

    def tick(self, now: float) -> bool:
        """The Ticker's check: fail the answer once its deadline has passed.

        With an idle limit, only the engine's silence counts: while the reader is
        not waiting for data (it is sending to a slow client, and reading from the
        engine is paused for backpressure), the deadline moves on with the clock."""
        if self.complete or self._closed or self._error is not None:
            return False
        if self._idle and self._waiter is None:
            self.deadline = min(now + self._idle, self._hard)
        if now >= self.deadline:
            self.fail(TimeoutError("the engine's answer did not come in time"))
            return False
        return True

    # read by the proxy

    def until_idle(self, idle: float, hard: float = math.inf) -> None:
        """From now on the answer may go on while data keeps coming: at most `idle`
        seconds between arrivals (from now for the first), and never past `hard`."""
        self._idle, self._hard = idle, hard
        self.deadline = min(asyncio.get_running_loop().time() + idle, hard)

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self._error is not None:
            raise self._error

    async def wait_headers(self) -> None:
        while not self._headers_done:
            await self._wait()

    def _take(self) -> bytes:
        data = self._buffer[0] if len(self._buffer) == 1 else b"".join(self._buffer)
        self._buffer.clear()
        if self._buffered > HIGH_WATER and self._conn.transport is not None and not self._conn.closed:
            self._conn.transport.resume_reading()
        self._buffered = 0
        return data

    async def read(self, limit: int) -> bytes:
        """The whole body; ResponseTooLarge (and the connection dropped) past `limit` bytes
        (never more than `limit` and one read are held)."""
        parts: list[bytes] = []
        size = 0
        while True:
            if self._buffer:
                part = self._take()  # taking resumes a paused read
                size += len(part)
                if size > limit:
                    raise ResponseTooLarge(f"The engine's answer is over the {limit}-byte limit")
                parts.append(part)
            if self.complete:
                return parts[0] if len(parts) == 1 else b"".join(parts)
            await self._wait()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: everything received since the last step, at each step."""
        while True:
            if self._buffer:
                yield self._take()
            elif self.complete:
                return
            else:
                await self._wait()

    def close(self) -> None:
        """Release the connection: to the pool if the answer was read whole, else abort it."""
        if self._closed:
            return
        self._closed = True
        self._conn.client.ticker.discard(self)
        if self.complete and not self._buffer:
            self._conn.release()
        else:
            self._conn.abort()
            self._buffer.clear()
            self._error = None  # its traceback holds the reader's frames, which hold this


class EngineClient:
    """Pooled keep-alive connections to engines, keyed by (host, port), or (socket path, UNIX)
    for an engine on a Unix socket."""

    def __init__(self, ticker: Ticker) -> None:
        self.ticker = ticker
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._closing = False

    def keep(self, conn: _Connection) -> None:
        if self._closing:
            conn.abort()
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.key, []).append(conn)

    def forget(self, conn: _Connection) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    async def _connect(self, key: tuple[str, int], timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        where = f"{key[0]}:{key[1]}" if key[1] != UNIX else f"unix:{key[0]}"
        try:
            async with asyncio.timeout(timeout):
                if key[1] == UNIX:
                    _, conn = await loop.create_unix_connection(lambda: _Connection(self, key), key[0])
                else:
                    _, conn = await loop.create_connection(lambda: _Connection(self, key), key[0], key[1])
        except TimeoutError as exc:
            raise EngineConnectError(f"no connection to {where} within {timeout:g}s") from exc
        except OSError as exc:
            raise EngineConnectError(f"cannot connect to {where}: {exc}") from exc
        return conn

    def _reuse(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if now - conn.idle_since > conn.reuse_for:  # newest first: every one below is older still
                conn.abort()
                for old in idle:
                    old.abort()
                idle.clear()
                return None
            return conn
        return None

    async def post(
        self,
        host: str,
        port: int,
        request: bytes,
        *,
        connect_timeout: float,
        keep_alive: float,
        deadline: float,
    ) -> EngineResponse:
        """Send `request` (a complete HTTP/1.1 request) and wait for the answer's headers.

        `keep_alive`: how long the engine keeps an idle connection open.
        `deadline`: loop time by which the answer must be in (see EngineResponse.deadline).
        """
        key = (host, port)
        # A kept connection that breaks once the request is written is not retried: the
        # engine may have read the request (an engine that crashed on it would crash
        # again). Kept connections are reused only well inside the engine's keep-alive,
        # so one closed for idleness under a new request is not expected.
        conn = self._reuse(key) or await self._connect(key, connect_timeout)
        return await self._exchange(conn, request, keep_alive, deadline)

    async def _exchange(
        self, conn: _Connection, request: bytes, keep_alive: float, deadline: float
    ) -> EngineResponse:
        conn.reuse_for = keep_alive - KEEP_ALIVE_MARGIN
        response = EngineResponse(conn, deadline)
        self.ticker.add(response)
        conn.send(request, response)
        try:
            await response.wait_headers()
        except BaseException:
            response.close()
            raise
        return response

    def close(self) -> None:
        self._closing = True
        for idle in self._idle.values():
            for conn in idle:
                conn.abort()
        self._idle.clear()


def request_head(method: str, host: str, port: int, path: str, headers: dict[str, str]) -> bytes:
    """The fixed part of a request: request line, Host and the given headers (no blank line)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}" if port != UNIX else "Host: localhost"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n").encode("latin-1")

