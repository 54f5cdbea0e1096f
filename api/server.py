"""uvicorn's httptools protocol, with each response written in one send().

uvicorn writes a response's head when the app sends `http.response.start`
and its body at `http.response.body`: two `send()` system calls and two TCP
segments for every small answer. Under load those two writes were ~28% of the
daemon's CPU. Here the connection's transport holds what is written until the
end of the current event-loop step, then writes it at once: a head and a body
sent in the same step go out together, and a stream's chunks, which arrive in
later steps, still leave as soon as they are relayed (the hold lasts
microseconds, never a timer).

The protocol also keeps each connection's clocks and sizes for the limits in
api/connections.py (head size and time, body silence, blocked writes, the
connection cap), and answers HTTP/1.0 clients without chunked encoding.
Selected in main.py with `uvicorn.Config(http=HttpProtocol.bind(table))`.

It relies on uvicorn's HttpToolsProtocol internals (checked in uvicorn 0.54):
`connection_made`, `data_received`, the parser callbacks, `on_response_complete`,
`pause_writing`/`resume_writing`, `self.cycle`, `self.flow`, `self.pipeline`, and
RequestResponseCycle's `send` and its response fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from api.connections import ConnectionTable
from router.errors import HeadersTooLarge, InvalidHttp, RequestTimeout, RouterError, TooManyConnections

log = logging.getLogger(__name__)


class CoalescingTransport(asyncio.Transport):
    """Forwards to a transport; writes made in one loop step reach it as one write."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._held:
            self._loop.call_soon(self._flush)
        self._held.append(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def _flush(self) -> None:
        if not self._held:
            return
        held = self._held
        self._held = []
        if not self._transport.is_closing():
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = []
        self._transport.abort()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(d) for d in self._held)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)


class _HeadTooLarge(Exception):
    """Raised from a parser callback: the request head has too many fields."""


def _raw_error(error: RouterError) -> bytes:
    """A complete `Connection: close` answer, for replies written before or outside ASGI."""
    body = error.json_bytes()
    head = [STATUS_LINE[error.status], b"content-type: application/json\r\n"]
    head += [f"{k.lower()}: {v}\r\n".encode() for k, v in error.headers().items()]
    head += [b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n"]
    return b"".join(head) + body


LINGER_BYTES = 1 << 20  # what a connection answered for the last time may still send

BUSY = _raw_error(TooManyConnections("Too many connections are open; try again shortly", retry_after=1.0))


class HttpProtocol(HttpToolsProtocol):
    """One client connection: uvicorn's protocol, one send() per loop step, and the limits."""

    table: ClassVar[ConnectionTable]

    @classmethod
    def bind(cls, table: ConnectionTable) -> type[HttpProtocol]:
        """This protocol class, for one server's table of connections."""
        return type("HttpProtocol", (cls,), {"table": table})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = self.table.limits
        self._admitted = False
        self._discarding = False  # the connection was answered for the last time
        self._dropped = 0  # bytes read and dropped since
        self._linger: asyncio.TimerHandle | None = None
        # The clocks (loop time), each None while it does not run:
        self._waiting: float | None = None  # for a request head, since the start or the last answer
        self._body_at: float | None = None  # last arrival while a request body comes
        self._blocked: float | None = None  # since a write to the client could not go out
        self._in_head = True  # bytes received now belong to a request head
        self._started = False  # a byte of that head has come (the head may still be empty)
        self._answered = False  # a response was completed on this connection
        self._head_bytes = 0
        self._too_large = False

    # ------------------------------------------------------------ connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        decision = self.table.admit(self, self.loop)
        if decision == "drop":
            transport.abort()
            return
        if decision == "refuse":
            self._refuse(transport)
            return
        self._admitted = True
        super().connection_made(CoalescingTransport(transport, self.loop))
        self._waiting = self.loop.time()

    def _refuse(self, transport: asyncio.Transport) -> None:
        """Answer 503 before reading anything."""
        self.transport = transport
        self.table.lingering += 1
        self._linger_after(BUSY)

    def _linger_after(self, answer: bytes) -> None:
        """Send a last answer and our end of the stream, then read and drop what the client
        still sends until it closes, for at most a second and LINGER_BYTES (as nginx's
        lingering close). Closing at once, with its unread bytes in the kernel, would reset
        the connection and lose the answer on the way."""
        self._discarding = True
        self.transport.write(answer)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._linger = self.loop.call_later(1.0, self.transport.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if not self._admitted:
            self.table.lingering -= 1
            return
        self.table.discard(self)
        super().connection_lost(exc)

    # ------------------------------------------------------------- requests

    def data_received(self, data: bytes) -> None:
        if self._discarding:  # answered and closing (or refused): what still comes is dropped
            self._dropped += len(data)
            if self._dropped > LINGER_BYTES:
                self.transport.abort()  # a client still pushing after its answer: stop reading
            return
        if self._in_head:
            self._started = True
            self._head_bytes += len(data)
            if self._head_bytes > self._limits.max_header_bytes:
                self._oversized(data)
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # no WebSockets here (uvicorn `ws="none"`): the request is served as plain HTTP
        except httptools.HttpParserError as exc:
            self._parse_error(exc)

    def _oversized(self, data: bytes) -> None:
        """More head bytes than allowed have come. httptools would buffer a head of any
        size, so it is fed only the allowance: the head must end within it."""
        room = self._limits.max_header_bytes - (self._head_bytes - len(data))
        self._head_bytes -= len(data) - room
        try:
            self.parser.feed_data(data[:room])
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError as exc:
            self._parse_error(exc)
            return
        if self._in_head:
            self._answer(HeadersTooLarge(f"The request head is over {self._limits.max_header_bytes} bytes"))
            return
        self.data_received(data[room:])  # the head ended in time: the rest is its body

    def _parse_error(self, exc: Exception) -> None:
        if self._too_large:
            self._answer(HeadersTooLarge(f"The request has over {self._limits.max_headers} header fields"))
        else:
            self._answer(InvalidHttp(f"Invalid HTTP request: {exc}"))

    def on_headers_complete(self) -> None:
        if len(self.headers) > self._limits.max_headers:  # (their bytes were bounded as they came)
            self._too_large = True
            raise _HeadTooLarge
        self._in_head, self._started, self._waiting = False, False, None
        self._head_bytes = 0
        self._body_at = self.loop.time()
        super().on_headers_complete()
        if self.scope.get("http_version") == "1.0" and self.cycle is not None:
            self.cycle.__class__ = Http10Cycle  # before its task first runs (the next loop step)

    # on_body and on_message_complete: uvicorn's own, inlined (they run for every request),
    # plus the body clock and the end of the head.

    def on_body(self, body: bytes) -> None:
        self._body_at = self.loop.time()
        if (self.parser.should_upgrade() and self._should_upgrade()) or self.cycle.response_complete:
            return
        self.cycle.body += body
        if len(self.cycle.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        self.cycle.message_event.set()

    def on_message_complete(self) -> None:
        self._body_at = None
        self._in_head = True
        if (self.parser.should_upgrade() and self._should_upgrade()) or self.cycle.response_complete:
            return
        self.cycle.more_body = False
        self.cycle.message_event.set()

    def on_response_complete(self) -> None:
        # uvicorn's, without its keep-alive timer (a loop timer armed and cancelled per
        # response, ~2.5 us): the sweep closes an idle keep-alive connection instead.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self._waiting = self.loop.time()
            self._answered = True

    def pause_writing(self) -> None:
        self._blocked = self.loop.time()
        super().pause_writing()

    def resume_writing(self) -> None:
        self._blocked = None
        super().resume_writing()

    # --------------------------------------------------- the table's calls

    def waiting_since(self) -> float | None:
        return self._waiting if self._admitted else None

    def check(self, now: float) -> None:
        limits = self._limits
        if self.transport.is_closing():
            return
        waiting, body_at, blocked = self._waiting, self._body_at, self._blocked
        if waiting is not None:
            idle = self._answered and not self._started  # a kept connection between requests
            if now - waiting > (limits.keep_alive if idle else limits.header_timeout):
                if self._started:
                    self._answer(RequestTimeout(f"No request head came within {limits.header_timeout:g}s"))
                else:
                    self.transport.close()  # nothing was asked: nothing to answer
        elif body_at is not None and not self.flow.read_paused and now - body_at > limits.body_timeout:
            self._answer(RequestTimeout(f"The request body paused for over {limits.body_timeout:g}s"))
        elif blocked is not None and now - blocked > limits.write_timeout:
            log.warning("client %s read nothing for %.0fs: connection reset", self.client, now - blocked)
            self._reset()  # the request sees a disconnect, and is cancelled at the engine

    def _reset(self) -> None:
        """Abort with a TCP reset. A plain close would leave the kernel holding the unsent
        answer (megabytes) behind a FIN the client, which reads nothing, never gets."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def evict(self) -> None:
        self.transport.close()

    def _answer(self, error: RouterError) -> None:
        """Reply outside ASGI and close; only while no response has begun on this connection."""
        if self.cycle is not None and self.cycle.response_started and not self.cycle.response_complete:
            self.transport.abort()
            return
        self._waiting = self._body_at = None  # no clock runs once the answer is given
        self._linger_after(_raw_error(error))


class Http10Cycle(RequestResponseCycle):
    """An HTTP/1.0 request: a response of unknown length is sent as is and ends when the
    connection closes (HTTP/1.0 has no chunked encoding; uvicorn would use it)."""

    _until_close = False

    async def send(self, message: Any) -> None:
        if message["type"] == "http.response.start" and not self.response_started:
            names = {name.lower() for name, _ in message.get("headers", [])}
            if not names & {b"content-length", b"transfer-encoding"} and message["status"] not in (204, 304):
                self._until_close = self.scope["method"] != "HEAD"
                self.chunked_encoding = False  # so uvicorn adds no transfer-encoding
        if not self._until_close or message["type"] != "http.response.body" or not self.response_started:
            await super().send(message)
            return
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected or self.response_complete:
            return
        self.transport.write(message.get("body", b""))
        if not message.get("more_body", False):
            self.response_complete = True
            self.message_event.set()
            self.transport.close()
            self.on_response()
